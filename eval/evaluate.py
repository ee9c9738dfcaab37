"""`ksg eval RUN` and the `evaluate` stage: benchmark the run's models, measure its synthetic data.

Models: `base` (no tuning), `dp` (each client's DP adapter, evaluated directly) and `final` (the
federated adapter), on the benchmarks of eval.benchmarks; the same seeded items for every model.
Synthetic data: fidelity and diversity per client (eval.fidelity), computed where the private
data is; those figures are statistics of private data without noise, so they stay on each
client's side (`clients/<id>/fidelity.json`), never in the server-side report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from eval.audit import Target, completed, load_target, of_kinds, private_texts, synthetic_texts, targets_of
from eval.benchmarks import TASKS, evaluate_model
from knowledgesg.console import console
from knowledgesg.errors import InputError
from knowledgesg.fileio import read_json, write_json

EVAL_REPORT = "eval_report.json"
SIDES = "sides.json"  # each output of `ksg eval` and its side, as a stage manifest would say


class EvalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(default_factory=lambda: ["fpb", "fiqa", "tfns"])
    modes: list[Literal["logprob", "generation"]] = Field(default_factory=lambda: ["logprob", "generation"], min_length=1)
    models: list[Literal["base", "dp", "final"]] = Field(default_factory=lambda: ["base", "dp", "final"], min_length=1)
    limit: int | None = Field(default=200, ge=1, description="items per task (a seeded subset, the same for every model)")
    fidelity: bool = True
    batch_size: int = Field(default=8, ge=1)
    seed: int = 0

    @field_validator("tasks")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = [t for t in value if t not in TASKS]
        if unknown or not value:
            raise ValueError(f"unknown benchmark {unknown[0] if unknown else '(none given)'} (known: {', '.join(TASKS)})")
        return value


def chosen_targets(run_dir: Path, clients: list[str], which: list[str]) -> list[Target]:
    return ([Target("base", None)] if "base" in which else []) + of_kinds(targets_of(run_dir, clients), which)


def mean_accuracy(results: dict, mode: str) -> float | None:
    values = [r[mode]["accuracy"] for r in results.values() if mode in r]
    return round(sum(values) / len(values), 4) if values else None


def evaluate_run(run_dir: Path, options: EvalOptions, device: str) -> dict:
    base = read_json(run_dir / "stages/prepare_models/models.json")["base"]
    clients = list(read_json(run_dir / "stages/ingest/partition.json")["clients"])
    models = {}
    for target in chosen_targets(run_dir, clients, options.models):
        console.print(f"eval: {target.name} on {', '.join(options.tasks)}")
        model, tokenizer = load_target(base, target.adapter_dir, device)
        results = evaluate_model(model, tokenizer, options.tasks, list(options.modes), options.limit, options.seed, options.batch_size, device)
        models[target.name] = {"tasks": results, "mean_accuracy": {mode: mean_accuracy(results, mode) for mode in options.modes}}
        del model
    dp = [m for name, m in models.items() if name.startswith("dp_adapter:")]
    if dp:  # DP fine-tuning evaluated directly: the clients' adapters on average
        models["dp (mean over clients)"] = {"mean_accuracy": {mode: round(sum(m["mean_accuracy"][mode] for m in dp) / len(dp), 4) for mode in options.modes}}
    return {"options": options.model_dump(), "models": models}


def fidelity_run(run_dir: Path, seed: int, device: str) -> dict[str, dict]:
    """Per client, on the client: synthetic against private texts (only the figures leave)."""
    from eval.fidelity import fidelity_report
    from knowledgesg.retrieval import embed, load_embedder

    models = read_json(run_dir / "stages/prepare_models/models.json")
    clients = list(read_json(run_dir / "stages/ingest/partition.json")["clients"])
    if "embedder" not in models:
        return {c: {"skipped": "no models.embedder in the spec"} for c in clients}
    embedder = load_embedder(models["embedder"]["path"], device)
    return {c: fidelity_report(private_texts(run_dir, c), synthetic_texts(run_dir, c), lambda texts: embed(embedder, texts), seed) for c in clients}


def check_ready(run_dir: Path) -> None:
    for stage in ("prepare_models", "ingest"):
        if not completed(run_dir, stage):
            raise InputError(f"{run_dir}: stage {stage} has not completed; evaluation needs a run that has")


def write_eval_outputs(directory: Path, results: dict, fidelity: dict[str, dict]) -> list[Path]:
    """The server-side report (public benchmarks, released models) and each client's fidelity
    figures on its own side, with a `sides.json` that says which is which."""
    sides = {EVAL_REPORT: "server"}
    write_json(directory / EVAL_REPORT, results)
    for client, report in fidelity.items():
        write_json(directory / "clients" / client / "fidelity.json", report)
        sides[f"clients/{client}/fidelity.json"] = f"client:{client}"
    write_json(directory / SIDES, sides)
    return [directory / path for path in sides]
