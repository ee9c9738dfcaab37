"""Does the audit have power? The same data and canaries, trained without privacy and at epsilon 8.

Usage:  .venv/bin/python benchmarks/audit_power.py [--records 240] [--epochs 3] [--canaries 32] [--repeats 8]

One client holds FPB training sentences plus canaries ("Customer <name> confirmed the wire
transfer with security code <6 digits>."), each planted with probability 1/2 and repeated; 40
further sentences are held out as non-members. SmolLM2-135M-Instruct gets a LoRA adapter with
loss on the whole sequence (as the demo trains its synthesizing model), once with no noise
(NOT PRIVATE) and once with DP-SGD calibrated to epsilon 8; everything else is identical. Then
`ksg audit` on each. Writes benchmarks/results/audit_power.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402


def spec_for(epsilon: float, args) -> dict:
    return {
        "name": f"audit-power-{'nonprivate' if epsilon == float('inf') else f'eps{epsilon:g}'}",
        "seed": args.seed,
        "models": {"base": "smollm2-135m-instruct"},
        "clients": {"data": [{"builtin": "fpb_train", "sample": args.records}], "partition": {"method": "iid", "num_clients": 1, "names": ["bank_a"]}},
        "privacy": {"target_epsilon": epsilon},
        "audit": {"canaries": {"client": "bank_a", "count": args.canaries, "repeats": args.repeats, "digits": 6}, "holdout_per_client": 40},
        "stages": ["prepare_models", "ingest", {"name": "dp_train", "params": {
            "loss_on": "all", "epochs": args.epochs, "batch_size": 8, "max_length": 96, "learning_rate": args.lr, "clip_norm": 1.0}}],
    }


def run(argv: list[str]) -> None:
    result = subprocess.run([sys.executable, "-c", "from knowledgesg.cli import entry; entry()", *argv], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"ksg {' '.join(argv)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=240)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--canaries", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.004)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="audit-power-"))
    rows, timings = [], []
    for epsilon in (float("inf"), 8.0):
        spec = spec_for(epsilon, args)
        spec_path = workdir / f"{spec['name']}.yaml"
        spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
        run_dir = workdir / spec["name"]
        start = time.perf_counter()
        run(["run", str(spec_path), "--run-dir", str(run_dir)])
        trained = time.perf_counter() - start
        run(["audit", str(run_dir), "--candidates", "200", "--samples", "8"])
        timings.append(f"{spec['name']}: training {trained:.0f} s, audit {time.perf_counter() - start - trained:.0f} s")
        report = json.loads((run_dir / "audit/audit_report.json").read_text())
        canaries = report["canaries"]
        target = canaries["targets"]["dp_adapter:bank_a"]
        mia = report["membership_inference"]["dp_adapter:bank_a|bank_a"]["scores"]
        run_audit, extraction = target["one_run"], target["extraction"]
        claimed = report["claimed_epsilon"]["bank_a"]
        label = "NOT PRIVATE (no noise)" if epsilon == float("inf") else "epsilon 8 (DP-SGD)"
        rows.append(f"| {label} | {'inf' if claimed == float('inf') else f'{claimed:.2f}'} | {target['mean_exposure_planted']} | {target['mean_exposure_not_planted']} | "
                    f"{extraction['greedy_planted']}/{canaries['planted']} | {extraction['sampled_planted_canaries_hit']}/{canaries['planted']} | "
                    f"{mia['loss']['auc']:.3f} | {mia['reference']['auc']:.3f} | {mia['min_k_plus_plus']['auc']:.3f} | "
                    f"{run_audit['correct']}/{run_audit['guesses']} | {run_audit['epsilon_lower_bound']:.3f} | {run_audit['largest_certifiable']:.3f} |")
    write_result("audit_power", [
        "# Audit power: the same data and canaries, non-private and at epsilon 8", "",
        f"Command: `{command()}`", f"Machine: {machine()}",
        f"Data: {args.records} FPB training sentences (one client) + {args.canaries} canaries planted with probability 1/2, x{args.repeats}; "
        f"40 held-out sentences as non-members; SmolLM2-135M-Instruct, LoRA r=8 on q,v, loss on all tokens, {args.epochs:g} epochs, batch 8, lr {args.lr}; seed {args.seed}.",
        "Exposure: log2 |R| = 19.93 (6-digit secrets), skew-normal fit on 200 random candidates per canary; a random unseen canary scores about 1.4 on average.", "",
        "| training | claimed epsilon | mean exposure, planted | not planted | greedy extractions | sampled (8 tries) | MIA AUC loss | reference | Min-K%++ | correct guesses | epsilon lower bound (95%) | largest certifiable |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|", *rows, "", *[f"- {t}" for t in timings],
    ])


if __name__ == "__main__":
    main()
