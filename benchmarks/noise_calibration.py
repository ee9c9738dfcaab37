"""Noise calibration: `privacy.accounting.calibrate_noise`'s search against Opacus's
`get_noise_multiplier` bisection, both over the PRV accountant at the same tolerance (0.5% of the
target), on ten budgets, alternately in one process.

Usage:  .venv/bin/python benchmarks/noise_calibration.py

Reports, per budget, each search's accountant calls, seconds, noise multiplier and its epsilon.
Writes benchmarks/results/noise_calibration.md.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from privacy.accounting import smallest_noise_multiplier  # noqa: E402

# (target epsilon, sample rate, steps, delta): the tests' budgets, the demo's three banks, and wider ones
BUDGETS = [(8.0, 0.04, 25, 4e-4), (1.0, 0.01, 300, 1e-5), (3.0, 0.1, 50, 1e-4), (0.5, 0.005, 1000, 1e-6), (8.0, 0.0625, 16, 1e-5),
           (8.0, 0.0349, 29, 1e-5), (8.0, 0.1212, 9, 1e-5), (1.0, 0.003, 900, 1e-6), (0.1, 0.5, 10, 1e-5), (30.0, 0.05, 200, 1e-5)]


def main() -> None:
    from opacus.accountants import create_accountant
    from opacus.accountants import utils as opacus_utils

    warnings.simplefilter("ignore")
    rows, totals = [], {"ours": 0.0, "opacus": 0.0}
    for target, q, steps, delta in BUDGETS:
        calls: list[float] = []
        accountant = create_accountant("prv")
        real_create = opacus_utils.create_accountant

        def epsilon_at(sigma: float) -> float:
            calls.append(sigma)
            accountant.history = [(sigma, q, steps)]
            return accountant.get_epsilon(delta=delta, eps_error=0.01)

        start = time.perf_counter()
        ours = smallest_noise_multiplier(epsilon_at, target, 0.005 * target)
        ours_s, ours_calls = time.perf_counter() - start, len(calls)
        ours_eps = epsilon_at(ours)
        calls.clear()
        # Opacus's search, its accountant counting calls the same way
        opacus_utils.create_accountant = lambda mechanism: CountingPRV(calls)
        try:
            start = time.perf_counter()
            theirs = opacus_utils.get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps, accountant="prv",
                                                       epsilon_tolerance=0.005 * target, eps_error=0.01)
            theirs_s, theirs_calls = time.perf_counter() - start, len(calls)
        finally:
            opacus_utils.create_accountant = real_create
        theirs_eps = epsilon_at(theirs)
        totals["ours"] += ours_s
        totals["opacus"] += theirs_s
        rows.append(f"| {target:g} | {q:g} | {steps} | {delta:g} | {ours_calls} | {theirs_calls} | {ours_s:.2f} | {theirs_s:.2f} | "
                    f"{ours:.4f} ({ours_eps:.4f}) | {theirs:.4f} ({theirs_eps:.4f}) |")
    write_result("noise_calibration", [
        "# Noise calibration: bracketed regula falsi in 1/sigma against Opacus's bisection", "",
        f"Command: `{command()}`", f"Machine: {machine()}",
        "Both over Opacus's PRV accountant (eps_error 0.01), tolerance 0.5% of the target, each budget ours then Opacus's.", "",
        "| target epsilon | q | steps | delta | calls, ours | calls, Opacus | s, ours | s, Opacus | sigma (its epsilon), ours | Opacus |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|", *rows, "",
        f"Total: ours {totals['ours']:.1f} s, Opacus {totals['opacus']:.1f} s: **{totals['opacus'] / totals['ours']:.2f}x**.",
    ])


class CountingPRV:
    """Opacus's PRV accountant, counting its epsilon calls."""

    def __init__(self, calls: list[float]) -> None:
        from opacus.accountants import PRVAccountant

        self.inner, self.calls = PRVAccountant(), calls

    @property
    def history(self):
        return self.inner.history

    @history.setter
    def history(self, value) -> None:
        self.inner.history = value

    def get_epsilon(self, delta: float, **kwargs) -> float:
        self.calls.append(self.inner.history[0][0])
        return self.inner.get_epsilon(delta, **kwargs)


if __name__ == "__main__":
    main()
