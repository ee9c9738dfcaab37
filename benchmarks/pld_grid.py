"""The PLD accountant's grid: epsilon and time at a value discretisation of 1e-4 against the
default (`pld_grid`: 1e-3; 1/steps beyond 1,000 composed steps, down to 1e-4), alternately in one process, on the budgets the pipeline composes (the demo's three banks, the
tests' reference mechanism, a DP adapter with a DP histogram after it, longer and noisier runs).

Usage:  .venv/bin/python benchmarks/pld_grid.py [--repeats 3]

Both grids are pessimistic (every privacy loss rounded up): each figure is an upper bound, the
coarser one looser. Writes benchmarks/results/pld_grid.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from privacy.accounting import Mechanism, epsilon_pld, pld_grid  # noqa: E402

FINE = 1e-4


def sgd(sigma: float, q: float, steps: int) -> Mechanism:
    return Mechanism(kind="poisson_gaussian", noise_multiplier=sigma, sample_rate=q, steps=steps)


# (what it is, the composed mechanisms, delta)
BUDGETS = [
    ("demo bank_a (epsilon 8)", [sgd(0.5748, 0.0625, 16)], 1e-5),
    ("demo bank_b (epsilon 8)", [sgd(0.5350, 0.0349, 29)], 1e-5),
    ("demo bank_c (epsilon 8)", [sgd(0.6380, 0.1212, 9)], 1e-5),
    ("tests' reference (epsilon about 1.9)", [sgd(1.0, 0.0256, 117)], 1e-5),
    ("DP adapter, then a DP label histogram", [sgd(0.5748, 0.0625, 16), Mechanism(kind="gaussian", noise_multiplier=8.0)], 1e-5),
    ("headline bank, 2 epochs (about 1,000 records, epsilon 1)", [sgd(1.3, 0.016, 125)], 1e-5),
    ("1,000 steps at q 0.001", [sgd(0.8, 0.001, 1000)], 1e-6),
    ("3,000 steps at q 0.001", [sgd(0.8, 0.001, 3000)], 1e-6),
    ("10,000 steps at q 0.001", [sgd(0.8, 0.001, 10000)], 1e-6),
    ("two DP-SGD releases", [sgd(0.6, 0.01, 300), sgd(1.0, 0.016, 200)], 1e-5),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows, totals = [], {"fine": 0.0, "default": 0.0}
    worst = 0.0
    for name, mechanisms, delta in BUDGETS:
        grids = {"fine": FINE, "default": pld_grid(mechanisms)}
        seconds: dict[str, list[float]] = {"fine": [], "default": []}
        values: dict[str, float] = {}
        for _ in range(args.repeats):
            for which, grid in grids.items():
                start = time.perf_counter()
                values[which] = epsilon_pld(mechanisms, delta, discretization=grid)
                seconds[which].append(time.perf_counter() - start)
        fine_s, default_s = statistics.median(seconds["fine"]), statistics.median(seconds["default"])
        totals["fine"] += fine_s
        totals["default"] += default_s
        looser = values["default"] - values["fine"]
        worst = max(worst, looser)
        rows.append(f"| {name} | {delta:g} | {values['fine']:.5f} | {grids['default']:g} | {values['default']:.5f} | {looser:+.5f} ({100 * looser / values['fine']:+.3f}%) | "
                    f"{fine_s:.3f} | {default_s:.3f} | {fine_s / default_s:.1f}x |")
    write_result("pld_grid", [
        f"# The PLD accountant's grid: {FINE:g} against the default (1e-3; 1/steps beyond 1,000 steps, down to 1e-4)", "",
        f"Command: `{command()}`", f"Machine: {machine()}", "",
        f"dp-accounting's PLDAccountant, pessimistic discretisation, each budget at both grids alternately, {args.repeats} times; medians.", "",
        f"| budget | delta | epsilon, grid {FINE:g} | default grid | its epsilon | looser by | s, {FINE:g} | s, default | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|", *rows, "",
        f"Total: {totals['fine']:.2f} s against {totals['default']:.2f} s, **{totals['fine'] / totals['default']:.1f}x**; "
        f"the default grid at most {worst:.5f} looser in epsilon.",
    ])


if __name__ == "__main__":
    main()
