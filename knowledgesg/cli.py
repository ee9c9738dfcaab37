"""The `ksg` command."""

from __future__ import annotations

import math
import sys
import time
from functools import partial
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.markup import escape
from rich.table import Table

from knowledgesg.console import console, output, quiet_dependencies
from knowledgesg.errors import InputError, KsgError, SpecError
from knowledgesg.fileio import read_json, unmakeable_directory
from knowledgesg.models import MARKER, REGISTRY, TINY, cache_root, resolve_device

# Each command imports the runner, the stages, the accountant and the evaluation inside itself:
# together they take about 0.4 s to import, which `ksg --help` and a mistyped flag need not wait for.

app = typer.Typer(
    name="ksg",
    help="KnowledgeSG: privacy-first synthetic data for federated fine-tuning of language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

@app.callback()
def options(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="also show the libraries' warnings, logs and progress bars")] = False) -> None:
    """KnowledgeSG: privacy-first synthetic data for federated fine-tuning of language models."""
    if not verbose:
        quiet_dependencies()


STATE_STYLES = {"done": "green", "cached": "cyan", "kept": "cyan", "received": "green", "ran": "green", "stale": "yellow", "pending": "dim", "failed": "red", "running": "blue", "interrupted": "yellow"}


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}s"


def _mib(value: float | None) -> str:
    return "" if value is None else (f"{value / 1024:.2f} GiB" if value >= 1024 else f"{value:.0f} MiB")


def given_path(value: str | None, flag: str) -> Path | None:
    """A path option as typed: an empty one is refused (as a Path it would be '.', the working directory)."""
    if value is not None and not value.strip():
        raise InputError(f"{flag}: an empty path (give a directory, or leave {flag} out for the default)")
    return None if value is None else Path(value)


@app.command()
def run(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="pipeline spec (YAML)")],
    run_dir: Annotated[str | None, typer.Option("--run-dir", help="default: runs/<spec name>")] = None,
    role: Annotated[str, typer.Option(help="all: every party in this process (the simulation); client: one client's stages on its own data, "
                                           "then its releases to --exchange; server: the clients' releases from --exchange, then the server's stages")] = "all",
    client: Annotated[str | None, typer.Option(help="with --role client: which member of the spec this machine is")] = None,
    exchange: Annotated[Path | None, typer.Option(help="with --role client or server: the directory the releases cross through")] = None,
) -> None:
    """Run a pipeline; stages already done with the same inputs are skipped (resume after a crash)."""
    from knowledgesg.roles import Role
    from knowledgesg.runner import Runner
    from pipelines import load_pipeline
    from pipelines.check import refuse_planned_over_cap

    start = time.perf_counter()
    spec, base_dir, stages = load_pipeline(spec_path)
    if role not in ("all", "client", "server"):
        raise InputError(f"--role: '{role}' is not one of all, client, server")
    if role == "client" and client is None:
        raise InputError("--role client: say which member this machine is with --client ID")
    if client is not None and role != "client":
        raise InputError("--client goes with --role client")
    if role == "all" and exchange is not None:
        raise InputError("--exchange goes with --role client or --role server (a run with every role exchanges nothing)")
    if role != "all" and exchange is None:
        raise InputError(f"--role {role}: give --exchange DIR, the directory the releases cross through")
    party = Role(role, client, exchange)  # type: ignore[arg-type]
    run_dir = given_path(run_dir, "--run-dir") or Path("runs") / (spec.name if role == "all" else f"{spec.name}-{client or 'server'}")
    # the plan's budgets are checked where the clients' data is (the server of a split run holds none)
    plan_check = partial(refuse_planned_over_cap, base_dir=base_dir, run_dir=run_dir) if role != "server" else None
    runner = Runner(spec, base_dir, run_dir, stages, party, plan_check)
    try:
        if role == "server" and spec.federation.transport == "flower":
            from knowledgesg.federated.stages import fetch_over_flower

            assert exchange is not None
            runner.preflight()  # the server's own checks, before the clients' nodes run their stages and spend their budgets
            fetch_over_flower(spec, base_dir, run_dir, exchange)  # each client's node runs its stages and sends its releases
        outcomes = runner.run()
    except SpecError as err:
        raise err.in_file(spec_path) from None
    if role == "server" and spec.federation.transport == "flower" and any(o.name == "publish" for o in outcomes):
        from knowledgesg.federated.stages import deliver_over_flower

        delivered = deliver_over_flower(spec, base_dir, run_dir)  # each client's node keeps the releases and evaluates them on its side
        console.print(f"published releases kept by {', '.join(delivered['kept'])} ({len(delivered['files'])} files each); their evaluation stays on each client")
    table = Table(title=f"{spec.name}: {run_dir}")
    for column, justify in (("stage", "left"), ("status", "left"), ("time", "right"), ("records", "right"), ("peak memory", "right")):
        table.add_column(column, justify=justify)
    for outcome in outcomes:
        style = STATE_STYLES.get(outcome.status, "")
        time_text = _seconds(outcome.duration_s) + (" (earlier)" if outcome.status in ("cached", "kept") else "")
        table.add_row(outcome.name, f"[{style}]{outcome.status}[/]", time_text, "-" if outcome.records is None else str(outcome.records), _mib(outcome.peak_rss_mib))
    console.print(table)
    for outcome in outcomes:  # said while the stage ran; again here, where the run's outcome is read
        for warning in outcome.warnings:
            console.print(f"[yellow]warning[/] {outcome.name}: {escape(warning)}")
    _print_privacy_summary(spec, base_dir, run_dir)
    console.print(f"run report: {_refresh_run_report(run_dir)}")
    console.print(f"finished in {time.perf_counter() - start:.1f}s")


def _check_run_report_inputs(run_dir: Path) -> None:
    """What `_refresh_run_report` reads besides the manifests, read now: its refusals (a spec copy
    naming an unknown stage or role) come before a command writes anything. And the ledger, as
    `ksg run` checks it: in another ledger directory than the one the run released into ($KSG_LEDGER_DIR
    unset or changed in a new shell), the run's releases were silently missing from the totals."""
    from knowledgesg.runner import SPEC_COPY, load_run_role, load_run_spec, refuse_a_ledger_without_this_runs_releases
    from pipelines import build_stages
    from privacy.ledger import ledger_directory

    spec, base_dir = load_run_spec(run_dir)
    stages = build_stages(spec, str(run_dir / SPEC_COPY))
    if load_run_role(run_dir).kind != "server":  # the server's copies of the clients' ledgers are in the run directory
        refuse_a_ledger_without_this_runs_releases(run_dir, stages, ledger_directory(spec.privacy.ledger_dir, base_dir, run_dir))


def _refresh_run_report(run_dir: Path) -> Path:
    """RUN/report.html from what is on disk now: the stage table, privacy totals, report links."""
    from knowledgesg.run_report import write_run_report
    from knowledgesg.runner import SPEC_COPY, load_run_role, load_run_spec
    from knowledgesg.status import run_status
    from pipelines import build_stages
    from privacy.ledger import client_delta, composed_total, ledger_directory, run_releases

    spec, base_dir = load_run_spec(run_dir)
    states = run_status(run_dir, spec, base_dir, build_stages(spec, str(run_dir / SPEC_COPY)), load_run_role(run_dir))
    releases = run_releases(run_dir, [s.name for s in spec.stages], ledger_directory(spec.privacy.ledger_dir, base_dir, run_dir))
    privacy = [(client, composed_total(entries, client_delta(entries)).reported, client_delta(entries), sum(e.costs_privacy for e in entries))
               for client, entries in releases.items()]
    return write_run_report(run_dir, spec.name, states, privacy)


def _print_privacy_summary(spec, base_dir: Path, run_dir: Path) -> None:
    """Per client, from the ledgers: each release with its stored epsilon, and the composed total
    over every release ever made from the client's data (the full report recomputes them)."""
    from knowledgesg.runner import load_run_role
    from privacy.ledger import client_delta, composed_total, ledger_directory, run_releases
    from privacy.report import release_label

    releases = run_releases(run_dir, [s.name for s in spec.stages], ledger_directory(spec.privacy.ledger_dir, base_dir, run_dir))
    if not releases:
        return
    server = load_run_role(run_dir).kind == "server"
    console.print("privacy (from the ledger):")
    for client_id, entries in releases.items():
        delta = client_delta(entries)
        total = composed_total(entries, delta)
        console.print(f"  {client_id} (delta {delta:.2e}): total epsilon {total.reported:.3f} over {sum(e.costs_privacy for e in entries)} release(s) with a cost"
                      if math.isfinite(total.reported) else f"  {client_id} (delta {delta:.2e}): total [bold red]NOT PRIVATE[/]")
        for e in entries:
            label = release_label(e).replace("NOT PRIVATE", "[bold red]NOT PRIVATE[/]")
            cost = f"epsilon {e.epsilon.reported:.3f} ({e.epsilon.reported_by})" if e.private else "no guarantee"
            # on the server every entry was made on a client, in the client's run
            where = "" if Path(e.run_dir) == run_dir.resolve() or server else " [dim](another run)[/]"
            console.print(f"    {e.stage}: {label}: {cost}{where}")
    console.print(f"  full report with the three accountants, the threat model and plots: ksg privacy-report {run_dir}")


@app.command()
def init(
    data: Annotated[list[Path], typer.Argument(metavar="DATA...", help="your data files (JSONL, JSON, CSV, Parquet, or saved datasets directories)")],
    domain: Annotated[str, typer.Option(help="finance or medicine: the public example pools and prompts")] = "finance",
    out: Annotated[Path, typer.Option("--out", "-o", help="where to write the spec")] = Path("spec.yaml"),
    name: Annotated[str | None, typer.Option(help="the run's name (default: from --out)")] = None,
    force: Annotated[bool, typer.Option(help="overwrite an existing spec")] = False,
) -> None:
    """Write a starter spec from your files: formats and fields detected, every choice commented."""
    from pipelines.starter import DOMAINS, write_starter_spec

    if domain not in DOMAINS:
        raise InputError(f"ksg init: --domain is one of {', '.join(DOMAINS)}, got {domain!r}")
    text = write_starter_spec(list(data), domain, out, name, force)
    for line in text.splitlines():
        if line.startswith("# - "):
            console.print(line[2:])
    console.print(f"wrote {out}; next: ksg check {out}, then ksg run {out}")


@app.command()
def check(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="pipeline spec (YAML)")],
    run_dir: Annotated[str | None, typer.Option("--run-dir", help="the run whose ledger counts (default: runs/<spec name>)")] = None,
) -> None:
    """Check a spec without running it: the spec, every data file, the models, and each client's planned epsilon against the cap."""
    from pipelines import load_pipeline
    from pipelines.check import check_pipeline, refuse_over_cap

    spec, base_dir, stages = load_pipeline(spec_path)
    try:
        notes, checks = check_pipeline(spec, base_dir, stages, given_path(run_dir, "--run-dir") or Path("runs") / spec.name)
    except SpecError as err:
        raise err.in_file(spec_path) from None
    output.print(f"{spec_path}: the spec and its {len(stages)} stages are valid; the data loads and partitions")
    for role, name, note in notes:
        output.print(f"  model {role}: {name} ({note})")
    if checks:
        table = Table(title="planned privacy per client (dp_train calibration, and a DP histogram if synthesize makes one)")
        for column in ("client", "records", "N", "N is", "unit", "q", "steps", "sigma", "delta", "planned eps", "spent before", "total", "cap", ""):
            table.add_column(column, justify="left" if column in ("client", "N is", "unit", "") else "right")
        for c in checks:
            table.add_row(c.client_id, str(c.records), str(c.units or "-"), c.count, c.unit or "-", f"{c.sample_rate:.4f}" if c.sample_rate else "-", str(c.steps or "-"),
                          f"{c.noise_multiplier:.3f}" if c.noise_multiplier is not None else "-", f"{c.delta:.1e}" if c.delta else "-",
                          _eps(c.planned_epsilon), f"{_eps(c.spent_epsilon)} ({c.releases_before})", _eps(c.total_epsilon),
                          "-" if c.cap is None else f"{c.cap:g}", "[green]ok[/]" if c.within_cap else "[bold red]over the cap[/]")
        output.print(table)
    elif any(stage.releases() for stage in stages):
        output.print(f"no release left to plan: every release stage has finished in {run_dir or Path('runs') / spec.name}; `ksg privacy-report` there shows what was spent")
    else:
        output.print("no release planned: the spec has no stage that releases something of the private data (dp_train, a DP histogram, fedtune on private data)")
    refuse_over_cap(checks)
    console.print("nothing was written")


def _eps(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3f}"


@app.command()
def status(run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="a run directory")]) -> None:
    """Each stage of a run: done, cached, stale, interrupted, failed or pending."""
    from knowledgesg.runner import SPEC_COPY, load_run_role, load_run_spec
    from knowledgesg.status import run_status
    from pipelines import build_stages

    spec, base_dir = load_run_spec(run_dir)
    table = Table(title=str(run_dir))
    for column in ("stage", "state", "time", "records", "finished", "detail"):
        table.add_column(column)
    for state in run_status(run_dir, spec, base_dir, build_stages(spec, str(run_dir / SPEC_COPY)), load_run_role(run_dir)):
        style = STATE_STYLES.get(state.state, "")
        table.add_row(state.name, f"[{style}]{state.state}[/]", _seconds(state.duration_s), "-" if state.records is None else str(state.records), state.finished_at or "", state.detail)
    output.print(table)


@app.command("privacy-report")
def privacy_report(run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="a run directory")]) -> None:
    """Per client: every release made from its data, at what (epsilon, delta), and the total.

    Each release with its mechanism, (epsilon, delta) by PRV, RDP and PLD and whom it holds
    against; the composed total; the threat model. Writes RUN/privacy_report.json and .html."""
    from privacy.report import build_report, fmt, release_label, size_origin, write_report
    from privacy.units import UNIT_NAMES

    _check_run_report_inputs(run_dir)  # a damaged run directory, or another ledger, refused before anything is printed or written
    report = build_report(run_dir)
    refuse_unwritable_output(run_dir)
    json_path, html_path = write_report(report, run_dir)  # before it is shown, as eval's
    table = Table(title=f"privacy report: {report.spec_name} (target epsilon {fmt(report.target_epsilon)})")
    for column in ("client", "release", "unit", "q", "sigma", "steps", "delta", "eps PRV", "eps RDP", "eps PLD", "status"):
        table.add_column(column, justify="left" if column in ("client", "release", "unit", "status") else "right")
    for client in report.clients:
        for row in client.releases:
            e, m = row.entry, row.entry.mechanism
            steps = "-" if m.kind == "post_processing" else str(m.steps)
            table.add_row(client.client_id, release_label(e).replace("NOT PRIVATE", "[bold red]NOT PRIVATE[/]"), UNIT_NAMES.get(e.unit, e.unit), fmt(m.sample_rate),
                          fmt(m.noise_multiplier), steps, f"{e.delta:.2e}", fmt(row.epsilon.prv), fmt(row.epsilon.rdp), fmt(row.epsilon.pld), row.status)
        cap = "" if client.cap_epsilon is None else f", cap {client.cap_epsilon:g}"
        n = "" if client.num_units is None else f", N x delta {client.n_times_delta:.1e}"
        table.add_row(client.client_id, f"[bold]total (PLD){cap}[/]", ", ".join(client.units), "", "", "", f"{client.delta:.2e}", fmt(client.total.prv), fmt(client.total.rdp),
                      f"[bold]{fmt(client.total.pld)}[/]", f"N = {client.num_units} ({size_origin(client)}){n}" if client.num_units else "", end_section=client.client_level is None)
        if client.client_level is not None:
            table.add_row(client.client_id, "client-level DP-FedAvg (final-model holders only)", "client", "", "", "", f"{client.client_level.delta:.2e}",
                          fmt(client.client_level.prv), fmt(client.client_level.rdp), fmt(client.client_level.pld), "", end_section=True)
    output.print(table)
    output.print("whom each figure protects against:")
    for party in report.threat_model[1:]:
        output.print(f"- {party['party']}: {party['protected_by']}")
    output.print("assumptions:")
    for assumption in report.assumptions:
        output.print(f"- {assumption}")
    console.print(f"wrote {json_path} and {html_path} (run report: {_refresh_run_report(run_dir)})")


def split(text: str) -> list[str]:
    """A comma-separated option as its parts."""
    return [part.strip() for part in text.split(",") if part.strip()]


def refuse_unwritable_output(directory: Path) -> None:
    """Before the models are scored (minutes), not after: where the report goes must be a directory."""
    problem = unmakeable_directory(directory)
    if problem:
        raise InputError(f"{directory}: {problem}; the report cannot be written there")


@app.command("eval")
def evaluate(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="a run directory")],
    tasks: Annotated[str, typer.Option(help="comma-separated: fpb, fiqa, tfns, pubmedqa, medqa, or test files of your own (.jsonl/.json/.csv/.parquet)")] = "fpb,fiqa,tfns",
    private: Annotated[list[str] | None, typer.Option(help="CLIENT=FILE: a client's private test set, scored on its side (repeatable)")] = None,
    models: Annotated[str | None, typer.Option(help="comma-separated: base, dp, final, professional (default: base, dp, final, those the run has; "
                                                      "a kind named here that the run lacks is an error)")] = None,
    modes: Annotated[str, typer.Option(help="comma-separated: logprob, generation")] = "logprob,generation",
    limit: Annotated[int, typer.Option(min=0, help="items per task (a seeded subset, the same for every model); 0: every item")] = 200,
    seed: Annotated[int, typer.Option(help="seed of the test items' subset (the same items for every model)")] = 0,
    precision: Annotated[str, typer.Option(help="weights of the scored models: float32, bfloat16, or auto (bfloat16 where it runs natively)")] = "float32",
    fidelity: Annotated[bool, typer.Option(help="also score each client's synthetic data against its private records (on its side)")] = True,
    published: Annotated[Path | None, typer.Option(help="on a client's run (--role client): the server's stages/publish directory, copied here; "
                                                        "its final adapter and synthetic data are evaluated against this client's private data, on its side")] = None,
) -> None:
    """Benchmark a run's models (base, each DP adapter, the final adapter) and its synthetic data."""
    from pydantic import ValidationError

    from eval.evaluate import (EvalOptions, Published, check_private_clients, check_ready, check_task_files, evaluate_private, evaluate_run, fidelity_run, refuse_missing_models,
                               refuse_private_data_as_public_tasks, write_eval_outputs)
    from knowledgesg.runner import load_run_role, load_run_spec
    from knowledgesg.spec import format_validation_error

    private_tasks: dict[str, list[str]] = {}
    for item in private or []:
        client, sep, path = item.partition("=")
        if not sep or not client or not path:
            raise InputError(f"ksg eval: --private takes CLIENT=FILE, got {item!r}")
        private_tasks.setdefault(client, []).append(path)
    try:
        options = EvalOptions(tasks=split(tasks), private_tasks=private_tasks, models=split("base,dp,final" if models is None else models), modes=split(modes), limit=limit or None, seed=seed,
                              precision=precision, fidelity=fidelity)
    except ValidationError as err:
        raise InputError(format_validation_error("ksg eval", err)) from None
    spec, spec_dir = load_run_spec(run_dir)
    check_ready(run_dir)
    _check_run_report_inputs(run_dir)  # the run report is refreshed at the end
    refuse_unwritable_output(run_dir / "eval")
    server_release = Published(published) if published is not None else None
    if server_release is not None:
        server_release.check(run_dir, load_run_role(run_dir).kind, list(read_json(run_dir / "stages/ingest/partition.json")["clients"]))
    check_task_files(options, Path("."))
    refuse_private_data_as_public_tasks(options, spec.clients.sources(), spec_dir, Path("."), "ksg eval --tasks")
    check_private_clients(run_dir, options)  # before the public tasks are scored, not after
    if models is not None:
        refuse_missing_models(run_dir, options.models, server_release)
    device = resolve_device(spec.models.device)
    results = evaluate_run(run_dir, options, device, published=server_release, stages_before=[stage.name for stage in spec.stages])
    private_results = evaluate_private(run_dir, options, device, published=server_release, stages_before=[stage.name for stage in spec.stages])
    fidelity_reports = fidelity_run(run_dir, seed, device, server_release) if options.fidelity else {}
    # written before anything is shown: stdout may be a pipe that closes early (`| head`), and rich
    # then exits; the scores must be on disk by then
    paths = write_eval_outputs(run_dir / "eval", results, fidelity_reports, private_results)
    _print_eval(results)
    # figures of private data (accuracy on a private test set, distances to and sizes of the private
    # records) stay in the client's files: a console may be a log the server holds
    for client in private_results:
        console.print(f"{client}'s private test set: scored, in {run_dir / 'eval/clients' / client / 'private_eval.json'} (its side)")
    for client in fidelity_reports:
        console.print(f"synthetic data of {client} against its private data: in {run_dir / 'eval/clients' / client / 'fidelity.json'} (its side)")
    console.print(f"wrote {', '.join(str(p) for p in paths)} (run report: {_refresh_run_report(run_dir)})")


def _print_eval(results: dict) -> None:
    options = results["options"]
    modes = list(dict.fromkeys(mode for entry in results["models"].values() for scores in entry.get("tasks", {}).values() for mode in scores))
    table = Table(title=f"accuracy / macro-F1 ({'; '.join(modes)})")
    table.add_column("model")
    for task in options["tasks"]:
        table.add_column(task, justify="right")
    table.add_column("mean accuracy", justify="right")
    for name, entry in results["models"].items():
        cells = []
        for task in options["tasks"]:
            scores = entry.get("tasks", {}).get(task, {})
            cells.append("; ".join(f"{s['accuracy']:.3f} / {s['macro_f1']:.3f}" for s in scores.values()) or "")
        table.add_row(name, *cells, "; ".join("n/a" if v is None else f"{v:.3f}" for v in entry["mean_accuracy"].values()))
    output.print(table)


@app.command()
def audit(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="a run directory")],
    candidates: Annotated[int, typer.Option(help="random candidate secrets per canary (skew-normal fit)")] = 100,
    exposure_canaries: Annotated[int, typer.Option(help="canaries of each kind whose exposure and extraction are measured (all are scored for the one-run bound)")] = 4,
    guesses: Annotated[int | None, typer.Option(help="one-run epsilon audit: one number of guesses, half in and half out (default: 'in' on the top 5-50% of the canaries, and half in, half out on all, Bonferroni-corrected)")] = None,
    in_guesses: Annotated[int | None, typer.Option(help="one-run epsilon audit: 'in' on this many highest-scoring canaries, declared before the run (from a pilot), no Bonferroni correction")] = None,
    samples: Annotated[int, typer.Option(help="sampled decodings per canary of the exposure sample; 4x as many generations per model for PII replay")] = 8,
    mia_members: Annotated[int | None, typer.Option(help="training records per client scored for membership inference (default: as many as its held-out non-members)")] = None,
    pii_spans: Annotated[int, typer.Option(help="PII spans per client attacked (extraction, reconstruction, inference)")] = 16,
    pii_attack_samples: Annotated[int, typer.Option(help="sampled continuations per attacked PII span")] = 4,
    pii_score: Annotated[str, typer.Option(help="what ranks a PII candidate: record (the record from it to the end), sentence (it and the rest of its sentence: the filled-in sentence, as Lukas et al.) or value (its own tokens: faster, weaker)")] = "record",
    bootstrap: Annotated[int, typer.Option(help="bootstrap resamples for the intervals of AUC and TPR at low FPR")] = 1000,
    models: Annotated[str, typer.Option(help="comma-separated released models to audit: dp, final (the base model is always the reference)")] = "dp,final",
    precision: Annotated[str, typer.Option(help="model weights while scoring and sampling: auto (bfloat16 where it runs natively), float32, bfloat16")] = "auto",
    seed: Annotated[int, typer.Option(help="seed of the audit's own draws (candidates, shadow items)")] = 0,
) -> None:
    """Memorization audit of a run's released models and synthetic data.

    Canaries (random and designed) with the one-run epsilon lower bound, membership inference
    with TPR at low FPR, synthetic-data overlap, PII replay and attacks."""
    from pydantic import ValidationError

    from eval.audit import AuditOptions, run_audit
    from eval.report import write_audit_report
    from knowledgesg.runner import load_run_role, load_run_spec
    from knowledgesg.spec import format_validation_error

    try:
        options = AuditOptions(candidates=candidates, exposure_canaries=exposure_canaries, guesses=guesses, in_guesses=in_guesses, extraction_samples=samples, pii_samples=4 * samples,
                               mia_members=mia_members, pii_occurrences=pii_spans, pii_attack_samples=pii_attack_samples, pii_score=pii_score, bootstrap=bootstrap, models=split(models), precision=precision, seed=seed)
    except ValidationError as err:
        # name the flag the user typed, not the option's field (--samples sets two of them)
        flags = {"extraction_samples": "samples", "pii_samples": "samples", "pii_occurrences": "pii-spans"}
        first = err.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else ""
        flag = f"--{flags.get(name, name.replace('_', '-'))}"
        raise InputError(f"ksg audit: {flag}: {first['msg'].removeprefix('Value error, ')} (got {first['input']!r})" if name else format_validation_error("ksg audit", err)) from None
    load_run_spec(run_dir)  # a run directory at all, said first
    if load_run_role(run_dir).kind == "server":  # it had loaded the base model, then stopped on a missing client file with a traceback
        raise InputError(f"ksg audit: {run_dir} was made by the server of a split run, which holds no client's records: "
                         "audit a client's run directory (the canaries' client for the canary audit), or a simulation's")
    _check_run_report_inputs(run_dir)  # the run report is refreshed at the end
    refuse_unwritable_output(run_dir / "audit")
    report = run_audit(run_dir, options)
    json_path, html_path = write_audit_report(report, run_dir / "audit")  # before it is shown, as eval's
    _print_audit(report)
    console.print(f"wrote {json_path} and {html_path} (run report: {_refresh_run_report(run_dir)})")


def _print_audit(report: dict) -> None:
    from eval.report import control_reading, control_rows  # as the audit command's own imports: not when `ksg` starts

    for name, curve in (report.get("training") or {}).get("releases", {}).items():
        if curve["rose_at_end"]:  # the values stay in the report (the data owner's side), not in a console log
            console.print(f"[yellow]{name}: its training loss rose again at the end: the model may have forgotten what it fit, so its audit figures may understate "
                          "what training can leak (see the report's training section)[/yellow]")
    canaries = report.get("canaries")
    if canaries:
        table = Table(title=f"canaries: {canaries['planted']} of {canaries['count']} planted x {canaries['repeats']} in {canaries['client']}")
        for column in ("release", "kind", "correct guesses", "eps lower bound", f"claimed eps (group of {canaries['group_size']})", "largest certifiable", "TPR at 1% FPR", "exposure planted / not"):
            table.add_column(column, justify="left" if column in ("release", "kind") else "right")
        for name, result in canaries["targets"].items():
            claimed = result["claimed"]["epsilon"]
            for kind, entry in result["kinds"].items():
                run, member = entry["one_run"], entry.get("membership")
                exposure = f"{entry['mean_exposure_planted']} / {entry['mean_exposure_not_planted']}" if "mean_exposure_planted" in entry else "-"
                bound = [f"{run['correct']}/{run['guesses']}{' in' if run.get('in_only') else ''}", f"{run['epsilon_lower_bound']:.3f}"] if run else ["n/a", "n/a"]
                tpr = "n/a" if not member else f"{member['tpr_at_1pct_fpr']:.3f}" + ("" if member["tpr_at_1pct_fpr_measurable"] else " (at 0 FPR)")
                table.add_row(name, kind, *bound, "n/a" if claimed is None else f"{claimed:.3f}", f"{run['largest_certifiable']:.3f}" if run else "n/a", tpr, exposure)
        output.print(table)
    mia = report.get("membership_inference")
    if mia:
        table = Table(title="membership inference: AUC / TPR at 1% FPR / TPR at 0.1% FPR")
        names = list(next(iter(mia.values()))["scores"])
        for column in ("model | client", "members/non", *names):
            table.add_column(column, justify="left" if column == "model | client" else "right")
        for key, entry in mia.items():
            table.add_row(key, f"{entry['members']}/{entry['non_members']}", *(f"{r['auc']:.3f} / {r['tpr_at_1pct_fpr']:.3f} / {r['tpr_at_0_1pct_fpr']:.3f}" for r in entry["scores"].values()))
        output.print(table)
    for client, overlap in report["synthetic_overlap"].items():
        copied = next(v for k, v in overlap.items() if k.startswith("with_a_private"))
        output.print(f"synthetic data of {client}: {overlap['synthetic']} records, {copied} sharing a long word span with its private data")
    pii = report["pii"]
    output.print(f"PII: {pii['private_pii_values']} values in the private data, {pii['replayed_in_synthetic']} replayed in the synthetic data")
    for name, entry in pii["models"].items():
        rate = entry.get("replay_rate")
        if rate and rate["tried"]:
            output.print(f"  {name}: {rate['hits']}/{rate['tried']} samples from public prompts write a private value the base model's did not "
                          f"(95% CI {rate['ci'][0]:.3f}-{rate['ci'][1]:.3f})")
        attacks = entry.get("attacks")
        if attacks:
            output.print(f"  {name}: " + ", ".join(f"{attack} {attacks[attack]['hits']}/{attacks[attack]['tried']} ({attacks[attack]['hits_not_by_base']} not by the base model)"
                                                   for attack in ("extraction", "reconstruction", "inference")))
    for name, control, reference in control_rows(pii):
        trained, held = control["trained"], control["held_out"]
        output.print(f"  held-out control, {name}: {trained['replayed']}/{trained['records']} trained records' values written, {held['replayed']}/{held['records']} held-out; "
                      f"difference {control['difference']:+.3f} (95% CI {control['difference_ci'][0]:+.3f} to {control['difference_ci'][1]:+.3f}): {control_reading(control, reference)}")


@app.command()
def models() -> None:
    """The offline model names and whether each is converted in the cache."""

    cache = cache_root()
    table = Table(title=f"models (cache: {cache})")
    for column in ("name", "kind", "cached", "install"):
        table.add_column(column)
    for name, entry in REGISTRY.items():
        table.add_row(name, entry.kind, "yes" if (cache / "models" / name / MARKER).is_file() else "no", entry.install)
    table.add_row(TINY, "causal-lm", "yes" if (cache / "models" / TINY / MARKER).is_file() else "no", "(built from a config, for tests)")
    output.print(table)


def command_named_in(argv: list[str]) -> str:
    """`ksg <command>` for the command argv names, else `ksg`: click's parser raises some errors
    (an option missing its value) before it has a context to say whose they are."""
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    return f"ksg {argv[0]}" if argv and argv[0] in commands else "ksg"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code. Known errors print as one line on stderr."""
    try:
        code = app(args=argv, prog_name="ksg", standalone_mode=False)
        # click 8.2 and later return an Abort's exit code (Ctrl-C: 130) rather than raise it: the run
        # had exited 0 on an interrupt, as if it had finished
        if code == 130:
            print("ksg: aborted", file=sys.stderr)
        if isinstance(code, int) and not isinstance(code, bool) and code != 0:
            return code
    except KsgError as err:
        print(f"ksg: error: {err}", file=sys.stderr)
        return err.exit_code
    except click.exceptions.Exit as err:
        return err.exit_code
    except click.exceptions.NoArgsIsHelpError as err:  # plain `ksg`: the help is the answer
        err.show()
        return err.exit_code
    except click.UsageError as err:
        # one line, as every other bad input: the command, what is wrong, where help is
        command = err.ctx.command_path if err.ctx is not None else command_named_in(sys.argv[1:] if argv is None else argv)
        # typer already puts its "Did you mean" into an unknown command's message; click's format would repeat it
        message = err.message if isinstance(err, click.exceptions.NoSuchCommand) else err.format_message()
        print(f"ksg: error: {command}: {message} (see {command} --help)", file=sys.stderr)
        return err.exit_code
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except click.exceptions.Abort:
        print("ksg: aborted", file=sys.stderr)
        return 130
    return 0


def entry() -> None:
    sys.exit(main())
