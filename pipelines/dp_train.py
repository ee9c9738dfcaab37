"""Stage `dp_train` (runs on each client): LoRA fine-tuning with DP-SGD on the client's records.

Per client, it releases only the adapter. `privacy.json` says at what cost: the mechanism
actually run (sampling rate, noise, steps as counted by the accountant), epsilon by PRV, RDP and
PLD, the unit of privacy, where the noise came from, and whom it protects against. The Poisson
coins and the noise are drawn on the client from OS entropy for every release (a rerun is a new
release with new noise), and the release is entered in the client's ledger before the adapter
is published. The loss curve is computed on private data without noise, so it stays on the
client. `privacy.target_epsilon: .inf` trains the non-private reference through the same code
(no noise, no clipping), marked NOT PRIVATE everywhere.

On structured data (`source_stage: structure`) the pairs made from one document are one unit
("source document"), each contributing at most `max_records_per_user` pairs.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from eval.canaries import unplanted_canary_units
from knowledgesg.adapters import ADAPTER_FILES, ADAPTER_WEIGHTS, save_adapter, with_lora
from knowledgesg.console import console, progress_bar
from knowledgesg.errors import InputError, KsgError, SpecError
from knowledgesg.fileio import read_jsonl, sha256_file
from knowledgesg.models import Precision, ResolvedModel, load_causal_lm, resolve_device, resolve_precision
from knowledgesg.records import InstructionRecord, TextRecord
from knowledgesg.spec import PipelineSpec, StrictModel
from knowledgesg.stage import Stage, StageContext
from pipelines.ingest import client_records, planning_records, training_records
from privacy.accounting import NOISE_MULTIPLIER_RANGE, Mechanism, RunningEpsilon, calibrate_noise, check_delta, default_delta, epsilons
from privacy.count import ReleasedCount, released_size
from privacy.ledger import LEDGER, LedgerEntry, check_budget, new_release_id, now, published_release, trust_line
from privacy.units import UNIT_NAMES, Units, privacy_units

NOT_PRIVATE = "NOT PRIVATE"
NOISE_SOURCES = {
    "os_entropy": "AES-256-CTR keyed with 32 bytes of OS entropy drawn on the client for this release (never stored or sent)",
    "reproducible": "AES-256-CTR keyed from the public spec seed (privacy.reproducible_noise): anyone with the spec can regenerate it",
    "none": "none: the non-private reference",
}


class DPTrainParams(StrictModel):
    epochs: float = Field(default=1.0, gt=0, le=1000)
    batch_size: int = Field(default=8, ge=1, description="expected Poisson batch, in privacy units")
    max_physical_batch: int = Field(default=8, ge=1, description="rows per forward pass (virtual steps beyond)")
    max_length: int = Field(default=128, ge=16)
    learning_rate: float = Field(default=2e-3, gt=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    clip_norm: float = Field(default=1.0, gt=0)
    noise_multiplier: float | None = Field(default=None, **NOISE_MULTIPLIER_RANGE, description="default: calibrated to privacy.target_epsilon")
    lora_r: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    max_records_per_user: int = Field(default=8, ge=1, description="records one user (or source document) contributes")
    loss_on: Literal["response", "all"] = Field(default="response", description="'all' also learns the user turn, needed to synthesize inputs")
    source_stage: Literal["ingest", "structure"] = Field(default="ingest", description="the stage whose client records are trained on")
    precision: Precision = Field(
        default="float32", description="the frozen base weights (bfloat16 matmuls run 2-3x faster on a CPU with AVX512-BF16; auto: bfloat16 where native). "
        "The adapter, its per-unit gradients, their clipping and the noise stay float32 either way, so the sensitivity bound is exact")


@dataclass
class ClientPlan:
    client_id: str
    records: list[InstructionRecord]
    units: Units  # the actual units, each flipping its coin at sample_rate
    num_units: int  # the N planned with: the client's noised count, or its exact N where that is public
    count_noise: float | None  # the noised count's sigma; None: N treated as public
    delta: float
    sample_rate: float
    steps: int
    noise_multiplier: float
    clip_norm: float
    calibrated_by: str
    noise_origin: str  # os_entropy | reproducible | none (the non-private reference)

    @property
    def noised(self) -> bool:
        return self.noise_origin != "none"

    @property
    def private(self) -> bool:
        """A guarantee against the threat model: noise, and noise nobody else can regenerate."""
        return self.noise_origin == "os_entropy"

    @property
    def label(self) -> str:
        if self.private:
            return "DP"
        return NOT_PRIVATE if not self.noised else f"{NOT_PRIVATE} (reproducible noise)"

    @property
    def size_text(self) -> str:
        return f"N = {self.num_units} (noised count)" if self.count_noise is not None else f"N = {self.num_units} (public)"

    @property
    def size_assumption(self) -> str:
        if self.count_noise is not None:
            return (f"N = {self.num_units} is the client's noised count of its units (Gaussian, sigma {self.count_noise:g}, a release in its ledger), "
                    "less the audit's holdout and plus its canaries; the exact N is not published")
        return (f"N = {self.num_units} is treated as public (privacy.count_noise: 0; with every canary the audit makes, planted or not): it sets the sampling rate, and against an adversary "
                "holding every other record it tells whether the last one is in")

    def mechanism(self) -> Mechanism:
        if not self.noised:
            return Mechanism(kind="non_private", steps=self.steps)
        return Mechanism(kind="poisson_gaussian", noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=self.steps)


def published_adapter(client_id: str) -> str:
    """Where dp_train publishes a client's adapter weights, in its stage directory."""
    return f"clients/{client_id}/adapter/{ADAPTER_WEIGHTS}"


def unit_outputs(client_dir: str) -> list[str]:
    """A client's files that its unit marker restores on a resume."""
    return [f"{client_dir}/adapter/{name}" for name in ADAPTER_FILES] + [f"{client_dir}/{name}" for name in ("privacy.json", "loss.json", "training.json")]


class DPTrain(Stage):
    name = "dp_train"
    Params = DPTrainParams
    uses = ("privacy",)

    def requires(self) -> tuple[str, ...]:
        return ("prepare_models", "ingest") + (("structure",) if self.params.source_stage == "structure" else ())

    def releases(self) -> bool:
        return True

    def preflight(self, spec: PipelineSpec, base_dir: Path) -> None:
        """Every client's plan before the run starts, as `ksg check` shows it: too few records for
        the batch, a delta too large, a budget no noise reaches are refused before anything runs.
        Not where N is noised: the plan is made from the count ingest releases, and a refusal made
        here from the exact N would publish a function of it (whether the run went on)."""
        if spec.privacy.count_noise:
            return
        for client_id, records in client_records(spec, base_dir).items():
            trained = training_records(spec, client_id, records)
            self.plan(spec, client_id, planning_records(trained) if self.params.source_stage == "structure" else [r for r in trained if isinstance(r, InstructionRecord)])

    def documents(self, spec: PipelineSpec, client_id: str) -> bool:
        """Whether the unit is the source document, as the spec says: trained on structure's pairs
        (whether or not a document gave one), or on records the spec says come from documents."""
        return self.params.source_stage == "structure" or spec.clients.holds_documents(client_id)

    def plan(self, spec: PipelineSpec, client_id: str, records: list[InstructionRecord], count: ReleasedCount | None = None,
             public_units: int | None = None) -> ClientPlan:
        """The mechanism one client will run: units, delta, sampling rate, steps and the calibrated
        noise (also what `ksg check` shows before anything runs). `count`: the client's released
        noised count, which q, the steps and delta are planned from (None: its exact N, public or
        the owner's own check before the count exists; the audit's canaries that were not planted
        are added to it, so that N counts every canary either way). `public_units`: that exact N
        where `records` (structure's pairs) are not what it counts."""
        p: DPTrainParams = self.params
        privacy = spec.privacy
        units = privacy_units(records, privacy.unit, p.max_records_per_user, self.documents(spec, client_id))
        n, name = units.count if public_units is None else public_units, UNIT_NAMES[units.kind]
        if count is None and (n < 2 or p.batch_size >= n):
            raise SpecError(f"dp_train params.batch_size: {p.batch_size}, not below the {n} {name}{'s' if n != 1 else ''} of client '{client_id}' (it needs more {name}s than the batch)")
        if count is None:
            n += unplanted_canary_units(spec, client_id)
        else:  # every decision from the count alone: Poisson sampling at q = B/N̂ is DP over the units there are, however many
            n = count.planned
            if p.batch_size >= n:
                raise SpecError(f"dp_train params.batch_size: {p.batch_size}, not below N = {n}, planned from the released count of {name}s of client '{client_id}' "
                                "(q = B/N must be below 1; a count is never drawn again for the same data): lower batch_size")
        sigma_n = count.noise_multiplier if count is not None else None
        delta = privacy.delta if privacy.delta is not None else default_delta(n)
        check_delta(delta, n, name, client_id)
        sample_rate = p.batch_size / n
        steps = max(1, math.ceil(p.epochs / sample_rate))
        if math.isinf(privacy.target_epsilon):
            return ClientPlan(client_id, records, units, n, sigma_n, delta, sample_rate, steps, 0.0, math.inf, "none", noise_origin="none")
        if p.noise_multiplier is not None:
            sigma, by = p.noise_multiplier, "given"
        else:
            try:
                sigma, by = calibrate_noise(privacy.target_epsilon, delta, sample_rate, steps)
            except InputError as err:
                raise InputError(f"client '{client_id}': {err}") from None
        return ClientPlan(client_id, records, units, n, sigma_n, delta, sample_rate, steps, sigma, p.clip_norm, by,
                          noise_origin="reproducible" if privacy.reproducible_noise else "os_entropy")

    def run(self, ctx: StageContext) -> None:
        partition = ctx.read_artifact_json("ingest", "partition.json")
        plans = []
        for client_id in partition["clients"]:
            rows = read_jsonl(ctx.artifact(self.params.source_stage, f"clients/{client_id}/records.jsonl"))
            records = [InstructionRecord.model_validate(r) for r in rows if r["kind"] == "instruction"]
            plan = self.plan(ctx.spec, client_id, records, released_size(partition, client_id), public_units=self.ingested_units(ctx, client_id))
            # Every client's budget, over everything ever released from its data, is checked
            # before any client trains: a refusal leaves nothing. A client released before a
            # crash is in its ledger already (its release is reused, not made again).
            planned = [] if ctx.unit_done(client_id) or self.published_unmarked(ctx, plan) else [plan.mechanism()]
            check_budget(ctx.spent(client_id), client_id, planned, plan.delta, ctx.spec.privacy.cap_epsilon, self.name, plan.units.kind)
            plans.append(plan)
        models = ctx.models()
        ledger = []
        for plan in plans:
            done = ctx.completed_unit(plan.client_id)  # released before a crash: reused, never redrawn
            if done:
                entry = LedgerEntry.model_validate(done)
            else:
                published = self.published_unmarked(ctx, plan)
                entry = self.finish_client(ctx, plan, published, models["base"]) if published else self.train_client(ctx, plan, models["base"])
            ledger.append(entry)
        ctx.write_json(LEDGER, [entry.model_dump(mode="json") for entry in ledger])

    def ingested_units(self, ctx: StageContext, client_id: str) -> int | None:
        """Where N is public and dp_train trains on structure's pairs: the units of the records ingest
        left, each document one, as the preflight and `ksg check` plan. Counted from the pairs, N
        would leave out the documents that gave none, and how many did is a function of what they
        say (q, the steps, delta and whether the run goes on would state it). None otherwise."""
        if self.params.source_stage != "structure" or ctx.spec.privacy.count_noise:
            return None
        rows = read_jsonl(ctx.artifact("ingest", f"clients/{client_id}/records.jsonl"))
        ingested = [TextRecord.model_validate(r) if r["kind"] == "text" else InstructionRecord.model_validate(r) for r in rows]
        return privacy_units(planning_records(ingested), ctx.spec.privacy.unit, self.params.max_records_per_user, documents=True).count

    def released_part(self, stage_dir: Path) -> list[str]:
        """Its finished units, and the clients whose adapter it published before the process
        stopped (their ledger entries fsynced first): a refusal must not wipe what the resume adopts."""
        published = [p.parent.parent.name for p in sorted(stage_dir.glob(published_adapter("*")))]
        return sorted(set(super().released_part(stage_dir)) | set(published))

    def published_unmarked(self, ctx: StageContext, plan: ClientPlan) -> LedgerEntry | None:
        """The ledger entry of an adapter this run published for the client (entered and fsynced
        first) by a process killed before it marked the client done: that release, to be adopted,
        not drawn again (a second release of the same data, counted, but never asked for)."""
        return published_release(ctx.path(published_adapter(plan.client_id)), ctx.client_ledger(plan.client_id), plan.client_id, self.name, "dp_adapter")

    def finish_client(self, ctx: StageContext, plan: ClientPlan, entry: LedgerEntry, base: dict) -> LedgerEntry:
        """What train_client does after the adapter is published, for one found published."""
        client_dir, side = f"clients/{plan.client_id}", f"client:{plan.client_id}"
        for name in ADAPTER_FILES:
            ctx.declare_output(f"{client_dir}/adapter/{name}")
        for name in ("loss.json", "training.json"):  # written before the adapter was published
            ctx.declare_output(f"{client_dir}/{name}", side=side)
        ctx.write_json(f"{client_dir}/privacy.json", self.privacy_record(ctx, plan, entry, base))
        console.print(f"dp_train {plan.client_id}: its adapter was published before the process stopped: that release kept, not drawn again")
        ctx.mark_unit_done(plan.client_id, unit_outputs(client_dir), entry.model_dump(mode="json"))
        return entry

    def train_client(self, ctx: StageContext, plan: ClientPlan, base: dict) -> LedgerEntry:
        import torch

        from knowledgesg.sft import make_optimizer, tokenize_example, unit_batch, unit_loss_on, unit_widths  # imports torch and opacus: not when `ksg` starts
        from privacy.dp_sgd import DPSGD, DPSGDSettings, micro_batches, poisson_batches

        p: DPTrainParams = self.params
        torch.manual_seed(ctx.derive_seed(plan.client_id, "init"))
        device = resolve_device(ctx.spec.models.device)
        # frozen weights only: peft makes the adapter float32 over a bfloat16 base (and DPSGD
        # refuses anything else), so hidden states pass in bfloat16 and gradients are clipped in float32
        dtype = resolve_precision(p.precision, device)
        model, tokenizer = load_causal_lm(ResolvedModel(**base), device, dtype, training=True)
        model = with_lora(model, p.lora_r, p.lora_alpha, p.target_modules, "dp_train params.target_modules")
        model.train()
        examples = [tokenize_example(tokenizer, record, p.max_length, p.loss_on) for record in plan.records]
        units, rows_per_unit = plan.units.members, plan.units.rows_per_unit
        widths = unit_widths(examples, units)

        coins = ctx.release_random(plan.client_id, "sampler")  # OS entropy, fresh for this release
        settings = DPSGDSettings(plan.noise_multiplier, plan.clip_norm, plan.sample_rate, p.batch_size)
        dp = DPSGD(model, make_optimizer(p.optimizer, p.learning_rate), settings, ctx.release_random(plan.client_id, "noise"))
        unit_loss = unit_loss_on(device)

        lora_before = {n: t.detach().clone() for n, t in model.named_parameters() if t.requires_grad}
        losses, checked = [], False
        label = "" if plan.private else f" [{plan.label}]"
        running = RunningEpsilon(plan.noise_multiplier, plan.sample_rate, plan.delta) if plan.noised else None
        with progress_bar() as bar, contextlib.closing(dp):  # closed: the model is saved unwrapped, its kept memory handed back
            task = bar.add_task(f"dp_train {plan.client_id}{label}", total=plan.steps)
            for step, chosen in enumerate(poisson_batches(len(units), plan.sample_rate, plan.steps, coins)):
                loss = dp.step([unit_batch(examples, units, mb, tokenizer.pad_token_id) for mb in micro_batches(chosen, rows_per_unit, widths, p.max_physical_batch)], unit_loss)
                losses.append({"step": step + 1, "units": len(chosen), "loss": None if loss is None else round(loss, 6)})
                # once, after the first step that must move the adapter: with noise, any step; without
                # (NOT PRIVATE), the first whose Poisson sample was not empty (two empty ones in a row
                # happen, and failed the check now and then)
                if not checked and (plan.noised or loss is not None):
                    self._check_adapter_moved(model, lora_before)
                    checked = True
                spent = f" epsilon {running(step + 1):.2f} (RDP)" if running else ""
                bar.update(task, advance=1, description=f"dp_train {plan.client_id}{label}{spent}")
        history = dp.accounted_history()
        if plan.noised and (len(history) != 1 or history[0][2] != plan.steps):
            raise KsgError(f"client '{plan.client_id}': the accountant counted {history} but {plan.steps} steps ran; refusing to report an epsilon")
        return self._save(ctx, plan, model, losses, base, dtype)

    @staticmethod
    def _check_adapter_moved(model, before: dict) -> None:
        moved = any(not bool((t.detach() == before[n]).all()) for n, t in model.named_parameters() if t.requires_grad)
        if not moved:
            raise KsgError("the LoRA weights did not change after the first DP-SGD step (optimizer not bound to the adapter's parameters)")

    def _save(self, ctx: StageContext, plan: ClientPlan, model, losses: list[dict], base: dict, dtype: str) -> LedgerEntry:
        client_dir = f"clients/{plan.client_id}"
        ctx.write_json(f"{client_dir}/loss.json", losses, side=f"client:{plan.client_id}")
        ctx.write_json(f"{client_dir}/training.json", {"dtype": dtype}, side=f"client:{plan.client_id}")
        mechanism = plan.mechanism()
        eps = epsilons([mechanism], plan.delta)
        released: list[LedgerEntry] = []

        def record_release(directory: Path) -> None:
            # entered in the client's ledger (fsynced) before the adapter is renamed into the outputs
            entry = LedgerEntry(
                release_id=new_release_id(), client_id=plan.client_id, stage=self.name, release="dp_adapter",
                artifact=f"stages/{self.name}/{client_dir}/adapter/{ADAPTER_WEIGHTS}",
                artifact_sha256=sha256_file(directory / ADAPTER_WEIGHTS), run_dir=str(ctx.run_dir.resolve()), released_at=now(),
                unit=plan.units.kind, num_units=plan.num_units, delta=plan.delta, mechanism=mechanism, epsilon=eps,
                private=plan.private, noise=plan.noise_origin, trust=trust_line(plan.noise_origin, mechanism),
            )
            ctx.record_release(entry)
            released.append(entry)

        save_adapter(model, base["name"], ctx.path(f"{client_dir}/adapter"), before_publish=record_release)
        entry = released[0]
        for name in ADAPTER_FILES:
            ctx.declare_output(f"{client_dir}/adapter/{name}")
        ctx.write_json(f"{client_dir}/privacy.json", self.privacy_record(ctx, plan, entry, base))
        shown = f"epsilon {eps.reported:.3f} ({eps.reported_by}) at delta {plan.delta:.2e}" if plan.private else plan.label
        # the loss is an un-noised figure of the private data: it stays in loss.json (client side), not in a log a server may hold
        console.print(f"dp_train {plan.client_id}: {plan.steps} steps, sigma {plan.noise_multiplier:.3f}, q {plan.sample_rate:.4f}, "
                      f"{plan.size_text} ({UNIT_NAMES[plan.units.kind]} level), {shown}")
        ctx.mark_unit_done(plan.client_id, unit_outputs(client_dir), entry.model_dump(mode="json"))
        return entry

    def privacy_record(self, ctx: StageContext, plan: ClientPlan, entry: LedgerEntry, base: dict) -> dict:
        """The release's statement, sent with the adapter: the mechanism and its accounting only.
        What the secret Poisson sample did (how many units each step drew, how many steps drew
        none: their odds move with whether a given unit is in the data) stays in loss.json."""
        units = plan.units
        return {
            "client_id": plan.client_id,
            "private": plan.private,
            "label": plan.label,
            "unit": units.kind,
            "num_units": plan.num_units,
            "count": {"noised": plan.count_noise is not None, "noise_multiplier": plan.count_noise or 0.0},
            "max_records_per_unit": units.max_records,
            "delta": plan.delta,
            "n_times_delta": plan.num_units * plan.delta,
            "target_epsilon": ctx.spec.privacy.target_epsilon,
            "mechanism": entry.mechanism.model_dump(),
            "clip_norm": plan.clip_norm,
            "expected_batch_units": self.params.batch_size,
            "epochs": self.params.epochs,
            "calibrated_by": plan.calibrated_by,
            "epsilon": entry.epsilon.model_dump(),
            "noise": NOISE_SOURCES[plan.noise_origin],
            "trust": entry.trust,
            "release_id": entry.release_id,
            "assumptions": [f"Poisson sampling: each {UNIT_NAMES[units.kind]} joins each step with probability {plan.sample_rate:.4g}",
                            f"unit of privacy: {UNIT_NAMES[units.kind]}, at most {units.max_records} record(s) each",
                            plan.size_assumption],
            # not the dtype it trained in: that tells the server whether the client's CPU has native bfloat16
            "base_model": {"name": base["name"], "weights_sha256": base["weights_sha256"]},
            "adapter_sha256": entry.artifact_sha256,
        }
