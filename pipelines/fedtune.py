"""Stage `fedtune` (server and clients): federated LoRA tuning of the final model.

By default the clients train on the refined synthetic data (each on the share its own DP adapter
produced), which costs no privacy: it is post-processing of the DP adapters. With `data: private`
each client trains on its own private records with DP-SGD local steps; the noise is calibrated
to `local_dp.target_epsilon` for the steps the client will actually run (its rounds are known
before training, as sampling is seeded), and that cost enters the ledger. Client-level DP-FedAvg
(`client_dp`) clips and noises whole client updates at the server, with Poisson client sampling
at q = clients_per_round / clients; on private data its cost enters the ledger too (unit: client).

The same server loop and client code run in every engine (knowledgesg.federated): `local` in
this process, `flower-sim` on Flower's simulation runtime, `flower-deploy` through a SuperLink
and SuperNodes (TLS, SuperNode authentication). Outputs: the final adapter, a merged model on
request, per-round metrics, and the privacy record.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from knowledgesg.console import console
from knowledgesg.errors import InputError, KsgError
from knowledgesg.federated.deploy import DeploySettings
from knowledgesg.federated.protocol import LocalTraining, LoraShape
from knowledgesg.federated.server import ClientDP, FedJob, RuleSettings, participation
from knowledgesg.fileio import read_json, read_jsonl
from knowledgesg.stage import Stage, StageContext
from privacy.accounting import Mechanism, calibrate_noise, default_delta, epsilons
from privacy.ledger import LEDGER, LedgerEntry, check_budget, read_ledger


class LocalDPParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target_epsilon: float | None = Field(default=None, gt=0, description="this stage's budget per client; the noise is calibrated to it")
    noise_multiplier: float | None = Field(default=None, gt=0, description="or a given noise multiplier")
    clip_norm: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _one(self) -> LocalDPParams:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("give exactly one of target_epsilon or noise_multiplier")
        return self


class FedtuneParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: Literal["local", "flower-sim", "flower-deploy"] = "local"
    data: Literal["synthetic", "private"] = "synthetic"
    synthetic_stage: Literal["refine", "synthesize"] = Field(default="refine", description="where the synthetic shares come from")
    rounds: int = Field(default=3, ge=1)
    clients_per_round: int | None = Field(default=None, ge=1, description="default: every client, every round")
    rule: RuleSettings = Field(default_factory=RuleSettings)
    training: LocalTraining = Field(default_factory=LocalTraining)
    lora: LoraShape = Field(default_factory=LoraShape)
    client_dp: ClientDP | None = None
    local_dp: LocalDPParams | None = Field(default=None, description="required with data: private")
    merge: bool = Field(default=False, description="also write the base model with the adapter merged in")
    deploy: DeploySettings = Field(default_factory=DeploySettings)

    @model_validator(mode="after")
    def _private_needs_dp(self) -> FedtuneParams:
        if self.data == "private" and self.local_dp is None:
            raise ValueError("data: private trains on private records, which needs local_dp (DP-SGD local steps)")
        if self.data == "synthetic" and self.local_dp is not None:
            raise ValueError("local_dp applies to data: private only")
        return self


class Fedtune(Stage):
    name = "fedtune"
    Params = FedtuneParams
    uses = ("privacy",)

    def run(self, ctx: StageContext) -> None:
        p: FedtuneParams = self.params
        partition = ctx.read_artifact_json("ingest", "partition.json")
        clients = list(partition["clients"])
        spent = read_ledger(ctx.run_dir, ctx.completed_stages_before())
        adapters = {e.client_id: e for e in spent if e.release == "dp_adapter"}
        models = ctx.read_artifact_json("prepare_models", "models.json")
        job = self.build_job(ctx, clients, models["base"])
        rounds = participation(job)
        # the delta a client's ledger is kept at: its DP adapter's, else the spec's or 1/(10 N)
        deltas = {c: adapters[c].delta if c in adapters else ctx.spec.privacy.delta or default_delta(partition["clients"][c]) for c in clients}
        planned = self.plan_mechanisms(job, rounds, partition, deltas)
        for client_id, mechanisms in planned.items():  # every budget before any training
            check_budget(spent, client_id, mechanisms, deltas[client_id], ctx.spec.privacy.cap_epsilon, self.name)
        if self.params.data == "private":  # the mechanism each client runs, as planned
            job.local_dp = {c: {"noise_multiplier": planned[c][0].noise_multiplier, "clip_norm": self.params.local_dp.clip_norm,
                                "sample_rate": planned[c][0].sample_rate, "unit": "record"} for c in clients}

        work = ctx.path("work")
        work.mkdir(parents=True, exist_ok=True)
        final, history = self.run_engine(ctx, job, work)
        self.check_dp_steps(job, history, rounds)
        self.save(ctx, job, final)
        ctx.write_json("rounds.json", history)
        ledger = [e for c in clients for e in self.ledger_entries(ctx, c, planned[c], deltas[c], rounds[c])]
        ctx.write_json("privacy.json", self.privacy_record(job, rounds, ledger))
        ctx.write_json(LEDGER, [e.model_dump(mode="json") for e in ledger])
        shutil.rmtree(work)  # the job carries the synthetic shares and the working parameters

    def build_job(self, ctx: StageContext, clients: list[str], base: dict) -> FedJob:
        p: FedtuneParams = self.params
        records = None
        if p.data == "synthetic":
            name = "refined.jsonl" if p.synthetic_stage == "refine" else "synthetic.jsonl"
            records = {c: read_jsonl(ctx.artifact(p.synthetic_stage, f"clients/{c}/{name}")) for c in clients}
            empty = [c for c, rows in records.items() if not rows]
            if empty:
                raise InputError(f"fedtune: no {p.synthetic_stage} records for {', '.join(empty)} (nothing to train on)")
        elif ctx.spec.privacy.unit != "record":
            raise InputError("fedtune on private data supports privacy.unit: record (the server plans the sampling rate from record counts)")
        from knowledgesg.models import resolve_device

        try:
            return FedJob(seed=ctx.derive_seed("job") % (2**31), rounds=p.rounds, clients=clients, clients_per_round=p.clients_per_round or len(clients),
                          rule=p.rule, client_dp=p.client_dp, training=p.training, lora=p.lora, base_model=base, device=resolve_device(ctx.spec.models.device),
                          run_dir=str(ctx.run_dir.resolve()), records=records, private_source="ingest" if p.data == "private" else None)
        except ValueError as err:
            raise InputError(f"fedtune: {err}") from None

    def sample_rate(self, client_id: str, partition: dict) -> float:
        n = partition["clients"][client_id]
        batch = self.params.training.batch_size
        if batch >= n:
            raise InputError(f"client '{client_id}': {n} records is too few for DP-SGD local steps with batch_size {batch}")
        return batch / n

    def plan_mechanisms(self, job: FedJob, rounds: dict[str, int], partition: dict, deltas: dict[str, float]) -> dict[str, list[Mechanism]]:
        """What each client's private data will go through in this stage (nothing, on synthetic data);
        the noise is calibrated at the delta the client's ledger is kept at."""
        p: FedtuneParams = self.params
        planned = {}
        for c in job.clients:
            mechanisms = []
            if p.data == "private":
                steps = rounds[c] * p.training.steps
                q = self.sample_rate(c, partition)
                sigma = p.local_dp.noise_multiplier
                if sigma is None:
                    sigma, _ = calibrate_noise(p.local_dp.target_epsilon, deltas[c], q, max(1, steps))
                mechanisms.append(Mechanism(kind="poisson_gaussian", noise_multiplier=sigma, sample_rate=q, steps=steps))
                if p.client_dp is not None:
                    mechanisms.append(self.client_level_mechanism(job))
            planned[c] = mechanisms
        return planned

    def client_level_mechanism(self, job: FedJob) -> Mechanism:
        return Mechanism(kind="poisson_gaussian", noise_multiplier=job.client_dp.noise_multiplier, sample_rate=job.sample_rate, steps=job.rounds)

    def run_engine(self, ctx: StageContext, job: FedJob, work: Path):
        from knowledgesg.federated.client import initial_params
        from knowledgesg.federated.engines import FINAL, INITIAL, JOB, ROUNDS, run_local
        from knowledgesg.federated.protocol import load_params, save_params
        from knowledgesg.fileio import write_json

        save_params(work / INITIAL, initial_params(job.base_model, job.lora, ctx.derive_seed("init") % (2**31), job.device))
        write_json(work / JOB, job.model_dump(mode="json"))
        for stale in (FINAL, ROUNDS):
            (work / stale).unlink(missing_ok=True)
        engine = self.params.engine
        console.print(f"fedtune: {job.rounds} rounds, {job.clients_per_round} of {len(job.clients)} clients per round, rule {job.rule.name}, engine {engine}")
        if engine == "local":
            run_local(work / JOB)
        elif engine == "flower-sim":
            from knowledgesg.federated.flower import run_simulation

            run_simulation(work / JOB, len(job.clients))
        else:
            from knowledgesg.federated.deploy import run_deployed

            run_deployed(work / JOB, job.clients, self.params.deploy, ctx.run_dir)
        if not (work / FINAL).is_file():
            raise KsgError(f"fedtune: the {engine} engine finished without a final adapter (see its log above)")
        return load_params(work / FINAL), read_json(work / ROUNDS)

    def check_dp_steps(self, job: FedJob, history: list[dict], rounds: dict[str, int]) -> None:
        """The clients' accountants must have counted exactly the planned DP-SGD steps."""
        if job.local_dp is None:
            return
        counted = dict.fromkeys(job.clients, 0)
        for record in history:
            for c, n in record["extra"]["dp_steps"].items():
                counted[c] += n
        expected = {c: rounds[c] * job.training.steps for c in job.clients}
        if counted != expected:
            raise KsgError(f"fedtune: DP-SGD steps counted {counted} differ from the plan {expected}; refusing to report an epsilon")

    def save(self, ctx: StageContext, job: FedJob, final) -> None:
        from knowledgesg.federated.client import LoraModel
        from knowledgesg.fileio import write_dir
        from pipelines.dp_train import save_adapter

        lora = LoraModel.get(job.base_model, job.lora, job.device)
        lora.set_params(final)
        save_adapter(lora.model, ctx.path("adapter"))
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            ctx.declare_output(f"adapter/{name}")
        if self.params.merge:
            import copy

            def build(directory: Path) -> None:
                copy.deepcopy(lora.model).merge_and_unload().save_pretrained(directory)
                lora.tokenizer.save_pretrained(directory)

            write_dir(ctx.path("merged"), build)
            for path in sorted(ctx.path("merged").iterdir()):
                ctx.declare_output(f"merged/{path.name}")

    def ledger_entries(self, ctx: StageContext, client_id: str, mechanisms: list[Mechanism], delta: float, rounds: int) -> list[LedgerEntry]:
        """One entry per mechanism that touched the client's private data; on synthetic data, one free entry."""
        p: FedtuneParams = self.params
        artifact = f"stages/{self.name}/adapter/adapter_model.safetensors"

        def entry(release: str, mechanism: Mechanism, unit: str) -> LedgerEntry:
            return LedgerEntry(client_id=client_id, stage=self.name, release=release, artifact=artifact, unit=unit, delta=delta,
                               mechanism=mechanism, epsilon=epsilons([mechanism], delta), private=True)

        if not mechanisms:
            return [entry(f"final_adapter (trained on {p.synthetic_stage} synthetic data: post-processing)", Mechanism(kind="post_processing"), ctx.spec.privacy.unit)]
        entries = [entry(f"final_adapter: DP-SGD local steps on private data ({rounds} rounds x {p.training.steps} steps)", mechanisms[0], ctx.spec.privacy.unit)]
        if len(mechanisms) > 1:  # a client-level guarantee also bounds each record: composing both is conservative
            entries.append(entry("final_adapter: client-level DP-FedAvg", mechanisms[1], "client"))
        return entries

    def privacy_record(self, job: FedJob, rounds: dict[str, int], ledger: list[LedgerEntry]) -> dict:
        p: FedtuneParams = self.params
        record = {"data": p.data, "rounds_per_client": rounds, "engine": p.engine, "rule": job.rule.model_dump(),
                  "releases": [{"client_id": e.client_id, "release": e.release, "unit": e.unit, "epsilon": e.epsilon.model_dump(), "delta": e.delta} for e in ledger]}
        if job.client_dp is not None:
            mechanism = self.client_level_mechanism(job)
            delta = default_delta(len(job.clients))
            record["client_level_dp_fedavg"] = {"mechanism": mechanism.model_dump(), "unit": "client", "delta": delta,
                                                "epsilon": epsilons([mechanism], delta).model_dump(),
                                                "note": "a guarantee for whole clients, on top of the record-level ledger"}
        return record
