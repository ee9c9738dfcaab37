"""DP-SGD step against a non-DP LoRA step on the same batch: time and peak memory.

Usage:  .venv/bin/python benchmarks/dp_overhead.py [--model smollm2-135m-instruct] [--steps 6]

Each mode runs in its own fresh process (peak RSS is per process), alternating A B A B so that
machine noise hits both; the table reports medians and the DP/non-DP ratios. Both modes use the
same model, LoRA (r=8 on q_proj, v_proj), Adam, per-sequence response-only loss, and the same
batch of real FPB training examples padded to the same length. Writes
benchmarks/results/dp_overhead.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ALL_LINEAR, lora_batch, machine, sequence_losses  # noqa: E402


def one_process(mode: str, model_name: str, steps: int, batch: int, length: int, r: int, targets: list[str]) -> dict:
    import torch

    from privacy.dp_sgd import DPSGD, DPSGDSettings
    from privacy.noise import SecureRandom

    model, inputs, _ = lora_batch(model_name, batch, length, r, targets)
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []

    if mode == "dp":
        dp = DPSGD(model, lambda ps: torch.optim.Adam(ps, lr=1e-3), DPSGDSettings(1.0, 1.0, batch / 1000, batch), SecureRandom.from_os_entropy())
        for _ in range(steps):
            start = time.perf_counter()
            dp.step([(inputs, torch.arange(batch), batch)], sequence_losses)
            times.append(time.perf_counter() - start)
    else:
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for _ in range(steps):
            start = time.perf_counter()
            sequence_losses(model, inputs, None, batch).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # the first step pays one-off allocation costs in both modes; report the rest
    return {"mode": mode, "step_s": statistics.median(times[1:]), "peak_rss_mib": peak / 1024, "training_rss_mib": (peak - baseline_rss) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--targets", choices=["qv", "all"], default="qv", help="LoRA on q, v or on every linear layer")
    parser.add_argument("--child", choices=["dp", "plain"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_process(args.child, args.model, args.steps, args.batch, args.length, args.r, ALL_LINEAR if args.targets == "all" else ["q_proj", "v_proj"])))
        return
    command = " ".join([".venv/bin/python", "benchmarks/dp_overhead.py", *sys.argv[1:]])
    results: dict[str, list[dict]] = {"dp": [], "plain": []}
    for _ in range(args.repeats):
        for mode in ("plain", "dp"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--model", args.model, "--steps", str(args.steps), "--batch", str(args.batch), "--length", str(args.length), "--r", str(args.r), "--targets", args.targets],
                                 capture_output=True, text=True, check=True, cwd=ROOT)
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(mode, results[mode][-1], flush=True)
    med = {mode: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "peak_rss_mib", "training_rss_mib")} for mode, rs in results.items()}
    time_ratio = med["dp"]["step_s"] / med["plain"]["step_s"]
    mem_ratio = med["dp"]["peak_rss_mib"] / med["plain"]["peak_rss_mib"]
    lines = [
        "# DP-SGD overhead: one DP step against one non-DP LoRA step, same batch",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Model: {args.model}, LoRA r={args.r} on {'every linear layer' if args.targets == 'all' else 'q_proj and v_proj'}, Adam; batch {args.batch} x {args.length} tokens (real FPB training examples); "
        f"{args.steps} steps per process (first dropped), {args.repeats} processes per mode alternating; medians.",
        "",
        "| mode | step time (s) | peak RSS (MiB) | RSS added by training (MiB) |",
        "|---|---:|---:|---:|",
        f"| non-DP LoRA | {med['plain']['step_s']:.3f} | {med['plain']['peak_rss_mib']:.0f} | {med['plain']['training_rss_mib']:.0f} |",
        f"| DP-SGD (Opacus, per-sample clip + noise) | {med['dp']['step_s']:.3f} | {med['dp']['peak_rss_mib']:.0f} | {med['dp']['training_rss_mib']:.0f} |",
        f"| **ratio DP / non-DP** | **{time_ratio:.2f}x** | **{mem_ratio:.2f}x** | |",
        "",
        f"Goal (issue 13): at most 1.05x time and 1.3x memory. Time: {'met' if time_ratio <= 1.05 else 'NOT met'}; memory: {'met' if mem_ratio <= 1.3 else 'NOT met'}.",
        "Peak RSS is the whole process (model weights included), read with getrusage in a fresh process per mode.",
    ]
    out_path = ROOT / "benchmarks" / "results" / ("dp_overhead.md" if args.targets == "qv" and args.r == 8 else f"dp_overhead_{args.targets}_r{args.r}{'' if args.batch == 8 else f'_b{args.batch}'}.md")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
