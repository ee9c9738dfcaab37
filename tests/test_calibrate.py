"""The calibrate stage: the final adapter's label prior, fitted on the synthetic pairs it read,
applied by evaluate beside the raw answer, and shipped by publish."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.special import softmax

from eval.audit import load_target
from eval.benchmarks import CALIBRATED, LabelPrior, argmax, choice_logprobs, fit_label_prior, load_task, score
from knowledgesg.cli import main
from knowledgesg.errors import KsgError
from knowledgesg.fileio import sha256_file
from knowledgesg.runner import run_models
from pipelines.calibrate import labelled_items
from tests.conftest import run_in, sentiment_rows, tiny_spec, write_jsonl, write_spec
from tests.test_fedtune import FEDTUNE, run_pipeline

LABELS = ["negative", "neutral", "positive"]


def test_the_prior_moves_a_models_mean_answer_on_the_pairs_to_their_label_shares():
    rng = np.random.default_rng(0)
    answers = [0] * 20 + [1] * 50 + [2] * 30
    # a model that leans to "negative" whatever the input, with some spread per item
    scores = np.log(softmax(np.array([2.0, 0.0, 0.5]) + rng.normal(0, 0.7, size=(100, 3)), axis=1))
    prior = fit_label_prior(scores.tolist(), answers, LABELS)
    assert prior.shares == pytest.approx([0.2, 0.5, 0.3]) and prior.pairs == 100
    raw = softmax(scores, axis=1).mean(axis=0)
    calibrated = softmax(scores + np.array(prior.bias), axis=1).mean(axis=0)
    assert np.abs(calibrated - prior.shares).sum() < 0.5 * np.abs(raw - prior.shares).sum()
    # a model that gives every input the same scores is moved exactly onto the shares
    flat = np.tile(np.log([0.7, 0.1, 0.2]), (100, 1))
    assert softmax(flat + np.array(fit_label_prior(flat.tolist(), answers, LABELS).bias), axis=1).mean(axis=0) == pytest.approx([0.2, 0.5, 0.3])
    # a label the pairs never give is pushed far down, and the file stays JSON (no infinity)
    never = fit_label_prior(flat.tolist(), [1] * 60 + [2] * 40, LABELS)
    assert never.bias[0] < -10 and json.loads(never.model_dump_json())["bias"][0] == never.bias[0]


def test_the_bias_follows_a_tasks_choices_and_leaves_other_tasks_alone():
    prior = LabelPrior(labels=LABELS, shares=[0.2, 0.5, 0.3], model_mean=[0.6, 0.2, 0.2], bias=[-1.0, 0.9, 0.4], pairs=10)
    assert prior.bias_for(["Positive", "negative", "neutral"]) == [0.4, -1.0, 0.9]
    assert prior.bias_for(["yes", "no", "maybe"]) is None and prior.bias_for(["negative", "positive"]) is None


def test_pairs_answering_with_no_label_are_left_out_and_free_text_is_refused():
    rows = [{"id": f"s{i}", "source": "synthetic", "instruction": "Sentiment?", "input": f"Item {i}", "response": r} for i, r in enumerate(["Negative", "neutral", "positive", "unsure"])]
    items, labels, skipped = labelled_items(rows, LABELS)
    assert [item.answer for item in items] == [0, 1, 2] and labels == LABELS and skipped == 1
    free = [{"id": f"s{i}", "source": "synthetic", "instruction": "Explain.", "input": "", "response": f"a long answer number {i}"} for i in range(30)]
    with pytest.raises(KsgError, match="30 distinct responses"):
        labelled_items(free, None)


def test_calibrate_fits_on_the_pairs_fedtune_read_and_evaluate_and_publish_apply_it(tmp_path: Path, capsys):
    write_jsonl(tmp_path / "test.jsonl", [dict(r, id=f"t{i}", input=f"Test headline {i}: the stock fell sharply.") for i, r in enumerate(sentiment_rows(12))])
    evaluate = {"name": "evaluate", "params": {"tasks": ["test.jsonl"], "modes": ["logprob"], "models": ["dp", "final"], "limit": None, "fidelity": False}}
    assert run_pipeline(tmp_path, FEDTUNE, extra_stages=[{"name": "calibrate", "params": {"labels": LABELS}}, evaluate, "publish"]) == 0
    run = tmp_path / "run/stages"
    prior = LabelPrior.model_validate_json((run / "calibrate/label_prior.json").read_text())
    refined = [json.loads(line) for c in ("client_0", "client_1") for line in (run / f"refine/clients/{c}/refined.jsonl").read_text().splitlines()]
    counts = [sum(r["response"] == label for r in refined) for label in LABELS]
    assert prior.pairs == sum(counts) == len(refined) > 0 and prior.shares == pytest.approx([c / sum(counts) for c in counts], abs=1e-6)
    manifest = json.loads((run / "calibrate/manifest.json").read_text())
    assert manifest["outputs"]["label_prior.json"]["side"] == "server"
    # a label no pair gives is all but forbidden by the prior: the stage warns, once per such label
    absent = [label for label, count in zip(LABELS, counts) if count == 0]
    assert absent  # the tiny professional gives every kept pair the same label: the case is exercised
    assert [w.split("'")[1] for w in manifest["warnings"]] == absent and all("refine's summary.json counts the labels" in w for w in manifest["warnings"])

    results = json.loads((run / "evaluate/results.json").read_text())["models"]
    final = results["final"]
    assert set(final["tasks"]["test"]) == {"logprob", CALIBRATED} and set(final["mean_accuracy"]) == {"logprob", CALIBRATED}
    assert final["label_prior"] == prior.model_dump()
    assert all(CALIBRATED not in entry.get("tasks", {}).get("test", {}) for name, entry in results.items() if name != "final")  # the DP adapters keep theirs raw
    # the calibrated answers are the final adapter's scores plus the stage's bias, nothing else
    items = load_task(str(tmp_path / "test.jsonl"))
    model, tokenizer = load_target(run_models(tmp_path / "run", {"base"})["base"], run / "fedtune/adapter", "cpu")
    scores = choice_logprobs(model, tokenizer, items, 8, "cpu")
    bias = prior.bias_for(items[0].choices)
    assert final["tasks"]["test"][CALIBRATED] == score(items, [argmax([v + b for v, b in zip(s, bias)]) for s in scores]).__dict__
    assert final["tasks"]["test"]["logprob"] == score(items, [argmax(s) for s in scores]).__dict__

    shipped = run / "publish/final_adapter"
    assert json.loads((shipped / "label_prior.json").read_text()) == prior.model_dump()
    assert "## Label prior" in (shipped / "README.md").read_text()
    assert prior.adapter_sha256 == sha256_file(run / "fedtune/adapter/adapter_model.safetensors")

    # a prior left from another final adapter (fedtune ran again and calibrate did not: a rerun
    # stopped between them, or calibrate's rerun failed and its old directory was put back) is not
    # added to the new adapter's scores: `ksg eval` had applied it without a word
    (run / "calibrate/label_prior.json").write_text(prior.model_copy(update={"adapter_sha256": "0" * 64}).model_dump_json())
    assert run_in(tmp_path, "eval", "run", "--models", "final", "--tasks", str(tmp_path / "test.jsonl"), "--modes", "logprob", "--limit", "0", "--no-fidelity") == 0
    rescored = json.loads((tmp_path / "run/eval/eval_report.json").read_text())["models"]["final"]
    assert set(rescored["tasks"]["test"]) == {"logprob"} and "label_prior" not in rescored
    assert "fitted for another final adapter" in capsys.readouterr().err


def test_calibrate_is_refused_before_anything_is_written_without_fedtune_or_on_private_data(tmp_path: Path, capsys):
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    before_fedtune = tiny_spec(stages=["prepare_models", "ingest", {"name": "calibrate", "params": {}}])
    assert run_in(tmp_path, "run", str(write_spec(tmp_path, before_fedtune)), "--run-dir", "run") == 2
    assert "needs stage 'fedtune' before it" in capsys.readouterr().err
    private = tiny_spec(stages=["prepare_models", "ingest", {"name": "fedtune", "params": {"data": "private", "local_dp": {"target_epsilon": 4.0},
                                                                                          "rounds": 1, "training": {"steps": 1, "batch_size": 4}}},
                                "calibrate"], privacy={"target_epsilon": 8.0})
    spec_file = write_spec(tmp_path, private)
    assert run_in(tmp_path, "run", str(spec_file), "--run-dir", "run") == 2
    assert f"{spec_file}: fedtune params.data: private, but calibrate fits its label prior to synthetic pairs" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["check", str(write_spec(tmp_path, private))]) == 2


@pytest.mark.parametrize("labels, message", [(["bearish", "neutral", "bullish"], "are not the labels synthesize writes (negative, neutral, positive)"),
                                             (["negative", "Negative", "positive"], "a label is named twice")], ids=["other-labels", "twice"])
def test_calibrate_labels_other_than_synthesizes_are_refused_before_anything_is_written(tmp_path: Path, capsys, labels, message):
    """With other labels than the pairs answer with, the prior counted some as never given and all
    but forbade them: the published adapter answered "neutral" to everything, after a warning."""
    assert run_pipeline(tmp_path, FEDTUNE, extra_stages=[{"name": "calibrate", "params": {"labels": labels}}]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_a_task_whose_choices_are_not_the_priors_labels_keeps_its_raw_answer_in_the_calibrated_mode(monkeypatch):
    import eval.benchmarks as benchmarks

    items = [benchmarks.Item(f"q{i}", ["yes", "no", "maybe"], i % 3) for i in range(6)]
    monkeypatch.setattr(benchmarks, "load_task", lambda task, limit, seed, base_dir: items)
    monkeypatch.setattr(benchmarks, "choice_logprobs", lambda model, tokenizer, items, batch_size, device: [[0.0, -1.0, -2.0] for _ in items])
    prior = LabelPrior(labels=LABELS, shares=[0.2, 0.5, 0.3], model_mean=[0.6, 0.2, 0.2], bias=[-5.0, 5.0, 0.0], pairs=10)
    entry = benchmarks.evaluate_model(None, None, ["my.jsonl"], ["logprob"], None, 0, label_prior=prior)["my"]
    assert entry[CALIBRATED] == entry["logprob"] and entry["logprob"]["predicted"] == {"yes": 6, "no": 0, "maybe": 0}


def test_a_torn_or_foreign_label_prior_is_one_line_naming_the_file_and_field(tmp_path: Path):
    from eval.evaluate import read_label_prior
    from knowledgesg.errors import InputError

    path = tmp_path / "label_prior.json"
    good = LabelPrior(labels=LABELS, shares=[0.2, 0.5, 0.3], model_mean=[0.6, 0.2, 0.2], bias=[-1.0, 0.9, 0.4], pairs=10)
    path.write_text(good.model_dump_json())
    assert read_label_prior(path) == good
    for text, field in ((good.model_dump_json().replace('"bias":[-1.0,0.9,0.4]', '"bias":[-1.0]'), "bias has 1 values for 3 labels"),
                        (good.model_dump_json().replace('"pairs":10', '"pairs":"many"'), "pairs"),
                        (good.model_dump_json()[:40], "")):
        path.write_text(text)
        with pytest.raises(InputError) as caught:
            read_label_prior(path)
        assert str(caught.value).startswith(f"{path}: ") and field in str(caught.value) and "\n" not in str(caught.value)
