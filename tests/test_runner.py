"""The runner: caching by fingerprint, reruns on change, tamper detection, status, determinism."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from knowledgesg.cli import main
from knowledgesg.errors import KsgError
from knowledgesg.fileio import hmac_file, sha256_file
from knowledgesg.manifest import read_manifest
from knowledgesg.runner import Runner, append_event, load_run_spec, run_lock, run_models
from knowledgesg.spec import parse_spec
from knowledgesg.stage import StageContext
from knowledgesg.status import run_status
from pipelines import build_stages, load_pipeline
from pipelines.prepare_models import PrepareModels
from tests.conftest import stage_files, tiny_spec, write_spec


def _run(spec_path: Path, run_dir: Path):
    spec, base_dir, stages = load_pipeline(spec_path)
    return {o.name: o.status for o in Runner(spec, base_dir, run_dir, stages).run()}


def _status(run_dir: Path):
    spec, base_dir = load_run_spec(run_dir)
    return run_status(run_dir, spec, base_dir, build_stages(spec))


@pytest.fixture
def two_stage(workdir: Path) -> Path:
    return write_spec(workdir, tiny_spec(stages=["prepare_models", "ingest"]))


def test_second_run_is_all_cached(two_stage: Path, workdir: Path):
    assert _run(two_stage, workdir / "run") == {"prepare_models": "ran", "ingest": "ran"}
    assert _run(two_stage, workdir / "run") == {"prepare_models": "cached", "ingest": "cached"}


def test_a_project_moved_elsewhere_resumes_cached(two_stage: Path, workdir: Path, tmp_path: Path):
    """The fingerprint names an input by its place in the project (or the package, for a built-in
    data set), not by where the project lies: a project and its run copied to another directory (a
    new machine, another checkout) resume cached. Named by absolute path, ingest ran again, and
    after it dp_train: a second DP release of the same data."""
    spec = tiny_spec(stages=["prepare_models", "ingest"], clients={"data": [{"path": "data.jsonl"}, {"builtin": "fpb_train", "sample": 20}],
                                                                    "partition": {"method": "iid", "num_clients": 2}})
    _run(write_spec(workdir, spec), workdir / "run")
    moved = tmp_path / "elsewhere"
    shutil.copytree(workdir, moved)
    assert _run(moved / "spec.yaml", moved / "run") == {"prepare_models": "cached", "ingest": "cached"}
    inputs = json.loads((moved / "run/stages/ingest/manifest.json").read_text())["inputs"]
    assert "spec dir:data.jsonl" in inputs and any(name.startswith("package:vendor/") for name in inputs)


def test_a_run_resumed_with_its_model_cache_elsewhere_is_the_same_run(workdir: Path, tmp_path: Path, monkeypatch):
    """models.json names a cached model relative to the cache, and the cache's place is in no
    fingerprint: a run resumed with another cache (KSG_CACHE_DIR, or models.cache_dir) keeps every
    stage, and a later reader finds the model in the new cache (built there again). With absolute
    paths, prepare_models' outputs changed with the cache, and so did every stage after it, the DP
    release included. A cache whose model has other weights than the run used is refused."""
    from knowledgesg.errors import InputError

    spec = tiny_spec(stages=["prepare_models", "ingest", {"name": "dp_train", "params": {"batch_size": 4, "max_length": 48}}], privacy={"target_epsilon": 8.0})
    assert set(_run(write_spec(workdir, spec), workdir / "run").values()) == {"ran"}
    models = json.loads((workdir / "run/stages/prepare_models/models.json").read_text())
    assert models["base"]["path"] == "cache:models/tiny-random-llama"
    monkeypatch.setenv("KSG_CACHE_DIR", str(tmp_path / "second-cache"))
    assert set(_run(workdir / "spec.yaml", workdir / "run").values()) == {"cached"}
    spec["models"]["cache_dir"] = str(tmp_path / "third-cache")
    assert set(_run(write_spec(workdir, spec), workdir / "run").values()) == {"cached"}
    base = run_models(workdir / "run")["base"]
    assert base["path"] == str(tmp_path / "third-cache/models/tiny-random-llama") and (Path(base["path"]) / "config.json").is_file()
    marker = tmp_path / "third-cache/models/tiny-random-llama/ksg_model.json"
    marker.write_text(json.dumps(dict(json.loads(marker.read_text()), weights_sha256="0" * 64)))
    with pytest.raises(InputError, match="has other weights"):
        run_models(workdir / "run")


def test_a_relative_model_cache_is_under_the_spec_directory(workdir: Path, tmp_path: Path, monkeypatch):
    """models.cache_dir, when relative, is taken from the spec's directory like the spec's data and
    ledger_dir, not from wherever `ksg` was started: a run started from another directory fills the
    cache beside the spec, and none appears in the working directory."""
    spec = tiny_spec(stages=["prepare_models"], models={"base": "tiny-random-llama", "cache_dir": "model-cache"})
    path = write_spec(workdir, spec)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert _run(path, workdir / "run") == {"prepare_models": "ran"}
    assert (workdir / "model-cache/models/tiny-random-llama/config.json").is_file()
    assert not (elsewhere / "model-cache").exists()
    assert run_models(workdir / "run")["base"]["path"] == str(workdir / "model-cache/models/tiny-random-llama")
    # a run's spec copy written before (the relative path as the user wrote it) reads the same cache
    copy = json.loads((workdir / "run/spec.json").read_text())
    copy["spec"]["models"]["cache_dir"] = "model-cache"
    (workdir / "run/spec.json").write_text(json.dumps(copy))
    assert run_models(workdir / "run")["base"]["path"] == str(workdir / "model-cache/models/tiny-random-llama")
    assert not (elsewhere / "model-cache").exists()


def test_manifest_records_inputs_outputs_and_counts(two_stage: Path, workdir: Path):
    _run(two_stage, workdir / "run")
    manifest = json.loads((workdir / "run/stages/ingest/manifest.json").read_text())
    assert manifest["stage"] == "ingest" and manifest["seed"] == 7 and manifest["package_version"]
    # private inputs and client-side outputs by a keyed digest only: the manifest cannot confirm a guess
    key = (workdir / "run/.client_key").read_bytes()
    assert manifest["inputs"] == {"spec dir:data.jsonl": hmac_file(workdir / "data.jsonl", key)}
    records = manifest["outputs"]["clients/client_0/records.jsonl"]
    path = workdir / "run/stages/ingest/clients/client_0/records.jsonl"
    assert records["sha256"] == hmac_file(path, key) != sha256_file(path) and records["bytes"] is None
    assert records["records"] == len(path.read_text().splitlines()) == 20
    assert records["side"] == "client:client_0"
    partition = manifest["outputs"]["partition.json"]
    assert partition["side"] == "server" and partition["sha256"] == sha256_file(workdir / "run/stages/ingest/partition.json")
    assert json.loads((workdir / "run/stages/ingest/partition.json").read_text())["clients"] == {"client_0": 20, "client_1": 20}


def test_changed_parameter_reruns_that_stage_and_later_only(two_stage: Path, workdir: Path):
    _run(two_stage, workdir / "run")
    spec = tiny_spec(stages=["prepare_models", "ingest"])
    spec["clients"]["partition"]["num_clients"] = 4
    assert _run(write_spec(workdir, spec), workdir / "run") == {"prepare_models": "cached", "ingest": "ran"}
    spec["models"]["base"] = run_models(workdir / "run")["base"]["path"]  # the same model, named as a local directory
    # a changed first stage reruns every stage after it, even one whose own settings did not change
    assert _run(write_spec(workdir, spec), workdir / "run") == {"prepare_models": "ran", "ingest": "ran"}


def test_changed_input_file_reruns(two_stage: Path, workdir: Path):
    _run(two_stage, workdir / "run")
    with open(workdir / "data.jsonl", "a") as handle:
        handle.write('{"id": "new", "instruction": "Q", "response": "neutral"}\n')
    assert _run(two_stage, workdir / "run")["ingest"] == "ran"


def test_tampered_artifact_is_detected_and_rerun(two_stage: Path, workdir: Path, capsys):
    _run(two_stage, workdir / "run")
    artifact = workdir / "run/stages/ingest/clients/client_1/records.jsonl"
    original = artifact.read_bytes()
    artifact.write_bytes(original.replace(b"neutral", b"positive", 1))
    assert _run(two_stage, workdir / "run")["ingest"] == "ran"
    assert "no longer matches its manifest" in capsys.readouterr().err
    assert artifact.read_bytes() == original


def test_a_damaged_manifest_is_said_and_its_stage_rerun(two_stage: Path, workdir: Path, capsys):
    """A manifest cut short (a disk filled, a hand edit) is no proof of completion: the stage runs
    again, as before, but `ksg status` and `ksg run` now say why (it had shown as plain pending)."""
    _run(two_stage, workdir / "run")
    (workdir / "run/stages/ingest/manifest.json").write_text('{"stage": "ingest", ', encoding="utf-8")
    state = {s.name: (s.state, s.detail) for s in _status(workdir / "run")}["ingest"]
    assert state == ("stale", "its manifest.json cannot be read (damaged); `ksg run` runs it again"), state
    capsys.readouterr()
    assert _run(two_stage, workdir / "run") == {"prepare_models": "cached", "ingest": "ran"}
    assert "ingest: its manifest.json cannot be read (damaged); rerunning" in capsys.readouterr().err


def test_deleted_artifact_is_detected_and_rerun(two_stage: Path, workdir: Path):
    _run(two_stage, workdir / "run")
    (workdir / "run/stages/ingest/partition.json").unlink()
    assert _run(two_stage, workdir / "run")["ingest"] == "ran"


def test_same_seed_same_artifacts(two_stage: Path, workdir: Path):
    """Deterministic stages give the same files; only the manifests' keyed digests differ, as each
    run has its own client key (with reproducible_noise that key too comes from the seed)."""
    _run(two_stage, workdir / "a")
    _run(two_stage, workdir / "b")
    def artifacts(run: str) -> dict:  # the fingerprints (manifest, .started_with) cover keyed digests
        return {k: v for k, v in stage_files(workdir / run).items() if not k.endswith(("manifest.json", ".started_with"))}

    a, b = stage_files(workdir / "a"), stage_files(workdir / "b")
    assert artifacts("a") == artifacts("b")
    assert a["stages/ingest/manifest.json"] != b["stages/ingest/manifest.json"]
    spec = tiny_spec(stages=["prepare_models", "ingest"], privacy={"reproducible_noise": True})
    _run(write_spec(workdir, spec, "reproducible.yaml"), workdir / "c")
    _run(write_spec(workdir, spec, "reproducible.yaml"), workdir / "d")
    assert stage_files(workdir / "c") == stage_files(workdir / "d")


def test_status_reports_each_state(two_stage: Path, workdir: Path, capsys):
    run_dir = workdir / "run"
    _run(two_stage, run_dir)
    assert [s.state for s in _status(run_dir)] == ["done", "done"]
    assert [s.records for s in _status(run_dir)] == [None, 40]  # prepare_models writes no record files: no count, not 0
    _run(two_stage, run_dir)
    assert [s.state for s in _status(run_dir)] == ["cached", "cached"]
    (run_dir / "stages/ingest/partition.json").write_text("{}")
    assert [s.state for s in _status(run_dir)] == ["cached", "stale"]
    (run_dir / "stages/ingest/manifest.json").unlink()
    assert [s.state for s in _status(run_dir)] == ["cached", "pending"]
    capsys.readouterr()
    assert main(["status", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    assert "pending" in out and not err  # the table on stdout: `ksg status RUN | grep pending` works


@pytest.mark.parametrize("error", [KsgError("the disk filled up"), ValueError("input_value='Jane Roe, MRN 443322'")], ids=["refusal", "bug"])
def test_status_shows_a_failed_stage_and_keeps_a_bugs_message_off_the_event_log(workdir: Path, monkeypatch, error: Exception):
    """A refusal's one line is the failed stage's detail; a library's or a bug's text may quote a
    record (a validator's input value), so the event log, which `ksg status` and the report show,
    keeps its kind only."""
    from pipelines.dp_train import DPTrain

    _run(write_spec(workdir, tiny_spec(stages=["prepare_models", "ingest"])), workdir / "run")
    spec = write_spec(workdir, tiny_spec(stages=["prepare_models", "ingest", {"name": "dp_train", "params": {"batch_size": 4}}]))

    def fails(self, ctx):
        raise error

    monkeypatch.setattr(DPTrain, "run", fails)
    with pytest.raises(type(error)):
        _run(spec, workdir / "run")
    states = _status(workdir / "run")
    assert [s.state for s in states] == ["cached", "cached", "failed"]
    events = (workdir / "run" / "events.jsonl").read_text()
    if isinstance(error, KsgError):
        assert "the disk filled up" in states[2].detail
    else:
        assert "ValueError" in events and "Jane" not in events and "443322" not in events


def test_status_tells_a_running_stage_from_an_interrupted_one(two_stage: Path, workdir: Path):
    run_dir = workdir / "run"
    _run(two_stage, run_dir)
    (run_dir / "stages/ingest/manifest.json").unlink()
    append_event(run_dir, stage="ingest", status="started")  # as a run that is still at it, or was killed, leaves it
    assert [s.state for s in _status(run_dir)] == ["done", "interrupted"]
    with run_lock(run_dir):  # the lock a live `ksg run` holds
        assert [s.state for s in _status(run_dir)] == ["done", "running"]
        # a live run at another stage: the start a killed run left behind stays interrupted
        append_event(run_dir, stage="prepare_models", status="started")
        assert [s.state for s in _status(run_dir)] == ["done", "interrupted"]
    assert [s.state for s in _status(run_dir)] == ["done", "interrupted"]


def test_status_of_a_non_run_directory(tmp_path: Path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_second_runner_on_same_dir_is_refused(two_stage: Path, workdir: Path):
    run_dir = workdir / "run"
    run_dir.mkdir()
    with run_lock(run_dir):
        with pytest.raises(KsgError, match="another `ksg run` is using this run directory"):
            _run(two_stage, run_dir)


def test_a_run_starting_while_status_probes_the_lock_waits_for_it(workdir: Path):
    import fcntl
    import threading

    run_dir = workdir / "run"
    run_dir.mkdir()
    (run_dir / ".lock").touch()
    with open(run_dir / ".lock") as probe:
        fcntl.flock(probe, fcntl.LOCK_SH)  # `ksg status` holds it for an instant
        threading.Timer(0.3, fcntl.flock, (probe, fcntl.LOCK_UN)).start()
        with run_lock(run_dir):  # refused at once without the wait
            pass


def test_explicit_members_and_natural_partition(workdir: Path):
    (workdir / "b.jsonl").write_text('{"id": "x", "instruction": "Q", "response": "A", "user_id": "u1"}\n')
    spec = tiny_spec()
    spec["clients"] = {"members": [{"id": "hosp_a", "data": [{"path": "data.jsonl"}]}, {"id": "hosp_b", "data": [{"path": "b.jsonl"}]}]}
    _run(write_spec(workdir, spec), workdir / "run")
    rows = [json.loads(line) for line in (workdir / "run/stages/ingest/clients/hosp_b/records.jsonl").read_text().splitlines()]
    assert rows == [{"client_id": "hosp_b", "document_id": None, "id": "b/x", "input": "", "instruction": "Q", "kind": "instruction", "response": "A", "source": "b", "user_id": "u1"}]


def test_a_server_stages_warning_is_kept_in_its_manifest_and_shown_by_status_and_the_run_report(two_stage: Path, workdir: Path, monkeypatch, capsys):
    original = PrepareModels.run

    def warns(self, ctx):
        original(self, ctx)
        ctx.warn("the model cache is on a slow disk")

    monkeypatch.setattr(PrepareModels, "runs_on", "server")  # it reads no client artifact either way
    monkeypatch.setattr(PrepareModels, "run", warns)
    run_dir = workdir / "run"
    assert main(["run", str(two_stage), "--run-dir", str(run_dir)]) == 0
    printed = " ".join(capsys.readouterr().err.split())
    assert printed.count("warning prepare_models: the model cache is on a slow disk") == 2  # as it ran, and under the stage table
    assert read_manifest(run_dir / "stages/prepare_models").warnings == ["the model cache is on a slow disk"]
    assert read_manifest(run_dir / "stages/ingest").warnings == []
    assert [s.detail for s in _status(run_dir)] == ["warning: the model cache is on a slow disk", ""]
    assert "warning: the model cache is on a slow disk" in (run_dir / "report.html").read_text()
    assert main(["run", str(two_stage), "--run-dir", str(run_dir)]) == 0  # cached: the warning stands as when the stage ran
    assert " ".join(capsys.readouterr().err.split()).count("warning prepare_models: the model cache is on a slow disk") == 1


def test_a_stage_that_runs_where_the_data_is_may_not_warn(tmp_path: Path):
    """A warning is free text in a manifest the server reads: a client's stage could put its data in one."""
    for runs_on, role in (("any", "all"), ("server", "client")):  # a client's machine keeps no server-side stage's manifest either
        ctx = StageContext(spec=parse_spec(tiny_spec(stages=["prepare_models", "ingest"]), "spec.yaml"), base_dir=tmp_path, run_dir=tmp_path, stage_dir=tmp_path,
                           stage_name="ingest", runs_on=runs_on, role=role)
        with pytest.raises(RuntimeError, match="only a server-side stage may warn"):
            ctx.warn("bank_a holds 3 records about Acme")
        assert ctx.warnings == []


def test_status_and_reports_work_once_the_raw_data_is_deleted(workdir: Path, capsys):
    """Deleting the private data after training is a privacy practice: `ksg status` and the
    privacy report still answer (exit 0), the stage that read it shown stale with the reason.
    They had exited 2 ("data file not found") from the fingerprint."""
    train = {"name": "dp_train", "params": {"batch_size": 4, "max_length": 48, "epochs": 0.2}}
    spec = write_spec(workdir, tiny_spec(stages=["prepare_models", "ingest", train]))
    run_dir = workdir / "run"
    _run(spec, run_dir)
    (workdir / "data.jsonl").unlink()
    states = _status(run_dir)
    assert [s.state for s in states] == ["done", "stale", "stale"] and "data file not found" in states[1].detail
    capsys.readouterr()
    assert main(["status", str(run_dir)]) == 0
    assert main(["privacy-report", str(run_dir)]) == 0


def test_an_event_line_cut_short_is_skipped_and_the_next_event_kept(two_stage: Path, workdir: Path):
    """A line cut short mid-append (a full disk, a power loss) made every later `ksg status` and
    run report fail on it; and the next event, appended to the same line, was lost with it."""
    run_dir = workdir / "run"
    _run(two_stage, run_dir)
    with open(run_dir / "events.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"stage": "ingest", "sta')
    assert [s.state for s in _status(run_dir)] == ["done", "done"]
    (run_dir / "stages/ingest/manifest.json").unlink()
    append_event(run_dir, stage="ingest", status="started")
    assert [s.state for s in _status(run_dir)] == ["done", "interrupted"]
    assert main(["status", str(run_dir)]) == 0


def test_data_edited_while_the_models_are_prepared_is_the_data_ingested(two_stage: Path, workdir: Path, monkeypatch):
    """ingest's preflight reads the data before prepare_models (minutes, converting a model);
    the fingerprint hashes the files after it. Records from before an edit in between would be
    kept under the digest of the edited file, and every resume would take them as current."""
    real = PrepareModels.run

    def prepare_then_edit(self, ctx):
        real(self, ctx)
        with open(workdir / "data.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"id": "late", "instruction": "What is the sentiment?", "input": "A late row.", "response": "neutral"}) + "\n")

    monkeypatch.setattr(PrepareModels, "run", prepare_then_edit)
    before = len((workdir / "data.jsonl").read_text().splitlines())
    _run(two_stage, workdir / "run")
    ingested = sum(len(p.read_text().splitlines()) for p in (workdir / "run/stages/ingest/clients").glob("*/records.jsonl"))
    assert ingested == before + 1


def test_a_directory_written_whole_is_on_disk_before_anything_vouches_for_it(tmp_path: Path, monkeypatch):
    """write_dir's files are flushed before `before_publish` runs (dp_train enters the release in
    the ledger there) and before the rename: a power loss must not leave a ledger entry or a
    unit marker for an adapter whose bytes never reached the disk."""
    import os

    from knowledgesg import fileio

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def build(directory: Path) -> None:
        (directory / "weights.bin").write_bytes(b"w" * 10)
        (directory / "nested").mkdir()
        (directory / "nested/config.json").write_text("{}")

    def before_publish(directory: Path) -> None:
        assert {Path(p).name for p in synced} >= {"weights.bin", "config.json", "nested", directory.name}

    monkeypatch.setattr(os, "fsync", fsync)
    fileio.write_dir(tmp_path / "adapter", build, before_publish)
    assert (tmp_path / "adapter/nested/config.json").is_file() and str(tmp_path) in synced
