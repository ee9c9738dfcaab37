"""Decode step time with the in-place cache (RoomyCache) against transformers' DynamicCache, which
appends each step with torch.cat.

Usage:  .venv/bin/python benchmarks/kv_cache_append.py [--batch 64] [--contexts 150,400] [--steps 24] [--reps 3]

SmolLM2-135M-Instruct in float32; one prompt of each context length repeated to the batch, a
prefill with an attention mask (as the engine passes one), then greedy decode steps that all rows
take. The two caches alternate within each repetition; medians. Writes
benchmarks/results/kv_cache_append.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402


def decode_step_ms(model, cache, prompt: list[int], batch: int, steps: int) -> float:
    import torch

    ids = torch.tensor([prompt] * batch)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        token = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            token = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--contexts", default="150,400")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    from transformers import DynamicCache

    from knowledgesg.kv_cache import RoomyCache
    from knowledgesg.models import load_causal_lm, resolve_model

    model, tokenizer = load_causal_lm(resolve_model("smollm2-135m-instruct"), "cpu", "float32")
    model.eval()
    text = tokenizer("The quarterly earnings of the company rose sharply because " * 60, add_special_tokens=False)["input_ids"]
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        times: dict[str, list[float]] = {"cat": [], "roomy": []}
        for _ in range(args.reps):
            times["cat"].append(decode_step_ms(model, DynamicCache(), text[:context], args.batch, args.steps))
            times["roomy"].append(decode_step_ms(model, RoomyCache(args.steps), text[:context], args.batch, args.steps))
            print(context, {k: round(v[-1]) for k, v in times.items()}, flush=True)
        cat, roomy = statistics.median(times["cat"]), statistics.median(times["roomy"])
        rows.append(f"| {context} | {cat:.0f} | {roomy:.0f} | **{cat / roomy:.2f}x** | {args.batch * 1000 / roomy:.0f} |")
    write_result("kv_cache_append", [
        "# Decode step: the in-place cache against DynamicCache's torch.cat",
        "",
        f"Command: `{command()}`  ",
        f"Machine: {machine()}  ",
        f"SmolLM2-135M-Instruct, float32, batch {args.batch}, {args.steps} greedy decode steps after a masked prefill; the two caches alternate, "
        f"{args.reps} repetitions, medians.",
        "",
        "| context tokens | DynamicCache (torch.cat), ms per step | RoomyCache (in place), ms per step | speed-up | tokens/s, in place |",
        "|---:|---:|---:|---:|---:|",
        *rows,
    ])


if __name__ == "__main__":
    main()
