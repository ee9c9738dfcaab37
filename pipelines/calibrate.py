"""Stage `calibrate` (server): the final adapter's label prior, fitted to the synthetic pairs it was tuned on
(not to the public records fedtune may deal in beside them: the prior is meant to carry the label
shares the DP models wrote).

A model tuned on a few hundred pairs over a handful of labels (sentiment: negative, neutral,
positive) drifts in how often it gives each label: replicates of the same final tuning differ
mostly there (benchmarks/results/finance_headline.md, prior_calibration.md). This stage scores
the final adapter on the inputs of the synthetic pairs `fedtune` read and fits, per label,

    b = log(share) - log(mean p)

share the pairs' share of the label, mean p the model's mean probability of it on their inputs
(`eval.benchmarks.fit_label_prior`). `evaluate` adds b to each label's log-probability when it
scores the final adapter on a task whose choices are these labels (`logprob_calibrated`, beside
the raw answer), and `publish` ships `label_prior.json` beside the adapter.

Its inputs are the synthetic pairs (post-processing of the DP adapters: no privacy cost) and the
final adapter, both on the server; it never reads a private record, so fedtune on private data
(`data: private`) cannot be calibrated this way and is refused before anything runs.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from eval.audit import load_target
from eval.benchmarks import MAX_LABELS, Item, choice_logprobs, fit_label_prior
from eval.evaluate import LABEL_PRIOR
from knowledgesg.adapters import ADAPTER_WEIGHTS
from knowledgesg.console import console
from knowledgesg.errors import KsgError, SpecError
from knowledgesg.fileio import read_jsonl, sha256_file
from knowledgesg.models import Precision, resolve_device, resolve_precision
from knowledgesg.prompts import label_named, user_message
from knowledgesg.records import InstructionRecord
from knowledgesg.spec import PipelineSpec, StrictModel
from knowledgesg.stage import Stage, StageContext
from pipelines.fedtune import fedtune_params
from pipelines.publish import SYNTHETIC_FILES
from pipelines.synthesize import SynthesizeParams


class CalibrateParams(StrictModel):
    labels: list[str] | None = Field(default=None, min_length=2, max_length=MAX_LABELS,
                                     description="the answers to calibrate (default: the pairs' distinct responses, 2 to 20 of them); pairs answering otherwise are left out")
    batch_size: int = Field(default=8, ge=1)
    precision: Precision = Field(default="float32", description="weights while scoring (as evaluate's default: the adapter is merged in float32)")

    @field_validator("labels")
    @classmethod
    def _each_label_once(cls, labels: list[str] | None) -> list[str] | None:
        if labels is not None and len({label.strip().lower() for label in labels}) != len(labels):
            raise ValueError("a label is named twice")
        return labels


def labelled_items(rows: list[dict], labels: list[str] | None) -> tuple[list[Item], list[str], int]:
    """The pairs as scoring items over `labels` (default: their distinct responses), the labels,
    and how many pairs answer with none of them."""
    records = [InstructionRecord.model_validate({k: v for k, v in row.items() if k in InstructionRecord.model_fields}) for row in rows]  # provenance aside
    if labels is None:
        labels = sorted({r.response.strip().lower() for r in records})
        if not 2 <= len(labels) <= MAX_LABELS:
            raise KsgError(f"calibrate: the synthetic pairs give {len(labels)} distinct responses; a label prior needs 2 to {MAX_LABELS} "
                           "(free-text answers have none: leave the stage out, or name params.labels)")
    named = [(r, label_named(r.response, labels)) for r in records]
    items = [Item(user_message(r), list(labels), labels.index(label)) for r, label in named if label is not None]
    return items, list(labels), len(records) - len(items)


class Calibrate(Stage):
    name = "calibrate"
    Params = CalibrateParams
    runs_on = "server"

    def requires(self) -> tuple[str, ...]:
        return ("prepare_models", "ingest", "fedtune")

    def preflight(self, spec: PipelineSpec, base_dir: Path) -> None:
        if fedtune_params(spec).data != "synthetic":
            raise SpecError("fedtune params.data: private, but calibrate fits its label prior to synthetic pairs "
                          "(private labels would need noise): leave calibrate out")
        synthesize = next((stage for stage in spec.stages if stage.name == "synthesize"), None)
        written = SynthesizeParams.model_validate(synthesize.params).labels if synthesize is not None else None
        if self.params.labels and written and sorted(label.strip().lower() for label in self.params.labels) != sorted(label.strip().lower() for label in written):
            # the pairs answer with synthesize's labels: with others the prior counts some labels as
            # never given and all but forbids them (it had only warned)
            raise SpecError(f"calibrate params.labels: {', '.join(self.params.labels)} are not the labels synthesize writes ({', '.join(written)}); "
                            "name the same labels, or leave params.labels out to read them off the pairs")

    def run(self, ctx: StageContext) -> None:
        p: CalibrateParams = self.params
        stage = fedtune_params(ctx.spec).synthetic_stage
        clients = list(ctx.read_artifact_json("ingest", "partition.json")["clients"])
        rows = [row for client in clients for row in read_jsonl(ctx.artifact(stage, f"clients/{client}/{SYNTHETIC_FILES[stage]}"))]
        items, labels, skipped = labelled_items(rows, p.labels)
        if not items:
            raise KsgError(f"calibrate: none of the {len(rows)} {stage} pairs answers with one of {', '.join(labels)}")
        device = resolve_device(ctx.spec.models.device)
        adapter = ctx.artifact("fedtune", "adapter/adapter_config.json").parent
        model, tokenizer = load_target(ctx.models()["base"], adapter, device, resolve_precision(p.precision, device))
        scores = choice_logprobs(model, tokenizer, items, p.batch_size, device)
        prior = fit_label_prior(scores, [item.answer for item in items], labels).model_copy(update={"adapter_sha256": sha256_file(adapter / ADAPTER_WEIGHTS)})
        ctx.write_json(LABEL_PRIOR, prior.model_dump())
        shown = ", ".join(f"{label} {share:.0%} (model {mean:.0%}, bias {bias:+.2f})" for label, share, mean, bias in zip(labels, prior.shares, prior.model_mean, prior.bias))
        console.print(f"calibrate: the final adapter on {len(items)} {stage} pairs" + (f" ({skipped} answering with none of the labels left out)" if skipped else "")
                      + f": {shown}")
        for label, share, bias in zip(labels, prior.shares, prior.bias):
            if share == 0:  # only with `labels` given: labels read off the pairs all occur
                ctx.warn(f"label {label!r} answers none of the {len(items)} {stage} pairs, so the label prior all but forbids it (bias {bias:+.1f} nats)"
                         + ("; refine's summary.json counts the labels it was given and kept" if stage == "refine" else ""))
