"""Stage `evaluate`: benchmarks of the run's models, and fidelity of its synthetic data.

`results.json` holds accuracy and macro-F1 per model, task and answer mode (server side: public
test data, released models). Test files of the user's own (`tasks`, relative to the spec) are
scored the same two ways. `clients/<id>/fidelity.json` holds each client's fidelity and diversity
figures and `clients/<id>/private_eval.json` its scores on its private test set
(`private_tasks`): statistics of private data, so they stay on that client's side.
"""

from __future__ import annotations

from pathlib import Path

from eval.benchmarks import task_source
from eval.evaluate import (EvalOptions, check_ready, check_task_files, evaluate_private, evaluate_run, fidelity_run, private_task_files, refuse_private_data_as_public_tasks,
                           public_task_files)
from knowledgesg.console import console
from knowledgesg.errors import SpecError
from knowledgesg.loaders import source_path
from knowledgesg.models import resolve_device
from knowledgesg.spec import PipelineSpec
from knowledgesg.stage import Stage, StageContext
from pipelines.ingest import client_ids


class Evaluate(Stage):
    name = "evaluate"
    Params = EvalOptions
    # keyed digests of its external inputs (the user's own test files, a client's private test
    # set), so a manifest cannot confirm a guess of them
    private_inputs = True

    def requires(self) -> tuple[str, ...]:
        return ("prepare_models", "ingest")

    def side(self) -> str:
        return "server"  # public benchmarks; a client's private test set and fidelity stay on its side

    def external_inputs(self, spec: PipelineSpec, base_dir: Path) -> list[Path]:
        return [source_path(task_source(f), base_dir) for f in public_task_files(self.params)]

    def client_side_inputs(self, spec: PipelineSpec, base_dir: Path) -> list[Path]:
        return [source_path(task_source(f), base_dir) for f in private_task_files(self.params)]

    def preflight(self, spec: PipelineSpec, base_dir: Path) -> None:
        """What every party that runs the stage can check (the server of a split run included):
        the public test files and the spec; a private test set is preflight_private's."""
        options: EvalOptions = self.params
        check_task_files(options, base_dir, public_task_files(options))
        refuse_private_data_as_public_tasks(options, spec.clients.sources(), base_dir, base_dir, "evaluate params.tasks")
        if "professional" in options.models and spec.models.professional is None:
            raise SpecError("evaluate params.models: lists 'professional' but the spec names no models.professional")
        if options.private_tasks:  # before the run starts, not after every public benchmark was scored
            clients = client_ids(spec, base_dir)  # with members (any split run), the spec's names alone
            unknown = [c for c in options.private_tasks if c not in clients]
            if unknown:
                raise SpecError(f"evaluate params.private_tasks: no client '{unknown[0]}' in the spec (clients: {', '.join(clients)})")

    def preflight_private(self, spec: PipelineSpec, base_dir: Path) -> None:
        """Each client's private test set, read where the clients' data is (the simulation, `ksg
        check`), never by the server of a split run: it does not hold them, and must not read them."""
        options: EvalOptions = self.params
        check_task_files(options, base_dir, private_task_files(options))

    def run(self, ctx: StageContext) -> None:
        options: EvalOptions = self.params
        check_ready(ctx.run_dir)
        device = resolve_device(ctx.spec.models.device)
        results = evaluate_run(ctx.run_dir, options, device, ctx.base_dir, stages_before=ctx.completed_stages_before())
        ctx.write_json("results.json", results)
        for name, entry in results["models"].items():
            console.print(f"evaluate {name}: mean accuracy {entry['mean_accuracy']}")
        if ctx.role == "server":
            if options.private_tasks or options.fidelity:
                console.print("evaluate: private test sets and fidelity need each client's data; with --role server only the public benchmarks run")
            return
        for client, report in evaluate_private(ctx.run_dir, options, device, ctx.base_dir, stages_before=ctx.completed_stages_before()).items():
            ctx.write_json(f"clients/{client}/private_eval.json", report, side=f"client:{client}")
            console.print(f"evaluate {client}: its private test set scored, in clients/{client}/private_eval.json (its side; a console may be a log the server holds)")
        if options.fidelity:
            for client, report in fidelity_run(ctx.run_dir, options.seed, device).items():
                ctx.write_json(f"clients/{client}/fidelity.json", report, side=f"client:{client}")
