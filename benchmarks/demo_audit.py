"""`ksg audit` of the demo run: its time, per section, in float32 and in bfloat16, and what the
precision changes in the audit's figures.

Usage:  .venv/bin/python benchmarks/demo_audit.py [--run runs/demo-finance] [--workdir DIR]

Needs a finished demo run (`ksg run pipelines/specs/demo.yaml`). Runs `ksg audit RUN --precision P`
for each precision, one after the other on the same run (the audit's own defaults otherwise), and
keeps each report in DIR (a finished one is reused: the command resumes). Compares, per audited
release, the canary loss drops, the one-run bounds, the membership AUCs and the PII attack hits.
Writes benchmarks/results/demo_audit.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402
from _comparison import ksg  # noqa: E402

PRECISIONS = ("float32", "bfloat16")
SECTIONS = ("canaries", "membership_inference", "pii", "synthetic_overlap")


def audited(run: Path, precision: str, workdir: Path) -> dict:
    kept = workdir / f"{precision}.json"
    if not kept.is_file():
        seconds = ksg("audit", str(run), "--precision", precision)
        report = json.loads((run / "audit/audit_report.json").read_text())
        report["wall_s"] = round(seconds, 1)
        kept.write_text(json.dumps(report))
        shutil.copy(run / "audit/audit_report.html", workdir / f"{precision}.html")
    return json.loads(kept.read_text())


def canary_rows(reports: dict[str, dict]) -> list[str]:
    a, b = (reports[p]["canaries"] for p in PRECISIONS)
    rows = []
    for target in a["targets"]:
        if "loss_drop_vs_base" not in a["targets"][target]:
            continue
        x, y = np.array(a["targets"][target]["loss_drop_vs_base"]), np.array(b["targets"][target]["loss_drop_vs_base"])
        bounds = [r["targets"][target]["kinds"]["all"]["one_run"]["epsilon_lower_bound"] for r in (a, b)]
        rows.append(f"| {target} | {np.corrcoef(x, y)[0, 1]:.4f} | {np.abs(x - y).max():.3f} | {np.abs(x).mean():.3f} | {bounds[0]} | {bounds[1]} |")
    return rows


def mia_rows(reports: dict[str, dict]) -> list[str]:
    a, b = (reports[p]["membership_inference"] for p in PRECISIONS)
    rows = []
    for key in a:
        cells = [f"{a[key]['scores'][s]['auc']:.3f} / {b[key]['scores'][s]['auc']:.3f}" for s in ("loss", "reference", "min_k_plus_plus", "rmia")]
        rows.append(f"| {key} | {' | '.join(cells)} |")
    return rows


def pii_rows(reports: dict[str, dict]) -> list[str]:
    a, b = (reports[p]["pii"] for p in PRECISIONS)
    rows = []
    for name in a.get("models", {}):
        cells = []
        for attack in ("extraction", "reconstruction", "inference"):
            hits = [r["models"][name]["attacks"][attack]["hits"] for r in (a, b)]
            cells.append(f"{hits[0]} / {hits[1]} of {a['models'][name]['attacks'][attack]['tried']}")
        rows.append(f"| {name} | {' | '.join(cells)} | {a['models'][name].get('replayed', 'n/a')} / {b['models'][name].get('replayed', 'n/a')} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, default=Path("runs/demo-finance"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/demo-audit"))
    args = parser.parse_args()
    if not (args.run / "stages/fedtune/manifest.json").is_file():
        raise SystemExit(f"{args.run}: no finished demo run; run `.venv/bin/ksg run pipelines/specs/demo.yaml` first")
    args.workdir.mkdir(parents=True, exist_ok=True)
    reports = {p: audited(args.run, p, args.workdir) for p in PRECISIONS}
    seconds = {p: reports[p]["seconds"] for p in PRECISIONS}
    write_result("demo_audit", [
        "# `ksg audit` of the demo run, float32 against bfloat16", "",
        f"Command: `{command()}`", f"Machine: {machine()}",
        f"Run: `{args.run}` (`ksg run pipelines/specs/demo.yaml`: 3 DP adapters and the final adapter, 64 canaries in bank_b, 20 held-out records per bank). "
        "Each audit is `ksg audit RUN --precision P` with the audit's defaults (100 candidates, 4 exposure canaries per kind, 8 samples, 100 members per "
        "client, 16 PII spans per client, 1000 bootstrap resamples); run one after the other, the machine otherwise idle.", "",
        "| precision | whole command, s | " + " | ".join(f"{s}, s" for s in SECTIONS) + " |", "|---|---:|" + "---:|" * len(SECTIONS),
        *[f"| {p} | {reports[p]['wall_s']} | " + " | ".join(str(seconds[p].get(s, "")) for s in SECTIONS) + " |" for p in PRECISIONS],
        f"| **float32 / bfloat16** | **{reports['float32']['wall_s'] / reports['bfloat16']['wall_s']:.2f}x** | "
        + " | ".join(f"{seconds['float32'][s] / seconds['bfloat16'][s]:.2f}x" if seconds["bfloat16"].get(s) else "" for s in SECTIONS) + " |", "",
        "What the precision changes (bfloat16 weights, the adapter merged in float32 first; log-probabilities in float32 either way). "
        "Canaries: each canary's loss drop from the base model to the release, float32 against bfloat16:", "",
        "| release | correlation | largest difference, nats | mean absolute drop, nats | one-run bound, float32 | bfloat16 |", "|---|---:|---:|---:|---:|---:|",
        *canary_rows(reports), "",
        "Membership inference AUC (float32 / bfloat16):", "",
        "| release and client | loss | reference | Min-K%++ | RMIA |", "|---|---|---|---|---|", *mia_rows(reports), "",
        "PII attacks, hits (float32 / bfloat16), and values replayed in samples from public prompts (sampling differs with precision, so these are two draws):", "",
        "| release | extraction | reconstruction | inference | replayed |", "|---|---|---|---|---|", *pii_rows(reports),
    ])


if __name__ == "__main__":
    main()
