"""Training throughput as a fraction of this machine's measured matmul peak.

Usage:  .venv/bin/python benchmarks/train_throughput.py [--model smollm2-135m-instruct] [--steps 5]

Peak: the best of several float32 square matmuls (torch, all cores), in GFLOP/s at 2 n^3 flops
each. Training: non-DP and DP-SGD LoRA steps (r=8 on q, v; batch 8 x 128 tokens of real FPB
examples), median step time. Useful work per step is counted as 4 N flops per token (N: the
model's parameters; 2N forward, 2N for the activation gradients backward; the frozen weights
need no weight gradients, and LoRA's own are negligible); attention's n^2 terms are left out,
so the fraction is a slight underestimate. Writes benchmarks/results/train_throughput.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, lora_batch, machine, sequence_losses, write_result  # noqa: E402


def matmul_peak(size: int = 2048, repeats: int = 8) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)  # warm up
    best = min(_timed(lambda: torch.matmul(a, b)) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_times(model_name: str, steps: int, batch: int, length: int, dp: bool) -> tuple[list[float], int]:
    import torch

    from privacy.dp_sgd import DPSGD, DPSGDSettings

    model, inputs, parameters = lora_batch(model_name, batch, length)

    times = []
    if dp:
        engine = DPSGD(model, lambda ps: torch.optim.Adam(ps, lr=1e-3), DPSGDSettings(1.0, 1.0, batch / 1000, batch), torch.Generator().manual_seed(0))
        for _ in range(steps + 1):
            times.append(_timed(lambda: engine.step([(inputs, torch.arange(batch), batch)], sequence_losses)))
    else:
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

        def plain_step():
            loss = sequence_losses(model, inputs, None, batch).sum()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(steps + 1):
            times.append(_timed(plain_step))
    return times[1:], parameters  # the first step warms up


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()

    peak = matmul_peak()
    tokens = args.batch * args.length
    rows = []
    for label, dp in (("LoRA, no DP", False), ("LoRA, DP-SGD (Opacus)", True)):
        times, parameters = step_times(args.model, args.steps, args.batch, args.length, dp)
        median = statistics.median(times)
        achieved = 4 * parameters * tokens / median / 1e9
        rows.append(f"| {label} | {median:.2f} | {tokens / median:.0f} | {achieved:.1f} | {achieved / peak:.1%} |")
    write_result("train_throughput", [
        "# Training throughput against the machine's matmul peak", "",
        f"Command: `{command()}`", f"Machine: {machine()}",
        f"Model: {args.model} ({parameters / 1e6:.0f} M parameters); batch {args.batch} x {args.length} tokens; median of {args.steps} steps after one warm-up.",
        f"Measured float32 matmul peak (2048 x 2048, best of 8): **{peak:.1f} GFLOP/s**.", "",
        "| step | seconds | tokens/s | useful GFLOP/s (4 N per token) | fraction of peak |", "|---|---|---|---|---|", *rows,
    ])


if __name__ == "__main__":
    main()
