"""The privacy claims as attacks. Each test runs an attack as the server operator (or anyone with
the spec, the released artifacts and every other record) would, and checks that it fails. Where
it can, a control runs the same attack against noise regenerable from the spec
(`privacy.reproducible_noise`) and checks that it succeeds there: the attack is real."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from safetensors.numpy import load_file

from knowledgesg.cli import main
from knowledgesg.fileio import read_json, sha256_file
from knowledgesg.generation import Completion
from knowledgesg.records import InstructionRecord
import privacy.dp_sgd
from privacy.ledger import LedgerEntry
from privacy.noise import SecureRandom
from privacy.units import bounded_label_counts, privacy_units
from tests.conftest import run_in, sentiment_rows, tiny_spec, write_jsonl, write_spec
from tests.test_synthesize import SYNTH

LABELS = ["negative", "neutral", "positive"]
ADAPTER = "stages/dp_train/clients/client_0/adapter/adapter_model.safetensors"
# one DP-SGD step of plain SGD (q = 4/20, epochs 0.2): the released B matrices are -lr (g + z) / B
ONE_STEP = {"name": "dp_train", "params": {"batch_size": 4, "max_length": 48, "epochs": 0.2, "optimizer": "sgd", "learning_rate": 0.01, "loss_on": "all"}}
# dp_train's privacy.json, but for release_id and adapter_sha256: each a function of the spec,
# the base model and the record count (N, public: it sets q), none of the secret draw
STATEMENT_FIELDS = {"client_id", "private", "label", "unit", "num_units", "max_records_per_unit", "delta", "n_times_delta", "target_epsilon",
                    "mechanism", "clip_norm", "expected_batch_units", "epochs", "calibrated_by", "epsilon", "noise", "trust", "assumptions", "base_model", "count"}
HISTOGRAM = dict(SYNTH, params=dict(SYNTH["params"], class_balance="dp_histogram", histogram_noise_multiplier=1.0))


def run(workdir: Path, run_dir: str, privacy: dict | None = None, stages: list | None = None, name: str = "spec.yaml", **overrides) -> int:
    spec = tiny_spec(stages=stages or ["prepare_models", "ingest", ONE_STEP, HISTOGRAM], privacy={"target_epsilon": 8.0, **(privacy or {})}, **overrides)
    return run_in(workdir, "run", str(write_spec(workdir, spec, name)), "--run-dir", run_dir)


def lora_b(path: Path) -> np.ndarray:
    tensors = load_file(str(path))
    return np.concatenate([tensors[k].ravel() for k in sorted(tensors) if "lora_B" in k])


class FixedDraw:
    """Poisson sampling replaced by a set schedule, so that two releases differ only by their
    noise: the sampler's coins are OS entropy too, and would make them differ even if the noise
    were replayed from the spec. Counts its calls, so a test knows the patch took effect."""

    def __init__(self, units: Callable[[int], list[int]]) -> None:
        self.units = units
        self.calls = 0

    def __call__(self, num_units: int, sample_rate: float, steps: int, coins: SecureRandom) -> Iterator[list[int]]:
        self.calls += 1
        return iter([self.units(num_units) for _ in range(steps)])


def first_four(num_units: int) -> list[int]:
    return list(range(min(4, num_units)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The data owner's release, an attacker's replay of the same spec over the same records, and
    the same two with reproducible noise; every one on the same batches."""
    workdir = tmp_path_factory.mktemp("threats")
    write_jsonl(workdir / "data.jsonl", sentiment_rows(40))
    draw = FixedDraw(first_four)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(privacy.dp_sgd, "poisson_batches", draw)
        for run_dir in ("released", "replay"):
            assert run(workdir, run_dir) == 0
        for run_dir in ("released_r", "replay_r"):
            assert run(workdir, run_dir, privacy={"reproducible_noise": True}, name="reproducible.yaml") == 0
    assert draw.calls == 8  # two clients, four runs: the releases differ by their noise alone
    return workdir


# 1. The DP noise is not a function of the public spec -------------------------------------------


def test_replaying_training_from_the_spec_does_not_reproduce_the_released_adapter(runs: Path):
    """The attacker holds the spec and every record and retrains: if that reproduced the released
    adapter bit for bit, it could tell D from D' with certainty (epsilon infinite). The batches
    are the same in every run here, so only noise the spec cannot regenerate tells them apart."""
    assert (runs / "released" / ADAPTER).read_bytes() != (runs / "replay" / ADAPTER).read_bytes()
    # control: noise regenerable from the spec is replayed exactly, and such a release says NOT PRIVATE
    assert (runs / "released_r" / ADAPTER).read_bytes() == (runs / "replay_r" / ADAPTER).read_bytes()
    assert read_json(runs / "released_r/stages/dp_train/clients/client_0/privacy.json")["label"] == "NOT PRIVATE (reproducible noise)"
    assert read_json(runs / "released/stages/dp_train/clients/client_0/privacy.json")["label"] == "DP"


def test_the_release_statement_says_nothing_of_the_secret_draw(runs: Path):
    """privacy.json travels with the adapter to the server. Two releases of the same records under
    the same spec, with different secret noise and Poisson draws, must give the same statement but
    for the release's own id and hash: a field that followed the draw (the units a step drew, the
    steps that drew none) would be an un-noised figure of the sample, whose odds move with whether
    a given record is in the data. It had carried the count of empty steps."""
    def statement(run_dir: str) -> dict:
        body = read_json(runs / run_dir / "stages/dp_train/clients/client_0/privacy.json")
        return {k: v for k, v in body.items() if k not in ("release_id", "adapter_sha256")}

    for run_dir, units in (("drew_none", lambda n: []), ("drew_all", lambda n: list(range(n)))):
        draw = FixedDraw(units)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(privacy.dp_sgd, "poisson_batches", draw)
            assert run(runs, run_dir) == 0
        assert draw.calls == 2
    assert statement("drew_none") == statement("drew_all") == statement("released")
    for run_dir, units in (("drew_none", 0), ("drew_all", 20)):  # the two draws were indeed the extremes
        per_step = read_json(runs / run_dir / "stages/dp_train/clients/client_0/loss.json")
        assert [row["units"] for row in per_step] == [units]
        assert [set(row) for row in per_step] == [{"step", "units", "loss"}]  # the draw stays on the client's side
    # every field is one of these, each a function of the spec and the record count alone
    assert set(statement("released")) <= STATEMENT_FIELDS, set(statement("released")) - STATEMENT_FIELDS


def test_a_released_histogram_cannot_be_denoised_with_the_spec(runs: Path):
    """The attacker regenerates the histogram's noise from the public seed, as the code would if
    it were seeded from the spec, and subtracts it."""
    spec = read_json(runs / "released/spec.json")["spec"]
    for run_dir, reproducible in (("released", False), ("released_r", True)):
        for client in ("client_0", "client_1"):
            released = read_json(runs / run_dir / f"stages/synthesize/clients/{client}/label_histogram.json")
            rows = [r for r in map(json.loads, (runs / run_dir / f"stages/ingest/clients/{client}/records.jsonl").read_text().splitlines())]
            truth = [sum(r["response"] == label for r in rows) for label in LABELS]
            guess = SecureRandom.from_public_seed(spec["seed"], "synthesize", client, "histogram").normal_values((3,), released["noise_std"])
            denoised = [released["labels"][label] - float(n) for label, n in zip(LABELS, guess)]
            recovered = np.allclose(denoised, truth, atol=1e-9)
            assert recovered == reproducible, (run_dir, client, denoised, truth)


# 2. A rerun is a new release with new noise --------------------------------------------------------


def test_two_releases_of_a_rerun_do_not_cancel(tmp_path: Path, monkeypatch):
    """The server reruns dp_train with another learning rate and keeps both adapters. With the same
    batches and noise, B1 / lr1 = B2 / lr2 = -(g + z) / B exactly; with A1 - A2 that recovers the
    noise and then the clipped gradient sum."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    draw = FixedDraw(first_four)  # the same batches in both: only the noise may keep them apart
    monkeypatch.setattr(privacy.dp_sgd, "poisson_batches", draw)
    for reproducible in (False, True):
        released = []
        for lr in (0.01, 0.02):
            step = dict(ONE_STEP, params=dict(ONE_STEP["params"], learning_rate=lr))
            shutil.rmtree(tmp_path / f"run-{reproducible}/stages/dp_train", ignore_errors=True)  # a rerun is asked for by removing the stage
            assert run(tmp_path, f"run-{reproducible}", privacy={"reproducible_noise": reproducible}, stages=["prepare_models", "ingest", step]) == 0
            released.append(lora_b(tmp_path / f"run-{reproducible}" / ADAPTER) / lr)
        gap = float(np.abs(released[0] - released[1]).max() / np.abs(released[0]).max())
        assert (gap < 1e-5) == reproducible, gap  # cancels exactly only when the noise is replayed
        ledger = [json.loads(line) for p in (tmp_path / f"run-{reproducible}/ledger").glob("*.jsonl") for line in p.read_text().splitlines()]
        assert sorted(e["client_id"] for e in ledger) == ["client_0", "client_0", "client_1", "client_1"]  # both releases counted
    assert draw.calls == 8


# 3. The ledger never forgets ---------------------------------------------------------------------


def test_the_ledger_counts_reruns_and_other_runs_and_the_cap_refuses_the_third(tmp_path: Path, monkeypatch, capsys):
    from privacy.accounting import Mechanism
    from privacy.ledger import compose

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    shared = {"target_epsilon": 3.0, "ledger_dir": "ledger"}
    train = {"name": "dp_train", "params": {"batch_size": 4, "max_length": 48}}
    assert run(tmp_path, "a", privacy=shared, stages=["prepare_models", "ingest", train]) == 0
    rerun = dict(train, params=dict(train["params"], learning_rate=1e-3))
    shutil.rmtree(tmp_path / "a/stages/dp_train")  # a new release, asked for
    assert run(tmp_path, "a", privacy=shared, stages=["prepare_models", "ingest", rerun]) == 0  # replaces the first adapter
    entries = [json.loads(line) for p in (tmp_path / "ledger").glob("*.jsonl") for line in p.read_text().splitlines()]
    mine = [e for e in entries if e["client_id"] == "client_0"]
    assert len(mine) == 2 and len({e["release_id"] for e in mine}) == 2
    two = compose([Mechanism.model_validate(e["mechanism"]) for e in mine], mine[0]["delta"]).reported
    three = compose([Mechanism.model_validate(mine[0]["mechanism"])] * 3, mine[0]["delta"]).reported
    assert main(["privacy-report", "a"]) == 0
    report = read_json(tmp_path / "a/privacy_report.json")
    client = next(c for c in report["clients"] if c["client_id"] == "client_0")
    assert client["total"]["pld"] == pytest.approx(two, rel=1e-6) and len(client["releases"]) == 2
    assert {r["status"] for r in client["releases"]} == {"this run, current", "this run, since replaced or removed (still counted)"}
    # a new run directory over the same data, pointed at the same ledger, keeps counting
    cap = round((two + three) / 2, 2)
    capsys.readouterr()
    assert run(tmp_path, "b", privacy={**shared, "cap_epsilon": cap}, stages=["prepare_models", "ingest", train]) == 2
    error = capsys.readouterr().err
    assert re.search(rf"client 'client_0': the planned releases would exceed the privacy budget cap \(spent epsilon {two:.3f}, planned 2\.9\d+, composed total \d\.\d+ > cap {cap:g}\)", error), error
    assert not (tmp_path / "b").exists()
    # the data owner's own ledger setting wins over the spec's
    monkeypatch.setenv("KSG_LEDGER_DIR", str(tmp_path / "owner-ledger"))
    assert run(tmp_path, "c", privacy=shared, stages=["prepare_models", "ingest", train]) == 0
    assert len(list((tmp_path / "owner-ledger").glob("*.jsonl"))) == 2


def test_a_new_run_refused_after_a_release_keeps_its_ledger_and_releases(tmp_path: Path, monkeypatch, capsys):
    """Bad input found by a later stage (here the cap, at the histogram) ends a new run with exit 2,
    but a run that has already released leaves its ledger and DP adapters: deleting them would
    forget a release the server may have seen, and the hour of DP-SGD a resume keeps. (`ksg run`
    refuses this plan before it starts; the runner keeps the rule for what only a stage can find,
    such as the cap over the rounds a seed gives sampled clients.)"""
    from knowledgesg.errors import InputError
    from knowledgesg.runner import Runner
    from pipelines import load_pipeline

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    train = {"name": "dp_train", "params": {"batch_size": 4, "max_length": 48}}
    spec_path = write_spec(tmp_path, tiny_spec(stages=["prepare_models", "ingest", train, HISTOGRAM], privacy={"target_epsilon": 3.0, "cap_epsilon": 3.01}))
    assert run_in(tmp_path, "run", str(spec_path), "--run-dir", "refused") == 2 and not (tmp_path / "refused").exists()  # the plan: before anything
    spec, base_dir, stages = load_pipeline(spec_path)
    with pytest.raises(InputError, match="would exceed the privacy budget cap"):
        Runner(spec, base_dir, tmp_path / "run", stages).run()  # no plan check: the histogram stage refuses
    entries = [line for path in (tmp_path / "run/ledger").glob("*.jsonl") for line in path.read_text().splitlines()]
    assert len(entries) == 2 and (tmp_path / "run" / ADAPTER).is_file() and (tmp_path / "run/stages/dp_train/manifest.json").is_file()


def test_another_version_of_the_data_does_not_start_a_fresh_budget(tmp_path: Path, monkeypatch, capsys):
    """The data owner adds a record and renames the file (so its fingerprint and ledger are new);
    the people in both versions keep the budget they spent. Data sharing no record counts too in
    the same ledger directory (whether it shares one must not decide what counts: see below); in
    a directory of its own it starts fresh."""
    from privacy.accounting import Mechanism
    from privacy.ledger import compose

    monkeypatch.chdir(tmp_path)
    rows = sentiment_rows(41)
    write_jsonl(tmp_path / "data.jsonl", rows[:40])
    shared = {"target_epsilon": 3.0, "ledger_dir": "ledger"}
    stages = ["prepare_models", "ingest", {"name": "dp_train", "params": {"batch_size": 4, "max_length": 48}}]
    assert run(tmp_path, "a", privacy=shared, stages=stages) == 0
    first = json.loads(next((tmp_path / "ledger").glob("*.jsonl")).read_text().splitlines()[0])
    one = compose([Mechanism.model_validate(first["mechanism"])], first["delta"]).reported
    two = compose([Mechanism.model_validate(first["mechanism"])] * 2, first["delta"]).reported
    cap = round((one + two) / 2, 2)  # room for one release of the data, not two

    write_jsonl(tmp_path / "renamed.jsonl", rows)
    capsys.readouterr()
    assert run(tmp_path, "b", privacy={**shared, "cap_epsilon": cap}, stages=stages, clients={"data": [{"path": "renamed.jsonl"}], "partition": {"method": "iid", "num_clients": 2}}) == 2
    error = capsys.readouterr().err
    assert re.search(rf"client 'client_\d': the planned releases would exceed the privacy budget cap \(spent epsilon {one:.3f}, ", error), error

    fresh = [dict(r, id=f"o{i}", input=r["input"].replace("Company", "Firm")) for i, r in enumerate(rows[:40])]
    write_jsonl(tmp_path / "other.jsonl", fresh)
    other = {"data": [{"path": "other.jsonl"}], "partition": {"method": "iid", "num_clients": 2}}
    assert run(tmp_path, "c", privacy={**shared, "cap_epsilon": cap}, stages=stages, clients=other) == 2
    assert run(tmp_path, "d", privacy={**shared, "cap_epsilon": cap, "ledger_dir": "other_ledger"}, stages=stages, clients=other) == 0


def test_releases_at_another_privacy_unit_are_not_summed_as_if_alike(tmp_path: Path, monkeypatch, capsys):
    """Record-level DP-SGD, then user-level DP-SGD on the same data and ledger: the record-level
    epsilon is not a user's (a user with k records spends a group epsilon), so the second is refused."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", [dict(r, user_id=f"u{i % 10}") for i, r in enumerate(sentiment_rows(40))])
    stages = ["prepare_models", "ingest", {"name": "dp_train", "params": {"batch_size": 2, "max_length": 48}}]
    assert run(tmp_path, "a", privacy={"target_epsilon": 3.0, "ledger_dir": "ledger"}, stages=stages) == 0
    capsys.readouterr()
    assert run(tmp_path, "b", privacy={"target_epsilon": 3.0, "ledger_dir": "ledger", "unit": "user"}, stages=stages) == 2
    refused = r"client 'client_\d': stage 'dp_train' releases at the user level, but this data's earlier releases are at the record level"
    assert re.search(refused, capsys.readouterr().err)
    spec = tiny_spec(stages=stages, privacy={"target_epsilon": 3.0, "ledger_dir": "ledger", "unit": "user"})
    assert main(["check", str(write_spec(tmp_path, spec, "user.yaml")), "--run-dir", "b"]) == 2  # ksg check says so too
    assert re.search(refused, capsys.readouterr().err)
    assert run(tmp_path, "c", privacy={"target_epsilon": 3.0, "ledger_dir": "ledger"}, stages=stages) == 0  # the same unit composes as before


def test_a_ledger_counts_every_data_set_of_the_same_client_and_no_other_clients(tmp_path: Path):
    """In one ledger directory (the simulation keeps every client's there): the client's ledgers of
    its other data sets count, overlapping or not; another client's does not."""
    from privacy.ledger import ClientLedger

    entry = {"release_id": "", "client_id": "", "stage": "dp_train", "release": "dp_adapter", "artifact": "a", "run_dir": "r",
                                   "released_at": "2026-01-01T00:00:00+00:00", "unit": "record", "num_units": 4, "delta": 1e-5,
                                   "mechanism": {"kind": "poisson_gaussian", "noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 2},
                                   "epsilon": {"delta": 1e-5, "prv": 1.0, "rdp": 1.0, "pld": 1.0, "reported": 1.0, "reported_by": "pld"}, "private": True, "noise": "os_entropy", "trust": "t"}

    def ledger(key: str, client: str, release: str) -> ClientLedger:
        book = ClientLedger.of_data(tmp_path, key, client)
        book.append(LedgerEntry.model_validate(dict(entry, release_id=release, client_id=client)))
        return book

    ledger("k1", "bank", "first")
    ledger("k2", "other_bank", "theirs")
    ledger("k3", "bank", "disjoint")
    later = ClientLedger.of_data(tmp_path, "k4", "bank")
    assert sorted(e.release_id for e in later.entries()) == ["disjoint", "first"]  # one release time: in no set order
    assert not later.path.exists()  # reading writes nothing
    assert [e.release_id for e in ClientLedger.of_data(tmp_path, "k4", "other_bank").entries()] == ["theirs"]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[:2] == [".lock", ".name_key"] and len(names) == 5 and all(n.endswith(".jsonl") for n in names[2:])  # nothing beside the ledgers


def test_which_earlier_releases_reach_the_server_does_not_tell_whether_a_record_is_in(tmp_path: Path):
    """An earlier data set of the client (a pilot) shared only record x with today's. Counting only
    the ledgers that share a person with the current data, the client's export (and whether its
    cap refused) held the pilot's release exactly when x is in: x's membership, with certainty.
    Today's data with x and without it must bring the same earlier releases."""
    from privacy.ledger import ClientLedger, data_key

    rows = sentiment_rows(12)
    x, pilot, today = rows[0], rows[1:4], rows[4:]
    entry = {"release_id": "pilot", "client_id": "bank", "stage": "dp_train", "release": "dp_adapter", "artifact": "a", "run_dir": "r",
             "released_at": "2026-01-01T00:00:00+00:00", "unit": "record", "num_units": 4, "delta": 1e-5,
             "mechanism": {"kind": "poisson_gaussian", "noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 2},
             "epsilon": {"delta": 1e-5, "prv": 1.0, "rdp": 1.0, "pld": 1.0, "reported": 1.0, "reported_by": "pld"}, "private": True, "noise": "os_entropy", "trust": "t"}
    ClientLedger.of_data(tmp_path, data_key([x] + pilot), "bank").append(LedgerEntry.model_validate(entry))
    sent = {name: [e.release_id for e in ClientLedger.of_data(tmp_path, data_key(data), "bank").entries()] for name, data in (("with x", [x] + today), ("without x", today))}
    assert sent["with x"] == sent["without x"] == ["pilot"], sent


# 4 and 10. Nothing un-noised about private data reaches a server-side file ------------------------


def server_side_files(run_dir: Path) -> list[Path]:
    """Everything the server holds: stage outputs marked server, every manifest, the run's own
    files, the privacy report and `ksg eval`'s server-side report."""
    files = [run_dir / name for name in ("spec.json", "events.jsonl", "privacy_report.json", "privacy_report.html", ".input_hashes.json", "report.html")]
    for manifest_path in (run_dir / "stages").glob("*/manifest.json"):
        stage_dir = manifest_path.parent
        files += [manifest_path, stage_dir / ".started_with"]
        files += [stage_dir / rel for rel, out in read_json(manifest_path)["outputs"].items() if out["side"] == "server"]
    if (run_dir / "eval/sides.json").is_file():
        sides = read_json(run_dir / "eval/sides.json")
        files += [run_dir / "eval" / rel for rel, side in sides.items() if side == "server"]
    return [f for f in files if f.is_file()]


def test_no_server_side_file_holds_an_unnoised_private_statistic(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    fedtune = {"name": "fedtune", "params": {"data": "private", "local_dp": {"target_epsilon": 2.0}, "rounds": 2,
                                             "training": {"steps": 2, "batch_size": 4, "max_length": 48}, "lora": {"r": 4}}}
    stages = ["prepare_models", "ingest", ONE_STEP, HISTOGRAM, fedtune]
    assert run(tmp_path, "run", stages=stages, models={"base": "tiny-random-llama", "embedder": "tiny-random-embedder"}) == 0
    assert main(["eval", "run", "--tasks", "fpb", "--models", "base", "--modes", "logprob", "--limit", "4"]) == 0
    run_dir = tmp_path / "run"

    taints: dict[str, str] = {}  # text that must not occur -> what it is
    for client in ("client_0", "client_1"):
        for step in read_json(run_dir / f"stages/dp_train/clients/{client}/loss.json"):
            if step["loss"] is not None:
                taints[str(step["loss"])] = f"{client} dp_train loss"
        for line in (run_dir / f"stages/fedtune/clients/{client}/local_log.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row["mean_loss"] is not None:
                taints[repr(row["mean_loss"])[:9]] = f"{client} fedtune local loss"
        for name, value in read_json(run_dir / f"eval/clients/{client}/fidelity.json").items():
            if isinstance(value, float) and value != int(value):
                taints[repr(value)[:9]] = f"{client} fidelity {name}"
        for path in (run_dir / f"stages/ingest/clients/{client}").iterdir():
            taints[sha256_file(path)] = f"plain hash of {path.name}"
            taints[f'"bytes": {path.stat().st_size},'] = f"size of {path.name}"
        for row in map(json.loads, (run_dir / f"stages/ingest/clients/{client}/records.jsonl").read_text().splitlines()):
            taints[row["input"]] = "a private record"
    taints[sha256_file(tmp_path / "data.jsonl")] = "plain hash of the private data file"
    taints[str((tmp_path / "data.jsonl").stat().st_mtime_ns)] = "the private data file's mtime (kept beside its size)"

    files = server_side_files(run_dir)
    assert len(files) > 20 and any(f.name == "rounds.json" for f in files) and any(f.name == "eval_report.json" for f in files)
    leaks = [(f.relative_to(run_dir), what) for f in files for text, what in taints.items() if text in f.read_text(errors="replace")]
    logged = "".join(capsys.readouterr())  # the console, both streams: a log the server operator may hold (a SuperNode's, the simulation's)
    leaks += [("the console", what) for text, what in taints.items() if text in logged]
    assert leaks == []
    rounds = read_json(run_dir / "stages/fedtune/rounds.json")
    assert all(r["num_examples"] is None and r["mean_loss"] is None for r in rounds)
    assert "fidelity" not in read_json(run_dir / "eval/eval_report.json")
    # the check can fail: a server-side file with a client's loss in it is caught
    (run_dir / "stages/fedtune/rounds.json").write_text(json.dumps({"mean_loss": json.loads((run_dir / "stages/fedtune/clients/client_0/local_log.jsonl").read_text().splitlines()[0])["mean_loss"]}))
    assert any(f.name == "rounds.json" and text in f.read_text() for f in files for text in taints)


def test_a_manifest_cannot_confirm_a_guess_of_a_private_record(runs: Path):
    """The attacker knows every record but one, and a few candidates for it; it rebuilds the
    client's records.jsonl for each candidate and compares its hash with the manifest's: a plain
    hash, and the HMAC under the key that reproducible mode derives from the spec (the only key the
    attacker can make). Control: against a reproducible run the keyed guess confirms the secret."""
    import hashlib
    import hmac

    from knowledgesg.client_key import reproducible_key
    from knowledgesg.fileio import KEYED_PREFIX
    from knowledgesg.spec import PipelineSpec

    for run_dir, reproducible in (("released", False), ("released_r", True)):
        path = runs / run_dir / "stages/ingest/clients/client_0/records.jsonl"
        lines = path.read_text().splitlines(keepends=True)
        secret = json.loads(lines[3])
        candidates = [dict(secret, input=f"Company {k} reported results number {k * 7}.") for k in range(40, 45)] + [secret]
        rebuilt = ["".join(lines[:3] + [json.dumps(c, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"] + lines[4:]) for c in candidates]
        digests = [hashlib.sha256(text.encode()).hexdigest() for text in rebuilt]
        assert digests[-1] == sha256_file(path)  # the reconstruction is exact: a plain hash would confirm the secret
        key = reproducible_key(PipelineSpec.model_validate(read_json(runs / run_dir / "spec.json")["spec"]))
        keyed = [KEYED_PREFIX + hmac.new(key, text.encode(), hashlib.sha256).hexdigest() for text in rebuilt]
        recorded = read_json(runs / run_dir / "stages/ingest/manifest.json")["outputs"]["clients/client_0/records.jsonl"]
        assert recorded["sha256"].startswith(KEYED_PREFIX) and recorded["bytes"] is None
        assert not any(d in recorded["sha256"] for d in digests), run_dir
        # reproducible: the secret's guess, and no other, matches; private: none does
        assert [k == recorded["sha256"] for k in keyed] == [False] * (len(candidates) - 1) + [reproducible], run_dir


# 5. Derived records keep their source as the unit of privacy -------------------------------------


def test_pairs_from_one_document_are_one_privacy_unit(tmp_path: Path, monkeypatch):
    from knowledgesg.generation import Generator

    words = iter(f"alpha{i} beta{i} gamma{i} delta{i}" for i in range(1000))

    def canned(self, prompts, params, seed, progress=None):  # every chunk yields a parseable, grounded pair
        return [Completion(f" Which {next(words)} happened?\nAnswer: Patient improved on therapy.", 9, True) for _ in prompts]

    monkeypatch.setattr(Generator, "generate", canned)
    monkeypatch.chdir(tmp_path)
    notes = [{"id": f"n{i}", "text": f"Patient {i} improved on therapy. " * 30} for i in range(6)]
    write_jsonl(tmp_path / "notes.jsonl", notes)
    structure = {"name": "structure", "params": {"pool": {"builtin": "medquad", "sample": 25}, "chunk_tokens": 48, "overlap_tokens": 8, "example_words": 8}}
    train = {"name": "dp_train", "params": {"batch_size": 2, "max_length": 48, "source_stage": "structure", "max_records_per_user": 3}}
    spec = tiny_spec(stages=["prepare_models", "ingest", structure, train], models={"base": "tiny-random-llama", "embedder": "tiny-random-embedder"})
    spec["clients"] = {"members": [{"id": "hosp", "data": [{"path": "notes.jsonl", "kind": "text"}]}]}
    assert run_in(tmp_path, "run", str(write_spec(tmp_path, spec)), "--run-dir", "run") == 0
    pairs = [json.loads(line) for line in (tmp_path / "run/stages/structure/clients/hosp/records.jsonl").read_text().splitlines()]
    per_document = {d: sum(p["document_id"] == d for p in pairs) for d in {p["document_id"] for p in pairs}}
    assert len(per_document) == 6 and min(per_document.values()) > 3  # several pairs per transcript
    privacy = read_json(tmp_path / "run/stages/dp_train/clients/hosp/privacy.json")
    assert privacy["unit"] == "source_document" and privacy["num_units"] == 6 and privacy["max_records_per_unit"] == 3
    assert privacy["mechanism"]["sample_rate"] == pytest.approx(2 / 6)  # units, not the pairs
    ledger = read_json(tmp_path / "run/stages/dp_train/ledger.json")
    assert ledger[0]["unit"] == "source_document"
    assert main(["privacy-report", "run"]) == 0
    assert read_json(tmp_path / "run/privacy_report.json")["clients"][0]["units"] == ["source document"]


def _document(name: str, seed: int) -> str:
    return " ".join(f"Company {name} said revenue grew strongly this quarter, reaching {seed * 10 + k} million dollars in region {k}." for k in range(8))


STRUCTURING = {
    "labelled": {"pool": {"builtin": "fiqa_train", "sample": 30}, "labels": ["negative", "neutral", "positive"], "selection": "random"},
    "open": {"pool": {"builtin": "medquad", "sample": 28}, "selection": "retrieved"},  # a pool of its own: test_synthesize expects to build its index of 30
}


@pytest.mark.parametrize("ids", [True, False], ids=["ids", "line-numbers"])
@pytest.mark.parametrize("cap", [None, 2], ids=["no-cap", "cap-per-document"])
@pytest.mark.parametrize("kind", sorted(STRUCTURING))
def test_a_document_added_changes_no_other_documents_pairs(tmp_path: Path, monkeypatch, kind: str, cap: int | None, ids: bool):
    """Each source document is one unit in dp_train, so the pairs `structure` makes from one
    document must not depend on the others: else one transcript added changes another's pairs,
    the training sets differ in two units, and the adapter's epsilon is a group's. The adversary
    holds the seed and every other document; here it adds a document (a copy of the next one's
    text, under its own id) in the middle and compares. Generation is a stand-in that, like
    sampling, takes the next draws of a generator seeded with the call's seed. Without an id column
    a document's id is its line, which the insertion moves: pairs are compared without ids then."""
    import random as stdlib_random

    from knowledgesg.generation import Generator

    def drawing(self, prompts, params, seed, progress=None):
        draws = stdlib_random.Random(seed)
        if kind == "labelled":
            return [Completion(" " + draws.choice(["negative", "neutral", "positive"]), 1, True) for _ in prompts]
        return [Completion(f" Which figure {draws.randrange(10**6)} did the company give?\nAnswer: Revenue grew strongly this quarter.", 9, True) for _ in prompts]

    monkeypatch.setattr(Generator, "generate", drawing)
    documents = [{"id": name, "text": _document(name, k)} for k, name in enumerate(["a", "b", "c", "d"])]
    added = {"id": "x", "text": documents[1]["text"].replace("reaching", "near")}  # near-duplicates of b's sentences, before b
    if not ids:
        documents, added = [{"text": d["text"]} for d in documents], {"text": added["text"]}
    params = {**STRUCTURING[kind], "chunk_tokens": 48, "overlap_tokens": 8, "example_words": 8, "k": 2,
              **({"max_chunks_per_document": cap} if cap else {})}
    pairs = []
    for name, texts in (("without", documents), ("with", documents[:1] + [added] + documents[1:])):
        workdir = tmp_path / name
        workdir.mkdir()
        write_jsonl(workdir / "docs.jsonl", texts)
        spec = tiny_spec(stages=["prepare_models", "ingest", {"name": "structure", "params": params}],
                         models={"base": "tiny-random-llama", "embedder": "tiny-random-embedder"},
                         clients={"members": [{"id": "bank", "data": [{"path": "docs.jsonl", "kind": "text"}]}]})
        assert run_in(workdir, "run", str(write_spec(workdir, spec)), "--run-dir", "run") == 0
        made = [json.loads(line) for line in (workdir / "run/stages/structure/clients/bank/records.jsonl").read_text().splitlines()]
        assert len({p["document_id"] for p in made}) == len(texts)  # every document gave pairs
        ingested = [json.loads(line) for line in (workdir / "run/stages/ingest/clients/bank/records.jsonl").read_text().splitlines()]
        added_id = next((r["id"] for r in ingested if r["text"] == added["text"]), None)  # without an id column, its line
        others = [p for p in made if p["document_id"] != added_id]
        pairs.append(others if ids else [{k: v for k, v in p.items() if k not in ("id", "document_id")} for p in others])
    assert pairs[0] == pairs[1]


@pytest.mark.parametrize("usable", [False, True], ids=["no-pair-kept", "pairs-kept"])
def test_the_unit_an_adapter_states_does_not_tell_whether_a_document_gave_a_pair(tmp_path: Path, monkeypatch, capsys, usable: bool):
    """Trained on structure's output, the privacy unit is the source document as the spec says, not
    as the data turned out: had it been "record" (bound 1) when no document's pair was kept and
    "source document" otherwise, privacy.json and the ledger would tell the server whether the
    client's documents gave any pair (a function of their content)."""
    from knowledgesg.generation import Generator

    answer = " Which revenue figure did the company give?\nAnswer: Revenue grew strongly this quarter." if usable else " I cannot say."
    monkeypatch.setattr(Generator, "generate", lambda self, prompts, params, seed, progress=None: [Completion(answer, 9, True) for _ in prompts])
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(20))
    write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{k}", "text": _document(f"d{k}", k)} for k in range(2)])
    structure = {"name": "structure", "params": {**STRUCTURING["open"], "chunk_tokens": 48, "overlap_tokens": 8, "example_words": 8, "k": 2}}
    train = {"name": "dp_train", "params": {"batch_size": 2, "max_length": 48, "source_stage": "structure", "max_records_per_user": 3}}
    spec = tiny_spec(stages=["prepare_models", "ingest", structure, train], models={"base": "tiny-random-llama", "embedder": "tiny-random-embedder"},
                     clients={"members": [{"id": "bank", "data": [{"path": "data.jsonl"}, {"path": "docs.jsonl", "kind": "text"}]}]})
    assert run_in(tmp_path, "run", str(write_spec(tmp_path, spec)), "--run-dir", "run") == 0
    pairs = [json.loads(line) for line in (tmp_path / "run/stages/structure/clients/bank/records.jsonl").read_text().splitlines()]
    assert any(p.get("document_id") for p in pairs) == usable
    statement = read_json(tmp_path / "run/stages/dp_train/clients/bank/privacy.json")
    assert (statement["unit"], statement["max_records_per_unit"]) == ("source_document", 3)
    assert [e["unit"] for e in read_json(tmp_path / "run/stages/dp_train/ledger.json")] == ["source_document"]
    # with N public, N is the 20 records and the 2 documents whether or not a document gave a pair:
    # counted from the pairs it was 20 where none did, and q, the steps and delta told the server
    assert statement["num_units"] == 22 and statement["mechanism"]["sample_rate"] == pytest.approx(2 / 22)
    assert [e["num_units"] for e in read_json(tmp_path / "run/stages/dp_train/ledger.json")] == [22]
    # nor how many pairs they gave, N public or not: the manifest and the console count none
    assert read_json(tmp_path / "run/stages/structure/manifest.json")["outputs"]["clients/bank/records.jsonl"]["records"] is None
    console = "".join(capsys.readouterr())
    assert "structure bank: done (its counts in" in console and "pairs from" not in console


@pytest.mark.parametrize("maps_documents", [False, True], ids=["spec-silent", "spec-maps-document_id"])
def test_a_document_id_in_the_data_does_not_set_the_unit_a_release_states(tmp_path: Path, maps_documents: bool):
    """Neighbours: 20 records whose document_id column is blank, and the same with record x, the
    only one carrying a document id. The unit decided from the data ("source document" once any
    record has an id) made every release (the count, the adapter, the histogram: its
    sensitivity and noise 3x larger) state whether x is in. The spec decides: both alike."""
    # where the spec maps the column every record needs a value: then x's document is its own
    rows = [dict(r, document_id=f"doc-{i // 2}" if maps_documents else "") for i, r in enumerate(sentiment_rows(21))]
    rows[-1]["document_id"] = "memo-7"
    histogram = dict(HISTOGRAM, params=dict(HISTOGRAM["params"], user_contribution_bound=3))
    train = {"name": "dp_train", "params": {"batch_size": 2, "max_length": 48, "loss_on": "all", "max_records_per_user": 3}}
    source = {"path": "data.jsonl", **({"fields": {"document_id": "document_id"}} if maps_documents else {})}
    stated = {}
    for name, data in (("without x", rows[:-1]), ("with x", rows)):
        directory = tmp_path / name.replace(" ", "_")
        directory.mkdir()
        write_jsonl(directory / "data.jsonl", data)
        spec = tiny_spec(stages=["prepare_models", "ingest", train, histogram], privacy={"target_epsilon": 8.0, "count_noise": 1.0})
        spec["clients"] = {"members": [{"id": "bank", "data": [source]}]}
        assert run_in(directory, "run", str(write_spec(directory, spec)), "--run-dir", "run") == 0
        stage = directory / "run/stages"
        released = read_json(stage / "synthesize/clients/bank/label_histogram.json")
        statement = read_json(stage / "dp_train/clients/bank/privacy.json")
        stated[name] = ([e["unit"] for s in ("ingest", "dp_train", "synthesize") for e in read_json(stage / s / "ledger.json")],
                        statement["unit"], statement["max_records_per_unit"], released["unit"], released["sensitivity"], released["noise_std"])
    assert stated["with x"] == stated["without x"], stated
    unit = "source_document" if maps_documents else "record"
    units, *statement = stated["with x"][:3]
    assert set(units) == {unit} and statement == [unit, 3 if maps_documents else 1]


# 6. A heavy user moves the histogram by at most its bound -----------------------------------------


def test_a_heavy_user_moves_the_histogram_by_at_most_the_bound():
    light = [InstructionRecord(id=f"r{i}", instruction="Q", response=LABELS[i % 3], source="s", user_id=f"u{i}") for i in range(30)]
    heavy = [InstructionRecord(id=f"h{i}", instruction="Q", response="positive", source="s", user_id="heavy") for i in range(50)]
    bound = 8
    without = bounded_label_counts(light, LABELS, privacy_units(light, "user", bound, documents=False))
    units = privacy_units(light + heavy, "user", bound, documents=False)
    with_heavy = bounded_label_counts(light + heavy, LABELS, units)
    assert sum(abs(with_heavy[label] - without[label]) for label in LABELS) == bound == units.max_records  # not 50
    # at record level every record is its own unit: sensitivity 1
    assert privacy_units(light + heavy, "record", bound, documents=False).max_records == 1


def test_the_histogram_stage_counts_bounded_users(tmp_path: Path, monkeypatch):
    """Reproducible noise (NOT PRIVATE) so that the test can take the noise off again and read the
    counts the stage released: a heavy user's records beyond the bound are not in them."""
    monkeypatch.chdir(tmp_path)
    rows = [dict(r, user="heavy" if i < 20 else f"u{i}") for i, r in enumerate(sentiment_rows(40))]
    write_jsonl(tmp_path / "data.jsonl", rows)
    bound = 3
    histogram = dict(HISTOGRAM, params=dict(HISTOGRAM["params"], user_contribution_bound=bound))
    train = {"name": "dp_train", "params": {"batch_size": 2, "max_length": 48, "loss_on": "all", "max_records_per_user": 3}}
    spec = tiny_spec(stages=["prepare_models", "ingest", train, histogram], privacy={"target_epsilon": 8.0, "unit": "user", "reproducible_noise": True})
    spec["clients"] = {"data": [{"path": "data.jsonl", "fields": {"user_id": "user"}}], "partition": {"method": "iid", "num_clients": 1}}
    assert run_in(tmp_path, "run", str(write_spec(tmp_path, spec)), "--run-dir", "run") == 0
    released = read_json(tmp_path / "run/stages/synthesize/clients/client_0/label_histogram.json")
    assert released["unit"] == "user" and released["sensitivity"] == bound and released["noise_std"] == pytest.approx(3.0)

    ingested = (tmp_path / "run/stages/ingest/clients/client_0/records.jsonl").read_text().splitlines()
    records = [InstructionRecord.model_validate(r) for r in map(json.loads, ingested) if r["kind"] == "instruction"]
    bounded = bounded_label_counts(records, LABELS, privacy_units(records, "user", bound, documents=False))
    # by hand as well: the heavy user's first `bound` records, and every other user's one record
    heavy = [r for r in records if r.user_id == "heavy"]
    assert len(heavy) == 20 and bounded == {label: sum(r.response == label for r in heavy[:bound] + [r for r in records if r.user_id != "heavy"]) for label in LABELS}
    unbounded = {label: sum(r.response == label for r in records) for label in LABELS}
    assert bounded != unbounded  # the heavy user's extra records change the counts: the check below tells them apart
    noise = SecureRandom.from_public_seed(read_json(tmp_path / "run/spec.json")["spec"]["seed"], "synthesize", "client_0", "histogram").normal_values((3,), released["noise_std"])
    denoised = {label: released["labels"][label] - float(n) for label, n in zip(LABELS, noise)}
    assert denoised == pytest.approx(bounded, abs=1e-9), (denoised, bounded, unbounded)


def test_a_public_n_at_user_level_does_not_tell_how_many_records_a_user_holds(tmp_path: Path, monkeypatch):
    """With `count_noise: 0` the number of privacy units is declared public; at `unit: user` that
    is the number of users. The server's partition.json held the number of records, which one
    user's extra record changes: an un-noised function of private data beyond the declared N."""
    monkeypatch.chdir(tmp_path)
    rows = [dict(r, user="heavy" if i < 20 else f"u{i}") for i, r in enumerate(sentiment_rows(41))]
    spec = tiny_spec(stages=["prepare_models", "ingest"], privacy={"target_epsilon": 8.0, "unit": "user", "count_noise": 0})
    spec["clients"] = {"data": [{"path": "data.jsonl", "fields": {"user_id": "user"}}], "partition": {"method": "iid", "num_clients": 1}}
    partitions = []
    for name, data in (("fewer", rows[:40]), ("more", rows[:40] + [dict(rows[40], user="heavy")])):
        write_jsonl(tmp_path / "data.jsonl", data)
        assert run_in(tmp_path, "run", str(write_spec(tmp_path, spec)), "--run-dir", name) == 0
        partitions.append(read_json(tmp_path / name / "stages/ingest/partition.json"))
    assert partitions[0] == partitions[1] and partitions[0]["clients"] == {"client_0": 21}  # heavy and u20..u39


# 7. Client-level DP-FedAvg: the clients' own coins, clipping on the client -------------------------


def test_participation_coins_are_the_clients_own():
    from knowledgesg.federated.client import joins_round
    from knowledgesg.federated.protocol import ClientTask, LocalTraining, LoraShape

    def pattern(reproducible: bool, probability: float = 0.5) -> list[bool]:
        tasks = [ClientTask(round=r, client_id="a", seed=11, base_model={}, lora=LoraShape(), training=LocalTraining(), records=[],
                            join_probability=probability, update_clip_norm=1.0, reproducible_coins=reproducible) for r in range(1, 201)]
        return [joins_round(t) for t in tasks]

    first, second = pattern(False), pattern(False)
    # not predictable from the job's seed; OS-entropy coins differ every run, so the bounds are 5.6
    # standard deviations wide (a false failure about once in 7 x 10^7 runs)
    assert first != second and 0.3 < np.mean(first) < 0.7
    assert pattern(True) == pattern(True)  # control: seeded coins are replayed by anyone with the spec
    # Poisson at q, checked tightly on the seeded coins (the same coin, a fixed key: the same answer every run)
    assert 0.4 < np.mean(pattern(True, 0.5)) < 0.6 and 0.1 < np.mean(pattern(True, 0.2)) < 0.3


# 8. The audit compares with the group epsilon, delta term included ----------------------------------


def test_the_one_run_bound_includes_its_delta_term():
    from eval.metrics import epsilon_lower_bound, one_run_p_value

    assert one_run_p_value(100, 100, 80, 1.0, 1e-3) > one_run_p_value(100, 100, 80, 1.0, 0.0)
    assert epsilon_lower_bound(100, 80, m=100, delta=1e-2) < epsilon_lower_bound(100, 80, m=100, delta=0.0)


# 11. Identifiers from a spec never become paths outside the run -----------------------------------


@pytest.mark.parametrize("names", [["../../escape", "b"], ["/tmp/escape", "b"], ["a", "a"], ["Bank", "bank"]], ids=["traversal", "absolute", "duplicate", "one-directory-letter-case-aside"])
def test_unsafe_or_duplicate_client_names_are_refused_before_anything_is_written(tmp_path: Path, monkeypatch, capsys, names):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    spec = tiny_spec()
    spec["clients"]["partition"]["names"] = names
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    assert main(["run", str(write_spec(tmp_path, spec)), "--run-dir", "run"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "spec.yaml"] and sorted(p.name for p in tmp_path.parent.iterdir()) == before


def test_a_natural_partition_by_a_data_field_takes_its_client_names_from_the_spec(tmp_path: Path, monkeypatch, capsys):
    """A data field's values (a user id, a bank's name in the records, a path) would name the clients in
    every file, path and ledger the server holds: partitioning by one needs `names`, and then no
    value becomes a name or a directory."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", [dict(r, bank="../../elsewhere" if i % 2 else "bank_a") for i, r in enumerate(sentiment_rows(20))])
    spec = tiny_spec()
    spec["clients"] = {"data": [{"path": "data.jsonl", "fields": {"user_id": "bank"}}], "partition": {"method": "natural", "field": "user_id"}}
    assert main(["run", str(write_spec(tmp_path, spec)), "--run-dir", "run"]) == 2
    err = capsys.readouterr().err
    assert "clients.partition" in err and "needs names" in err and "elsewhere" not in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path.parent / "elsewhere").exists()
    spec["clients"]["partition"]["names"] = ["north", "south"]
    spec["stages"] = ["prepare_models", "ingest"]
    assert main(["run", str(write_spec(tmp_path, spec)), "--run-dir", "run"]) == 0
    assert sorted(p.name for p in (tmp_path / "run/stages/ingest/clients").iterdir()) == ["north", "south"]
    assert not (tmp_path.parent / "elsewhere").exists() and "elsewhere" not in (tmp_path / "run/stages/ingest/partition.json").read_text()


# 12. delta far below 1/N, shown as N x delta ----------------------------------------------------------


def test_default_delta_and_the_report_state_n_and_n_times_delta(runs: Path):
    privacy = read_json(runs / "released/stages/dp_train/clients/client_0/privacy.json")
    n = privacy["num_units"]
    assert privacy["delta"] <= min(1e-5, 1 / (100 * n)) and privacy["n_times_delta"] == pytest.approx(n * privacy["delta"])
    assert main(["privacy-report", str(runs / "released")]) == 0
    report = read_json(runs / "released/privacy_report.json")
    assert report["clients"][0]["n_times_delta"] == pytest.approx(n * privacy["delta"])
    assert any("treated as public" in a for a in report["assumptions"])
    assert [t["party"].split(" ")[0] for t in report["threat_model"]] == ["data", "server", "anyone"]
    assert not math.isinf(report["clients"][0]["total"]["pld"])


# A finished release is reused, never redrawn -----------------------------------------------------


def test_a_code_upgrade_keeps_finished_releases_and_a_refused_rerun_keeps_the_last(tmp_path: Path, monkeypatch, capsys):
    import knowledgesg.runner as runner

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    train = {"name": "dp_train", "params": {"batch_size": 4, "max_length": 48}}
    stages = ["prepare_models", "ingest", train]
    privacy = {"target_epsilon": 8.0, "cap_epsilon": 9.0}
    assert run(tmp_path, "run", privacy=privacy, stages=stages) == 0
    released = (tmp_path / "run" / ADAPTER).read_bytes()
    monkeypatch.setattr(runner, "code_sha256", lambda: "a newer version of the code")
    capsys.readouterr()
    assert run(tmp_path, "run", privacy=privacy, stages=stages) == 0  # the upgrade alone: kept, no new release
    out = capsys.readouterr().err
    assert "its privacy release is kept" in out and re.search(r"dp_train\s+│ kept", out), out
    assert (tmp_path / "run" / ADAPTER).read_bytes() == released
    assert sum(1 for p in (tmp_path / "run/ledger").glob("*.jsonl") for _ in p.read_text().splitlines()) == 2  # one per client
    # a real change would be a new release: not made unasked, the last release stays on disk
    changed = dict(train, params=dict(train["params"], learning_rate=1e-3))
    assert run(tmp_path, "run", privacy=privacy, stages=["prepare_models", "ingest", changed]) == 2
    assert "running it again is a new release" in capsys.readouterr().err
    assert (tmp_path / "run" / ADAPTER).read_bytes() == released and (tmp_path / "run/stages/dp_train/manifest.json").is_file()
    # asked for (the stage removed), past the cap it is refused: nothing half-written, the ledger as it was
    shutil.rmtree(tmp_path / "run/stages/dp_train")
    assert run(tmp_path, "run", privacy=privacy, stages=["prepare_models", "ingest", changed]) == 2
    assert "would exceed the privacy budget cap" in capsys.readouterr().err
    assert not (tmp_path / "run/stages/dp_train").exists() and not list((tmp_path / "run/stages").glob(".*.tmp"))
    assert sum(1 for p in (tmp_path / "run/ledger").glob("*.jsonl") for _ in p.read_text().splitlines()) == 2


def test_a_release_stage_made_stale_is_not_run_again_unasked(tmp_path: Path, capsys):
    """What makes dp_train stale after its release need not be the user's choice (the data file
    touched, the model cache or the checkout moved, an upgrade that changed an earlier stage's
    outputs); running it again is a second release of the same data. The runner refuses, leaving
    the release and the ledger as they were, until the user removes the stage's directory."""
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    stages = ["prepare_models", "ingest", ONE_STEP]
    assert run(tmp_path, "run", stages=stages) == 0
    adapter = sha256_file(tmp_path / "run" / ADAPTER)

    def entries() -> int:
        return sum(len(p.read_text().splitlines()) for p in (tmp_path / "run/ledger").glob("*.jsonl"))

    assert entries() == 2  # one DP adapter per client
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(41))  # one record more: ingest reruns, and dp_train is stale
    capsys.readouterr()
    assert run(tmp_path, "run", stages=stages) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"ksg: error: dp_train: .* \(its release of .*\); running it again is a new release that spends privacy budget again\. "
                                                    r"To make it, remove .*stages/dp_train \(its ledger entries stay counted\)", err), err
    assert entries() == 2 and sha256_file(tmp_path / "run" / ADAPTER) == adapter
    shutil.rmtree(tmp_path / "run/stages/dp_train")  # the user asks for the new release
    assert run(tmp_path, "run", stages=stages) == 0
    assert entries() == 4 and sha256_file(tmp_path / "run" / ADAPTER) != adapter


def test_the_plan_before_a_resume_counts_a_release_made_before_a_crash_once(tmp_path: Path, monkeypatch):
    """dp_train released client_0 and the process died before its manifest: the resume reuses that
    release, so ksg run's plan (and dp_train's own check) must not add it again on top of the ledger
    entry it left (counted twice, a resume under a cap that fits was refused)."""
    from pipelines import load_pipeline
    from pipelines.check import plan_privacy

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    train = {"name": "dp_train", "params": {"batch_size": 4, "max_length": 48}}
    # a cap that holds one release of each client, not two
    spec_path = write_spec(tmp_path, tiny_spec(stages=["prepare_models", "ingest", train], privacy={"target_epsilon": 3.0, "cap_epsilon": 3.5}))
    assert run_in(tmp_path, "run", str(spec_path), "--run-dir", "run") == 0
    # as if killed after client_0's release (its ledger entry and unit marker), before client_1's and the manifest
    stage = tmp_path / "run/stages/dp_train"
    (stage / "manifest.json").unlink()
    (stage / "units/client_1.json").unlink()
    shutil.rmtree(stage / "clients/client_1")  # nothing of client_1's was published: its entry comes first
    for ledger in (tmp_path / "run/ledger").glob("*.jsonl"):
        if '"client_1"' in ledger.read_text():
            ledger.unlink()
    spec, base_dir, stages = load_pipeline(spec_path)
    planned = {c.client_id: c for c in plan_privacy(spec, base_dir, [s for s in stages if s.name == "dp_train"], tmp_path / "run", sure_only=True)}
    assert planned["client_0"].planned_epsilon == 0 and planned["client_0"].spent_epsilon > 2.9
    assert planned["client_0"].total_epsilon == pytest.approx(planned["client_0"].spent_epsilon, rel=1e-3)
    assert planned["client_1"].planned_epsilon == pytest.approx(3.0, rel=0.01) and planned["client_1"].spent_epsilon == 0
    # the resume: client_0's release is reused, client_1 trains
    assert run_in(tmp_path, "run", str(spec_path), "--run-dir", "run") == 0
    assert (stage / "manifest.json").is_file()


def test_keys_are_never_readable_by_others_not_even_before_a_chmod(tmp_path: Path, monkeypatch):
    """The SuperLink's TLS key and each SuperNode's key are created owner-only (0600) and whole: a
    file written with the umask's mode and narrowed by a chmod after is readable by other users
    in between. With chmod refused, the keys must come out 0600 all the same."""
    from knowledgesg.federated.deploy import make_certificates, make_node_key

    def refuse(*args, **kwargs):
        raise AssertionError("a key's mode must not depend on a chmod after it was written")

    monkeypatch.setattr(os, "chmod", refuse)
    monkeypatch.setattr(Path, "chmod", refuse)
    umask = os.umask(0o022)  # the usual default: files readable by all
    try:
        private, _ = make_node_key(tmp_path / "keys", "bank_a")
        certificates = make_certificates(tmp_path / "tls")
    finally:
        os.umask(umask)
    for key in (private, certificates.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert not list(tmp_path.rglob("*.tmp"))


def _sentences(count: int, prefix: str = "s") -> list[InstructionRecord]:
    return [InstructionRecord(id=f"d/{i}", source="d", instruction=f"Classify: {prefix} number {i} moved the shares.", response="neutral") for i in range(count)]


def _renumbered(records: list[InstructionRecord]) -> list[InstructionRecord]:
    """Ids by line number, as a file without an id column gives them: a record inserted renumbers the rest."""
    return [r.model_copy(update={"id": f"d/{k}"}) for k, r in enumerate(records)]


def _contents(records) -> set[tuple[str, str]]:
    return {(r.instruction, r.response) for r in records}


@pytest.mark.parametrize("position", [0, 57, 200])
def test_one_record_more_changes_what_is_trained_on_by_one_record(position: int):
    """DP's neighbours are data sets one record apart; the server holds the seed and every other
    record, so preprocessing that moves many records when one is added (a seeded sample of
    positions changed 27 to 39 of 200 here) would let it tell the two training sets apart far beyond epsilon."""
    from knowledgesg.loaders import subsample_by_content
    from pipelines.ingest import hold_out

    records = _sentences(200)
    extra = InstructionRecord(id="d/x", source="d", instruction="Classify: the one record the attacker asks about.", response="positive")
    neighbour = _renumbered(records[:position] + [extra] + records[position:])
    trained, _ = hold_out(_renumbered(records), 20, 7, "bank_a")
    trained_neighbour, _ = hold_out(neighbour, 20, 7, "bank_a")
    assert len(_contents(trained) ^ _contents(trained_neighbour)) == 1  # the record itself, or the one it sent back to training
    # a client's `sample:` keeps a fixed number: the record in and at most one other out
    kept, kept_neighbour = subsample_by_content(_renumbered(records), 100, 7, "d"), subsample_by_content(neighbour, 100, 7, "d")
    assert len(kept) == len(kept_neighbour) == 100 and len(_contents(kept) ^ _contents(kept_neighbour)) in (0, 2)


def test_a_members_sample_is_chosen_by_content(tmp_path: Path):
    """The wiring: a client member's own file is sampled by content, so inserting a line moves no other record."""
    from knowledgesg.spec import load_spec
    from pipelines.ingest import client_records

    rows = [{"instruction": r.instruction, "response": r.response} for r in _sentences(60)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    write_jsonl(tmp_path / "b.jsonl", rows[:10])
    members = [{"id": "bank_a", "data": [{"path": "a.jsonl", "sample": 30}]}, {"id": "bank_b", "data": [{"path": "b.jsonl"}]}]
    path = write_spec(tmp_path, tiny_spec(clients={"members": members}))
    before = _contents(client_records(*load_spec(path))["bank_a"])
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Classify: one more line at the top.", "response": "negative"}, *rows])
    after = _contents(client_records(*load_spec(path))["bank_a"])
    assert len(before) == len(after) == 30 and len(before ^ after) in (0, 2)


# 13. N reaches the server only as the client's noised count ----------------------------------------

SIZE = 60  # the client's records; the adversary holds 59 of them


def sizes_stated(files: list[Path], batch_size: int) -> dict[str, set[int]]:
    """Every figure the adversary reads as a client's N, by file: partition.json's sizes, a
    manifest's record count of a client-side file, every num_units (but a count of clients),
    N x delta over delta, B / q of a DP-SGD mechanism, and "N = k" in any text."""
    stated: dict[str, set[int]] = {}

    def walk(value, where: str) -> None:
        add = stated.setdefault(where, set()).add
        if isinstance(value, dict):
            if where.endswith("partition.json") and isinstance(value.get("clients"), dict):
                for n in value["clients"].values():
                    add(int(n))
            if str(value.get("side", "")).startswith("client:") and isinstance(value.get("records"), int):
                add(value["records"])
            if isinstance(value.get("num_units"), int) and value.get("unit") != "client":
                add(value["num_units"])
            if isinstance(value.get("n_times_delta"), (int, float)) and value.get("delta"):
                add(round(value["n_times_delta"] / value["delta"]))
            if value.get("kind") == "poisson_gaussian" and value.get("sample_rate"):
                add(round(batch_size / value["sample_rate"]))
            for item in value.values():
                walk(item, where)
        elif isinstance(value, list):
            for item in value:
                walk(item, where)
        elif isinstance(value, str):
            for match in re.finditer(r"\bN\s*=\s*(\d+)", value):
                add(int(match.group(1)))

    for path in files:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:  # weights: no figure in them reads as N
            continue
        try:
            values = [json.loads(text)]
        except ValueError:  # JSON lines, or text (html, markdown)
            values = []
            for line in text.splitlines():
                try:
                    values.append(json.loads(line))
                except ValueError:
                    values.append(line)
        walk(values, str(path))
    return {where: found for where, found in stated.items() if found}


def one_bank(tmp_path: Path, privacy: dict, stages: list, audit: dict | None = None) -> Path:
    """A spec of one client holding SIZE records; without `count_noise` in `privacy`, the product's default."""
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(SIZE))
    spec = tiny_spec(clients={"members": [{"id": "bank", "data": [{"path": "data.jsonl"}]}]}, privacy=privacy, stages=stages, **({"audit": audit} if audit else {}))
    if "count_noise" not in privacy:
        del spec["privacy"]["count_noise"]  # not the tests' "N public"
    return write_spec(tmp_path, spec)


AUDITED = {"holdout_per_client": 5, "canaries": {"client": "bank", "count": 4, "repeats": 2, "kinds": ["digits"]}}


@pytest.mark.parametrize("audit", [None, AUDITED], ids=["plain", "holdout-and-canaries"])
def test_no_server_side_file_tells_whether_the_last_record_is_in(tmp_path: Path, monkeypatch, capsys, audit):
    """The adversary holds the spec, the server's files and 59 of the client's 60 records. Any file
    that states N (partition.json's size, a manifest's record count, num_units, N x delta, q = B/N,
    "N = 60") tells it whether the 60th record is in, whatever noise the adapter carries: epsilon
    infinite. Every figure it can read as N must be the client's noised count, drawn once on the
    client and entered in its ledger as a Gaussian release (the product's default), or that count
    less the audit's holdout and plus its canaries (public arithmetic)."""
    import pipelines.ingest

    monkeypatch.chdir(tmp_path)
    real = pipelines.ingest.noised_count
    shift = range(-5, 4) if audit else range(1)  # training N - N: the holdout out, 0 to 8 planted canary copies in

    def never_n(n: int, sigma: float, random) -> int:
        """The real draw, drawn again in this test only when it equals a size a leak would state:
        the leak would hide behind such a count."""
        while (drawn := real(n, sigma, random)) - n in shift:
            pass
        return drawn

    monkeypatch.setattr(pipelines.ingest, "noised_count", never_n)
    path = one_bank(tmp_path, {"target_epsilon": 8.0}, ["prepare_models", "ingest", ONE_STEP, HISTOGRAM], audit)
    capsys.readouterr()
    assert main(["run", str(path), "--run-dir", "run"]) == 0
    assert main(["privacy-report", "run"]) == 0
    console = "".join(capsys.readouterr())  # the run's lines and the report's table, both streams: logs the server may hold
    run_dir = tmp_path / "run"

    own = [json.loads(line) for ledger in (run_dir / "ledger").glob("*.jsonl") for line in ledger.read_text().splitlines()]
    counts = [e for e in own if e["stage"] == "ingest"]
    assert len(counts) == 1, "no noised count in the client's ledger: N reached the server as it is"
    count = counts[0]
    assert count["mechanism"]["kind"] == "gaussian" and count["mechanism"]["steps"] == 1 and count["mechanism"]["noise_multiplier"] >= 1
    assert count["private"] and count["noise"] == "os_entropy" and count["unit"] == "record"

    stats = read_json(run_dir / "stages/ingest/clients/bank/stats.json")  # the client's side: the true sizes
    trained = stats["records"]
    planned = count["num_units"] + trained - SIZE  # the same holdout and canaries, on the count
    assert stats["units"]["count"] == SIZE and stats["units"]["planned"] == planned and (trained != SIZE) == bool(audit)
    stated = sizes_stated(server_side_files(run_dir), batch_size=ONE_STEP["params"]["batch_size"])
    stated["the console"] = {int(n) for n in re.findall(r"\bN\s*=\s*(\d+)", console)}
    assert {"partition.json", "privacy.json", "ledger.json", "privacy_report.json"} <= {Path(w).name for w in stated}, stated  # the channels exist
    found = {n for values in stated.values() for n in values}
    assert planned in found and found <= {count["num_units"], planned}, stated  # each states the count, none N
    assert not {SIZE, trained} & found
    # its cost is charged with the other releases
    report = read_json(run_dir / "privacy_report.json")["clients"][0]
    assert count["release_id"] in {r["entry"]["release_id"] for r in report["releases"]}


def test_a_count_noised_from_the_spec_seed_gives_n_away(tmp_path: Path, monkeypatch):
    """Control: with privacy.reproducible_noise the adversary regenerates the count's noise from the
    spec, tries N = 59 and N = 60, and exactly the truth reproduces the released count. Such a
    count is NOT PRIVATE, and marked so."""
    from privacy.count import noised_count

    monkeypatch.chdir(tmp_path)
    path = one_bank(tmp_path, {"count_noise": 10, "reproducible_noise": True}, ["prepare_models", "ingest"])
    assert main(["run", str(path), "--run-dir", "run"]) == 0
    released = read_json(tmp_path / "run/stages/ingest/partition.json")["clients"]["bank"]
    fits = [n for n in (SIZE - 1, SIZE) if noised_count(n, 10.0, SecureRandom.from_public_seed(7, "ingest", "bank", "count:record")) == released]
    assert fits == [SIZE]
    entry = read_json(tmp_path / "run/stages/ingest/ledger.json")[0]
    assert not entry["private"] and entry["noise"] == "reproducible"


def neighbours_outcome(tmp_path: Path, size: int, privacy: dict, train: dict, released: int, monkeypatch) -> tuple[int, dict | None]:
    """What the adversary sees of one client holding `size` records whose count came out as
    `released`: whether the run went on (its exit code) and the mechanism its adapter states."""
    import pipelines.ingest

    workdir = tmp_path / f"n{size}"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(pipelines.ingest, "noised_count", lambda n, sigma, random: released)
    write_jsonl(workdir / "data.jsonl", sentiment_rows(size))
    spec = tiny_spec(clients={"members": [{"id": "bank", "data": [{"path": "data.jsonl"}]}]}, privacy={"count_noise": 10, **privacy},
                     stages=["prepare_models", "ingest", train])
    code = main(["run", str(write_spec(workdir, spec)), "--run-dir", "run"])
    released_by = workdir / f"run/stages/{train['name']}/ledger.json"
    return code, [e["mechanism"] for e in read_json(released_by)] if released_by.exists() else None


def cap_between(lower: int, privacy: dict, train: dict, tmp_path: Path) -> float:
    """A cap between the totals the owner's console plans at N = lower and N = lower + 1 (the exact N)."""
    from pipelines import load_pipeline
    from pipelines.check import plan_privacy

    totals = []
    for size in (lower, lower + 1):
        workdir = tmp_path / f"plan{size}"
        workdir.mkdir()
        write_jsonl(workdir / "data.jsonl", sentiment_rows(size))
        spec = tiny_spec(clients={"members": [{"id": "bank", "data": [{"path": "data.jsonl"}]}]}, privacy={"count_noise": 10, **privacy},
                         stages=["prepare_models", "ingest", train])
        loaded, base_dir, stages = load_pipeline(write_spec(workdir, spec))
        totals.append(plan_privacy(loaded, base_dir, stages, workdir / "run")[0].total_epsilon)
    assert totals[0] != totals[1]
    return sum(totals) / 2


GIVEN_NOISE = dict(ONE_STEP, params=dict(ONE_STEP["params"], noise_multiplier=1.0, epochs=1.0))
LOCAL_DP = {"name": "fedtune", "params": {"data": "private", "local_dp": {"target_epsilon": 2.0}, "rounds": 1,
                                          "training": {"steps": 1, "batch_size": 20, "max_length": 48}, "lora": {"r": 4}}}


@pytest.mark.parametrize("boundary", ["batch", "delta", "cap", "fedtune-batch"])
def test_whether_the_run_goes_on_does_not_tell_whether_the_last_record_is_in(tmp_path: Path, monkeypatch, boundary):
    """The adversary holds the spec and every record but one, and watches whether the client's run
    goes on. Any decision the pipeline makes from the exact N (the batch not below N, a delta not
    below 1/N, the planned total over the cap at q = B/N) refuses one neighbour and not the other:
    the refusal itself is the un-noised release. Given the same noised count, the neighbours at
    the boundary (N = 20 and 21) must fare alike, and here both must go on."""
    lower = 20
    if boundary == "batch":  # B = 20: not below N = 20, below N = 21
        privacy, train, released = {"target_epsilon": 8.0}, dict(ONE_STEP, params=dict(ONE_STEP["params"], batch_size=lower)), 40
    elif boundary == "delta":  # delta between 1/21 and 1/20; the count 18 keeps it below 1/N-hat
        privacy, train, released = {"target_epsilon": 8.0, "delta": 1 / (lower + 0.5)}, ONE_STEP, 18
    elif boundary == "cap":  # noise given, so the total moves with q = 4/N; a cap between the totals at N = 20 and 21
        privacy, train, released = {"target_epsilon": 8.0}, GIVEN_NOISE, 400
        privacy["cap_epsilon"] = cap_between(lower, privacy, train, tmp_path)
    else:  # DP-SGD local steps in federated rounds, a local batch of 20
        privacy, train, released = {"target_epsilon": 8.0}, LOCAL_DP, 40
    outcomes = [neighbours_outcome(tmp_path, size, privacy, train, released, monkeypatch) for size in (lower, lower + 1)]
    assert outcomes[0] == outcomes[1], f"N = {lower}: {outcomes[0]}; N = {lower + 1}: {outcomes[1]}"
    code, mechanisms = outcomes[0]
    batch = train["params"].get("batch_size") or train["params"]["training"]["batch_size"]
    assert code == 0 and mechanisms and all(m["sample_rate"] == pytest.approx(batch / released) for m in mechanisms)


def test_an_append_cut_short_is_dropped_not_joined(tmp_path: Path):
    """Power lost mid-append leaves a last line without its newline. Its fsync never returned, so its
    release was never published: it is read as absent, and the next entry is not written onto it
    (which had made the whole ledger unreadable, refusing the client for good)."""
    from privacy.ledger import ClientLedger

    entry = {"release_id": "first", "client_id": "bank", "stage": "dp_train", "release": "dp_adapter", "artifact": "a", "run_dir": "r",
             "released_at": "2026-01-01T00:00:00+00:00", "unit": "record", "num_units": 4, "delta": 1e-5,
             "mechanism": {"kind": "poisson_gaussian", "noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 2},
             "epsilon": {"delta": 1e-5, "prv": 1.0, "rdp": 1.0, "pld": 1.0, "reported": 1.0, "reported_by": "pld"}, "private": True, "noise": "os_entropy", "trust": "t"}
    ledger = ClientLedger.of_data(tmp_path, "k", "bank")
    ledger.append(LedgerEntry.model_validate(entry))
    whole = LedgerEntry.model_validate(dict(entry, release_id="torn", artifact="caf\u00e9")).model_dump_json().encode()
    with ledger.path.open("ab") as handle:
        handle.write(whole[: whole.index("\u00e9".encode()) + 1])  # cut inside a character, too
    assert [e.release_id for e in ledger.entries()] == ["first"]
    ledger.append(LedgerEntry.model_validate(dict(entry, release_id="second")))
    assert [e.release_id for e in ledger.entries()] == ["first", "second"]
    assert ledger.path.read_bytes().count(b"\n") == 2 and ledger.path.read_bytes().endswith(b"\n")
