"""Prompts that begin alike run their common prefix once: scoring and generation with and without.

Usage:  .venv/bin/python benchmarks/prefix_sharing.py [--prompts 64] [--repeats 2]

Workloads as the pipeline runs them:
- FPB labels with SmolLM2 (what `evaluate` scores: chat template and instruction shared, 3 one-token choices);
- the refine judge's few-shot prompts with Gemma 3 270M (Yes/No after public good and bad examples);
- refine's few-shot labelling prompts with Gemma 3 270M (3 labels after balanced public FiQA shots);
- short greedy answers to the FPB prompts with SmolLM2 (generation mode: at most 8 new tokens);
- synthesize's first-pass prompts with SmolLM2 (the demo's two public seeds, alternating; sampled,
  48 new tokens): repeated prompts already prefill once, so this shows what is left to gain there.
"Plain" is the same code with sharing switched off (`SHARED_PREFIX_MIN` set above any prompt's
length), so both variants run the same batches, left-padded, logits for the last positions only.
Each variant runs `--repeats` times, alternating, in one process; medians. Beside the times: the
largest score difference, and whether the generated texts are identical.
Writes benchmarks/results/prefix_sharing.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from eval.benchmarks import choice_ids, context_ids, load_task  # noqa: E402
from knowledgesg import generation  # noqa: E402
from knowledgesg.builtin_data import load_builtin  # noqa: E402
from knowledgesg.generation import Generator, SamplingParams, shared_prefix_length  # noqa: E402
from knowledgesg.models import load_causal_lm, resolve_model  # noqa: E402
from knowledgesg.prompts import Seed, user_turn_prefix  # noqa: E402
from knowledgesg.scoring import choice_logprobs_of_ids, encode_context, encode_continuation  # noqa: E402
from pipelines.refine import DEFAULT_BAD_EXAMPLES, balanced_shots, judge_prompt, label_prompt  # noqa: E402

SHARING = generation.SHARED_PREFIX_MIN
LABELS = ["negative", "neutral", "positive"]


def timed(sharing: bool, work):
    generation.SHARED_PREFIX_MIN = SHARING if sharing else 10**9
    start = time.perf_counter()
    result = work()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    smol, smol_tok = load_causal_lm(resolve_model("smollm2-135m-instruct"))
    gemma, gemma_tok = load_causal_lm(resolve_model("gemma-3-270m"))
    items = load_task("fpb", args.prompts, seed=0)
    fpb_contexts = [context_ids(smol_tok, item.prompt) for item in items]
    fpb_choices = [choice_ids(smol_tok, c) for c in items[0].choices]
    candidates = load_builtin("tfns_train", "tfns")[: args.prompts]
    good = [r.input for r in load_builtin("fpb_train", "fpb")[:6]]
    judge = [encode_context(gemma_tok, judge_prompt("financial sentiment analysis", good, DEFAULT_BAD_EXAMPLES, c.input)) for c in candidates]
    shots = balanced_shots(load_builtin("fiqa_train", "fiqa"), LABELS, 6)
    labelling = [encode_context(gemma_tok, label_prompt(shots, c, 40)) for c in candidates]
    seeds = [Seed(instruction=f"What is the sentiment of this {kind}? Please choose an answer from {{negative/neutral/positive}}.", domain="finance", task="sentiment")
             for kind in ("news", "tweet")]  # the demo's two public seeds, alternating as synthesize deals them
    synth = [smol_tok(user_turn_prefix(smol_tok, seeds[i % 2]), add_special_tokens=False)["input_ids"] for i in range(args.prompts)]

    workloads = [
        ("FPB labels, SmolLM2 (scoring, 3 choices)", fpb_contexts, lambda: choice_logprobs_of_ids(smol, smol_tok, fpb_contexts, fpb_choices, args.batch)),
        ("refine judge, Gemma 3 270M (scoring, Yes/No)", judge,
         lambda: choice_logprobs_of_ids(gemma, gemma_tok, judge, [encode_continuation(gemma_tok, " Yes"), encode_continuation(gemma_tok, " No")], args.batch)),
        ("refine labels, Gemma 3 270M (scoring, 6 shots, 3 labels)", labelling,
         lambda: choice_logprobs_of_ids(gemma, gemma_tok, labelling, [encode_continuation(gemma_tok, " " + label) for label in LABELS], args.batch)),
        ("FPB short answers, SmolLM2 (greedy, at most 8 tokens)", fpb_contexts,
         lambda: Generator(smol, smol_tok, args.batch).generate(fpb_contexts, SamplingParams(do_sample=False, max_new_tokens=8), 0)),
        ("synthesize first pass, SmolLM2 (sampled, 48 tokens)", synth,
         lambda: Generator(smol, smol_tok, args.batch).generate(synth, SamplingParams(max_new_tokens=48, temperature=0.9, top_p=0.95), 0)),
    ]
    rows = []
    for label, prompts, work in workloads:
        times: dict[bool, list[float]] = {True: [], False: []}
        results = {}
        for _ in range(args.repeats):
            for sharing in (False, True):
                seconds, results[sharing] = timed(sharing, work)
                times[sharing].append(seconds)
        if isinstance(results[True][0], generation.Completion):
            same = sum(a.text == b.text for a, b in zip(results[True], results[False]))
            agreement = f"{same}/{len(prompts)} texts identical"
        else:
            agreement = f"largest score difference {abs(results[True] - results[False]).max():.1e}"
        plain, shared = statistics.median(times[False]), statistics.median(times[True])
        prefix = shared_prefix_length(prompts)
        rows.append(f"| {label} | {len(prompts)} | {sum(map(len, prompts)) / len(prompts):.0f} | {prefix} | {plain:.2f} | {shared:.2f} | **{plain / shared:.2f}x** | {agreement} |")
        print(rows[-1], flush=True)
    generation.SHARED_PREFIX_MIN = SHARING

    write_result("prefix_sharing", [
        "# Prompts that begin alike: their common prefix run once, against every prompt run whole", "",
        f"Command: `{command()}`", f"Machine: {machine()}", "",
        f"Batch {args.batch}, float32; {args.repeats} runs per variant, alternating, in one process; medians.", "",
        "| workload | prompts | mean prompt tokens | shared prefix, tokens | plain (s) | prefix once (s) | speed-up | agreement |",
        "|---|---:|---:|---:|---:|---:|---:|---|", *rows, "",
        "The shared prefix is the whole list's (scoring) or each batch's (generation: batches are cut by length, and a batch's own prefix can be longer); "
        "the column shows the whole list's.",
    ])


if __name__ == "__main__":
    main()
