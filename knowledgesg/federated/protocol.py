"""What the server and the clients of `fedtune` say to each other, as plain data.

The same messages travel in every engine: as Python objects in `local`, inside Flower `Message`s
(a JSON `ClientTask` in a ConfigRecord, parameters in ArrayRecords) in `flower-sim` and
`flower-deploy`. Parameters are LoRA tensors by name, as float32 numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from knowledgesg.fileio import atomic_open
from knowledgesg.models import Precision
from knowledgesg.spec import SafeId, StrictModel

Params = dict[str, np.ndarray]

RULES = ("fedavg", "fedprox", "fedavgm", "fedadagrad", "fedyogi", "fedadam", "scaffold", "median", "trimmed_mean", "krum")


class LocalTraining(StrictModel):
    """Each sampled client's work in a round."""

    steps: int = Field(default=4, ge=1, le=1_000_000, description="local optimizer steps per round")
    batch_size: int = Field(default=8, ge=1)
    learning_rate: float = Field(default=2e-3, gt=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    max_length: int = Field(default=128, ge=16)
    loss_on: Literal["response", "all"] = "response"
    proximal_mu: float = Field(default=0.0, ge=0, description="FedProx: mu/2 ||w - x||^2 added to the local loss")
    precision: Precision = Field(
        default="float32", description="each party's frozen base weights (auto: bfloat16 where its CPU or GPU runs it natively); "
        "the adapter, the update sent and, with local DP, the clipped gradients stay float32")


class LoraShape(StrictModel):
    r: int = Field(default=8, ge=1)
    alpha: int = Field(default=16, ge=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    # FFA-LoRA (Sun et al., ICLR 2024): A stays at LoRA's initialisation drawn from the public
    # `a_seed` on every party; only B is trained, sent and aggregated (half the bytes, and the
    # product of averaged factors is the average of the products)
    ffa: bool = False
    a_seed: int = 0
    a_sha256: str | None = None  # set by the server: every party checks its A against it


class LocalDP(StrictModel):
    """DP-SGD local steps on private records: the mechanism the client runs (from the server's plan),
    and what the client needs to keep its own ledger. The client draws its own noise; it refuses
    to send an update that would take it past `cap_epsilon`."""

    noise_multiplier: float = Field(gt=0)  # planned by the server (calibrated, or a spec's within NOISE_MULTIPLIER_RANGE)
    clip_norm: float = Field(gt=0)
    sample_rate: float = Field(gt=0, le=1)
    num_units: int = Field(ge=1, description="N as planned: the client's released (noised) count, or its exact N where that is public; the client checks it against its own")
    delta: float = Field(gt=0, lt=1)
    unit: Literal["record", "user"] = "record"
    # at least 1: a bound of 0 or below would empty small units, and the error that follows would
    # tell the server whether any unit is that small (a membership test)
    max_records_per_user: int = Field(8, ge=1)
    documents: bool = False  # the spec's ClientsSpec.holds_documents: the unit is the source document
    cap_epsilon: float | None = None
    ledger_dir: str | None = None  # default: <run_dir>/ledger; a SuperNode's `ledger-dir` wins
    reproducible_noise: bool = False  # NOT PRIVATE: noise from the public seed


def failure_reason(err: BaseException) -> str:
    """What the server learns of a client's failure: its kind only. An exception's message may
    quote the client's data (a record id, a count, a path): that stays in the client's own log."""
    return f"{type(err).__name__} on the client (the message stays in its log)"


RUN_STAGES = "query.run_stages"  # a Flower query; its action names the ClientApp handler


class StagesJob(BaseModel):
    """What the ServerApp is asked to do for a run split by role: collect every client's releases
    into `exchange` (knowledgesg.federated.stages)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["stages"] = "stages"
    clients: list[str]
    exchange: str
    timeout_s: float
    result: str  # where the ServerApp says which clients sent and which failed, and why


DELIVER_PUBLISHED = "query.published"  # the server's published releases, to every client's node


class DeliveryJob(BaseModel):
    """What the ServerApp is asked to do once the server has published: send the `publish`
    directory to every client's node, which keeps it and evaluates it against its own data."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["deliver"] = "deliver"
    clients: list[str]
    published: str  # the server's stages/publish directory
    timeout_s: float
    result: str  # where the ServerApp says which clients kept the releases and which failed, and why


UpdateEncoding = Literal["float32", "float16", "int8"]
SCALE = "@scale"  # int8: the per-tensor scale travels beside the tensor, under its name + SCALE


def encode_update(update: Params, encoding: UpdateEncoding) -> Params:
    """An update as a client sends it: float16 halves the bytes; int8 quarters them, with one
    float32 scale per tensor (symmetric, max |value| to 127, rounded to nearest)."""
    if encoding == "float32":
        return update
    if encoding == "float16":
        return {name: value.astype(np.float16) for name, value in update.items()}
    sent = {}
    for name, value in update.items():
        scale = float(np.abs(value).max()) / 127 or 1.0
        sent[name] = np.round(value / scale).astype(np.int8)
        sent[name + SCALE] = np.array([scale], dtype=np.float32)
    return sent


def decode_update(sent: Params, like: Params) -> Params:
    """float32 arrays again, whatever the encoding; refuses (ValueError) one that does not have the
    names and shapes of `like`, the parameters it updates."""
    decoded = {}
    for name, value in sent.items():
        if name.endswith(SCALE):
            continue
        if value.dtype == np.int8:
            if name + SCALE not in sent:
                raise ValueError(f"'{name}' came as int8 without its scale")
            decoded[name] = value.astype(np.float32) * sent[name + SCALE][0]
        else:
            decoded[name] = value.astype(np.float32)
    if set(decoded) != set(like) or any(decoded[n].shape != like[n].shape for n in like):
        raise ValueError("its names or shapes are not the adapter's")
    return decoded


def params_bytes(params: Params | None) -> int:
    return sum(value.nbytes for value in params.values()) if params else 0


class ClientTask(BaseModel):
    """One round's instruction to one client."""

    model_config = ConfigDict(extra="forbid")

    round: int
    client_id: SafeId  # a directory name on the client's side: no path in it
    seed: int  # public: seeds non-private randomness only (batches of synthetic data)
    base_model: dict  # ResolvedModel fields (name, path, kind, weights_sha256, description)
    lora: LoraShape
    training: LocalTraining
    scaffold: bool = False
    # Synthetic (public) training data travels with the task; private data never does: the
    # client reads it from its own storage (`private_source`) and trains with DP-SGD.
    records: list[dict] | None = None
    private_source: SafeId | None = None  # stage whose clients/<id>/records.jsonl the client reads
    local_dp: LocalDP | None = None
    # client-level DP-FedAvg: the client joins with this probability, by its own coin, and clips
    # its update to `update_clip_norm` before it leaves
    join_probability: float | None = Field(default=None, gt=0, le=1)
    update_clip_norm: float | None = Field(default=None, gt=0)
    reproducible_coins: bool = False  # NOT PRIVATE: the join coin from the public seed
    update_encoding: UpdateEncoding = "float32"  # how the client's update travels (encode_update)
    run_dir: str | None = None  # where a client on this machine finds its storage (local, flower-sim)
    device: str = "cpu"

    @model_validator(mode="after")
    def _one_data_source(self) -> ClientTask:
        if (self.records is None) == (self.private_source is None):
            raise ValueError("a task carries synthetic records or names a private source, not both")
        if self.private_source is not None and self.local_dp is None:
            raise ValueError("private data is trained on with DP-SGD only")
        return self


@dataclass
class ClientUpdate:
    client_id: str
    update: Params | None  # trained minus received parameters; None: the client's coin said no
    # On private data the client sends neither its example count nor its loss (un-noised
    # statistics of its records): the server weights updates equally.
    num_examples: int | None
    loss: float | None
    control_delta: Params | None = None  # SCAFFOLD: c_i+ - c_i
    dp_steps: int = 0  # DP-SGD steps the client's accountant counted this round
    release: dict | None = None  # the ledger entry the client recorded for this update

    @property
    def joined(self) -> bool:
        return self.update is not None


@dataclass
class RoundRecord:
    round: int
    clients: list[str]  # asked this round (with client-level DP: all; each drew its own coin)
    joined: list[str] | None  # None with client-level DP: who joined is not recorded
    num_examples: int | None  # None on private data
    mean_loss: float | None  # None on private data
    update_norm: float
    seconds: float
    extra: dict = field(default_factory=dict)
    releases: list[dict] = field(default_factory=list)  # ledger entries the clients sent
    failed: dict[str, str] = field(default_factory=dict)  # client asked -> why its update did not arrive
    tries: int = 1  # 1 + the times the clients that had not answered were asked again
    bytes_down: int = 0  # parameters sent to the clients (the global adapter, SCAFFOLD's c), every try
    bytes_up: int | None = 0  # updates (as encoded) and control variates that came back; None with client-level DP


def save_params(path: Path, params: Params) -> None:
    with atomic_open(path, "wb", encoding=None) as handle:
        np.savez(handle, **params)


def load_params(path: Path) -> Params:
    with np.load(path) as data:
        return {name: data[name] for name in sorted(data.files)}
