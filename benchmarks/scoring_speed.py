"""Choice scoring: one forward pass per prompt for one-token choices, against one sequence per choice.

Usage:  .venv/bin/python benchmarks/scoring_speed.py [--prompts 48]

Two workloads, both as the pipeline runs them: FPB sentiment prompts scored over 3 labels with
SmolLM2 (what `evaluate` does), and the refine judge's few-shot prompts over Yes/No with Gemma 3
270M. "One sequence per choice" is the earlier method (context + choice as its own row, the
choice's logit read at the end); it is reproduced by moving the context's last token into the
continuation, which forces the multi-token path on the same model and the same numbers. Both
methods run twice, alternating, in one process; medians. The largest difference between the two
methods' scores is printed beside the times. Writes benchmarks/results/scoring_speed.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=48)
    args = parser.parse_args()

    from eval.benchmarks import choice_ids, context_ids, load_task
    from knowledgesg.builtin_data import load_builtin
    from knowledgesg.models import load_causal_lm, resolve_model
    from knowledgesg.scoring import continuation_logprobs, encode_context, encode_continuation, pad_id
    from pipelines.refine import DEFAULT_BAD_EXAMPLES, judge_prompt

    rows = []
    smol, smol_tok = load_causal_lm(resolve_model("smollm2-135m-instruct"))
    items = load_task("fpb", args.prompts, seed=0)
    fpb = ([context_ids(smol_tok, item.prompt) for item in items], [choice_ids(smol_tok, c) for c in items[0].choices])
    gemma, gemma_tok = load_causal_lm(resolve_model("gemma-3-270m"))
    good = [r.input for r in load_builtin("fpb_train", "fpb")[:6]]
    candidates = [r.input for r in load_builtin("tfns_train", "tfns")[: args.prompts]]
    judge = ([encode_context(gemma_tok, judge_prompt("financial sentiment analysis", good, DEFAULT_BAD_EXAMPLES, c)) for c in candidates],
             [encode_continuation(gemma_tok, " Yes"), encode_continuation(gemma_tok, " No")])

    for label, model, tokenizer, (contexts, choices) in (("FPB labels, SmolLM2 (3 choices)", smol, smol_tok, fpb), ("refine judge, Gemma 3 270M (Yes/No)", gemma, gemma_tok, judge)):
        pairs = [(c, choice) for c in contexts for choice in choices]
        shared_args = ([c for c, _ in pairs], [choice for _, choice in pairs])
        split_args = ([c[:-1] for c, _ in pairs], [[c[-1], *choice] for c, choice in pairs])
        times = {"shared": [], "split": []}
        scores = {}
        for _ in range(2):
            for name, (ctx, cont) in (("split", split_args), ("shared", shared_args)):
                start = time.perf_counter()
                scores[name] = continuation_logprobs(model, ctx, cont, pad_id(tokenizer), 8)
                times[name].append(time.perf_counter() - start)
        difference = max(abs(float(a[-1]) - float(b[-1])) for a, b in zip(scores["shared"], scores["split"]))
        mean_length = sum(len(c) for c in contexts) / len(contexts)
        one, shared = statistics.median(times["split"]), statistics.median(times["shared"])
        rows.append(f"| {label} | {len(contexts)} | {mean_length:.0f} | {one:.2f} | {shared:.2f} | **{one / shared:.1f}x** | {difference:.1e} |")

    write_result("scoring_speed", [
        "# Choice scoring: one pass per prompt against one sequence per choice", "",
        f"Command: `{command()}`", f"Machine: {machine()}", "",
        "| workload | prompts | mean prompt tokens | one sequence per choice (s) | one pass per prompt (s) | speed-up | largest score difference |",
        "|---|---:|---:|---:|---:|---:|---:|", *rows, "",
        "Batch 8, left-padded, logits for the last position(s) only in both methods. The speed-up is bounded by the number of choices.",
    ])


if __name__ == "__main__":
    main()
