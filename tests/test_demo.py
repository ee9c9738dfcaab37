"""The demo spec, as the README runs it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipelines import load_pipeline
from tests.conftest import REPO, run_cli

DEMO = REPO / "pipelines" / "specs" / "demo.yaml"
SPECS = sorted((REPO / "pipelines" / "specs").glob("*.yaml"))


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_shipped_spec_validates_and_says_how_to_run_it(path: Path):
    spec, _, stages = load_pipeline(path)  # the schema, and the stages' parameters and order
    assert path.read_text().startswith(f"# Run: ksg run pipelines/specs/{path.name}")
    assert spec.stages


@pytest.mark.slow
def test_demo_runs_then_reruns_all_cached_fast(tmp_path: Path):
    first = run_cli("run", str(DEMO), "--run-dir", str(tmp_path / "demo"), timeout=1800)
    assert first.returncode == 0, first.stderr
    assert "ran" in first.stderr
    run = tmp_path / "demo" / "stages"
    # refine judged every synthetic pair and kept some; fedtune trained on them at no privacy cost
    decisions = [json.loads(line) for client in ("bank_a", "bank_b", "bank_c") for line in (run / f"refine/clients/{client}/decisions.jsonl").read_text().splitlines()]
    assert decisions and any(d["kept"] for d in decisions) and all("judge p(yes)" in d["reason"] for d in decisions)
    ledger = json.loads((run / "fedtune/ledger.json").read_text())
    assert [e["epsilon"]["reported"] for e in ledger] == [0.0, 0.0, 0.0]
    assert (run / "fedtune/adapter/adapter_model.safetensors").is_file()
    # the published releases carry every bank's privacy statement
    card = (run / "publish/final_adapter/README.md").read_text()
    assert all(f"| {bank} | source document" in card for bank in ("bank_a", "bank_b", "bank_c")) and "base_model: smollm2-135m-instruct" in card
    assert (run / "publish/synthetic_data/dataset_info.json").is_file() and (tmp_path / "demo/report.html").is_file()
    report = run_cli("privacy-report", str(tmp_path / "demo"))
    assert report.returncode == 0 and "final_adapter" in report.stdout + report.stderr
    # the real models through the evaluation: both answer modes, every model kind
    evaluated = run_cli("eval", str(tmp_path / "demo"), "--tasks", "fpb", "--limit", "30", "--models", "base,final", timeout=1800)
    assert evaluated.returncode == 0, evaluated.stderr
    results = json.loads((tmp_path / "demo/eval/eval_report.json").read_text())
    for model in ("base", "final"):
        fpb = results["models"][model]["tasks"]["fpb"]
        assert fpb["logprob"]["n"] == 30 and 0.0 <= fpb["logprob"]["accuracy"] <= 1.0 and fpb["generation"]["n"] == 30
    # the final adapter answers with the label prior calibrate fitted and publish shipped, beside its raw answer
    prior = json.loads((run / "calibrate/label_prior.json").read_text())
    assert json.loads((run / "publish/final_adapter/label_prior.json").read_text()) == prior and results["models"]["final"]["label_prior"] == prior
    assert results["models"]["final"]["tasks"]["fpb"]["logprob_calibrated"]["n"] == 30 and "logprob_calibrated" not in results["models"]["base"]["tasks"]["fpb"]
    sides = json.loads((tmp_path / "demo/eval/sides.json").read_text())  # fidelity: each bank's side only
    assert "fidelity" not in results and {sides[f"clients/{c}/fidelity.json"] for c in ("bank_a", "bank_b", "bank_c")} == {"client:bank_a", "client:bank_b", "client:bank_c"}
    start = time.perf_counter()
    second = run_cli("run", str(DEMO), "--run-dir", str(tmp_path / "demo"))
    elapsed = time.perf_counter() - start
    assert second.returncode == 0, second.stderr
    table = [line for line in second.stderr.splitlines() if line.startswith("│")]
    assert table and all("cached" in line for line in table), second.stderr
    assert elapsed < 10, f"a fully cached rerun took {elapsed:.1f}s"
