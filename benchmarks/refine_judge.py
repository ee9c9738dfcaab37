"""How well does the refine judge separate good task inputs from bad ones? Public data only.

Usage:  .venv/bin/python benchmarks/refine_judge.py [--n 60] [--model gemma-3-270m]

Good inputs: FPB and TFNS training sentences (real financial news and tweets; not the test sets,
which the benchmarks score). Bad inputs, in three kinds the synthetic data really shows:
off-domain text (MedQuAD questions), word salad (a sentence with its words shuffled) and
fragments (its first 4 words). The judge is the `refine` stage's prompt with the demo's
parameters (FiQA training examples as the good shots, the default bad examples). Reported: ROC
AUC of p(yes) and of the fluency score (mean token log-probability) for good against each bad
kind, and the share kept by the demo's rules. Writes benchmarks/results/refine_judge.md.
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
    parser.add_argument("--min-fluency", type=float, default=-6.5, help="the demo's refine.min_fluency")
    args = parser.parse_args()

    from sklearn.metrics import roc_auc_score

    from knowledgesg.builtin_data import load_builtin
    from knowledgesg.models import load_causal_lm, resolve_model
    from knowledgesg.scoring import choice_logprobs, normalized_choice_probs
    from pipelines.refine import DEFAULT_BAD_EXAMPLES, balanced_shots, candidate_text, clip_words, fluency_scores, judge_prompt

    rng = random.Random(args.seed)
    labels = ["negative", "neutral", "positive"]
    shots = balanced_shots(load_builtin("fiqa_train", "fiqa_train"), labels, 6)
    good_shots = [clip_words(candidate_text(r), 60) for r in shots]
    sentences = [candidate_text(r) for name in ("fpb_train", "tfns_train") for r in load_builtin(name, name)]
    rng.shuffle(sentences)
    good = sentences[: args.n]
    donors = sentences[args.n : 3 * args.n]
    medical = [r.instruction for r in load_builtin("medquad", "medquad")]
    rng.shuffle(medical)
    kinds = {
        "off-domain (MedQuAD questions)": medical[: args.n],
        "word salad (shuffled sentence)": [" ".join(rng.sample(t.split(), len(t.split()))) for t in donors[: args.n]],
        "fragment (first 4 words)": [" ".join(t.split()[:4]) for t in donors[args.n : 2 * args.n]],
    }
    model, tokenizer = load_causal_lm(resolve_model(args.model))
    start = time.perf_counter()

    def p_yes(texts: list[str]) -> list[float]:
        table = choice_logprobs(model, tokenizer, [judge_prompt(TASK, good_shots, DEFAULT_BAD_EXAMPLES, t) for t in texts], [" Yes", " No"], 8)
        return normalized_choice_probs(table)[:, 0].tolist()

    def fluency(texts: list[str]) -> list[float]:
        return fluency_scores(model, tokenizer, texts, 8, "cpu")

    def both(scores: list[float], fluent: list[float]) -> str:
        return f"{sum(s >= 0.5 and f >= args.min_fluency for s, f in zip(scores, fluent)) / len(scores):.0%}"

    good_scores, good_fluency = p_yes(good), fluency(good)
    rows = [f"| good (FPB and TFNS training sentences) | {len(good)} | {sum(s >= 0.5 for s in good_scores) / len(good):.0%} | - | {sum(good_scores) / len(good):.3f} | - | {sum(good_fluency) / len(good):.2f} | {both(good_scores, good_fluency)} |"]
    for kind, texts in kinds.items():
        scores, fluent = p_yes(texts), fluency(texts)
        labels = [1] * len(good) + [0] * len(texts)
        auc, auc_fluency = roc_auc_score(labels, good_scores + scores), roc_auc_score(labels, good_fluency + fluent)
        rows.append(f"| {kind} | {len(texts)} | {sum(s >= 0.5 for s in scores) / len(texts):.0%} | {auc:.3f} | {sum(scores) / len(scores):.3f} | {auc_fluency:.3f} | {sum(fluent) / len(fluent):.2f} | {both(scores, fluent)} |")
    seconds = time.perf_counter() - start
    write_result("refine_judge", [
        "# The refine judge on public good and bad inputs", "",
        f"Command: `{command()}`", f"Machine: {machine()}", f"Model: {args.model}; seed {args.seed}; {seconds:.0f} s for {len(good) * 4} judgements", "",
        f"| inputs | n | kept at p(yes) >= 0.5 | judge AUC against good | mean p(yes) | fluency AUC against good | mean fluency | kept at p(yes) >= 0.5 and fluency >= {args.min_fluency:g} |", "|---|---|---|---|---|---|---|---|", *rows, "",
        "AUC 0.5 is chance; 1.0 separates the kind from good inputs perfectly. Fluency: the professional model's mean token",
        "log-probability of the input after 'Text:' (the figure `refine` records beside the judge score).",
    ])


if __name__ == "__main__":
    main()
