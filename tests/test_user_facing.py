"""What a user meets: their own test sets, cards that carry the privacy statement, `ksg init` and
`ksg check`, quiet output, and one report page per run, checked in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from knowledgesg.cli import main
from knowledgesg.fileio import read_json
from tests.conftest import run_cli, run_in, sentiment_rows, tiny_spec, write_jsonl, write_spec
from tests.test_fedtune import run_pipeline

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def chromium_dom(page: Path, profile: Path) -> str:
    """The page's DOM after it loaded, as headless Chromium rendered it."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium package)")
        pytest.skip("chromium is not installed here (apt-get install chromium); CI installs it")
    done = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """A run through fedtune, evaluate and publish on the tiny model (canned synthetic text)."""
    workdir = tmp_path_factory.mktemp("published")
    write_jsonl(workdir / "own.jsonl", sentiment_rows(6))  # a public test file of the user's, and client_0's private one
    write_jsonl(workdir / "held_out.jsonl", sentiment_rows(5))
    (workdir / "mapped.csv").write_text("q,label\nIs revenue up this quarter?,yes\nDid the bank close branches?,no\nWas the dividend cut?,no\n")
    mapped = {"path": "mapped.csv", "fields": {"instruction": "q", "response": "label"}, "name": "mapped"}  # the same field mapping as private data
    evaluate = {"name": "evaluate", "params": {"tasks": ["fpb", "own.jsonl", mapped], "private_tasks": {"client_0": ["held_out.jsonl"]}, "models": ["base", "final"],
                                               "modes": ["logprob"], "limit": 4, "fidelity": False}}
    assert run_pipeline(workdir, {"rounds": 1, "training": {"steps": 1, "batch_size": 4, "max_length": 48}, "lora": {"r": 4}}, extra_stages=[evaluate, "publish"]) == 0
    return workdir / "run"


# -- cards ---------------------------------------------------------------------------------------


def test_the_final_adapter_has_a_model_card_with_the_privacy_statement(published: Path):
    from peft import PeftModel

    from knowledgesg.models import load_causal_lm, resolve_model

    directory = published / "stages/publish/final_adapter"
    base, _ = load_causal_lm(resolve_model("tiny-random-llama"))
    PeftModel.from_pretrained(base, directory)  # loads as PEFT
    card = (directory / "README.md").read_text()
    matter = yaml.safe_load(card.split("---")[1])
    assert matter["library_name"] == "peft" and matter["base_model"] == "tiny-random-llama" and "differential-privacy" in matter["tags"]
    ledger = read_json(published / "stages/dp_train/ledger.json")
    for entry in ledger:  # each client's epsilon, delta, unit and trust line, from the ledger
        row = next(line for line in card.splitlines() if line.startswith(f"| {entry['client_id']} |"))
        assert f"{entry['epsilon']['pld']:.3f}"[:-1] in row or f"{entry['epsilon']['reported']:.2f}" in row
        assert "record" in row and f"{entry['delta']:.1e}" in row and "server operator included" in row
    assert "## Evaluation" in card and "| base |" in card and "| final |" in card and "logprob" in card
    assert "prepare_models -> ingest -> dp_train -> synthesize -> refine -> fedtune -> evaluate" in card


def test_the_synthetic_data_is_a_datasets_directory_with_a_card(published: Path):
    import datasets

    directory = published / "stages/publish/synthetic_data"
    loaded = datasets.load_from_disk(str(directory))
    refined = sum(len((published / f"stages/refine/clients/{c}/refined.jsonl").read_text().splitlines()) for c in ("client_0", "client_1"))
    assert len(loaded) == refined and set(loaded.column_names) >= {"instruction", "input", "response", "client_id", "provenance"}
    card = (directory / "README.md").read_text()
    assert "## Privacy" in card and "## Filtering" in card and "## Refinement" in card and "post-processing" in card
    manifest = read_json(published / "stages/publish/manifest.json")
    assert all(out["side"] == "server" for out in manifest["outputs"].values())


# -- the user's own test sets ---------------------------------------------------------------------


def test_the_evaluate_stage_scores_own_files_and_keeps_the_private_one_on_its_side(published: Path):
    results = read_json(published / "stages/evaluate/results.json")
    assert set(results["models"]["final"]["tasks"]) == {"fpb", "own", "mapped"} and "held_out" not in json.dumps(results)
    assert results["models"]["final"]["tasks"]["mapped"]["logprob"]["n"] == 3
    manifest = read_json(published / "stages/evaluate/manifest.json")
    assert manifest["outputs"]["clients/client_0/private_eval.json"]["side"] == "client:client_0"
    assert all(digest.startswith("hmac-sha256:") for digest in manifest["inputs"].values())  # a private test file's digest is keyed
    kept = read_json(published / "stages/evaluate/clients/client_0/private_eval.json")
    assert kept["models"]["dp_adapter:client_0"]["tasks"]["held_out"]["logprob"]["n"] == 4


def test_eval_scores_a_users_own_files_and_keeps_a_private_test_set_on_its_client(published: Path, tmp_path: Path, capsys):
    labelled = write_jsonl(tmp_path / "my_test.jsonl", sentiment_rows(6))
    (tmp_path / "mc.csv").write_text('question,options,answer\n"Which is a fruit?","[""apple"", ""stone""]",A\n"2 + 2?","[""3"", ""4"", ""5""]",1\n')
    private = write_jsonl(tmp_path / "private.jsonl", sentiment_rows(5))
    code = main(["eval", str(published), "--tasks", f"fpb,{labelled},{tmp_path / 'mc.csv'}", "--private", f"client_0={private}",
                 "--models", "base", "--modes", "logprob,generation", "--limit", "4"])
    console = "".join(capsys.readouterr())  # both streams: the scores on stdout, the notes on stderr
    assert code == 0, console
    # the private figures (its test accuracy, the fidelity distances and sizes) stay in the client's files, not on a console the server may log
    assert "client_0's private test set: scored, in" in console and "synthetic data of client_0 against its private data: in" in console
    assert not re.search(r"n_private|frechet|self_bleu|'mean_accuracy'", console), console
    report = read_json(published / "eval/eval_report.json")
    scores = report["models"]["base"]["tasks"]
    assert set(scores) == {"fpb", "my_test", "mc"} and scores["mc"]["logprob"]["n"] == 2 and scores["my_test"]["generation"]["n"] == 4
    assert "private_tasks" not in report["options"] and "private" not in json.dumps(report)
    sides = read_json(published / "eval/sides.json")
    assert sides["clients/client_0/private_eval.json"] == "client:client_0" and sides["eval_report.html"] == "server"
    kept = read_json(published / "eval/clients/client_0/private_eval.json")
    assert set(kept["models"]) == {"base", "dp_adapter:client_0", "final"} and kept["models"]["final"]["tasks"]["private"]["logprob"]["n"] == 4
    assert sides["clients/client_0/fidelity.json"] == "client:client_0"  # the synthetic data, scored by default


def test_eval_refuses_a_private_test_set_of_an_unknown_client_before_scoring_anything(published: Path, tmp_path: Path, capsys, monkeypatch):
    import eval.evaluate

    private = write_jsonl(tmp_path / "private.jsonl", sentiment_rows(5))
    monkeypatch.setattr(eval.evaluate, "evaluate_run", lambda *a, **k: pytest.fail("scored the public tasks first"))
    assert main(["eval", str(published), "--tasks", "fpb", "--private", f"bank_z={private}", "--models", "base", "--limit", "4"]) == 2
    assert capsys.readouterr().err.strip() == "ksg: error: --private: no client 'bank_z' in this run (clients: client_0, client_1)"


def test_eval_refuses_a_clients_data_or_private_test_set_as_a_public_task(published: Path, tmp_path: Path, capsys, monkeypatch):
    """Its scores would go to the server's eval_report.json unnoised: membership and label statistics of private records."""
    import shutil

    import eval.evaluate

    monkeypatch.setattr(eval.evaluate, "evaluate_run", lambda *a, **k: pytest.fail("scored the public tasks"))
    client_data = published.parent / "data.jsonl"
    copy = shutil.copy(client_data, tmp_path / "renamed.jsonl")  # a copy is the same data
    for task in (client_data, copy):
        assert main(["eval", str(published), "--tasks", f"fpb,{task}", "--models", "base", "--limit", "4"]) == 2
        assert "ksg eval --tasks: " in (err := capsys.readouterr().err) and "is also a client's data source" in err, err
    private = write_jsonl(tmp_path / "private.jsonl", sentiment_rows(5))
    assert main(["eval", str(published), "--tasks", str(private), "--private", f"client_0={private}", "--models", "base", "--limit", "4"]) == 2
    assert "is also a private test set" in capsys.readouterr().err


def test_eval_limit_0_scores_every_item_and_no_fidelity_skips_the_synthetic_data(published: Path, tmp_path: Path, capsys):
    labelled = write_jsonl(tmp_path / "my_test.jsonl", sentiment_rows(6))
    assert main(["eval", str(published), "--tasks", str(labelled), "--models", "base", "--modes", "logprob", "--limit", "0",
                 "--no-fidelity"]) == 0, capsys.readouterr().err
    report = read_json(published / "eval/eval_report.json")
    assert not any("fidelity" in path for path in read_json(published / "eval/sides.json"))
    assert report["options"]["limit"] is None and report["models"]["base"]["tasks"]["my_test"]["logprob"]["n"] == 6

@pytest.mark.parametrize("content,pattern", [
    ('{"instruction": "Q", "response": "same"}\n{"instruction": "Q2", "response": "same"}\n', r"needs 2 to 20 distinct responses to choose between, found 1"),
    ('{"question": "Q?", "options": ["a", "b"], "answer": "C"}\n', r"record 1: field 'answer': is neither an option letter"),
], ids=["one-label", "bad-answer"])
def test_a_bad_test_file_is_one_line_and_exit_2(published: Path, tmp_path: Path, capsys, content, pattern):
    (tmp_path / "bad.jsonl").write_text(content)
    assert main(["eval", str(published), "--tasks", str(tmp_path / "bad.jsonl"), "--models", "base", "--modes", "logprob"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(pattern, err[0]), err


@pytest.mark.parametrize("argv,pattern", [
    (["eval", "runs/x", "--limit", "-1"], r"^ksg: error: ksg eval: Invalid value for '--limit': -1 is not in the range x>=0\. \(see ksg eval --help\)$"),
    (["evl"], r"^ksg: error: ksg: No such command 'evl'\. Did you mean 'eval'\? \(see ksg --help\)$"),
    (["run"], r"^ksg: error: ksg run: Missing argument 'SPEC'\. \(see ksg run --help\)$"),
    (["eval", "runs/x", "--limit"], r"^ksg: error: ksg eval: Option '--limit' requires an argument\. \(see ksg eval --help\)$"),
], ids=["bad-value", "unknown-command", "missing-argument", "option-without-value"])
def test_a_usage_error_is_one_line_and_exit_2(capsys, argv, pattern):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(pattern, err[0]), err


def test_ksg_alone_prints_its_help_and_no_error(capsys):
    main([])
    out, err = capsys.readouterr()
    assert "eval" in out and "audit" in out and "error" not in err


def test_ksg_resumes_a_finished_run_without_torch(workdir: Path):
    """A finished run resumes in under a second because `ksg run` of a cached run, `ksg status`,
    the stage registry, every stage module and the eval and privacy report modules import no
    torch, transformers, peft or opacus: a stage loads them when it runs (each costs seconds)."""
    spec = write_spec(workdir, tiny_spec(stages=["prepare_models", "ingest"]))
    assert main(["run", str(spec), "--run-dir", str(workdir / "run")]) == 0
    code = ("import importlib, pkgutil, sys; from knowledgesg.cli import main; "
            f"assert main(['run', {str(spec)!r}, '--run-dir', {str(workdir / 'run')!r}]) == 0; assert main(['status', {str(workdir / 'run')!r}]) == 0; "
            "import pipelines, eval.evaluate, eval.audit, eval.report, privacy.report; "
            "[importlib.import_module('pipelines.' + m.name) for m in pkgutil.iter_modules(pipelines.__path__)]; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'opacus') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip().splitlines()[-1] == "[]", loaded.stdout

# -- ksg init and ksg check -----------------------------------------------------------------------


def test_init_writes_a_commented_spec_that_check_and_run_accept(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rows = [{"uid": f"u{i}", "sentence": f"Company {i} reported results number {i * 7}.", "sentiment": ["negative", "neutral", "positive"][i % 3]} for i in range(90)]
    import csv

    with open(tmp_path / "bank.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["uid", "sentence", "sentiment"])
        writer.writeheader()
        writer.writerows(rows)
    assert main(["init", "bank.csv", "--out", "spec.yaml"]) == 0
    text = (tmp_path / "spec.yaml").read_text()
    assert text.startswith("# Run: ksg run spec.yaml") and "'sentiment' takes a few short values" in text and "90" not in text  # no count of the data in a spec the server holds
    spec = yaml.safe_load(text)
    assert spec["clients"]["data"][0]["fields"] == {"id": "uid", "response": "sentiment", "input": "sentence"}
    assert spec["clients"]["partition"]["method"] == "dirichlet" and [s if isinstance(s, str) else s["name"] for s in spec["stages"]][-2:] == ["calibrate", "publish"]
    # a labelled task gets what the headline benchmark measured: the DP models' label proportions, their labels through refine
    params = {s["name"]: s["params"] for s in spec["stages"] if isinstance(s, dict)}
    assert params["synthesize"]["class_balance"] == "model" and params["refine"]["label_source"] == "dp"
    assert params["calibrate"]["labels"] == params["synthesize"]["labels"] == ["negative", "neutral", "positive"]
    assert main(["init", "bank.csv", "--out", "spec.yaml"]) == 2  # never overwrites
    capsys.readouterr()
    assert main(["check", "spec.yaml"]) == 0
    out, err = capsys.readouterr()
    assert "planned privacy per client" in out and "nothing was written" in err and re.search(r"client_0 .* to be released \(sigma 10\) .* (7\.9\d\d|8\.0[01]\d) .* ok", out), out  # epsilon 8 and the count's 0.012
    assert not (tmp_path / "runs").exists()


def test_init_writes_nothing_of_a_record_into_the_spec(tmp_path: Path, monkeypatch, capsys):
    """The spec `ksg init` writes goes to the server: a headerless CSV's first record is not taken
    for column names, and free-text answers, however few, are not proposed as labels."""
    monkeypatch.chdir(tmp_path)
    note = "Patient Jane Roe, born 1970-01-02, MRN 443322, reports chest pain after the new dose"
    (tmp_path / "notes.csv").write_text(f'"{note}",urgent\n' + "".join(f'"Patient {i} is stable on the current therapy plan, seen weekly",routine\n' for i in range(9)))
    assert main(["init", "notes.csv", "--out", "notes.yaml"]) == 2
    err = capsys.readouterr().err
    assert "notes.csv: line 1 does not look like a header row" in err and "Jane" not in err and not (tmp_path / "notes.yaml").exists()
    # a headerless CSV of short cells: no name it knows, so nothing of its first line becomes a column name
    (tmp_path / "short.csv").write_text("17,Jane Roe admitted 2023-04-01 chest pain\n" + "".join(f"{i},{'Patient seen and notes follow. ' * 15}\n" for i in range(5)))
    assert main(["init", "short.csv", "--out", "short.yaml"]) == 2
    err = capsys.readouterr().err
    assert "Jane" not in err and not (tmp_path / "short.yaml").exists(), err
    # free-text answers, each repeated (so only their length tells them from labels)
    answers = ["take 5mg warfarin, patient jane roe", "see the cardiologist, patient john doe as soon as possible"]
    write_jsonl(tmp_path / "qa.jsonl", [{"question": f"What now for case {i}?", "answer": answers[i % 2]} for i in range(12)])
    assert main(["init", "qa.jsonl", "--out", "qa.yaml"]) == 0
    text = (tmp_path / "qa.yaml").read_text()
    params = [s["params"] for s in yaml.safe_load(text)["stages"] if isinstance(s, dict)]
    assert "warfarin" not in text and "jane" not in text.lower() and not any("labels" in p for p in params)


def test_init_never_writes_its_spec_over_the_data_or_under_a_file(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "bank.jsonl", sentiment_rows(30))
    before = (tmp_path / "bank.jsonl").read_bytes()
    assert main(["init", "bank.jsonl", "--out", "bank.jsonl", "--force"]) == 2
    assert "bank.jsonl: is one of the data files" in capsys.readouterr().err
    assert (tmp_path / "bank.jsonl").read_bytes() == before
    assert main(["init", "bank.jsonl", "--out", "bank.jsonl/spec.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ksg: error: --out bank.jsonl/spec.yaml: bank.jsonl is not a directory", err


def test_init_with_several_files_and_text_makes_members_and_structures(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "hospital_a.jsonl", [{"question": f"What helps condition {i}?", "answer": f"Rest and fluids help condition {i}."} for i in range(30)])
    write_jsonl(tmp_path / "notes.jsonl", [{"id": f"n{i}", "note": "The patient improved on the new therapy over two weeks. " * 12} for i in range(5)])
    assert main(["init", "hospital_a.jsonl", "notes.jsonl", "--domain", "medicine", "--out", "med.yaml"]) == 0
    spec = yaml.safe_load((tmp_path / "med.yaml").read_text())
    assert [m["id"] for m in spec["clients"]["members"]] == ["hospital_a", "notes"]
    assert spec["clients"]["members"][1]["data"][0] == {"path": "notes.jsonl", "kind": "text", "fields": {"text": "note"}}
    names = [s if isinstance(s, str) else s["name"] for s in spec["stages"]]
    assert "structure" in names and spec["models"]["embedder"] == "minilm-l6-v2" and "calibrate" not in names  # answers, not labels
    assert next(s for s in spec["stages"] if isinstance(s, dict) and s["name"] == "dp_train")["params"]["source_stage"] == "structure"


def test_init_names_clients_safely_from_awkward_file_names(tmp_path: Path, monkeypatch):
    """A file stem with '..', one of 70 characters, and two stems equal but for case (one
    directory on macOS) each give a safe, distinct client name: the numbering loop had never
    ended on the first two."""
    monkeypatch.chdir(tmp_path)
    stems = ["bank..a", "b" * 70, "Bank", "bank", "..."]
    for stem in stems:
        write_jsonl(tmp_path / f"{stem}.jsonl", sentiment_rows(12))
    assert main(["init", *[f"{stem}.jsonl" for stem in stems], "--out", "spec.yaml"]) == 0
    names = [m["id"] for m in yaml.safe_load((tmp_path / "spec.yaml").read_text())["clients"]["members"]]
    assert names == ["bank.a", "b" * 56, "Bank", "bank_1", "client"], names
    assert main(["init", "Bank.jsonl", "./Bank.jsonl", "--out", "twice.yaml"]) == 2
    assert not (tmp_path / "twice.yaml").exists()


def test_check_refuses_a_plan_past_the_cap_and_counts_the_ledger(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    train = {"name": "dp_train", "params": {"batch_size": 4, "max_length": 48}}
    spec = write_spec(tmp_path, tiny_spec(stages=["prepare_models", "ingest", train], privacy={"target_epsilon": 6.0, "cap_epsilon": 7.0}))
    assert main(["check", str(spec)]) == 0
    assert main(["run", str(spec), "--run-dir", "runs/t"]) == 0  # spends about 6 per client
    assert main(["check", str(spec)]) == 0  # its resume releases nothing new: the finished dp_train is kept
    shutil.rmtree(tmp_path / "runs/t/stages/dp_train")  # asking for a new release
    capsys.readouterr()
    assert main(["check", str(spec)]) == 2  # the same again would compose past 7
    out, err = capsys.readouterr()
    assert "spent before" in out and "over the cap" in out
    assert [l for l in err.splitlines() if l.startswith("ksg: error:")][0].startswith("ksg: error: client 'client_0': the planned releases would exceed the privacy budget cap")


def test_check_plans_dp_fedavg_on_private_data(tmp_path: Path, monkeypatch, capsys):
    """fedtune's DP-SGD local steps on private data are a release `ksg check` must count: it had
    planned epsilon 0 for them."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    fedtune = {"name": "fedtune", "params": {"data": "private", "local_dp": {"target_epsilon": 3.0}, "rounds": 2,
                                             "training": {"steps": 2, "batch_size": 4, "max_length": 48}}}
    spec = tiny_spec(stages=["prepare_models", "ingest", fedtune], privacy={"cap_epsilon": 4.0})
    assert main(["check", str(write_spec(tmp_path, spec))]) == 0
    out = capsys.readouterr().out
    assert re.search(r"client_0 .* 2\.9\d\d .* ok", out), out
    spec["privacy"]["cap_epsilon"] = 2.0
    assert main(["check", str(write_spec(tmp_path, spec))]) == 2
    assert "would exceed the privacy budget cap" in capsys.readouterr().err


# -- quiet output, peak memory and the run report --------------------------------------------------


def test_dependency_warnings_are_quiet_unless_verbose():
    from knowledgesg.console import quiet_dependencies

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_dependencies()
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit("a warning of ours", UserWarning, "stage.py", 1, module="knowledgesg.stage")
    assert [str(w.message) for w in caught] == ["a warning of ours"]


def test_plain_tqdm_bars_are_quiet_unless_verbose():
    """transformers' GGUF conversion draws a plain tqdm bar (`tqdm.auto`), which its own switches
    do not reach: it had printed two bars into the demo's output."""
    code = ("import sys; from knowledgesg.console import quiet_dependencies; quiet_dependencies() if sys.argv[1] == 'quiet' else None; "
            "from tqdm.auto import tqdm; [x for x in tqdm(range(3), desc='converting')]")
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    runs = {mode: subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, env=env, check=True) for mode in ("quiet", "verbose")}
    assert "converting" not in runs["quiet"].stderr and "converting" in runs["verbose"].stderr


def test_a_normal_run_is_quiet_and_reports_peak_memory(tmp_path: Path):
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    spec = write_spec(tmp_path, tiny_spec(stages=["prepare_models", "ingest", {"name": "dp_train", "params": {"batch_size": 4, "max_length": 48}}]))
    done = run_cli("run", str(spec), "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr and "Traceback" not in done.stderr and "Loading weights" not in done.stderr, done.stderr
    assert "peak memory" in done.stderr and re.search(r"dp_train .* \d+ MiB", done.stderr)
    assert read_json(tmp_path / "run/stages/dp_train/manifest.json")["peak_rss_mib"] > 50


def test_the_run_report_page_renders_with_its_tables_and_figures(published: Path, tmp_path: Path):
    assert main(["privacy-report", str(published)]) == 0  # also refreshes report.html
    dom = chromium_dom(published / "report.html", tmp_path / "profile")
    stages = re.search(r'<table id="stages">(.*?)</table>', dom, re.S).group(1)
    for stage in ("prepare_models", "ingest", "dp_train", "synthesize", "refine", "fedtune", "evaluate", "publish"):
        assert f"<td>{stage}</td>" in stages
    assert dom.count("<rect") == 8 and 'aria-label="time per stage"' in dom  # one bar per stage
    assert re.search(r'<table id="privacy">.*client_0.*client_1', dom, re.S)
    assert 'href="privacy_report.html"' in dom and 'href="stages/publish/final_adapter/README.md"' in dom
    privacy = chromium_dom(published / "privacy_report.html", tmp_path / "profile")
    assert 'data-loaded="true"' in privacy and 'data-loaded="false"' not in privacy and "Threat model" in privacy


def test_an_interrupted_run_exits_130_not_0(tmp_path: Path, monkeypatch, capsys):
    """Ctrl-C during `ksg run`: click 8.2 and later return the Abort's code instead of raising it,
    and `ksg` had exited 0, as if the run had finished."""
    import knowledgesg.runner as runner
    from knowledgesg.cli import main

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(20))
    monkeypatch.setattr(runner.Runner, "run", interrupted)
    assert main(["run", str(write_spec(tmp_path, tiny_spec())), "--run-dir", "run"]) == 130
    assert "ksg: aborted" in capsys.readouterr().err


def test_the_model_card_says_what_the_final_tuning_read():
    """The card had said "no private record was trained on" for every run, DP-FedAvg on the
    clients' private records (`fedtune data: private`) too."""
    from knowledgesg.cards import training_data

    assert "no private record was trained on" in training_data({"data": "synthetic"}, "| a | 3 |")
    private = training_data({"data": "private"}, "")
    assert "private records with DP-SGD local steps" in private and "no private record" not in private


def test_every_commands_help_describes_its_arguments(capsys):
    """`ksg status --help` had shown RUN with no word of what it is (typer 0.20 under click 8.5 drops
    an argument's help)."""
    for command, described in (("status", "a run directory"), ("check", "pipeline spec (YAML)"), ("run", "pipeline spec (YAML)"), ("init", "your data files")):
        assert main([command, "--help"]) == 0
        out = capsys.readouterr()
        assert described in out.out + out.err, (command, out.out)


def test_check_says_why_it_plans_no_release(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(20))
    assert main(["check", str(write_spec(tmp_path, tiny_spec(stages=["prepare_models"])))]) == 0
    out, err = capsys.readouterr()
    assert "no release planned: the spec has no stage that releases something of the private data" in out and "nothing was written" in err


def test_the_model_card_composes_every_release_of_a_clients_data(tmp_path: Path):
    """The card composed this run's stage copies alone: a stage run again replaces its copy, and an
    adapter released before (a rerun, an earlier run on the same data) was left out of the epsilon
    the card states, though whoever holds both adapters faces their composition."""
    from privacy.ledger import ClientLedger, client_delta, composed_total, new_release_id, read_stage_ledgers

    fedtune = {"rounds": 1, "training": {"steps": 1, "batch_size": 4, "max_length": 48}, "lora": {"r": 4}}
    assert run_pipeline(tmp_path, fedtune, extra_stages=["publish"]) == 0
    run = tmp_path / "run"
    released = next(e for e in read_stage_ledgers(run, ["dp_train"]) if e.client_id == "client_0")
    ledger = next(path for path in (run / "ledger").glob("*.jsonl") if released.release_id in path.read_text())
    with ledger.open("a") as file:  # an adapter of the same data released before, its stage copy since replaced
        file.write(released.model_copy(update={"release_id": new_release_id()}).model_dump_json() + "\n")
    shutil.rmtree(run / "stages/publish")
    assert run_in(tmp_path, "run", str(tmp_path / "spec.yaml"), "--run-dir", "run") == 0

    entries = ClientLedger(ledger, "client_0").entries()
    assert len([e for e in entries if e.stage == "dp_train"]) == 2
    both, one = composed_total(entries, client_delta(entries)).reported, released.epsilon.reported
    assert both > one * 1.2
    row = next(line for line in (run / "stages/publish/final_adapter/README.md").read_text().splitlines() if line.startswith("| client_0 |"))
    assert f"| {both:.3f} |" in row, (row, both, one)
