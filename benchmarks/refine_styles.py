"""What refine kept of each synthesize seed: per seed, the candidates, those dropped by the judge
and by the fluency filter, and the median judge p(yes) and fluency. No model runs: it reads a
finished refine stage's `decisions.jsonl` beside synthesize's `synthetic.jsonl` (server-side
artifacts, synthetic text only).

Usage:  .venv/bin/python benchmarks/refine_styles.py RUN [RUN ...]

Writes benchmarks/results/refine_styles.md.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from knowledgesg.fileio import read_jsonl  # noqa: E402
from pipelines.refine import seed_key  # noqa: E402


@dataclass
class SeedTally:
    label: str = ""  # the seed's instruction (or prefix), as the table shows it
    candidates: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    p_yes: list[float] = field(default_factory=list)
    fluency: list[float] = field(default_factory=list)

    def add(self, decision: dict) -> None:
        self.candidates += 1
        if decision["dropped_by"]:
            self.dropped[decision["dropped_by"]] += 1
        self.p_yes.append(decision["judge_p_yes"])
        self.fluency.append(decision["fluency_mean_logprob"])

    def row(self, run: str) -> str:
        dropped = sum(self.dropped.values())
        return (f"| {run} | {self.label} | {self.candidates} | {self.dropped['judge']} | {self.dropped['fluency']} | {dropped} ({dropped / self.candidates:.0%}) | "
                f"{median(self.p_yes):.3f} | {median(self.fluency):.2f} |")


def tally(run_dir: Path) -> dict[str, SeedTally]:
    """Per synthesize seed, over every client of the run: the groups refine's `centre_by_seed` centres."""
    seeds: dict[str, SeedTally] = defaultdict(SeedTally)
    for client_dir in sorted((run_dir / "stages/refine/clients").iterdir()):
        synthetic = {row["id"]: row for row in read_jsonl(run_dir / "stages/synthesize/clients" / client_dir.name / "synthetic.jsonl")}
        for decision in read_jsonl(client_dir / "decisions.jsonl"):
            row = synthetic[decision["id"]]
            counts = seeds[seed_key(row)]
            seed = (row.get("provenance") or {}).get("seed") or {}
            counts.label = seed.get("instruction") or seed.get("prefix") or "(none)"
            counts.add(decision)
    return seeds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", type=Path, help="run directories with finished synthesize and refine stages")
    args = parser.parse_args()
    lines = ["# What refine keeps of each synthesize seed", "", f"Command: `{command()}`", f"Machine: {machine()} (no model runs: read from the runs' artifacts)", "",
             "| run | seed instruction | candidates | dropped by the judge | by fluency | dropped in all | median judge p(yes) | median fluency (nats per token) |",
             "|---|---|---|---|---|---|---|---|"]
    for run_dir in args.runs:
        lines += [counts.row(run_dir.name) for counts in tally(run_dir).values()]
    write_result("refine_styles", lines)


if __name__ == "__main__":
    main()
