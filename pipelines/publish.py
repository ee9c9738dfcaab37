"""Stage `publish` (server): the run's releases as a user takes them away, each with its card.

- `final_adapter/`: the final federated adapter (PEFT files) and a model card (`README.md` in the
  Hugging Face format): base model, training data provenance, the stages that ran, the
  per-client privacy statement from the ledger (epsilon, delta, unit, N x delta, whom it holds
  against), and the evaluation table of an `evaluate` stage that ran before this one.
  With a `calibrate` stage before it, `label_prior.json` beside the adapter (and a section of the card).
- `synthetic_data/`: every client's synthetic pairs as a `datasets` directory
  (`datasets.load_from_disk`) with a dataset card carrying the same statement and the filter and
  refine statistics.

It reads server-side artifacts only, and the ledger copies the server holds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field

from eval.evaluate import LABEL_PRIOR
from knowledgesg.adapters import ADAPTER_FILES
from knowledgesg.cards import dataset_card, model_card
from knowledgesg.console import console
from knowledgesg.fileio import read_jsonl, write_dir, write_text
from knowledgesg.stage import Stage, StageContext
from knowledgesg.spec import StrictModel
from pipelines.fedtune import fedtune_params
from privacy.ledger import LedgerEntry

SYNTHETIC_FILES = {"refine": "refined.jsonl", "synthesize": "synthetic.jsonl"}


class PublishParams(StrictModel):
    synthetic_stage: Literal["refine", "synthesize"] = Field(default="refine", description="whose synthetic pairs are published")


class Publish(Stage):
    name = "publish"
    Params = PublishParams
    runs_on = "server"

    def requires(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(("prepare_models", "ingest", "synthesize", self.params.synthetic_stage, "fedtune")))

    def run(self, ctx: StageContext) -> None:
        clients = list(ctx.read_artifact_json("ingest", "partition.json")["clients"])
        releases = self.releases_by_client(ctx, clients)
        synthetic = self.publish_synthetic(ctx, clients, releases)
        self.publish_adapter(ctx, clients, releases, synthetic)
        console.print(f"publish: {ctx.path('final_adapter')} (model card) and {ctx.path('synthetic_data')} (datasets directory with its card)")

    def releases_by_client(self, ctx: StageContext, clients: list[str]) -> dict[str, list[LedgerEntry]]:
        """Every release of each client's data, as its ledger holds them (on the server, the copy
        the client sent) with this run's stage copies: a stage run again in this run replaces its
        copy, and an earlier run's adapter is out there too, so the card composes them all."""
        return {c: ctx.sent_ledger(c) for c in clients}

    def publish_adapter(self, ctx: StageContext, clients: list[str], releases: dict, synthetic: dict[str, int]) -> None:
        base = ctx.models()["base"]
        rounds = ctx.read_artifact_json("fedtune", "rounds.json")
        params = fedtune_params(ctx.spec)
        job = {"lora": params.lora.model_dump(), "rule": params.rule.model_dump(), "clients": clients, "rounds": len(rounds), "data": params.data}
        completed = ctx.completed_stages_before()
        results = ctx.read_artifact_json("evaluate", "results.json") if "evaluate" in completed else None
        prior = ctx.read_artifact_json("calibrate", LABEL_PRIOR) if "calibrate" in completed else None
        card = model_card(ctx.spec.name, base, job, synthetic, completed, releases, results, prior)

        shipped = {name: ctx.artifact("fedtune", f"adapter/{name}") for name in ADAPTER_FILES}
        if prior is not None:  # the calibrate stage's label prior travels with the adapter: `ksg eval --published` applies it
            shipped[LABEL_PRIOR] = ctx.artifact("calibrate", LABEL_PRIOR)

        def build(directory: Path) -> None:
            for name, source in shipped.items():
                shutil.copyfile(source, directory / name)
            write_text(directory / "README.md", card)

        write_dir(ctx.path("final_adapter"), build)
        for name in (*shipped, "README.md"):
            ctx.declare_output(f"final_adapter/{name}")

    def publish_synthetic(self, ctx: StageContext, clients: list[str], releases: dict) -> dict[str, int]:
        import datasets

        stage = self.params.synthetic_stage
        rows, counts, stats = [], {}, {}
        for client in clients:
            mine = read_jsonl(ctx.artifact(stage, f"clients/{client}/{SYNTHETIC_FILES[stage]}"))
            counts[client] = len(mine)
            stats[client] = ctx.read_artifact_json("synthesize", f"clients/{client}/filter_stats.json")
            rows += [{"id": r["id"], "client_id": client, "source": r["source"], "instruction": r["instruction"], "input": r["input"], "response": r["response"],
                      "provenance": json.dumps(r.get("provenance", {}), sort_keys=True)} for r in mine]
        summary = ctx.read_artifact_json("refine", "summary.json") if stage == "refine" else None
        card = dataset_card(ctx.spec.name, stage, counts, stats, summary, releases)

        def build(directory: Path) -> None:
            datasets.Dataset.from_list(rows).save_to_disk(str(directory))
            write_text(directory / "README.md", card)

        write_dir(ctx.path("synthetic_data"), build)
        for path in sorted(ctx.path("synthetic_data").iterdir()):
            ctx.declare_output(f"synthetic_data/{path.name}", records=len(rows) if path.suffix == ".arrow" else None)
        return counts
