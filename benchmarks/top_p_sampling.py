"""Top-p sampling: the nucleus found among each row's most likely tokens, against sorting the whole vocabulary.

Usage:  .venv/bin/python benchmarks/top_p_sampling.py [--prompts 64] [--batches 16,64]

The synthesize workload as the demo spec samples it (temperature 0.9, top-p 0.95, at most 48 new
tokens) on SmolLM2-135M-Instruct: public FiQA instructions as chat prompts, decoded by the engine
(`Generator`) in batches of 16 (synthesize's default) and 64 rows. "whole sort" is the engine's
nucleus before this change (every decoding step sorts all 49k logits of every row, float32 sums),
reproduced here; "top tokens" is `generation.nucleus` (a top-k of NUCLEUS_FIRST_K, a whole sort
only for a row whose nucleus may reach past them, float64 sums). Both run twice, alternating, in
one process; medians. Then once more with a whole sort summed in float64: with the same seed its
completions must equal those of `generation.nucleus`; the script prints how many differ from each.
Writes benchmarks/results/top_p_sampling.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, positive_ints, write_result  # noqa: E402


def whole_sort_nucleus(logits, top_p: float, first_k: int = 0, dtype=None):
    """The nucleus as the engine found it before: every row's whole vocabulary sorted, its
    probabilities summed in float32 (`dtype` float64: the same definition summed in float64)."""
    import torch

    ordered, order = torch.sort(logits, descending=True)
    probs = ordered.softmax(dim=-1, dtype=dtype)
    keep = probs.cumsum(dim=-1) - probs <= top_p
    return torch.zeros_like(keep).scatter(1, order, keep)


def whole_sort_nucleus_float64(logits, top_p: float, first_k: int = 0):
    import torch

    return whole_sort_nucleus(logits, top_p, first_k, torch.float64)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batches", type=positive_ints, default="16,64", help="comma-separated engine batch sizes")
    args = parser.parse_args()
    if args.prompts < 1:
        parser.exit(2, "--prompts: at least 1\n")
    batches = args.batches

    from knowledgesg import generation
    from knowledgesg.builtin_data import load_builtin
    from knowledgesg.generation import Generator, SamplingParams, chat_prompt_ids
    from knowledgesg.models import load_causal_lm, resolve_model

    model, tokenizer = load_causal_lm(resolve_model("smollm2-135m-instruct"))
    pool = load_builtin("fiqa_train", "fiqa")[: args.prompts]
    prompts = [chat_prompt_ids(tokenizer, (r.instruction + "\n" + r.input).strip()) for r in pool]
    params = SamplingParams(do_sample=True, temperature=0.9, top_p=0.95, max_new_tokens=48)
    fast = generation.nucleus
    rows = []
    for batch in batches:
        times: dict[str, list[float]] = {"whole sort": [], "top tokens": []}
        texts, tokens = {}, {}
        for _ in range(2):
            for name in times:
                generation.nucleus = whole_sort_nucleus if name == "whole sort" else fast
                start = time.perf_counter()
                completions = Generator(model, tokenizer, batch).generate(prompts, params, seed=0)
                times[name].append(time.perf_counter() - start)
                texts[name], tokens[name] = [c.text for c in completions], sum(c.new_tokens for c in completions)
        generation.nucleus = whole_sort_nucleus_float64
        reference = [c.text for c in Generator(model, tokenizer, batch).generate(prompts, params, seed=0)]
        generation.nucleus = fast
        differ = sum(a != b for a, b in zip(texts["whole sort"], texts["top tokens"]))
        differ_exact = sum(a != b for a, b in zip(reference, texts["top tokens"]))
        before, after = statistics.median(times["whole sort"]), statistics.median(times["top tokens"])
        rows.append(f"| {batch} | {tokens['top tokens']} | {before:.1f} | {after:.1f} | {tokens['whole sort'] / before:.1f} | {tokens['top tokens'] / after:.1f} | "
                    f"**{before / after:.2f}x** | {differ} of {len(prompts)} | {differ_exact} of {len(prompts)} |")
        print(rows[-1], flush=True)

    write_result("top_p_sampling", [
        "# Top-p sampling: the nucleus among each row's most likely tokens, against sorting the whole vocabulary", "",
        f"Command: `{command()}`", f"Machine: {machine()}", "",
        f"SmolLM2-135M-Instruct; {len(prompts)} public FiQA instructions as chat prompts; temperature 0.9, top-p 0.95, at most 48 new tokens (the demo's "
        f"synthesize sampling); NUCLEUS_FIRST_K {generation.NUCLEUS_FIRST_K}; each way twice, alternating, in one process; medians.", "",
        "| engine batch | new tokens | whole sort (s) | top tokens (s) | whole sort, tok/s | top tokens, tok/s | speed-up | completions unlike the whole sort's (same seed) | unlike a whole sort summed in float64 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *rows, "",
        "The draw within the nucleus is unchanged, so the same seed gives the same completions wherever the nucleus is the same set of tokens. The "
        "code before summed the sorted probabilities in float32, which drifts by about 1e-5 over hundreds of tokens and moves a row's boundary "
        "token now and then (a row that ends at another step changes every later draw of its batch); the nucleus is now summed in float64, and "
        "the last column compares it with the whole sort summed in float64, the definition computed the slow way.",
    ])


if __name__ == "__main__":
    main()
