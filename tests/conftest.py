from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# pytest-xdist runs the files in one worker per core (`-n auto` in pyproject.toml): most of the
# Flower tests' time is their processes polling each other, which another worker's tests fill.
# Each worker, and every process it starts (the CLI, Flower's apps, through the environment),
# computes on its share of the cores: torch's default of one thread per core in each worker puts
# twice the threads on the cores, and each runs several times slower.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    import torch

    THREADS = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))  # the cores -n auto counted
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """One model cache for the whole session, so the tiny model is built once."""
    cache = Path(os.environ.get("KSG_TEST_CACHE_DIR") or tmp_path_factory.mktemp("model-cache"))
    os.environ["KSG_CACHE_DIR"] = str(cache)
    return cache


def tiny_spec(data: list[dict] | None = None, **overrides) -> dict:
    """A small valid spec: two IID clients over one JSONL file, the tiny model."""
    spec = {
        "name": "t",
        "seed": 7,
        "models": {"base": "tiny-random-llama"},
        "clients": {
            "data": data if data is not None else [{"path": "data.jsonl"}],
            "partition": {"method": "iid", "num_clients": 2},
        },
        "stages": ["ingest"],
    }
    # N public by default in tests: exact q, steps and totals to assert (a noised count is tested where it is the subject)
    privacy = {"count_noise": 0, **overrides.pop("privacy", {})}
    spec.update(overrides)
    spec["privacy"] = privacy
    return spec


def sentiment_rows(n: int = 40) -> list[dict]:
    labels = ["negative", "neutral", "positive"]
    return [
        {"id": f"r{i}", "instruction": "What is the sentiment?", "input": f"Company {i} reported results number {i * 7}.", "response": labels[i % 3]}
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_spec(directory: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch) -> Path:
    """A directory with data.jsonl (40 sentiment rows) as the current directory."""
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_in(directory: Path, *argv: str) -> int:
    """`ksg ARGV` in this process, from `directory` (relative paths in specs resolve from there)."""
    from knowledgesg.cli import main

    cwd = os.getcwd()
    os.chdir(directory)
    try:
        return main(list(argv))
    finally:
        os.chdir(cwd)


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`ksg ARGS` in a fresh process, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-c", "from knowledgesg.cli import entry; entry()", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def stage_files(run_dir: Path) -> dict[str, bytes]:
    """Every artifact of a run, manifests with their timestamps removed."""
    out = {}
    for path in sorted((run_dir / "stages").rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.name == "manifest.json":
                manifest = json.loads(data)
                for key in ("started_at", "finished_at", "duration_s", "peak_rss_mib"):
                    manifest.pop(key)
                data = json.dumps(manifest, sort_keys=True).encode()
            out[str(path.relative_to(run_dir))] = data
    return out
