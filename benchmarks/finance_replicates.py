"""How far the final tuning alone moves the headline's mean: finished runs of one variant that
differ only in fedtune's replicate seed (`fedtune: seed`: the same DP adapters, synthetic pairs
and public records; another initialisation, batch order and dealing of the public records),
beside the differences between variants. The test-set standard error of one run leaves this
spread out. No model runs: it reads the runs' evaluate results.

Usage:  .venv/bin/python benchmarks/finance_replicates.py RUN [RUN ...]
        .venv/bin/python benchmarks/finance_replicates.py --store

A run's variant is its directory name without a trailing `_seed<N>`; its draw of DP adapters is
named by its work directory and the release ids in its dp_train ledger. `--store` reads every
measurement `finance_headline.py` kept in finance_headline_runs.json instead (each run's latest and
its earlier ones, with their DP release ids), so replicates measured on machines whose run
directories are gone still count: every variant with a `_seed<N>` replicate there, its draws
numbered in the order they were first measured.
Writes benchmarks/results/finance_replicates.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from statistics import mean, stdev

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402
from finance_headline import REPLICATE, STORE as HEADLINE_STORE, TASKS, Replicate, score, stored_replicates  # noqa: E402

STORE = HEADLINE_STORE.path


def replicate(run_dir: Path) -> Replicate:
    models = json.loads((run_dir / "stages/evaluate/results.json").read_text())["models"]
    fedtune = json.loads((run_dir / "stages/fedtune/manifest.json").read_text())["params"]
    releases = sorted(e["release_id"] for e in json.loads((run_dir / "stages/dp_train/ledger.json").read_text()))
    return Replicate(draw=f"{run_dir.parent.name} ({releases[0][:8]})", variant=REPLICATE.sub("", run_dir.name),
                     seed=str(fedtune.get("seed", "spec")), row=score(models["final"]))


def by_draw_and_variant(runs: list[Replicate]) -> dict[tuple[str, str], list[Replicate]]:
    groups: dict[tuple[str, str], list[Replicate]] = {}
    for run in runs:
        groups.setdefault((run.draw, run.variant), []).append(run)
    return groups


def spread_rows(groups: dict[tuple[str, str], list[Replicate]]) -> list[str]:
    """Per draw and variant: the replicates' mean, their standard deviation and range."""
    lines = []
    for (draw, variant), members in groups.items():
        means = [m.row.mean for m in members]
        sd = f"{stdev(means):.3f}" if len(means) > 1 else "n/a"
        tasks = " | ".join(f"{mean(m.row.acc[t] for m in members):.3f}" for t in TASKS)
        lines.append(f"| {draw} | {variant} | {len(members)} | {tasks} | **{mean(means):.3f}** | {sd} | {min(means):.3f} - {max(means):.3f} |")
    return lines


def across_draws_rows(groups: dict[tuple[str, str], list[Replicate]]) -> list[str]:
    """Per variant measured on at least two draws of DP adapters: each draw's replicate mean, the
    mean over draws and their SD (what a new DP release would score, before its final tuning's spread)."""
    by_variant: dict[str, list[tuple[str, float, int]]] = {}
    for (draw, variant), members in groups.items():
        by_variant.setdefault(variant, []).append((draw, mean(m.row.mean for m in members), len(members)))
    lines = []
    for variant, draws in by_variant.items():
        if len(draws) < 2:
            continue
        means = [m for _, m, _ in draws]
        lines.append(f"| {variant} | {', '.join(f'{d.split()[1]}: {m:.3f} ({n})' for d, m, n in draws)} | **{mean(means):.3f}** | {stdev(means):.3f} |")
    return lines


def difference_rows(groups: dict[tuple[str, str], list[Replicate]]) -> list[str]:
    """Each pair of variants on the same draw: the difference of their replicate means, with its
    standard error from the replicates' spread (Welch), where both have at least two."""
    means = {key: [m.row.mean for m in members] for key, members in groups.items()}
    lines = []
    keys = list(means)
    for i, (draw, first) in enumerate(keys):
        for other_draw, second in keys[i + 1:]:
            a, b = means[(draw, first)], means[(other_draw, second)]
            if other_draw != draw or len(a) < 2 or len(b) < 2:
                continue
            se = math.sqrt(stdev(a) ** 2 / len(a) + stdev(b) ** 2 / len(b))
            diff = mean(a) - mean(b)
            lines.append(f"| {draw} | {first} minus {second} | {diff:+.3f} | {se:.3f} | {diff / se:+.1f} |" if se else
                         f"| {draw} | {first} minus {second} | {diff:+.3f} | 0 | n/a |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="*", type=Path, help="finished run directories (evaluate scored their final model)")
    parser.add_argument("--store", action="store_true", help=f"read every stored measurement in {STORE.name} instead of run directories")
    args = parser.parse_args()
    if args.store == bool(args.runs):
        parser.error("give run directories or --store")
    runs = stored_replicates(STORE) if args.store else [replicate(run_dir) for run_dir in args.runs]
    groups = by_draw_and_variant(runs)
    tasks = " | ".join(t.upper() if t != "fiqa" else "FiQA" for t in TASKS)
    lines = ["# Replicates of the headline's final tuning: the spread the final tuning alone gives", "",
             f"Command: `{command()}`", f"Machine: {machine()} (no model runs: read from the runs' evaluate results" + (f", as kept in {STORE.name})" if args.store else ")"), "",
             "Each run: the final model's accuracy by label log-probability on the headline's 400 seeded items per test set; SE: the test items' alone.", "",
             f"| draw (DP adapters) | variant | fedtune seed | {tasks} | mean +- SE | macro-F1 |", "|---|---|---|---|---|---|---|---|",
             *(run.cells() for run in runs), "",
             "## Spread over replicates", "",
             f"| draw (DP adapters) | variant | replicates | {tasks} | mean | SD of the mean over replicates | range |", "|---|---|---|---|---|---|---|---|---|",
             *spread_rows(groups), "",
             "## Across draws of DP adapters", "",
             "| variant | each draw's replicate mean (replicates) | mean over draws | SD between draws |", "|---|---|---|---|",
             *across_draws_rows(groups), "",
             "## Differences between variants on the same draw", "",
             "| draw | variants | difference of the replicate means | SE (from the replicates' spread) | in SEs |", "|---|---|---|---|---|",
             *difference_rows(groups)]
    write_result("finance_replicates", lines)


if __name__ == "__main__":
    main()
