"""Secure aggregation for `fedtune` over Flower: SecAgg+ (Bell et al. 2020), Flower's implementation.

With `secure_aggregation` set, a round's updates do not reach the server one by one: each client
quantizes its (weighted) update, masks it with pairwise masks agreed with its neighbours and a
private mask, and the server learns only the sum of the masked vectors, from which the masks
cancel. The server then holds the weighted mean of the updates that are in the sum, and nothing
from which a single update can be recovered (unless it colludes with `reconstruction_threshold`
or more clients; SecAgg+ assumes an honest-but-curious server: one that follows the protocol).

The pieces:
- server: `secure_sum` runs Flower's `SecAggPlusWorkflow` (four rounds of messages per fedtune
  round) on the ServerApp's Grid, for the round's tasks, with a stub strategy that hands out our
  tasks as the legacy FitIns and captures the unmasked aggregate.
- client: `secure_aggregation_mod` wraps the ClientApp's `train` handler. A message of the
  protocol goes through Flower's `secaggplus_mod`, which calls the unchanged handler (through
  `as_legacy_fit`, which translates between the legacy FitIns/FitRes and our train message) and
  sends the masked update in place of the update. Any other train message passes straight on,
  unless the node's config says `secure-aggregation = "required"`: then it is refused.

Quantization: each coordinate of a weighted update is clipped to [-clipping_range, clipping_range]
(values beyond it are CUT) and stochastically rounded to one of `quantization_range` levels, so a
coordinate of the mean is off by less than 2 clipping_range / quantization_range (`quantum`) with
equal weights, and by less than `mean_error_bound` with unequal ones.
With client-level DP the clipping range is the clip norm (a coordinate of a clipped update never
exceeds its norm, so nothing is cut), and each client clips to slightly less than the norm so that
its rounded update still lies within it (`quantized_clip_norm`): the sensitivity the accountant
assumes holds for what enters the sum.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import math
from dataclasses import dataclass

import numpy as np
from pydantic import Field

from knowledgesg.errors import KsgError
from knowledgesg.federated.protocol import ClientTask, ClientUpdate, Params
from knowledgesg.spec import StrictModel

MODULUS = 2**32  # Flower's default mask modulus: the sum of the quantized values must stay below it
DEFAULT_CLIPPING_RANGE = 8.0
# the rules that need each update (or its control variate), which the server no longer sees
NEEDS_SINGLE_UPDATES = ("scaffold", "median", "trimmed_mean", "krum")
# what the server puts beside the task in each client's FitIns
TASK, NAMES, WEIGHT = "task", "names", "weight"


class SecureAggregation(StrictModel):
    """SecAgg+ settings (`fedtune: secure_aggregation: {...}`, or `true` for these defaults)."""

    num_shares: int | None = Field(default=None, ge=3, description="each client's mask secrets are shared among this many clients, itself included (odd); default: every client asked in the round")
    reconstruction_threshold: int | None = Field(default=None, ge=2, description="shares that unmask a client; a round needs this many clients in the sum, and the server with fewer colluding clients learns nothing of one update; default: a majority of the shares")
    clipping_range: float | None = Field(default=None, gt=0, description="each coordinate of an update is cut to +-this before quantization; default: the client-level DP clip norm, else 8")
    quantization_range: int = Field(default=2**22, ge=2, description="levels per coordinate; the mean is off by < 2 clipping_range / quantization_range")


@dataclass(frozen=True)
class SecAggPlan:
    """The settings for one round, resolved against the job."""

    num_shares: int  # of the clients asked
    threshold: int
    clipping_range: float
    quantization_range: int
    max_weight: float  # the largest client weight (the server's, never the client's own count)
    every_client_shares: bool  # num_shares is every client asked (Flower's fraction 1.0)

    @property
    def quantum(self) -> float:
        return 2 * self.clipping_range / self.quantization_range


def resolve(settings: SecureAggregation, asked: int, clip_norm: float | None, max_weight: float) -> SecAggPlan:
    shares = settings.num_shares or asked
    return SecAggPlan(num_shares=shares, threshold=settings.reconstruction_threshold or max(2, shares // 2 + 1),
                      clipping_range=settings.clipping_range or clip_norm or DEFAULT_CLIPPING_RANGE, quantization_range=settings.quantization_range,
                      max_weight=max_weight, every_client_shares=shares == asked)


def conflicts(settings: SecureAggregation, rule: str, update_encoding: str, round_retries: int, min_clients: int | None,
              asked: int | None, clip_norm: float | None) -> str | None:
    """Why these job settings cannot run with secure aggregation (one line), or None. `asked`: the
    clients asked each round, where known."""
    if rule in NEEDS_SINGLE_UPDATES:
        return f"secure aggregation shows the server the sum of the updates only, and rule {rule} needs each update: use fedavg, fedprox, fedavgm or an adaptive rule"
    if update_encoding != "float32":
        return "secure aggregation quantizes the updates itself: use update_encoding float32"
    if round_retries:
        return "secure aggregation with round_retries would sum the retried clients apart (a sum of one client is its update): leave round_retries at 0"
    if clip_norm is not None and settings.clipping_range is not None and settings.clipping_range < clip_norm:
        return f"secure_aggregation.clipping_range {settings.clipping_range:g} would cut clipped updates (client_dp.clip_norm {clip_norm:g}): leave it unset"
    if asked is None:
        return None
    plan = resolve(settings, asked, clip_norm, 1.0)
    if asked < 2:
        return "secure aggregation needs at least 2 clients asked each round"
    if plan.num_shares > asked:
        return f"secure_aggregation.num_shares {plan.num_shares} exceeds the {asked} clients asked each round"
    if not plan.every_client_shares and plan.num_shares % 2 == 0:
        return f"secure_aggregation.num_shares must be odd (each client shares with as many neighbours on either side), got {plan.num_shares}"
    if plan.threshold > plan.num_shares or (not plan.every_client_shares and plan.threshold == plan.num_shares):
        return f"secure_aggregation.reconstruction_threshold {plan.threshold} must be below num_shares {plan.num_shares} (or at most every client asked)"
    if min_clients is not None and min_clients < plan.threshold:
        return f"min_clients {min_clients} is below the reconstruction threshold {plan.threshold}: a round with fewer clients cannot be unmasked"
    if plan.quantization_range * asked >= MODULUS:
        return f"secure_aggregation.quantization_range {plan.quantization_range} times the {asked} clients asked must stay below 2^32 (the mask modulus)"
    return None


def mean_error_bound(plan: SecAggPlan, weights: list[float]) -> float:
    """How far a coordinate of the secure mean can be from the exact weighted mean: each client's
    weighted coordinate (weight / max_weight times the update) rounds by less than one quantum, and
    the sum of those is divided by the sum of weight / max_weight. (The weights themselves are
    rounded to multiples of max_weight / quantization_range: exact for whole-number ratios.)"""
    return len(weights) * plan.quantum * plan.max_weight / sum(weights)


def quantized_clip_norm(clip_norm: float, plan: SecAggPlan, num_params: int) -> float:
    """The norm a client clips to so that its update, once rounded to the quantization grid (each
    coordinate moves by less than one quantum), still has norm at most `clip_norm`."""
    clip = clip_norm - 1.01 * math.sqrt(num_params) * plan.quantum  # 1%: float64 rounding in the shift and scale
    if clip < 0.5 * clip_norm:
        raise KsgError(f"secure aggregation: quantization_range {plan.quantization_range} is too coarse for {num_params} parameters under client-level DP "
                       f"(rounding could move an update by {math.sqrt(num_params) * plan.quantum:.3g}, against clip norm {clip_norm:g}): raise it")
    return clip


def full_key_masks(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """The masks of one seed, from all of it: SHAKE-256 of the seed, read as little-endian 32-bit
    words modulo `num_range` (a power of 2 at most 2^32: uniform). Flower 1.41's `pseudo_rand_gen`
    folds the seed to 32 bits and seeds numpy's RandomState with that, so a server that learns the
    private-mask seeds at unmasking could find a pairwise mask in 2^32 tries and recover an update
    (flwrlabs/flower#7522). Both ends call this instead (`use_full_key_masks`)."""
    sizes = [math.prod(d) for d in dimensions_list]  # a shape () holds one value
    words = np.frombuffer(hashlib.shake_256(seed).digest(4 * sum(sizes)), dtype="<u4").astype(np.int64) % num_range
    masks, start = [], 0
    for dimension, size in zip(dimensions_list, sizes):
        masks.append(words[start : start + size].reshape(dimension))
        start += size
    return masks


def use_full_key_masks() -> None:
    """Point Flower's SecAgg+ server workflow and client mod at `full_key_masks` (both import
    `pseudo_rand_gen` by name into their modules); every party calls it before a secure round."""
    # by module path: the package re-exports the function `secaggplus_mod` under its module's name
    for name in ("flwr.client.mod.secure_aggregation.secaggplus_mod", "flwr.server.workflow.secure_aggregation.secaggplus_workflow"):
        importlib.import_module(name).pseudo_rand_gen = full_key_masks


@dataclass
class SecureSum:
    mean: Params  # the weighted mean of the updates in the sum (float64)
    in_sum: list[str]  # the clients whose masked update is in it, in the order asked
    replies: list[ClientUpdate]  # what else they sent (update None: the server never has it)
    failed: dict[str, str]  # client asked -> why it is not in the sum
    bytes_up: int  # the masked vectors
    answered: dict[str, list[str]]  # protocol stage (setup, share_keys, collect_masked_vectors, unmask) -> the clients that answered it


# -- server ---------------------------------------------------------------------------------


class RecordingGrid:
    """The ServerApp's Grid, keeping each reply the protocol receives: who failed, and why."""

    def __init__(self, grid) -> None:
        self.grid = grid
        self.errors: dict[int, str] = {}  # node -> the first error it replied with
        self.masked_bytes = 0
        self.answered: dict[str, list[int]] = {}  # protocol stage -> the nodes that answered it

    def send_and_receive(self, messages, *, timeout: float | None = None):
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

        messages = list(messages)
        stages = {m.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE] for m in messages if RECORD_KEY_CONFIGS in m.content.config_records}
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for stage in stages:  # one stage per call
            self.answered.setdefault(str(stage), []).extend(r.metadata.src_node_id for r in replies if not r.has_error())
        for reply in replies:
            if reply.has_error():
                self.errors.setdefault(reply.metadata.src_node_id, reply.error.reason)
            elif Key.MASKED_PARAMETERS in reply.content.config_records.get(RECORD_KEY_CONFIGS, {}):
                self.masked_bytes += sum(len(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS])
        return replies

    def __getattr__(self, name: str):
        return getattr(self.grid, name)


class SumStrategy:
    """The two calls SecAggPlusWorkflow makes of a legacy Strategy: `configure_fit` hands out the
    round's FitIns (ours, prepared per node), `aggregate_fit` receives the unmasked aggregate."""

    def __init__(self, fit_ins: dict[int, object], grid) -> None:
        from flwr.server.compat.grid_client_proxy import GridClientProxy

        self.fit_ins = fit_ins
        self.proxies = {node: GridClientProxy(node, grid, 0) for node in fit_ins}
        self.results: list | None = None  # (proxy, FitRes) of the clients in the sum, once unmasked

    def configure_fit(self, server_round, parameters, client_manager):
        return [(self.proxies[node], ins) for node, ins in self.fit_ins.items()]

    def aggregate_fit(self, server_round, results, failures):
        self.results = list(results)
        return None, {}


def secure_sum(grid, nodes: dict[str, int], tasks: list[ClientTask], params: Params, weights: dict[str, int], plan: SecAggPlan,
               round_number: int, timeout_s: float | None) -> SecureSum:
    """One round's updates through SecAgg+: their weighted mean, and who is in it."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    use_full_key_masks()
    names = sorted(params)
    parameters = ndarrays_to_parameters([params[n] for n in names])  # the same for every client: serialized once
    fit_ins = {nodes[t.client_id]: FitIns(parameters, {TASK: t.model_dump_json(), NAMES: json.dumps(names), WEIGHT: weights[t.client_id]}) for t in tasks}
    recorder = RecordingGrid(grid)
    strategy = SumStrategy(fit_ins, recorder)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}), strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: round_number})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()  # unused: the FitIns carry the adapter
    workflow = SecAggPlusWorkflow(1.0 if plan.every_client_shares else plan.num_shares, plan.threshold, max_weight=plan.max_weight,
                                  clipping_range=plan.clipping_range, quantization_range=plan.quantization_range, modulus_range=MODULUS, timeout=timeout_s)
    workflow(recorder, context)

    client_of = {node: client for client, node in nodes.items()}
    asked = [t.client_id for t in tasks]
    if strategy.results is None:
        reasons = "; ".join(f"{client_of.get(n, n)}: {why}" for n, why in recorder.errors.items()) or "no errors reported (a reply timed out?)"
        raise KsgError(f"round {round_number}: secure aggregation halted: fewer than the reconstruction threshold {plan.threshold} of a client's "
                       f"neighbours remained ({reasons})")
    replies = {client_of[proxy.node_id]: reply_metadata(client_of[proxy.node_id], fit_res.metrics) for proxy, fit_res in strategy.results}
    mean = dict(zip(names, parameters_to_ndarrays(strategy.results[0][1].parameters)))  # every FitRes carries the aggregate
    failed = {c: recorder.errors.get(nodes[c], f"no reply within {timeout_s:g} s" if timeout_s else "no reply") for c in asked if c not in replies}
    answered = {stage: [c for c in asked if nodes[c] in nodes_of] for stage, nodes_of in recorder.answered.items()}
    return SecureSum(mean, [c for c in asked if c in replies], [replies[c] for c in asked if c in replies], failed, recorder.masked_bytes, answered)


def reply_metadata(client: str, metrics: dict) -> ClientUpdate:
    """What a client sent beside its masked update (as in a plain reply, less the update)."""
    if str(metrics.get("client-id")) != client:
        raise KsgError(f"a reply in the secure sum claimed to come from client {metrics.get('client-id')}, not {client}")
    release = json.loads(str(metrics["release"])) if "release" in metrics else None
    return ClientUpdate(client, None, int(metrics["num-examples"]) if "num-examples" in metrics else None,
                        float(metrics["loss"]) if "loss" in metrics else None, None, int(metrics.get("dp-steps", 0)), release)


# -- client ---------------------------------------------------------------------------------


REQUIRED = "secure-aggregation"  # node config: "required" refuses plain train messages
MIN_THRESHOLD = "secure-aggregation-min-threshold"  # node config: the least threshold (and neighbours) it accepts; default 2


def secure_aggregation_mod(msg, context, call_next):
    """A mod on the ClientApp's train handler: SecAgg+ messages go through Flower's `secaggplus_mod`;
    others pass on, unless this node requires secure aggregation."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    required = str(context.node_config.get(REQUIRED, "")) == "required"
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        if required:
            refuse_weak_protocol(msg.content.config_records[RECORD_KEY_CONFIGS], int(context.node_config.get(MIN_THRESHOLD, 2)))
        use_full_key_masks()
        return secaggplus_mod(msg, context, functools.partial(as_legacy_fit, call_next=call_next))
    if required:
        raise KsgError("this node sends its updates through secure aggregation only (node config secure-aggregation = \"required\")")
    return call_next(msg, context)


def refuse_weak_protocol(configs, minimum: int) -> None:
    """The server chooses the threshold and each client's neighbours: one that sends threshold 1,
    or no neighbours but the client itself, would get the update masked by the client's own mask
    alone and then its one share, the seed. A node that requires secure aggregation refuses both
    (Flower's mod already refuses to unmask with fewer active neighbours than the threshold)."""
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

    stage = configs.get(Key.STAGE)
    if stage == Stage.SETUP and min(int(configs[Key.THRESHOLD]), int(configs[Key.SHARE_NUMBER])) < minimum:
        raise KsgError(f"secure aggregation: the server asked for threshold {configs[Key.THRESHOLD]} of {configs[Key.SHARE_NUMBER]} shares; "
                       f"this node requires at least {minimum}")
    named = sum(key != Key.STAGE for key in configs)  # one entry of public keys per client, itself included
    if stage == Stage.SHARE_KEYS and named < minimum:
        raise KsgError(f"secure aggregation: the server named {named} clients to share keys with; this node requires at least {minimum}")


def refuse_unequal_weights(task: ClientTask, weight: int, max_weight: float) -> None:
    """On private data and under client-level DP every client weighs 1 in the sum (`secure_weights`).
    The weight and the largest weight are the server's to send, to each node its own: weight 0, or a
    huge largest weight, for every client but one would round the others' updates to nothing, and
    the unmasked "sum" would be that one client's update. Refused before the task runs."""
    if weight != 1 or max_weight != 1.0:
        raise KsgError(f"client '{task.client_id}': secure aggregation of private updates weighs every client 1; the server sent weight {weight} "
                       f"of at most {max_weight:g}: refused")


def as_legacy_fit(msg, context, call_next):
    """Between SecAgg+ (legacy FitIns in, FitRes out) and our train handler: the handler gets its
    usual message; its update goes back as the FitRes parameters (which secaggplus_mod masks and
    then clears), with the server's weight for the client as `num_examples`. A client whose coin
    said no (client-level DP) sends zeros, so that it is in the sum like any other, and with
    client-level DP no loss, example count or step count, which would tell who joined."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
    from flwr.compat.common import recorddict_compat as compat

    fit_ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    task_json = str(fit_ins.config[TASK])
    task = ClientTask.model_validate_json(task_json)
    if task.local_dp is not None or task.join_probability is not None:  # the largest weight, as secaggplus_mod kept it from the setup
        refuse_unequal_weights(task, int(fit_ins.config[WEIGHT]), float(context.state.config_records[RECORD_KEY_STATE]["max_weight"]))
    names = json.loads(str(fit_ins.config[NAMES]))
    params = dict(zip(names, parameters_to_ndarrays(fit_ins.parameters)))
    inner = Message(content=RecordDict({"arrays": ArrayRecord({n: Array(params[n]) for n in names}), "config": ConfigRecord({TASK: task_json})}),
                    metadata=msg.metadata)
    reply = call_next(inner, context)
    if reply.has_error():
        raise KsgError(reply.error.reason)
    content = reply.content
    update = {n: np.asarray(a.numpy()) for n, a in content["arrays"].items()} if "arrays" in content else {n: np.zeros_like(v) for n, v in params.items()}
    if set(update) != set(names) or any(update[n].dtype != np.float32 for n in names):
        raise KsgError("secure aggregation sums float32 updates with the adapter's names only")
    metadata = dict(content["config"].items()) | dict(content["metrics"].items())
    if task.join_probability is not None:
        metadata = {k: v for k, v in metadata.items() if k not in ("num-examples", "loss", "dp-steps")}
    if "release" in metadata:
        # the ledger entry travels in the clear beside the masked update: without the digest of this
        # client's own update, which would let a server holding a candidate for it (the other
        # clients' updates, and the sum) confirm it; the client's own ledger keeps the digest
        release = json.loads(str(metadata["release"]))
        metadata["release"] = json.dumps({**release, "artifact_sha256": None})
    # float64: Flower quantizes in the dtype it is given, and in float32 its shift and scale alone move a coordinate by
    # more than the one quantum quantized_clip_norm allows for (32 quanta at 2^30 levels)
    fit_res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([update[n].astype(np.float64) for n in names]), int(fit_ins.config[WEIGHT]), metadata)
    return Message(compat.fitres_to_recorddict(fit_res, keep_input=True), reply_to=msg)
