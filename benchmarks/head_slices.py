"""Scoring from the output head a slice of the vocabulary at a time, against the model's whole logits.

Usage:  .venv/bin/python benchmarks/head_slices.py [--records 64]

Three workloads, as the pipeline and the audit run them, on real sentences (FPB and TFNS
training sentences):
- the audit's membership statistics with SmolLM2 (`token_statistics`: each token's log p and
  Min-K%++'s mean and spread of log p, every position of each record);
- the audit's PII candidates with SmolLM2 (`prefixed_logprobs`: a sentence's first half as the
  prefix, the second halves of ten sentences as its candidates);
- refine's fluency score with Gemma 3 270M (`continuation_logprobs` of each candidate input
  after the fluency prompt; Gemma's 262k-token vocabulary makes the head most of its work).
"whole logits" is the code path for any model whose head is not known to factor (the model's
logits, then statistics a few positions at a time); "head slices" is the path FACTORED_HEADS
models take (HEAD_CHUNK vocabulary rows per matmul, log-sum-exp accumulated online). Both run
twice, alternating, in one process; medians; the largest difference between the two paths'
log-probabilities is printed beside the times. Writes benchmarks/results/head_slices.md.
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
    parser.add_argument("--records", type=int, default=64)
    args = parser.parse_args()
    if args.records < 11:
        parser.exit(2, "--records: at least 11 (each PII prefix takes ten other sentences' endings as candidates)\n")

    import numpy as np

    from knowledgesg import scoring
    from knowledgesg.builtin_data import load_builtin
    from knowledgesg.models import load_causal_lm, resolve_model
    from pipelines.refine import fluency_scores

    sentences = [r.input for r in load_builtin("fpb_train", "fpb")[: args.records // 2]] + [r.input for r in load_builtin("tfns_train", "tfns")[: args.records - args.records // 2]]
    smol, smol_tok = load_causal_lm(resolve_model("smollm2-135m-instruct"))
    gemma, gemma_tok = load_causal_lm(resolve_model("gemma-3-270m"))
    prompts = [smol_tok.apply_chat_template([{"role": "user", "content": "What is the sentiment of this news?\n" + s}], add_generation_prompt=True, tokenize=False) for s in sentences]
    records = [smol_tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    halves = [smol_tok(s, add_special_tokens=False)["input_ids"] for s in sentences]
    pairs = [(records[k][: len(records[k]) - len(halves[k]) // 2], halves[(k + j) % len(halves)][len(halves[(k + j) % len(halves)]) // 2 :] or halves[k][-1:])
             for k in range(len(halves)) for j in range(10)]

    workloads = {
        "membership statistics, SmolLM2": lambda: [s["logprobs"] for s in scoring.token_statistics(smol, records, scoring.pad_id(smol_tok), 8)],
        "PII candidates, SmolLM2": lambda: scoring.prefixed_logprobs(smol, pairs, scoring.pad_id(smol_tok), 1024),
        "refine fluency, Gemma 3 270M": lambda: [np.array([f]) for f in fluency_scores(gemma, gemma_tok, sentences, 8, "cpu")],
    }
    factored = scoring.FACTORED_HEADS
    tokens = {"membership statistics, SmolLM2": sum(len(r) for r in records), "PII candidates, SmolLM2": sum(len(c) for _, c in pairs),
              "refine fluency, Gemma 3 270M": sum(len(gemma_tok(" " + s, add_special_tokens=False)["input_ids"]) for s in sentences)}
    rows = []
    for label, run in workloads.items():
        times: dict[str, list[float]] = {"whole logits": [], "head slices": []}
        scores = {}
        for _ in range(2):
            for name in times:
                scoring.FACTORED_HEADS = frozenset() if name == "whole logits" else factored
                start = time.perf_counter()
                scores[name] = run()
                times[name].append(time.perf_counter() - start)
        scoring.FACTORED_HEADS = factored
        difference = max(float(np.abs(a - b).max()) for a, b in zip(scores["whole logits"], scores["head slices"]))
        whole, sliced = statistics.median(times["whole logits"]), statistics.median(times["head slices"])
        rows.append(f"| {label} | {tokens[label]} | {whole:.2f} | {sliced:.2f} | **{whole / sliced:.2f}x** | {difference:.1e} |")
        print(rows[-1], flush=True)

    write_result("head_slices", [
        "# Scoring from the output head a slice of the vocabulary at a time, against the whole logits", "",
        f"Command: `{command()}`", f"Machine: {machine()}", "",
        f"{args.records} sentences (half FPB, half TFNS training sentences); HEAD_CHUNK {scoring.HEAD_CHUNK}; each path twice, alternating, in one process; medians.", "",
        "| workload | tokens scored | whole logits (s) | head slices (s) | speed-up | largest log-probability difference |",
        "|---|---:|---:|---:|---:|---:|", *rows, "",
        "Tokens scored: the records' (membership), the candidates' (PII; their prefixes run once per batch besides), the candidate inputs' (fluency, "
        "after a prompt shared by all). The differences are float32 rounding: the two paths add the same terms in another order.",
    ])


if __name__ == "__main__":
    main()
