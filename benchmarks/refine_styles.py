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


@dataclass
class SeedTally:
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

    def row(self, run: str, seed: str) -> str:
        dropped = sum(self.dropped.values())
        return (f"| {run} | {seed} | {self.candidates} | {self.dropped['judge']} | {self.dropped['fluency']} | {dropped} ({dropped / self.candidates:.0%}) | "
                f"{median(self.p_yes):.3f} | {median(self.fluency):.2f} |")


def tally(run_dir: Path) -> dict[str, SeedTally]:
    """Per seed instruction, over every client of the run."""
    seeds: dict[str, SeedTally] = defaultdict(SeedTally)
    for client_dir in sorted((run_dir / "stages/refine/clients").iterdir()):
        synthetic = {row["id"]: row for row in read_jsonl(run_dir / "stages/synthesize/clients" / client_dir.name / "synthetic.jsonl")}
        for decision in read_jsonl(client_dir / "decisions.jsonl"):
            seed = (synthetic[decision["id"]].get("provenance") or {}).get("seed") or {}
            seeds[seed.get("instruction") or seed.get("prefix") or "(none)"].add(decision)
    return seeds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", type=Path, help="run directories with finished synthesize and refine stages")
    args = parser.parse_args()
    lines = ["# What refine keeps of each synthesize seed", "", f"Command: `{command()}`", f"Machine: {machine()} (no model runs: read from the runs' artifacts)", "",
             "| run | seed instruction | candidates | dropped by the judge | by fluency | dropped in all | median judge p(yes) | median fluency (nats per token) |",
             "|---|---|---|---|---|---|---|---|"]
    for run_dir in args.runs:
        lines += [counts.row(run_dir.name, seed) for seed, counts in tally(run_dir).items()]
    write_result("refine_styles", lines)


if __name__ == "__main__":
    main()
