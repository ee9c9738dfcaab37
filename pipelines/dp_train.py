"""Stage `dp_train` (runs on each client): LoRA fine-tuning with DP-SGD on the client's records.

Per client, it releases only the adapter. `privacy.json` says at what cost: the mechanism
actually run (sampling rate, noise, steps as counted by the accountant), epsilon by PRV, RDP and
PLD, and the assumptions. The loss curve is computed on private data without noise, so it stays
on the client. `privacy.target_epsilon: .inf` trains the non-private reference through the same
code (no noise, no clipping), marked NOT PRIVATE everywhere.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from knowledgesg.console import console, progress_bar
from knowledgesg.errors import InputError, KsgError
from knowledgesg.fileio import read_jsonl, sha256_file, write_dir, write_json
from knowledgesg.records import InstructionRecord
from knowledgesg.stage import Stage, StageContext
from privacy.accounting import Mechanism, calibrate_noise, check_delta, default_delta, epsilons
from privacy.ledger import LEDGER, LedgerEntry, check_budget, read_ledger

NOT_PRIVATE = "NOT PRIVATE"
NOISE_SOURCE = "torch.Generator (Mersenne Twister): seeded and reproducible, not cryptographically secure"


class DPTrainParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: float = Field(default=1.0, gt=0)
    batch_size: int = Field(default=8, ge=1, description="expected Poisson batch, in privacy units")
    max_physical_batch: int = Field(default=8, ge=1, description="rows per forward pass (virtual steps beyond)")
    max_length: int = Field(default=128, ge=16)
    learning_rate: float = Field(default=2e-3, gt=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    clip_norm: float = Field(default=1.0, gt=0)
    noise_multiplier: float | None = Field(default=None, gt=0, description="default: calibrated to privacy.target_epsilon")
    lora_r: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    max_records_per_user: int = Field(default=8, ge=1, description="user-level privacy: records a user contributes")
    loss_on: Literal["response", "all"] = Field(default="response", description="'all' also learns the user turn, needed to synthesize inputs")
    source_stage: Literal["ingest", "structure"] = Field(default="ingest", description="the stage whose client records are trained on")


@dataclass
class ClientPlan:
    client_id: str
    records: list[InstructionRecord]
    units: list[list[int]]  # record indices of each privacy unit
    delta: float
    sample_rate: float
    steps: int
    noise_multiplier: float
    clip_norm: float
    calibrated_by: str
    private: bool

    def mechanism(self) -> Mechanism:
        if not self.private:
            return Mechanism(kind="non_private", steps=self.steps)
        return Mechanism(kind="poisson_gaussian", noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=self.steps)


def canonical_adapter_config(path: Path) -> None:
    """PEFT writes target_modules from a set, in an order that changes with PYTHONHASHSEED; the
    same training must give the same bytes, so sort it (PEFT reads either order)."""
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    write_json(path, config)


def save_adapter(model, target: Path) -> None:
    """The PEFT adapter alone (no model card: peft's template is not ours to release), written whole."""

    def build(directory: Path) -> None:
        model.save_pretrained(directory)
        (directory / "README.md").unlink(missing_ok=True)
        canonical_adapter_config(directory / "adapter_config.json")

    write_dir(target, build)


def group_units(records: list[InstructionRecord], unit: str, max_per_user: int) -> list[list[int]]:
    if unit == "record":
        return [[i] for i in range(len(records))]
    by_user: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        if record.user_id is None:
            raise InputError(f"privacy.unit is 'user' but record '{record.id}' has no user_id (map one with fields: {{user_id: ...}})")
        by_user[record.user_id].append(index)
    # a user beyond the cap contributes their first records only: bounded contribution is what
    # makes the per-user sensitivity finite
    return [indices[:max_per_user] for _, indices in sorted(by_user.items())]


class DPTrain(Stage):
    name = "dp_train"
    Params = DPTrainParams
    uses = ("privacy",)

    def plan(self, ctx: StageContext, client_id: str, records: list[InstructionRecord]) -> ClientPlan:
        p: DPTrainParams = self.params
        privacy = ctx.spec.privacy
        units = group_units(records, privacy.unit, p.max_records_per_user)
        n = len(units)
        if n < 2 or p.batch_size >= n:
            raise InputError(f"client '{client_id}': {n} {privacy.unit}s is too few for dp_train with batch_size {p.batch_size} (need more {privacy.unit}s than the batch)")
        delta = privacy.delta if privacy.delta is not None else default_delta(n)
        check_delta(delta, n, privacy.unit)
        sample_rate = p.batch_size / n
        steps = max(1, math.ceil(p.epochs / sample_rate))
        if math.isinf(privacy.target_epsilon):
            return ClientPlan(client_id, records, units, delta, sample_rate, steps, 0.0, math.inf, "none", private=False)
        if p.noise_multiplier is not None:
            sigma, by = p.noise_multiplier, "given"
        else:
            sigma, by = calibrate_noise(privacy.target_epsilon, delta, sample_rate, steps)
        return ClientPlan(client_id, records, units, delta, sample_rate, steps, sigma, p.clip_norm, by, private=True)

    def run(self, ctx: StageContext) -> None:
        partition = ctx.read_artifact_json("ingest", "partition.json")
        plans = []
        spent = read_ledger(ctx.run_dir, ctx.completed_stages_before())
        for client_id in partition["clients"]:
            rows = read_jsonl(ctx.artifact(self.params.source_stage, f"clients/{client_id}/records.jsonl"))
            records = [InstructionRecord.model_validate(r) for r in rows if r["kind"] == "instruction"]
            plan = self.plan(ctx, client_id, records)
            # Every client's budget is checked before any client trains: a refusal leaves nothing.
            check_budget(spent, client_id, [plan.mechanism()], plan.delta, ctx.spec.privacy.cap_epsilon, self.name)
            plans.append(plan)
        models = ctx.read_artifact_json("prepare_models", "models.json")
        ledger = []
        for plan in plans:
            done = ctx.completed_unit(plan.client_id)  # trained before a crash: keep it
            entry = LedgerEntry.model_validate(done) if done else self.train_client(ctx, plan, models["base"])
            ledger.append(entry)
        ctx.write_json(LEDGER, [entry.model_dump(mode="json") for entry in ledger])

    def train_client(self, ctx: StageContext, plan: ClientPlan, base: dict) -> LedgerEntry:
        import torch
        from peft import LoraConfig, get_peft_model

        from knowledgesg.models import ResolvedModel, load_causal_lm, resolve_device
        from knowledgesg.sft import make_optimizer, tokenize_example, unit_batch, unit_loss_on
        from privacy.dp_sgd import DPSGD, DPSGDSettings, micro_batches, poisson_batches

        p: DPTrainParams = self.params
        torch.manual_seed(ctx.derive_seed(plan.client_id, "init"))
        device = resolve_device(ctx.spec.models.device)
        model, tokenizer = load_causal_lm(ResolvedModel(**base), device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations inside peft
            model = get_peft_model(model, LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=0.0, target_modules=p.target_modules, task_type="CAUSAL_LM"))
        model.train()
        examples = [tokenize_example(tokenizer, record, p.max_length, p.loss_on) for record in plan.records]
        rows_per_unit = [len(unit) for unit in plan.units]

        sampler_rng = torch.Generator().manual_seed(ctx.derive_seed(plan.client_id, "sampler"))
        noise_rng = torch.Generator(device=device).manual_seed(ctx.derive_seed(plan.client_id, "noise"))
        settings = DPSGDSettings(plan.noise_multiplier, plan.clip_norm, plan.sample_rate, p.batch_size)
        dp = DPSGD(model, make_optimizer(p.optimizer, p.learning_rate), settings, noise_rng)
        unit_loss = unit_loss_on(device)

        lora_before = {n: t.detach().clone() for n, t in model.named_parameters() if t.requires_grad}
        losses = []
        label = "" if plan.private else f" [{NOT_PRIVATE}]"
        with progress_bar() as bar:
            task = bar.add_task(f"dp_train {plan.client_id}{label}", total=plan.steps)
            for step, units in enumerate(poisson_batches(len(plan.units), plan.sample_rate, plan.steps, sampler_rng)):
                loss = dp.step([unit_batch(examples, plan.units, mb, tokenizer.pad_token_id) for mb in micro_batches(units, rows_per_unit, p.max_physical_batch)], unit_loss)
                losses.append({"step": step + 1, "units": len(units), "loss": None if loss is None else round(loss, 6)})
                if step == 0 or (step == 1 and losses[0]["loss"] is None):
                    self._check_adapter_moved(model, lora_before)
                bar.advance(task)
        history = dp.accounted_history()
        if plan.private and (len(history) != 1 or history[0][2] != plan.steps):
            raise KsgError(f"client '{plan.client_id}': the accountant counted {history} but {plan.steps} steps ran; refusing to report an epsilon")
        return self._save(ctx, plan, model, losses, dp.empty_steps, base)

    @staticmethod
    def _check_adapter_moved(model, before: dict) -> None:
        moved = any(not bool((t.detach() == before[n]).all()) for n, t in model.named_parameters() if t.requires_grad)
        if not moved:
            raise KsgError("the LoRA weights did not change after the first DP-SGD step (optimizer not bound to the adapter's parameters)")

    def _save(self, ctx: StageContext, plan: ClientPlan, model, losses: list[dict], empty_steps: int, base: dict) -> LedgerEntry:
        client_dir = f"clients/{plan.client_id}"
        target = ctx.path(f"{client_dir}/adapter")
        save_adapter(model, target)  # replaces one left by a run killed before this client was marked done
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            ctx.declare_output(f"{client_dir}/adapter/{name}")
        mechanism = plan.mechanism()
        eps = epsilons([mechanism], plan.delta)
        privacy = {
            "client_id": plan.client_id,
            "private": plan.private,
            "label": "DP" if plan.private else NOT_PRIVATE,
            "unit": ctx.spec.privacy.unit,
            "num_units": len(plan.units),
            "delta": plan.delta,
            "target_epsilon": ctx.spec.privacy.target_epsilon,
            "mechanism": mechanism.model_dump(),
            "clip_norm": plan.clip_norm,
            "expected_batch_units": self.params.batch_size,
            "epochs": self.params.epochs,
            "empty_batches": empty_steps,
            "calibrated_by": plan.calibrated_by,
            "epsilon": eps.model_dump(),
            "assumptions": ["Poisson sampling of privacy units at the stated rate", f"unit of privacy: {ctx.spec.privacy.unit}", f"noise from {NOISE_SOURCE}"],
            "base_model": {"name": base["name"], "weights_sha256": base["weights_sha256"]},
            "adapter_sha256": sha256_file(target / "adapter_model.safetensors"),
        }
        ctx.write_json(f"{client_dir}/privacy.json", privacy)
        ctx.write_json(f"{client_dir}/loss.json", losses, side=f"client:{plan.client_id}")
        shown = f"epsilon {eps.reported:.3f} ({eps.reported_by}) at delta {plan.delta:.2e}" if plan.private else NOT_PRIVATE
        final = next((l["loss"] for l in reversed(losses) if l["loss"] is not None), None)
        console.print(f"dp_train {plan.client_id}: {plan.steps} steps, sigma {plan.noise_multiplier:.3f}, q {plan.sample_rate:.4f}, {shown}, last loss {final}")
        entry = LedgerEntry(
            client_id=plan.client_id, stage=self.name, release="dp_adapter",
            artifact=f"stages/{self.name}/{client_dir}/adapter/adapter_model.safetensors",
            unit=ctx.spec.privacy.unit, delta=plan.delta, mechanism=mechanism, epsilon=eps, private=plan.private,
        )
        outputs = [f"{client_dir}/adapter/adapter_model.safetensors", f"{client_dir}/adapter/adapter_config.json", f"{client_dir}/privacy.json", f"{client_dir}/loss.json"]
        ctx.mark_unit_done(plan.client_id, outputs, entry.model_dump(mode="json"))
        return entry
