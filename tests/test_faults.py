"""The federation survives faults: a client that fails, a client that fails once, a client that
dies or never answers over Flower, a server killed between rounds (it resumes from the last
finished round with the adapter, the server optimizer's state and the control variates as they
were)."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from knowledgesg.federated.client import ClientRuntime
from tests.conftest import run_cli
from tests.test_fedtune import FEDTUNE, run_pipeline

ROUNDS = 3


def _rounds(workdir: Path, run: str = "run") -> list[dict]:
    return json.loads((workdir / run / "stages/fedtune/rounds.json").read_text())


def _failing(clients: set[str], times: int | None = None):
    """ClientRuntime.fit that raises for `clients` (the first `times` calls each, or always)."""
    real, calls = ClientRuntime.fit, {}

    def fit(self, task, *args, **kwargs):
        calls[task.client_id] = calls.get(task.client_id, 0) + 1
        if task.client_id in clients and (times is None or calls[task.client_id] <= times):
            raise RuntimeError("node went down")
        return real(self, task, *args, **kwargs)

    return fit


def test_a_failed_client_is_recorded_and_the_round_goes_on_with_min_clients(workdir: Path, monkeypatch):
    monkeypatch.setattr(ClientRuntime, "fit", _failing({"client_1"}))
    assert run_pipeline(workdir, dict(FEDTUNE, rounds=ROUNDS, min_clients=1)) == 0
    for record in _rounds(workdir):
        # the server learns the kind of failure only: an exception's message may quote the client's data
        assert record["joined"] == ["client_0"] and record["failed"] == {"client_1": "RuntimeError on the client (the message stays in its log)"} and record["tries"] == 1


def test_too_few_clients_stop_the_federation_with_a_clear_error(workdir: Path, monkeypatch, capsys):
    monkeypatch.setattr(ClientRuntime, "fit", _failing({"client_1"}))
    assert run_pipeline(workdir, dict(FEDTUNE, rounds=ROUNDS)) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "round 1: 1 of 2 clients answered after 1 try, fewer than the 2 needed (min_clients): client_1: RuntimeError on the client" in error
    assert not (workdir / "run/stages/fedtune/manifest.json").exists()


def test_a_client_that_fails_once_is_asked_again(workdir: Path, monkeypatch):
    monkeypatch.setattr(ClientRuntime, "fit", _failing({"client_1"}, times=1))
    assert run_pipeline(workdir, dict(FEDTUNE, rounds=ROUNDS, round_retries=1)) == 0
    first, *rest = _rounds(workdir)
    assert first["tries"] == 2 and first["joined"] == ["client_0", "client_1"] and first["failed"] == {}
    assert all(r["tries"] == 1 for r in rest)


@pytest.mark.parametrize("rule", [{"name": "fedadam", "server_lr": 0.01}, {"name": "scaffold"}])
def test_a_server_killed_between_rounds_resumes_from_the_last_round(workdir: Path, rule: dict):
    """SIGKILL right after round 2's checkpoint, then `ksg run` again: the final adapter is the one
    an uninterrupted run makes, so the server optimizer's moments (fedadam), the server's and the
    clients' control variates (scaffold) came back as they were."""
    fedtune = dict(FEDTUNE, rounds=ROUNDS, rule=rule, training=dict(FEDTUNE["training"], optimizer="sgd", learning_rate=0.05))
    assert run_pipeline(workdir, fedtune) == 0  # the reference, uninterrupted
    shutil.copytree(workdir / "run", workdir / "killed")
    shutil.rmtree(workdir / "killed/stages/fedtune")  # every stage before it stays cached (no generation in the subprocess)
    spec = str(workdir / "spec.yaml")
    crashed = run_cli("run", spec, "--run-dir", str(workdir / "killed"), env={"KSG_CRASH_AFTER": "fedtune-round-2"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert (workdir / "killed/stages/fedtune/work/checkpoint.npz").is_file()
    resumed = run_cli("run", spec, "--run-dir", str(workdir / "killed"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = resumed.stdout + resumed.stderr
    assert f"resuming after round 2 of {ROUNDS}" in log and "fedtune round 1" not in log and "fedtune round 3" in log
    adapter = "stages/fedtune/adapter/adapter_model.safetensors"
    assert (workdir / "killed" / adapter).read_bytes() == (workdir / "run" / adapter).read_bytes()
    strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]  # noqa: E731
    assert strip(_rounds(workdir, "killed")) == strip(_rounds(workdir))


def test_over_flower_a_client_that_dies_or_never_answers_is_recorded_and_the_rounds_go_on(tmp_path: Path, monkeypatch):
    """flower-deploy on 127.0.0.1 (TLS, registered nodes), three clients, min_clients 1: client b's
    ClientApp is killed (SIGKILL) when round 1 reaches it, and client c's stops for good without
    dying (it never answers). The round waits `round_timeout_s`, aggregates a, and names b and c
    with their reasons; round 2 goes on."""
    from knowledgesg.federated.deploy import LocalFederation, make_node_key, node_config, submit
    from knowledgesg.federated.engines import FINAL, JOB
    from knowledgesg.federated.server import FedJob
    from knowledgesg.fileio import read_json, write_json
    from tests.test_fedtune import make_job

    clients = ["a", "b", "c"]
    job_path = make_job(tmp_path / "deploy", clients=clients, per_round=3)
    job = FedJob.model_validate(read_json(job_path)).model_copy(update={"min_clients": 1, "round_timeout_s": 40.0})  # time for a fresh ClientApp to answer with the other test worker busy
    write_json(job_path, job.model_dump(mode="json"))
    # every node's environment; only b's and c's ClientApps meet them
    monkeypatch.setenv("KSG_CRASH_AFTER", "fedtune-client-b-round-1")
    monkeypatch.setenv("KSG_HANG_AT", "fedtune-client-c-round-1")
    with LocalFederation(tmp_path / "federation") as federation:
        federation.start_superlink()
        for c in clients:
            private, public = make_node_key(federation.directory / "keys", c)
            federation.register(public)
            federation.start_supernode(c, private, node_config(c, tmp_path))
        submit(job_path, federation.flwr_home, timeout_s=600)
    rounds = json.loads((job_path.parent / "rounds.json").read_text())
    assert rounds[0]["joined"] == ["a"] and set(rounds[0]["failed"]) == {"b", "c"}
    assert rounds[0]["failed"]["c"] == "no reply within 40 s"  # the hung client: the round did not wait for it past its timeout
    assert rounds[0]["failed"]["b"]
    assert rounds[1]["joined"][0] == "a"  # the federation went on (b's node is back only once Flower notices its ClientApp died, after about a minute)
    assert len(rounds) == 2 and (job_path.parent / FINAL).is_file() and job_path.name == JOB
