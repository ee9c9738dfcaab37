"""Crash safety: SIGKILL at every write of a run, then resume: byte-identical final artifacts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import run_cli, sentiment_rows, stage_files, tiny_spec, write_jsonl, write_spec


def _spec(workdir: Path, stages: list[str]) -> Path:
    """Runs compared byte for byte across run directories need every secret from the seed:
    reproducible_noise (NOT PRIVATE) also derives the client key that keys the manifests' digests."""
    write_jsonl(workdir / "data.jsonl", sentiment_rows(30))
    return write_spec(workdir, tiny_spec(stages=stages, privacy={"reproducible_noise": True}))


def test_sigkill_at_every_crash_point_then_resume(workdir: Path):
    spec = _spec(workdir, ["ingest"])
    reference = run_cli("run", str(spec), "--run-dir", "ref")
    assert reference.returncode == 0, reference.stderr
    expected = stage_files(workdir / "ref")
    killed_at = []
    for point in range(1, 200):
        run_dir = workdir / f"crash{point}"
        crashed = run_cli("run", str(spec), "--run-dir", str(run_dir), env={"KSG_CRASH_AT": str(point)})
        if crashed.returncode == 0:
            break  # fewer crash points than `point`: every one has been tried
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr
        killed_at.append(point)
        resumed = run_cli("run", str(spec), "--run-dir", str(run_dir))
        assert resumed.returncode == 0, resumed.stderr
        assert stage_files(run_dir) == expected, f"artifacts differ after a kill at crash point {point}"
        assert not list(run_dir.rglob("*.tmp")), "a temporary file was left behind"
    # spec copy, input hashes, 2 clients x 2 files, partition, manifest: each with 2 points
    assert len(killed_at) >= 14


def test_sigkill_from_outside_mid_stage_then_resume(workdir: Path, tmp_path_factory):
    """A real `kill -9` while prepare_models builds a model in a fresh cache, then a resume.

    The reference is an uninterrupted run against the same cache afterwards.
    """
    spec = _spec(workdir, ["prepare_models", "ingest"])
    cache = tmp_path_factory.mktemp("fresh-cache")
    env = {**os.environ, "KSG_CACHE_DIR": str(cache)}
    proc = subprocess.Popen([sys.executable, "-c", "from knowledgesg.cli import entry; entry()", "run", str(spec), "--run-dir", "run"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    events = workdir / "run" / "events.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (events.is_file() and "prepare_models" in events.read_text()):
        time.sleep(0.05)
    time.sleep(0.5)  # inside the stage: importing torch, building the tiny model
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (workdir / "run/stages/prepare_models/manifest.json").exists(), "the kill came too late to test anything"
    resumed = run_cli("run", str(spec), "--run-dir", "run", env={"KSG_CACHE_DIR": str(cache)})
    assert resumed.returncode == 0, resumed.stderr
    reference = run_cli("run", str(spec), "--run-dir", "ref", env={"KSG_CACHE_DIR": str(cache)})
    assert reference.returncode == 0, reference.stderr
    assert stage_files(workdir / "run") == stage_files(workdir / "ref")
    assert not list(cache.glob("models/.tiny-random-llama.build-*")), "a half-built model was left in the cache"


def test_sigkill_during_dp_train_reuses_the_finished_release_and_redoes_only_the_unfinished(workdir: Path):
    """Kill dp_train after client_0 is done: the resume keeps client_0's release (the same bytes,
    never redrawn) and trains only client_1, with fresh noise; each release is in the ledger once."""
    write_jsonl(workdir / "data.jsonl", sentiment_rows(40))
    train = {"name": "dp_train", "params": {"batch_size": 4, "max_length": 48, "epochs": 2.0}}
    spec = write_spec(workdir, tiny_spec(stages=["prepare_models", "ingest", train]))
    proc = subprocess.Popen([sys.executable, "-c", "from knowledgesg.cli import entry; entry()", "run", str(spec), "--run-dir", "run"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = workdir / "run/stages/dp_train/units/client_0.json"
    deadline = time.time() + 300
    while time.time() < deadline and not marker.is_file():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert marker.is_file() and not (workdir / "run/stages/dp_train/manifest.json").exists()
    done_at = marker.stat().st_mtime_ns
    released = (workdir / "run/stages/dp_train/clients/client_0/adapter/adapter_model.safetensors").read_bytes()
    resumed = run_cli("run", str(spec), "--run-dir", "run")
    assert resumed.returncode == 0, resumed.stderr
    assert "dp_train client_0" not in resumed.stderr and "dp_train client_1" in resumed.stderr
    assert marker.stat().st_mtime_ns == done_at
    assert (workdir / "run/stages/dp_train/clients/client_0/adapter/adapter_model.safetensors").read_bytes() == released
    entries = [json.loads(line) for path in (workdir / "run/ledger").glob("*.jsonl") for line in path.read_text().splitlines()]
    assert sorted(e["client_id"] for e in entries) == ["client_0", "client_1"]
    assert not list((workdir / "run").rglob(".*.tmp"))
