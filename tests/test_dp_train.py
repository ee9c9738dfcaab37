"""The dp_train stage and the privacy report, through the runner and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from knowledgesg.cli import main
from tests.conftest import sentiment_rows, stage_files, tiny_spec, write_jsonl, write_spec

TRAIN = {"name": "dp_train", "params": {"batch_size": 4, "max_physical_batch": 3, "max_length": 48, "epochs": 1.0}}


def _spec(workdir: Path, privacy: dict | None = None, train: dict | None = None, rows: int = 40) -> Path:
    write_jsonl(workdir / "data.jsonl", sentiment_rows(rows))
    spec = tiny_spec(stages=["prepare_models", "ingest", train or TRAIN], privacy=privacy or {"target_epsilon": 8.0})
    return write_spec(workdir, spec)


def _json(path: Path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    """One DP run at epsilon 8 shared by the read-only checks below."""
    workdir = tmp_path_factory.mktemp("dp")
    import os

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        assert main(["run", str(_spec(workdir)), "--run-dir", "run"]) == 0
    finally:
        os.chdir(cwd)
    return workdir / "run"


def test_a_report_piped_into_a_reader_that_stops_early_is_written_first(dp_run: Path):
    """`ksg privacy-report RUN | head`: once the reader has gone, the first write to stdout fails and
    rich exits; the report files were written before anything was shown (they were written after)."""
    (dp_run / "privacy_report.json").unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", "from knowledgesg.cli import entry; entry()", "privacy-report", str(dp_run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert _json(dp_run / "privacy_report.json")["clients"][0]["client_id"] == "client_0"


def test_privacy_json_reports_the_mechanism_run_at_the_target(dp_run: Path):
    privacy = _json(dp_run / "stages/dp_train/clients/client_0/privacy.json")
    assert privacy["private"] and privacy["label"] == "DP" and privacy["unit"] == "record"
    assert privacy["num_units"] == 20 and privacy["delta"] == pytest.approx(1e-5) and privacy["n_times_delta"] == pytest.approx(2e-4)
    m = privacy["mechanism"]
    assert m["kind"] == "poisson_gaussian" and m["sample_rate"] == pytest.approx(4 / 20) and m["steps"] == 5
    assert privacy["epsilon"]["prv"] == pytest.approx(8.0, rel=0.01) and privacy["epsilon"]["prv"] <= 8.0 * 1.001
    assert privacy["epsilon"]["rdp"] > privacy["epsilon"]["prv"]  # RDP is the loosest of the three
    assert privacy["calibrated_by"] == "prv" and "OS entropy" in privacy["noise"] and "server operator included" in privacy["trust"]


def test_adapter_is_peft_loadable_and_trained(dp_run: Path):
    from peft import PeftModel

    from knowledgesg.models import load_causal_lm, resolve_model

    base, _ = load_causal_lm(resolve_model("tiny-random-llama"))
    adapter_dir = dp_run / "stages/dp_train/clients/client_1/adapter"
    model = PeftModel.from_pretrained(base, adapter_dir)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().max()) > 0 for p in lora_b)  # B starts at zero: it moved
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_sides_ledger_and_loss_curve(dp_run: Path):
    manifest = _json(dp_run / "stages/dp_train/manifest.json")
    sides = {path: entry["side"] for path, entry in manifest["outputs"].items()}
    assert sides["clients/client_0/loss.json"] == "client:client_0"  # un-noised loss on private data
    assert sides["clients/client_0/adapter/adapter_model.safetensors"] == "server"
    ledger = _json(dp_run / "stages/dp_train/ledger.json")
    assert [e["client_id"] for e in ledger] == ["client_0", "client_1"]
    assert all(e["release"] == "dp_adapter" and e["private"] for e in ledger)
    losses = _json(dp_run / "stages/dp_train/clients/client_0/loss.json")
    assert len(losses) == 5 and all(l["loss"] is None or l["loss"] > 0 for l in losses)


def test_privacy_report_command(dp_run: Path, capsys):
    assert main(["privacy-report", str(dp_run)]) == 0
    out, err = capsys.readouterr()  # the report on stdout, where it can be piped; the files written on stderr
    assert "client_0" in out and "total (PLD)" in out and "OS entropy" in out and "server operator" in out
    assert "client_0" not in err and "privacy_report.json" in err and "privacy_report.json" not in out
    report = _json(dp_run / "privacy_report.json")
    client = report["clients"][0]
    assert client["total"]["pld"] == pytest.approx(client["releases"][0]["entry"]["epsilon"]["pld"], rel=1e-6)
    assert client["units"] == ["record"] and client["num_units"] == 20 and client["n_times_delta"] == pytest.approx(2e-4)
    assert client["releases"][0]["status"] == "this run, current"
    # a run directory copied elsewhere (with its ledger) still knows its releases by their ids, not by its old path
    import shutil

    moved = dp_run.parent / "moved-run"
    shutil.copytree(dp_run, moved)
    assert main(["privacy-report", str(moved)]) == 0
    assert _json(moved / "privacy_report.json")["clients"][0]["releases"][0]["status"] == "this run, current"
    capsys.readouterr()
    assert client["curve"][-1]["steps"] == 5 and client["curve"][0]["prv"] < client["curve"][-1]["prv"]
    html = (dp_run / "privacy_report.html").read_text()
    assert "<img" in html and "data:image/png;base64," in html and "Poisson sampling" in html and "Threat model" in html


def test_a_report_from_another_ledger_directory_is_refused_not_short(workdir: Path, monkeypatch, capsys):
    """A run that released into $KSG_LEDGER_DIR, reported from a shell without it: the report found
    no ledger there and left the run's releases out of "every release ever made" (exit 0), where
    `ksg run` refuses that ledger."""
    monkeypatch.setenv("KSG_LEDGER_DIR", str(workdir / "owner-ledger"))
    assert main(["run", str(_spec(workdir)), "--run-dir", "run"]) == 0
    monkeypatch.delenv("KSG_LEDGER_DIR")
    capsys.readouterr()
    assert main(["privacy-report", "run"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "privacy ledger run/ledger: 2 of this run's 2 releases are not in it" in err[0], err
    assert not (workdir / "run/privacy_report.json").exists()
    monkeypatch.setenv("KSG_LEDGER_DIR", str(workdir / "owner-ledger"))
    assert main(["privacy-report", "run"]) == 0


def test_the_report_recomputes_each_release_from_its_mechanism(dp_run: Path):
    """On the server a ledger entry's stored epsilon is the client's word: the report says every
    figure is recomputed, but each release's row showed the stored one."""
    from privacy.ledger import LedgerEntry, compose
    from privacy.report import client_report

    entry = LedgerEntry.model_validate(_json(dp_run / "stages/dp_train/ledger.json")[0])
    understated = entry.model_copy(update={"epsilon": entry.epsilon.model_copy(update={"prv": 0.1, "rdp": 0.1, "pld": 0.1, "reported": 0.1})})
    row = client_report("client_0", [understated], dp_run, None, None, set()).releases[0]
    assert row.epsilon.pld == pytest.approx(compose([entry.mechanism], entry.delta).pld) and row.epsilon.pld > 1


def test_reproducible_noise_replays_byte_for_byte_and_is_marked_not_private(workdir: Path, capsys):
    spec = _spec(workdir, privacy={"target_epsilon": 8.0, "reproducible_noise": True})
    assert main(["run", str(spec), "--run-dir", "one"]) == 0 and main(["run", str(spec), "--run-dir", "two"]) == 0
    adapter = "stages/dp_train/clients/client_0/adapter/adapter_model.safetensors"
    assert stage_files(workdir / "one")[adapter] == stage_files(workdir / "two")[adapter]
    privacy = _json(workdir / "one/stages/dp_train/clients/client_0/privacy.json")
    assert not privacy["private"] and privacy["label"] == "NOT PRIVATE (reproducible noise)" and "regenerate" in privacy["trust"]
    out = capsys.readouterr().err
    assert "NOT PRIVATE (reproducible noise)" in out and "total NOT PRIVATE" in out
    assert main(["privacy-report", str(workdir / "one")]) == 0
    report = _json(workdir / "one/privacy_report.json")
    assert math.isinf(report["clients"][0]["total"]["pld"]) and "NOT PRIVATE" in (workdir / "one/privacy_report.html").read_text()
    # each row and the epsilon-against-steps curve say what the release is against the threat model: no guarantee
    assert math.isinf(report["clients"][0]["releases"][0]["epsilon"]["pld"]) and report["clients"][0]["curve"] == []


def test_non_private_reference_is_marked_everywhere(workdir: Path, capsys):
    assert main(["run", str(_spec(workdir, privacy={"target_epsilon": math.inf})), "--run-dir", "run"]) == 0
    privacy = _json(workdir / "run/stages/dp_train/clients/client_0/privacy.json")
    assert privacy["label"] == "NOT PRIVATE" and not privacy["private"]
    assert privacy["mechanism"]["kind"] == "non_private" and math.isinf(privacy["epsilon"]["reported"])
    capsys.readouterr()
    assert main(["privacy-report", "run"]) == 0
    assert "NOT PRIVATE" in capsys.readouterr().out
    assert "NOT PRIVATE" in (workdir / "run/privacy_report.html").read_text()


def test_user_level_privacy_samples_users(workdir: Path):
    rows = [dict(r, user=f"u{i % 6}") for i, r in enumerate(sentiment_rows(48))]
    write_jsonl(workdir / "data.jsonl", rows)
    spec = tiny_spec(stages=["prepare_models", "ingest", {"name": "dp_train", "params": {"batch_size": 2, "max_length": 48, "max_records_per_user": 3}}],
                     privacy={"target_epsilon": 4.0, "unit": "user"})
    spec["clients"]["data"] = [{"path": "data.jsonl", "fields": {"user_id": "user"}}]
    spec["clients"]["partition"] = {"method": "iid", "num_clients": 1}
    assert main(["run", str(write_spec(workdir, spec)), "--run-dir", "run"]) == 0
    privacy = _json(workdir / "run/stages/dp_train/clients/client_0/privacy.json")
    assert privacy["unit"] == "user" and privacy["num_units"] == 6 and privacy["delta"] == pytest.approx(1e-5)
    assert privacy["mechanism"]["sample_rate"] == pytest.approx(2 / 6)


@pytest.mark.parametrize("privacy,train,pattern", [
    ({"target_epsilon": 8.0, "delta": 0.06}, None, r"spec\.yaml: privacy\.delta: 0\.06 is not below 1/N = 0\.05 for the N = 20 records of client 'client_0'"),
    ({"target_epsilon": 8.0, "cap_epsilon": 5.0}, None, r"spec.yaml: privacy.target_epsilon = 8 is above privacy.cap_epsilon = 5: dp_train alone would exceed the cap"),
    ({"target_epsilon": float("inf"), "cap_epsilon": 5.0}, None, r"privacy.cap_epsilon = 5 cannot hold: target_epsilon .inf trains without noise"),
    ({"target_epsilon": 8.0, "unit": "user"}, None, r"privacy.unit is 'user' but a record of source 'data' has no user_id"),
    ({"target_epsilon": 8.0}, {"name": "dp_train", "params": {"batch_size": 20}}, r"spec\.yaml: dp_train params\.batch_size: 20, not below the 20 records of client 'client_0'"),
    ({"target_epsilon": 1e-4}, None, r"cannot be reached .* the budget is too low"),
], ids=["delta-too-large", "cap-below-target", "cap-with-no-noise", "user-without-id", "batch-too-large", "epsilon-unreachable"])
def test_impossible_budgets_fail_cleanly(workdir: Path, capsys, privacy, train, pattern):
    import re

    assert main(["run", str(_spec(workdir, privacy=privacy, train=train)), "--run-dir", "run"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and re.search(pattern, errors[0]), errors  # refused before any stage ran (no ingest table)
    assert not (workdir / "run").exists()


def test_cap_already_spent_by_an_earlier_release(workdir: Path, capsys):
    """Two DP trainings of the same clients compose; the second is refused once the cap is spent."""
    first = {"name": "dp_train", "params": {"batch_size": 4, "max_length": 48}}
    spec = tiny_spec(stages=["prepare_models", "ingest", first], privacy={"target_epsilon": 3.0, "cap_epsilon": 5.0})
    assert main(["run", str(write_spec(workdir, spec)), "--run-dir", "run"]) == 0
    from privacy.ledger import read_stage_ledgers

    entries = read_stage_ledgers(workdir / "run", ["dp_train"])
    assert len(entries) == 2 and entries[0].epsilon.reported == pytest.approx(3.0, rel=0.01)
    from knowledgesg.errors import InputError
    from privacy.ledger import check_budget

    with pytest.raises(InputError, match="would exceed the privacy budget cap"):
        check_budget(entries, "client_0", [entries[0].mechanism, entries[0].mechanism], entries[0].delta, 5.0, "dp_train_again")


def test_bfloat16_base_trains_a_float32_adapter(workdir: Path):
    train = {"name": "dp_train", "params": {**TRAIN["params"], "precision": "bfloat16"}}
    assert main(["run", str(_spec(workdir, train=train)), "--run-dir", "run"]) == 0
    privacy = _json(workdir / "run/stages/dp_train/clients/client_0/privacy.json")
    assert _json(workdir / "run/stages/dp_train/clients/client_0/training.json")["dtype"] == "bfloat16" and privacy["private"]
    assert "dtype" not in privacy["base_model"]  # privacy.json goes to the server: the client's CPU is not its business
    from safetensors import safe_open

    with safe_open(workdir / "run/stages/dp_train/clients/client_0/adapter/adapter_model.safetensors", "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float32"}


def test_a_target_module_the_model_lacks_is_one_line_naming_the_setting(workdir: Path, capsys):
    """peft's own error was a traceback (exit 1); the line names the key and the model's linear layers."""
    train = {"name": "dp_train", "params": {"batch_size": 4, "max_length": 48, "target_modules": ["q_proj", "query"]}}
    spec_file = _spec(workdir, train=train)
    assert main(["run", str(spec_file), "--run-dir", "run"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ksg: error:")]
    assert errors == [f"ksg: error: {spec_file}: dp_train params.target_modules: no module named 'query' in the model "
                      "(its linear layers: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj)"]
    assert not list((workdir / "run").glob("ledger/*.jsonl")) and not (workdir / "run/stages/dp_train/manifest.json").exists()
