"""What the two comparison tables (finance, medicine) share: three runs of one spec through `ksg`,
and the five rows read back from their artifacts.

- A (the target epsilon): dp_train -> synthesize -> refine -> fedtune on the refined data -> evaluate;
- B: A's directory copied, fedtune on the unrefined synthetic data (earlier stages are cached);
- C (NOT PRIVATE): dp_train with no noise -> evaluate.

Then `ksg audit` on each run's released models (A: the DP adapters and the final adapter; B: its
final adapter; C: its non-private adapters).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Row:
    label: str
    run: str  # "A", "B" or "C"
    model: str  # "base", "dp" (the clients' DP adapters, on average) or "final" (the federated adapter)
    audit_target: str  # the model the canary and PII columns are measured on
    synthetic: str | None = None  # the synthetic data this row's model was tuned on: "synthesize" or "refine"


def rows(first_client: str, epsilon: float) -> list[Row]:
    return [
        Row("base model, no tuning", "A", "base", "base"),
        Row("NOT PRIVATE: fine-tuning on the private data (upper bound)", "C", "dp", f"dp_adapter:{first_client}"),
        Row(f"DP fine-tuning at epsilon {epsilon:g}, evaluated directly", "A", "dp", f"dp_adapter:{first_client}"),
        Row("synthetic data from the DP model, no refinement (federated)", "B", "final", "final", "synthesize"),
        Row("full pipeline: synthesis, refinement, federated tuning", "A", "final", "final", "refine"),
    ]


def add_run_arguments(parser: argparse.ArgumentParser, synthetic: int, seed: int, mia_members: int) -> None:
    """The options both comparison tables take, with each table's defaults."""
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--synthetic", type=int, default=synthetic, help="synthetic pairs per client")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--limit", type=int, default=100, help="test items per task")
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--audit-candidates", type=int, default=100, help="random candidate secrets per canary")
    parser.add_argument("--audit-samples", type=int, default=4, help="sampled decodings per canary (4x as many generations for PII replay)")
    parser.add_argument("--mia-members", type=int, default=mia_members, help="training records per client scored for membership inference")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--skip-audit", action="store_true", help="accuracy (and fidelity) only: no audit columns (saves about half the time)")


def audit_argv(args: argparse.Namespace) -> list[str] | None:
    """The `ksg audit` options the run arguments ask for; None with --skip-audit."""
    return None if args.skip_audit else ["--candidates", str(args.audit_candidates), "--samples", str(args.audit_samples), "--mia-members", str(args.mia_members)]


def ksg(*argv: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> float:
    """Seconds one `ksg` command took (with `env` added to the environment; `cwd`: the checkout
    whose code runs, e.g. an earlier commit's worktree); a failure ends the benchmark with its output."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", "from knowledgesg.cli import entry; entry()", *argv], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, cwd=cwd)
    if result.returncode != 0:
        raise SystemExit(f"ksg {' '.join(argv)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def run_spec(workdir: Path, spec: dict, run_dir: Path) -> float:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return ksg("run", str(path), "--run-dir", str(run_dir))


AUDITED_MODELS = {"A": "dp,final", "B": "final", "C": "dp"}  # B's DP adapters are A's


def run_three(workdir: Path, base_spec: Callable[[str, float], dict], synthesis: Callable[[str], list[dict]], evaluate: Callable[[list[str]], dict],
              epsilon: float, audit_argv: list[str] | None) -> tuple[dict[str, Path], dict[str, float]]:
    """`base_spec(name, epsilon)` ends with dp_train; `synthesis(synthetic_stage)` adds
    synthesize, refine and fedtune (on `synthetic_stage`'s output); `evaluate(models)` the
    evaluate stage. A step whose marker file `<step>.done` is in `workdir` is not run again, so an
    interrupted benchmark goes on where it stopped. Returns the run directories and the seconds
    each step took (from `times.json`: a step done by an earlier invocation keeps its time)."""
    from knowledgesg.fileio import write_json

    runs = {"A": workdir / "A", "B": workdir / "B", "C": workdir / "C"}
    times_path = workdir / "times.json"
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}

    def step(name: str, label: str, work: Callable[[], float]) -> None:
        marker = workdir / f"{name}.done"
        if not marker.is_file():
            times[label] = work()
            write_json(times_path, times)  # whole or not at all: a later invocation reads it
            marker.touch()

    def run_b() -> float:
        shutil.rmtree(runs["B"], ignore_errors=True)
        shutil.copytree(runs["A"], runs["B"])
        spec_b = base_spec("private", epsilon)
        spec_b["stages"] += synthesis("synthesize") + [evaluate(["final"])]
        return run_spec(workdir, spec_b, runs["B"])

    spec_a = base_spec("private", epsilon)
    spec_a["stages"] += synthesis("refine") + [evaluate(["base", "dp", "final"])]
    spec_c = base_spec("nonprivate", float("inf"))
    spec_c["stages"] += [evaluate(["dp"])]
    step("A", f"A: epsilon {epsilon:g}, full pipeline", lambda: run_spec(workdir, spec_a, runs["A"]))
    step("B", "B: fedtune on unrefined synthetic data (A's earlier stages cached)", run_b)
    step("C", "C: NOT PRIVATE fine-tuning", lambda: run_spec(workdir, spec_c, runs["C"]))
    if audit_argv is not None:
        for name, run_dir in runs.items():
            step(f"audit-{name}", f"audit {name} ({AUDITED_MODELS[name]})", lambda run_dir=run_dir, name=name: ksg("audit", str(run_dir), "--models", AUDITED_MODELS[name], *audit_argv))
    return runs, times


def accuracy(run_dir: Path, model: str, tasks: list[str]) -> dict[str, float]:
    results = json.loads((run_dir / "stages/evaluate/results.json").read_text())["models"]
    if model == "dp":
        dp = [m for name, m in results.items() if name.startswith("dp_adapter:")]
        return {task: sum(m["tasks"][task]["logprob"]["accuracy"] for m in dp) / len(dp) for task in tasks}
    return {task: results[model]["tasks"][task]["logprob"]["accuracy"] for task in tasks}


def audit_figures(run_dir: Path, target: str) -> tuple[str, str]:
    """(mean exposure of the planted canaries, PII values replayed beyond the base model)."""
    if target == "base":
        return "-", "-"
    report = json.loads((run_dir / "audit/audit_report.json").read_text())
    exposure = report["canaries"]["targets"][target]["kinds"]["all"]["mean_exposure_planted"]
    pii = report["pii"]["models"].get(target, {}).get("replayed_not_by_base", "-")
    return ("-" if exposure is None else f"{exposure:.2f}"), str(pii)


def client_epsilon(run_dir: Path, client: str) -> float:
    """The client's composed epsilon over every release in its ledger (reruns included)."""
    from knowledgesg.runner import load_run_spec
    from privacy.ledger import client_delta, composed_total, ledger_directory, run_releases

    spec, base_dir = load_run_spec(run_dir)
    entries = run_releases(run_dir, [s.name for s in spec.stages], ledger_directory(spec.privacy.ledger_dir, base_dir, run_dir))[client]
    return composed_total(entries, client_delta(entries)).reported


def copied_synthetic(run_a: Path, stage: str) -> str:
    """Synthetic texts of `stage` (synthesize or refine) that share an 8-word span with their
    client's private data, public prompt spans aside: "copied / all", over every client."""
    from eval.audit import OVERLAP_WORDS, private_texts, public_prompts, sharing_private_spans, synthetic_texts

    copied = total = 0
    for client in json.loads((run_a / "stages/ingest/partition.json").read_text())["clients"]:
        texts = synthetic_texts(run_a, client, (stage,))
        copied += len(sharing_private_spans(texts, private_texts(run_a, client), public_prompts(run_a, client), OVERLAP_WORDS))
        total += len(texts)
    return f"{copied} / {total}"


def client_sizes(run_dir: Path) -> dict[str, int]:
    """Each client's true number of training records, from its own side of the run (these benchmarks
    simulate every party): partition.json holds the released, noised counts."""
    clients = json.loads((run_dir / "stages/ingest/partition.json").read_text())["clients"]
    return {c: json.loads((run_dir / f"stages/ingest/clients/{c}/stats.json").read_text())["records"] for c in clients}


def count_lines(run_dir: Path, stage: str, file: str) -> int:
    return sum(len(path.read_text().splitlines()) for path in (run_dir / "stages" / stage / "clients").glob(f"*/{file}"))


def table(runs: dict[str, Path], tasks: list[str], first_client: str, epsilon: float, audited: bool,
          extra_columns: Callable[[Row], list[str]] = lambda row: []) -> list[str]:
    """One markdown line per row: accuracy per task and their mean, the extra columns, synthetic
    texts copying a private span, canary exposure, PII replays, epsilon."""
    eps = client_epsilon(runs["A"], first_client)
    lines = []
    for row in rows(first_client, epsilon):
        acc = accuracy(runs[row.run], row.model, tasks)
        mean = sum(acc.values()) / len(acc)
        exposure, pii = audit_figures(runs[row.run], row.audit_target) if audited else ("not run", "not run")
        row_eps = "0" if row.model == "base" else "inf" if row.run == "C" else f"{eps:.2f}"
        copied = copied_synthetic(runs["A"], row.synthetic) if row.synthetic else "-"
        cells = [row.label, *(f"{acc[t]:.3f}" for t in tasks), f"**{mean:.3f}**", *extra_columns(row), copied, exposure, pii, row_eps]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def per_client_table(runs: dict[str, Path], tasks: list[str]) -> list[str]:
    """The DP and non-private rows are means over clients; each client's own adapter here, with
    the number of training records it held (ingest's partition)."""
    sizes = client_sizes(runs["A"])
    lines = ["| client | training records (planted canary copies included) | adapter | " + " | ".join(tasks) + " | mean |", "|---|---|---|" + "---|" * (len(tasks) + 1)]
    for client, size in sizes.items():
        for run, kind in (("C", "NOT PRIVATE"), ("A", "DP")):
            results = json.loads((runs[run] / "stages/evaluate/results.json").read_text())["models"][f"dp_adapter:{client}"]["tasks"]
            acc = [results[t]["logprob"]["accuracy"] for t in tasks]
            lines.append(f"| {client} | {size} | {kind} | " + " | ".join(f"{a:.3f}" for a in acc) + f" | {sum(acc) / len(acc):.3f} |")
    return lines
