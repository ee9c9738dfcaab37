"""The `evaluate` stage split over the parties: the server scores the public tasks and never needs,
nor opens, a client's private test set (`private_tasks`); where the clients' data is, a bad one is
still refused in one line before anything runs."""

from __future__ import annotations

import json
import re

from tests.conftest import run_in, sentiment_rows, tiny_spec, write_jsonl, write_spec
from tests.test_roles import BANKS, OpenedFiles


def test_the_server_evaluates_without_the_clients_private_test_sets(tmp_path, capsys):
    members = [{"id": bank, "data": [{"path": f"{bank}/{bank}.jsonl"}]} for bank in BANKS]  # relative to the spec's directory
    for index, bank in enumerate(BANKS):
        (tmp_path / bank).mkdir()
        write_jsonl(tmp_path / bank / f"{bank}.jsonl", [dict(r, id=f"{bank}{i}") for i, r in enumerate(sentiment_rows(12))][index:])
    (tmp_path / "server").mkdir()
    write_jsonl(tmp_path / "server/public.jsonl", sentiment_rows(6))
    # one machine, as a shared test bed would be: bank_a's private test set lies where the server
    # could open it; bank_b's is not on this machine at all (it is on bank_b's)
    write_jsonl(tmp_path / "bank_a/test.jsonl", sentiment_rows(5))
    evaluate = {"name": "evaluate", "params": {"tasks": ["server/public.jsonl"], "private_tasks": {"bank_a": ["bank_a/test.jsonl"], "bank_b": ["bank_b/test.jsonl"]},
                                               "models": ["base"], "modes": ["logprob"], "limit": 2, "fidelity": False}}
    spec = str(write_spec(tmp_path, tiny_spec(clients={"members": members}, stages=["prepare_models", "ingest", evaluate])))
    exchange = str(tmp_path / "exchange")
    for bank in BANKS:
        assert run_in(tmp_path / bank, "run", spec, "--run-dir", "run", "--role", "client", "--client", bank, "--exchange", exchange) == 0
    capsys.readouterr()
    code, opened = OpenedFiles().run(tmp_path / "server", "run", spec, "--run-dir", "run", "--role", "server", "--exchange", exchange)
    assert code == 0, capsys.readouterr().err
    assert not [p for p in opened if any(p.is_relative_to((tmp_path / bank).resolve()) for bank in BANKS)]
    assert any(p.name == "public.jsonl" for p in opened)  # the hook does see its reads
    results = json.loads((tmp_path / "server/run/stages/evaluate/results.json").read_text())
    assert set(results["models"]["base"]["tasks"]) == {"public"} and "test" not in json.dumps(results)
    manifest = json.loads((tmp_path / "server/run/stages/evaluate/manifest.json").read_text())
    assert [name.endswith(":server/public.jsonl") for name in manifest["inputs"]] == [True] and set(manifest["outputs"]) == {"results.json"}

    # where the clients' data is, a bad private test set is still one line, exit 2, nothing written
    (tmp_path / "bank_a/test.jsonl").write_text('{"instruction": "What is the sentiment?", "input": "Shares fell."}\n')
    write_jsonl(tmp_path / "bank_b/test.jsonl", sentiment_rows(5))
    capsys.readouterr()
    for argv in (["check", spec], ["run", spec, "--run-dir", "simulation"]):
        assert run_in(tmp_path, *argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ksg: error: ") and "bank_a/test.jsonl" in err and "\n" not in err, err
    assert not (tmp_path / "simulation").exists()
    # and on the bank's own machine, scoring its private test set against its run
    assert run_in(tmp_path / "bank_a", "eval", "run", "--private", "bank_a=test.jsonl", "--tasks", "fpb", "--limit", "2") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ksg: error: ") and "test.jsonl" in err and "\n" not in err, err
    assert not (tmp_path / "bank_a/run/eval").exists()
    # in a simulation the private test sets are the stage's inputs: edited, evaluate runs again
    write_jsonl(tmp_path / "bank_a/test.jsonl", sentiment_rows(5))
    assert run_in(tmp_path, "run", spec, "--run-dir", "simulation") == 0
    simulated = json.loads((tmp_path / "simulation/stages/evaluate/manifest.json").read_text())
    assert sum(name.endswith("/test.jsonl") for name in simulated["inputs"]) == 2
    write_jsonl(tmp_path / "bank_a/test.jsonl", sentiment_rows(7))  # not 6: that is a copy of the public file, refused as one
    capsys.readouterr()
    assert run_in(tmp_path, "run", spec, "--run-dir", "simulation") == 0
    assert re.search(r"evaluate\s+│ ran", capsys.readouterr().err)
