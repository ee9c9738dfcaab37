"""Where a decode step of the generation engine goes, and how far the engine could get ahead of
`model.generate`, which runs the same forward pass.

Usage:  .venv/bin/python benchmarks/decode_profile.py [--prompts 64] [--batch 64] [--new-tokens 64] [--precision bfloat16]

The long workload of `generation_speed.py` (public MedQuAD questions, greedy, one batch of
`--batch` rows): the engine run once to warm up, then
1. timed alone, and `model.generate` on the same padded batch, alternating, twice each;
2. under torch's profiler: self time of the matmuls (aten::mm, addmm, bmm), of attention
   (scaled_dot_product_attention's kernels) and of every other op;
3. with each attention call timed and the keys and values it reads counted: its bandwidth, beside
   the machine's copy bandwidth measured in the same process (a 256 MiB tensor copied);
4. one decode attention call at the model's shapes (a query token per row, grouped-query heads
   packed as transformers packs them, keys and values as views of a cache with room) three ways:
   SDPA as the engine calls it, the same as two matmuls and a softmax, and the two matmuls with the
   keys stored transposed ([batch, heads, dim, length]), each called 50 times on the same tensors.
The engine's ceiling over `generate`: generate's time over the engine's matmul and attention time
alone, as if everything else in the engine's steps cost nothing. Writes
benchmarks/results/decode_profile.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, generate_on_batches, machine, write_result  # noqa: E402

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm"}
ATTENTION_PREFIX = "aten::_scaled_dot_product"


def copy_bandwidth(torch, mib: int = 256, repeats: int = 5) -> float:
    """GB/s of a plain tensor copy (read + write counted), the best of `repeats`."""
    source = torch.empty(mib * 2**20, dtype=torch.uint8).random_(0, 255)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() / best / 1e9


def attention_variants(torch, dtype, batch: int, kv_heads: int, groups: int, dim: int, length: int, room: int = 64, repeats: int = 50) -> dict[str, float]:
    """Milliseconds per decode attention call, each variant on the same random query, keys, values and padding mask."""
    import torch.nn.functional as F

    query = torch.randn(batch, kv_heads, groups, dim, dtype=dtype)
    keys = torch.randn(batch, kv_heads, length + room, dim, dtype=dtype)[:, :, :length]
    values = torch.randn(batch, kv_heads, length + room, dim, dtype=dtype)[:, :, :length]
    keys_t = keys.transpose(-1, -2).contiguous()
    mask = torch.zeros(batch, 1, 1, length, dtype=dtype)
    mask[:, :, :, : length // 8] = torch.finfo(dtype).min  # left padding
    scale = dim**-0.5
    variants = {
        "SDPA (as the engine calls it)": lambda: F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale),
        "two matmuls and a softmax": lambda: torch.matmul((torch.matmul(query, keys.transpose(-1, -2)) * scale + mask).softmax(-1), values),
        "the same, keys stored transposed": lambda: torch.matmul((torch.matmul(query, keys_t) * scale + mask).softmax(-1), values),
    }
    reference = variants["two matmuls and a softmax"]().float()
    times = {}
    for name, run in variants.items():
        if not torch.allclose(run().float(), reference, atol=0.05):
            raise SystemExit(f"decode attention variant '{name}' disagrees with the reference")
        for _ in range(3):
            run()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        times[name] = (time.perf_counter() - start) / repeats * 1e3
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--precision", default="bfloat16", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from knowledgesg.builtin_data import load_builtin
    from knowledgesg.generation import Generator, SamplingParams, chat_prompt_ids
    from knowledgesg.models import load_causal_lm, resolve_model

    model, tokenizer = load_causal_lm(resolve_model(args.model), dtype=args.precision)
    prompts = [chat_prompt_ids(tokenizer, r.instruction) for r in load_builtin("medquad", "m")[: args.prompts]]
    params = SamplingParams(do_sample=False, max_new_tokens=args.new_tokens)
    engine = Generator(model, tokenizer, batch_size=args.batch)

    def run_engine() -> tuple[int, float]:
        start = time.perf_counter()
        completions = engine.generate(prompts, params, seed=0)
        return sum(c.new_tokens for c in completions), time.perf_counter() - start

    def run_generate() -> tuple[int, float]:
        """`model.generate` on the engine's rows, padded as the engine pads them, in `--batch` rows."""
        batches = [list(range(first, min(first + args.batch, len(prompts)))) for first in range(0, len(prompts), args.batch)]
        return generate_on_batches(model, tokenizer, prompts, batches, args.new_tokens, engine.stop_ids)

    run_engine()  # warm-up: allocator, kernels, tokenizer caches
    timings: dict[str, list[float]] = {"engine": [], "generate": []}
    tokens: dict[str, int] = {}
    for _ in range(2):
        for name, run in (("engine", run_engine), ("generate", run_generate)):
            tokens[name], seconds = run()
            timings[name].append(seconds)
    engine_s, generate_s = statistics.median(timings["engine"]), statistics.median(timings["generate"])

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_engine()
    by_op = {e.key: (e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()}
    profiled = sum(s for s, _ in by_op.values())
    matmul = sum(s for k, (s, _) in by_op.items() if k in MATMUL_OPS)
    attention = sum(s for k, (s, _) in by_op.items() if k.startswith(ATTENTION_PREFIX))
    others = sorted(((k, s, n) for k, (s, n) in by_op.items() if k not in MATMUL_OPS and not k.startswith(ATTENTION_PREFIX)), key=lambda x: -x[1])

    # every attention call timed, and the keys and values it reads counted
    original = F.scaled_dot_product_attention
    calls = {"seconds": 0.0, "bytes": 0, "count": 0}

    def timed(query, key, value, *rest, **kwargs):
        start = time.perf_counter()
        out = original(query, key, value, *rest, **kwargs)
        calls["seconds"] += time.perf_counter() - start
        calls["bytes"] += (key.numel() + value.numel()) * key.element_size()
        calls["count"] += 1
        return out

    F.scaled_dot_product_attention = timed
    try:
        run_engine()
    finally:
        F.scaled_dot_product_attention = original
    attention_bandwidth = calls["bytes"] / calls["seconds"] / 1e9
    copy = copy_bandwidth(torch)
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    lengths = (64, 160, 320)
    dtype = getattr(torch, args.precision)
    variants = {length: attention_variants(torch, dtype, args.batch, kv_heads, heads // kv_heads, dim, length) for length in lengths}
    ceiling = generate_s / (engine_s * (matmul + attention) / profiled)

    lines = [
        "# Where the engine's decode time goes, and its ceiling over `generate`", "",
        f"Command: `{command()}`  ", f"Machine: {machine()}  ",
        f"Model: {args.model}, weights in {args.precision}; {len(prompts)} MedQuAD questions, greedy, at most {args.new_tokens} new tokens, "
        f"engine batch {args.batch}; `model.generate` on the same left-padded batches; each timed twice, alternating (medians); then one engine run "
        "under torch's profiler and one with every attention call timed.", "",
        "| run | new tokens | seconds | tok/s |", "|---|---:|---:|---:|",
        f"| engine | {tokens['engine']} | {engine_s:.2f} | {tokens['engine'] / engine_s:.1f} |",
        f"| `generate`, same batches | {tokens['generate']} | {generate_s:.2f} | {tokens['generate'] / generate_s:.1f} |",
        f"| **engine / `generate`** | | | **{(tokens['engine'] / engine_s) / (tokens['generate'] / generate_s):.2f}x** |", "",
        f"Profiled engine run, self CPU time by op ({profiled:.2f} s in all):", "",
        "| part | seconds | share |", "|---|---:|---:|",
        f"| matmuls (aten::mm, addmm, bmm) | {matmul:.2f} | {matmul / profiled:.0%} |",
        f"| attention (SDPA's CPU kernel) | {attention:.2f} | {attention / profiled:.0%} |",
        f"| everything else | {profiled - matmul - attention:.2f} | {(profiled - matmul - attention) / profiled:.0%} |", "",
        "Largest of the rest: " + "; ".join(f"{k} {s:.3f} s ({n} calls)" for k, s, n in others[:8]) + ".", "",
        f"Attention: {calls['count']} calls read {calls['bytes'] / 1e9:.2f} GB of keys and values in {calls['seconds']:.2f} s: "
        f"**{attention_bandwidth:.1f} GB/s**, against **{copy:.1f} GB/s** for a plain 256 MiB copy here (read + write): "
        f"it runs at {attention_bandwidth / copy:.0%} of the speed at which this machine copies memory.", "",
        f"One decode attention call at the model's shapes, isolated ({args.batch} rows, {kv_heads} key-value heads x {heads // kv_heads} query heads each, "
        f"head dim {dim}, {args.precision}, milliseconds, mean of 50 calls on the same tensors, which stay in the CPU's caches: "
        "an upper bound on what a variant saves inside the model):", "",
        "| context length | " + " | ".join(variants[lengths[0]]) + " |", "|---|" + "---:|" * len(variants[lengths[0]]),
        *(f"| {length} | " + " | ".join(f"{t:.3f}" for t in times.values()) + " |" for length, times in variants.items()), "",
        f"Ceiling: if everything in the engine's steps but its matmuls and attention cost nothing, it would run "
        f"{engine_s * (matmul + attention) / profiled:.2f} s, **{ceiling:.2f}x** `generate` on the same batches "
        "(which runs the same forward pass: its matmuls and attention are the engine's).",
    ]
    write_result("decode_profile", lines)


if __name__ == "__main__":
    main()
