"""Every kind of bad input: one line on stderr naming file, line and field; exit 2; no run dir."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from knowledgesg.cli import main
from tests.conftest import run_cli, sentiment_rows, tiny_spec, write_jsonl, write_spec


def _jsonl(text: str):
    return lambda d: (d / "data.jsonl").write_text(text, encoding="utf-8")


def _bytes(name: str, data: bytes):
    return lambda d: (d / name).write_bytes(data)


def _copies(*paths: str) -> None:
    """Copies of the workdir's data.jsonl at `paths` (relative to the current directory, the workdir)."""
    for path in paths:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(Path("data.jsonl").read_bytes())


GOOD = '{"id": "a", "instruction": "Q?", "response": "yes"}\n'

# (case id, spec overrides for the data source, how to make the file(s), expected stderr pattern)
DATA_CASES = [
    ("missing-file", {"path": "nope.jsonl"}, None, r"spec\.yaml: clients\.data\[0\]\.path: \S*nope\.jsonl: data file not found$"),
    ("malformed-json-line", {"path": "data.jsonl"}, _jsonl(GOOD + '{"id": "b", "instruction": \n'), r"data\.jsonl:2: malformed JSON"),
    ("json-line-not-object", {"path": "data.jsonl"}, _jsonl(GOOD + '["a", "b"]\n'), r"data\.jsonl:2: expected a JSON object, got list"),
    ("missing-field", {"path": "data.jsonl"}, _jsonl(GOOD + '{"id": "b", "instruction": "Q?"}\n'), r"data\.jsonl:2: field 'response': missing"),
    ("empty-field", {"path": "data.jsonl"}, _jsonl(GOOD + '{"id": "b", "instruction": "  ", "response": "no"}\n'), r"data\.jsonl:2: field 'instruction': is empty"),
    ("null-field", {"path": "data.jsonl"}, _jsonl(GOOD + '{"id": "b", "instruction": "Q", "response": null}\n'), r"data\.jsonl:2: field 'response': is null"),
    ("wrong-type", {"path": "data.jsonl"}, _jsonl(GOOD + '{"id": "b", "instruction": 42, "response": "no"}\n'), r"data\.jsonl:2: field 'instruction': must be a string, got int"),
    ("duplicate-id", {"path": "data.jsonl"}, _jsonl(GOOD + GOOD), r"data\.jsonl:2: field 'id': duplicate id \(the same as at line 1\)$"),
    ("non-utf8-jsonl", {"path": "data.jsonl"}, _bytes("data.jsonl", GOOD.encode() + b'{"id": "b", "instruction": "caf\xe9", "response": "x"}\n'), r"data\.jsonl:2: not valid UTF-8"),
    ("non-utf8-csv", {"path": "d.csv"}, _bytes("d.csv", b"instruction,response\nok,yes\nna\xefve,no\n"), r"d\.csv:3: not valid UTF-8"),
    ("unknown-format", {"path": "d.xlsx"}, _bytes("d.xlsx", b"PK\x03\x04"), r"d\.xlsx: unknown data format '\.xlsx'"),
    ("empty-file", {"path": "data.jsonl"}, _jsonl("\n\n"), r"data\.jsonl: no records"),
    ("json-not-list", {"path": "d.json"}, _bytes("d.json", b'{"instruction": "Q", "response": "A"}'), r"d\.json: expected a JSON list of objects, got dict"),
    ("json-record-missing-field", {"path": "d.json"}, _bytes("d.json", b'[{"instruction": "Q", "response": "A"}, {"instruction": "Q2"}]'), r"d\.json: field 'response': record 2: missing"),
    ("jsonl-integer-too-long", {"path": "data.jsonl"}, _bytes("data.jsonl", b'{"instruction": "Q", "response": ' + b"9" * 5000 + b"}\n"), r"data\.jsonl:1: unreadable JSON \(ValueError\)"),
    ("jsonl-nested-too-deep", {"path": "data.jsonl"}, _bytes("data.jsonl", b"[" * 100000 + b"]" * 100000 + b"\n"), r"data\.jsonl:1: unreadable JSON \(RecursionError\)"),
    ("empty-constant", {"path": "data.jsonl", "constants": {"response": " "}}, _jsonl(GOOD), r"spec\.yaml: clients\.data\[0\]\.constants: constants: 'response' is empty"),
    ("csv-short-row", {"path": "d.csv"}, _bytes("d.csv", b"instruction,response\nQ,A\nQ2\n"), r"d\.csv:3: field 'response': fewer cells on this line than columns in the header$"),
    ("csv-missing-column", {"path": "d.csv", "fields": {"instruction": "question"}}, _bytes("d.csv", b"instruction,response\nQ,A\n"), r"d\.csv:1: no column 'question' in the header \(mapped to record field 'instruction'\): it has 2 columns"),
    ("csv-unmapped-columns", {"path": "d.csv"}, _bytes("d.csv", b"text,label\nhello,pos\n"),
     r"d\.csv:1: no column 'instruction' in the header: it has 2 columns, their names not shown .*; map one with `fields: \{instruction: NAME\}` on the data source$"),
    ("jsonl-unmapped-fields", {"path": "data.jsonl"}, _jsonl('{"text": "hello", "label": "pos"}\n'),
     r"data\.jsonl:1: field 'instruction': missing \(the record has text, label; map one with `fields: \{instruction: NAME\}` on the data source\)"),
    ("csv-extra-cells", {"path": "d.csv"}, _bytes("d.csv", b"instruction,response\nQ,A\nQ2,A2,surplus\n"), r"d\.csv:3: 2 columns in the header but more cells"),
    ("csv-repeated-column", {"path": "d.csv"}, _bytes("d.csv", b"instruction,response,response\nQ,A,x\n"), r"d\.csv:1: columns 2 and 3 have the same name in the header"),
    ("csv-quote-never-closed", {"path": "d.csv"}, _bytes("d.csv", b'instruction,response\nQ,A\n"Q2,A2\nQ3,A3\n'), r"d\.csv:3: malformed CSV in the row that starts here \(.*a quote never closed\?\)"),
    ("csv-byte-order-mark-then-bad-row", {"path": "d.csv"}, _bytes("d.csv", b"\xef\xbb\xbfinstruction,response\nQ,A\nQ2, \n"), r"d\.csv:3: field 'response': is empty"),
    ("corrupt-parquet", {"path": "d.parquet"}, _bytes("d.parquet", b"PAR1 this is not parquet"), r"d\.parquet: not a readable Parquet file"),
    ("not-a-dataset-dir", {"path": "ds"}, lambda d: (d / "ds").mkdir(), r"ds: not a saved `datasets` directory"),
    ("unknown-record-field", {"path": "data.jsonl", "fields": {"question": "q"}}, _jsonl(GOOD), r"data\.jsonl: fields maps unknown record field 'question'"),
    ("named-pipe", {"path": "pipe.jsonl"}, lambda d: __import__("os").mkfifo(d / "pipe.jsonl"), r"pipe\.jsonl: not a regular file or a directory"),  # had hung ksg check
    ("unknown-builtin", {"builtin": "fpb_trian"}, None, r"spec\.yaml: clients\.data\[0\]: unknown builtin data set 'fpb_trian' \(known: .*fpb_train"),
    ("builtin-kind-mismatch", {"builtin": "pubmed_abstracts", "kind": "instruction"}, None, r"builtin data set 'pubmed_abstracts' holds text records, but the spec says kind: instruction"),
    # a tweet cut mid-emoji: JSON holds the escape, UTF-8 cannot (it had been a pydantic traceback)
    ("unpaired-surrogate", {"path": "data.jsonl"}, _jsonl(GOOD + '{"id": "b", "instruction": "a\\ud83db", "response": "no"}\n'),
     r"data\.jsonl:2: field 'instruction': holds an unpaired surrogate \(half of a UTF-16 pair"),
    ("unpaired-surrogate-constant", {"path": "data.jsonl", "constants": {"input": "x\ud800"}}, _jsonl(GOOD), r"spec\.yaml: clients\.data\[0\]\.constants: constants: 'input' holds an unpaired surrogate"),
    ("integer-labels", {"path": "data.jsonl"}, _jsonl('{"instruction": "Q", "response": 2}\n'), r"data\.jsonl:1: field 'response': must be a string, got int \(labels given as numbers"),
    # the next after a byte-order mark, which Windows tools write: read as the CSV reader reads it
    ("jsonl-byte-order-mark-then-bad-row", {"path": "data.jsonl"}, _bytes("data.jsonl", b"\xef\xbb\xbf" + GOOD.encode() + b'{"id": "b", "instruction": "Q"}\n'), r"data\.jsonl:2: field 'response': missing"),
    ("json-byte-order-mark-then-bad-record", {"path": "d.json"}, _bytes("d.json", b'\xef\xbb\xbf[{"instruction": "Q", "response": "A"}, {"instruction": "Q2"}]'), r"d\.json: field 'response': record 2: missing"),
]


@pytest.mark.parametrize("case_id,source,make,pattern", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_is_one_line_exit_2_and_no_run_dir(tmp_path: Path, monkeypatch, capsys, case_id, source, make, pattern):
    monkeypatch.chdir(tmp_path)
    if make:
        make(tmp_path)
    spec = write_spec(tmp_path, tiny_spec(data=[source]))
    code = main(["run", str(spec), "--run-dir", "run"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert re.search(pattern, err), err
    assert not (tmp_path / "run").exists()


SPEC_CASES = [
    ("unknown-top-key", lambda s: s.update(stagez=[]), r"spec\.yaml: unknown key 'stagez' \(did you mean 'stages'\?\)$"),
    ("unknown-nested-key", lambda s: s["clients"]["partition"].update(alpah=0.5), r"spec\.yaml: unknown key 'alpah' in clients\.partition \(did you mean 'alpha'\?\)$"),
    ("unknown-list-item-key", lambda s: s["clients"]["data"][0].update(feilds={}), r"spec\.yaml: unknown key 'feilds' in clients\.data\[0\] \(did you mean 'fields'\?\)$"),
    ("misspelt-stage-param", lambda s: s.update(stages=[{"name": "dp_train", "params": {"epochz": 1}}]), r"stages\[0\]\.params: unknown key 'epochz' \(did you mean 'epochs'\?\)$"),
    ("wrong-type", lambda s: s.update(seed="abc"), r"spec\.yaml: seed: Input should be a valid integer"),
    ("missing-models", lambda s: s.pop("models"), r"spec\.yaml: models: required key is missing"),
    ("unknown-stage", lambda s: s.update(stages=["ingest", "dp_trian"]), r"spec\.yaml: stages\[1\]: unknown stage 'dp_trian'"),
    ("bad-stage-param", lambda s: s.update(stages=[{"name": "ingest", "params": {"x": 1}}]), r"stages\[0\]\.params: unknown key 'x'$"),
    ("epsilon-not-positive", lambda s: s.update(privacy={"target_epsilon": 0}), r"privacy\.target_epsilon: must be > 0"),
    ("delta-out-of-range", lambda s: s.update(privacy={"delta": 1.5}), r"privacy\.delta: must be in \(0, 1\)"),
    ("cap-not-positive", lambda s: s.update(privacy={"cap_epsilon": -1}), r"privacy\.cap_epsilon: must be a finite number > 0"),
    ("client-name-traversal", lambda s: s["clients"]["partition"].update(names=["../evil", "b"]), r"clients\.partition\.names\[0\]: unsafe identifier '\.\./evil'"),
    ("client-name-absolute", lambda s: s["clients"]["partition"].update(names=["/tmp/x", "b"]), r"names\[0\]: unsafe identifier '/tmp/x'"),
    ("client-name-dotdot", lambda s: s["clients"]["partition"].update(names=["a..b", "b"]), r"unsafe identifier 'a\.\.b': '\.\.' is not allowed"),
    ("duplicate-client-names", lambda s: s["clients"]["partition"].update(names=["a", "a"]), r"clients\.partition: duplicate client name\(s\), letter case aside \(each is a directory\): a"),
    ("member-id-traversal", lambda s: s.update(clients={"members": [{"id": "../../x", "data": [{"path": "data.jsonl"}]}]}), r"clients\.members\[0\]\.id: unsafe identifier"),
    ("run-name-unsafe", lambda s: s.update(name="../runs"), r"spec\.yaml: name: unsafe identifier"),
    ("source-name-unsafe", lambda s: s["clients"]["data"][0].update(name="a/b"), r"clients\.data\[0\]\.name: unsafe identifier 'a/b'"),
    ("canary-client-unknown", lambda s: s.update(audit={"canaries": {"client": "zz"}}), r"spec\.yaml: audit\.canaries\.client: no client 'zz' \(clients: client_0, client_1\)"),
    # spec settings found impossible once the data is read name the spec file and key too
    ("holdout-too-large", lambda s: s.update(audit={"holdout_per_client": 30}), r"spec\.yaml: audit\.holdout_per_client: 30 is too many for client 'client_0'"),
    ("natural-field-missing", lambda s: s["clients"].update(partition={"method": "natural", "field": "bank", "names": ["a", "b"]}),
     r"spec\.yaml: clients\.partition\.field: a record of source 'data' has no value in field 'bank' to partition by$"),
    ("dirichlet-unreachable", lambda s: s["clients"].update(partition={"method": "dirichlet", "num_clients": 2, "min_client_records": 25}),
     r"spec\.yaml: clients\.partition: Dirichlet\(alpha=1\.0\) left a client with fewer than 25 records"),
    ("two-sources-one-name", lambda s: (_copies("more/data.jsonl"), s["clients"].update(data=[{"path": "data.jsonl"}, {"path": "more/data.jsonl"}])),
     r"spec\.yaml: clients\.data: two data sources are named 'data'"),
    ("two-sources-one-name-member", lambda s: (_copies("more/data.jsonl", "b.jsonl"),
                                               s.update(clients={"members": [{"id": "a", "data": [{"path": "data.jsonl"}, {"path": "more/data.jsonl"}]}, {"id": "b", "data": [{"path": "b.jsonl"}]}]})),
     r"spec\.yaml: clients\.members \(id a\)\.data: two data sources are named 'data'"),
    # one file in two clients: each client's ledger would count only its own releases of a record both released
    ("one-file-two-members", lambda s: s.update(clients={"members": [{"id": "a", "data": [{"path": "data.jsonl"}]}, {"id": "b", "data": [{"path": "./data.jsonl"}]}]}),
     r"spec\.yaml: clients: members\[1\]\.data\[0\] names the same data as members\[0\]\.data\[0\] \(data\.jsonl\)"),
    ("member-file-missing", lambda s: s.update(clients={"members": [{"id": "a", "data": [{"path": "data.jsonl"}]}, {"id": "b", "data": [{"path": "gone.jsonl"}]}]}),
     r"spec\.yaml: clients\.members \(id b\)\.data\[0\]\.path: /\S+/gone\.jsonl: data file not found$"),
    ("pool-file-missing", lambda s: (s["models"].update(professional="tiny-random-llama"),
                                     s.update(stages=["prepare_models", "ingest", {"name": "tune_professional", "params": {"data": {"path": "gone.jsonl"}}}])),
     r"spec\.yaml: tune_professional params\.data\.path: /\S+/gone\.jsonl: data file not found$"),
    ("one-builtin-twice", lambda s: s["clients"].update(data=[{"builtin": "fpb_train", "sample": 20}, {"builtin": "fpb_train", "sample": 30, "name": "more"}]),
     r"spec\.yaml: clients: data\[1\] names the same data as data\[0\] \(fpb_train\)"),
    ("empty-model-name", lambda s: s["models"].update(base=" "), r"spec\.yaml: models\.base: String should have at least 1 character"),
    ("ledger-dir-is-a-file", lambda s: s.update(privacy={"ledger_dir": "data.jsonl"}), r"privacy\.ledger_dir /\S+/data\.jsonl: exists and is not a directory"),
    ("stage-order", lambda s: s.update(stages=["prepare_models", "dp_train", "ingest"]), r"spec\.yaml: stages\[1\] \(dp_train\) needs stage 'ingest' before it"),
    ("stage-missing", lambda s: s.update(stages=["prepare_models", "ingest", {"name": "fedtune", "params": {"synthetic_stage": "synthesize"}}]),
     r"stages\[2\] \(fedtune\) needs stage 'synthesize' before it"),
    ("alpha-not-positive", lambda s: s["clients"]["partition"].update(alpha=0), r"clients\.partition\.alpha: Input should be greater than 0"),
    ("both-client-layouts", lambda s: s["clients"].update(members=[{"id": "a", "data": [{"path": "x.jsonl"}]}]), r"clients: give either 'data' with 'partition', or 'members', not both"),
    ("path-and-builtin", lambda s: s["clients"]["data"][0].update(builtin="fpb_train"), r"give exactly one of 'path' or 'builtin'"),
    ("names-count-mismatch", lambda s: s["clients"]["partition"].update(names=["a", "b", "c"]), r"names has 3 entries but num_clients is 2"),
    ("duplicate-stage", lambda s: s.update(stages=["ingest", "ingest"]), r"stages: stage 'ingest' appears more than once"),
    ("unknown-model", lambda s: s["models"].update(base="smollm3"), r"models\.base: model 'smollm3': not a registered name"),
    ("model-directory-without-config", lambda s: s["models"].update(professional="."), r"models\.professional: model '\.': directory has no config\.json"),
    ("too-many-clients", lambda s: s["clients"]["partition"].update(num_clients=50, names=None), r"spec\.yaml: clients\.partition: client 'client_\d+' got no records"),
    ("section-not-a-mapping", lambda s: s.update(models=3), r"spec\.yaml: models: should be a mapping \(key: value\), got int"),
    # numbers no run can use: refused before anything is written, not found after dp_train spent the budget
    ("clip-norm-infinite", lambda s: s.update(stages=[{"name": "ingest"}, {"name": "dp_train", "params": {"clip_norm": float("inf")}}]),
     r"spec\.yaml: stages\[1\]\.params: clip_norm: Input should be a finite number"),
    ("noise-multiplier-tiny", lambda s: s.update(stages=[{"name": "ingest"}, {"name": "dp_train", "params": {"noise_multiplier": 1e-300}}]),
     r"stages\[1\]\.params: noise_multiplier: Input should be greater than or equal to 0\.3"),
    ("epochs-huge", lambda s: s.update(stages=[{"name": "ingest"}, {"name": "dp_train", "params": {"epochs": 1e12}}]), r"params: epochs: Input should be less than or equal to 1000"),
    ("synthesize-words-impossible", lambda s: s.update(stages=[{"name": "ingest"}, {"name": "dp_train"}, {"name": "synthesize", "params": {
        "min_words": 50, "max_words": 5, "seeds": [{"instruction": "Q?"}]}}]), r"stages\[2\]\.params: min_words 50 is above max_words 5"),
    ("synthesize-labels-twice", lambda s: s.update(stages=[{"name": "ingest"}, {"name": "dp_train"}, {"name": "synthesize", "params": {
        "labels": ["pos", "Pos"], "seeds": [{"instruction": "Q?"}]}}]), r"stages\[2\]\.params: labels: 'pos' appears more than once"),
    ("seed-negative", lambda s: s.update(seed=-5), r"spec\.yaml: seed: Input should be greater than or equal to 0"),
    ("ledger-dir-empty", lambda s: s.update(privacy={"ledger_dir": ""}), r"spec\.yaml: privacy\.ledger_dir: an empty path"),
    ("count-noise-tiny", lambda s: s.update(privacy={"count_noise": 0.1}), r"spec\.yaml: privacy\.count_noise: 0 \(N public\) or at least 0\.3, got 0\.1"),
    ("count-noise-negative", lambda s: s.update(privacy={"count_noise": -1}), r"privacy\.count_noise: Input should be greater than or equal to 0"),
    ("canary-secrets-too-few", lambda s: s.update(audit={"canaries": {"client": "client_0", "count": 50, "digits": 1}}),
     r"audit\.canaries: 50 digit canaries need secrets of at least 3 digits"),
    # YAML's true/false where a number goes: pydantic alone reads them as 1 and 0 (epsilon 1, one epoch)
    # a public test file's scores go to the server unnoised: a client's own data must not be one
    ("evaluate-task-is-client-data", lambda s: s.update(stages=["prepare_models", {"name": "ingest"}, {"name": "evaluate", "params": {"tasks": ["fpb", "./data.jsonl"], "models": ["base"]}}]),
     r"evaluate params\.tasks: data\.jsonl is also a client's data source; a public test file's scores go to the server unnoised"),
    # a chunk cap over a client's documents would let one document push another's chunks out (two units apart)
    ("structure-cap-per-client", lambda s: s.update(stages=[{"name": "ingest"}, {"name": "structure", "params": {"pool": {"builtin": "medquad"}, "max_chunks_per_client": 8}}]),
     r"spec\.yaml: stages\[1\]\.params: max_chunks_per_client: a cap over a client's documents lets one document push another's chunks out .*use max_chunks_per_document"),
    ("bool-for-epsilon", lambda s: s.update(privacy={"target_epsilon": True}), r"spec\.yaml: privacy\.target_epsilon: should be a number, got True"),
    ("bool-for-stage-param", lambda s: s.update(stages=[{"name": "ingest"}, {"name": "dp_train", "params": {"epochs": True}}]),
     r"spec\.yaml: stages\[1\]\.params: epochs: should be a number, got True"),
    ("bool-in-nested-stage-param", lambda s: s.update(stages=[{"name": "ingest"}, {"name": "fedtune", "params": {"data": "private", "training": {"steps": False}}}]),
     r"stages\[1\]\.params: training\.steps: should be a number, got False"),
]


def test_a_data_error_says_where_never_what_the_record_holds(tmp_path: Path, monkeypatch, capsys):
    # The error line reaches a console and logs the server may read: file, line and field say where the
    # fault is; the record's content (here the surrogate's code unit and where it stands) stays out.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text(GOOD + '{"id": "b", "instruction": "pin 4\\udc17 9", "response": "no"}\n')
    (tmp_path / "latin.jsonl").write_bytes(GOOD.encode() + b'{"id": "b", "instruction": "pin 4\xe9 9", "response": "no"}\n')
    (tmp_path / "escape.jsonl").write_text(GOOD + '{"id": "b", "instruction": "pin 4\\q 9", "response": "no"}\n')
    (tmp_path / "headerless.csv").write_text("Jane Roe,Jane Roe,positive\nJohn Doe,x,negative\n")  # the "header" is a record
    (tmp_path / "ids.jsonl").write_text(GOOD + GOOD.replace('"a"', '"MRN-443322"') * 2)
    import pyarrow as pa
    import pyarrow.parquet as pq

    offsets = pa.py_buffer(bytes([0, 0, 0, 0, 2, 0, 0, 0, 8, 0, 0, 0]))  # a string column whose second value is not UTF-8
    column = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"okpin 4\xe9 9")])
    pq.write_table(pa.table({"instruction": column, "response": ["yes", "no"]}), tmp_path / "latin.parquet")
    for name, where, content in (("data.jsonl", "data.jsonl:2: field 'instruction'", ("dc17", "character 6")),
                                 ("latin.jsonl", "latin.jsonl:2: not valid UTF-8", ("0xe9", "offset")),
                                 ("escape.jsonl", "escape.jsonl:2: malformed JSON (Invalid \\escape)", ("column",)),
                                 ("headerless.csv", "headerless.csv:1: columns 1 and 2 have the same name", ("jane",)),
                                 ("ids.jsonl", "ids.jsonl:3: field 'id': duplicate id (the same as at line 2)", ("mrn",)),
                                 ("latin.parquet", "latin.parquet: holds text that is not valid UTF-8", ("0xe9", "position"))):
        spec = write_spec(tmp_path, tiny_spec(data=[{"path": name}]))
        assert main(["run", str(spec), "--run-dir", "run"]) == 2
        err = capsys.readouterr().err
        assert where in err, err
        assert not any(part in err.lower() for part in content), err


@pytest.mark.parametrize("case_id,mutate,pattern", SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_bad_spec_is_one_line_exit_2(workdir: Path, capsys, case_id, mutate, pattern):
    spec = tiny_spec()
    if case_id in ("unknown-model", "model-directory-without-config"):
        spec["stages"] = ["prepare_models", "ingest"]
    mutate(spec)
    path = write_spec(workdir, spec)
    code = main(["run", str(path), "--run-dir", "run"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert re.search(pattern, err), err
    assert not (workdir / "run").exists()


def test_yaml_syntax_error_names_the_line(workdir: Path, capsys):
    (workdir / "spec.yaml").write_text("name: t\nseed: [1, 2\nmodels: {}\n", encoding="utf-8")
    assert main(["run", "spec.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(r"spec\.yaml:\d+: invalid YAML", err), err


def test_a_key_given_twice_in_the_spec_is_refused_not_overwritten(workdir: Path, capsys):
    """PyYAML would keep the second silently: this spec would have trained at epsilon 50."""
    text = "name: t\nprivacy:\n  target_epsilon: 1.0\n  target_epsilon: 50.0\nclients: {data: [{path: data.jsonl}]}\nstages: [ingest]\n"
    (workdir / "spec.yaml").write_text(text, encoding="utf-8")
    assert main(["run", "spec.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ksg: error: spec.yaml:4: invalid YAML (key 'target_epsilon' given twice (first at line 3))", err
    from knowledgesg.spec import load_yaml

    assert load_yaml("base: &b {x: 1, y: 0}\nother: {<<: *b, y: 2}\n")["other"] == {"x": 1, "y": 2}  # a merge key's keys may be overridden


def test_missing_spec_file(workdir: Path, capsys):
    assert main(["run", "absent.yaml"]) == 2
    assert "absent.yaml: spec file not found" in capsys.readouterr().err
    (workdir / "specs").mkdir()
    assert main(["check", "specs"]) == 2
    assert capsys.readouterr().err.strip() == "ksg: error: specs: is a directory, not a spec file"


def test_an_exchange_that_cannot_be_a_directory_is_refused_before_anything_is_written(workdir: Path, capsys):
    """It had run ingest, then failed with a traceback when sending, leaving the run directory."""
    spec = write_spec(workdir, tiny_spec(clients={"members": [{"id": "a", "data": [{"path": "data.jsonl"}]}]}, stages=["prepare_models", "ingest"]))
    for role in (["--role", "client", "--client", "a"], ["--role", "server"]):
        assert main(["run", str(spec), "--run-dir", "run", *role, "--exchange", "data.jsonl"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == "ksg: error: --exchange data.jsonl: exists and is not a directory", err
        assert not (workdir / "run").exists()


def test_an_empty_run_directory_is_refused_not_the_working_directory(workdir: Path, capsys):
    """`--run-dir ''` became '.' (a Path of ''): the run wrote its stages and ledger among the spec and the data."""
    spec = write_spec(workdir, tiny_spec(stages=["prepare_models", "ingest"]))
    for command in (["run", str(spec), "--run-dir", ""], ["check", str(spec), "--run-dir", " "]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert err == "ksg: error: --run-dir: an empty path (give a directory, or leave --run-dir out for the default)", err
    assert not (workdir / "stages").exists() and not (workdir / "spec.json").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda run: (shutil.rmtree(run / "stages"), (run / "stages").write_text("")), r"--run-dir run: damaged: stages is a file, not a directory"),
    (lambda run: ((run / ".lock").unlink(), (run / ".lock").mkdir()), r"--run-dir run: damaged: \.lock is a directory, not a file"),
    (lambda run: (run / "spec.json").write_text(json.dumps({**json.loads((run / "spec.json").read_text()), "role": {"kind": "banana"}})),
     r"run/spec\.json: not the run's spec copy \(its role is not one of all, client, server"),
    (lambda run: (run / "spec.json").write_text(json.dumps({**json.loads((run / "spec.json").read_text()), "role": "x"})),
     r"run/spec\.json: not the run's spec copy \(its role is not one of all, client, server"),
], ids=["stages-a-file", "lock-a-directory", "unknown-role", "role-not-a-mapping"])
def test_a_run_directory_damaged_in_shape_is_one_line(workdir: Path, capsys, damage, message):
    """Each had been a traceback midway (NotADirectoryError, IsADirectoryError, KeyError)."""
    spec = write_spec(workdir, tiny_spec(stages=["prepare_models", "ingest"]))
    assert main(["run", str(spec), "--run-dir", "run"]) == 0
    damage(workdir / "run")
    capsys.readouterr()
    assert main(["run", str(spec), "--run-dir", "run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_eval_of_a_model_the_run_lacks_is_refused(workdir: Path, capsys):
    """`--models final` on a run without fedtune had written an empty report and exited 0."""
    assert main(["run", str(write_spec(workdir, tiny_spec(stages=["prepare_models", "ingest"]))), "--run-dir", "run"]) == 0
    capsys.readouterr()
    for kind, stage in (("final", "fedtune"), ("dp", "dp_train")):
        assert main(["eval", "run", "--models", kind, "--tasks", "fpb", "--limit", "2"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"ksg: error: --models {kind}: run has no such model ({stage} has not completed there)", err
    assert main(["eval", "run", "--models", "", "--tasks", "fpb", "--limit", "2"]) == 2  # had scored the default models
    assert "models: List should have at least 1 item" in capsys.readouterr().err
    assert not (workdir / "run/eval").exists()


def test_spec_that_is_not_a_mapping(workdir: Path, capsys):
    (workdir / "spec.yaml").write_text("- just\n- a list\n", encoding="utf-8")
    assert main(["run", "spec.yaml"]) == 2
    assert "a spec is a YAML mapping (key: value), got list" in capsys.readouterr().err


def test_bad_input_on_resume_keeps_earlier_work(workdir: Path, capsys):
    """A run dir that existed before keeps its completed stages; the failed stage leaves nothing."""
    spec = tiny_spec(stages=["prepare_models", "ingest"])
    path = write_spec(workdir, spec)
    assert main(["run", str(path), "--run-dir", "run"]) == 0
    write_jsonl(workdir / "data.jsonl", [*sentiment_rows(5), {"id": "bad", "instruction": "Q"}])
    before = {p: p.read_bytes() for p in (workdir / "run").rglob("*") if p.is_file()}
    assert main(["run", str(path), "--run-dir", "run"]) == 2
    assert "data.jsonl:6: field 'response': missing" in capsys.readouterr().err
    # refused before anything was written: every earlier artifact is untouched (ingest now stale)
    assert {p: p.read_bytes() for p in (workdir / "run").rglob("*") if p.is_file()} == before


REFINE_AFTER_RELEASE = ["prepare_models", "ingest", {"name": "dp_train", "params": {"batch_size": 4, "max_length": 48}},
                        {"name": "synthesize", "params": {"per_client": 4, "labels": ["negative", "neutral", "positive"], "seeds": [{"instruction": "Q?"}]}}]
POOL_CASES = [
    ("refine-pool-is-a-clients-data", [*REFINE_AFTER_RELEASE, {"name": "refine", "params": {"pool": {"path": "data.jsonl"}, "task": "t"}}], None,
     r"^ksg: error: /\S+/spec\.yaml: refine params\.pool: data\.jsonl is also a client's data source; it must be public data$"),
    ("refine-pool-malformed", [*REFINE_AFTER_RELEASE, {"name": "refine", "params": {"pool": {"path": "pool.jsonl"}, "task": "t"}}],
     GOOD + '{"id": "b", "instruction": \n', r"pool\.jsonl:2: malformed JSON"),
    # structure's prompts stay on the client, but its pool's digest (pool_index.json) goes to the server
    ("structure-pool-is-a-clients-data", ["prepare_models", "ingest", {"name": "structure", "params": {"pool": {"path": "./data.jsonl"}, "k": 1}}], None,
     r"^ksg: error: /\S+/spec\.yaml: structure params\.pool: data\.jsonl is also a client's data source; it must be public data$"),
    ("structure-pool-too-small", ["prepare_models", "ingest", {"name": "structure", "params": {"pool": {"path": "pool.jsonl"}, "k": 3}}], GOOD,
     r"^ksg: error: /\S+/spec\.yaml: structure params\.pool: the example pool pool\.jsonl has 1 instruction records, fewer than the 3 needed"),
]


@pytest.mark.parametrize("case_id,stages,pool,pattern", POOL_CASES, ids=[c[0] for c in POOL_CASES])
def test_a_later_stages_bad_pool_is_refused_before_the_run_starts(workdir: Path, capsys, case_id, stages, pool, pattern):
    """Not after dp_train has spent the budget: each stage's pool is checked before anything runs."""
    if pool is not None:
        (workdir / "pool.jsonl").write_text(pool, encoding="utf-8")
    spec = tiny_spec(stages=stages, models={"base": "tiny-random-llama", "professional": "tiny-random-llama", "embedder": "tiny-random-embedder"})
    assert main(["run", str(write_spec(workdir, spec)), "--run-dir", "run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(pattern, err), err
    assert not (workdir / "run").exists()


@pytest.mark.parametrize("where,pattern", [
    (["--run-dir", "afile"], r"^ksg: error: --run-dir afile: exists and is not a directory$"),
    (["--run-dir", "afile/run"], r"^ksg: error: --run-dir afile/run: afile is not a directory$"),
    ([], r"^ksg: error: /\S+/spec\.yaml: models\.cache_dir /\S+/afile/cache: /\S+/afile is not a directory$"),  # relative: from the spec's directory
], ids=["run-dir-is-a-file", "run-dir-under-a-file", "cache-dir-under-a-file"])
def test_a_run_or_cache_directory_that_cannot_be_made_is_one_line(workdir: Path, capsys, where, pattern):
    (workdir / "afile").write_text("keep me")
    spec = tiny_spec(stages=["prepare_models", "ingest"], models={"base": "tiny-random-llama", "cache_dir": "afile/cache"} if not where else {"base": "tiny-random-llama"})
    assert main(["run", str(write_spec(workdir, spec)), *(where or ["--run-dir", "run"])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(pattern, err), err
    assert (workdir / "afile").read_text() == "keep me" and not (workdir / "run").exists()


@pytest.mark.parametrize("content", [b"{", b"{}", b"[1]", b"\xff", b'{"spec": 3, "base_dir": "."}'], ids=["truncated", "empty-object", "list", "not-utf8", "spec-not-object"])
@pytest.mark.parametrize("command", [["status"], ["privacy-report"], ["audit"], ["eval", "--tasks", "fpb"]], ids=lambda c: c[0])
def test_a_damaged_spec_copy_in_a_run_directory_is_one_line(tmp_path: Path, capsys, content, command):
    (tmp_path / "run").mkdir()
    (tmp_path / "run/spec.json").write_bytes(content)
    assert main([command[0], str(tmp_path / "run"), *command[1:]]) == 2
    out, err = capsys.readouterr()
    err = err.strip()
    assert len(err.splitlines()) == 1 and "spec.json: not the run's spec copy" in err, err
    assert out == ""  # no part of a report shown before the refusal


def test_in_a_log_the_error_is_the_only_line(tmp_path: Path):
    """Off a terminal (a log file, a pipe) a progress bar cannot redraw: none is drawn, so a data
    error stays the one line on stderr (a transient bar left a blank line before it)."""
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(5))
    with open(tmp_path / "data.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"id": "b", "instruction": \n')
    spec = write_spec(tmp_path, tiny_spec(stages=["ingest"]))
    result = run_cli("run", str(spec), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and "data.jsonl:6: malformed JSON" in result.stderr, result.stderr


def test_no_private_text_in_error_messages(tmp_path: Path, monkeypatch, capsys):
    """Errors name where the problem is, never the private content around it."""
    monkeypatch.chdir(tmp_path)
    secret = "Patient Jane Roe, SSN 078-05-1120"
    write_jsonl(tmp_path / "data.jsonl", [{"id": "a", "instruction": secret, "response": 7}])
    assert main(["run", str(write_spec(tmp_path, tiny_spec())), "--run-dir", "run"]) == 2
    err = capsys.readouterr().err
    assert "must be a string" in err and secret not in err and "078-05" not in err


def test_a_csv_without_a_header_row_is_not_echoed(tmp_path: Path, monkeypatch, capsys):
    """Its "column names" are its first private record: the error counts them and shows none."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.csv").write_text("JaneRoe,diabetes\nBob,flu\n", encoding="utf-8")
    assert main(["run", str(write_spec(tmp_path, tiny_spec(data=[{"path": "d.csv"}]))), "--run-dir", "run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "d.csv:1: no column 'instruction' in the header: it has 2 columns, their names not shown" in err and "JaneRoe" not in err and "diabetes" not in err
    assert not (tmp_path / "run").exists()


def test_a_damaged_ledger_is_a_one_line_refusal(tmp_path: Path):
    """Never a traceback, never skipped: what was spent cannot be read, so no budget is computed."""
    from knowledgesg.errors import KsgError
    from privacy.ledger import ClientLedger
    from tests.test_accounting import REFERENCE, _entry

    ledger = ClientLedger.of_data(tmp_path, "a" * 64, "bank_a")
    ledger.append(_entry("bank_a", REFERENCE))  # the first entry makes the directory's name key: the file has a keyed name
    assert ledger.path.name.startswith("k-")
    ledger.path.write_bytes(b'{"release_id": "x"\xff}\n')
    with pytest.raises(KsgError, match=rf"{ledger.path.name}: unreadable ledger \(not UTF-8 at byte 18\)"):
        ledger.entries()
    ledger.path.write_text('{"release_id": "x"}\n', encoding="utf-8")
    with pytest.raises(KsgError, match=rf"{ledger.path.name}:1: unreadable ledger entry"):
        ledger.entries()
    # another data set's ledger in the directory is read too (to find the client's): damaged, the same
    # refusal. One an earlier version named by its data's unkeyed fingerprint is named by its inode:
    # its name would confirm a guess of the data to whoever reads the line
    ledger.path.unlink()
    legacy = tmp_path / f"{'b' * 32}.jsonl"
    legacy.write_text("[" * 100000 + "\n", encoding="utf-8")
    with pytest.raises(KsgError, match=rf"<ledger named by an earlier version, inode {legacy.stat().st_ino}: `ls -i` finds it>:1: unreadable ledger entry") as refused:
        ledger.entries()
    assert "b" * 32 not in str(refused.value)


def test_an_unreadable_data_file_is_one_line(tmp_path: Path, monkeypatch, capsys):
    """As a user without read permission sees it (the tests run as root, which reads anything)."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(20))
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "data.jsonl":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert main(["run", str(write_spec(tmp_path, tiny_spec())), "--run-dir", "run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(r"data\.jsonl: cannot be read \(Permission denied\)", err), err
    assert not (tmp_path / "run").exists()


def test_a_damaged_run_file_is_named_in_one_line_and_a_damaged_cache_is_made_again(tmp_path: Path):
    from knowledgesg.errors import KsgError
    from knowledgesg.fileio import read_json, read_jsonl
    from knowledgesg.runner import HashCache

    (tmp_path / "partition.json").write_text('{"clients": {"bank_a": 1', encoding="utf-8")
    (tmp_path / "records.jsonl").write_bytes(b'{"id": "a"}\n{"id": "\xff"}\n')
    with pytest.raises(KsgError, match=r"partition\.json: damaged JSON \(Expecting ',' delimiter\)$"):  # no position: it may fall in a value
        read_json(tmp_path / "partition.json")
    with pytest.raises(KsgError, match=r"records\.jsonl: damaged JSON \(not UTF-8\)$"):
        read_jsonl(tmp_path / "records.jsonl")
    (tmp_path / ".input_hashes.json").write_text("{", encoding="utf-8")
    assert HashCache(tmp_path / ".input_hashes.json").entries == {}


def test_a_blank_user_id_is_no_user_id(tmp_path: Path, monkeypatch, capsys):
    """Not one user called "" holding every such record (cut to the contribution bound): under
    unit: user it is refused like a missing one; the README's `constants: {input: ""}` stays valid."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", [{**row, "user_id": " " if k == 3 else f"u{k % 4}"} for k, row in enumerate(sentiment_rows(12))])
    spec = tiny_spec(data=[{"path": "data.jsonl", "constants": {"input": ""}}], privacy={"target_epsilon": 8.0, "unit": "user"},
                     stages=["prepare_models", "ingest", {"name": "dp_train", "params": {"batch_size": 2}}])
    assert main(["run", str(write_spec(tmp_path, spec)), "--run-dir", "run"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(r"privacy\.unit is 'user' but a record of source 'data' has no user_id", err), err
    assert not (tmp_path / "run").exists()


def test_a_report_directory_that_is_a_file_is_refused_before_scoring(workdir: Path, capsys):
    """Not after every model was scored (minutes), as it was."""
    assert main(["run", str(write_spec(workdir, tiny_spec(stages=["prepare_models", "ingest"]))), "--run-dir", "run"]) == 0
    (workdir / "run/audit").write_text("keep me")
    capsys.readouterr()
    assert main(["audit", "run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ksg: error: run/audit: exists and is not a directory; the report cannot be written there", err
    assert (workdir / "run/audit").read_text() == "keep me"


@pytest.mark.parametrize("flag,value", [("--samples", "-1"), ("--pii-spans", "-1"), ("--candidates", "-5")])
def test_a_bad_audit_option_names_the_flag_typed(tmp_path: Path, capsys, flag, value):
    assert main(["audit", str(tmp_path), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ksg: error: ksg audit: {flag}: ") and f"(got {value})" in err and len(err.splitlines()) == 1, err


def test_a_run_directory_this_process_cannot_write_is_one_line(workdir: Path, monkeypatch, capsys):
    """An existing run directory that is read-only (or another user's) had been a traceback
    (OSError on its .lock, or on the privacy report's temp file after the report was printed).
    The tests run as root, who may write anywhere: os.access is made to say what a user would see."""
    import os

    spec = write_spec(workdir, tiny_spec(stages=["prepare_models", "ingest"], privacy={"count_noise": 2.0}))  # the count: a release to report
    assert main(["run", str(spec), "--run-dir", "run"]) == 0
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path).resolve() == (workdir / "run").resolve() and mode & os.W_OK else real(path, mode, **kw))
    capsys.readouterr()
    listed = sorted(p.name for p in (workdir / "run").iterdir())
    for command, message in ((["run", str(spec), "--run-dir", "run"], "ksg: error: --run-dir run: is not writable"),
                             (["privacy-report", "run"], "ksg: error: run: is not writable; the report cannot be written there")):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert err == message, err
    assert sorted(p.name for p in (workdir / "run").iterdir()) == listed


def test_a_damaged_models_record_is_one_line(workdir: Path, capsys):
    """prepare_models' models.json cut short or edited: `ksg eval` and `ksg audit` had raised a
    JSONDecodeError or TypeError traceback."""
    spec = write_spec(workdir, tiny_spec(stages=["prepare_models", "ingest"]))
    assert main(["run", str(spec), "--run-dir", "run"]) == 0
    models = workdir / "run/stages/prepare_models/models.json"
    for damaged, message in (('{"base": ', r"models\.json: damaged JSON"), ('{"base": 5}', r"models\.json: damaged \(not a model name and path for each role\)")):
        models.write_text(damaged, encoding="utf-8")
        capsys.readouterr()
        assert main(["eval", "run", "--models", "base", "--tasks", "fpb", "--limit", "2"]) == 1
        out, err = capsys.readouterr()
        err = err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err) and out == "", (out, err)


def test_init_reads_the_data_as_run_will(tmp_path: Path, monkeypatch, capsys):
    """Integer labels, or a row without its label, had been refused as 'labels: a label is empty'
    in the spec not yet written (or written, for labels 1, 2, 3, and refused by `ksg check`)."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "ints.jsonl", [{"text": "Shares rose", "label": 0}, {"text": "Profit fell", "label": 1}])
    write_jsonl(tmp_path / "gap.jsonl", [{"text": "Shares rose", "label": "positive"}, {"text": "Profit fell", "label": "negative"}, {"text": "Flat"}])
    for name, message in (("ints", "ints.jsonl:1: field 'label': must be a string, got int (labels given as numbers"), ("gap", "gap.jsonl:3: field 'label': missing")):
        assert main(["init", f"{name}.jsonl", "--out", f"{name}.yaml"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / f"{name}.yaml").exists()
