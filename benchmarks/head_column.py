"""The output head on a batch's last column: the slice transformers takes for `logits_to_keep=1`
against the index `generation.last_columns` passes, alternately in one process.

Usage:  .venv/bin/python benchmarks/head_column.py [--rows 55] [--width 65] [--repeats 5]

SmolLM2-135M-Instruct's head shape ([576] -> [49152], no gradient, as at inference) on random
hidden states of `rows` x `width` positions, float32 and bfloat16. The slice `hidden[:, -1:]` does
not fold into one matrix across rows, so torch's matmul multiplies each row by its own copy of the
head; the index gathers a contiguous [rows, 1, 576] first. The logits agree to rounding (the largest
difference is reported: the two are different kernels).
Writes benchmarks/results/head_column.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

HIDDEN, VOCABULARY = 576, 49152  # SmolLM2-135M's hidden size and vocabulary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=55)
    parser.add_argument("--width", type=int, default=65)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    from knowledgesg.generation import last_columns

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        head = torch.nn.Linear(HIDDEN, VOCABULARY, bias=False).to(dtype).requires_grad_(False)
        hidden = torch.randn(args.rows, args.width, HIDDEN, dtype=dtype)
        index = last_columns(args.width)
        ways = {"slice": lambda: head(hidden[:, -1:, :]), "index": lambda: head(hidden[:, index, :])}
        difference = float((ways["slice"]().float() - ways["index"]().float()).abs().max())
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.repeats):
            for name, way in ways.items():
                start = time.perf_counter()
                way()
                times[name].append(time.perf_counter() - start)
        slice_s, index_s = (statistics.median(times[name]) for name in ways)
        rows.append(f"| {str(dtype).removeprefix('torch.')} | {slice_s:.4f} | {index_s:.4f} | **{slice_s / index_s:.0f}x** | {difference:.2g} |")
        print(rows[-1], flush=True)
    write_result("head_column", [
        "# The output head on a batch's last column: a slice against an index", "",
        f"Command: `{command()}`  ", f"Machine: {machine()}", "",
        f"[{args.rows}, {args.width}, {HIDDEN}] hidden states, the head [{HIDDEN}] -> [{VOCABULARY}] without gradient; `hidden[:, -1:]` (transformers' "
        f"`logits_to_keep=1`) against `hidden[:, last_columns({args.width})]`; {args.repeats} alternating repeats, medians.", "",
        "| weights | slice, s | index, s | slice / index | largest logit difference |", "|---|---:|---:|---:|---:|", *rows,
    ])


if __name__ == "__main__":
    main()
