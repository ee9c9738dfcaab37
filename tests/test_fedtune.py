"""Federated tuning: the server loop, the engines (local, Flower simulation, Flower deployment over
TLS with SuperNode authentication), and the fedtune stage with its ledger entries."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import torch
import pytest
import yaml

from knowledgesg import aggregation as agg
from knowledgesg.cli import main
from knowledgesg.errors import InputError, KsgError
from knowledgesg.federated.client import initial_params
from knowledgesg.federated.engines import FINAL, INITIAL, JOB, run_local
from knowledgesg.federated.protocol import ClientUpdate, LocalTraining, LoraShape, load_params, save_params
from knowledgesg.federated.server import ClientDP, FedJob, RuleSettings, participation, run_federation, sample_clients
from knowledgesg.fileio import read_json, write_json
from knowledgesg.models import resolve_model
from knowledgesg.spec import load_spec
from tests.conftest import run_in, sentiment_rows, tiny_spec, write_jsonl, write_spec
from tests.test_refine import REFINE, canned_generate
from tests.test_synthesize import SYNTH, TRAIN

LABELS = ["negative", "neutral", "positive"]
CLIENTS = ["a", "b", "c"]


def tiny_base() -> dict:
    m = resolve_model("tiny-random-llama")
    return {"name": m.name, "path": m.path, "kind": m.kind, "weights_sha256": m.weights_sha256, "description": m.description}


def records_for(client: str, n: int = 12) -> list[dict]:
    return [{"kind": "instruction", "id": f"{client}{i}", "source": "synthetic", "instruction": "What is the sentiment?",
             "input": f"Firm {client} item {i} shares moved", "response": LABELS[i % 3]} for i in range(n)]


def make_job(directory: Path, rule: str = "fedavg", rounds: int = 2, per_round: int = 2, clients: list[str] = CLIENTS) -> Path:
    job = FedJob(seed=11, rounds=rounds, clients=clients, clients_per_round=per_round, rule=RuleSettings(name=rule),
                 training=LocalTraining(steps=2, batch_size=4, max_length=48, optimizer="sgd" if rule == "scaffold" else "adam"),
                 lora=LoraShape(r=4), base_model=tiny_base(), records={c: records_for(c) for c in clients})
    directory.mkdir(parents=True, exist_ok=True)
    save_params(directory / INITIAL, initial_params(job.base_model, job.lora, 5))
    write_json(directory / JOB, job.model_dump(mode="json"))
    return directory / JOB


def max_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


# -- the server loop, with scripted clients ---------------------------------------------------


class ScriptedTransport:
    """Clients whose updates are fixed arrays: the loop's arithmetic can be checked by hand. Like
    real clients, they clip their update when client-level DP asks them to."""

    def __init__(self, updates: dict[str, np.ndarray], examples: dict[str, int]) -> None:
        self.updates, self.examples, self.seen = updates, examples, []

    def fit(self, tasks, params, server_control):
        self.seen.append([t.client_id for t in tasks])
        replies = []
        for t in reversed(tasks):  # arrival order shuffled
            update = {"w": self.updates[t.client_id]}
            if t.update_clip_norm is not None:
                update = agg.clip_update(update, t.update_clip_norm)
            replies.append(ClientUpdate(t.client_id, update, self.examples[t.client_id], 1.0, {"w": self.updates[t.client_id] * 0.5}))
        return replies, {}

    def client_state(self):
        return {}

    def restore(self, state):
        pass

    holds_client_state = True


def scripted_job(rule: str, per_round: int = 3, client_dp: ClientDP | None = None, rounds: int = 1, reproducible_noise: bool = False) -> FedJob:
    return FedJob(seed=3, rounds=rounds, clients=CLIENTS, clients_per_round=per_round, rule=RuleSettings(name=rule, server_lr=1.0 if rule != "fedadam" else 0.1),
                  training=LocalTraining(optimizer="sgd"), lora=LoraShape(), base_model={"path": "unused"}, records={c: [] for c in CLIENTS}, client_dp=client_dp,
                  reproducible_noise=reproducible_noise)


UPDATES = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 2.0]), "c": np.array([9.0, 9.0])}
EXAMPLES = {"a": 1, "b": 3, "c": 4}


def test_fedavg_in_the_loop_weights_by_examples_and_ignores_arrival_order():
    x0 = {"w": np.array([1.0, 1.0])}
    final, history = run_federation(scripted_job("fedavg"), x0, ScriptedTransport(UPDATES, EXAMPLES))
    expected = x0["w"] + (1 * UPDATES["a"] + 3 * UPDATES["b"] + 4 * UPDATES["c"]) / 8
    assert np.allclose(final["w"], expected)
    assert history[0].clients == CLIENTS and history[0].num_examples == 8


@pytest.mark.parametrize("rule", ["fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold", "median", "trimmed_mean", "krum"])
def test_each_rule_in_the_loop_is_the_aggregation_function(rule):
    x0 = {"w": np.array([1.0, 1.0])}
    job = scripted_job(rule, rounds=2)
    final, _ = run_federation(job, x0, ScriptedTransport(UPDATES, EXAMPLES))
    # the same two rounds by hand, with knowledgesg.aggregation (itself checked against numpy references)
    state, x = agg.ServerState(), x0
    ups, weights = [{"w": UPDATES[c]} for c in CLIENTS], [float(EXAMPLES[c]) for c in CLIENTS]
    for _ in range(2):
        x = {"fedavgm": lambda: agg.fedavgm(x, ups, weights, state, 1.0, 0.9),
             "scaffold": lambda: agg.scaffold(x, ups, [{"w": u["w"] * 0.5} for u in ups], state, 3, 1.0),
             "median": lambda: agg.coordinate_median(x, ups), "trimmed_mean": lambda: agg.trimmed_mean(x, ups, 1),
             "krum": lambda: agg.krum(x, ups, 0)}.get(rule, lambda: agg.fedopt(rule, x, ups, weights, state, 0.1 if rule == "fedadam" else 1.0, 0.9, 0.99, 1e-3))()
    assert np.allclose(final["w"], x["w"], atol=1e-6)


def test_scaffold_sends_the_server_control_variate_from_round_two():
    received = []

    class Recording(ScriptedTransport):
        def fit(self, tasks, params, server_control):
            received.append(server_control)
            return super().fit(tasks, params, server_control)

    run_federation(scripted_job("scaffold", rounds=2), {"w": np.zeros(2)}, Recording(UPDATES, EXAMPLES))
    assert received[0] is None
    assert np.allclose(received[1]["w"], np.mean([UPDATES[c] * 0.5 for c in CLIENTS], axis=0))  # all 3 of 3 sampled: c = mean dc


def test_client_sampling_is_seeded_uniform_and_client_level_dp_asks_everyone():
    job = scripted_job("fedavg", per_round=2, rounds=40)
    rounds = [sample_clients(job, r) for r in range(1, 41)]
    assert all(len(r) == 2 for r in rounds) and rounds == [sample_clients(job, r) for r in range(1, 41)]
    counts = participation(job)
    assert sum(counts.values()) == 80 and min(counts.values()) > 15  # every client gets its turn
    # client-level DP: every client is asked, and each draws its own coin (see test_privacy_threats)
    dp_job = scripted_job("fedavg", per_round=2, rounds=5, client_dp=ClientDP(clip_norm=1.0, noise_multiplier=1.0))
    assert all(sample_clients(dp_job, r) == CLIENTS for r in range(1, 6)) and participation(dp_job) == dict.fromkeys(CLIENTS, 5)


def test_client_level_dp_sums_client_clipped_updates_and_noises_over_the_expected_count():
    from privacy.noise import SecureRandom

    job = scripted_job("fedavg", per_round=3, client_dp=ClientDP(clip_norm=1.0, noise_multiplier=0.5), reproducible_noise=True)
    final, history = run_federation(job, {"w": np.zeros(2)}, ScriptedTransport(UPDATES, EXAMPLES))
    assert history[0].joined is None  # who joined is not recorded
    noise = SecureRandom.for_release(True, job.seed, "fedtune-server-noise")  # the server's (here: reproducible) generator
    clipped = [agg.clip_update({"w": UPDATES[c]}, 1.0) for c in CLIENTS]
    expected = agg.dp_fedavg({"w": np.zeros(2)}, clipped, 1.0, 0.5, 3.0, noise.normal_values)
    assert np.allclose(final["w"], expected["w"])


def test_impossible_robust_settings_are_refused_before_training():
    with pytest.raises(ValueError, match="krum needs"):
        scripted_job("krum", per_round=2)
    with pytest.raises(ValueError, match="trimmed_mean cannot drop 1"):
        scripted_job("trimmed_mean", per_round=2)


def test_the_final_adapter_averages_the_last_rounds_globals_and_resumes_with_their_sum(tmp_path: Path):
    """FedAvg with fixed updates moves the global by the same step d each round: after round r it is
    x0 + r d. Averaging the last 3 of 5 rounds gives x0 + 4 d (the last round alone: x0 + 5 d).
    A server that stops after round 3 and restarts from its checkpoint keeps the sum it had."""
    x0, d = {"w": np.array([1.0, 1.0])}, (1 * UPDATES["a"] + 3 * UPDATES["b"] + 4 * UPDATES["c"]) / 8
    job = scripted_job("fedavg", rounds=5).model_copy(update={"average_last": 3})
    final, history = run_federation(job, x0, ScriptedTransport(UPDATES, EXAMPLES))
    assert np.allclose(final["w"], x0["w"] + 4 * d) and len(history) == 5
    last_only, _ = run_federation(scripted_job("fedavg", rounds=5), x0, ScriptedTransport(UPDATES, EXAMPLES))
    assert np.allclose(last_only["w"], x0["w"] + 5 * d)

    class DownInRoundFour(ScriptedTransport):
        def fit(self, tasks, params, server_control):
            if len(self.seen) == 3:
                self.seen.append([])
                return [], {t.client_id: "down" for t in tasks}
            return super().fit(tasks, params, server_control)

    checkpoint = tmp_path / "checkpoint.npz"
    with pytest.raises(KsgError, match="round 4"):
        run_federation(job, x0, DownInRoundFour(UPDATES, EXAMPLES), checkpoint=checkpoint)
    after_restart = ScriptedTransport(UPDATES, EXAMPLES)
    resumed, history = run_federation(job, x0, after_restart, checkpoint=checkpoint)
    assert np.allclose(resumed["w"], final["w"]) and [r.round for r in history] == [1, 2, 3, 4, 5]
    assert len(after_restart.seen) == 2  # rounds 4 and 5 only: the first three came from the checkpoint (the same result either way)
    with pytest.raises(ValueError, match="average_last 6 exceeds the 5 rounds"):
        FedJob.model_validate({**job.model_dump(), "average_last": 6})


# -- the engines, on the tiny model ---------------------------------------------------------------


def test_local_and_flower_sim_agree_on_fedavg(tmp_path: Path):
    from knowledgesg.federated.flower import run_simulation

    local_job, sim_job = make_job(tmp_path / "local"), make_job(tmp_path / "sim")
    run_local(local_job)
    run_simulation(sim_job, len(CLIENTS))
    local, sim = load_params(local_job.parent / FINAL), load_params(sim_job.parent / FINAL)
    assert max_difference(local, load_params(local_job.parent / INITIAL)) > 1e-4  # training moved the adapter
    assert max_difference(local, sim) < 1e-6
    local_rounds = json.loads((local_job.parent / "rounds.json").read_text())
    sim_rounds = json.loads((sim_job.parent / "rounds.json").read_text())
    assert [r["clients"] for r in local_rounds] == [r["clients"] for r in sim_rounds]
    assert [r["mean_loss"] for r in local_rounds] == pytest.approx([r["mean_loss"] for r in sim_rounds], abs=1e-6)


def test_flower_deploy_over_tls_with_authenticated_supernodes(tmp_path: Path):
    """A SuperLink and two SuperNodes as separate processes on 127.0.0.1, TLS on, SuperNode
    authentication on: the registered nodes train, a node with an unregistered key is refused."""
    from knowledgesg.federated.deploy import LocalFederation, make_node_key, node_config, submit

    clients = ["a", "b"]
    local_job, deploy_job = make_job(tmp_path / "local", clients=clients), make_job(tmp_path / "deploy", clients=clients)
    run_local(local_job)
    with LocalFederation(tmp_path / "federation") as federation:
        federation.start_superlink()
        assert (federation.certs.ca.read_text().startswith("-----BEGIN CERTIFICATE-----"))
        for c in clients:
            private, public = make_node_key(federation.directory / "keys", c)
            federation.register(public)
            federation.start_supernode(c, private, node_config(c, tmp_path))
        rogue_key, _ = make_node_key(federation.directory / "keys", "rogue")  # never registered
        rogue = federation.start_supernode("rogue", rogue_key, node_config("a", tmp_path))
        assert rogue.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in federation.log_tail("supernode-rogue", 3000)
        submit(deploy_job, federation.flwr_home, timeout_s=600)
        # TLS is really on: the SuperLink refuses plain HTTP
        port = int(federation.address.rsplit(":", 1)[1])
        plain = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=30)
        assert plain.stdout in ("000", "400"), plain.stdout
    assert max_difference(load_params(local_job.parent / FINAL), load_params(deploy_job.parent / FINAL)) < 1e-6


# -- the stage ------------------------------------------------------------------------------------


def run_pipeline(workdir: Path, fedtune: dict, privacy: dict | None = None, cap: float | None = None, extra_stages: list | None = None) -> int:
    from knowledgesg.generation import Generator

    write_jsonl(workdir / "data.jsonl", sentiment_rows(40))
    pool = [dict(r, id=f"pool{i}", input=f"Shares of firm {i} moved after the report.") for i, r in enumerate(sentiment_rows(9))]
    write_jsonl(workdir / "pool.jsonl", pool)
    synth = dict(SYNTH, params=dict(SYNTH["params"], per_client=6, oversample=1.0, near_duplicate_jaccard=0.9))
    spec = tiny_spec(stages=["prepare_models", "ingest", TRAIN, synth, REFINE, {"name": "fedtune", "params": fedtune}, *(extra_stages or [])],
                     models={"base": "tiny-random-llama", "professional": "tiny-random-llama"})
    spec["privacy"] = {"target_epsilon": 8.0, "count_noise": 0, **(privacy or {}), **({"cap_epsilon": cap} if cap else {})}
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(Generator, "generate", canned_generate)
    try:
        return run_in(workdir, "run", str(write_spec(workdir, spec)), "--run-dir", "run")
    finally:
        monkeypatch.undo()


FEDTUNE = {"rounds": 2, "training": {"steps": 2, "batch_size": 4, "max_length": 48}, "lora": {"r": 4}}


def public_records(n: int) -> list[dict]:
    return [dict(r, id=f"public{i}", input=f"Public headline {i}: the index closed the week.") for i, r in enumerate(sentiment_rows(n))]


def test_stage_on_synthetic_data_costs_nothing_and_writes_the_adapter(tmp_path: Path):
    write_jsonl(tmp_path / "public.jsonl", public_records(7))
    assert run_pipeline(tmp_path, dict(FEDTUNE, merge=True, public={"path": "public.jsonl"}, average_last=2)) == 0
    stage = tmp_path / "run/stages/fedtune"
    assert (stage / "adapter/adapter_model.safetensors").is_file() and (stage / "merged/config.json").is_file()
    assert not (stage / "work").exists()  # the job (with the synthetic shares) is not left behind
    rounds = json.loads((stage / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2] and all(r["clients"] == r["joined"] == ["client_0", "client_1"] for r in rounds)
    assert all(r["mean_loss"] > 0 for r in rounds)  # synthetic and public data: public figures
    # the public pool is dealt out over the two shares (4 + 3 records) beside the refined synthetic records
    refined = sum(len((tmp_path / f"run/stages/refine/clients/{c}/refined.jsonl").read_text().splitlines()) for c in ["client_0", "client_1"])
    assert all(r["num_examples"] == refined + 7 for r in rounds) and refined > 0
    assert json.loads((stage / "privacy.json").read_text())["public_data"]["records"] == 7
    assert json.loads((stage / "training.json").read_text()) == {"precision": {"asked": "float32", "ran": "float32"},
                                                                            "final_adapter": "the mean of the global adapters after rounds 1-2"}
    ledger = json.loads((stage / "ledger.json").read_text())
    assert [(e["client_id"], e["mechanism"]["kind"], e["epsilon"]["reported"]) for e in ledger] == [("client_0", "post_processing", 0.0), ("client_1", "post_processing", 0.0)]
    assert main(["privacy-report", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run/privacy_report.json").read_text())
    releases = report["clients"][0]["releases"]
    assert "fedtune" in [r["entry"]["stage"] for r in releases]
    assert report["clients"][0]["total"]["pld"] == pytest.approx(releases[0]["entry"]["epsilon"]["pld"], rel=1e-6)  # dp_train alone


def test_a_replicate_seed_trains_again_on_the_same_data_and_nothing_before_it_reruns(tmp_path: Path):
    assert run_pipeline(tmp_path, FEDTUNE) == 0
    stage, run = tmp_path / "run/stages/fedtune", tmp_path / "run/stages"
    before = {name: (run / name / "manifest.json").read_text() for name in ("dp_train", "synthesize", "refine")}
    first = ((stage / "adapter/adapter_model.safetensors").read_bytes(), json.loads((stage / "rounds.json").read_text()))
    assert run_pipeline(tmp_path, dict(FEDTUNE, seed=1)) == 0
    second = ((stage / "adapter/adapter_model.safetensors").read_bytes(), json.loads((stage / "rounds.json").read_text()))
    assert {name: (run / name / "manifest.json").read_text() for name in before} == before  # no second DP release, the same pairs
    assert second[0] != first[0]  # another initialisation and batch order ...
    assert [r["num_examples"] for r in second[1]] == [r["num_examples"] for r in first[1]]  # ... on the same records
    assert json.loads((stage / "manifest.json").read_text())["params"]["seed"] == 1


def test_a_public_pool_that_is_a_clients_data_is_refused_before_anything_is_written(tmp_path: Path, capsys):
    assert run_pipeline(tmp_path, dict(FEDTUNE, public={"path": "data.jsonl"})) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ksg: error: {tmp_path / 'spec.yaml'}: fedtune params.public: data.jsonl is also a client's data source; it must be public data"] and not (tmp_path / "run").exists()
    # and on private data there is nothing to mix it into (the DP-SGD noise is calibrated to the private records)
    write_jsonl(tmp_path / "public.jsonl", public_records(7))
    assert run_pipeline(tmp_path, dict(FEDTUNE, data="private", local_dp={"target_epsilon": 4.0}, public={"path": "public.jsonl"})) == 2
    assert "data: synthetic only" in capsys.readouterr().err and not (tmp_path / "run").exists()
    # a pool that is not there is named before the run starts, not after dp_train, synthesize and refine
    assert run_pipeline(tmp_path, dict(FEDTUNE, public={"path": "missing.jsonl"})) == 2
    assert "missing.jsonl: data file not found" in capsys.readouterr().err and not (tmp_path / "run").exists()
    write_jsonl(tmp_path / "unlabelled.jsonl", [dict(r, response="") for r in public_records(3)])
    assert run_pipeline(tmp_path, dict(FEDTUNE, public={"path": "unlabelled.jsonl"})) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"ksg: error: {tmp_path / 'unlabelled.jsonl'}:1: field 'response': is empty"]  # file, record, field
    assert not (tmp_path / "run").exists()
    # unset, the pool is not in the stage's fingerprint: a fedtune that ran before it existed still matches
    from pipelines.fedtune import FedtuneParams

    assert "public" not in FedtuneParams().model_dump(mode="json") and "public" in FedtuneParams(public={"path": "public.jsonl"}).model_dump(mode="json")
    assert "seed" not in FedtuneParams().model_dump(mode="json") and FedtuneParams(seed=2).model_dump(mode="json")["seed"] == 2
    assert "average_last" not in FedtuneParams().model_dump(mode="json") and FedtuneParams(rounds=4, average_last=2).model_dump(mode="json")["average_last"] == 2


@pytest.mark.parametrize("params,message", [
    (dict(FEDTUNE, rule={"name": "scaffold"}), "fedtune: scaffold's control variates assume local SGD: set training.optimizer: sgd"),
    (dict(FEDTUNE, clients_per_round=5), "fedtune: clients_per_round 5 exceeds the 2 clients"),
    (dict(FEDTUNE, rule={"name": "trimmed_mean", "trim": 1}), "fedtune: trimmed_mean cannot drop 1 from each side of 2 updates a round"),
], ids=["scaffold-with-adam", "more-clients-than-there-are", "trimmed-mean-of-two"])
def test_job_settings_the_clients_make_impossible_are_refused_before_anything_is_written(tmp_path: Path, capsys, params, message):
    """The server loop's checks of its job run on a stand-in job before the run starts: they came
    after dp_train had spent its budget and synthesize and refine had run."""
    assert run_pipeline(tmp_path, params) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"ksg: error: {message}"] and not (tmp_path / "run").exists()


def test_a_private_test_set_of_a_client_not_in_the_spec_is_refused_before_the_run_starts(tmp_path: Path, capsys):
    write_jsonl(tmp_path / "held_out.jsonl", sentiment_rows(5))
    evaluate = {"name": "evaluate", "params": {"tasks": ["fpb"], "private_tasks": {"client_9": ["held_out.jsonl"]}, "models": ["final"], "limit": 4}}
    assert run_pipeline(tmp_path, FEDTUNE, extra_stages=[evaluate]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"ksg: error: {tmp_path / 'spec.yaml'}: evaluate params.private_tasks: no client 'client_9' in the spec (clients: client_0, client_1)"] and not (tmp_path / "run").exists()


def test_a_running_federation_without_its_ca_certificate_is_refused_before_the_run_starts(tmp_path: Path, capsys):
    from knowledgesg.errors import InputError
    from knowledgesg.federated.deploy import deploy_settings_here
    from knowledgesg.spec import DeploySettings

    assert run_pipeline(tmp_path, dict(FEDTUNE, engine="flower-deploy", deploy={"launch": "none"})) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["ksg: error: fedtune params.deploy.root_certificates: the SuperLink's CA certificate is required with launch: none (TLS is not optional)"]
    assert not (tmp_path / "run").exists()  # it came after dp_train, synthesize and refine, and the first round's set-up
    # a relative path is read from the spec's directory, as every path in a spec is (it was read from the working directory)
    settings = DeploySettings(launch="none", root_certificates=Path("ca.pem"))
    with pytest.raises(InputError, match="ca.pem is not a file"):
        deploy_settings_here(settings, tmp_path, "fedtune params.deploy")
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    assert deploy_settings_here(settings, tmp_path, "fedtune params.deploy").root_certificates == tmp_path / "ca.pem"


def test_an_unreachable_local_dp_budget_names_its_own_key_and_client(tmp_path: Path, capsys):
    """The local steps' target is fedtune's local_dp.target_epsilon, not privacy.target_epsilon
    (which dp_train reaches): the error names the key the user must change, before the run starts
    (it came after dp_train, synthesize and refine had run)."""
    assert run_pipeline(tmp_path, dict(FEDTUNE, data="private", local_dp={"target_epsilon": 1e-4})) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "client 'client_0': fedtune: local_dp.target_epsilon = 0.0001 cannot be reached" in err[0], "\n".join(err)
    assert "privacy.target_epsilon" not in err[0]
    assert not (tmp_path / "run").exists()  # refused before dp_train spent its budget


def test_a_local_batch_not_below_a_clients_records_names_the_spec_file_and_key(tmp_path: Path, capsys):
    """A stage plan's refusal names the spec file, as the spec's own checks do (it named the key only)."""
    params = dict(FEDTUNE, data="private", local_dp={"target_epsilon": 4.0}, training=dict(FEDTUNE["training"], batch_size=40))
    assert run_pipeline(tmp_path, params) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ksg: error: {tmp_path / 'spec.yaml'}: fedtune params.training.batch_size: 40, not below the 20 records of client 'client_0' "
                   "(DP-SGD local steps need more records than the batch)"], err
    assert not (tmp_path / "run").exists()


def test_stage_on_private_data_enters_its_dp_sgd_cost(tmp_path: Path):
    from privacy.accounting import Mechanism
    from privacy.ledger import compose

    params = dict(FEDTUNE, data="private", local_dp={"target_epsilon": 2.0})
    assert run_pipeline(tmp_path, params) == 0
    stage = tmp_path / "run/stages/fedtune"
    ledger = json.loads((stage / "ledger.json").read_text())
    assert [e["client_id"] for e in ledger] == ["client_0", "client_0", "client_1", "client_1"]  # one release per round joined
    for client in ("client_0", "client_1"):
        mine = [Mechanism.model_validate(e["mechanism"]) for e in ledger if e["client_id"] == client]
        assert all(m.kind == "poisson_gaussian" and m.steps == 2 and m.sample_rate == pytest.approx(4 / 20) for m in mine)
        assert 1.9 < compose(mine, ledger[0]["delta"]).reported <= 2.02  # the two rounds compose to the budget
    assert all(e["noise"] == "os_entropy" and "server operator included" in e["trust"] for e in ledger)
    rounds = json.loads((stage / "rounds.json").read_text())
    assert all(r["num_examples"] is None and r["mean_loss"] is None for r in rounds)  # un-noised statistics stay on the client
    assert sum(n for r in rounds for n in r["extra"]["dp_steps"].values()) == 2 * 2 * 2  # counted by the clients' accountants
    # the entries the clients send name them, not where they keep their runs; their own ledgers do
    assert {e["run_dir"] for e in ledger} == {"client:client_0", "client:client_1"}
    log = [json.loads(line) for line in (stage / "clients/client_0/local_log.jsonl").read_text().splitlines()]
    assert [row["round"] for row in log] == [1, 2] and all(row["examples"] == 20 for row in log)
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["outputs"]["clients/client_0/local_log.jsonl"]["side"] == "client:client_0"


def test_client_level_dp_fedavg_on_private_data_is_listed_apart_from_the_record_budget(tmp_path: Path):
    params = dict(FEDTUNE, data="private", local_dp={"target_epsilon": 2.0}, clients_per_round=1, client_dp={"clip_norm": 0.5, "noise_multiplier": 1.0})
    assert run_pipeline(tmp_path, params) == 0
    ledger = json.loads((tmp_path / "run/stages/fedtune/ledger.json").read_text())
    client_level = [e for e in ledger if e["unit"] == "client"]
    assert [e["client_id"] for e in client_level] == ["client_0", "client_1"]
    for entry in client_level:  # each client's own coin at q = 1 of 2 clients, one event per round
        assert entry["mechanism"] == {"kind": "poisson_gaussian", "noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 2}
        assert entry["epsilon"]["reported"] > 0 and entry["delta"] == pytest.approx(1e-5) and "final model only" in entry["trust"]
    rounds = json.loads((tmp_path / "run/stages/fedtune/rounds.json").read_text())
    assert all(r["joined"] is None and r["extra"] == {} for r in rounds)
    privacy = json.loads((tmp_path / "run/stages/fedtune/privacy.json").read_text())
    record = privacy["client_level_dp_fedavg"]
    assert record["mechanism"]["sample_rate"] == 0.5 and record["who_adds_the_noise"].startswith("the server") and "each client" in record["who_clips"]
    assert main(["privacy-report", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run/privacy_report.json").read_text())
    assert report["clients"][0]["client_level"]["pld"] == pytest.approx(client_level[0]["epsilon"]["pld"], rel=1e-6)


def test_with_client_level_dp_the_servers_files_do_not_show_whom_the_coins_chose(tmp_path: Path, monkeypatch):
    """Each client's coin (q = 1/2) decides whether its update joins a round, and the server must not
    learn the outcome: rounds.json has no `joined`, and the ledger entries the clients send (kept
    by the server) are one per client and round, alike whether the coin said yes or no, with no
    digest of the update (a digest of zeros would give a client that sat out away). A client trains
    either way: one that sat out and answered at once would show the coin by the reply's time."""
    from knowledgesg.federated.client import ClientRuntime

    trainings, train = [], ClientRuntime._train
    monkeypatch.setattr(ClientRuntime, "_train", lambda self, task, *args: trainings.append((task.client_id, task.round)) or train(self, task, *args))
    params = dict(FEDTUNE, data="private", local_dp={"target_epsilon": 2.0}, clients_per_round=1, rounds=4,
                  client_dp={"clip_norm": 0.5, "noise_multiplier": 1.0})
    assert run_pipeline(tmp_path, params, privacy={"reproducible_noise": True}) == 0  # coins from the seed: the same draws every run
    assert sorted(trainings) == sorted((c, r) for c in ("client_0", "client_1") for r in range(1, 5))  # joined or not
    stage = tmp_path / "run/stages/fedtune"
    record_level = [e for e in json.loads((stage / "ledger.json").read_text()) if e["unit"] != "client"]
    by_round = {(e["client_id"], int(e["artifact"].rsplit("=", 1)[1])): e for e in record_level}
    assert len(record_level) == len(by_round) == 8  # one entry per client and round, joined or not
    logs = {c: [json.loads(line) for line in (stage / f"clients/{c}/local_log.jsonl").read_text().splitlines()] for c in ("client_0", "client_1")}
    joined = {(c, row["round"]): row["joined"] for c, rows in logs.items() for row in rows}  # client side only
    assert set(joined) == set(by_round) and len(set(joined.values())) == 2  # both outcomes occurred
    assert all(e["artifact_sha256"] is None for e in record_level)
    # one client's entries are alike in the rounds its coin said yes and those it said no (but for
    # the round's name, the entry's id and its time, written before the coin is drawn)
    alike = lambda e: {k: v for k, v in e.items() if k not in ("release_id", "released_at", "artifact", "release")}  # noqa: E731
    mixed = [c for c, rows in logs.items() if len({row["joined"] for row in rows}) == 2]
    assert mixed  # a client whose coin said yes in one round and no in another: the comparison below has teeth
    for client in logs:
        assert all(alike(by_round[(client, r)]) == alike(by_round[(client, 1)]) for r in range(2, 5))
    assert all(by_round[key]["release"] == f"fedtune round {key[1]} update: DP-SGD local steps on private data" for key in by_round)
    rounds = json.loads((stage / "rounds.json").read_text())
    assert all(r["joined"] is None and r["num_examples"] is None and r["mean_loss"] is None and r["tries"] == 1 and r["failed"] == {} for r in rounds)
    # the server's client-level noise is keyed from the public seed here: its epsilon holds against no one, and every file says so
    from knowledgesg.cards import privacy_statement
    from privacy.ledger import TRUST_REPRODUCIBLE, LedgerEntry

    client_level = [LedgerEntry.model_validate(e) for e in json.loads((stage / "ledger.json").read_text()) if e["unit"] == "client"]
    assert client_level and all(e.trust == TRUST_REPRODUCIBLE and not e.private and e.noise == "reproducible" for e in client_level)
    record = json.loads((stage / "privacy.json").read_text())["client_level_dp_fedavg"]
    assert record["private"] is False and "NOT PRIVATE" in record["who_adds_the_noise"] and record["trust"] == TRUST_REPRODUCIBLE
    card = privacy_statement({e.client_id: [e] for e in client_level})
    assert card.count("(**NOT PRIVATE**: the server's noise came from the public spec seed)") == 2 and "OS entropy for every release" not in card


def test_fedprox_term_pulls_the_update_towards_the_global_adapter(tmp_path: Path):
    from knowledgesg.federated.client import ClientRuntime
    from knowledgesg.federated.server import task_for

    sizes = {}
    for mu in (0.0, 1000.0):
        job = FedJob(seed=2, rounds=1, clients=["a"], clients_per_round=1, rule=RuleSettings(name="fedprox"),
                     training=LocalTraining(steps=4, batch_size=4, max_length=48, optimizer="sgd", learning_rate=1e-3, proximal_mu=mu),
                     lora=LoraShape(r=4), base_model=tiny_base(), records={"a": records_for("a")})
        x = initial_params(job.base_model, job.lora, 5)
        update = ClientRuntime().fit(task_for(job, "a", 1), x).update
        sizes[mu] = float(np.sqrt(sum((u**2).sum() for u in update.values())))
    assert 0 < sizes[1000.0] < 0.5 * sizes[0.0]


def test_on_a_data_owners_node_its_own_ledger_cap_and_noise_hold_not_the_servers(tmp_path: Path):
    """A server's task names a ledger directory, no cap and (an attack) reproducible noise it could
    regenerate and subtract: a node with its own settings keeps its ledger, its cap, its OS entropy."""
    from knowledgesg.errors import InputError, KsgError
    from knowledgesg.federated.client import ClientRuntime, NodeSettings
    from knowledgesg.federated.protocol import LocalDP
    from knowledgesg.federated.server import task_for

    records = records_for("a", 10)
    dp = LocalDP(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.3, num_units=len(records), delta=1e-5, ledger_dir=str(tmp_path / "named-by-server"))
    node_run = tmp_path / "node-run"
    (node_run / "stages/ingest/clients/a").mkdir(parents=True)
    (node_run / "stages/ingest/clients/a/ledger_key.json").write_text(json.dumps({"data_key": "d" * 64}))
    job = FedJob(seed=2, rounds=1, clients=["a"], clients_per_round=1, rule=RuleSettings(name="fedavg"), training=LocalTraining(steps=2, batch_size=4, max_length=48),
                 lora=LoraShape(r=4), base_model=tiny_base(), records={"a": records}, local_dp={"a": dp}, run_dir=str(node_run))
    x = initial_params(job.base_model, job.lora, 5)
    task, owner = task_for(job, "a", 1), tmp_path / "owner-ledger"

    replayable = task.model_copy(update={"local_dp": dp.model_copy(update={"reproducible_noise": True})})
    with pytest.raises(KsgError, match="reproducible-noise"):
        ClientRuntime().fit(replayable, x, node=NodeSettings(str(owner)))
    assert not owner.exists()  # refused before any training or entry
    with pytest.raises(InputError, match=r"cap 0\.5"):
        ClientRuntime().fit(task, x, node=NodeSettings(str(owner), cap_epsilon=0.5))  # the server sent no cap

    ClientRuntime().fit(task, x, node=NodeSettings(str(owner)))
    entries = [json.loads(line) for path in owner.glob("*.jsonl") for line in path.read_text().splitlines()]
    assert len(entries) == 1 and entries[0]["noise"] == "os_entropy" and not (tmp_path / "named-by-server").exists()
    # in the server's own process (a simulation) the task's settings are the spec's, and hold
    ClientRuntime().fit(task, x)
    assert len(list((tmp_path / "named-by-server").glob("*.jsonl"))) == 1
    # a node config naming the node's spec: its privacy section, as the node's own ingest and dp_train read it
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(tiny_spec(privacy={"target_epsilon": 8.0, "ledger_dir": "owner-ledger", "cap_epsilon": 9.0})))
    settings = NodeSettings.of({"run-dir": str(node_run), "spec": str(tmp_path / "node.yaml")})
    assert settings == NodeSettings(str(owner), 9.0, False, unit="record", clients=settings.clients, base_model="tiny-random-llama", base_dir=str(tmp_path)) and settings.clients == load_spec(str(tmp_path / "node.yaml"))[0].clients
    assert NodeSettings.of({"run-dir": str(node_run), "spec": str(tmp_path / "node.yaml"), "cap-epsilon": 2.0, "ledger-dir": "elsewhere"}) == NodeSettings("elsewhere", 2.0, False, unit="record", clients=settings.clients, base_model="tiny-random-llama", base_dir=str(tmp_path))
    # a deployed node with no settings of its own (no run-dir) would obey the task's: refused on private data
    from knowledgesg.federated.flower import SIMULATION_FLAG, node_settings

    with pytest.raises(KsgError, match="no run-dir in its node config"):
        node_settings({"client-id": "a"}, replayable)
    # `partition-id` in a deployed node's config (a Flower habit) does not make it a simulation's node
    with pytest.raises(KsgError, match="no run-dir in its node config"):
        node_settings({"client-id": "a", "partition-id": 0, "num-partitions": 1}, replayable)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SIMULATION_FLAG, "1")  # set by run_simulation in the process that starts it
        assert node_settings({"partition-id": 0, "num-partitions": 1}, replayable) is None  # a simulation's virtual node
    assert node_settings({"client-id": "a"}, task.model_copy(update={"local_dp": None})) is None  # synthetic data: nothing private to protect
    assert node_settings({"run-dir": str(node_run), "spec": str(tmp_path / "node.yaml")}, replayable) == settings


def test_a_node_without_a_spec_in_its_config_keeps_its_run_specs_cap_and_refuses_before_training(tmp_path: Path, monkeypatch):
    """A node started with only run-dir and client-id (as the README shows) holds the cap its run's
    spec copy sets, whatever the task says; a round the cap refuses is refused before any training
    (a refusal after it would let the server time work on the private data, for free)."""
    from knowledgesg.federated.client import ClientRuntime, NodeSettings
    from knowledgesg.federated.protocol import LocalDP
    from knowledgesg.federated.server import task_for

    records = records_for("a", 10)
    node_run = tmp_path / "node-run"
    (node_run / "stages/ingest/clients/a").mkdir(parents=True)
    (node_run / "stages/ingest/clients/a/ledger_key.json").write_text(json.dumps({"data_key": "d" * 64}))
    (node_run / "spec.json").write_text(json.dumps({"spec": tiny_spec(privacy={"target_epsilon": 8.0, "cap_epsilon": 0.5}), "base_dir": str(tmp_path),
                                                    "role": {"kind": "client", "client": "a"}}))
    node = NodeSettings.of({"run-dir": str(node_run), "client-id": "a"})
    assert node.cap_epsilon == 0.5 and node.base_model == "tiny-random-llama" and node.base_dir == str(tmp_path)  # the spec copy's
    # without client-id the node is the client its run directory was made for, not whichever the server names
    assert NodeSettings.of({"run-dir": str(node_run)}).client_id == "a"
    dp = LocalDP(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.3, num_units=len(records), delta=1e-5)  # the server sends no cap
    job = FedJob(seed=2, rounds=1, clients=["a"], clients_per_round=1, rule=RuleSettings(name="fedavg"), training=LocalTraining(steps=2, batch_size=4, max_length=48),
                 lora=LoraShape(r=4), base_model=tiny_base(), records={"a": records}, local_dp={"a": dp}, run_dir=str(node_run))
    trained = []
    monkeypatch.setattr(ClientRuntime, "_train", lambda self, *args: trained.append(1) or pytest.fail("trained before the cap refused"))
    with pytest.raises(InputError, match=r"cap 0\.5"):
        ClientRuntime().fit(task_for(job, "a", 1), initial_params(job.base_model, job.lora, 5), node=node)
    assert not trained and not list((node_run / "ledger").glob("*.jsonl"))
    with pytest.raises(KsgError, match="records of stage 'structure'; a fedtune client reads ingest's"):  # the server names no other stage's files
        node.govern(task_for(job, "a", 1).model_copy(update={"private_source": "structure"}))


def test_a_node_refuses_a_private_round_with_more_work_than_its_spec_plans(tmp_path: Path):
    """The server planned the mechanism, and the node checked only its noise origin, unit and cap:
    asked for q = 1 with huge noise, a round cost almost no epsilon but read every record every
    step, and the time it took told the server N (or whether a record is in). The node's own spec's
    fedtune training bounds the work; within it, the round goes on."""
    from knowledgesg.federated.client import NodeSettings
    from knowledgesg.federated.protocol import LocalDP
    from knowledgesg.federated.server import task_for

    records = records_for("a", 10)
    training = {"steps": 2, "batch_size": 4, "max_length": 48}
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(tiny_spec(stages=["prepare_models", "ingest", {"name": "fedtune", "params": {"training": training}}],
                                                                 privacy={"target_epsilon": 8.0})))
    node = NodeSettings.of({"run-dir": str(tmp_path / "node-run"), "spec": str(tmp_path / "node.yaml"), "client-id": "a"})
    assert node.training == LocalTraining(**training)
    dp = LocalDP(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.3, num_units=len(records), delta=1e-5)
    job = FedJob(seed=2, rounds=1, clients=["a"], clients_per_round=1, rule=RuleSettings(name="fedavg"), training=LocalTraining(**training),
                 lora=LoraShape(r=4), base_model=tiny_base(), records={"a": records}, local_dp={"a": dp})
    task = task_for(job, "a", 1)
    assert node.govern(task).training == task.training  # the spec's own plan (q N = 3 of a batch of 4)
    every_record = task.model_copy(update={"local_dp": dp.model_copy(update={"sample_rate": 1.0, "noise_multiplier": 1000.0})})
    longer = task.model_copy(update={"training": task.training.model_copy(update={"steps": 200})})
    for asked in (every_record, longer):
        with pytest.raises(KsgError, match="more work on the private records than this node's spec plans"):
            node.govern(asked)


def test_flower_sim_trains_private_data_with_the_specs_settings(tmp_path: Path):
    """A simulation's virtual nodes (Ray actors this process starts) are the server's own process,
    where the spec's ledger, cap and noise hold: they train on private data, while a deployed node
    whose config merely says partition-id is refused (test above)."""
    params = dict(FEDTUNE, engine="flower-sim", data="private", local_dp={"target_epsilon": 2.0}, rounds=1)
    assert run_pipeline(tmp_path, params) == 0
    ledger = [json.loads(line) for path in (tmp_path / "run/ledger").glob("*.jsonl") for line in path.read_text().splitlines()]
    assert sorted(e["client_id"] for e in ledger if e["stage"] == "fedtune") == ["client_0", "client_1"]


def test_a_bound_below_one_record_per_unit_is_not_a_task(tmp_path: Path):
    """A server's bound of 0 or -k records per unit would empty small units, and the error that
    followed would say whether any unit is that small: the task is refused where it is read."""
    from pydantic import ValidationError

    from knowledgesg.federated.protocol import LocalDP

    for bound in (0, -1):
        with pytest.raises(ValidationError, match="max_records_per_user"):
            LocalDP(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.3, num_units=10, delta=1e-5, unit="user", max_records_per_user=bound)


def test_a_node_trains_no_base_model_outside_the_registry_its_spec_does_not_name(tmp_path: Path):
    """A model the server chose could break what DP-SGD assumes (one unit per row: a model that
    turns the batch sequence-first mixes units in each clipped gradient): a node trains a base model
    outside the registry only where its own spec names it."""
    from knowledgesg.federated.client import NodeSettings
    from knowledgesg.federated.server import task_for

    from knowledgesg.federated.protocol import LocalDP

    import shutil

    dp = LocalDP(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.3, num_units=4, delta=1e-5)
    shutil.copytree(tiny_base()["path"], tmp_path / "models/mine")  # the data owner's own local model
    server = dict(tiny_base(), name="models/mine", path="/srv/server/chosen-model", weights_sha256=None)
    job = FedJob(seed=2, rounds=1, clients=["a"], clients_per_round=1, rule=RuleSettings(name="fedavg"), training=LocalTraining(steps=2, batch_size=4, max_length=48),
                 lora=LoraShape(r=4), base_model=server, records={"a": records_for("a", 4)}, local_dp={"a": dp})
    task, ledger = task_for(job, "a", 1), str(tmp_path / "ledger")
    for node in (NodeSettings(ledger), NodeSettings(ledger, base_model="someone/other", base_dir=str(tmp_path))):
        with pytest.raises(KsgError, match="not a packaged model nor the one this node's spec names"):
            node.own_base_model(task)
    named = NodeSettings(ledger, base_model="models/mine", base_dir=str(tmp_path))
    own = named.own_base_model(task).base_model
    assert own["path"] == str((tmp_path / "models/mine").resolve()) and own["weights_sha256"]  # the node's own copy, never the server's path
    with pytest.raises(KsgError, match="weights .* are not the server's"):
        named.own_base_model(task_for(job.model_copy(update={"base_model": dict(server, weights_sha256="2" * 64)}), "a", 1))
    # its spec's directory gone: the name would be taken for a Hugging Face id, with no weights to check: refused
    with pytest.raises(KsgError, match="weights .* none found"):
        NodeSettings(ledger, base_model="models/mine", base_dir=str(tmp_path / "elsewhere")).own_base_model(
            task_for(job.model_copy(update={"base_model": dict(server, weights_sha256=own["weights_sha256"])}), "a", 1))
    public = task.model_copy(update={"local_dp": None, "private_source": None})
    assert NodeSettings(ledger).own_base_model(public) == public  # public data: no unit to protect


def test_a_node_loads_the_base_model_from_its_own_cache_and_refuses_other_weights(tmp_path: Path):
    """The server's task names the base model's path on the server's machine: a node loads a
    packaged model from its own cache, and refuses weights other than the server's."""
    from knowledgesg.federated.client import NodeSettings
    from knowledgesg.federated.server import task_for

    here = tiny_base()  # this machine's cache, which the node (model-cache unset) uses as well
    on_server = dict(here, path="/srv/elsewhere/models/tiny-random-llama")
    job = FedJob(seed=2, rounds=1, clients=["a"], clients_per_round=1, rule=RuleSettings(name="fedavg"), training=LocalTraining(steps=2, batch_size=4, max_length=48),
                 lora=LoraShape(r=4), base_model=on_server, records={"a": records_for("a", 4)})
    node = NodeSettings(str(tmp_path / "ledger"))
    assert node.own_base_model(task_for(job, "a", 1)).base_model == here
    for digest in ("0" * 64, None):  # other weights, or none named
        other = job.model_copy(update={"base_model": dict(on_server, weights_sha256=digest)})
        with pytest.raises(KsgError, match="weights .* are not the server's"):
            node.own_base_model(task_for(other, "a", 1))
    hub = job.model_copy(update={"base_model": dict(here, name="owner/model", path="owner/model", weights_sha256=None)})
    assert node.own_base_model(task_for(hub, "a", 1)).base_model["path"] == "owner/model"  # public data, not a packaged name: as the server names it
    assert NodeSettings.of({"run-dir": str(tmp_path), "model-cache": "/node/cache"}).model_cache == "/node/cache"


def test_a_node_refuses_a_task_for_another_client_or_a_path_for_a_name(tmp_path: Path):
    """The ledger counts a client's releases under its name: a server that sent the node's client
    under another name ("A" for "a", one directory on a case-blind file system; "./a", the same
    directory anywhere) would start it on a fresh budget past its cap. The node knows which client
    it is (`client-id`) and refuses any other name before training; a name that is a path is
    refused where the task is read."""
    from pydantic import ValidationError

    from knowledgesg.federated.client import ClientRuntime, NodeSettings
    from knowledgesg.federated.protocol import ClientTask, LocalDP
    from knowledgesg.federated.server import task_for

    records = records_for("a", 10)
    dp = LocalDP(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.3, num_units=len(records), delta=1e-5)
    job = FedJob(seed=2, rounds=1, clients=["a"], clients_per_round=1, rule=RuleSettings(name="fedavg"), training=LocalTraining(steps=2, batch_size=4, max_length=48),
                 lora=LoraShape(r=4), base_model=tiny_base(), records={"a": records}, local_dp={"a": dp}, run_dir=str(tmp_path / "node-run"))
    x = initial_params(job.base_model, job.lora, 5)
    task, owner = task_for(job, "a", 1), tmp_path / "owner-ledger"
    node = NodeSettings.of({"run-dir": str(tmp_path / "node-run"), "ledger-dir": str(owner), "client-id": "a"})
    assert node.client_id == "a"
    with pytest.raises(KsgError, match="this node is client 'a', and the server's task names 'A': refused"):
        ClientRuntime().fit(task.model_copy(update={"client_id": "A"}), x, node=node)
    assert not owner.exists() and not (tmp_path / "node-run").exists()  # refused before any training, entry or log
    for alias in ("./a", "../node-run/stages/ingest/clients/a"):
        with pytest.raises(ValidationError, match="unsafe identifier"):
            ClientTask.model_validate_json(task.model_copy(update={"client_id": alias}).model_dump_json())
    with pytest.raises(ValidationError, match="unsafe identifier"):
        ClientTask.model_validate_json(task.model_copy(update={"records": None, "private_source": "../../elsewhere"}).model_dump_json())


def test_a_node_refuses_a_plan_at_a_larger_delta_or_a_weaker_unit_than_its_own(tmp_path: Path):
    """At a larger delta the same noise claims a smaller epsilon, and record-level units understate
    what a user's records cost: a server naming either could pass the node's cap. The node refuses
    a delta above its own (else its ledger's, else the default for its own N), or not below 1/N
    for its own N, and a unit other than its own, before any training or entry."""
    from knowledgesg.federated.client import ClientRuntime, NodeSettings
    from knowledgesg.federated.protocol import LocalDP
    from knowledgesg.federated.server import task_for

    records = records_for("a", 10)
    owner, node_run = tmp_path / "owner-ledger", tmp_path / "node-run"
    (node_run / "stages/ingest/clients/a").mkdir(parents=True)
    (node_run / "stages/ingest/clients/a/ledger_key.json").write_text(json.dumps({"data_key": "d" * 64}))

    def task_at(delta: float, unit: str = "record"):
        dp = LocalDP(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.3, num_units=len(records), delta=delta, unit=unit)
        job = FedJob(seed=2, rounds=1, clients=["a"], clients_per_round=1, rule=RuleSettings(name="fedavg"), training=LocalTraining(steps=2, batch_size=4, max_length=48),
                     lora=LoraShape(r=4), base_model=tiny_base(), records={"a": records}, local_dp={"a": dp}, run_dir=str(node_run))
        return task_for(job, "a", 1), initial_params(job.base_model, job.lora, 5)

    with pytest.raises(KsgError, match=r"the server plans delta 0\.001, above the default delta for its 10 records, 1e-05: refused"):
        ClientRuntime().fit(*task_at(1e-3), node=NodeSettings(str(owner), client_id="a"))
    with pytest.raises(KsgError, match=r"the server plans delta 0\.001, above this node's delta, 0\.0001: refused"):
        ClientRuntime().fit(*task_at(1e-3), node=NodeSettings(str(owner), client_id="a", delta=1e-4))
    with pytest.raises(KsgError, match=r"the server plans delta 0\.2, not below 1/N = 0\.1 for its 10 records"):
        ClientRuntime().fit(*task_at(0.2), node=NodeSettings(str(owner), client_id="a", delta=0.2))  # the node's own delta, yet not below 1/N
    with pytest.raises(KsgError, match=r"the server's plan counts privacy per record, this node's privacy unit is the user \(unit\): refused"):
        ClientRuntime().fit(*task_at(1e-6), node=NodeSettings(str(owner), client_id="a", unit="user"))
    assert not owner.exists()
    ClientRuntime().fit(*task_at(1e-7), node=NodeSettings(str(owner), client_id="a", unit="record"))
    assert len(list(owner.glob("*.jsonl"))) == 1
    # once the ledger holds a release, its delta is the ceiling: the default (1e-5 for N = 10) no longer is
    with pytest.raises(KsgError, match=r"the server plans delta 1e-06, above the delta of this client's ledger, 1e-07: refused"):
        ClientRuntime().fit(*task_at(1e-6), node=NodeSettings(str(owner), client_id="a"))
    assert NodeSettings.of({"run-dir": str(node_run), "delta": 1e-6, "unit": "user"}) == NodeSettings(str(node_run / "ledger"), delta=1e-6, unit="user")
    # launch: local writes the spec's settings into each node's config, as Flower parses it
    from flwr.common.config import parse_config_args

    from knowledgesg.federated.deploy import node_config

    config = parse_config_args([node_config("a", node_run, owner, 3.0, False, 1e-6, "user", tmp_path / "models")])
    assert NodeSettings.of(config) == NodeSettings(str(owner.resolve()), 3.0, False, "a", 1e-6, "user", str((tmp_path / "models").resolve()))


def test_a_run_whose_releases_would_pass_the_cap_is_refused_before_anything_is_written(tmp_path: Path, capsys):
    params = dict(FEDTUNE, data="private", local_dp={"target_epsilon": 6.0})
    assert run_pipeline(tmp_path, params, cap=9.0) == 2  # dp_train's 7.98, PLD-composed with 5.99: 9.89
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "client 'client_0': the planned releases would exceed the privacy budget cap" in err[0], err
    assert not (tmp_path / "run").exists()  # before: refused at fedtune, after dp_train, synthesize and refine had run


def test_stage_refuses_a_budget_past_the_cap_before_training(tmp_path: Path):
    """With one of two clients sampled per round by the server's seed, the plan before the run
    counts no fedtune round as sure; the stage checks the rounds the seed gives."""
    params = dict(FEDTUNE, data="private", local_dp={"target_epsilon": 6.0}, clients_per_round=1)
    assert run_pipeline(tmp_path, params, cap=9.0) == 2
    assert (tmp_path / "run/stages/dp_train/manifest.json").is_file() and not (tmp_path / "run/stages/fedtune").exists()


def test_updates_travel_in_float16_or_int8_with_the_bytes_recorded(tmp_path: Path):
    from knowledgesg.federated.protocol import decode_update, encode_update, params_bytes

    rng = np.random.default_rng(0)
    update = {"a": rng.normal(0, 1e-2, (8, 16)).astype(np.float32), "b": rng.normal(0, 1e-3, (16,)).astype(np.float32)}
    for encoding, ratio, tolerance in (("float16", 0.5, 1e-3), ("int8", 0.25, 0.5 / 127)):
        sent = encode_update(update, encoding)
        back = decode_update(sent, update)
        assert params_bytes(sent) <= ratio * params_bytes(update) + 8 * len(update)  # + one float32 scale per tensor for int8
        for name in update:  # float16: relative rounding; int8: half a step of max|value|/127
            assert np.abs(back[name] - update[name]).max() <= tolerance * np.abs(update[name]).max()
    # the same job end to end: int8 quarters the bytes up and moves the final adapter little
    finals, rounds = {}, {}
    for encoding in ("float32", "int8"):
        job_path = make_job(tmp_path / encoding)
        job = FedJob.model_validate(read_json(job_path)).model_copy(update={"update_encoding": encoding})
        write_json(job_path, job.model_dump(mode="json"))
        run_local(job_path)
        finals[encoding], rounds[encoding] = load_params(job_path.parent / FINAL), read_json(job_path.parent / "rounds.json")
    up = {e: sum(r["bytes_up"] for r in rounds[e]) for e in rounds}
    assert 0.24 < up["int8"] / up["float32"] < 0.27 and rounds["int8"][0]["bytes_down"] == rounds["float32"][0]["bytes_down"] > 0
    initial = load_params(tmp_path / "float32" / INITIAL)
    moved = np.sqrt(sum(float(((finals["float32"][k] - initial[k]) ** 2).sum()) for k in initial))
    assert 0 < max_difference(finals["float32"], finals["int8"]) and np.sqrt(sum(float(((finals["float32"][k] - finals["int8"][k]) ** 2).sum()) for k in initial)) < 0.05 * moved
    with pytest.raises(ValueError, match="client-level DP needs"):
        FedJob.model_validate({**job.model_dump(), "client_dp": {"clip_norm": 1.0, "noise_multiplier": 1.0}})


def test_ffa_lora_trains_and_sends_b_only_with_the_same_a_everywhere(tmp_path: Path):
    """FFA-LoRA: A is drawn from the public a_seed by every party and never trained; only B is in
    the parameters the server sends and aggregates, so a round carries B's share of the bytes."""
    from knowledgesg.federated.client import LoraModel

    rounds = {}
    for ffa in (False, True):
        job_path = make_job(tmp_path / str(ffa))
        job = FedJob.model_validate(read_json(job_path))
        job = job.model_copy(update={"lora": job.lora.model_copy(update={"ffa": ffa, "a_seed": 5})})
        write_json(job_path, job.model_dump(mode="json"))
        save_params(job_path.parent / INITIAL, initial_params(job.base_model, job.lora, 5))
        run_local(job_path)
        rounds[ffa] = read_json(job_path.parent / "rounds.json")
        final = load_params(job_path.parent / FINAL)
        if ffa:
            assert final and all("lora_B" in name for name in final)
            assert all(np.abs(v).max() > 0 for v in final.values())  # B trained away from zero
    plain = load_params(tmp_path / "False" / INITIAL)
    b_share = sum(v.nbytes for n, v in plain.items() if "lora_B" in n) / sum(v.nbytes for v in plain.values())  # about half (B is smaller where k/v heads are fewer)
    assert sum(r["bytes_up"] for r in rounds[True]) / sum(r["bytes_up"] for r in rounds[False]) == pytest.approx(b_share) and b_share < 0.55
    # A is the same on two parties that build the model apart (a fresh process would do the same)
    shape = job.lora
    LoraModel._cache.clear()
    first = {n: p.detach().clone() for n, p in LoraModel.get(job.base_model, shape, "cpu").model.named_parameters() if "lora_A" in n}
    LoraModel._cache.clear()
    import torch

    torch.manual_seed(123)  # whatever the process's torch stream
    second = {n: p.detach() for n, p in LoraModel.get(job.base_model, shape, "cpu").model.named_parameters() if "lora_A" in n}
    assert first and all(torch.equal(first[n], second[n]) for n in first)


def test_ffa_lora_a_party_whose_a_differs_is_refused():
    from knowledgesg.federated.client import LoraModel, frozen_a_digest

    shape = LoraShape(r=4, ffa=True, a_seed=5)
    LoraModel._cache.clear()
    digest = frozen_a_digest(LoraModel.get(tiny_base(), shape, "cpu").model)
    LoraModel._cache.clear()
    assert LoraModel.get(tiny_base(), shape.model_copy(update={"a_sha256": digest}), "cpu")  # the same A: accepted
    LoraModel._cache.clear()
    with pytest.raises(KsgError, match="differs from the server's"):
        LoraModel.get(tiny_base(), shape.model_copy(update={"a_sha256": "0" * 64}), "cpu")


def test_bfloat16_base_weights_train_a_float32_adapter_under_local_dp(tmp_path: Path, monkeypatch):
    from knowledgesg.federated.client import LoraModel

    built = []  # (precision asked, trainable dtypes, frozen dtypes) of each model the clients and server build
    original = LoraModel.__init__

    def recording(self, base_model, lora, device, precision="float32"):
        original(self, base_model, lora, device, precision)
        built.append((precision, {p.dtype for p in self.model.parameters() if p.requires_grad}, {p.dtype for p in self.model.parameters() if not p.requires_grad}))

    monkeypatch.setattr(LoraModel, "__init__", recording)
    training = dict(FEDTUNE["training"], precision="bfloat16")
    assert run_pipeline(tmp_path, dict(FEDTUNE, training=training, data="private", local_dp={"target_epsilon": 2.0})) == 0
    trained = [b for b in built if b[0] == "bfloat16"]
    assert trained and all(t == {torch.float32} and f == {torch.bfloat16} for _, t, f in trained)  # DPSGD would refuse a bfloat16 adapter
    ledger = json.loads((tmp_path / "run/stages/fedtune/ledger.json").read_text())
    assert len(ledger) == 4 and all(e["mechanism"]["kind"] == "poisson_gaussian" for e in ledger)
    assert json.loads((tmp_path / "run/stages/fedtune/training.json").read_text()) == {"precision": {"asked": "bfloat16", "ran": "bfloat16"},
                                                                                                      "final_adapter": "the global adapter after round 2"}


def test_a_refused_round_on_private_data_keeps_the_rounds_released_before_it(tmp_path: Path, monkeypatch):
    """On private data each round is a release, kept in the checkpoint. A round refused (too few
    replies, say) had wiped the stage, checkpoint and all, so the resume ran every round again:
    round 1 released twice. Now the resume goes on after round 1: one release per round."""
    import knowledgesg.federated.server as server
    from knowledgesg.errors import KsgError

    real = server.collect_round

    def refused_once(job, transport, asked, round_number, *args, **kwargs):
        if round_number == 2 and not (tmp_path / "refused").exists():
            (tmp_path / "refused").touch()
            raise KsgError("round 2: 0 of 2 clients answered after 1 try, fewer than the 2 needed (min_clients)")
        return real(job, transport, asked, round_number, *args, **kwargs)

    from privacy.ledger import LedgerEntry, compose

    params = dict(FEDTUNE, data="private", local_dp={"target_epsilon": 2.0})
    # a cap that holds the whole run once, as it spends it uninterrupted: the resume must plan
    # only the rounds still to come on top of round 1 (it had planned every round again: refused)
    (tmp_path / "whole").mkdir()
    assert run_pipeline(tmp_path / "whole", params) == 0
    spent = [LedgerEntry.model_validate_json(line) for path in (tmp_path / "whole/run/ledger").glob("*.jsonl") for line in path.read_text().splitlines()]
    cap = max(compose([e.effective_mechanism() for e in spent if e.client_id == c], spent[0].delta).reported for c in ("client_0", "client_1")) + 0.01
    monkeypatch.setattr(server, "collect_round", refused_once)
    assert run_pipeline(tmp_path, params, cap=cap) == 1
    assert (tmp_path / "run/stages/fedtune/work/checkpoint.npz").is_file()
    assert run_pipeline(tmp_path, params, cap=cap) == 0
    entries = [json.loads(line) for path in (tmp_path / "run/ledger").glob("*.jsonl") for line in path.read_text().splitlines()]
    rounds = sorted((e["client_id"], e["release"]) for e in entries if e["stage"] == "fedtune")
    assert rounds == sorted((c, f"fedtune round {r} update: DP-SGD local steps on private data") for c in ("client_0", "client_1") for r in (1, 2)), rounds
    assert not (tmp_path / "run/stages/fedtune/work").exists()  # removed once the manifest is written


def test_a_checkpoint_resumes_whatever_the_settings_that_do_not_change_the_rounds():
    """Where the run, the model cache and the ledgers are, the device and the cap change nothing a
    round computes: a checkpoint made under other ones is resumed (they had started every round
    again, on private data a release made anew); a change of what the rounds compute is not."""
    from knowledgesg.federated.protocol import LocalDP
    from knowledgesg.federated.server import resume_digest

    dp = LocalDP(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.2, num_units=20, delta=1e-5, cap_epsilon=8.0, ledger_dir="/a/ledger")
    job = scripted_job("fedavg").model_copy(update={"base_model": {"name": "m", "path": "/cache/a/m", "weights_sha256": "w"}, "run_dir": "/a/run",
                                                   "local_dp": {c: dp for c in CLIENTS}})
    moved = job.model_copy(update={"base_model": {"name": "m", "path": "/cache/b/m", "weights_sha256": "w"}, "run_dir": "/b/run", "device": "cuda",
                                   "local_dp": {c: dp.model_copy(update={"cap_epsilon": 9.0, "ledger_dir": "/b/ledger"}) for c in CLIENTS}})
    assert resume_digest(moved) == resume_digest(job)
    for changed in ({"rounds": 3}, {"base_model": {"name": "m", "path": "/cache/a/m", "weights_sha256": "other"}},
                    {"local_dp": {c: dp.model_copy(update={"noise_multiplier": 2.0}) for c in CLIENTS}}):
        assert resume_digest(job.model_copy(update=changed)) != resume_digest(job), changed
