"""Stage `evaluate`: benchmarks of the run's models, and fidelity of its synthetic data.

`results.json` holds accuracy and macro-F1 per model, task and answer mode (server side: public
test data, released models). `clients/<id>/fidelity.json` holds each client's fidelity and
diversity figures, computed against its private data, so it stays on that client's side.
"""

from __future__ import annotations

from eval.evaluate import EvalOptions, check_ready, evaluate_run, fidelity_run
from knowledgesg.console import console
from knowledgesg.stage import Stage, StageContext


class Evaluate(Stage):
    name = "evaluate"
    Params = EvalOptions

    def requires(self) -> tuple[str, ...]:
        return ("prepare_models", "ingest")

    def run(self, ctx: StageContext) -> None:
        from knowledgesg.models import resolve_device

        options: EvalOptions = self.params
        check_ready(ctx.run_dir)
        device = resolve_device(ctx.spec.models.device)
        results = evaluate_run(ctx.run_dir, options, device)
        ctx.write_json("results.json", results)
        for name, entry in results["models"].items():
            console.print(f"evaluate {name}: mean accuracy {entry['mean_accuracy']}")
        if options.fidelity:
            for client, report in fidelity_run(ctx.run_dir, options.seed, device).items():
                ctx.write_json(f"clients/{client}/fidelity.json", report, side=f"client:{client}")
