"""Each party runs its own part: two banks (`--role client`) and the server (`--role server`),
releases crossing through an exchange directory, against the same spec run in one process."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from knowledgesg.cli import main
from knowledgesg.manifest import read_manifest
from tests.conftest import run_in, sentiment_rows, tiny_spec, write_jsonl, write_spec
from tests.test_fedtune import FEDTUNE
from tests.test_refine import REFINE, canned_generate
from tests.test_synthesize import SYNTH, TRAIN

BANKS = ("bank_a", "bank_b")


class OpenedFiles:
    """Every file this process opens while recording (sys.addaudithook cannot be removed, so one
    hook serves the module and records only between start and stop)."""

    def __init__(self) -> None:
        self.paths: list[Path] = []
        self.recording = False
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if self.recording and event == "open" and isinstance(args[0], (str, os.PathLike)):
            self.paths.append(Path(os.fsdecode(args[0])).resolve())

    def run(self, directory: Path, *argv: str) -> tuple[int, list[Path]]:
        start = len(self.paths)
        self.recording = True
        try:
            code = run_in(directory, *argv)
        finally:
            self.recording = False
        return code, self.paths[start:]


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """The same spec run as a simulation and split over three parties, each party with its own
    directory: the banks' data lives only in their own."""
    from knowledgesg.generation import Generator

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(Generator, "generate", canned_generate)
    root = tmp_path_factory.mktemp("roles")
    rows = sentiment_rows(48)
    parties = {name: root / name for name in (*BANKS, "server", "simulation")}
    for directory in parties.values():
        directory.mkdir()
    pool = [dict(r, id=f"pool{i}", input=f"Shares of firm {i} moved after the report.") for i, r in enumerate(sentiment_rows(9))]
    members = [{"id": bank, "data": [{"path": f"{bank}/{bank}.jsonl"}]} for bank in BANKS]  # relative to the spec's directory
    write_jsonl(parties["bank_a"] / "bank_a.jsonl", rows[:24])
    write_jsonl(parties["bank_b"] / "bank_b.jsonl", [dict(r, id=f"b{i}") for i, r in enumerate(rows[24:])])
    synth = dict(SYNTH, params=dict(SYNTH["params"], per_client=6, oversample=1.0, near_duplicate_jaccard=0.9))
    refine = dict(REFINE, params=dict(REFINE["params"], pool={"path": "server/pool.jsonl"}))
    write_jsonl(parties["server"] / "pool.jsonl", pool)
    # reproducible noise (NOT PRIVATE, for this comparison only): the split run must then give
    # the simulation's adapters and data byte for byte, the banks' noised counts included (sigma 3: at
    # 10 this seed's draw leaves bank_a's 24 records a count of 2, below the batch)
    spec = tiny_spec(clients={"members": members}, privacy={"target_epsilon": 8.0, "reproducible_noise": True, "count_noise": 3},
                     stages=["prepare_models", "ingest", TRAIN, synth, refine, {"name": "fedtune", "params": FEDTUNE},
                            {"name": "calibrate", "params": {"labels": ["negative", "neutral", "positive"]}}, "publish"],
                     models={"base": "tiny-random-llama", "professional": "tiny-random-llama", "embedder": "tiny-random-embedder"})
    spec_path = write_spec(root, spec)
    exchange = root / "exchange"
    opened = OpenedFiles()
    try:
        assert run_in(parties["simulation"], "run", str(spec_path), "--run-dir", "run") == 0
        reads = {}
        for bank in BANKS:
            code, reads[bank] = opened.run(parties[bank], "run", str(spec_path), "--run-dir", "run", "--role", "client", "--client", bank, "--exchange", str(exchange))
            assert code == 0
        code, reads["server"] = opened.run(parties["server"], "run", str(spec_path), "--run-dir", "run", "--role", "server", "--exchange", str(exchange))
        assert code == 0
    finally:
        monkeypatch.undo()
    return {"parties": parties, "reads": reads, "exchange": exchange, "spec": spec_path, "opened": opened}


def _entries(path: Path) -> list[dict]:
    """Ledger entries without what differs between two runs of the same release (its id, time and run)."""
    rows = json.loads(path.read_text())
    return [{k: v for k, v in row.items() if k not in ("release_id", "released_at", "run_dir")} for row in rows]


def test_the_split_run_gives_the_simulations_releases_and_data(federation):
    simulation, server = federation["parties"]["simulation"] / "run", federation["parties"]["server"] / "run"
    for bank in BANKS:
        for relative in (f"dp_train/clients/{bank}/adapter/adapter_model.safetensors", f"synthesize/clients/{bank}/synthetic.jsonl", f"refine/clients/{bank}/refined.jsonl"):
            assert (server / "stages" / relative).read_bytes() == (simulation / "stages" / relative).read_bytes(), relative
    # the server alone fits the final adapter's label prior (no bank's file opened: test_no_party_opens_another_partys_data)
    for final in ("fedtune/adapter/adapter_model.safetensors", "calibrate/label_prior.json", "publish/final_adapter/label_prior.json"):
        assert (server / "stages" / final).read_bytes() == (simulation / "stages" / final).read_bytes(), final
    assert _entries(server / "stages/dp_train/ledger.json") == _entries(simulation / "stages/dp_train/ledger.json")
    partition = json.loads((server / "stages/ingest/partition.json").read_text())
    assert partition == json.loads((simulation / "stages/ingest/partition.json").read_text()) and set(partition["count"]["noise_multipliers"]) == set(BANKS)
    counts = [sorted(_entries(run / "stages/ingest/ledger.json"), key=lambda e: e["client_id"]) for run in (server, simulation)]
    assert counts[0] == counts[1] and [e["client_id"] for e in counts[0]] == sorted(BANKS)  # each bank's count, merged
    manifest = read_manifest(server / "stages/dp_train")
    assert set(manifest.received) == set(BANKS)


def test_no_party_opens_another_partys_data(federation):
    parties, reads = federation["parties"], federation["reads"]
    for bank in BANKS:
        others = [parties[other].resolve() for other in parties if other != bank]
        foreign = [p for p in reads[bank] if any(p.is_relative_to(directory) for directory in others)]
        assert not foreign, f"{bank} opened {foreign[:3]}"
        assert any(p.name == f"{bank}.jsonl" for p in reads[bank])  # the hook does see its reads
    server_reads = reads["server"]
    assert not [p for p in server_reads if any(p.is_relative_to(parties[bank].resolve()) for bank in BANKS)]
    assert any(p.is_relative_to(federation["exchange"].resolve()) for p in server_reads)  # the hook does see its reads


def test_the_server_holds_only_releases(federation):
    server = federation["parties"]["server"] / "run"
    for stage_dir in sorted((server / "stages").iterdir()):
        manifest = read_manifest(stage_dir)
        assert all(entry.side == "server" for entry in manifest.outputs.values()), stage_dir.name
        on_disk = {str(p.relative_to(stage_dir)) for p in stage_dir.rglob("*") if p.is_file()} - {"manifest.json", ".started_with"}
        assert on_disk <= set(manifest.outputs), f"{stage_dir.name}: files no manifest declares: {sorted(on_disk - set(manifest.outputs))[:3]}"
    names = {p.name for p in server.rglob("*")}
    assert not names & {"records.jsonl", "holdout.jsonl", "canaries.json", "loss.json", "ledger_key.json", "stats.json"}
    # both sides show what crossed: the client's own ledger, and the server's copy of it
    for bank in BANKS:
        copy = [json.loads(line) for line in (server / "received" / f"{bank}.jsonl").read_text().splitlines()]
        own = [json.loads(line) for line in next((federation["parties"][bank] / "run/ledger").glob("*.jsonl")).read_text().splitlines()]
        assert {e["run_dir"] for e in copy} == {f"client:{bank}"}  # the bank's paths stay with it
        assert [dict(e, run_dir="", released_at="") for e in copy] == [dict(e, run_dir="", released_at="") for e in own]
        assert {e["release"] for e in copy} == {"noised_unit_count", "dp_adapter"}
        # no stage's running time crosses, nor the start and end that give it by subtraction (dp_train's follows the
        # sampled records' lengths): every manifest the bank sent is stamped with the moment its part was sent
        sent = [read_manifest(d) for d in sorted((federation["exchange"] / bank).iterdir()) if d.is_dir()]
        kept = {m.stage: m for m in (read_manifest(d) for d in (federation["parties"][bank] / "run/stages").iterdir() if (d / "manifest.json").is_file())}
        assert {m.stage for m in sent} >= {"ingest", "dp_train"} and len({(m.started_at, m.finished_at) for m in sent}) == 1
        assert all(m.duration_s == 0 and m.peak_rss_mib is None and m.started_at == m.finished_at for m in sent)
        # nor when each release was made (the count's time to the adapter's is how long dp_train ran): its day only
        assert [e["released_at"] for e in copy] == [e["released_at"][:10] + "T00:00:00+00:00" for e in own]
        assert kept["dp_train"].duration_s > 0  # the bank's own manifest keeps its times
        # nor where the bank keeps its runs (a path names its machine's user, its projects)
        home = str(federation["parties"][bank].resolve())
        assert not [p for p in (federation["exchange"] / bank).rglob("*") if p.is_file() and home in p.read_text(errors="replace")]
        # nor where its model cache is: PEFT names the base model by the directory it was loaded from
        configs = [json.loads(p.read_text()) for p in (federation["exchange"] / bank).rglob("adapter_config.json")]
        assert configs and {c["base_model_name_or_path"] for c in configs} == {"tiny-random-llama"}
        cache = os.environ["KSG_CACHE_DIR"]
        assert not [p for p in (federation["exchange"] / bank).rglob("*") if p.is_file() and cache in p.read_text(errors="replace")]
    assert not [p for p in server.rglob("*") if p.is_file() and any(str(federation["parties"][b].resolve()) in p.read_text(errors="replace") for b in BANKS)]


def test_a_rerun_receives_nothing_new_and_a_tampered_release_is_refused(federation):
    parties, exchange, spec = federation["parties"], federation["exchange"], str(federation["spec"])
    assert run_in(parties["server"], "run", spec, "--run-dir", "run", "--role", "server", "--exchange", str(exchange)) == 0
    events = [json.loads(line) for line in (parties["server"] / "run/events.jsonl").read_text().splitlines()]
    assert [e["status"] for e in events[-7:]] == ["cached"] * 7
    # a received file torn or edited on the server since is received again, not trusted as it is
    received = parties["server"] / "run/stages/dp_train/clients/bank_a/adapter/adapter_model.safetensors"
    original = received.read_bytes()
    received.write_bytes(original[:-8])
    assert run_in(parties["server"], "run", spec, "--run-dir", "run", "--role", "server", "--exchange", str(exchange)) == 0
    assert received.read_bytes() == original
    tampered = exchange.parent / "tampered"
    shutil.copytree(exchange, tampered)
    adapter = tampered / "bank_a/dp_train/clients/bank_a/adapter/adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-8] + b"\0" * 8)
    from knowledgesg.errors import KsgError
    from knowledgesg.exchange import receive_stage

    params = json.loads((exchange / "bank_a/dp_train/manifest.json").read_text())["params"]
    with pytest.raises(KsgError, match="does not match the manifest it sent"):
        receive_stage(tampered.parent / "t-run", tampered, "dp_train", list(BANKS), params, 7)
    # the clients must have run the stage as the server's spec says
    with pytest.raises(KsgError, match="other parameters or seed"):
        receive_stage(tampered.parent / "t-run", exchange, "dp_train", list(BANKS), dict(params, epochs=99), 7)
    # a client speaks about itself only: a ledger entry in another client's name is refused
    shutil.rmtree(tampered)
    shutil.copytree(exchange, tampered)
    ledger_path = tampered / "bank_a/dp_train/ledger.json"
    entries = json.loads(ledger_path.read_text())
    ledger_path.write_text(json.dumps(entries + [dict(entries[0], client_id="bank_b", release_id="forged")]))
    manifest_path = tampered / "bank_a/dp_train/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["outputs"]["ledger.json"]["sha256"] = __import__("hashlib").sha256(ledger_path.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(KsgError, match="speaks about other clients"):
        receive_stage(tampered.parent / "t-run", tampered, "dp_train", list(BANKS), params, 7)
    # a client may send only under its own clients/<id>/
    shutil.rmtree(tampered)
    shutil.copytree(exchange, tampered)
    (tampered / "bank_a/dp_train/clients/bank_b").mkdir(parents=True)
    manifest = json.loads((tampered / "bank_a/dp_train/manifest.json").read_text())
    manifest["outputs"]["clients/bank_b/x.json"] = manifest["outputs"]["ledger.json"]
    shutil.copyfile(tampered / "bank_a/dp_train/ledger.json", tampered / "bank_a/dp_train/clients/bank_b/x.json")
    (tampered / "bank_a/dp_train/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KsgError, match="outside clients/bank_a/"):
        receive_stage(tmp := tampered.parent / "t-run", tampered, "dp_train", list(BANKS), params, 7)
    assert not (tmp / "stages/dp_train").exists() and not list(tmp.rglob("*.tmp"))  # nothing half-received
    # a link out of the client's part of the exchange is refused, not followed
    shutil.rmtree(tampered)
    shutil.copytree(exchange, tampered)
    adapter = tampered / "bank_a/dp_train/clients/bank_a/adapter/adapter_model.safetensors"
    elsewhere = tampered.parent / "elsewhere.bin"
    shutil.copyfile(adapter, elsewhere)
    adapter.unlink()
    adapter.symlink_to(elsewhere)
    with pytest.raises(KsgError, match="a link out of its part"):
        receive_stage(tmp, tampered, "dp_train", list(BANKS), params, 7)
    # a manifest that carries warnings is refused: free text a client's stage may not write (StageContext.warn), and export strips them
    assert json.loads((exchange / "bank_a/dp_train/manifest.json").read_text())["warnings"] == []
    shutil.rmtree(tampered)
    shutil.copytree(exchange, tampered)
    manifest_path = tampered / "bank_a/dp_train/manifest.json"
    manifest_path.write_text(json.dumps(dict(json.loads(manifest_path.read_text()), warnings=["bank_a's records mention Acme"])))
    with pytest.raises(KsgError, match="carries warnings"):
        receive_stage(tmp, tampered, "dp_train", list(BANKS), params, 7)
    # files of the wrong shape are one-line input errors naming the client, file, line and field, not a traceback
    from knowledgesg.errors import InputError
    from knowledgesg.exchange import receive_ledgers

    for body, expected in ((b"{not json", r"its dp_train/ledger\.json is not JSON"), (b'{"clients": []}', r"its dp_train/ledger\.json should be a list of ledger entries")):
        shutil.rmtree(tampered)
        shutil.copytree(exchange, tampered)
        ledger_path.write_bytes(body)
        manifest = json.loads(manifest_path.read_text())
        manifest["outputs"]["ledger.json"]["sha256"] = __import__("hashlib").sha256(body).hexdigest()
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(InputError, match=expected):
            receive_stage(tmp, tampered, "dp_train", list(BANKS), params, 7)
        assert not (tmp / "stages/dp_train").exists() and not list(tmp.rglob("*.tmp"))
    sent = tampered / "bank_a/ledger.jsonl"
    lines = sent.read_text().splitlines()
    sent.write_text("\n".join([lines[0], json.dumps(dict(json.loads(lines[0]), epsilon="eight"))]) + "\n")
    with pytest.raises(InputError, match=r"client 'bank_a': its ledger\.jsonl, line 2: epsilon: "):
        receive_ledgers(tmp, tampered, list(BANKS))
    assert not (tmp / "received").exists()  # no entry taken from a ledger with a bad line


def test_a_bank_evaluates_the_servers_published_releases_on_its_own_side(federation, capsys):
    """bank_a copies the server's publish directory to its machine and runs `ksg eval --published`
    on its own run: the final adapter is scored on its private test set, and the synthetic data
    made from its DP adapter is measured against its private records, there. The figures equal the
    simulation's, and the bank opens no file of another party."""
    parties = federation["parties"]
    bank, simulation = parties["bank_a"], parties["simulation"]
    shutil.copytree(parties["server"] / "run/stages/publish", bank / "published")
    for directory in (bank, simulation):
        write_jsonl(directory / "private_test.jsonl", sentiment_rows(5))
    options = ["--private", "bank_a=private_test.jsonl", "--tasks", "fpb", "--limit", "4", "--modes", "logprob"]
    code, reads = federation["opened"].run(bank, "eval", "run", *options, "--published", "published")
    assert code == 0
    assert run_in(simulation, "eval", "run", *options) == 0
    mine, simulated = (json.loads((d / "run/eval/clients/bank_a/private_eval.json").read_text()) for d in (bank, simulation))
    assert set(mine["models"]) == {"base", "dp_adapter:bank_a", "final"} and mine == simulated
    mine, simulated = (json.loads((d / "run/eval/clients/bank_a/fidelity.json").read_text()) for d in (bank, simulation))
    assert "skipped" not in mine and mine == simulated
    others = [parties[p].resolve() for p in parties if p != "bank_a"]
    assert not [p for p in reads if any(p.is_relative_to(d) for d in others)]
    # mistakes are one line, exit 2, before any model loads: the server's own run (it has its final adapter), a torn copy
    capsys.readouterr()
    assert run_in(parties["server"], "eval", "run", "--published", "run/stages/publish", "--tasks", "fpb", "--limit", "2") == 2
    assert "--published is for a client's run" in capsys.readouterr().err
    shutil.copytree(bank / "published", bank / "torn")
    (bank / "torn/synthetic_data/dataset_info.json").unlink()
    assert run_in(bank, "eval", "run", "--published", "torn", "--tasks", "fpb", "--limit", "2") == 2
    assert "torn/synthetic_data/dataset_info.json: not found" in capsys.readouterr().err


def test_role_mistakes_are_one_line_errors(federation, tmp_path, capsys):
    spec, exchange = str(federation["spec"]), str(federation["exchange"])
    assert run_in(tmp_path, "run", spec, "--role", "client", "--exchange", exchange) == 2
    assert "--client ID" in capsys.readouterr().err
    assert run_in(tmp_path, "run", spec, "--role", "client", "--client", "bank_z", "--exchange", exchange) == 2
    assert "no member 'bank_z'" in capsys.readouterr().err
    assert run_in(tmp_path, "run", spec, "--role", "server") == 2
    assert "--exchange" in capsys.readouterr().err
    assert run_in(tmp_path, "run", spec, "--exchange", exchange) == 2  # not silently ignored
    assert "--exchange goes with --role client or --role server" in capsys.readouterr().err
    # the server before every client has sent: it says whom it waits for, and writes no stage
    assert run_in(tmp_path, "run", spec, "--run-dir", "early", "--role", "server", "--exchange", str(tmp_path / "empty")) == 1
    assert "waiting for client 'bank_a'" in capsys.readouterr().err
    assert not (tmp_path / "early/stages/ingest").exists()
    pooled = write_spec(tmp_path, tiny_spec())
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(8))
    assert run_in(tmp_path, "run", str(pooled), "--role", "server", "--exchange", exchange) == 2
    assert "needs clients given as 'members'" in capsys.readouterr().err
    # another party's run directory: the server's received stages would have replaced bank_a's own
    bank_a = federation["parties"]["bank_a"]
    adapter = (bank_a / "run/stages/dp_train/clients/bank_a/adapter/adapter_model.safetensors").read_bytes()
    for role in (["--role", "server"], ["--role", "client", "--client", "bank_b"], []):
        assert run_in(bank_a, "run", spec, "--run-dir", "run", *role, *(["--exchange", exchange] if role else [])) == 2
        assert "one run directory holds one party's part" in capsys.readouterr().err
    assert (bank_a / "run/stages/dp_train/clients/bank_a/adapter/adapter_model.safetensors").read_bytes() == adapter
    assert json.loads((bank_a / "run/spec.json").read_text())["role"]["client"] == "bank_a"


def test_the_server_drives_the_client_stages_over_flower(federation, tmp_path):
    """`federation: {transport: flower}`: the server starts a SuperLink and one SuperNode per bank
    (launch: local, TLS, registered node keys); each node runs its bank's stages in its own run
    directory and sends back its releases; the server's result is the simulation's. Once it has
    published, the server delivers the releases to every node, which keeps them and measures the
    synthetic data against its own records there: the figures equal the simulation's and never
    reach the server."""
    import yaml

    from knowledgesg.generation import Generator

    spec = yaml.safe_load(federation["spec"].read_text())
    spec["federation"] = {"transport": "flower", "deploy": {"launch": "local", "timeout_s": 600}}
    path = write_spec(federation["spec"].parent, spec, "flower.yaml")
    server, simulation = federation["parties"]["server"], federation["parties"]["simulation"] / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(Generator, "generate", canned_generate)
        assert run_in(server, "run", str(path), "--run-dir", "flower-run", "--role", "server", "--exchange", str(tmp_path / "exchange")) == 0
    for relative in ("dp_train/clients/bank_a/adapter/adapter_model.safetensors", "refine/clients/bank_b/refined.jsonl", "fedtune/adapter/adapter_model.safetensors"):
        assert (server / "flower-run/stages" / relative).read_bytes() == (simulation / "stages" / relative).read_bytes(), relative
    for bank in BANKS:
        node_run = server / "flower-run.federation/nodes" / bank / "run"
        assert (node_run / "stages/ingest/clients" / bank / "records.jsonl").is_file()  # the private records stay in the node's run
        sent = {p.name for p in (tmp_path / "exchange" / bank).rglob("*")}
        assert "adapter_model.safetensors" in sent and not sent & {"records.jsonl", "loss.json", "ledger_key.json"}
    assert not list((server / "flower-run").rglob("records.jsonl"))

    from eval.evaluate import fidelity_run

    delivery = json.loads((server / "flower-run.federation/delivery.json").read_text())
    assert sorted(delivery["kept"]) == list(BANKS) and not delivery["failed"] and set(delivery) == {"kept", "failed", "files"}
    expected = fidelity_run(simulation, 0, "cpu")
    for bank in BANKS:
        node_run = server / "flower-run.federation/nodes" / bank / "run"
        for relative in ("final_adapter/adapter_model.safetensors", "synthetic_data/dataset_info.json"):
            assert (node_run.with_name("run.published") / relative).read_bytes() == (server / "flower-run/stages/publish" / relative).read_bytes()
        fidelity = json.loads((node_run / f"eval/clients/{bank}/fidelity.json").read_text())
        assert "skipped" not in fidelity and fidelity == json.loads(json.dumps(expected[bank]))
        assert json.loads((node_run / "eval/sides.json").read_text()) == {f"clients/{bank}/fidelity.json": f"client:{bank}"}
    assert not [p for p in server.rglob("fidelity.json") if "nodes" not in p.parts]  # the figures stay on the nodes


def test_the_audit_of_a_server_run_is_refused_in_one_line(federation, capsys):
    """The server holds no client's records: the audit had loaded the base model, then stopped on a
    missing client file with a traceback (exit 1)."""
    server = federation["parties"]["server"] / "run"
    capsys.readouterr()
    assert main(["audit", str(server)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and f"ksg audit: {server} was made by the server of a split run" in err[0], err
    assert not (server / "audit").exists()


def test_the_servers_privacy_report_knows_the_releases_it_received(federation, capsys):
    """An entry as sent gives its day only, before the server stage's start: every release had read
    "released by another run (client:bank_a)" in the server's report."""
    server = federation["parties"]["server"] / "run"
    assert main(["privacy-report", str(server)]) == 0
    report = json.loads((server / "privacy_report.json").read_text())
    for client in report["clients"]:
        adapter = next(row for row in client["releases"] if row["entry"]["release"] == "dp_adapter")
        assert adapter["status"] == "this run, current", (client["client_id"], adapter["status"])
