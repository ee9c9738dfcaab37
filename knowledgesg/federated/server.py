"""The server's side of `fedtune`: sample clients, send tasks, aggregate. One loop for every engine.

An engine is a `Transport`: it delivers a round's tasks to the clients and returns their updates
(in process for `local`, through Flower's Grid for `flower-sim` and `flower-deploy`). Sampling,
aggregation (knowledgesg.aggregation) and client-level DP noise happen here, identically.

Client sampling is seeded from the public job seed, which is fine where nothing is claimed for
it. Client-level DP-FedAvg does claim amplification by sampling, so there every client is asked
every round and draws its own coin, and who joined is not recorded; its noise is drawn here from
OS entropy. The server sees each clipped update: that guarantee protects against holders of the
final model, not against the server operator.

With `secure_aggregation` (Flower engines: knowledgesg.federated.secagg) the server gets only the
weighted mean of a round's updates, through SecAgg+, and aggregates that: FedAvg, FedProx,
FedAvgM and the adaptive rules need no more; with client-level DP the mean times the clients in
the sum is the sum of the clipped updates, to which the server adds its noise as before. It then
sees that sum only (before its noise), never a single clipped update.
"""

from __future__ import annotations

import json
import zipfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from knowledgesg import aggregation as agg
from knowledgesg.errors import KsgError
from knowledgesg.federated.client import ClientRuntime
from knowledgesg.console import console
from knowledgesg.federated.protocol import (RULES, ClientTask, ClientUpdate, LocalDP, LocalTraining, LoraShape, Params, RoundRecord, UpdateEncoding, decode_update,
                                            failure_reason, load_params, params_bytes, save_params)
from knowledgesg.federated.secagg import SecAggPlan, SecureAggregation, SecureSum, conflicts, quantized_clip_norm, resolve
from knowledgesg.fileio import canonical_json, named_crash_point, sha256_text
from knowledgesg.spec import StrictModel
from privacy.accounting import NOISE_MULTIPLIER_RANGE
from privacy.ledger import LedgerEntry
from privacy.noise import SecureRandom


class RuleSettings(StrictModel):
    """The aggregation rule and its hyperparameters (see knowledgesg.aggregation for the updates)."""

    name: Literal[RULES] = "fedavg"  # type: ignore[valid-type]
    server_lr: float = Field(default=1.0, gt=0, description="eta; the adaptive rules want about 1e-2")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="FedAvgM beta")
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0)
    trim: int = Field(default=1, ge=0, description="trimmed mean: values dropped from each side")
    byzantine: int = Field(default=0, ge=0, description="Krum: malicious clients tolerated")


class ClientDP(StrictModel):
    """Client-level DP-FedAvg: each client clips its update to `clip_norm`; the server adds N(0, (sigma clip)^2)."""

    clip_norm: float = Field(gt=0)
    noise_multiplier: float = Field(**NOISE_MULTIPLIER_RANGE)


class FedJob(BaseModel):
    """Everything the server loop needs; written to the stage directory as `job.json`."""

    model_config = ConfigDict(extra="forbid")

    seed: int  # public: client sampling and the batches of synthetic data, never DP noise
    rounds: int = Field(ge=1)
    clients: list[str] = Field(min_length=1)
    clients_per_round: int = Field(ge=1)
    rule: RuleSettings
    client_dp: ClientDP | None = None
    training: LocalTraining
    lora: LoraShape
    base_model: dict
    device: str = "cpu"
    run_dir: str | None = None
    # per client: synthetic records to send, or the private stage its client reads
    records: dict[str, list[dict]] | None = None
    private_source: str | None = None
    local_dp: dict[str, LocalDP] | None = None  # client -> the DP-SGD mechanism it runs
    reproducible_noise: bool = False  # NOT PRIVATE: client-level noise and coins from the public seed
    # faults: a round aggregates what arrived if at least `min_clients` updates did (default:
    # every client asked); before that, the clients that failed are asked again `round_retries` times
    min_clients: int | None = Field(default=None, ge=1)
    round_retries: int = Field(default=0, ge=0)
    round_timeout_s: float | None = Field(default=None, gt=0, description="Flower: how long a round waits for its replies")
    update_encoding: UpdateEncoding = "float32"  # how the clients' updates travel (float16, int8: fewer bytes, some rounding)
    secure_aggregation: SecureAggregation | None = None  # SecAgg+ (Flower engines): the server sees the sum of the updates only
    # the final adapter: the mean of the global adapters after the last `average_last` rounds
    # (tail averaging: one run's end steadied by its own last rounds; post-processing of what the rounds released)
    average_last: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> FedJob:
        if self.average_last > self.rounds:
            raise ValueError(f"average_last {self.average_last} exceeds the {self.rounds} rounds")
        if self.clients_per_round > len(self.clients):
            raise ValueError(f"clients_per_round {self.clients_per_round} exceeds the {len(self.clients)} clients")
        if self.rule.name == "scaffold" and self.training.optimizer != "sgd":
            raise ValueError("scaffold's control variates assume local SGD: set training.optimizer: sgd")
        if self.client_dp is not None and self.rule.name not in ("fedavg", "fedprox"):
            raise ValueError("client-level DP-FedAvg replaces the aggregation: use rule fedavg")
        if self.rule.name == "krum" and self.clients_per_round - self.rule.byzantine - 2 < 1:
            raise ValueError(f"krum needs clients_per_round - byzantine - 2 >= 1 (got {self.clients_per_round} and {self.rule.byzantine})")
        if self.rule.name == "trimmed_mean" and not 2 * self.rule.trim < self.clients_per_round:
            raise ValueError(f"trimmed_mean cannot drop {self.rule.trim} from each side of {self.clients_per_round} updates a round")
        if self.private_source is not None and (self.training.proximal_mu > 0 or self.rule.name == "scaffold"):
            raise ValueError("DP-SGD local steps support plain local training only (no FedProx term, no SCAFFOLD correction)")
        if self.min_clients is not None and self.min_clients > self.clients_per_round:
            raise ValueError(f"min_clients {self.min_clients} exceeds the {self.clients_per_round} clients asked each round")
        if self.client_dp is not None and self.update_encoding != "float32":
            raise ValueError("client-level DP needs each update's norm bound to hold as sent: use update_encoding float32")
        if self.private_source is not None and self.round_retries:
            raise ValueError("round_retries with data: private would run DP-SGD steps beyond the plan the budgets were checked against")
        if self.secure_aggregation is not None:
            problem = conflicts(self.secure_aggregation, self.rule.name, self.update_encoding, self.round_retries, self.min_clients,
                                self.asked_per_round, self.client_dp.clip_norm if self.client_dp else None)
            if problem:
                raise ValueError(problem)
        return self

    @property
    def asked_per_round(self) -> int:
        return len(self.clients) if self.client_dp is not None else self.clients_per_round

    @property
    def sample_rate(self) -> float:
        return self.clients_per_round / len(self.clients)

    def round_seed(self, round_number: int, purpose: str) -> int:
        return int(sha256_text(f"{self.seed}:fedtune:server:{round_number}:{purpose}")[:15], 16)


def sample_clients(job: FedJob, round_number: int) -> list[str]:
    """The clients asked this round: uniformly without replacement, from the public seed; with
    client-level DP every client, each of which then draws its own coin (what its accountant
    assumes: Poisson sampling at q that no one else can predict)."""
    if job.client_dp is not None:
        return list(job.clients)
    rng = np.random.default_rng(job.round_seed(round_number, "sample"))
    chosen = rng.choice(len(job.clients), size=job.clients_per_round, replace=False)
    return [job.clients[i] for i in sorted(chosen)]


def participation(job: FedJob, after: int = 0) -> dict[str, int]:
    """Rounds each client will be asked in (those after round `after`): known before training, so
    budgets are checked first (with client-level DP an upper bound: a client joins only when its
    coin says so)."""
    counts = dict.fromkeys(job.clients, 0)
    for r in range(after + 1, job.rounds + 1):
        for c in sample_clients(job, r):
            counts[c] += 1
    return counts


def task_for(job: FedJob, client_id: str, round_number: int) -> ClientTask:
    client_dp = job.client_dp
    return ClientTask(
        round=round_number, client_id=client_id, seed=job.seed, base_model=job.base_model, lora=job.lora, training=job.training,
        scaffold=job.rule.name == "scaffold", records=job.records[client_id] if job.records is not None else None,
        private_source=job.private_source, local_dp=job.local_dp[client_id] if job.local_dp else None,
        join_probability=job.sample_rate if client_dp else None, update_clip_norm=client_dp.clip_norm if client_dp else None,
        reproducible_coins=job.reproducible_noise, update_encoding=job.update_encoding, run_dir=job.run_dir, device=job.device,
    )


class Transport(Protocol):
    def fit(self, tasks: list[ClientTask], params: Params, server_control: Params | None) -> tuple[list[ClientUpdate], dict[str, str]]:
        """The updates that arrived, and for each client whose did not, why."""
        ...

    def client_state(self) -> dict[str, Params]:
        """What the clients keep between rounds where this process holds it (SCAFFOLD's c_i in
        `local`), for the checkpoint; {} where the clients keep it themselves."""
        ...

    def restore(self, state: dict[str, Params]) -> None: ...

    @property
    def holds_client_state(self) -> bool:
        """Whether `client_state` is the clients' whole state (a checkpoint can then restore it)."""
        ...


class SecureTransport(Transport, Protocol):
    def fit_secure(self, tasks: list[ClientTask], params: Params, weights: dict[str, int], plan: SecAggPlan, round_number: int) -> SecureSum:
        """The weighted mean of the updates, through secure aggregation, and who is in it."""
        ...


def aggregate(job: FedJob, x: Params, updates: list[ClientUpdate], state: agg.ServerState, round_number: int, noise: SecureRandom | None) -> Params:
    rule = job.rule
    deltas = [u.update for u in updates]
    if job.client_dp is not None:
        return agg.dp_fedavg(x, deltas, job.client_dp.clip_norm, job.client_dp.noise_multiplier, job.sample_rate * len(job.clients),
                             noise.normal_values)
    if not updates:
        return x
    # on private data the clients do not send their example counts (a statistic of their data)
    weights = [float(u.num_examples) for u in updates] if all(u.num_examples is not None for u in updates) else [1.0] * len(updates)
    if rule.name in ("fedavg", "fedprox"):
        return agg.fedavg(x, deltas, weights, rule.server_lr)
    if rule.name == "fedavgm":
        return agg.fedavgm(x, deltas, weights, state, rule.server_lr, rule.momentum)
    if rule.name in ("fedadagrad", "fedyogi", "fedadam"):
        return agg.fedopt(rule.name, x, deltas, weights, state, rule.server_lr, rule.beta1, rule.beta2, rule.tau)
    if rule.name == "scaffold":
        return agg.scaffold(x, deltas, [u.control_delta for u in updates], state, len(job.clients), rule.server_lr)
    if rule.name == "median":
        return agg.coordinate_median(x, deltas)
    if rule.name == "trimmed_mean":
        return agg.trimmed_mean(x, deltas, rule.trim)
    return agg.krum(x, deltas, rule.byzantine)


def aggregate_mean(job: FedJob, x: Params, mean: Params, in_sum: int, state: agg.ServerState, noise: SecureRandom | None) -> Params:
    """The rules that need only the (weighted) mean update, from the mean secure aggregation gives."""
    rule = job.rule
    if job.client_dp is not None:  # every client's weight is 1: the mean times the count is the sum
        total = {n: np.asarray(v, dtype=np.float64) * in_sum for n, v in mean.items()}
        return agg.dp_fedavg_sum(x, total, job.client_dp.clip_norm, job.client_dp.noise_multiplier, job.sample_rate * len(job.clients), noise.normal_values)
    if rule.name in ("fedavg", "fedprox"):
        return agg.apply(x, mean, rule.server_lr)
    if rule.name == "fedavgm":
        return agg.fedavgm(x, [mean], [1.0], state, rule.server_lr, rule.momentum)
    if rule.name in ("fedadagrad", "fedyogi", "fedadam"):
        return agg.fedopt(rule.name, x, [mean], [1.0], state, rule.server_lr, rule.beta1, rule.beta2, rule.tau)
    raise KsgError(f"rule {rule.name} needs each update, which secure aggregation does not give the server")


def secure_weights(job: FedJob, asked: list[str]) -> tuple[dict[str, int], float]:
    """Each client's weight in the secure sum, and the largest: the server's own figures, as in
    `aggregate` (synthetic example counts, which the server sent; else 1: private data and
    client-level DP weight equally)."""
    if job.client_dp is None and job.records is not None:
        weights = {c: len(job.records[c]) for c in asked}
    else:
        weights = dict.fromkeys(asked, 1)
    return weights, float(max(weights.values()))


def secure_round(job: FedJob, transport: SecureTransport, asked: list[str], round_number: int, x: Params) -> tuple[RoundReplies, SecureSum]:
    """A round through secure aggregation: the mean of the updates in the sum, and what the clients
    sent beside them; else a clear error."""
    if not hasattr(transport, "fit_secure"):
        raise KsgError("secure aggregation runs over Flower (engine flower-sim or flower-deploy)")
    weights, max_weight = secure_weights(job, asked)
    plan = resolve(job.secure_aggregation, len(asked), job.client_dp.clip_norm if job.client_dp else None, max_weight)
    tasks = [task_for(job, c, round_number) for c in asked]
    if job.client_dp is not None:  # each client clips a little tighter, so that its rounded update keeps the norm bound
        clip = quantized_clip_norm(job.client_dp.clip_norm, plan, sum(v.size for v in x.values()))
        tasks = [t.model_copy(update={"update_clip_norm": clip}) for t in tasks]
    result = transport.fit_secure(tasks, x, weights, plan, round_number)
    needed = len(asked) if job.min_clients is None else min(job.min_clients, len(asked))
    if len(result.in_sum) < needed:
        reasons = "; ".join(f"{c}: {why}" for c, why in result.failed.items())
        raise KsgError(f"round {round_number}: {len(result.in_sum)} of {len(asked)} clients are in the secure sum, fewer than the {needed} needed (min_clients): {reasons}")
    replies = RoundReplies(result.replies, result.failed, 1, len(asked) * params_bytes(x), result.bytes_up)
    return replies, result


@dataclass
class RoundReplies:
    replies: list[ClientUpdate]  # in the order asked (arrival order must not change the result), decoded
    failed: dict[str, str]  # client -> why it did not answer
    tries: int
    bytes_down: int
    bytes_up: int


def collect_round(job: FedJob, transport: Transport, asked: list[str], round_number: int, x: Params, state: agg.ServerState) -> RoundReplies:
    """Enough replies for the round, asking the clients that failed again up to `round_retries`
    times; else a clear error."""
    needed = len(asked) if job.min_clients is None else min(job.min_clients, len(asked))
    replies: dict[str, ClientUpdate] = {}
    failed: dict[str, str] = {}
    tries = bytes_down = bytes_up = 0
    while tries <= job.round_retries:
        tries += 1
        pending = [c for c in asked if c not in replies]
        arrived, failed = transport.fit([task_for(job, c, round_number) for c in pending], x, state.c or None) if pending else ([], {})
        strangers = sorted({u.client_id for u in arrived} - set(pending))
        if strangers:
            raise KsgError(f"round {round_number}: replies came from {strangers}, who were not asked")
        bytes_down += len(pending) * (params_bytes(x) + params_bytes(state.c or None))
        for u in arrived:
            bytes_up += params_bytes(u.update) + params_bytes(u.control_delta)
            try:
                u.update = decode_update(u.update, x) if u.update is not None else None
            except ValueError as err:
                failed[u.client_id] = f"its update could not be read: {err}"
                continue
            replies[u.client_id] = u
        if len(replies) == len(asked):
            break
    if len(replies) < needed:
        reasons = "; ".join(f"{c}: {why}" for c, why in failed.items())
        raise KsgError(f"round {round_number}: {len(replies)} of {len(asked)} clients answered after {tries} tr{'y' if tries == 1 else 'ies'}, "
                       f"fewer than the {needed} needed (min_clients): {reasons}")
    return RoundReplies([replies[c] for c in asked if c in replies], failed, tries, bytes_down, bytes_up)


def run_federation(job: FedJob, x: Params, transport: Transport, on_round: Callable[[RoundRecord], None] | None = None,
                   checkpoint: Path | None = None) -> tuple[Params, list[RoundRecord]]:
    """The rounds; with `checkpoint`, the state after each round is saved there and a restarted
    job with the same settings goes on after the last round saved."""
    state = agg.ServerState()
    history: list[RoundRecord] = []
    tail: Params = {}  # the sum of the global adapters after the rounds the final adapter averages
    digest = resume_digest(job)
    if checkpoint is not None and checkpoint.is_file() and job.rule.name == "scaffold" and not transport.holds_client_state:
        console.print("fedtune: not resuming: the clients' SCAFFOLD control variates were theirs and are gone; starting from round 1")
    elif checkpoint is not None and checkpoint.is_file():
        saved = load_checkpoint(checkpoint, digest)
        if saved is not None:
            x, state, history, clients, tail = saved
            transport.restore(clients)
            console.print(f"fedtune: resuming after round {len(history)} of {job.rounds} (checkpoint {checkpoint.name})")
    # client-level DP noise: fresh OS entropy for the whole job (never from the public seed)
    noise = SecureRandom.for_release(job.reproducible_noise, job.seed, "fedtune-server-noise") if job.client_dp is not None else None
    for r in range(len(history) + 1, job.rounds + 1):
        start = time.perf_counter()
        asked = sample_clients(job, r)
        extra = {}
        if job.secure_aggregation is None:
            round_replies = collect_round(job, transport, asked, r, x, state)
            updates = [u for u in round_replies.replies if u.joined]
            new_x = aggregate(job, x, updates, state, r, noise)
        else:  # the replies carry no update: the mean of those in the sum is all the server gets
            round_replies, secure = secure_round(job, transport, asked, r, x)
            updates = round_replies.replies
            new_x = aggregate_mean(job, x, secure.mean, len(secure.in_sum), state, noise)
            # with client-level DP, every client that answered (zeros if its coin said no)
            extra["secure_aggregation"] = {"in_sum": secure.in_sum, "answered": secure.answered}
        step = np.sqrt(sum(float(((new_x[n] - x[n]) ** 2).sum()) for n in x))
        x = {n: v.astype(np.float32) for n, v in new_x.items()}
        private = job.local_dp is not None
        losses = [u.loss for u in updates if u.loss is not None]
        examples = [u.num_examples for u in updates]
        if job.client_dp is None:
            extra["dp_steps"] = {u.client_id: u.dp_steps for u in updates if u.dp_steps}
        record = RoundRecord(
            r, asked, None if job.client_dp is not None else [u.client_id for u in updates],
            None if private or None in examples else sum(examples), None if private or not losses else float(np.mean(losses)),
            step, time.perf_counter() - start, extra,
            [u.release for u in round_replies.replies if u.release is not None],  # with client-level DP, from every client that answered
            round_replies.failed, round_replies.tries, round_replies.bytes_down,
            None if job.client_dp is not None else round_replies.bytes_up,  # with client-level DP, the bytes would count who joined
        )
        history.append(record)
        if r > job.rounds - job.average_last:
            tail = {n: tail.get(n, 0.0) + v.astype(np.float64) for n, v in x.items()}
        if checkpoint is not None:
            save_checkpoint(checkpoint, digest, x, state, history, transport.client_state(), tail)
            named_crash_point(f"fedtune-round-{r}")
        if on_round:
            on_round(record)
    if job.average_last > 1:
        # LoRA's factors are averaged, not their products (as FedAvg averages the clients'): the
        # tail's adapters lie on one trajectory, close enough for the product of means to stand in
        x = {n: (v / job.average_last).astype(np.float32) for n, v in tail.items()}
    return x, history


def resume_digest(job: FedJob) -> str:
    """What a checkpoint must match to be resumed: the job less what does not change what its rounds
    compute (where the run, the model cache and the clients' ledgers are, the device, the cap). A
    change of those had started the rounds again: on private data, each a release made anew."""
    local = {c: {"cap_epsilon", "ledger_dir"} for c in job.local_dp or {}}
    kept = job.model_dump(mode="json", exclude={"device": True, "run_dir": True, **({"local_dp": local} if local else {})})
    kept["base_model"] = {k: v for k, v in job.base_model.items() if k != "path"}  # its weights' digest stays
    return sha256_text(canonical_json(kept))


def save_checkpoint(path: Path, digest: str, x: Params, state: agg.ServerState, history: list[RoundRecord], clients: dict[str, Params],
                    tail: Params) -> None:
    """One file, written atomically: the global adapter, the server optimizer's state, the
    clients' state this process holds, the running sum of the tail's adapters (`average_last`),
    and the rounds so far, for the job with this digest."""
    arrays = {f"x/{n}": v for n, v in x.items()}
    arrays.update({f"tail/{n}": v for n, v in tail.items()})
    for part, values in (("m", state.m), ("v", state.v), ("c", state.c)):
        arrays.update({f"{part}/{n}": np.asarray(v, dtype=np.float32) for n, v in values.items()})
    for client, values in clients.items():
        arrays.update({f"client/{client}/{n}": v for n, v in values.items()})
    meta = json.dumps({"job": digest, "history": [asdict(r) for r in history]})
    arrays["meta"] = np.frombuffer(meta.encode("utf-8"), dtype=np.uint8)
    save_params(path, arrays)


def checkpoint_meta(path: Path) -> dict:
    try:
        meta = json.loads(load_params(path)["meta"].tobytes().decode("utf-8"))
        if not isinstance(meta, dict) or not isinstance(meta.get("history"), list) or "job" not in meta:
            raise ValueError("no job digest and round history")
        return meta
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:  # cut short or edited: never a traceback
        raise KsgError(f"{path}: a damaged fedtune checkpoint ({type(err).__name__}); remove it to start the rounds again (those released stay counted)") from None


def resumed_history(path: Path, job: FedJob | None = None) -> list[dict]:
    """The rounds a checkpoint at `path` saved for this job ([]: none, or another job's); for
    whichever job saved it where `job` is None (`ksg run`'s check before the job is built)."""
    if not path.is_file():
        return []
    meta = checkpoint_meta(path)
    return meta["history"] if job is None or meta["job"] == resume_digest(job) else []


def round_releases(history: list[dict]) -> list[LedgerEntry]:
    """The ledger entries the clients sent with the rounds of a checkpoint's history."""
    return [LedgerEntry.model_validate(e) for record in history for e in record.get("releases", [])]


def load_checkpoint(path: Path, digest: str) -> tuple[Params, agg.ServerState, list[RoundRecord], dict[str, Params], Params] | None:
    """The saved state, or None when it belongs to a job with other settings."""
    arrays = load_params(path)
    meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
    if meta["job"] != digest:
        console.print(f"fedtune: {path.name} is from a job with other settings; starting from round 1")
        return None
    parts: dict[str, dict] = {"x": {}, "m": {}, "v": {}, "c": {}, "tail": {}}
    clients: dict[str, Params] = {}
    for key, value in arrays.items():
        head, _, name = key.partition("/")
        if head == "client":
            client, _, name = name.partition("/")
            clients.setdefault(client, {})[name] = value
        else:
            parts[head][name] = value
    state = agg.ServerState(m=parts["m"], v=parts["v"], c=parts["c"])
    return parts["x"], state, [RoundRecord(**r) for r in meta["history"]], clients, parts["tail"]


class LocalTransport:
    """In process, clients one after another: deterministic, for tests and single machines."""

    def __init__(self) -> None:
        self.runtime = ClientRuntime()

    def fit(self, tasks: list[ClientTask], params: Params, server_control: Params | None) -> tuple[list[ClientUpdate], dict[str, str]]:
        updates, failed = [], {}
        for task in tasks:
            try:
                updates.append(self.runtime.fit(task, params, server_control))
            except Exception as err:  # a client that fails is one failed client, not a failed federation
                console.print(f"client {task.client_id}, round {task.round}: {err}")  # its own log (one process holds both sides here)
                failed[task.client_id] = failure_reason(err)
        return updates, failed

    def client_state(self) -> dict[str, Params]:
        return self.runtime.controls

    def restore(self, state: dict[str, Params]) -> None:
        self.runtime.controls = {c: dict(v) for c, v in state.items()}

    @property
    def holds_client_state(self) -> bool:
        return True
