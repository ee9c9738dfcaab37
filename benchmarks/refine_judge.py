"""How well does the refine judge separate good task inputs from bad ones? Public data only.

Usage:  .venv/bin/python benchmarks/refine_judge.py [--n 60] [--model gemma-3-270m]

Good inputs: FPB and TFNS test sentences (real financial news and tweets). Bad inputs, in three
kinds the synthetic data really shows: off-domain text (MedQuAD questions), word salad (a test
sentence with its words shuffled) and fragments (the first 4 words of a test sentence). The judge
is the `refine` stage's prompt with the demo's parameters (FiQA training examples as the good
shots, the default bad examples). Reported: ROC AUC of p(yes) for good against each bad kind,
and the share of each kept at the demo's threshold of 0.5. Writes benchmarks/results/refine_judge.md.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

TASK = "financial sentiment analysis: a single news headline or tweet about markets or companies"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=60, help="items of each kind")
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from sklearn.metrics import roc_auc_score

    from knowledgesg.builtin_data import load_builtin
    from knowledgesg.models import load_causal_lm, resolve_model
    from knowledgesg.scoring import choice_logprobs, normalized_choice_probs
    from pipelines.refine import DEFAULT_BAD_EXAMPLES, balanced_shots, candidate_text, clip_words, judge_prompt

    rng = random.Random(args.seed)
    labels = ["negative", "neutral", "positive"]
    shots = balanced_shots(load_builtin("fiqa_train", "fiqa_train"), labels, 6)
    good_shots = [clip_words(candidate_text(r), 60) for r in shots]
    tests = [candidate_text(r) for name in ("fpb_test", "tfns_test") for r in load_builtin(name, name)]
    rng.shuffle(tests)
    good = tests[: args.n]
    donors = tests[args.n : 3 * args.n]
    medical = [r.instruction for r in load_builtin("medquad", "medquad")]
    rng.shuffle(medical)
    kinds = {
        "off-domain (MedQuAD questions)": medical[: args.n],
        "word salad (shuffled test sentence)": [" ".join(rng.sample(t.split(), len(t.split()))) for t in donors[: args.n]],
        "fragment (first 4 words)": [" ".join(t.split()[:4]) for t in donors[args.n : 2 * args.n]],
    }
    model, tokenizer = load_causal_lm(resolve_model(args.model))
    start = time.perf_counter()

    def p_yes(texts: list[str]) -> list[float]:
        table = choice_logprobs(model, tokenizer, [judge_prompt(TASK, good_shots, DEFAULT_BAD_EXAMPLES, t) for t in texts], [" Yes", " No"], 8)
        return normalized_choice_probs(table)[:, 0].tolist()

    good_scores = p_yes(good)
    rows = [f"| good (FPB and TFNS test sentences) | {len(good)} | {sum(s >= 0.5 for s in good_scores) / len(good):.0%} | - | {sum(good_scores) / len(good):.3f} |"]
    for kind, texts in kinds.items():
        scores = p_yes(texts)
        auc = roc_auc_score([1] * len(good) + [0] * len(texts), good_scores + scores)
        rows.append(f"| {kind} | {len(texts)} | {sum(s >= 0.5 for s in scores) / len(texts):.0%} | {auc:.3f} | {sum(scores) / len(scores):.3f} |")
    seconds = time.perf_counter() - start
    write_result("refine_judge", [
        "# The refine judge on public good and bad inputs", "",
        f"Command: `{command()}`", f"Machine: {machine()}", f"Model: {args.model}; seed {args.seed}; {seconds:.0f} s for {len(good) * 4} judgements", "",
        "| inputs | n | kept at p(yes) >= 0.5 | ROC AUC against good | mean p(yes) |", "|---|---|---|---|---|", *rows, "",
        "AUC 0.5 is chance; 1.0 separates the kind from good inputs perfectly.",
    ])


if __name__ == "__main__":
    main()
