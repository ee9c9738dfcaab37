"""Decode step time against batch size: what batching alone can give the generation engine.

Usage:  .venv/bin/python benchmarks/decode_batch.py [float32|bfloat16]

SmolLM2-135M-Instruct, one 150-token prompt repeated to each batch size (1 to 128), one prefill
with the KV cache (logits for the last position only), then 24 greedy decode steps that all rows
take (no row stops). Prints prefill tokens/s and decode tokens/s per batch size; the figures in
benchmarks/results/decode_batch.md were copied from its output.
"""

from __future__ import annotations

import sys
import time

import torch
from transformers import DynamicCache

from knowledgesg.models import load_causal_lm, resolve_model


def run(model, prompt: list[int], batch: int, steps: int = 24) -> tuple[float, float]:
    """(prefill seconds, seconds per decode step)."""
    ids = torch.tensor([prompt] * batch)
    cache = DynamicCache()
    with torch.no_grad():
        start = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefilled = time.perf_counter()
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        done = time.perf_counter()
    return prefilled - start, (done - prefilled) / steps


def main() -> None:
    dtype = sys.argv[1] if len(sys.argv) > 1 else "float32"
    model, tokenizer = load_causal_lm(resolve_model("smollm2-135m-instruct"), "cpu", dtype)
    model.eval()
    prompt = tokenizer("The quarterly earnings of the company rose sharply because " * 20, add_special_tokens=False)["input_ids"][:150]
    run(model, prompt, 4, 4)  # warm-up
    for batch in (1, 8, 16, 32, 64, 128):
        prefill, step = run(model, prompt, batch)
        print(f"{dtype} batch {batch:4d}: prefill {prefill:.2f} s ({batch * len(prompt) / prefill:.0f} tok/s), decode step {step * 1000:.0f} ms -> {batch / step:.0f} tok/s", flush=True)


if __name__ == "__main__":
    main()
