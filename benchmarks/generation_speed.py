"""Batched generation engine against one-sequence-at-a-time `generate`: tokens per second.

Usage:  .venv/bin/python benchmarks/generation_speed.py [--prompts 32] [--new-tokens 64] [--batch 16] [--single-prompts N] [--precision float32]

Same model, same prompts, greedy decoding with the same token budget and stop tokens, both in one
process, each run twice (alternating) and the medians compared. Two workloads:
- long: public MedQuAD questions, answered up to the token budget (what synthesis and structure
  generate: sentences and answers);
- short: FinGPT sentiment prompts over FPB test sentences, answered in a word or two.
Every variant runs with the model's weights in `--precision`. Writes benchmarks/results/generation_speed.md
(float32) or generation_speed_bfloat16.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, generate_on_batches, machine, write_result  # noqa: E402
from train_throughput import matmul_shapes, model_shape_roof  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--single-prompts", type=int, default=None,
                        help="time one-at-a-time `generate` on the first N prompts only (its tokens/s; at about 9 tok/s all of them take long)")
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"], help="the model's weights, for every variant alike")
    args = parser.parse_args()

    import torch
    from transformers import DynamicCache

    from knowledgesg import kv_cache
    from knowledgesg.builtin_data import load_builtin
    from knowledgesg.generation import Generator, SamplingParams, chat_prompt_ids, length_batches
    from knowledgesg.models import load_causal_lm, resolve_model
    from knowledgesg.prompts import user_message

    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(resolve_model(args.model), dtype=args.precision)
    workloads = {
        "long (MedQuAD questions)": [chat_prompt_ids(tokenizer, r.instruction) for r in load_builtin("medquad", "m")[: args.prompts]],
        "short (FPB sentiment)": [chat_prompt_ids(tokenizer, user_message(r)) for r in load_builtin("fpb_test", "fpb")[: args.prompts]],
    }
    params = SamplingParams(do_sample=False, max_new_tokens=args.new_tokens)
    engine = Generator(model, tokenizer, batch_size=args.batch)
    single = Generator(model, tokenizer, batch_size=1)  # stop tokens identical to the engine's

    def one_at_a_time(prompts) -> tuple[int, float]:
        start, tokens = time.perf_counter(), 0
        for ids in prompts[: args.single_prompts]:
            with torch.no_grad():
                out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=single.stop_ids, pad_token_id=tokenizer.pad_token_id)
            tokens += out.shape[1] - len(ids)
        return tokens, time.perf_counter() - start

    def generate_same_batches(prompts) -> tuple[int, float]:
        """The fair peer: `model.generate` on the engine's own length-grouped, left-padded batches."""
        return generate_on_batches(model, tokenizer, prompts, length_batches([len(p) for p in prompts], args.batch), args.new_tokens, single.stop_ids)

    def batched(prompts) -> tuple[int, float]:
        start = time.perf_counter()
        completions = engine.generate(prompts, params, seed=0)
        return sum(c.new_tokens for c in completions), time.perf_counter() - start

    def batched_cat_cache(prompts) -> tuple[int, float]:
        """The engine as it was before its in-place cache: transformers' DynamicCache, which
        appends every step with torch.cat (a copy of the whole cache)."""
        roomy = kv_cache.RoomyCache
        kv_cache.RoomyCache = lambda room=0: DynamicCache()
        try:
            return batched(prompts)
        finally:
            kv_cache.RoomyCache = roomy

    table = []
    for workload, prompts in workloads.items():
        rates: dict[str, list[float]] = {"one": [], "generate": [], "cat": [], "batched": []}
        tokens_seen: dict[str, int] = {}
        for _ in range(2):
            for name, fn in (("one", one_at_a_time), ("generate", generate_same_batches), ("cat", batched_cat_cache), ("batched", batched)):
                tokens, seconds = fn(prompts)
                rates[name].append(tokens / seconds)
                tokens_seen[name] = tokens
                print(workload, name, tokens, f"{seconds:.2f}s", f"{tokens / seconds:.1f} tok/s", flush=True)
        one, peer, cat, many = (statistics.median(rates[name]) for name in ("one", "generate", "cat", "batched"))
        table.append(f"| {workload} | {tokens_seen['one']} / {tokens_seen['generate']} / {tokens_seen['batched']} | {one:.1f} | {peer:.1f} | {cat:.1f} | {many:.1f} | "
                     f"**{many / one:.1f}x** | **{many / peer:.2f}x** | {many / cat:.2f}x |")
    # the ceiling the matmuls alone set on decoding: one step computes `batch` rows through every
    # projection and the head; attention, norms and sampling come on top
    flops_per_token = sum(2 * fan_in * fan_out * count for _, fan_in, fan_out, count in matmul_shapes(model.config))
    roof, shapes = model_shape_roof(model.config, rows=args.batch, dtype=args.precision)
    ceiling = roof * 1e9 / flops_per_token
    write_result("generation_speed" if args.precision == "float32" else f"generation_speed_{args.precision}", [
        "# Generation: batched engine against one-sequence-at-a-time `generate`",
        "",
        f"Command: `{command()}`  ",
        f"Machine: {machine()}  ",
        f"Model: {args.model}, weights in {args.precision}; {args.prompts} prompts per workload"
        f"{f' (one at a time: the first {args.single_prompts})' if args.single_prompts else ''}, greedy, at most {args.new_tokens} new tokens, stop at end of turn; "
        f"engine batch {args.batch} (length-grouped, left-padded, KV cache, finished rows leave, logits for the last column only) against "
        "`model.generate` on one sequence and `model.generate` on the engine's own padded batches; each run twice, alternating; medians.",
        "",
        "| workload | new tokens (one / generate batched / engine) | `generate`, one at a time, tok/s | `generate`, same batches, tok/s | engine with a torch.cat cache, tok/s | engine, tok/s | vs one at a time | vs `generate` on the same batches | vs the torch.cat cache |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *table,
        "",
        f"Matmuls at the decode shapes ({args.batch} rows, {args.precision}, flop-weighted over one forward pass): **{roof:.1f} GFLOP/s** "
        f"({'; '.join(f'{name} {rate:.0f}' for name, rate in shapes)}). "
        f"At {flops_per_token / 1e6:.0f} MFLOP per token that caps decoding at **{ceiling:.0f} tok/s** at batch {args.batch} before attention, "
        "norms and sampling.",
        "",
        "Goals (issue 13): long answers at least 400 tok/s and 1.5x `generate` on the same batches; one-word answers at least 5x one at a time. "
        "Tokens/s depend on the machine (compare its matmul peak in train_throughput.md); the ratios come from one run.",
    ])

if __name__ == "__main__":
    main()
