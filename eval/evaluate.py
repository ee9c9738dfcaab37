"""`ksg eval RUN` and the `evaluate` stage: benchmark the run's models, measure its synthetic data.

Models: `base` (no tuning), `dp` (each client's DP adapter, evaluated directly) and `final` (the
federated adapter), on the benchmarks of eval.benchmarks or the user's own test files; the same
seeded items for every model. A client's private test set (`private_tasks`) is scored where it
lies, on that client's side: base, its own DP adapter and the final adapter; those figures are
statistics of private data, so they stay there (`clients/<id>/private_eval.json`).
Synthetic data: fidelity and diversity per client (eval.fidelity), computed where the private
data is; those figures are statistics of private data without noise, so they stay on each
client's side (`clients/<id>/fidelity.json`), never in the server-side report.

On a client's own machine (`ksg run --role client`), its run has no final adapter and no
synthetic data: those are the server's. `ksg eval RUN --published DIR` takes them from the
server's `publish` directory copied there (`Published`), so the bank scores the final adapter on
its private test set and measures the synthetic data made from its DP adapter against its private
records, on its side, and nothing about them goes back.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator

from eval.audit import Target, completed, load_target, of_kinds, pair_text, private_texts, professional_target, synthetic_texts, targets_of
from eval.benchmarks import CALIBRATED, TASKS, LabelPrior, evaluate_model, is_task_file, load_task, task_name, task_source
from eval.fidelity import fidelity_report
from knowledgesg.adapters import ADAPTER_WEIGHTS
from knowledgesg.console import console
from knowledgesg.errors import InputError
from knowledgesg.fileio import read_json, sha256_file, write_json, write_text
from knowledgesg.loaders import absolute, same_data
from knowledgesg.models import Precision, resolve_precision
from knowledgesg.retrieval import embed, load_embedder
from knowledgesg.runner import run_models
from knowledgesg.spec import DataSource, StrictModel, format_validation_error

EVAL_REPORT = "eval_report.json"
EVAL_HTML = "eval_report.html"
SIDES = "sides.json"  # each output of `ksg eval` and its side, as a stage manifest would say
LABEL_PRIOR = "label_prior.json"  # the calibrate stage's output, shipped beside the final adapter by publish


class EvalOptions(StrictModel):
    tasks: list[str | DataSource] = Field(default_factory=lambda: ["fpb", "fiqa", "tfns"], description="built-in benchmarks, or public test files (a path, or {path, fields, ...})")
    private_tasks: dict[str, list[str | DataSource]] = Field(default_factory=dict, description="client -> its private test files, scored on its side")
    modes: list[Literal["logprob", "generation"]] = Field(default_factory=lambda: ["logprob", "generation"], min_length=1)
    models: list[Literal["base", "dp", "final", "professional"]] = Field(default_factory=lambda: ["base", "dp", "final"], min_length=1,
                                                                         description="'professional': the professional model as refine used it (tuned, if tune_professional ran)")
    limit: int | None = Field(default=200, ge=1, description="items per task (a seeded subset, the same for every model)")
    fidelity: bool = True
    batch_size: int = Field(default=8, ge=1)
    seed: int = 0
    precision: Precision = Field(default="float32", description="weights of the scored models (auto: bfloat16 where native); adapters are merged in float32 first")

    @field_validator("tasks")
    @classmethod
    def _known(cls, value: list[str | DataSource]) -> list[str | DataSource]:
        unknown = [t for t in value if not is_task_file(t) and t not in TASKS]
        if unknown or not value:
            raise ValueError(f"unknown benchmark {unknown[0] if unknown else '(none given)'} (known: {', '.join(TASKS)}, or a test file .jsonl/.json/.csv/.parquet)")
        return value

    @field_validator("private_tasks")
    @classmethod
    def _files(cls, value: dict[str, list[str | DataSource]]) -> dict[str, list[str | DataSource]]:
        for client, files in value.items():
            if not files or any(not is_task_file(f) for f in files):
                raise ValueError(f"client '{client}': private tasks are test files (.jsonl/.json/.csv/.parquet), got {files}")
        return value


def public_task_files(options: EvalOptions) -> list[str | DataSource]:
    return [t for t in options.tasks if is_task_file(t)]


def private_task_files(options: EvalOptions) -> list[str | DataSource]:
    return [f for files in options.private_tasks.values() for f in files]


def check_task_files(options: EvalOptions, base_dir: Path, files: list[str | DataSource] | None = None) -> None:
    """Read every test file once before any model loads: a bad file is one line, and nothing ran.
    `files`: only these (the `evaluate` stage reads the public ones on the server, and a client's
    private test set only where that client's data is); None: every public and private one."""
    for task in (public_task_files(options) + private_task_files(options)) if files is None else files:
        load_task(task, None, options.seed, base_dir)


def _anchored(source: DataSource, base_dir: Path) -> DataSource:
    return source.model_copy(update={"path": absolute(source.path, base_dir)}) if source.path is not None else source


def refuse_private_data_as_public_tasks(options: EvalOptions, clients: list[DataSource], spec_dir: Path, task_dir: Path, field: str) -> None:
    """A public test file's scores go to the server (results.json, eval_report.json, the model
    card), unnoised: a client's data source (its training records) or a private test set must not
    be one. `spec_dir`: where the clients' paths are from; `task_dir`: where the test files' are."""
    owned = [(_anchored(s, spec_dir), "a client's data source") for s in clients]
    owned += [(_anchored(task_source(f), task_dir), "a private test set") for f in private_task_files(options)]
    for task in public_task_files(options):
        public = _anchored(task_source(task), task_dir)
        what = next((what for source, what in owned if same_data(public, source, task_dir)), None)
        if what is not None:
            raise InputError(f"{field}: {public.builtin or task_source(task).path} is also {what}; a public test file's scores go to the server unnoised")


@dataclass(frozen=True)
class Published:
    """The server's `publish` directory (`final_adapter/`, `synthetic_data/`), as a client got it."""

    directory: Path

    @property
    def final_adapter(self) -> Path:
        return self.directory / "final_adapter"

    @property
    def synthetic_data(self) -> Path:
        return self.directory / "synthetic_data"

    def check(self, run_dir: Path, role: str, clients: list[str]) -> None:
        """Before any model loads: a client's run (`role`, as the run was made), and a published
        directory whole, holding synthetic data of each of `clients`."""
        if role != "client":
            raise InputError(f"{run_dir}: --published is for a client's run (ksg run --role client); this run was made by the {role} role "
                             "(the simulation and the server score their own final adapter)")
        for path in (self.final_adapter / "adapter_config.json", self.final_adapter / ADAPTER_WEIGHTS, self.synthetic_data / "dataset_info.json"):
            if not path.is_file():
                raise InputError(f"{path}: not found (--published takes the server's stages/publish directory, with final_adapter/ and synthetic_data/)")
        try:
            found = set(self._rows["client_id"])
        except Exception as err:  # a torn or foreign datasets directory: say which, in one line
            raise InputError(f"{self.synthetic_data}: not a readable datasets directory ({type(err).__name__}: {err})") from None
        missing = [c for c in clients if c not in found]
        if missing:
            raise InputError(f"{self.synthetic_data}: no synthetic data of client '{missing[0]}' (it holds {', '.join(sorted(found)) or 'none'}): "
                             "published by another run?")
        if (self.final_adapter / LABEL_PRIOR).is_file():
            read_label_prior(self.final_adapter / LABEL_PRIOR)  # before any model loads

    @cached_property
    def _rows(self):
        """The published `datasets` directory, read once (check, then each client's texts)."""
        import datasets

        return datasets.load_from_disk(str(self.synthetic_data))

    def synthetic_texts(self, client: str) -> list[str]:
        """The client's synthetic pairs as texts, as `eval.audit.synthetic_texts` reads them from a run."""
        return [pair_text(r) for r in self._rows if r["client_id"] == client]


def chosen_targets(run_dir: Path, clients: list[str], which: list[str], published: Published | None = None, stages_before: list[str] = ()) -> list[Target]:
    targets = ([Target("base", None)] if "base" in which else []) + of_kinds(targets_of(run_dir, clients), which)
    if published is not None and "final" in which:
        targets.append(Target("final", published.final_adapter))
    if "professional" in which:
        professional = professional_target(run_dir, list(stages_before))
        if professional is None:
            raise InputError("evaluate: models lists 'professional' but the spec names no models.professional")
        targets.append(professional)
    return targets


def refuse_missing_models(run_dir: Path, which: list[str], published: Published | None) -> None:
    """Each released kind asked for by name ("dp", "final") has a model in the run (or, for
    "final", a published adapter): asked for and absent is a mistake, not an empty table."""
    targets = targets_of(run_dir, list(read_json(run_dir / "stages/ingest/partition.json")["clients"]))
    for kind, stage in (("dp", "dp_train"), ("final", "fedtune")):
        if kind in which and not of_kinds(targets, [kind]) and not (kind == "final" and published is not None):
            raise InputError(f"--models {kind}: {run_dir} has no such model ({stage} has not completed there)")


def mean_accuracy(results: dict, mode: str) -> float | None:
    values = [r[mode]["accuracy"] for r in results.values() if mode in r]
    return round(sum(values) / len(values), 4) if values else None


_STALE_PRIORS_SHOWN: set[Path] = set()


def final_label_prior(run_dir: Path, stages_before: list[str] = (), published: Published | None = None) -> LabelPrior | None:
    """The final adapter's label prior: shipped beside a published adapter, or fitted by a
    `calibrate` stage among `stages_before` (one after this evaluation leaves its scores raw)."""
    if published is not None:
        path, adapter = published.final_adapter / LABEL_PRIOR, published.final_adapter / ADAPTER_WEIGHTS
    elif "calibrate" in stages_before and completed(run_dir, "calibrate"):
        path, adapter = run_dir / "stages/calibrate" / LABEL_PRIOR, run_dir / "stages/fedtune/adapter" / ADAPTER_WEIGHTS
    else:
        return None
    if not path.is_file():
        return None
    prior = read_label_prior(path)
    if prior.adapter_sha256 is not None and adapter.is_file() and sha256_file(adapter) != prior.adapter_sha256:
        if path not in _STALE_PRIORS_SHOWN:  # the public and the private scoring both ask: one line
            _STALE_PRIORS_SHOWN.add(path)
            console.print(f"[yellow]warning[/] {path}: fitted for another final adapter than {adapter} (fedtune ran again since, and calibrate did not): "
                          "the final adapter's scores are left raw; run the pipeline again to fit its label prior")
        return None
    return prior


def read_label_prior(path: Path) -> LabelPrior:
    """A `label_prior.json`; a torn or foreign one is one line naming the file and field."""
    try:
        return LabelPrior.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as err:
        raise InputError(format_validation_error(str(path), err)) from None


def score_target(target: Target, models: dict, tasks: list[str | DataSource], options: EvalOptions, device: str, base_dir: Path,
                 label_prior: LabelPrior | None = None) -> dict:
    """A model's scores per task and mode; with a `label_prior` (the final adapter's), the
    log-probability answers after its bias too (`logprob_calibrated`), beside the raw ones."""
    console.print(f"eval: {target.name} on {', '.join(task_name(t) for t in tasks)}")
    model, tokenizer = load_target(models[target.model_role], target.adapter_dir, device, resolve_precision(options.precision, device))
    prior = label_prior if "logprob" in options.modes else None
    results = evaluate_model(model, tokenizer, tasks, list(options.modes), options.limit, options.seed, options.batch_size, device, base_dir, prior)
    modes = [*options.modes, *([CALIBRATED] if prior is not None else [])]
    return {"tasks": results, "mean_accuracy": {mode: mean_accuracy(results, mode) for mode in modes},
            **({"label_prior": prior.model_dump()} if prior is not None else {})}


def evaluate_run(run_dir: Path, options: EvalOptions, device: str, base_dir: Path = Path("."), published: Published | None = None,
                 stages_before: list[str] = ()) -> dict:
    """The server-side results: public tasks only (a private test set's figures stay on its client).
    `stages_before`: the completed stages whose models this evaluation sees (a tuned professional)."""
    clients = list(read_json(run_dir / "stages/ingest/partition.json")["clients"])
    targets = chosen_targets(run_dir, clients, options.models, published, stages_before)
    resolved = run_models(run_dir, {target.model_role for target in targets})
    prior = final_label_prior(run_dir, list(stages_before), published)
    models = {target.name: score_target(target, resolved, options.tasks, options, device, base_dir, prior if target.name == "final" else None)
              for target in targets}
    dp = [m for name, m in models.items() if name.startswith("dp_adapter:")]
    if dp:  # DP fine-tuning evaluated directly: the clients' adapters on average
        models["dp (mean over clients)"] = {"mean_accuracy": {mode: round(sum(m["mean_accuracy"][mode] for m in dp) / len(dp), 4) for mode in options.modes}}
    return {"options": {**options.model_dump(exclude={"private_tasks"}), "precision": resolve_precision(options.precision, device)}, "models": models}


def check_private_clients(run_dir: Path, options: EvalOptions) -> list[str]:
    """The run's clients; refused if a private test set names another (before any scoring)."""
    clients = list(read_json(run_dir / "stages/ingest/partition.json")["clients"])
    unknown = [c for c in options.private_tasks if c not in clients]
    if unknown:
        raise InputError(f"--private: no client '{unknown[0]}' in this run (clients: {', '.join(clients)})")
    return clients


def evaluate_private(run_dir: Path, options: EvalOptions, device: str, base_dir: Path = Path("."), published: Published | None = None,
                     stages_before: list[str] = ()) -> dict[str, dict]:
    """Per client with a private test set, on its side: the base model, its own DP adapter and the
    final adapter (the releases it can run locally; the final one with its label prior, if any)."""
    clients = check_private_clients(run_dir, options)
    if not options.private_tasks:
        return {}
    resolved = run_models(run_dir, ["base"])  # the DP and final adapters are on the base model
    prior = final_label_prior(run_dir, list(stages_before), published)
    results = {}
    for client, tasks in options.private_tasks.items():
        targets = [t for t in chosen_targets(run_dir, clients, ["base", "dp", "final"], published) if t.name in ("base", f"dp_adapter:{client}", "final")]
        results[client] = {"side": f"client:{client}",
                           "models": {t.name: score_target(t, resolved, tasks, options, device, base_dir, prior if t.name == "final" else None) for t in targets}}
    return results


def fidelity_run(run_dir: Path, seed: int, device: str, published: Published | None = None) -> dict[str, dict]:
    """Per client, on the client: synthetic against private texts (the figures stay there)."""
    clients = list(read_json(run_dir / "stages/ingest/partition.json")["clients"])
    if "embedder" not in read_json(run_dir / "stages/prepare_models/models.json"):
        return {c: {"skipped": "no models.embedder in the spec"} for c in clients}
    embedder = load_embedder(run_models(run_dir, ["embedder"])["embedder"]["path"], device)
    synthetic = published.synthetic_texts if published is not None else lambda client: synthetic_texts(run_dir, client)
    return {c: fidelity_report(private_texts(run_dir, c), synthetic(c), lambda texts: embed(embedder, texts), seed) for c in clients}


def check_ready(run_dir: Path) -> None:
    for stage in ("prepare_models", "ingest"):
        if not completed(run_dir, stage):
            raise InputError(f"{run_dir}: stage {stage} has not completed; evaluation needs a run that has")


def write_eval_outputs(directory: Path, results: dict | None, fidelity: dict[str, dict], private: dict[str, dict] | None = None) -> list[Path]:
    """The server-side report (public benchmarks, released models; None on a client that scores
    only what is its own) and each client's fidelity figures and private test scores on its own
    side, with a `sides.json` that says which is which."""
    sides = {}
    if results is not None:
        sides = {EVAL_REPORT: "server", EVAL_HTML: "server"}
        write_json(directory / EVAL_REPORT, results)
        write_text(directory / EVAL_HTML, render_eval_html(results))
    for client, report in fidelity.items():
        write_json(directory / "clients" / client / "fidelity.json", report)
        sides[f"clients/{client}/fidelity.json"] = f"client:{client}"
    for client, report in (private or {}).items():
        write_json(directory / "clients" / client / "private_eval.json", report)
        sides[f"clients/{client}/private_eval.json"] = f"client:{client}"
    write_json(directory / SIDES, sides)
    return [directory / path for path in sides]


def evaluate_published_on_client(run_dir: Path, options: EvalOptions, published: Published, device: str, base_dir: Path) -> list[Path]:
    """On a client's own run: the server's published releases against its private data (its
    private test set, if `options` names one, and the fidelity of the synthetic data its DP adapter
    made); the public benchmarks are the server's to run. Writes RUN/eval/ (client side only)."""
    private = evaluate_private(run_dir, options, device, base_dir, published)
    fidelity = fidelity_run(run_dir, options.seed, device, published) if options.fidelity else {}
    return write_eval_outputs(run_dir / "eval", None, fidelity, private)


def render_eval_html(results: dict) -> str:
    """The server-side results as a table: accuracy / macro-F1 per model, task and answer mode."""
    models = {name: entry for name, entry in results["models"].items() if "tasks" in entry}
    tasks = list(dict.fromkeys(task for entry in models.values() for task in entry["tasks"]))
    head = "".join(f"<th>{html.escape(t)}</th>" for t in tasks)
    rows = []
    for name, entry in results["models"].items():
        cells = "".join("<td>" + "<br>".join(f"{mode}: {s['accuracy']:.3f} / {s['macro_f1']:.3f} (n={s['n']})" for mode, s in entry.get("tasks", {}).get(t, {}).items()) + "</td>"
                        for t in tasks)
        mean = "; ".join(f"{mode} {'n/a' if v is None else f'{v:.3f}'}" for mode, v in entry["mean_accuracy"].items())
        rows.append(f"<tr><td>{html.escape(name)}</td>{cells}<td>{mean}</td></tr>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}</style></head><body>
<h1>Evaluation</h1><p>Accuracy / macro-F1 on the same seeded items for every model (public tasks only: a client's private test set is scored on its side).</p>
<table id="results"><tr><th>model</th>{head}<th>mean accuracy</th></tr>{"".join(rows)}</table></body></html>
"""
