"""A client's N leaves it only as a noised count, drawn once per data set and planned with everywhere.

The draw is replaced here by N + 3 (counting its calls), so that any figure still made from the
true N shows up as a 20 where 23 is planned; the attack on every server-side file, with the real
draw, is in test_privacy_threats (section 13)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

import pipelines.ingest
from knowledgesg.cli import main
from knowledgesg.fileio import read_json
from pipelines import load_pipeline
from pipelines.check import plan_privacy
from privacy.accounting import Mechanism
from privacy.count import count_mechanism, is_count_of
from privacy.ledger import ClientLedger, LedgerEntry, compose
from tests.conftest import run_in, sentiment_rows, tiny_spec, write_jsonl, write_spec

TRAIN = {"name": "dp_train", "params": {"batch_size": 4, "max_length": 48, "epochs": 1.0, "optimizer": "sgd", "learning_rate": 0.01}}
NOISED = {"target_epsilon": 8.0, "count_noise": 10, "ledger_dir": "ledger"}


class PlusThree:
    """The count's draw as N + 3, with the true N of each call kept."""

    def __init__(self, shift: int = 3) -> None:
        self.shift, self.drawn = shift, []

    def __call__(self, n: int, sigma: float, random) -> int:
        self.drawn.append(n)
        return n + self.shift


@pytest.fixture
def draw(monkeypatch) -> PlusThree:
    patched = PlusThree()
    monkeypatch.setattr(pipelines.ingest, "noised_count", patched)
    return patched


def spec_path(workdir: Path, stages: list, privacy: dict | None = None, name: str = "spec.yaml") -> Path:
    write_jsonl(workdir / "data.jsonl", sentiment_rows(40))
    return write_spec(workdir, tiny_spec(stages=stages, privacy=privacy or NOISED), name)


def ledger_lines(workdir: Path) -> list[dict]:
    return [json.loads(line) for path in sorted((workdir / "ledger").glob("*.jsonl")) for line in path.read_text().splitlines()]


def test_the_count_is_drawn_once_per_data_set_planned_with_and_reused(tmp_path: Path, draw: PlusThree, capsys):
    path = spec_path(tmp_path, ["prepare_models", "ingest", TRAIN])
    assert run_in(tmp_path, "run", str(path), "--run-dir", "a") == 0
    assert draw.drawn == [20, 20]
    partition = read_json(tmp_path / "a/stages/ingest/partition.json")
    assert partition["clients"] == {"client_0": 23, "client_1": 23} and partition["count"]["noise_multipliers"] == {"client_0": 10.0, "client_1": 10.0}
    for client in ("client_0", "client_1"):
        statement = read_json(tmp_path / f"a/stages/dp_train/clients/{client}/privacy.json")
        assert statement["num_units"] == 23 and statement["mechanism"]["sample_rate"] == pytest.approx(4 / 23) and statement["mechanism"]["steps"] == 6
        assert statement["n_times_delta"] == pytest.approx(23 * statement["delta"]) and statement["count"] == {"noised": True, "noise_multiplier": 10.0}
        assert any("noised count" in a for a in statement["assumptions"]) and not any("treated as public" in a for a in statement["assumptions"])
        stats = read_json(tmp_path / f"a/stages/ingest/clients/{client}/stats.json")  # client side: the true N beside what was released
        assert stats["units"]["count"] == 20 and stats["units"]["released"] == stats["units"]["planned"] == 23
    counts = [e for e in ledger_lines(tmp_path) if e["stage"] == "ingest"]
    assert sorted((e["client_id"], e["release"], e["num_units"], e["unit"], e["private"]) for e in counts) == [
        (c, "noised_unit_count", 23, "record", True) for c in ("client_0", "client_1")]
    assert all(e["mechanism"] == {"kind": "gaussian", "noise_multiplier": 10.0, "sample_rate": None, "steps": 1} for e in counts)
    copies = read_json(tmp_path / "a/stages/ingest/ledger.json")  # the server's copy
    assert sorted(e["release_id"] for e in copies) == sorted(e["release_id"] for e in counts)
    # the console (a log the server may hold) states the count, never N
    assert set(re.findall(r"\bN = (\d+)", "".join(capsys.readouterr()))) == {"23"}

    shutil.rmtree(tmp_path / "a/stages/ingest")  # ingest again, in the same run and in another: the count is reused
    assert run_in(tmp_path, "run", str(path), "--run-dir", "a") == 0
    assert run_in(tmp_path, "run", str(path), "--run-dir", "b") == 0
    assert draw.drawn == [20, 20]
    assert read_json(tmp_path / "b/stages/ingest/partition.json") == partition
    assert len([e for e in ledger_lines(tmp_path) if e["stage"] == "ingest"]) == 2
    # the client's total composes the count with its adapters
    assert main(["privacy-report", str(tmp_path / "b")]) == 0
    report = read_json(tmp_path / "b/privacy_report.json")["clients"][0]
    releases = [r["entry"] for r in report["releases"]]
    assert [e["release"] for e in releases] == ["noised_unit_count", "dp_adapter", "dp_adapter"]
    # the count b reused and a's adapter are a's releases, though b's ingest ledger.json holds the count too
    assert [r["status"].split(" (")[0] for r in report["releases"]] == ["released by another run", "released by another run", "this run, current"]
    mechanisms = [Mechanism.model_validate(e["mechanism"]) for e in releases]
    assert report["total"]["pld"] == pytest.approx(compose(mechanisms, report["delta"]).pld, rel=1e-6)
    assert report["total"]["pld"] > compose(mechanisms[1:], report["delta"]).pld
    assert report["count_noise"] == 10.0


def test_ksg_check_plans_the_count_before_ingest_and_finds_it_after(tmp_path: Path, draw: PlusThree):
    path = spec_path(tmp_path, ["prepare_models", "ingest", TRAIN])
    spec, base_dir, stages = load_pipeline(path)
    before = {c.client_id: c for c in plan_privacy(spec, base_dir, stages, tmp_path / "run")}
    check = before["client_0"]
    assert check.count == "to be released (sigma 10)" and check.units == 20  # the owner's own console: its exact N, until the count exists
    dp = Mechanism(kind="poisson_gaussian", noise_multiplier=check.noise_multiplier, sample_rate=check.sample_rate, steps=check.steps)
    assert check.planned_epsilon == pytest.approx(compose([dp, count_mechanism(10)], check.delta).reported, rel=1e-6)
    assert check.planned_epsilon > compose([dp], check.delta).reported
    assert run_in(tmp_path, "run", str(spec_path(tmp_path, ["prepare_models", "ingest"], name="ingest.yaml")), "--run-dir", "run") == 0
    after = {c.client_id: c for c in plan_privacy(spec, base_dir, stages, tmp_path / "run")}["client_0"]
    assert after.count == "released" and after.units == 23 and after.sample_rate == pytest.approx(4 / 23) and after.releases_before == 1
    dp = Mechanism(kind="poisson_gaussian", noise_multiplier=after.noise_multiplier, sample_rate=after.sample_rate, steps=after.steps)
    assert after.planned_epsilon == pytest.approx(compose([dp], after.delta).reported, rel=1e-6)  # the count is spent, not planned again


def test_a_released_count_not_above_the_batch_refuses_dp_train_and_is_kept(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(pipelines.ingest, "noised_count", PlusThree(shift=-17))  # 20 -> 3, below the batch of 4
    path = spec_path(tmp_path, ["prepare_models", "ingest", TRAIN])
    capsys.readouterr()
    assert run_in(tmp_path, "run", str(path), "--run-dir", "run") == 2
    err = capsys.readouterr().err
    assert re.search(rf"{re.escape(str(path))}: dp_train params\.batch_size: 4, not below N = 3, planned from the released count of records of client '[^']+'", err), err
    assert not (tmp_path / "run/stages/dp_train/manifest.json").exists()
    counts = [e for e in ledger_lines(tmp_path) if e["stage"] == "ingest"]
    assert len(counts) == 2  # released, so kept: a rerun reuses it rather than drawing until one fits
    monkeypatch.setattr(pipelines.ingest, "noised_count", PlusThree())
    shutil.rmtree(tmp_path / "run/stages/ingest")
    assert run_in(tmp_path, "run", str(path), "--run-dir", "run") == 2
    assert [e["release_id"] for e in ledger_lines(tmp_path) if e["stage"] == "ingest"] == [e["release_id"] for e in counts]


def test_the_audit_holdout_and_canaries_move_the_planned_size_by_public_amounts(tmp_path: Path, draw: PlusThree):
    audit = {"holdout_per_client": 5, "canaries": {"client": "client_0", "count": 8, "repeats": 2, "kinds": ["digits"]}}
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    path = write_spec(tmp_path, tiny_spec(stages=["prepare_models", "ingest"], privacy=NOISED, audit=audit))
    assert run_in(tmp_path, "run", str(path), "--run-dir", "run") == 0
    assert draw.drawn == [20, 20]  # the data as loaded, whatever the audit takes out or plants
    canaries = read_json(tmp_path / "run/stages/ingest/clients/client_0/canaries.json")["canaries"]
    assert 0 < sum(c["included"] for c in canaries) < 8  # some planted, some not: the case is exercised
    # every canary, planted or not, is planned: q and the steps are the same whichever (and however
    # many) are in, as the one-run audit's theorem needs; they had counted the planted ones
    assert read_json(tmp_path / "run/stages/ingest/partition.json")["clients"] == {"client_0": 23 - 5 + 8 * 2, "client_1": 23 - 5}


def test_a_public_n_counts_every_canary_too(tmp_path: Path):
    """With `count_noise: 0` N is counted from the records trained on, among them the planted
    canaries: q and the steps are planned with every canary, as for a noised count."""
    audit = {"canaries": {"client": "client_0", "count": 8, "repeats": 2, "kinds": ["digits"]}}
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    path = write_spec(tmp_path, tiny_spec(stages=["prepare_models", "ingest", TRAIN], privacy={"target_epsilon": 8.0, "count_noise": 0, "ledger_dir": "ledger"}, audit=audit))
    spec, base_dir, stages = load_pipeline(path)
    checked = {c.client_id: c.units for c in plan_privacy(spec, base_dir, stages, tmp_path / "run")}
    assert run_in(tmp_path, "run", str(path), "--run-dir", "run") == 0
    canaries = read_json(tmp_path / "run/stages/ingest/clients/client_0/canaries.json")["canaries"]
    planted = sum(c["included"] for c in canaries)
    assert 0 < planted < 8  # some planted, some not: the case is exercised
    trained = {e["client_id"]: e for e in read_json(tmp_path / "run/stages/dp_train/ledger.json")}
    assert trained["client_0"]["num_units"] == 20 + 8 * 2 and trained["client_1"]["num_units"] == 20  # had been 20 + planted * 2
    assert trained["client_0"]["mechanism"]["sample_rate"] == pytest.approx(4 / 36)
    assert checked == {"client_0": 36, "client_1": 20}  # `ksg check` plans as the run does


def test_dp_fedavg_with_a_public_n_counts_every_canary_too(tmp_path: Path):
    """The same for federated DP-SGD on the private data: the server plans each round with the size
    ingest lists, and the client checks it against its own units and unplanted canaries."""
    audit = {"canaries": {"client": "client_0", "count": 8, "repeats": 2, "kinds": ["digits"]}}
    fedtune = {"name": "fedtune", "params": {"data": "private", "rounds": 1, "local_dp": {"target_epsilon": 4.0}, "training": {"steps": 2, "batch_size": 4, "max_length": 48}, "lora": {"r": 4}}}
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    path = write_spec(tmp_path, tiny_spec(stages=["prepare_models", "ingest", fedtune], privacy={"target_epsilon": 8.0, "count_noise": 0, "ledger_dir": "ledger"}, audit=audit))
    assert run_in(tmp_path, "run", str(path), "--run-dir", "run") == 0
    assert 0 < sum(c["included"] for c in read_json(tmp_path / "run/stages/ingest/clients/client_0/canaries.json")["canaries"]) < 8
    assert read_json(tmp_path / "run/stages/ingest/partition.json")["clients"] == {"client_0": 36, "client_1": 20}
    rounds = {e["client_id"]: e for e in read_json(tmp_path / "run/stages/fedtune/ledger.json")}
    assert rounds["client_0"]["num_units"] == 36 and rounds["client_0"]["mechanism"]["sample_rate"] == pytest.approx(4 / 36)


def test_fedtune_on_private_data_plans_from_the_released_count(tmp_path: Path, draw: PlusThree):
    from tests.test_fedtune import FEDTUNE, run_pipeline

    assert run_pipeline(tmp_path, dict(FEDTUNE, data="private", local_dp={"target_epsilon": 2.0}), privacy={"count_noise": 10}) == 0
    ledger = read_json(tmp_path / "run/stages/fedtune/ledger.json")
    assert ledger and all(e["num_units"] == 23 and e["mechanism"]["sample_rate"] == pytest.approx(4 / 23) for e in ledger)


def test_a_client_refuses_a_plan_made_from_another_count_than_it_released(tmp_path: Path):
    from knowledgesg.errors import KsgError
    from knowledgesg.federated.client import ClientRuntime
    from knowledgesg.federated.protocol import LocalDP
    from knowledgesg.records import InstructionRecord

    stats = tmp_path / "stages/ingest/clients/bank/stats.json"
    stats.parent.mkdir(parents=True)
    stats.write_text(json.dumps({"records": 20, "units": {"unit": "record", "count": 20, "released": 23, "planned": 23}}))
    task = type("Task", (), {"client_id": "bank", "run_dir": str(tmp_path),
                             "local_dp": LocalDP(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.2, num_units=20, delta=1e-5)})()
    records = [InstructionRecord(id=f"r{i}", source="d", instruction="Classify.", response="positive") for i in range(20)]
    with pytest.raises(KsgError, match="the plan assumed 20 privacy units, this client released 23"):
        ClientRuntime()._privacy_units(task, records)
    task.local_dp = task.local_dp.model_copy(update={"num_units": 23})
    assert ClientRuntime()._privacy_units(task, records).count == 20  # the count it released: trains on its 20 actual units


def test_a_client_takes_its_privacy_unit_from_its_own_spec_not_the_servers_plan(tmp_path: Path):
    """Whether a client's records form source-document units is its spec's to say: a server's task
    saying otherwise (records where the owner's spec maps document_id) is refused, never obeyed."""
    from knowledgesg.errors import KsgError
    from knowledgesg.federated.client import ClientRuntime, NodeSettings
    from knowledgesg.federated.protocol import ClientTask, LocalDP
    from knowledgesg.records import InstructionRecord

    spec = tiny_spec(clients={"members": [{"id": "bank", "data": [{"path": "data.jsonl", "fields": {"document_id": "doc"}}]}]})
    (tmp_path / "spec.json").write_text(json.dumps({"spec": spec, "base_dir": str(tmp_path), "role": {"kind": "client", "client": "bank"}}))
    task = type("Task", (), {"client_id": "bank", "run_dir": str(tmp_path),
                             "local_dp": LocalDP(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.2, num_units=10, delta=1e-5, documents=False)})()
    records = [InstructionRecord(id=f"r{i}", source="d", instruction="Classify.", response="positive", document_id=f"d{i // 2}") for i in range(20)]
    with pytest.raises(KsgError, match=r"the server's plan counts privacy per record, the run in .* per source document: refused"):
        ClientRuntime()._privacy_units(task, records)
    agreeing = task.local_dp.model_copy(update={"documents": True})
    task.local_dp = agreeing
    units = ClientRuntime()._privacy_units(task, records)
    assert units.kind == "source_document" and units.count == 10

    # a data owner's node whose storage holds no spec copy: its node config's own spec decides, not the task
    (tmp_path / "spec.json").unlink()
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(spec))
    node = NodeSettings.of({"run-dir": str(tmp_path), "spec": str(tmp_path / "node.yaml"), "client-id": "bank"})
    planned = LocalDP(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.2, num_units=20, delta=1e-5, documents=False)
    with pytest.raises(KsgError, match="the server's plan counts privacy per record, this node's spec per source document: refused"):
        node.govern(ClientTask.model_construct(client_id="bank", local_dp=planned, reproducible_coins=False))
    assert node.govern(ClientTask.model_construct(client_id="bank", local_dp=agreeing, reproducible_coins=False)).local_dp.documents
    with pytest.raises(KsgError, match="not a client of this node's spec"):
        NodeSettings.of({"run-dir": str(tmp_path), "spec": str(tmp_path / "node.yaml")}).govern(
            ClientTask.model_construct(client_id="other", local_dp=agreeing, reproducible_coins=False))


def test_a_ledger_enters_a_once_only_release_once(tmp_path: Path):
    from privacy.ledger import new_release_id, now

    def entry(release_id: str) -> LedgerEntry:
        mechanism = count_mechanism(10)
        return LedgerEntry(release_id=release_id, client_id="bank", stage="ingest", release="noised_unit_count", artifact="stages/ingest/partition.json#client=bank",
                           run_dir=str(tmp_path), released_at=now(), unit="record", num_units=23, delta=1e-5, mechanism=mechanism,
                           epsilon={"prv": 0.35, "rdp": 0.37, "pld": 0.34, "reported": 0.34, "reported_by": "pld", "delta": 1e-5}, private=True,
                           noise="os_entropy", trust="t")

    ledger = ClientLedger.of_data(tmp_path, "k" * 32, "bank")

    def refuse(entries: list[LedgerEntry]) -> None:
        raise ValueError("over the cap")

    with pytest.raises(ValueError, match="over the cap"):
        ledger.append_once(entry("first"), lambda e: is_count_of(e, "bank", "record"), refuse)
    assert not ledger.path.exists() or not ledger.path.read_text()
    kept = ledger.append_once(entry("first"), lambda e: is_count_of(e, "bank", "record"))
    again = ledger.append_once(entry(new_release_id()), lambda e: is_count_of(e, "bank", "record"), refuse)  # found: no check, no write
    assert kept.release_id == again.release_id == "first" and len(ledger.path.read_text().splitlines()) == 1


def test_count_noise_zero_draws_nothing_and_a_run_made_so_is_not_restarted_by_a_count(tmp_path: Path, draw: PlusThree, capsys):
    """N public is the code's behaviour from before noised counts: at `count_noise: 0` nothing is
    drawn, the fingerprints leave the setting out (so an older run resumes cached), and turning the
    count on in such a run is refused before ingest releases anything: every DP release after it
    would have to be made again."""
    from knowledgesg.runner import where_things_lie_left_out

    assert where_things_lie_left_out("privacy", {"target_epsilon": 8.0, "count_noise": 0.0}) == where_things_lie_left_out("privacy", {"target_epsilon": 8.0})
    assert where_things_lie_left_out("privacy", {"count_noise": 10.0}) != where_things_lie_left_out("privacy", {})
    assert pipelines.ingest.Ingest(None).fingerprint_settings(spec_model(tmp_path, 0)) == {}
    assert pipelines.ingest.Ingest(None).fingerprint_settings(spec_model(tmp_path, 10))
    public = spec_path(tmp_path, ["prepare_models", "ingest", TRAIN], privacy={"target_epsilon": 8.0, "count_noise": 0})
    assert run_in(tmp_path, "run", str(public), "--run-dir", "run") == 0
    assert draw.drawn == [] and "count" not in read_json(tmp_path / "run/stages/ingest/partition.json")
    assert any("treated as public" in a for a in read_json(tmp_path / "run/stages/dp_train/clients/client_0/privacy.json")["assumptions"])
    capsys.readouterr()
    noised = spec_path(tmp_path, ["prepare_models", "ingest", TRAIN], privacy={"target_epsilon": 8.0, "count_noise": 10}, name="noised.yaml")
    assert run_in(tmp_path, "run", str(noised), "--run-dir", "run") == 2
    assert re.search(r"privacy\.count_noise: 10, but the releases of dp_train in .* were planned with each client's exact N", capsys.readouterr().err)
    assert draw.drawn == [] and {e["stage"] for e in ledger_lines_in(tmp_path / "run/ledger")} == {"dp_train"}  # no count released
    assert run_in(tmp_path, "run", str(public), "--run-dir", "run") == 0
    assert re.findall(r"(ingest|dp_train)\s+│ (\w+)", capsys.readouterr().err) == [("ingest", "cached"), ("dp_train", "cached")]


def ledger_lines_in(directory: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(directory.glob("*.jsonl")) for line in path.read_text().splitlines()]


def spec_model(tmp_path: Path, count_noise: float):
    from knowledgesg.spec import load_spec

    return load_spec(write_spec(tmp_path, tiny_spec(privacy={"count_noise": count_noise}), "model.yaml"))[0]


def test_a_count_at_another_unit_is_refused_before_it_is_drawn(tmp_path: Path, capsys):
    """The spec stops mapping document_id (or an upgrade reads an unmapped column no more): the
    unit goes from source document to record. A second count would be drawn, then refused
    downstream (releases at another unit are never composed): refused before it is drawn."""
    # a column named document_id is read mapped or not: the same records, the same data set's ledger
    write_jsonl(tmp_path / "data.jsonl", [dict(r, document_id=f"d{i // 2}") for i, r in enumerate(sentiment_rows(20))])

    def spec(maps: bool) -> dict:
        source = {"path": "data.jsonl", **({"fields": {"document_id": "document_id"}} if maps else {})}
        return tiny_spec(clients={"members": [{"id": "bank", "data": [source]}]}, privacy={"target_epsilon": 8.0, "count_noise": 1.0})

    assert run_in(tmp_path, "run", str(write_spec(tmp_path, spec(True))), "--run-dir", "run") == 0
    capsys.readouterr()
    assert run_in(tmp_path, "run", str(write_spec(tmp_path, spec(False))), "--run-dir", "run") == 2
    assert "client 'bank': its ledger holds this data's count per source document, the spec now counts per record" in capsys.readouterr().err
    counts = [json.loads(line) for path in (tmp_path / "run/ledger").glob("*.jsonl") for line in path.read_text().splitlines()]
    assert [e["unit"] for e in counts] == ["source_document"]
