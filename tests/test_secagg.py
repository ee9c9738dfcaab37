"""Secure aggregation (Flower's SecAgg+) for fedtune: the server gets the weighted mean of a round's
updates only. One run on Flower's simulation runtime (the expensive part, shared by the module)
against the same job without it on the local engine (which agrees with flower-sim to 1e-6: see
test_fedtune), plus cheap checks of the server arithmetic, the client mod and the refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from knowledgesg import aggregation as agg
from knowledgesg.cli import main
from knowledgesg.federated import secagg, server
from knowledgesg.federated.client import ClientRuntime, initial_params
from knowledgesg.federated.engines import CHECKPOINT, FINAL, INITIAL, JOB, ROUNDS, run_local
from knowledgesg.federated.protocol import LocalTraining, LoraShape, load_params, save_params
from knowledgesg.federated.secagg import SecureAggregation, SecureSum
from knowledgesg.federated.server import ClientDP, FedJob, RuleSettings, run_federation, task_for
from knowledgesg.fileio import write_json
from pipelines.fedtune import FedtuneParams
from privacy.report import threat_model
from tests.conftest import tiny_spec, write_spec
from tests.test_fedtune import CLIENTS, UPDATES, ScriptedTransport, records_for, tiny_base

# unequal shares: the secure sum must weight by example count as plain FedAvg does
COUNTS = {"a": 12, "b": 8, "c": 16}
# coarse on purpose, so that the rounding is visible: one quantum is 2 * 1.0 / 2**16
SETTINGS = SecureAggregation(clipping_range=1.0, quantization_range=2**16)
QUANTUM = 2 * SETTINGS.clipping_range / SETTINGS.quantization_range
# a coordinate of the mean is off by < 3 clients x one quantum / (sum of count / largest count = 36 / 16)
BOUND = secagg.mean_error_bound(secagg.resolve(SETTINGS, 3, None, max(COUNTS.values())), list(COUNTS.values()))


def job_in(directory: Path, secure: SecureAggregation | None) -> Path:
    job = FedJob(seed=11, rounds=1, clients=CLIENTS, clients_per_round=3, rule=RuleSettings(name="fedavg"),
                 training=LocalTraining(steps=2, batch_size=4, max_length=48), lora=LoraShape(r=4), base_model=tiny_base(),
                 records={c: records_for(c, COUNTS[c]) for c in CLIENTS}, secure_aggregation=secure)
    directory.mkdir(parents=True, exist_ok=True)
    save_params(directory / INITIAL, initial_params(job.base_model, job.lora, 5))
    write_json(directory / JOB, job.model_dump(mode="json"))
    return directory / JOB


def max_difference(a: dict, b: dict) -> float:
    return max(float(np.abs(np.asarray(a[k], dtype=np.float64) - b[k]).max()) for k in a)


def holds(arrays: dict[str, np.ndarray], update: dict[str, np.ndarray], atol: float = 1e-6, min_magnitude: float = 1e-5) -> bool:
    """Whether some array here equals one of the update's tensors (by shape and value). A tensor
    no larger than min_magnitude is left out: an all-but-zero array would match it. The cut-off is
    separate from atol because a generous atol may be near the update's own size (and a cut-off
    tied to it would leave every tensor out, so that nothing could ever be found)."""
    return any(a.shape == u.shape and np.allclose(a, u, atol=atol) for a in arrays.values() for u in update.values() if np.abs(u).max() > min_magnitude)


def server_arrays(directory: Path) -> dict[str, np.ndarray]:
    """Every array in the parameter files the server writes in the job directory."""
    return {f"{path.name}:{k}": v for path in sorted(directory.glob("*.npz")) for k, v in load_params(path).items() if k != "meta"}


def numbers_in(path: Path) -> int:
    return len(re.findall(r"-?\d+\.\d+(?:e-?\d+)?", path.read_text()))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same one-round job: without secure aggregation (local engine), and with it (flower-sim),
    with what reached the server's aggregation in each, and the replies the secure server received."""
    from knowledgesg.federated.flower import run_simulation

    root = tmp_path_factory.mktemp("secagg")
    plain_job, secure_job = job_in(root / "plain", None), job_in(root / "secure", SETTINGS)
    x0 = load_params(plain_job.parent / INITIAL)
    job = FedJob.model_validate_json(plain_job.read_text())
    runtime = ClientRuntime()  # each client's update as it would leave the client
    sent = {c: runtime.fit(task_for(job, c, 1), x0).update for c in CLIENTS}

    seen: dict[str, list] = {"plain": [], "secure": [], "replies": []}
    patch = pytest.MonkeyPatch()
    aggregate, aggregate_mean, receive = server.aggregate, server.aggregate_mean, secagg.RecordingGrid.send_and_receive
    patch.setattr(server, "aggregate", lambda job, x, updates, *rest: seen["plain"].append([u.update for u in updates]) or aggregate(job, x, updates, *rest))
    patch.setattr(server, "aggregate_mean", lambda job, x, mean, *rest: seen["secure"].append(mean) or aggregate_mean(job, x, mean, *rest))

    def recording(self, messages, *, timeout=None):
        replies = receive(self, messages, timeout=timeout)
        seen["replies"].extend(r.content for r in replies if r.has_content())
        return replies

    patch.setattr(secagg.RecordingGrid, "send_and_receive", recording)
    try:
        run_local(plain_job)
        run_simulation(secure_job, len(CLIENTS))
    finally:
        patch.undo()
    return {"x0": x0, "sent": sent, "seen": seen, "plain": plain_job.parent, "secure": secure_job.parent}


def test_secure_fedavg_is_plain_fedavg_within_the_quantization_error(runs):
    x0, plain, secure = runs["x0"], load_params(runs["plain"] / FINAL), load_params(runs["secure"] / FINAL)
    step = max(float(np.abs(plain[k] - x0[k]).max()) for k in x0)
    difference = max_difference(secure, plain)
    assert BOUND == pytest.approx(3 * QUANTUM * 16 / 36) and BOUND < 0.02 * step  # the bound is tight against the update itself
    assert BOUND / 10 < difference <= BOUND + 1e-7  # rounding happened (this went through SecAgg+), and within its bound
    record = json.loads((runs["secure"] / ROUNDS).read_text())[0]
    assert record["clients"] == CLIENTS and record["joined"] == CLIENTS and record["failed"] == {}
    stages = ("setup", "share_keys", "collect_masked_vectors", "unmask")
    assert record["extra"]["secure_aggregation"] == {"in_sum": CLIENTS, "answered": dict.fromkeys(stages, CLIENTS)}
    assert record["num_examples"] == sum(COUNTS.values())  # the example counts still travel beside the masked update


def test_the_server_holds_the_weighted_mean_only_never_a_single_update(runs):
    sent, seen, x0 = runs["sent"], runs["seen"], runs["x0"]
    trained = {c: {n: x0[n] + u[n] for n in u} for c, u in sent.items()}  # a client's adapter gives away its update as well
    # the check finds each update where the server has it: plain FedAvg aggregates the updates themselves
    [plain_input] = seen["plain"]
    assert all(any(holds(u, sent[c]) for u in plain_input) for c in CLIENTS)
    # with SecAgg+ the aggregation gets the example-weighted mean (to the rounding) and nothing else
    [secure_mean] = seen["secure"]
    weighted = agg.weighted_mean([sent[c] for c in CLIENTS], [COUNTS[c] for c in CLIENTS])
    assert max_difference(secure_mean, weighted) <= BOUND + 1e-7
    assert not any(holds(secure_mean, sent[c], atol=BOUND) for c in CLIENTS)
    # what the secure server received: no arrays (the mod cleared them), and masked vectors that,
    # read as if unmasked, are nowhere near any client's weighted update
    masked = [reply.config_records["secaggplus_configs"]["masked_params"] for reply in seen["replies"]
              if "masked_params" in reply.config_records.get("secaggplus_configs", {})]
    assert len(masked) == len(CLIENTS)
    assert all(len(record) == 0 for reply in seen["replies"] for record in reply.array_records.values())
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.quantization import quantize

    names = sorted(x0)

    def read_as_unmasked(quantized) -> dict[str, np.ndarray]:
        return dict(zip(names, (a * QUANTUM - SETTINGS.clipping_range for a in quantized)))

    # as each client weighs its update before quantizing it (example count / the largest; exact here)
    weighted_updates = {c: {n: v.astype(np.float64) * COUNTS[c] / max(COUNTS.values()) for n, v in sent[c].items()} for c in CLIENTS}
    # ten times the rounding, yet below every weighted tensor's size, so that a vector of zeros is no match
    atol = 10 * QUANTUM
    assert min(np.abs(v).max() for u in weighted_updates.values() for v in u.values()) > 2 * atol
    for c in CLIENTS:
        # the check finds a weighted update that was quantized as SecAgg+ does but left unmasked (what the
        # server would read if the masks failed to hide it), and does not find one in a vector of zeros
        unmasked = read_as_unmasked(quantize([weighted_updates[c][n] for n in names], SETTINGS.clipping_range, SETTINGS.quantization_range))
        assert holds(unmasked, weighted_updates[c], atol=atol), c
        assert not holds({n: np.zeros_like(v) for n, v in unmasked.items()}, weighted_updates[c], atol=atol), c
    for vector in masked:  # the first entry is the weight factor, the tensors follow in the order of names
        read = read_as_unmasked(bytes_to_ndarray(b) for b in vector[1:])
        assert not any(holds(read, weighted_updates[c], atol=atol) for c in CLIENTS)
    # and no server-side file holds a client's update or its trained adapter, in either run
    # (the server never writes them even without SecAgg+: the difference is what it receives, above)
    smallest = min(v.size for v in x0.values())
    for run in ("plain", "secure"):
        files = server_arrays(runs[run])
        assert {f"{FINAL}:{n}" for n in x0} <= set(files) and any(k.startswith(CHECKPOINT) for k in files)
        assert not any(holds(files, sent[c]) or holds(files, trained[c]) for c in CLIENTS), run
        assert numbers_in(runs[run] / ROUNDS) < smallest  # the round records (also in the checkpoint) are too few numbers to hold a tensor


def test_client_level_dp_adds_noise_to_the_sum_of_updates_clipped_for_the_rounding():
    """The server arithmetic with a scripted secure sum: mean x count = the sum of the clipped
    updates, noised as in plain DP-FedAvg (reproducible noise: the same draws)."""

    class SecureScripted(ScriptedTransport):
        def fit_secure(self, tasks, params, weights, plan, round_number):
            self.clips = {t.update_clip_norm for t in tasks}
            updates, _ = self.fit(tasks, params, None)
            assert set(weights.values()) == {1}  # client-level DP: every client weighs 1
            return SecureSum(agg.weighted_mean([u.update for u in updates], [1.0] * len(updates)), sorted(u.client_id for u in updates),
                             [], {}, 0, {})

    x0 = {"w": np.array([1.0, 1.0])}
    jobs = {secure: FedJob(seed=3, rounds=2, clients=CLIENTS, clients_per_round=3, rule=RuleSettings(), training=LocalTraining(optimizer="sgd"),
                           lora=LoraShape(), base_model={"path": "unused"}, records={c: [] for c in CLIENTS}, reproducible_noise=True,
                           client_dp=ClientDP(clip_norm=1.0, noise_multiplier=0.5), secure_aggregation=SecureAggregation() if secure else None)
            for secure in (False, True)}
    transport = SecureScripted(UPDATES, {c: 1 for c in CLIENTS})
    plain, _ = run_federation(jobs[False], x0, ScriptedTransport(UPDATES, {c: 1 for c in CLIENTS}))
    secure, history = run_federation(jobs[True], x0, transport)
    expected_clip = 1.0 - 1.01 * np.sqrt(2) * 2 * 1.0 / 2**22  # clipping_range = clip_norm; sqrt(d) quanta (and 1%) below it
    [clip] = transport.clips
    assert clip == pytest.approx(expected_clip, abs=1e-12) and clip < 1.0
    assert np.abs(secure["w"] - plain["w"]).max() <= 2 * (1.0 - expected_clip)  # the tighter clip, over two rounds
    assert history[0].joined is None and history[0].extra["secure_aggregation"] == {"in_sum": CLIENTS, "answered": {}}


def setup_state(max_weight: float):
    """A node's state after SecAgg+'s setup stage, as secaggplus_mod keeps it: the largest weight the server sent."""
    from flwr.app import ConfigRecord, RecordDict
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    return RecordDict({RECORD_KEY_STATE: ConfigRecord({"max_weight": max_weight})})


def test_the_client_mod_sends_zeros_and_no_training_figures_when_its_coin_says_no():
    import time

    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    job = FedJob(seed=3, rounds=1, clients=CLIENTS, clients_per_round=3, rule=RuleSettings(), training=LocalTraining(), lora=LoraShape(),
                 base_model={"path": "unused"}, records={c: [] for c in CLIENTS}, client_dp=ClientDP(clip_norm=1.0, noise_multiplier=0.5),
                 secure_aggregation=SecureAggregation())
    params = {"w": np.ones((2, 3), dtype=np.float32)}
    fit_ins = FitIns(ndarrays_to_parameters([params["w"]]), {"task": task_for(job, "a", 1).model_dump_json(), "names": '["w"]', "weight": 1})

    def arriving(content: RecordDict) -> Message:  # as a node receives it from the SuperLink
        return Message(content=content, metadata=Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                                                          group_id="1", created_at=time.time(), ttl=60.0, message_type="train"))

    msg = arriving(compat.fitins_to_recorddict(fit_ins, True))
    context = Context(run_id=0, node_id=1, node_config={}, state=setup_state(1.0), run_config={})

    def handler(inner, ctx):  # our train handler's reply when the coin says no: no arrays
        assert np.array_equal(inner.content["arrays"]["w"].numpy(), params["w"])
        return Message(RecordDict({"config": ConfigRecord({"client-id": "a"}), "metrics": MetricRecord({"dp-steps": 0})}), reply_to=inner)

    fit_res = compat.recorddict_to_fitres(secagg.as_legacy_fit(msg, context, handler).content, True)
    assert np.array_equal(parameters_to_ndarrays(fit_res.parameters)[0], np.zeros((2, 3), dtype=np.float32))
    assert fit_res.num_examples == 1 and fit_res.metrics == {"client-id": "a"}
    # a node that requires secure aggregation refuses a plain train message
    plain = arriving(RecordDict({"arrays": ArrayRecord({"w": Array(params["w"])})}))
    strict = Context(run_id=0, node_id=1, node_config={"secure-aggregation": "required"}, state=RecordDict(), run_config={})
    with pytest.raises(Exception, match="secure aggregation only"):
        secagg.secure_aggregation_mod(plain, strict, handler)


@pytest.mark.parametrize("weight, max_weight", [(0, 1.0), (1, 1e6)], ids=["weight-0", "huge-max-weight"])
def test_a_client_refuses_weights_that_would_leave_its_update_alone_in_the_sum(weight, max_weight):
    """Private updates weigh 1 each. A server that sends every other client weight 0 (or a largest
    weight that rounds theirs to nothing) unmasks one client's update as the "sum": refused before
    the task runs."""
    import time

    from flwr.app import Context, Message, Metadata
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    job = FedJob(seed=3, rounds=1, clients=CLIENTS, clients_per_round=3, rule=RuleSettings(), training=LocalTraining(), lora=LoraShape(),
                 base_model={"path": "unused"}, records={c: [] for c in CLIENTS}, client_dp=ClientDP(clip_norm=1.0, noise_multiplier=0.5),
                 secure_aggregation=SecureAggregation())
    fit_ins = FitIns(ndarrays_to_parameters([np.ones((2, 3), dtype=np.float32)]), {"task": task_for(job, "a", 1).model_dump_json(), "names": '["w"]', "weight": weight})
    msg = Message(content=compat.fitins_to_recorddict(fit_ins, True),
                  metadata=Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1", created_at=time.time(),
                                    ttl=60.0, message_type="train"))
    context = Context(run_id=0, node_id=1, node_config={}, state=setup_state(max_weight), run_config={})
    with pytest.raises(secagg.KsgError, match="weighs every client 1"):
        secagg.as_legacy_fit(msg, context, lambda inner, ctx: pytest.fail("the task ran"))


def test_the_ledger_entry_sent_beside_a_masked_update_holds_no_digest_of_it():
    """With record-level DP and no client-level DP each round's ledger entry names the update by its
    SHA-256; beside a masked update, in the clear, that let a server holding a candidate for one
    client's update (from the others' and the sum) confirm it. The client's own ledger keeps it."""
    import time

    from flwr.app import ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    job = FedJob(seed=3, rounds=1, clients=CLIENTS, clients_per_round=3, rule=RuleSettings(), training=LocalTraining(), lora=LoraShape(),
                 base_model={"path": "unused"}, records={c: [] for c in CLIENTS}, secure_aggregation=SecureAggregation())
    params = {"w": np.ones((2, 3), dtype=np.float32)}
    fit_ins = FitIns(ndarrays_to_parameters([params["w"]]), {"task": task_for(job, "a", 1).model_dump_json(), "names": '["w"]', "weight": 1})
    msg = Message(content=compat.fitins_to_recorddict(fit_ins, True),
                  metadata=Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1", created_at=time.time(),
                                    ttl=60.0, message_type="train"))
    context = Context(run_id=0, node_id=1, node_config={}, state=RecordDict(), run_config={})
    release = {"release_id": "r1", "artifact_sha256": "ab" * 32, "stage": "fedtune"}

    def handler(inner, ctx):  # our train handler's reply on private data: the update and its ledger entry
        return Message(RecordDict({"arrays": inner.content["arrays"], "config": ConfigRecord({"client-id": "a", "release": json.dumps(release)}),
                                   "metrics": MetricRecord({"dp-steps": 2})}), reply_to=inner)

    fit_res = compat.recorddict_to_fitres(secagg.as_legacy_fit(msg, context, handler).content, True)
    sent = json.loads(str(fit_res.metrics["release"]))
    assert sent == {**release, "artifact_sha256": None} and "ab" * 32 not in str(fit_res.metrics)


REFUSED = [
    ({"rule": RuleSettings(name="median")}, "rule median needs each update"),
    ({"rule": RuleSettings(name="krum")}, "rule krum needs each update"),
    ({"rule": RuleSettings(name="trimmed_mean")}, "rule trimmed_mean needs each update"),
    ({"rule": RuleSettings(name="scaffold"), "training": LocalTraining(optimizer="sgd")}, "rule scaffold needs each update"),
    ({"update_encoding": "int8"}, "use update_encoding float32"),
    ({"round_retries": 1}, "leave round_retries at 0"),
    ({"min_clients": 1}, "min_clients 1 is below the reconstruction threshold 2"),
    ({"secure_aggregation": SecureAggregation(num_shares=5)}, "num_shares 5 exceeds the 3 clients"),
    ({"secure_aggregation": SecureAggregation(reconstruction_threshold=4)}, "reconstruction_threshold 4 must be below"),
    ({"secure_aggregation": SecureAggregation(quantization_range=2**31)}, "must stay below 2\\^32"),
    ({"client_dp": ClientDP(clip_norm=2.0, noise_multiplier=1.0), "secure_aggregation": SecureAggregation(clipping_range=1.0)}, "would cut clipped updates"),
]


@pytest.mark.parametrize("change,message", REFUSED, ids=[m.split(":")[0][:40] for _, m in REFUSED])
def test_combinations_that_need_single_updates_are_refused(change, message):
    settings = {"seed": 3, "rounds": 1, "clients": CLIENTS, "clients_per_round": 3, "rule": RuleSettings(), "training": LocalTraining(),
                "lora": LoraShape(), "base_model": {"path": "unused"}, "records": {c: [] for c in CLIENTS}, "secure_aggregation": SecureAggregation()}
    with pytest.raises(ValueError, match=message):
        FedJob(**(settings | change))


def test_the_local_engine_and_a_bad_setting_are_one_line_exit_2(workdir: Path, capsys):
    with pytest.raises(ValueError, match="secure_aggregation runs over Flower"):
        FedtuneParams(secure_aggregation=True)
    assert FedtuneParams(engine="flower-sim", secure_aggregation=True).secure_aggregation == SecureAggregation()
    for params, pattern in (({"engine": "local", "secure_aggregation": True}, r"secure_aggregation runs over Flower"),
                            ({"engine": "flower-sim", "secure_aggregation": {"num_shares": 2}}, r"secure_aggregation\.num_shares.*greater than or equal to 3")):
        spec = tiny_spec()
        spec["stages"] = ["prepare_models", "ingest", {"name": "fedtune", "params": params}]
        code = main(["run", str(write_spec(workdir, spec)), "--run-dir", "run"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and re.search(pattern, err), err
        assert not (workdir / "run").exists()


def test_the_privacy_report_says_what_the_server_sees_with_and_without_secure_aggregation():
    def spec_with(fedtune: dict) -> SimpleNamespace:
        return SimpleNamespace(stages=[SimpleNamespace(name="ingest", params={}), SimpleNamespace(name="fedtune", params=fedtune)])

    plain, secure = (threat_model(spec_with(p), True)[1]["sees"] for p in ({"client_dp": {}}, {"client_dp": {}, "secure_aggregation": True}))
    assert "each client's clipped update" in plain and "each client clips, the server adds the noise" in plain
    assert "only the sum of each round's updates" in secure and "sum of the clients' clipped updates before the server adds its noise" in secure
    assert "each client's clipped update" not in secure and "each client clips, the server adds the noise" in secure


def test_masks_come_from_the_whole_seed_not_its_32_bit_fold():
    """Flower 1.41 seeds its mask generator with the XOR of the seed's 32-bit words, so two seeds
    with the same fold give the same mask (a 2^32 search finds a pairwise mask); ours differ, and
    both ends of a secure round use ours."""
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    a = bytes(range(32))
    b = (int.from_bytes(a[:4], "little") ^ 0xDEADBEEF).to_bytes(4, "little") + a[4:8] + (int.from_bytes(a[8:12], "little") ^ 0xDEADBEEF).to_bytes(4, "little") + a[12:]
    shapes = [(3, 4), ()]
    assert all(np.array_equal(x, y) for x, y in zip(pseudo_rand_gen(a, 2**32, shapes), pseudo_rand_gen(b, 2**32, shapes)))  # the flaw
    mine_a, mine_b = secagg.full_key_masks(a, 2**32, shapes), secagg.full_key_masks(b, 2**32, shapes)
    assert not np.array_equal(mine_a[0], mine_b[0]) and mine_a[0].shape == (3, 4) and mine_a[1].shape == ()
    assert np.array_equal(mine_a[0], secagg.full_key_masks(a, 2**32, shapes)[0])  # deterministic: the masks cancel
    secagg.use_full_key_masks()
    import importlib

    for name in ("flwr.client.mod.secure_aggregation.secaggplus_mod", "flwr.server.workflow.secure_aggregation.secaggplus_workflow"):
        assert importlib.import_module(name).pseudo_rand_gen is secagg.full_key_masks, name


@pytest.mark.parametrize("levels", [2**22, 2**30])
def test_an_update_clipped_for_the_rounding_keeps_the_norm_bound_through_flowers_quantization(levels):
    """What enters the sum (Flower's quantize, then dequantize) moves each coordinate by less than
    one quantum, the premise of quantized_clip_norm (so the norm stays at most client_dp.clip_norm
    for any direction of the rounding), when the client sends float64, even at the finest grid."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    clip_norm, size = 0.7, 5000
    plan = secagg.resolve(SecureAggregation(quantization_range=levels), 3, clip_norm, 1.0)
    tighter = secagg.quantized_clip_norm(clip_norm, plan, size)
    rng = np.random.default_rng(0)
    worst_norm = worst_move = 0.0
    for _ in range(20):
        update = rng.normal(size=size)
        update *= tighter / np.linalg.norm(update)
        sent = update.astype(np.float32).astype(np.float64)  # the client's float32 update, as as_legacy_fit passes it on
        rounded = dequantize(quantize([sent], plan.clipping_range, plan.quantization_range), plan.clipping_range, plan.quantization_range)[0]
        worst_norm = max(worst_norm, float(np.linalg.norm(rounded)))
        worst_move = max(worst_move, float(np.abs(rounded - sent).max()))
    assert worst_move < plan.quantum and worst_norm <= clip_norm


def test_a_node_that_requires_secure_aggregation_refuses_a_protocol_too_weak_to_hide_its_update():
    from flwr.app import ConfigRecord
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

    with pytest.raises(secagg.KsgError, match="threshold 1 of 1 shares"):
        secagg.refuse_weak_protocol(ConfigRecord({Key.STAGE: Stage.SETUP, Key.THRESHOLD: 1, Key.SHARE_NUMBER: 1}), 2)
    with pytest.raises(secagg.KsgError, match="named 1 clients"):
        secagg.refuse_weak_protocol(ConfigRecord({Key.STAGE: Stage.SHARE_KEYS, "7": [b"pk1", b"pk2"]}), 2)
    secagg.refuse_weak_protocol(ConfigRecord({Key.STAGE: Stage.SETUP, Key.THRESHOLD: 2, Key.SHARE_NUMBER: 3}), 2)  # enough: no error


def test_over_flower_deploy_a_client_that_drops_out_after_sharing_its_keys_is_unmasked_out_of_the_sum(tmp_path: Path, monkeypatch):
    """SecAgg+ on flower-deploy (a SuperLink and four SuperNodes on 127.0.0.1, TLS, registered node
    keys; each node requires secure aggregation, so a plain train message would be refused). The
    four clients set up the round and share their keys; d then fails while the others send their
    masked updates. SecAgg+ recovers d's pairwise masks from the shares its neighbours hold, so the
    mean is that of a, b and c (within the rounding), and the round records d as failed."""
    from knowledgesg.federated.deploy import LocalFederation, make_node_key, node_config, submit

    clients, counts = ["a", "b", "c", "d"], {"a": 12, "b": 8, "c": 16, "d": 10}
    job = FedJob(seed=11, rounds=1, clients=clients, clients_per_round=4, min_clients=3, round_timeout_s=120.0, rule=RuleSettings(name="fedavg"),
                 training=LocalTraining(steps=2, batch_size=4, max_length=48), lora=LoraShape(r=4), base_model=tiny_base(),
                 records={c: records_for(c, counts[c]) for c in clients}, secure_aggregation=SETTINGS)
    directory = tmp_path / "job"
    directory.mkdir()
    save_params(directory / INITIAL, initial_params(job.base_model, job.lora, 5))
    write_json(directory / JOB, job.model_dump(mode="json"))
    x0 = load_params(directory / INITIAL)
    runtime = ClientRuntime()
    sent = {c: runtime.fit(task_for(job, c, 1), x0).update for c in clients}

    monkeypatch.setenv("KSG_RAISE_AT", "fedtune-client-d-round-1")  # every node's environment; in d's train handler: after setup and key sharing
    with LocalFederation(tmp_path / "federation") as federation:
        federation.start_superlink()
        for c in clients:
            private, public = make_node_key(federation.directory / "keys", c)
            federation.register(public)
            federation.start_supernode(c, private, f"{node_config(c, tmp_path)} {secagg.REQUIRED}='required'")
        submit(directory / JOB, federation.flwr_home, timeout_s=600)

    record = json.loads((directory / ROUNDS).read_text())[0]
    # d shared its keys and then dropped: its pairwise masks were in the others' vectors and came out at unmasking
    assert record["extra"]["secure_aggregation"] == {"in_sum": ["a", "b", "c"], "answered": {
        "setup": clients, "share_keys": clients, "collect_masked_vectors": ["a", "b", "c"], "unmask": ["a", "b", "c"]}}
    assert list(record["failed"]) == ["d"] and record["num_examples"] == counts["a"] + counts["b"] + counts["c"]
    plan = secagg.resolve(SETTINGS, 4, None, max(counts.values()))
    bound = secagg.mean_error_bound(plan, [counts[c] for c in "abc"])
    step = load_params(directory / FINAL)
    mean = {n: step[n].astype(np.float64) - x0[n] for n in x0}  # fedavg with server learning rate 1: the global step is the mean
    survivors = agg.weighted_mean([sent[c] for c in "abc"], [counts[c] for c in "abc"])
    everyone = agg.weighted_mean([sent[c] for c in clients], [counts[c] for c in clients])
    assert max_difference(mean, survivors) <= bound + 1e-6  # float32 adapter: a little more rounding than the mean itself
    assert max_difference(mean, everyone) > 10 * bound  # d's update is not in it (nor, the masks having cancelled, its mask)
