"""tune_professional: the professional model tuned on public data, used by refine and evaluate,
and refused a client's data; refine's label policies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from knowledgesg.cli import main
from knowledgesg.records import InstructionRecord
from knowledgesg.runner import run_models
from pipelines.refine import Refine, RefineParams
from tests.conftest import run_in, sentiment_rows, tiny_spec, write_jsonl, write_spec

LABELS = ["negative", "neutral", "positive"]
MODELS = {"base": "tiny-random-llama", "professional": "tiny-random-llama"}
TUNE = {"name": "tune_professional", "params": {"data": {"path": "public.jsonl"}, "epochs": 60, "batch_size": 4, "learning_rate": 0.01, "max_length": 160,
                                                "target_modules": ["q_proj", "v_proj", "lm_head"]}}  # the tiny random model learns through its head only


def public_rows() -> list[dict]:
    """A public labelled pool whose label follows the first word of the input (learnable by the tiny model)."""
    words = {"Losses": "negative", "Flat": "neutral", "Gains": "positive"}
    return [{"id": f"p{i}", "instruction": "What is the sentiment?", "input": f"{word} at firm {i}.", "response": label}
            for i, (word, label) in enumerate(list(words.items()) * 4)]


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("professional")
    write_jsonl(workdir / "data.jsonl", sentiment_rows(40))
    write_jsonl(workdir / "public.jsonl", public_rows())
    evaluate = {"name": "evaluate", "params": {"tasks": ["public.jsonl"], "modes": ["logprob"], "models": ["base", "professional"], "limit": None, "fidelity": False}}
    spec = tiny_spec(stages=["prepare_models", "ingest", TUNE, evaluate], models=MODELS)
    assert run_in(workdir, "run", str(write_spec(workdir, spec)), "--run-dir", "run") == 0
    return workdir


def test_tuned_professional_learns_the_public_labels_and_evaluate_scores_it(tuned_run: Path):
    stage = tuned_run / "run/stages/tune_professional"
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["data"] == "public" and summary["records"] == 12 and summary["last_loss"] < summary["first_loss"] / 2
    assert (stage / "adapter/adapter_model.safetensors").is_file()
    results = json.loads((tuned_run / "run/stages/evaluate/results.json").read_text())["models"]
    # the base model is the same tiny model: only the merged adapter can make the difference
    assert results["professional"]["tasks"]["public"]["logprob"]["accuracy"] == 1.0
    assert results["base"]["tasks"]["public"]["logprob"]["accuracy"] < 0.7


def test_the_professional_tunes_and_is_scored_over_bfloat16_weights(tmp_path: Path):
    """tune_professional and evaluate with `precision: bfloat16`: the frozen weights are bfloat16,
    the adapter still learns the public labels (in float32), and evaluate says which precision ran."""
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    write_jsonl(tmp_path / "public.jsonl", public_rows())
    tune = dict(TUNE, params=dict(TUNE["params"], precision="bfloat16"))
    evaluate = {"name": "evaluate", "params": {"tasks": ["public.jsonl"], "modes": ["logprob"], "models": ["professional"], "limit": None, "fidelity": False, "precision": "bfloat16"}}
    spec = tiny_spec(stages=["prepare_models", "ingest", tune, evaluate], models=MODELS)
    assert run_in(tmp_path, "run", str(write_spec(tmp_path, spec)), "--run-dir", "run") == 0
    summary = json.loads((tmp_path / "run/stages/tune_professional/summary.json").read_text())
    assert summary["professional_model"]["dtype"] == "bfloat16" and summary["last_loss"] < summary["first_loss"] / 2
    results = json.loads((tmp_path / "run/stages/evaluate/results.json").read_text())
    assert results["options"]["precision"] == "bfloat16"
    assert results["models"]["professional"]["tasks"]["public"]["logprob"]["accuracy"] == 1.0


def test_refine_labels_with_the_tuned_professional(tuned_run: Path):
    """refine finds the adapter of a tune_professional before it, and labels in the format it was
    tuned in (the tiny model learns the public pool's labels, it does not generalise)."""
    from eval.audit import load_target
    from knowledgesg.spec import load_spec
    from knowledgesg.stage import StageContext
    from pipelines.tune_professional import tuned_professional_adapter

    spec, _ = load_spec(tuned_run / "spec.yaml")
    spec.stages.append(spec.stages[-1].model_copy(update={"name": "refine"}))
    context = {"spec": spec, "base_dir": tuned_run, "run_dir": tuned_run / "run", "stage_dir": tuned_run / "x", "runs_on": "server"}
    adapter = tuned_professional_adapter(StageContext(stage_name="refine", **context))
    assert adapter == tuned_run / "run/stages/tune_professional/adapter"
    assert tuned_professional_adapter(StageContext(stage_name="tune_professional", **context)) is None  # only a later stage uses it

    professional = run_models(tuned_run / "run")["professional"]
    model, tokenizer = load_target(professional, adapter, "cpu")
    words = {"Losses": "negative", "Flat": "neutral", "Gains": "positive"}
    records = [InstructionRecord(id=f"s{i}", source="synthetic", instruction="What is the sentiment?", input=f"{word} at firm {i}.", response="neutral")
               for i, word in enumerate(words)]
    refine = Refine(RefineParams(pool={"path": "public.jsonl"}, task="t", labels=LABELS))
    answers = refine.distil(None, "c", model, tokenizer, "cpu", records, shots=[], tuned=True)
    assert [a["response"] for a in answers] == list(words.values())


def test_tune_professional_refuses_a_clients_data(workdir: Path, capsys):
    spec = tiny_spec(stages=["prepare_models", "ingest", dict(TUNE, params=dict(TUNE["params"], data={"path": "data.jsonl"}))], models=MODELS)
    assert main(["run", str(write_spec(workdir, spec)), "--run-dir", "run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.jsonl is also a client's data source" in err[0]
    assert not (workdir / "run").exists()
    (workdir / "copy.jsonl").write_bytes((workdir / "data.jsonl").read_bytes())  # a copy is the same data
    spec["stages"][2]["params"]["data"] = {"path": "copy.jsonl"}
    assert main(["run", str(write_spec(workdir, spec)), "--run-dir", "run"]) == 2
    assert "copy.jsonl is also a client's data source" in capsys.readouterr().err
    assert not (workdir / "run").exists()


def test_a_public_set_too_small_for_the_batch_is_refused_before_the_run_starts(workdir: Path, capsys):
    """tune_professional may come after dp_train (the headline's runs): its data is read before
    anything runs, not after the budget is spent."""
    write_jsonl(workdir / "public.jsonl", public_rows()[:3])
    spec = tiny_spec(stages=["prepare_models", "ingest", {"name": "dp_train", "params": {"batch_size": 4, "max_length": 48}}, TUNE], models=MODELS,
                     privacy={"target_epsilon": 8.0})
    spec_file = write_spec(workdir, spec)
    assert main(["run", str(spec_file), "--run-dir", "run"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"ksg: error: {spec_file}: tune_professional params.batch_size: 4, more than the 3 records with a response in params.data (public.jsonl)"]
    assert not (workdir / "run").exists()


def test_tune_professional_needs_a_professional_model(workdir: Path, capsys):
    write_jsonl(workdir / "public.jsonl", public_rows())
    spec = tiny_spec(stages=["prepare_models", "ingest", TUNE])
    spec_file = write_spec(workdir, spec)
    assert main(["run", str(spec_file), "--run-dir", "run"]) == 2
    assert f"{spec_file}: models.professional: missing, and tune_professional needs it" in capsys.readouterr().err
    assert not (workdir / "run").exists()


@pytest.mark.parametrize("source, probs, own, answer, dropped", [
    ("professional", [0.1, 0.2, 0.7], "negative", "positive", False),
    ("agreement", [0.1, 0.2, 0.7], "negative", "positive", True),
    ("agreement", [0.1, 0.2, 0.7], "positive", "positive", False),
    ("confident", [0.1, 0.2, 0.7], "negative", "positive", False),  # 0.7 >= 0.6: the professional's
    ("confident", [0.3, 0.2, 0.5], "negative", "negative", False),  # unsure: the DP model's own label
    ("dp", [0.0, 0.01, 0.99], "negative", "negative", False),  # the DP model's own, however sure the professional
])
def test_label_source_picks_between_the_professional_and_the_dp_model(source, probs, own, answer, dropped):
    refine = Refine(RefineParams(pool={"path": "p.jsonl"}, task="t", labels=LABELS, label_source=source, min_label_confidence=0.6))
    record = InstructionRecord(id="s1", source="synthetic", instruction="What is the sentiment?", input="x", response=own)
    out = refine.labelled(record, np.array(probs))
    assert out["response"] == answer and out["labels_disagree"] == dropped and out["professional_label"] == "positive"
    assert out["label_changed"] == (answer != own)


def test_label_source_needs_labels():
    with pytest.raises(ValueError, match="label_source: agreement needs labels"):
        RefineParams(pool={"path": "p.jsonl"}, task="t", label_source="agreement")


def test_a_pipeline_refines_with_the_tuned_professional(tmp_path: Path):
    """dp_train -> synthesize -> tune_professional -> refine (label_source: agreement): refine says
    it used the tuned model, and keeps only pairs whose labels the two models agree on."""
    from knowledgesg.generation import Generator
    from tests.test_refine import REFINE, canned_generate
    from tests.test_synthesize import SYNTH, TRAIN

    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    write_jsonl(tmp_path / "public.jsonl", public_rows())
    write_jsonl(tmp_path / "pool.jsonl", [dict(r, id=f"pool{i}") for i, r in enumerate(public_rows())])
    synth = dict(SYNTH, params=dict(SYNTH["params"], per_client=6, oversample=1.0, near_duplicate_jaccard=0.9))
    refine = dict(REFINE, params=dict(REFINE["params"], label_source="agreement", keep_top_fraction=1.0, precision="bfloat16"))
    spec = tiny_spec(stages=["prepare_models", "ingest", TRAIN, synth, TUNE, refine], models=MODELS)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(Generator, "generate", canned_generate)
        assert run_in(tmp_path, "run", str(write_spec(tmp_path, spec)), "--run-dir", "run") == 0
    summary = json.loads((tmp_path / "run/stages/refine/summary.json").read_text())
    assert summary["tuned_by"] == "tune_professional (public data)" and summary["label_source"] == "agreement" and summary["precision"] == "bfloat16"
    for client in ("client_0", "client_1"):
        decisions = [json.loads(line) for line in (tmp_path / f"run/stages/refine/clients/{client}/decisions.jsonl").read_text().splitlines()]
        assert decisions and all("professional_label" in d for d in decisions)  # every candidate was labelled (keep_top_fraction 1)
        for d in decisions:
            agree = d["professional_label"] == d["synthetic_response"]
            assert d["kept"] == agree and (agree or d["dropped_by"] == "labels disagree")


def test_a_change_to_a_stage_the_professional_does_not_read_does_not_retune_it(tmp_path: Path):
    """tune_professional reads only prepare_models (and public data): a change to dp_train before it
    reruns dp_train and what reads it, not the tuning (28 minutes at the headline's scale)."""
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    write_jsonl(tmp_path / "public.jsonl", public_rows())
    tune = dict(TUNE, params=dict(TUNE["params"], epochs=1))

    def ran(learning_rate: float, tune_params: dict, code: int = 0) -> set[str]:
        """The stages this run executed (not cached): from the events it appended."""
        train = {"name": "dp_train", "params": {"batch_size": 4, "max_length": 48, "learning_rate": learning_rate}}
        spec = tiny_spec(stages=["prepare_models", "ingest", train, dict(tune, params=tune_params)], models=MODELS)
        events = tmp_path / "run/events.jsonl"
        seen = len(events.read_text().splitlines()) if events.is_file() else 0
        assert run_in(tmp_path, "run", str(write_spec(tmp_path, spec)), "--run-dir", "run") == code
        return {e["stage"] for e in map(json.loads, events.read_text().splitlines()[seen:]) if e["status"] == "started"}

    assert {"dp_train", "tune_professional"} <= ran(1e-3, tune["params"])
    assert ran(2e-3, tune["params"], code=2) == set()  # dp_train released: a second release is asked for by removing its directory
    shutil.rmtree(tmp_path / "run/stages/dp_train")
    second = ran(2e-3, tune["params"])
    assert "dp_train" in second and "tune_professional" not in second
    third = ran(2e-3, dict(tune["params"], learning_rate=0.02))  # its own parameters: it reruns
    assert "tune_professional" in third and "dp_train" not in third
    from knowledgesg.runner import load_run_role, load_run_spec
    from knowledgesg.status import run_status
    from pipelines import build_stages

    spec, base_dir = load_run_spec(tmp_path / "run")

    def states() -> dict[str, str]:
        return {s.name: s.state for s in run_status(tmp_path / "run", spec, base_dir, build_stages(spec, "spec"), load_run_role(tmp_path / "run"))}

    assert set(states().values()) <= {"done", "cached"}
    (tmp_path / "run/stages/dp_train/manifest.json").unlink()  # dp_train to be redone: `ksg run` would keep the tuning, and status says so
    now = states()
    assert now["dp_train"] != "done" and now["tune_professional"] in ("done", "cached"), now


def test_a_stage_that_declares_what_it_reads_is_refused_anything_else(tmp_path: Path):
    from knowledgesg.errors import KsgError
    from knowledgesg.stage import StageContext

    ctx = StageContext(spec=None, base_dir=tmp_path, run_dir=tmp_path, stage_dir=tmp_path / "stages/tune_professional", stage_name="tune_professional", reads=("prepare_models",))
    with pytest.raises(KsgError, match="reads only prepare_models .* not 'synthesize'"):
        ctx.artifact("synthesize", "clients/a/synthetic.jsonl")
