"""What the noised unit count adds to a client's total: its epsilon alone, and a DP-SGD release
calibrated to a target epsilon composed with and without it (PLD, `privacy.ledger.compose`, as the
client's total is composed), at the sampling rates and steps the demo's bank_a and the headline
banks plan with.

Usage:  .venv/bin/python benchmarks/count_cost.py [--sigma 10]

Writes benchmarks/results/count_cost.md.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from privacy.accounting import Mechanism, calibrate_noise  # noqa: E402
from privacy.count import count_mechanism  # noqa: E402
from privacy.ledger import compose  # noqa: E402

# (what it is, target epsilon, sampling rate, steps, delta)
RELEASES = [
    ("demo bank_a", 8.0, 0.0625, 16, 1e-5),
    ("demo bank_a", 1.0, 0.0625, 16, 1e-5),
    *((f"headline bank of {n} records (batch 16, 2 epochs)", 8.0, 16 / n, math.ceil(2.0 / (16 / n)), 1e-6) for n in (1082, 1505, 1013)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sigma", type=float, default=10.0, help="the count's noise (privacy.count_noise)")
    args = parser.parse_args()
    count = count_mechanism(args.sigma)
    lines = ["# The noised unit count's cost", "", f"Command: `{command()}`", f"Machine: {machine()}", "",
             f"The count alone (Gaussian, sigma {args.sigma:g}, sensitivity 1): epsilon {compose([count], 1e-5).pld:.3f} at delta 1e-5, "
             f"{compose([count], 1e-6).pld:.3f} at delta 1e-6 (PLD).", "",
             "| release | q | steps | sigma (calibrated, PRV) | delta | PLD alone | PLD with the count | added |", "|---|---|---|---|---|---|---|---|"]
    for what, target, q, steps, delta in RELEASES:
        sigma, _ = calibrate_noise(target, delta, q, steps)
        release = Mechanism(kind="poisson_gaussian", noise_multiplier=sigma, sample_rate=q, steps=steps)
        alone, both = compose([release], delta).pld, compose([release, count], delta).pld
        lines.append(f"| {what} at epsilon {target:g} | {q:.4f} | {steps} | {sigma:.4f} | {delta:g} | {alone:.3f} | {both:.3f} | {both - alone:+.3f} |")
    write_result("count_cost", lines)


if __name__ == "__main__":
    main()
