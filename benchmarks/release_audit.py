"""The release audit at the audit's full power: do the private canaries reach the synthetic data
and the final adapter trained on it, beside the DP adapter they were planted in?

Usage:  .venv/bin/python benchmarks/release_audit.py --workdir DIR [--epsilons inf,8] [--per-client 300]

The data, canaries and DP training of `audit_power.py` (one client: 600 FPB training sentences,
600 rare-word canaries each planted with probability 1/2, 500 held-out records, 6 epochs), then
the pipeline's releases that descend from the DP adapter: `synthesize` (`--per-client` pairs,
public seed instructions only: no private record in any prompt) and `fedtune` on those pairs
(engine local; loss on the whole pair, not only the response, so a secret in a synthetic input
is trained on: the attack's best case). Then `ksg audit --models dp,final` with audit_power's
arguments: the one-run bound and the canaries as a membership test on the DP adapter, on the final
adapter and on the synthetic data itself (how much of each secret it contains), each against the
epsilon claimed for that release.

`--dp-from DIR2`: start each row from audit_power's finished run of the same epsilon in DIR2 (its
DP adapter, kept by `ksg run` since its stages' fingerprints match): one NOT PRIVATE run of this
recipe diverged late (loss 1.0 to 3.2 in its last 100 of 300 steps) and forgot the canaries.

Resumable: each run lives in DIR (`ksg run` caches finished stages; a finished audit is kept), so
the same command picks up where it stopped; the results file is rewritten after each row.
Writes benchmarks/results/release_audit.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import audit_power  # noqa: E402
from _common import command, machine, write_result  # noqa: E402
from _comparison import ksg  # noqa: E402

TARGETS = {"dp_adapter:bank_a": "DP adapter (trained on the private records)", "synthetic_data": "synthetic data (from the DP adapter)",
           "final": "final adapter (trained on the synthetic data only)"}


def spec_for(epsilon: float, args) -> dict:
    spec = audit_power.spec_for(epsilon, args)
    spec["name"] = f"release-audit-{audit_power.short_name(epsilon)}"
    spec["stages"] += [
        {"name": "synthesize", "params": {
            "per_client": args.per_client, "oversample": 2.0, "labels": ["negative", "neutral", "positive"], "class_balance": "model",
            "seeds": [{"instruction": "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}.", "domain": "finance", "task": "sentiment"}],
            "sampling": {"max_new_tokens": 48, "temperature": 0.9, "top_p": 0.95}, "response_max_new_tokens": 8, "min_words": 5, "max_words": 60, "precision": "auto"}},
        {"name": "fedtune", "params": {
            "engine": "local", "synthetic_stage": "synthesize", "rounds": 3, "rule": {"name": "fedavg"},
            "training": {"steps": 25, "batch_size": 8, "max_length": 96, "learning_rate": 0.002, "loss_on": "all", "precision": "auto"}}},
    ]
    return spec


def audit_args(args) -> list[str]:
    arguments = audit_power.audit_args(args)
    arguments[arguments.index("--models") + 1] = "dp,final"
    return arguments


def run_row(epsilon: float, args, timings: dict) -> dict:
    spec = spec_for(epsilon, args)
    spec_path = args.workdir / f"{spec['name']}.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    run_dir = args.workdir / spec["name"]
    source = args.dp_from / audit_power.spec_for(epsilon, args)["name"] if args.dp_from else None
    if source is not None and source.is_dir() and not run_dir.exists():  # else this row trains its own
        shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns("audit"))
        print(f"{audit_power.label(epsilon)}: from {source} (its DP adapter)", flush=True)
    timing = timings.setdefault(spec["name"], {})
    if "run_s" not in timing:
        timing["run_s"] = round(ksg("run", str(spec_path), "--run-dir", str(run_dir)), 1)
        (args.workdir / "timings.json").write_text(json.dumps(timings, indent=1))
    if "audit_s" not in timing:
        timing["audit_s"] = round(ksg("audit", str(run_dir), *audit_args(args)), 1)
        (args.workdir / "timings.json").write_text(json.dumps(timings, indent=1))
    return json.loads((run_dir / "audit/audit_report.json").read_text())


def claimed_text(claimed: dict) -> str:
    value = claimed.get("epsilon")
    return "inf" if value is None or math.isinf(value) else f"{value:.2f}"


def target_rows(epsilon: float, report: dict) -> list[str]:
    rows = []
    for name, what in TARGETS.items():
        target = report["canaries"]["targets"].get(name)
        if target is None:
            rows.append(f"| {audit_power.label(epsilon)} | {what} | not audited | | | | | | |")
            continue
        entry = target["kinds"]["all"]
        run, member = entry["one_run"], entry["membership"]
        found = (f"{entry['whole_secret_found_planted']} / {entry['whole_secret_found_not_planted']}" if "whole_secret_found_planted" in entry else "-")
        rows.append(f"| {audit_power.label(epsilon)} | {what} | {claimed_text(target['claimed'])} | {run['correct']}/{run['guesses']}{' in' if run.get('in_only') else ''} | "
                    f"**{run['epsilon_lower_bound']:.3f}** | {run['largest_certifiable']:.2f} | {member['tpr_at_1pct_fpr']:.3f}{audit_power.ci(member.get('tpr_at_1pct_fpr_ci'))} | "
                    f"{member['auc']:.3f}{audit_power.ci(member.get('auc_ci'))} | {found} |")
    return rows


def write_report(args, reports: dict[float, dict], timings: dict) -> None:
    lines = ["# The release audit: the private canaries in every release that descends from the DP adapter", "",
             f"Command: `{command()}`  ", f"Machine: {machine()}  ",
             f"Data, canaries and DP training as in `audit_power.md` ({args.records} FPB training sentences, {args.canaries} rare-word canaries planted with "
             f"probability 1/2, {args.holdout} held out, {args.epochs:g} epochs, seed {args.seed}); then `synthesize` ({args.per_client} pairs, one public seed "
             "instruction) and `fedtune` on those pairs (3 rounds x 25 steps, loss on the whole pair: a secret in a synthetic input is trained on). "
             f"Audit: `ksg audit RUN {' '.join(audit_args(args))}`.", "",
             "Canary score: for an adapter, the drop of the secret's own loss from the base model; for the synthetic data, the share of the secret's rare "
             "words found in it. One-run bound (Steinke et al. 2023, 95%) on all canaries; claimed: the epsilon of that release for one record (the synthetic "
             "data and the final adapter are post-processing of the DP adapter: they claim its epsilon).", "",
             "| training | release | claimed epsilon | correct / guesses | epsilon lower bound | largest certifiable | TPR at 1% FPR [95% CI] | AUC [95% CI] | "
             "whole secrets found in it, planted / not |", "|---|---|---|---|---|---|---|---|---|"]
    for epsilon, report in reports.items():
        lines += target_rows(epsilon, report)
    lines += ["", "Times (s): " + "; ".join(f"{name}: run {t.get('run_s', '-')}, audit {t.get('audit_s', '-')}" for name, t in timings.items())]
    missing = [audit_power.label(e) for e in args.epsilons if e not in reports]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)} (the same command resumes)."]
    write_result("release_audit", lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True, help="the runs live here; the same command resumes from it")
    parser.add_argument("--epsilons", default="inf,8", help="comma-separated; inf: NOT PRIVATE")
    parser.add_argument("--per-client", type=int, default=300, help="synthetic pairs")
    parser.add_argument("--dp-from", type=Path, default=None, help="audit_power's work directory: start each row from its run (its DP adapter)")
    own = parser.parse_args()
    args = audit_power.parse_args(["--workdir", str(own.workdir)])  # audit_power's data, canaries, training and audit, at its defaults
    args.per_client, args.dp_from = own.per_client, own.dp_from
    args.epsilons = [math.inf if e.strip() == "inf" else float(e) for e in own.epsilons.split(",")]
    return args


def main() -> None:
    args = parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    timings_path = args.workdir / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    reports: dict[float, dict] = {}
    for epsilon in args.epsilons:
        start = time.perf_counter()
        reports[epsilon] = run_row(epsilon, args, timings)
        print(f"{audit_power.label(epsilon)}: {time.perf_counter() - start:.0f} s", flush=True)
        write_report(args, reports, timings)


if __name__ == "__main__":
    main()
