"""A local model directory named in a spec is taken from the spec's directory, as its data paths
are, whatever the working directory of `ksg`; models.json records it by its absolute path, and a
run refuses that directory once it is gone or holds other weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from knowledgesg import models
from knowledgesg.errors import InputError
from tests.conftest import run_in, sentiment_rows, tiny_spec, write_jsonl, write_spec


def _project(root: Path) -> tuple[Path, Path]:
    """root/sub/spec.yaml naming ./models/base (a tiny model beside it); root/elsewhere/models/base
    holds another model (other weights) at the same relative path, where `ksg` is run from."""
    sub, elsewhere = root / "sub", root / "elsewhere"
    sub.mkdir()
    write_jsonl(sub / "data.jsonl", sentiment_rows(8))
    models.build_tiny_random_llama(sub / "models/base", seed=1)
    models.build_tiny_random_llama(elsewhere / "models/base", seed=2)
    spec = write_spec(sub, tiny_spec(models={"base": "./models/base"}, stages=["prepare_models"]))
    return spec, elsewhere


def test_a_local_model_is_found_beside_the_spec_from_any_working_directory(tmp_path: Path, capsys):
    spec, elsewhere = _project(tmp_path)
    beside, decoy = (tmp_path / "sub/models/base").resolve(), (elsewhere / "models/base").resolve()
    assert models._weights_sha(beside) != models._weights_sha(decoy)
    (tmp_path / "empty").mkdir()
    assert run_in(tmp_path / "empty", "check", str(spec)) == 0, capsys.readouterr().err
    assert "model base: ./models/base (local directory: found)" in capsys.readouterr().out
    assert run_in(elsewhere, "run", str(spec), "--run-dir", "run") == 0, capsys.readouterr().err
    entry = json.loads((elsewhere / "run/stages/prepare_models/models.json").read_text())["base"]
    assert entry["name"] == "./models/base" and entry["path"] == str(beside) and entry["weights_sha256"] == models._weights_sha(beside)
    inputs = json.loads((elsewhere / "run/stages/prepare_models/manifest.json").read_text())["inputs"]
    assert inputs and all(":models/base/" in name for name in inputs)  # the spec's model files, not the working directory's
    # a missing directory names where it was looked for, in one line (exit 2)
    spec.write_text(spec.read_text().replace("./models/base", "./models/gone"))
    capsys.readouterr()
    assert run_in(tmp_path / "empty", "check", str(spec)) == 2
    assert capsys.readouterr().err.strip() == f"ksg: error: {spec}: models.base: model './models/gone': no model directory at {tmp_path / 'sub/models/gone'}"


def test_a_recorded_local_model_is_checked_when_models_json_is_read(tmp_path: Path, capsys):
    spec, elsewhere = _project(tmp_path)
    assert run_in(elsewhere, "run", str(spec), "--run-dir", "run") == 0, capsys.readouterr().err
    models_json = elsewhere / "run/stages/prepare_models/models.json"
    assert models.read_models(models_json, None)["base"]["path"] == str((tmp_path / "sub/models/base").resolve())
    # saved over with other weights since prepare_models ran: the run does not score or train those
    weights = tmp_path / "sub/models/base/model.safetensors"
    weights.write_bytes((elsewhere / "models/base/model.safetensors").read_bytes())
    with pytest.raises(InputError, match=r"model '\./models/base': .*/sub/models/base holds other weights \([0-9a-f]{12}\) than the run used"):
        models.read_models(models_json, None)
    shutil.rmtree(tmp_path / "sub/models")
    with pytest.raises(InputError, match=r"model '\./models/base': .*/sub/models/base, where this run found it .* holds no saved model now"):
        models.read_models(models_json, None)


def test_registry_names_and_hub_ids_are_not_taken_for_paths(tmp_path: Path):
    (tmp_path / "HuggingFaceTB").mkdir()  # a directory beside the spec, without the id's model in it
    assert models.check_model_name("HuggingFaceTB/SmolLM2-360M-Instruct", tmp_path) == "hub"
    assert models.check_model_name("tiny-random-llama", tmp_path) == "tiny"
    assert models.check_model_name("smollm2-135m-instruct", tmp_path) == "packaged"
    assert models.resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct", None, tmp_path).path == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert models.source_files("HuggingFaceTB/SmolLM2-360M-Instruct", tmp_path) == []
