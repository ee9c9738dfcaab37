"""The long benchmarks' committed stores of finished runs: an entry is found only for the spec it
ran, a save leaves no temp file, and the stores in the repository still belong to the specs the
benchmarks build today (a changed default would otherwise make a committed row silently unread)."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import yaml

from eval.benchmarks import CALIBRATED

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import audit_power  # noqa: E402
import finance_headline  # noqa: E402
import finance_replicates as fr  # noqa: E402
from _common import RunStore, spec_digest  # noqa: E402


def headline(tmp_path, monkeypatch, *argv: str):
    """finance_headline's arguments (a work directory of its own, `argv` added), its plan, and an
    empty store of its own in place of the committed one."""
    monkeypatch.setattr(sys, "argv", ["finance_headline.py", "--workdir", str(tmp_path), *argv])
    args = finance_headline.parse_args()
    store = RunStore(tmp_path / "runs.json")
    monkeypatch.setattr(finance_headline, "STORE", store)
    return args, finance_headline.plan(args), store


def test_an_entry_is_found_only_for_the_spec_it_ran_and_a_save_leaves_no_temp_file(tmp_path):
    store = RunStore(tmp_path / "runs.json")
    assert store.entry("A8", {"epochs": 2}) is None
    store.save("A8", {"epochs": 2}, 12.34, rows={"6": 0.44})
    store.save("U", {"epochs": 2, "data": "fiqa"}, 5.0)
    entry = store.entry("A8", {"epochs": 2})
    assert entry["rows"] == {"6": 0.44} and entry["seconds"] == 12.3 and entry["machine"] and entry["code"].startswith("commit")
    assert store.entry("A8", {"epochs": 3}) is None  # another spec is another run
    assert set(store.runs()) == {"A8", "U"}
    assert [p.name for p in tmp_path.iterdir()] == ["runs.json"]

    # measured again: the newest is the entry, the earlier ones stay beside it, oldest first
    store.save("A8", {"epochs": 2}, 20.0, rows={"6": 0.47})
    store.save("A8", {"epochs": 2}, 30.0, rows={"6": 0.45})
    entry = store.entry("A8", {"epochs": 2})
    assert entry["rows"] == {"6": 0.45} and [e["rows"]["6"] for e in entry["earlier"]] == [0.44, 0.47]
    assert all("earlier" not in e for e in entry["earlier"])

    # more figures of the newest measurement join it; figures made from a stale reading do not
    store.add("A8", {"epochs": 2}, entry, full_rows={"6": 0.5})
    assert store.entry("A8", {"epochs": 2}) == {**entry, "full_rows": {"6": 0.5}}
    with pytest.raises(KeyError):
        store.add("A8", {"epochs": 2}, entry, full_rows={"6": 0.6})


def test_the_headline_store_belongs_to_the_specs_the_benchmark_builds_today(monkeypatch):
    stored = finance_headline.STORE.runs()
    assert stored, "the committed store is empty"
    # every epsilon a run was stored at (A1, D8, A8-public...), so each stored run has its spec in the plan
    epsilons = sorted({name[1:].split("-")[0] for name in stored if name[0] in "ABD" and name[1:2].isdigit()}, key=float)
    monkeypatch.setattr(sys, "argv", ["finance_headline.py", "--workdir", "unused", "--epsilons", ",".join(epsilons), "--ablations", ",".join(finance_headline.ABLATIONS)])
    specs = finance_headline.plan(finance_headline.parse_args())
    for name, entry in stored.items():
        assert finance_headline.STORE.entry(name, specs[name]) == entry, f"{name}: stored for another spec"
        assert entry["rows"], name



def test_a_headline_row_averages_macro_f1_over_tasks_and_banks_and_a_stored_row_without_it_shows_na():
    def entry(accuracy, f1):
        return {"tasks": {t: {"logprob": {"accuracy": accuracy, "macro_f1": f1, "n": 100}} for t in finance_headline.TASKS}}

    banks = finance_headline.score([entry(0.5, 0.3), entry(0.7, 0.5)])
    assert math.isclose(banks.mean, 0.6) and math.isclose(banks.f1, 0.4)
    assert banks.cells().endswith("| 0.400")
    stored = finance_headline.RowScore(acc=banks.acc, mean=banks.mean, se=banks.se)  # as rows saved before macro-F1 was kept
    assert stored.cells().endswith("| n/a")


def test_full_eval_scores_a_finished_runs_models_on_every_item_and_keeps_the_rows_in_its_entry(tmp_path, monkeypatch):
    args, specs, store = headline(tmp_path, monkeypatch)
    calls = []

    def fake_ksg(*argv):  # what `ksg eval` writes: every model it was asked for, both modes
        calls.append(argv)
        scores = {"logprob": {"accuracy": 0.5, "macro_f1": 0.4, "n": 10}, "generation": {"accuracy": 0.3, "macro_f1": 0.2, "n": 10}}
        report = {"models": {"final": {"tasks": {t: scores for t in finance_headline.TASKS}}}}
        (Path(argv[1]) / "eval").mkdir(parents=True)
        (Path(argv[1]) / "eval/eval_report.json").write_text(json.dumps(report))
        return 7.0

    monkeypatch.setattr(finance_headline, "ksg", fake_ksg)
    finance_headline.full_eval(args, "D8", specs["D8"])
    assert calls == [] and store.runs() == {}  # not finished here: nothing scored

    evaluated = {"final": {"tasks": {t: {"logprob": {"accuracy": 0.6, "macro_f1": 0.5, "n": 400}} for t in finance_headline.TASKS}}}
    (tmp_path / "D8/stages/evaluate").mkdir(parents=True)
    (tmp_path / "D8/stages/evaluate/results.json").write_text(json.dumps({"models": evaluated}))
    (tmp_path / "D8.done").write_text(spec_digest(specs["D8"]))
    measured = {k: asdict(v) for k, v in finance_headline.rows_of("D8", evaluated).items()}
    store.save("D8", specs["D8"], 100.0, rows={"4b": {**measured["4b"], "mean": 0.41}})  # another measurement of the same spec
    finance_headline.full_eval(args, "D8", specs["D8"])
    assert calls == []  # the run here is not the stored measurement: its figures would join another's

    store.save("D8", specs["D8"], 100.0, rows=measured)
    finance_headline.full_eval(args, "D8", specs["D8"])
    finance_headline.full_eval(args, "D8", specs["D8"])  # scored once
    assert len(calls) == 1 and calls[0][0] == "eval" and calls[0][calls[0].index("--limit") + 1] == "0" and "--no-fidelity" in calls[0]
    assert calls[0][calls[0].index("--models") + 1] == "final" and calls[0][calls[0].index("--modes") + 1] == "logprob,generation"
    entry = store.entry("D8", specs["D8"])
    assert entry["seconds"] == 100.0 and entry["rows"] == measured and entry["full_eval_seconds"] == 7.0  # the same measurement, more figures
    assert entry["full_rows"]["generation"]["4b"]["mean"] == 0.3 and entry["full_items"] == {t: 10 for t in finance_headline.TASKS}
    table = "\n".join(finance_headline.full_table(args, "8", specs))
    assert "fpb 10, fiqa 10, tfns 10" in table and "| 4b | DP-FedAvg" in table and "**0.300** +- " in table and "**0.500** +- " in table


def test_full_eval_stopped_after_its_scoring_stores_the_report_it_left_without_scoring_again(tmp_path, monkeypatch):
    """`ksg eval` over the full sets takes most of an hour: an invocation stopped after it (before
    the rows were stored) leaves its report, which the next reads rather than scoring again; a
    report of other options (the early 400-item one) is scored again. A report whose first entry is
    a mean over clients (no tasks of its own) is read from the model entries."""
    args, specs, store = headline(tmp_path, monkeypatch)
    calls = []
    monkeypatch.setattr(finance_headline, "ksg", lambda *argv: calls.append(argv) or 5.0)
    evaluated = {"dp_adapter:public": {"tasks": {t: {"logprob": {"accuracy": 0.6, "macro_f1": 0.5, "n": 400}} for t in finance_headline.TASKS}}}
    (tmp_path / "U/stages/evaluate").mkdir(parents=True)
    (tmp_path / "U/stages/evaluate/results.json").write_text(json.dumps({"models": evaluated}))
    (tmp_path / "U.done").write_text(spec_digest(specs["U"]))
    store.save("U", specs["U"], 100.0, rows={k: asdict(v) for k, v in finance_headline.rows_of("U", evaluated).items()})
    scores = {"logprob": {"accuracy": 0.5, "macro_f1": 0.4, "n": 10}, "generation": {"accuracy": 0.3, "macro_f1": 0.2, "n": 10}}
    left = {"dp (mean over clients)": {"mean_accuracy": {}}, "dp_adapter:public": {"tasks": {t: scores for t in finance_headline.TASKS}}}
    (tmp_path / "U/eval").mkdir()
    options = {"limit": None, "modes": ["logprob", "generation"], "tasks": finance_headline.TASKS, "models": ["dp"], "fidelity": False}
    (tmp_path / "U/eval/eval_report.json").write_text(json.dumps({"options": dict(options, limit=400, modes=["logprob"]), "models": left}))
    assert not finance_headline.full_report_here(tmp_path / "U/eval/eval_report.json", ["dp"])
    (tmp_path / "U/eval/eval_report.json").write_text(json.dumps({"options": options, "models": left}))
    finance_headline.full_eval(args, "U", specs["U"])
    entry = store.entry("U", specs["U"])
    assert calls == [] and entry["full_rows"]["generation"]["2"]["mean"] == 0.3 and entry["full_eval_seconds"] is None

def test_the_ablation_table_counts_the_pairs_the_final_tuning_reads_here_and_from_the_store(tmp_path, monkeypatch):
    args, specs, store = headline(tmp_path, monkeypatch, "--ablations", "public,unrefined_public")
    assert finance_headline.final_stage(specs["A8"]) == "refine" and finance_headline.final_stage(specs["A8-unrefined_public"]) == "synthesize"
    row = {"final": {"acc": {t: 0.5 for t in finance_headline.TASKS}, "mean": 0.5, "se": 0.01}}
    # A8-unrefined_public finished here: its own files are counted (synthesize's, since it tunes on those)
    for stage, file, rows in [("synthesize", "synthetic.jsonl", 5), ("refine", "refined.jsonl", 3)]:
        (tmp_path / f"A8-unrefined_public/stages/{stage}/clients/bank_a").mkdir(parents=True)
        (tmp_path / f"A8-unrefined_public/stages/{stage}/clients/bank_a/{file}").write_text("{}\n" * rows)
    scores = {"tasks": {t: {"logprob": {"accuracy": 0.5, "macro_f1": 0.4, "n": 100}} for t in finance_headline.TASKS}}
    (tmp_path / "A8-unrefined_public/stages/evaluate").mkdir(parents=True)
    (tmp_path / "A8-unrefined_public/stages/evaluate/results.json").write_text(json.dumps({"models": {"final": scores}}))
    (tmp_path / "A8-unrefined_public.done").write_text(spec_digest(specs["A8-unrefined_public"]))
    # A8-public measured elsewhere: its stored counts
    store.save("A8-public", specs["A8-public"], 1.0, rows=row, synthetic_pairs={"synthesize": 692, "refine": 481})
    table = "\n".join(finance_headline.ablation_table(args, "8", specs))
    assert "| 5 (synthesize) |" in table and "| 481 (refine) |" in table
    # an ablation not run at an epsilon is one name in a line under the table, not an empty row; row 6 keeps its row
    args, specs, _ = headline(tmp_path, monkeypatch, "--epsilons", "1,8", "--ablations", "public,unrefined_public")
    table = finance_headline.ablation_table(args, "1", specs)
    assert "Not run at epsilon 1 yet: `public`, `unrefined_public`." in table
    assert sum("not run yet" in line for line in table) == 1 and not any(line.startswith("| the final tuning also") for line in table)
    # `--ablations stored`: every ablation with a stored measurement, in the script's order, beside the ones named
    assert finance_headline.with_stored_ablations("stored") == "public"
    assert finance_headline.with_stored_ablations("volume,stored") == "volume,public"
    assert finance_headline.with_stored_ablations("agreement") == "agreement"


@pytest.mark.parametrize("variant, arguments", [(None, []), ("mia1000", ["--records", "1100", "--holdout", "1000", "--variant", "mia1000"])])
def test_the_audit_power_store_belongs_to_the_rows_the_benchmark_measures_today(variant, arguments):
    """Each committed store (the main design's, and a variant's with the arguments its results file names) holds rows of today's specs."""
    defaults = audit_power.parse_args(["--workdir", "unused", *arguments])
    store = audit_power.store_for(variant)
    assert store.runs(), f"{store.path.name}: no rows"
    for name, stored in store.runs().items():
        epsilon = next(e for e in audit_power.EPSILONS if audit_power.short_name(e) == name)
        entry = store.entry(name, audit_power.measured(epsilon, defaults))
        assert entry == stored, f"{name}: stored for another spec, audit or canary score"
        assert entry["canary_rows"] and entry["mia_rows"]
        assert all(line.startswith(f"| {audit_power.label(epsilon)} |") for line in entry["canary_rows"] + entry["mia_rows"])
        assert not math.isnan(entry["run_s"] + entry["audit_s"])


def test_a_copied_runs_rows_are_marked_when_its_source_was_measured_again_on_new_dp_adapters(tmp_path, monkeypatch):
    args, specs, store = headline(tmp_path, monkeypatch, "--ablations", "public")

    def models(accuracy: float) -> dict:
        scores = {t: {"logprob": {"accuracy": accuracy, "macro_f1": 0.4, "n": 400}} for t in finance_headline.TASKS}
        return {"final": {"tasks": scores}, **{f"dp_adapter:{b}": {"tasks": scores} for b in finance_headline.BANKS}}

    def measure(name: str, accuracy: float, release_ids: list[str] | None, here: bool = True) -> None:
        """A finished run as `run()` leaves it: its directory (when `here`) and its store entry."""
        if here:
            stages = tmp_path / name / "stages"
            shutil.rmtree(tmp_path / name, ignore_errors=True)
            (stages / "evaluate").mkdir(parents=True)
            (stages / "evaluate/results.json").write_text(json.dumps({"models": models(accuracy)}))
            (stages / "dp_train").mkdir()
            (stages / "dp_train/ledger.json").write_text(json.dumps([{"release_id": r} for r in release_ids]))
            (tmp_path / f"{name}.done").write_text(spec_digest(specs[name]))
        ids = {"dp_releases": sorted(release_ids)} if release_ids is not None and here else {}
        store.save(name, specs[name], 1.0, rows={k: asdict(v) for k, v in finance_headline.rows_of(name, models(accuracy)).items()}, **ids)

    def row_5() -> str:
        return next(line for line in finance_headline.table(args, "8", specs)[0] if line.startswith("| 5 |"))

    def forget_ids_and_directories() -> None:  # as stored before the ids were kept, read on another machine
        runs = store.runs()
        for entry in [*runs.values(), *(e for v in runs.values() for e in v.get("earlier", []))]:
            entry.pop("dp_releases", None)
            entry.pop("saved_at", None)
        store._write(runs)
        for name in ("A8", "B8"):
            shutil.rmtree(tmp_path / name, ignore_errors=True)
            (tmp_path / f"{name}.done").unlink(missing_ok=True)

    # A8 and B8 as measured on another machine before the ids were kept: they belong together
    measure("A8", 0.40, None, here=False)
    measure("B8", 0.45, None, here=False)
    assert "another draw" not in row_5() and "0.450" in row_5()

    # A8 measured again here: the stored B8 is of the earlier A8, whether or not ids are known
    measure("A8", 0.42, ["r1", "r2", "r3"])
    assert "on another draw of DP adapters than the A8 rows shown" in row_5() and "0.450" in row_5()
    finance_headline.backfill_dp_release_ids(args, specs)
    assert store.entry("A8", specs["A8"])["dp_releases"] == ["r1", "r2", "r3"] and "dp_releases" not in store.entry("B8", specs["B8"])
    assert "on another draw of DP adapters than the A8 rows shown" in row_5()

    # B8 measured again here, copied from this A8: its rows belong with A8's, here and in a session without the directories
    measure("B8", 0.47, ["r3", "r1", "r2"])
    assert "another draw" not in row_5() and "0.470" in row_5()
    (tmp_path / "B8/stages/dp_train/ledger.json").unlink()
    assert store.entry("B8", specs["B8"])["dp_releases"] == ["r1", "r2", "r3"]
    shutil.rmtree(tmp_path / "A8"), shutil.rmtree(tmp_path / "B8"), (tmp_path / "A8.done").unlink(), (tmp_path / "B8.done").unlink()
    assert "another draw" not in row_5() and "0.470" in row_5()

    # without ids at all, the store's order tells: B8 saved after A8's measurement again
    forget_ids_and_directories()
    assert "another draw" in row_5()  # no time kept: the source measured again is the cautious reading
    measure("A8", 0.43, None, here=False)
    assert "another draw" in row_5()
    measure("B8", 0.48, None, here=False)
    assert "another draw" not in row_5() and "0.480" in row_5()

    # an ablation on the adapters of A8's measurement, then A8 measured a third time
    measure("A8", 0.44, ["s1", "s2", "s3"])
    measure("A8-public", 0.50, ["s1", "s2", "s3"])
    ablation = next(line for line in finance_headline.ablation_table(args, "8", specs) if "FiQA's public training set" in line)
    assert "earlier" not in ablation and "0.500" in ablation
    measure("A8", 0.46, ["t1", "t2", "t3"])
    ablation = next(line for line in finance_headline.ablation_table(args, "8", specs) if "FiQA's public training set" in line)
    assert "on another draw of DP adapters than the A8 rows shown" in ablation


def test_a_new_pipeline_run_starts_from_another_runs_professional(tmp_path):
    """The professional is tuned on public data with the same fingerprint at every epsilon: a new A
    run gets a copy (ksg run keeps it only if its fingerprint matches); nothing to copy, nothing done."""
    assert finance_headline.share_professional(tmp_path, tmp_path / "A2") is None and not (tmp_path / "A2").exists()
    stage = tmp_path / "A1/stages/tune_professional"
    stage.mkdir(parents=True)
    (stage / "manifest.json").write_text(json.dumps({"finished_at": "2026-12-04T22:00:00+00:00"}))
    (stage / "adapter.bin").write_bytes(b"weights")
    assert finance_headline.share_professional(tmp_path, tmp_path / "A2") == "A1"
    assert (tmp_path / "A2/stages/tune_professional/adapter.bin").read_bytes() == b"weights"
    assert finance_headline.professional_finished_at(tmp_path / "A2") == "2026-12-04T22:00:00+00:00"


def test_a_copy_without_refine_drops_the_copied_stages_and_the_label_priors_are_read_back(tmp_path, monkeypatch):
    """An ablation without tune_professional and refine loses the copies of A's (their artifacts
    would read as its own) but never a stage that holds a ledger; the label shares along a run
    are read from its synthetic pairs and its evaluation's predictions."""
    args, specs, _ = headline(tmp_path, monkeypatch, "--epsilons", "1", "--ablations", "unrefined_model_prior")
    run_dir = tmp_path / "A1-unrefined_model_prior"
    for stage in ("dp_train", "synthesize", "tune_professional", "refine", "fedtune"):
        (run_dir / "stages" / stage).mkdir(parents=True)
    (run_dir / "stages/refine/ledger.json").write_text("[]")  # as if it had released something: kept
    finance_headline.drop_unused_stages(run_dir, specs["A1-unrefined_model_prior"])
    assert sorted(p.name for p in (run_dir / "stages").iterdir()) == ["dp_train", "fedtune", "refine", "synthesize"]

    bank = run_dir / "stages/synthesize/clients/bank_a"
    bank.mkdir(parents=True)
    bank.joinpath("synthetic.jsonl").write_text("".join(json.dumps({"response": r}) + "\n" for r in ["neutral", "neutral", "positive", "negative"]))
    (run_dir / "stages/evaluate").mkdir()
    score = {"accuracy": 0.5, "macro_f1": 0.4, "n": 4, "predicted": {"negative": 0, "neutral": 3, "positive": 1}, "truth": {"negative": 1, "neutral": 2, "positive": 1}}
    (run_dir / "stages/evaluate/results.json").write_text(json.dumps({"models": {"final": {"tasks": {"fpb": {"logprob": score}}}, "base": {"tasks": {"fpb": {"logprob": {"accuracy": 0.1}}}}}}))
    assert finance_headline.label_lines(run_dir) == [
        "Labels of the synthetic pairs after synthesize (negative / neutral / positive): 25% / 50% / 25% of 4.",
        "Predicted labels of final (negative / neutral / positive; the test items' truth in parentheses): FPB 0% / 75% / 25% (truth 25% / 50% / 25%).",
    ]


def test_precision_auto_goes_to_the_runs_only_names_and_their_copies_and_other_runs_keep_theirs(tmp_path, monkeypatch):
    def precision(spec_: dict) -> tuple:
        return finance_headline.stage_entry(spec_, "dp_train")["params"].get("precision"), finance_headline.stage_entry(spec_, "fedtune")["params"]["training"].get("precision")

    args, specs, store = headline(tmp_path, monkeypatch, "--epsilons", "8", "--ablations", "unrefined_model_prior", "--only", "A8", "--precision", "auto")
    assert precision(specs["A8"]) == ("auto", "auto")
    # auto leaves the stages that sample, judge or score as stored before auto-all
    assert all("precision" not in finance_headline.stage_entry(specs["A8"], stage)["params"] for stage in ("synthesize", "tune_professional", "refine"))
    assert precision(specs["A8-unrefined_model_prior"]) == precision(specs["B8"]) == ("auto", "auto")  # copies run on A8's directory
    assert finance_headline.stage_entry(specs["D8"], "fedtune")["params"]["training"].get("precision") is None  # float32: no key, as stored before the flag
    assert "precision" not in finance_headline.stage_entry(specs["C"], "dp_train")["params"]
    stored_b8 = finance_headline.plan_at(argparse.Namespace(**{**vars(args), "precision": "float32"}))["B8"]
    store.save("B8", stored_b8, 1.0, rows={})  # measured at float32 on an earlier A8
    store.save("A8", specs["A8"], 1.0, rows={})
    # later, without --only: A8 as stored (auto), B8 as stored (float32), an ablation not run yet as its A
    args, specs, _ = headline(tmp_path, monkeypatch, "--epsilons", "8", "--ablations", "unrefined_model_prior")
    assert precision(specs["A8"]) == ("auto", "auto") and specs["B8"] == stored_b8 and precision(specs["A8-unrefined_model_prior"]) == ("auto", "auto")
    # a run started in the work directory (its spec written there) and not stored: planned as it started
    (tmp_path / "D8.yaml").write_text(yaml.safe_dump(finance_headline.plan_at(argparse.Namespace(**{**vars(args), "precision": "auto"}))["D8"], sort_keys=False))
    assert finance_headline.stage_entry(headline(tmp_path, monkeypatch, "--epsilons", "8")[1]["D8"], "fedtune")["params"]["training"]["precision"] == "auto"


def test_precision_auto_all_goes_to_every_stage_that_loads_a_model_but_evaluate_in_the_runs_only_names(tmp_path, monkeypatch):
    _, specs, _ = headline(tmp_path, monkeypatch, "--epsilons", "8", "--ablations", "unrefined_public300_model_prior_calibrated", "--only", "U,P,A8,C,D8", "--precision", "auto-all")
    calibrated = specs["A8-unrefined_public300_model_prior_calibrated"]
    for spec_, stage in [(specs["A8"], "synthesize"), (specs["A8"], "tune_professional"), (specs["A8"], "refine"), (specs["P"], "tune_professional"),
                         (specs["A8"], "dp_train"), (specs["U"], "dp_train"), (specs["C"], "dp_train"), (calibrated, "calibrate"), (calibrated, "synthesize")]:
        assert finance_headline.stage_entry(spec_, stage)["params"]["precision"] == "auto", (spec_["name"], stage)
    assert finance_headline.stage_entry(specs["D8"], "fedtune")["params"]["training"]["precision"] == "auto"
    assert "precision" not in finance_headline.stage_entry(specs["A8"], "evaluate")["params"]  # scores stay float32, comparable across runs
    # the same plan later, without --only: each run as it was started in the work directory
    for name in ("P", "A8"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(specs[name], sort_keys=False))
    _, later, _ = headline(tmp_path, monkeypatch, "--epsilons", "8")
    assert later["P"] == specs["P"] and later["A8"] == specs["A8"]


def test_an_ablation_copies_a_finished_ablation_with_the_same_synthetic_pairs_on_the_same_adapters_else_its_a(tmp_path, monkeypatch):
    args, specs, _ = headline(tmp_path, monkeypatch, "--epsilons", "8", "--ablations", "unrefined_model_prior,unrefined_public300_model_prior,public,agreement")

    def finish(name: str, releases: list[str]) -> None:
        (tmp_path / f"{name}.done").write_text(finance_headline.spec_digest(specs[name]))
        (tmp_path / name / "stages/dp_train").mkdir(parents=True, exist_ok=True)
        (tmp_path / name / "stages/dp_train/ledger.json").write_text(json.dumps([{"release_id": r} for r in releases]))

    finish("A8", ["r1", "r2"])
    assert finance_headline.copy_source(args, "A8-unrefined_public300_model_prior", specs["A8-unrefined_public300_model_prior"]) == "A8"
    finish("A8-public", ["r1", "r2"])  # finished, but uniform quotas: other pairs
    assert finance_headline.copy_source(args, "A8-unrefined_public300_model_prior", specs["A8-unrefined_public300_model_prior"]) == "A8"
    assert finance_headline.copy_source(args, "A8-agreement", specs["A8-agreement"]) == "A8"  # A has its pairs and its professional: a tie goes to A
    finish("A8-unrefined_model_prior", ["r0", "r2"])  # the same pairs' spec, on an earlier A8's adapters
    assert finance_headline.copy_source(args, "A8-unrefined_public300_model_prior", specs["A8-unrefined_public300_model_prior"]) == "A8"
    finish("A8-unrefined_model_prior", ["r1", "r2"])
    assert finance_headline.copy_source(args, "A8-unrefined_public300_model_prior", specs["A8-unrefined_public300_model_prior"]) == "A8-unrefined_model_prior"
    public = finance_headline.stage_entry(specs["A8-unrefined_public300_model_prior"], "fedtune")["params"]["public"]
    assert public == {"builtin": "fiqa_train", "sample": 300}


def test_precision_without_only_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["finance_headline.py", "--workdir", str(tmp_path), "--precision", "auto"])
    with pytest.raises(SystemExit, match="give --only too"):
        finance_headline.main()


def test_a_copy_may_start_once_its_a_has_made_its_dp_adapters_and_no_run_is_in_its_directory(tmp_path, monkeypatch):
    from knowledgesg.runner import run_lock

    args, specs, _ = headline(tmp_path, monkeypatch, "--epsilons", "8", "--ablations", "unrefined_model_prior")
    assert not finance_headline.released(tmp_path, "A8", specs["A8"])  # not started
    (tmp_path / "A8.yaml").write_text(yaml.safe_dump(specs["A8"], sort_keys=False))
    stage = tmp_path / "A8/stages/dp_train"
    stage.mkdir(parents=True)
    (stage / "manifest.json").write_text("{}")
    assert not finance_headline.released(tmp_path, "A8", specs["A8"])  # no ledger: the release is not recorded
    (stage / "ledger.json").write_text("[]")
    assert finance_headline.released(tmp_path, "A8", specs["A8"])
    with run_lock(tmp_path / "A8"):  # its `ksg run` goes on in the directory
        assert not finance_headline.released(tmp_path, "A8", specs["A8"])
    other = finance_headline.plan_at(argparse.Namespace(**{**vars(args), "precision": "auto"}))["A8"]
    assert not finance_headline.released(tmp_path, "A8", other)  # started with another spec


def test_the_constant_answer_floor_is_each_labels_share_of_the_seeded_test_items(tmp_path, monkeypatch):
    args, _, _ = headline(tmp_path, monkeypatch, "--limit", "50")
    line = finance_headline.constant_answer_line(args)
    items = finance_headline.load_task("fpb", 50, 0)
    neutral = sum(item.choices[item.answer] == "neutral" for item in items) / len(items)
    assert f"neutral {sum(sum(i.choices[i.answer] == 'neutral' for i in finance_headline.load_task(t, 50, 0)) / 50 for t in finance_headline.TASKS) / 3:.3f} (FPB {neutral:.3f}," in line
    assert line.count("macro-F1") == 3


def test_a_run_measured_again_at_another_precision_shows_its_stored_rows_and_marks_the_copies_on_its_new_adapters(tmp_path, monkeypatch):
    args, specs, store = headline(tmp_path, monkeypatch, "--epsilons", "8", "--ablations", "public")
    scores = {t: {"logprob": {"accuracy": 0.4, "macro_f1": 0.3, "n": 400}} for t in finance_headline.TASKS}
    stored = {k: asdict(v) for k, v in finance_headline.rows_of("A8", {"professional": {"tasks": scores}}).items()}
    store.save("A8", specs["A8"], 1.0, rows=stored, dp_releases=["old"])  # float32, before the flag
    args, specs, _ = headline(tmp_path, monkeypatch, "--epsilons", "8", "--ablations", "public", "--only", "A8", "--precision", "auto")
    (tmp_path / "A8/stages/dp_train").mkdir(parents=True)
    (tmp_path / "A8/stages/dp_train/ledger.json").write_text(json.dumps([{"release_id": "new"}]))
    assert finance_headline.run_rows(args, "A8", specs)["3"].mean == pytest.approx(0.4)  # the stored measurement until the new one finishes
    (tmp_path / "A8-public.done").write_text(spec_digest(specs["A8-public"]))
    (tmp_path / "A8-public/stages/evaluate").mkdir(parents=True)
    (tmp_path / "A8-public/stages/evaluate/results.json").write_text(json.dumps({"models": {"final": {"tasks": scores}}}))
    (tmp_path / "A8-public/stages/dp_train").mkdir()
    (tmp_path / "A8-public/stages/dp_train/ledger.json").write_text(json.dumps([{"release_id": "new"}]))
    assert finance_headline.stale_mark(args, "A8-public", specs) == " (on the DP adapters of the A8 being measured again here, not those of its rows shown)"


def test_replicates_are_grouped_by_draw_and_variant_and_compared_on_the_same_draw_only():
    def run(draw: str, variant: str, seed: str, mean: float) -> fr.Replicate:
        return fr.Replicate(draw, variant, seed, finance_headline.RowScore({t: mean for t in finance_headline.TASKS}, mean, 0.015))

    runs = [run("hl", "A8-x", "spec", 0.60), run("hl", "A8-x", "2", 0.64), run("hl", "A8-y", "spec", 0.50), run("hl", "A8-y", "2", 0.54),
            run("hl2", "A8-x", "spec", 0.70)]
    groups = fr.by_draw_and_variant(runs)
    spread = fr.spread_rows(groups)
    assert [row.split(" | ")[:3] for row in spread] == [["| hl", "A8-x", "2"], ["| hl", "A8-y", "2"], ["| hl2", "A8-x", "1"]]
    assert "**0.620** | 0.028 | 0.600 - 0.640" in spread[0] and "| n/a |" in spread[2]  # one replicate: no spread to tell
    # x and y on hl: 0.10 apart, SE sqrt(2 x 0.028^2 / 2) = 0.028; hl2's single x is compared with nothing
    assert fr.difference_rows(groups) == ["| hl | A8-x minus A8-y | +0.100 | 0.028 | +3.5 |"]


def test_replicates_from_the_store_count_every_draw_once_per_run_and_are_compared_across_draws(tmp_path):
    """`--store`: a run's earlier measurements on other DP draws count, a repeat on the same draw counts once (its latest)."""
    def measurement(mean: float, releases: list[str], saved_at: str) -> dict:
        row = asdict(finance_headline.RowScore({t: mean for t in finance_headline.TASKS}, mean, 0.015, 0.5))
        return {"digest": "d", "rows": {"final": row}, "dp_releases": releases, "saved_at": saved_at}

    draw_1, draw_2 = ["r1b", "r1a"], ["r2a"]
    runs = {
        "A8-x": {**measurement(0.65, draw_2, "2026-12-05T02"), "earlier": [measurement(0.55, draw_1, "2026-12-04T01"), measurement(0.60, draw_1, "2026-12-04T02")]},
        "A8-x_seed2": {**measurement(0.66, draw_2, "2026-12-05T03"), "earlier": [measurement(0.50, draw_1, "2026-12-04T03")]},
        "A8-lonely": measurement(0.40, draw_1, "2026-12-04T04"),  # no replicate: not a replicated variant
        "B8": {"digest": "d", "rows": {"5": {}}, "saved_at": "2026-12-04T00"},
    }
    store = tmp_path / "runs.json"
    store.write_text(json.dumps({"runs": runs}))
    found = fr.stored_replicates(store)
    assert [(r.draw, r.variant, r.seed, r.row.mean) for r in found] == [
        ("draw 1 (r1a)", "A8-x", "spec", 0.60), ("draw 1 (r1a)", "A8-x", "2", 0.50), ("draw 2 (r2a)", "A8-x", "spec", 0.65), ("draw 2 (r2a)", "A8-x", "2", 0.66)]
    across = fr.across_draws_rows(fr.by_draw_and_variant(found))
    assert across == ["| A8-x | 1: 0.550 (2), 2: 0.655 (2) | **0.603** | 0.074 |"]

    # a calibrated run's raw answers are its variant's replicate (the same final tuning), its calibrated ones a variant of their own
    draw_3 = ["r3a"]
    calibrated = {**measurement(0.62, draw_3, "2026-12-06T01"), "rows": {"final": measurement(0.62, draw_3, "")["rows"]["final"],
                                                                         "final_calibrated": measurement(0.64, draw_3, "")["rows"]["final"]}}
    runs["A8-x_calibrated"], runs["A8-x_calibrated_seed2"] = calibrated, {**calibrated, "saved_at": "2026-12-06T02"}
    store.write_text(json.dumps({"runs": runs}))
    third = [(r.draw, r.variant, r.seed, r.row.mean) for r in fr.stored_replicates(store) if r.draw.startswith("draw 3")]
    assert third == [("draw 3 (r3a)", "A8-x", "spec", 0.62), ("draw 3 (r3a)", "A8-x_calibrated (answers with its label prior)", "spec", 0.64),
                     ("draw 3 (r3a)", "A8-x", "2", 0.62), ("draw 3 (r3a)", "A8-x_calibrated (answers with its label prior)", "2", 0.64)]
    # the plain variant on the same draw with the same seed is the same final tuning: counted once, the plain run's
    runs["A8-x_seed2"] = {**measurement(0.61, draw_3, "2026-12-06T00"), "earlier": [runs["A8-x_seed2"]]}
    store.write_text(json.dumps({"runs": runs}))
    third = [(r.draw, r.variant, r.seed, r.row.mean) for r in fr.stored_replicates(store) if r.draw.startswith("draw 3")]
    assert third == [("draw 3 (r3a)", "A8-x", "2", 0.61), ("draw 3 (r3a)", "A8-x", "spec", 0.62),
                     ("draw 3 (r3a)", "A8-x_calibrated (answers with its label prior)", "spec", 0.64), ("draw 3 (r3a)", "A8-x_calibrated (answers with its label prior)", "2", 0.64)]
    # a replicated variant's first run at another epsilon is a replicate there (its draw a new one); a variant never replicated is not
    runs["A2-x"] = measurement(0.45, ["r0"], "2026-12-07T00")
    store.write_text(json.dumps({"runs": runs}))
    found = fr.stored_replicates(store)
    assert [(r.draw, r.variant, r.seed, r.row.mean) for r in found if r.variant == "A2-x"] == [("draw 4 (r0)", "A2-x", "spec", 0.45)]
    assert not any(r.variant == "A8-lonely" for r in found)
    assert fr.stored_replicates(tmp_path / "no_store.json") == []


def test_an_audit_power_variant_names_only_files_in_the_results_folder():
    assert audit_power.parse_args(["--workdir", "unused", "--variant", "mia1000"]).variant == "mia1000"
    for unsafe in ("../evil", "a/b", ""):
        with pytest.raises(SystemExit) as exit_info:
            audit_power.parse_args(["--workdir", "unused", "--variant", unsafe])
        assert exit_info.value.code == 2


def test_the_curve_draws_the_best_variant_from_every_stored_draw_of_its_replicates_at_each_epsilon(tmp_path, monkeypatch):
    replicates = "unrefined_public300_model_prior,unrefined_public300_model_prior_seed2,unrefined_public300_model_prior_seed3"
    args, specs, store = headline(tmp_path, monkeypatch, "--epsilons", "4,8", "--ablations", replicates)

    def save(name: str, mean: float, draw: str) -> None:
        store.save(name, specs[name], 1.0, rows={"final": {"acc": {t: mean for t in finance_headline.TASKS}, "mean": mean, "se": 0.01}}, dp_releases=[draw])

    save("A8-unrefined_public300_model_prior", 0.60, "first")
    save("A8-unrefined_public300_model_prior_seed2", 0.66, "first")
    curve = tmp_path / "curve.png"
    # one epsilon measured: no curve (and no file)
    assert finance_headline.variant_draws("8", finance_headline.BEST_VARIANT) == [[0.60, 0.66]]
    assert not finance_headline.plot_curve(args, ["4", "8"], specs, curve) and not curve.exists()
    save("A4-unrefined_public300_model_prior_seed3", 0.50, "eps4")
    assert finance_headline.variant_draws("4", finance_headline.BEST_VARIANT) == [[0.50]]
    assert finance_headline.plot_curve(args, ["4", "8"], specs, curve) and curve.stat().st_size > 0
    # a new DP draw measured again under the same name: the earlier draw stays on the curve, each draw's mean counts once
    save("A8-unrefined_public300_model_prior", 0.70, "second")
    assert finance_headline.variant_draws("8", finance_headline.BEST_VARIANT) == [[0.60, 0.66], [0.70]]
    assert finance_headline.draws_mean([[0.60, 0.66], [0.70]]) == pytest.approx(0.665)
    # the ablation table's lines show the newest measurement of each name, and the draws beside them
    lines = finance_headline.variant_lines(args, "8", specs, {})
    assert any("over 2 draws" in line and "0.630 (2), 0.700 (1)" in line and "**0.665**" in line for line in lines)


def test_a_calibrated_variant_runs_the_calibrate_stage_and_reports_both_answers_with_their_share_of_the_gap(tmp_path, monkeypatch):
    variants = ",".join(f"{finance_headline.CALIBRATED_VARIANT}{s}" for s in finance_headline.BEST_VARIANT_REPLICATES)
    args, specs, store = headline(tmp_path, monkeypatch, "--epsilons", "8", "--ablations", f"{finance_headline.BEST_VARIANT},{variants}")
    calibrated, plain = specs[f"A8-{finance_headline.CALIBRATED_VARIANT}"], specs[f"A8-{finance_headline.BEST_VARIANT}"]
    names = finance_headline.stage_names(calibrated)
    assert names[names.index("fedtune") + 1] == "calibrate"
    # the same final tuning as the best variant: only the stages after it differ
    assert [s for s in calibrated["stages"] if finance_headline.stage_name(s) != "calibrate"] == plain["stages"]

    def scored(accuracy: float, calibrated_accuracy: float | None) -> dict:
        entry = {"accuracy": accuracy, "macro_f1": 0.5, "n": 400}
        return {"tasks": {t: {"logprob": entry, **({CALIBRATED: dict(entry, accuracy=calibrated_accuracy)} if calibrated_accuracy else {})}
                          for t in finance_headline.TASKS}}

    rows = finance_headline.rows_of("A8-x", {"final": scored(0.55, 0.65)})
    assert set(rows) == {"final", "final_calibrated"} and rows["final_calibrated"].mean == pytest.approx(0.65)
    assert set(finance_headline.rows_of("A8-x", {"final": scored(0.55, None)})) == {"final"}
    for suffix, (raw, fitted) in zip(finance_headline.BEST_VARIANT_REPLICATES, ((0.55, 0.65), (0.50, 0.63), (0.60, 0.64))):
        name = f"A8-{finance_headline.CALIBRATED_VARIANT}{suffix}"
        store.save(name, specs[name], 1.0, rows={k: asdict(v) for k, v in finance_headline.rows_of(name, {"final": scored(raw, fitted)}).items()})
    means = {"2": 0.44, "3": 0.46, "4a": 0.40, "4b": 0.42, "7": 0.71}
    lines = finance_headline.variant_lines(args, "8", specs, means)
    assert "0.550, 0.500, 0.600 (3 replicates): mean **0.550**" in lines[0] and "over row 3 (0.460): **36%**" in lines[0]
    assert "0.650, 0.630, 0.640 (3 replicates): mean **0.640**, SD 0.010" in lines[1] and "**72%**" in lines[1]
    table = "\n".join(finance_headline.ablation_table(args, "8", specs))
    assert table.count("answering with its label prior") == 3
    # on the full test sets the two answers are told apart too
    name = f"A8-{finance_headline.CALIBRATED_VARIANT}"
    full = {k: asdict(v) for k, v in finance_headline.rows_of(name, {"final": scored(0.56, 0.66)}).items()}
    store.add(name, specs[name], store.entry(name, specs[name]), full_rows={"logprob": full, "generation": {"final": full["final"]}},
              full_items={t: 1000 for t in finance_headline.TASKS})
    full_lines = [line for line in finance_headline.full_table(args, "8", specs) if line.startswith(f"| {name} |")]
    assert len(full_lines) == 3 and sum("answering with its label prior" in line and "**0.660**" in line for line in full_lines) == 1


def test_prior_calibration_moves_the_models_mean_answer_on_the_synthetic_inputs_to_their_label_shares(monkeypatch):
    import prior_calibration as pc

    labels = finance_headline.LABELS
    # synthetic pairs: 6 neutral, 2 negative, no positive; the model's raw scores lean to "positive" for every input
    synthetic = [pc.Item(f"s{i}", labels, 1 if i < 6 else 0) for i in range(8)]
    tests = {t: [pc.Item(f"{t}{i}", labels, 1) for i in range(4)] for t in pc.TASKS}
    raw = np.log([0.2, 0.3, 0.5])
    monkeypatch.setattr(pc, "choice_logprobs", lambda model, tokenizer, items, batch_size, device: [raw.tolist() for _ in items])
    result = pc.calibrate(None, None, synthetic, tests)
    assert result.prior == [0.25, 0.75, 0.0] and result.model_prior == [0.2, 0.3, 0.5]
    assert all(s["accuracy"] == 0.0 and s["predicted"]["positive"] == 4 for s in result.before.values())
    # after: each label's score is log(its synthetic share), so "neutral" wins on every item
    assert all(s["accuracy"] == 1.0 and s["predicted"]["neutral"] == 4 for s in result.after.values())
