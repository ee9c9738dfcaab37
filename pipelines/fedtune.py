"""Stage `fedtune` (server and clients): federated LoRA tuning of the final model.

By default the clients train on the refined synthetic data (each on the share its own DP adapter
produced), which costs no privacy: it is post-processing of the DP adapters. With `data: private`
each client trains on its own private records with DP-SGD local steps; the noise is calibrated
to `local_dp.target_epsilon` for the most steps the client can run (its rounds are known before
training, as sampling is seeded; with client-level DP, every round), every budget is checked
first, and each client checks its own cap and enters each round's release in its own ledger
before its update leaves. Nothing un-noised about private data goes to the server: no loss, no
example count (updates are weighted equally), noise drawn by the client from OS entropy.

Client-level DP-FedAvg (`client_dp`): each client draws its own participation coin (q =
clients_per_round / clients) and clips its update; the server adds the noise (OS entropy). The
server sees each clipped update, so that guarantee (unit: client) holds against holders of the
final model only, and the report says so; on private data it is listed beside the record-level
ledger, on synthetic data in `privacy.json`.

Secure aggregation (`secure_aggregation: true` or its settings; Flower engines): Flower's SecAgg+
hides each update from the server, which gets the weighted mean of each round's updates only
(knowledgesg.federated.secagg). With client-level DP each client still clips and the server still
adds the noise, but it sees only the sum of the clipped updates (before its noise), not each one.

The same server loop and client code run in every engine (knowledgesg.federated): `local` in
this process, `flower-sim` on Flower's simulation runtime, `flower-deploy` through a SuperLink
and SuperNodes (TLS, SuperNode authentication). Outputs: the final adapter, a merged model on
request, per-round metrics, and the privacy record.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_serializer, model_validator

from knowledgesg.adapters import ADAPTER_FILES, ADAPTER_WEIGHTS, save_adapter
from knowledgesg.console import console
from knowledgesg.errors import InputError, KsgError, SpecError
from knowledgesg.federated.client import LOCAL_LOG, LoraModel, frozen_a_digest, initial_params
from knowledgesg.federated.deploy import deploy_settings_here, node_config, run_deployed
from knowledgesg.federated.engines import CHECKPOINT, FINAL, INITIAL, JOB, ROUNDS, run_local
from knowledgesg.federated.flower import run_simulation
from knowledgesg.federated.protocol import LocalDP, LocalTraining, LoraShape, UpdateEncoding, load_params, save_params
from knowledgesg.federated.secagg import SecureAggregation, conflicts
from knowledgesg.federated.server import ClientDP, FedJob, RuleSettings, participation, resumed_history, round_releases
from knowledgesg.fileio import read_json, read_jsonl, write_dir, write_json
from knowledgesg.loaders import load_labelled_pool, refuse_client_data, source_name_of, source_path
from knowledgesg.models import cache_root, resolve_device, resolve_precision
from knowledgesg.spec import DataSource, DeploySettings, PipelineSpec, StrictModel, format_validation_error
from knowledgesg.stage import Stage, StageContext
from pipelines.ingest import client_ids, client_records, public_size, training_records
from privacy.accounting import NOISE_MULTIPLIER_RANGE, Mechanism, calibrate_noise, default_delta, epsilons
from privacy.ledger import LEDGER, TRUST_REPRODUCIBLE, TRUST_SERVER_NOISE, LedgerEntry, check_budget, merge_releases, new_release_id, now, read_stage_ledgers, trust_line

TRUST_SERVER_NOISE_SECURE_SUM = ("holders of the final model only: the server adds this noise; with secure aggregation it sees the sum of the "
                                 "clients' clipped updates (before its noise), not each one, while it follows the protocol")


def client_level_trust(job: FedJob, noise_origin: str) -> str:
    """Whom client-level DP-FedAvg's epsilon holds against: no one when the server's noise is
    keyed from the public seed (anyone with the spec regenerates and cancels it)."""
    if noise_origin == "reproducible":
        return TRUST_REPRODUCIBLE
    return TRUST_SERVER_NOISE_SECURE_SUM if job.secure_aggregation else TRUST_SERVER_NOISE


class LocalDPParams(StrictModel):
    target_epsilon: float | None = Field(default=None, gt=0, description="this stage's budget per client; the noise is calibrated to it")
    noise_multiplier: float | None = Field(default=None, **NOISE_MULTIPLIER_RANGE, description="or a given noise multiplier")
    clip_norm: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _one(self) -> LocalDPParams:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("give exactly one of target_epsilon or noise_multiplier")
        return self


class FedtuneParams(StrictModel):
    engine: Literal["local", "flower-sim", "flower-deploy"] = "local"
    data: Literal["synthetic", "private"] = "synthetic"
    synthetic_stage: Literal["refine", "synthesize"] = Field(default="refine", description="where the synthetic shares come from")
    rounds: int = Field(default=3, ge=1, le=100_000)
    clients_per_round: int | None = Field(default=None, ge=1, description="default: every client, every round")
    rule: RuleSettings = Field(default_factory=RuleSettings)
    training: LocalTraining = Field(default_factory=LocalTraining)
    lora: LoraShape = Field(default_factory=LoraShape)
    client_dp: ClientDP | None = None
    local_dp: LocalDPParams | None = Field(default=None, description="required with data: private")
    merge: bool = Field(default=False, description="also write the base model with the adapter merged in")
    deploy: DeploySettings = Field(default_factory=DeploySettings)
    min_clients: int | None = Field(default=None, ge=1, description="a round aggregates the updates that arrived if at least this many did (default: every client asked)")
    round_retries: int = Field(default=0, ge=0, description="times the clients that failed are asked again before a round gives up (synthetic data only)")
    round_timeout_s: float | None = Field(default=None, gt=0, description="Flower engines: how long a round waits for the clients' replies")
    update_encoding: UpdateEncoding = Field(default="float32", description="how the clients' updates travel: float16 halves the bytes, int8 quarters them (some rounding)")
    secure_aggregation: SecureAggregation | None = Field(default=None, description="Flower's SecAgg+: the server sees the sum of each round's updates only (true: the defaults)")
    public: DataSource | None = Field(default=None, description="public labelled records (e.g. {builtin: fiqa_train}) trained on beside the synthetic "
                                                                  "data, dealt out evenly over the clients' shares; never a client's data, no privacy cost")
    seed: int | None = Field(default=None, description="a replicate of the final tuning: this stage's public randomness (LoRA initialisation, batch "
                                                        "order, the public pool's dealing) from this number beside the spec's seed, the data unchanged")
    average_last: int | None = Field(default=None, ge=1, description="the final adapter is the mean of the global adapters after the last this many "
                                                                     "rounds (tail averaging; unset: the last round's)")

    @model_serializer(mode="wrap")
    def _without_unset_newer_fields(self, handler):
        """`public`, `seed` and `average_last` are left out of the stage's fingerprint while unset, so that a run
        from before they existed still matches: a finished fedtune on private data is kept, not released again."""
        dumped = handler(self)
        for name in ("public", "seed", "average_last"):
            if getattr(self, name) is None:
                dumped.pop(name, None)
        return dumped

    @field_validator("secure_aggregation", mode="before")
    @classmethod
    def _secure_aggregation_flag(cls, value):
        if value is True:
            return {}
        return None if value is False else value

    @model_validator(mode="after")
    def _average_within_rounds(self) -> FedtuneParams:
        if self.average_last is not None and self.average_last > self.rounds:
            raise ValueError(f"average_last {self.average_last} exceeds rounds {self.rounds}")
        return self

    @model_validator(mode="after")
    def _flower_rounds_end(self) -> FedtuneParams:
        if self.engine != "local" and self.min_clients is not None and self.round_timeout_s is None:
            raise ValueError("min_clients over Flower needs round_timeout_s: without it a round waits forever for a client that is gone")
        return self

    @model_validator(mode="after")
    def _secure_aggregation_fits(self) -> FedtuneParams:
        """What can be checked before the clients are known (the job checks the rest)."""
        if self.secure_aggregation is None:
            return self
        if self.engine == "local":
            raise ValueError("secure_aggregation runs over Flower: use engine flower-sim or flower-deploy (in one process there is no one to hide the updates from)")
        asked = self.clients_per_round if self.client_dp is None else None
        problem = conflicts(self.secure_aggregation, self.rule.name, self.update_encoding, self.round_retries, self.min_clients, asked,
                            self.client_dp.clip_norm if self.client_dp else None)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _private_needs_dp(self) -> FedtuneParams:
        if self.data == "private" and self.local_dp is None:
            raise ValueError("data: private trains on private records, which needs local_dp (DP-SGD local steps)")
        if self.data == "synthetic" and self.local_dp is not None:
            raise ValueError("local_dp applies to data: private only")
        if self.data == "private" and self.public is not None:
            raise ValueError("public records join the synthetic shares: data: synthetic only (DP-SGD local steps on private data are calibrated to the private records)")
        return self


def fedtune_params(spec: PipelineSpec) -> FedtuneParams:
    """The spec's fedtune parameters with their defaults (a later stage reads which data it trained on)."""
    return FedtuneParams.model_validate(next(s for s in spec.stages if s.name == "fedtune").params)


class Fedtune(Stage):
    name = "fedtune"
    Params = FedtuneParams
    uses = ("privacy",)

    def requires(self) -> tuple[str, ...]:
        return ("prepare_models", "ingest") + ((self.params.synthetic_stage,) if self.params.data == "synthetic" else ())

    def releases(self) -> bool:
        return self.params.data == "private"

    def unfinished_releases(self, stage_dir: Path) -> list[LedgerEntry]:
        """The rounds' releases its checkpoint holds (the clients' entries, as they sent them)."""
        return super().unfinished_releases(stage_dir) + round_releases(resumed_history(stage_dir / "work" / CHECKPOINT))

    def released_part(self, stage_dir: Path) -> list[str]:
        """On private data the rounds are releases, kept in the checkpoint a refusal must not wipe."""
        return super().released_part(stage_dir) + (["its federated rounds so far"] if (stage_dir / "work" / CHECKPOINT).is_file() else [])

    def external_inputs(self, spec: PipelineSpec, base_dir: Path) -> list[Path]:
        return [source_path(self.params.public, base_dir, f"{self.name} params.public")] if self.params.public else []

    def preflight(self, spec: PipelineSpec, base_dir: Path) -> None:
        """Before the run starts, not after dp_train, synthesize and refine: the public pool, and
        the job's settings against the clients (the server loop's own checks, on a stand-in job)."""
        if self.params.public:
            refuse_client_data(self.params.public, spec.clients.sources(), base_dir, "fedtune params.public")
            load_labelled_pool(self.params.public, base_dir, spec.seed, "fedtune params.public")
        self.new_job(spec, client_ids(spec, base_dir), seed=0, base={}, device="cpu", run_dir=None, records=None)
        if self.params.engine == "flower-deploy":
            deploy_settings_here(self.params.deploy, base_dir, "fedtune params.deploy")

    def preflight_private(self, spec: PipelineSpec, base_dir: Path) -> None:
        if self.params.data == "private" and not spec.privacy.count_noise:  # with a noised count, planned from it when the stage runs
            self.refuse_impossible_local_plans(spec, base_dir)

    def refuse_impossible_local_plans(self, spec: PipelineSpec, base_dir: Path) -> None:
        """A client with no more records than the local batch, or a local_dp.target_epsilon that no
        noise reaches, is refused before dp_train spends its budget. Every client is asked in every
        round unless clients are sampled; then the fewest rounds a client trains in (one) is
        planned, so only a budget no participation reaches is refused here (the run plans the
        rounds the seed gives)."""
        loaded = client_records(spec, base_dir)
        for client_id, records in loaded.items():
            n = public_size(spec, client_id, training_records(spec, client_id, records))
            delta = spec.privacy.delta or default_delta(n)
            self.plan_mechanisms([client_id], {client_id: self.params.rounds if self.asks_every_round(len(loaded)) else 1}, {client_id: n}, {client_id: delta})

    def asks_every_round(self, clients: int) -> bool:
        """Whether every client is planned in every round (no clients sampled by the server's seed;
        with client-level DP each is asked and its own coin decides, so the plan counts every round)."""
        p: FedtuneParams = self.params
        return p.client_dp is not None or p.clients_per_round is None or p.clients_per_round >= clients

    def side(self) -> str:
        return "server"  # it drives the rounds; with private data the clients train on their side (Flower)

    def run(self, ctx: StageContext) -> None:
        p: FedtuneParams = self.params
        partition = ctx.read_artifact_json("ingest", "partition.json")
        clients = list(partition["clients"])
        adapters = {e.client_id: e for e in read_stage_ledgers(ctx.run_dir, ctx.completed_stages_before()) if e.release == "dp_adapter"}
        models = ctx.models()
        records = self.synthetic_shares(ctx, clients) if p.data == "synthetic" else None
        public = self.public_pool(ctx) if p.public else []
        if public:  # dealt out like cards: the pool is trained on once per pass over the shares
            for i, client in enumerate(clients):
                records[client] += public[i::len(clients)]
        job = self.build_job(ctx, clients, models["base"], records)
        if job.lora.ffa:  # the A every party must draw from a_seed, for each to check its own
            job.lora = job.lora.model_copy(update={"a_sha256": frozen_a_digest(LoraModel.get(job.base_model, job.lora, job.device).model)})
        rounds = participation(job)
        # the delta a client's ledger is kept at: its DP adapter's, else the spec's or the default
        deltas = {c: adapters[c].delta if c in adapters else ctx.spec.privacy.delta or default_delta(partition["clients"][c]) for c in clients}
        planned = self.plan_mechanisms(clients, rounds, partition["clients"], deltas)
        if p.data == "private":  # the mechanism each client runs, as planned; each keeps its own ledger
            job.local_dp = {c: LocalDP(noise_multiplier=planned[c][0].noise_multiplier, clip_norm=p.local_dp.clip_norm, sample_rate=planned[c][0].sample_rate,
                                       num_units=partition["clients"][c], delta=deltas[c], documents=ctx.spec.clients.holds_documents(c), cap_epsilon=ctx.spec.privacy.cap_epsilon,
                                       ledger_dir=str(ctx.ledger_dir), reproducible_noise=ctx.spec.privacy.reproducible_noise) for c in clients}
        work = ctx.path("work")
        # rounds a stopped attempt released are in the clients' ledgers already (spent): only those
        # still to come are planned on top (the noise stays calibrated to every round)
        resumed = resumed_history(work / CHECKPOINT, job)
        left = participation(job, after=len(resumed))
        # the rounds released come from the checkpoint too: on the server, or with nodes elsewhere,
        # the spent releases read here predate them (a release is counted once, by its id)
        released = round_releases(resumed)
        for client_id, mechanisms in planned.items():  # every budget, over all releases ever, before any training
            to_come = [m.model_copy(update={"steps": left[client_id] * p.training.steps}) for m in mechanisms if left[client_id]]
            spent = merge_releases(ctx.spent(client_id), [e for e in released if e.client_id == client_id])
            check_budget(spent, client_id, to_come, deltas[client_id], ctx.spec.privacy.cap_epsilon, self.name,
                         "record" if p.data == "private" else None)  # on private data: record level only (checked in its params)
        work.mkdir(parents=True, exist_ok=True)
        final, history = self.run_engine(ctx, job, work)
        received = [LedgerEntry.model_validate(e) for record in history for e in record.pop("releases")]
        answered = dict.fromkeys(clients, 0)  # rounds each client was asked in and its reply arrived
        for record in history:
            for c in record["clients"]:
                answered[c] += c not in record["failed"]
        self.check_dp_steps(job, received, answered)
        self.save(ctx, job, final)
        ctx.write_json("rounds.json", history)
        ctx.write_json("training.json", self.training_record(job))
        for c in clients:  # the clients' own logs of their training (un-noised): client side
            if ctx.path(f"clients/{c}/{LOCAL_LOG}").is_file():
                ctx.declare_output(f"clients/{c}/{LOCAL_LOG}", side=f"client:{c}")
        ledger = received + [e for c in clients for e in self.server_entries(ctx, job, c, deltas[c], adapters[c].unit if c in adapters else ctx.spec.privacy.unit)]
        ledger.sort(key=lambda e: clients.index(e.client_id))
        ctx.write_json("privacy.json", self.privacy_record(ctx, job, rounds, ledger, len(public)))
        ctx.write_json(LEDGER, [e.model_dump(mode="json") for e in ledger])
        # the job carries the synthetic shares and the working parameters; its checkpoint holds the
        # rounds released so far, which a process killed before the manifest resumes from
        ctx.scratch.append(work)

    def synthetic_shares(self, ctx: StageContext, clients: list[str]) -> dict[str, list[dict]]:
        p: FedtuneParams = self.params
        name = "refined.jsonl" if p.synthetic_stage == "refine" else "synthetic.jsonl"
        records = {c: read_jsonl(ctx.artifact(p.synthetic_stage, f"clients/{c}/{name}")) for c in clients}
        empty = [c for c, rows in records.items() if not rows]
        if empty:
            raise InputError(f"fedtune: no {p.synthetic_stage} records for {', '.join(empty)} (nothing to train on)")
        return records

    def derive_seed(self, ctx: StageContext, purpose: str) -> int:
        """The seed of one public purpose; `params.seed` makes a replicate (unset: as before it existed)."""
        return ctx.derive_seed(purpose) if self.params.seed is None else ctx.derive_seed(purpose, f"replicate {self.params.seed}")

    def public_pool(self, ctx: StageContext) -> list[dict]:
        """The public records with a response, shuffled by the stage's seed (a replicate's own)."""
        pool = [r.model_dump(mode="json") for r in load_labelled_pool(self.params.public, ctx.base_dir, ctx.seed, "fedtune params.public")]
        random.Random(self.derive_seed(ctx, "public")).shuffle(pool)
        return pool

    def build_job(self, ctx: StageContext, clients: list[str], base: dict, records: dict[str, list[dict]] | None) -> FedJob:
        return self.new_job(ctx.spec, clients, self.derive_seed(ctx, "job") % (2**31), base, resolve_device(ctx.spec.models.device), str(ctx.run_dir.resolve()), records)

    def new_job(self, spec: PipelineSpec, clients: list[str], seed: int, base: dict, device: str, run_dir: str | None,
                records: dict[str, list[dict]] | None) -> FedJob:
        """The server loop's job, its settings checked against the clients (one line naming fedtune)."""
        p: FedtuneParams = self.params
        if p.data == "private" and spec.privacy.unit != "record":
            raise SpecError(f"privacy.unit: {spec.privacy.unit}, but fedtune on private data supports privacy.unit: record (the server plans the sampling rate from record counts)")
        try:
            return FedJob(seed=seed, rounds=p.rounds, clients=clients, clients_per_round=p.clients_per_round or len(clients),
                          rule=p.rule, client_dp=p.client_dp, training=p.training, lora=p.lora, base_model=base, device=device,
                          run_dir=run_dir, records=records, private_source="ingest" if p.data == "private" else None,
                          reproducible_noise=spec.privacy.reproducible_noise, min_clients=p.min_clients, round_retries=p.round_retries,
                          round_timeout_s=p.round_timeout_s, update_encoding=p.update_encoding, secure_aggregation=p.secure_aggregation,
                          average_last=p.average_last or 1)
        except ValidationError as err:
            raise InputError(format_validation_error("fedtune", err)) from None

    def sample_rate(self, client_id: str, records: dict[str, int]) -> float:
        n = records[client_id]
        batch = self.params.training.batch_size
        if batch >= n:
            raise SpecError(f"fedtune params.training.batch_size: {batch}, not below the {n} record{'s' if n != 1 else ''} of client '{client_id}' (DP-SGD local steps need more records than the batch)")
        return batch / n

    def plan_mechanisms(self, clients: list[str], rounds: dict[str, int], records: dict[str, int], deltas: dict[str, float]) -> dict[str, list[Mechanism]]:
        """What each client's private records (`records`: how many each holds) will go through in
        this stage at most, asked in `rounds` rounds (nothing, on synthetic data); the noise is
        calibrated at the delta the client's ledger is kept at. `ksg check` plans with every round."""
        p: FedtuneParams = self.params
        planned = {}
        for c in clients:
            mechanisms = []
            if p.data == "private":
                steps = rounds[c] * p.training.steps
                q = self.sample_rate(c, records)
                sigma = p.local_dp.noise_multiplier
                if sigma is None:
                    try:
                        sigma, _ = calibrate_noise(p.local_dp.target_epsilon, deltas[c], q, max(1, steps), f"{self.name}: local_dp.target_epsilon")
                    except InputError as err:
                        raise InputError(f"client '{c}': {err}") from None
                mechanisms.append(Mechanism(kind="poisson_gaussian", noise_multiplier=sigma, sample_rate=q, steps=steps))
            planned[c] = mechanisms
        return planned

    def client_level_mechanism(self, job: FedJob) -> Mechanism:
        return Mechanism(kind="poisson_gaussian", noise_multiplier=job.client_dp.noise_multiplier, sample_rate=job.sample_rate, steps=job.rounds)

    def client_level_delta(self, job: FedJob) -> float:
        """Neighbours differ in a whole client, so N is the number of clients: at most 1e-5."""
        return default_delta(len(job.clients))

    def run_engine(self, ctx: StageContext, job: FedJob, work: Path):
        save_params(work / INITIAL, initial_params(job.base_model, job.lora, self.derive_seed(ctx, "init") % (2**31), job.device))
        write_json(work / JOB, job.model_dump(mode="json"))
        for stale in (FINAL, ROUNDS):
            (work / stale).unlink(missing_ok=True)
        engine = self.params.engine
        console.print(f"fedtune: {job.rounds} rounds, {job.clients_per_round} of {len(job.clients)} clients per round, rule {job.rule.name}, engine {engine}")
        if engine == "local":
            run_local(work / JOB)
        elif engine == "flower-sim":
            run_simulation(work / JOB, len(job.clients))
        else:
            privacy = ctx.spec.privacy
            run_deployed(work / JOB, job.clients, self.params.deploy,
                         lambda client: node_config(client, ctx.run_dir, ctx.ledger_dir, privacy.cap_epsilon, privacy.reproducible_noise, privacy.delta, privacy.unit,
                                                    cache_root(ctx.spec.models.cache_dir)),
                         ctx.base_dir, "fedtune params.deploy")
        if not (work / FINAL).is_file():
            raise KsgError(f"fedtune: the {engine} engine finished without a final adapter (see its log above)")
        return load_params(work / FINAL), read_json(work / ROUNDS)

    def check_dp_steps(self, job: FedJob, received: list[LedgerEntry], answered: dict[str, int]) -> None:
        """The releases the clients sent must match the plan for the rounds their replies arrived in
        (their own accountants already checked each round before sending; this is the server's
        check of their reports). What a client ran in a round it failed is in its own ledger."""
        if job.local_dp is None:
            return
        counted = dict.fromkeys(job.clients, 0)
        for entry in received:
            if entry.mechanism.noise_multiplier != job.local_dp[entry.client_id].noise_multiplier:
                raise KsgError(f"fedtune: client '{entry.client_id}' reported noise {entry.mechanism.noise_multiplier}, not the planned {job.local_dp[entry.client_id].noise_multiplier}")
            counted[entry.client_id] += entry.mechanism.steps
        expected = {c: answered[c] * job.training.steps for c in job.clients}
        if counted != expected:  # with client-level DP too: a client records every round asked, joined or not
            raise KsgError(f"fedtune: DP-SGD steps reported {counted} differ from the plan {expected} (the releases are in the clients' ledgers)")

    def save(self, ctx: StageContext, job: FedJob, final) -> None:
        lora = LoraModel.get(job.base_model, job.lora, job.device)
        lora.set_params(final)
        save_adapter(lora.model, job.base_model["name"], ctx.path("adapter"))
        for name in ADAPTER_FILES:
            ctx.declare_output(f"adapter/{name}")
        if self.params.merge:

            def build(directory: Path) -> None:
                copy.deepcopy(lora.model).merge_and_unload().save_pretrained(directory)
                lora.tokenizer.save_pretrained(directory)

            write_dir(ctx.path("merged"), build)
            for path in sorted(ctx.path("merged").iterdir()):
                ctx.declare_output(f"merged/{path.name}")

    def server_entries(self, ctx: StageContext, job: FedJob, client_id: str, delta: float, unit: str) -> list[LedgerEntry]:
        """What the server adds to its ledger copy: on synthetic data one free entry per client (at
        the unit of the DP adapter it descends from); on private data with client-level DP the
        client-level guarantee (unit client, which does not count against the record-level budget
        and holds against fewer parties)."""
        p: FedtuneParams = self.params
        common = {"release_id": new_release_id(), "client_id": client_id, "stage": self.name, "artifact": f"stages/{self.name}/adapter/{ADAPTER_WEIGHTS}",
                  "artifact_sha256": None, "run_dir": str(ctx.run_dir.resolve()), "released_at": now()}
        if p.data == "synthetic":
            mechanism = Mechanism(kind="post_processing")
            return [LedgerEntry(**common, release=f"final_adapter (trained on {p.synthetic_stage} synthetic data: post-processing)", unit=unit,
                                delta=delta, mechanism=mechanism, epsilon=epsilons([mechanism], delta), private=True, noise="none", trust=trust_line("none", mechanism))]
        if job.client_dp is None:
            return []
        mechanism, client_delta = self.client_level_mechanism(job), self.client_level_delta(job)
        return [LedgerEntry(**common, release="final_adapter: client-level DP-FedAvg (noise added by the server)", unit="client", num_units=len(job.clients),
                            delta=client_delta, mechanism=mechanism, epsilon=epsilons([mechanism], client_delta), private=not ctx.spec.privacy.reproducible_noise,
                            noise=ctx.noise_origin, trust=client_level_trust(job, ctx.noise_origin))]

    def training_record(self, job: FedJob) -> dict:
        """The base weights' precision the clients were asked to train over, and the one they ran:
        clients on this machine (engines local and flower-sim) resolve `auto` as it does; a
        flower-deploy node resolves it on its own machine, which the server is not told (it would
        say what that machine's CPU runs natively, nothing the training needs)."""
        asked = job.training.precision
        ran = "resolved by each node on its own machine" if self.params.engine == "flower-deploy" and asked == "auto" else resolve_precision(asked, job.device)
        last = job.rounds - job.average_last + 1
        final = f"the mean of the global adapters after rounds {last}-{job.rounds}" if job.average_last > 1 else f"the global adapter after round {job.rounds}"
        return {"precision": {"asked": asked, "ran": ran}, "final_adapter": final}

    def privacy_record(self, ctx: StageContext, job: FedJob, rounds: dict[str, int], ledger: list[LedgerEntry], public_records: int) -> dict:
        p: FedtuneParams = self.params
        record = {"data": p.data, "rounds_asked_per_client": rounds, "engine": p.engine, "rule": job.rule.model_dump(),
                  "weights": "equal (clients send no example counts on private data)" if p.data == "private" else "by example count",
                  "releases": [{"client_id": e.client_id, "release": e.release, "unit": e.unit, "epsilon": e.epsilon.model_dump(), "delta": e.delta,
                                "trust": e.trust} for e in ledger]}
        if p.public is not None:
            record["public_data"] = {"source": source_name_of(p.public), "records": public_records,
                                     "privacy": "public data, dealt out over the clients' shares: no privacy cost"}
        if job.secure_aggregation is not None:
            record["secure_aggregation"] = {
                "protocol": "SecAgg+ (Flower)", "settings": job.secure_aggregation.model_dump(),
                "the_server_sees": "the weighted mean of each round's updates (quantized), and who is in it; no single update",
                "clipping": "each coordinate of a (weighted) update is cut to +-clipping_range before quantization",
            }
        if job.client_dp is not None:
            mechanism, delta = self.client_level_mechanism(job), self.client_level_delta(job)
            record["client_level_dp_fedavg"] = {
                "mechanism": mechanism.model_dump(), "unit": "client", "delta": delta, "epsilon": epsilons([mechanism], delta).model_dump(),
                "private": ctx.noise_origin != "reproducible",
                "who_adds_the_noise": ("the server, from the public spec seed: NOT PRIVATE, anyone with the spec regenerates and cancels it"
                                       if ctx.noise_origin == "reproducible" else "the server (OS entropy)"),
                "who_clips": "each client, before its update leaves",
                "what_the_server_sees": ("the sum of the clipped updates, before its noise (secure aggregation)" if job.secure_aggregation
                                         else "each client's clipped update"),
                "participation": ("each client's own coin at q = clients_per_round / clients; not recorded in rounds.json or the ledger: a client "
                                  "records the round's DP-SGD release before its coin, whatever it says (charged to its budget either way), with no "
                                  "digest of its update. " + ("Still visible to a server that times the replies: a client that sits out sends zeros sooner"
                                  if job.secure_aggregation else "Visible to the server in the replies: a client that sits out sends no update (use "
                                  "secure_aggregation to hide it)")),
                "trust": client_level_trust(job, ctx.noise_origin),
            }
        return record
