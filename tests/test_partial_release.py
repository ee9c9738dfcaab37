"""Releases across resumes. A release stage that stopped part way: the clients it released for
are in their ledgers, so a resume reuses those releases, whether the code changed since (kept, as
a finished release is) or the stage was refused midway; a change of inputs or parameters does not
silently drop them and release again. And settings that decide whether a release may be made (the
cap, the ledger's place), not what it is, leave a finished release as it is."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import knowledgesg.runner as runner
from knowledgesg.errors import InputError
from knowledgesg.fileio import sha256_file
from knowledgesg.status import run_status
from pipelines import load_pipeline
from pipelines.dp_train import DPTrain
from privacy.accounting import epsilons
from privacy.ledger import TRUST_CLIENT_NOISE, LedgerEntry, compose, new_release_id, now
from pipelines.synthesize import Synthesize
from tests.conftest import run_in, sentiment_rows, tiny_spec, write_jsonl, write_spec
from tests.test_synthesize import SYNTH

ADAPTER = "run/stages/dp_train/clients/client_0/adapter/adapter_model.safetensors"
TRAIN = {"name": "dp_train", "params": {"batch_size": 4, "max_length": 48}}
PRIVACY = {"target_epsilon": 3.0, "cap_epsilon": 3.5}  # the cap holds one release per client, not two


def run(workdir: Path, stages: list, privacy: dict = PRIVACY) -> int:
    return run_in(workdir, "run", str(write_spec(workdir, tiny_spec(stages=stages, privacy=privacy))), "--run-dir", "run")


def releases(workdir: Path, kind: str = "dp_adapter") -> dict[str, int]:
    counts: dict[str, int] = {}
    for ledger in (workdir / "run/ledger").glob("*.jsonl"):
        for line in ledger.read_text().splitlines():
            entry = json.loads(line)
            if entry["release"] == kind:
                counts[entry["client_id"]] = counts.get(entry["client_id"], 0) + 1
    return counts


def stop_before(client_id: str, error: BaseException, method: str = "train_client", stage: type = DPTrain):
    """The stage's per-client work, stopped with `error` when it reaches `client_id`."""
    real = getattr(stage, method)

    def stopped(self, ctx, client, *args, **kwargs):
        if (client.client_id if hasattr(client, "client_id") else client) == client_id:
            raise error
        return real(self, ctx, client, *args, **kwargs)

    return stopped


@pytest.fixture
def stopped_after_client_0(tmp_path: Path, monkeypatch) -> Path:
    """dp_train released client_0, then the process died before client_1."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DPTrain, "train_client", stop_before("client_1", RuntimeError("killed")))
        with pytest.raises(RuntimeError, match="killed"):
            run(tmp_path, ["prepare_models", "ingest", TRAIN])
    assert releases(tmp_path) == {"client_0": 1}
    return tmp_path


def test_a_code_upgrade_resumes_a_partial_release_and_keeps_what_it_released(stopped_after_client_0: Path, monkeypatch):
    """The user pulls a fix and runs again: client_0's release is reused, not dropped and made
    again (the stage had been started over, its adapter deleted and client_0 refused by the cap)."""
    workdir = stopped_after_client_0
    adapter = sha256_file(workdir / ADAPTER)
    monkeypatch.setattr(runner, "code_sha256", lambda: "a newer version of the code")
    assert run(workdir, ["prepare_models", "ingest", TRAIN]) == 0
    assert releases(workdir) == {"client_0": 1, "client_1": 1}
    assert sha256_file(workdir / ADAPTER) == adapter


def test_a_partial_release_started_by_older_code_says_so(stopped_after_client_0: Path, monkeypatch, capsys):
    """A stage directory started by code that kept only the full fingerprint (plain text): after an
    upgrade nothing tells whether only the code changed, and nothing the user changed can be
    restored, so the message says what it is and what to do."""
    workdir = stopped_after_client_0
    started = workdir / "run/stages/dp_train/.started_with"
    started.write_text(json.loads(started.read_text())["full"])
    monkeypatch.setattr(runner, "code_sha256", lambda: "a newer version of the code")
    capsys.readouterr()
    assert run(workdir, ["prepare_models", "ingest", TRAIN]) == 2
    err = capsys.readouterr().err
    assert "stopped part way after releasing for client_0; it was started by an earlier version of ksg" in err, err
    assert releases(workdir) == {"client_0": 1} and (workdir / ADAPTER).is_file()


def test_a_partial_release_with_changed_parameters_is_not_started_over_unasked(stopped_after_client_0: Path, capsys):
    workdir = stopped_after_client_0
    adapter = sha256_file(workdir / ADAPTER)
    changed = dict(TRAIN, params=dict(TRAIN["params"], learning_rate=1e-3))
    capsys.readouterr()
    assert run(workdir, ["prepare_models", "ingest", changed]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"ksg: error: dp_train: stopped part way after releasing for client_0; its parameters, its inputs or an earlier stage's "
                     r"outputs changed since .* to make it, remove .*stages/dp_train", err), err
    assert sha256_file(workdir / ADAPTER) == adapter and releases(workdir) == {"client_0": 1}
    # `ksg status` says so too (it had said the interrupted stage would resume)
    write_spec(workdir, tiny_spec(stages=["prepare_models", "ingest", changed], privacy=PRIVACY))
    spec, base_dir, stages = load_pipeline(workdir / "spec.yaml")
    state = next(s for s in run_status(workdir / "run", spec, base_dir, stages) if s.name == "dp_train")
    assert state.state == "stale" and "`ksg run` stops here: stopped part way after releasing for client_0" in state.detail
    # with the parameters restored, the release resumes
    assert run(workdir, ["prepare_models", "ingest", TRAIN]) == 0
    assert releases(workdir) == {"client_0": 1, "client_1": 1} and sha256_file(workdir / ADAPTER) == adapter


def test_a_stage_refused_midway_keeps_the_releases_it_made(tmp_path: Path, monkeypatch):
    """A refusal (a one-line error) leaves nothing behind, but for what was released already: that
    is in the client's ledger, and deleting it would make the resume release it again."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DPTrain, "train_client", stop_before("client_1", InputError("client_1: refused midway")))
        assert run(tmp_path, ["prepare_models", "ingest", TRAIN]) == 2
    assert (tmp_path / ADAPTER).is_file() and (tmp_path / "run/stages/dp_train/units/client_0.json").is_file()
    adapter = sha256_file(tmp_path / ADAPTER)
    assert run(tmp_path, ["prepare_models", "ingest", TRAIN]) == 0
    assert releases(tmp_path) == {"client_0": 1, "client_1": 1} and sha256_file(tmp_path / ADAPTER) == adapter


def test_a_label_histogram_is_released_once_across_a_crash(tmp_path: Path, monkeypatch):
    """synthesize with `dp_histogram` released client_0's label counts, then died generating: the
    resume reuses that release instead of drawing (and spending on) a new one."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    histogram = dict(SYNTH, params=dict(SYNTH["params"], class_balance="dp_histogram", histogram_noise_multiplier=1.0))
    stages = ["prepare_models", "ingest", dict(TRAIN, params=dict(TRAIN["params"], epochs=0.2)), histogram]
    privacy = {"target_epsilon": 8.0}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Synthesize, "synthesize_client", stop_before("client_0", RuntimeError("killed"), "synthesize_client", Synthesize))
        with pytest.raises(RuntimeError, match="killed"):
            run(tmp_path, stages, privacy)
    counts = (tmp_path / "run/stages/synthesize/clients/client_0/label_histogram.json").read_text()
    assert releases(tmp_path, "dp_label_histogram") == {"client_0": 1}
    # a cap that holds the adapter and one histogram, not two: the resume's plan must not count
    # client_0's histogram again on top of its ledger entry (the cap is in no fingerprint)
    entries = [LedgerEntry.model_validate_json(line) for p in (tmp_path / "run/ledger").glob("*.jsonl") for line in p.read_text().splitlines()]
    spent = [e.effective_mechanism() for e in entries if e.client_id == "client_0"]
    histogram = next(e.mechanism for e in entries if e.release == "dp_label_histogram")
    delta = entries[0].delta
    cap = (compose(spent, delta).reported + compose(spent + [histogram], delta).reported) / 2
    assert run(tmp_path, stages, dict(privacy, cap_epsilon=cap)) == 0
    assert releases(tmp_path, "dp_label_histogram") == {"client_0": 1, "client_1": 1}
    assert (tmp_path / "run/stages/synthesize/clients/client_0/label_histogram.json").read_text() == counts


def test_tightening_the_cap_or_moving_the_ledger_keeps_a_finished_release(tmp_path: Path, monkeypatch, capsys):
    """The cap and the ledger's place decide whether a release may be made, not what it is: after
    dp_train, a tighter cap (still above what was spent) or the ledger moved with its entries is
    the same run. Both had made dp_train stale, and its rerun refused as a new release."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    stages = ["prepare_models", "ingest", TRAIN]
    assert run(tmp_path, stages, {"target_epsilon": 3.0, "cap_epsilon": 8.0}) == 0
    adapter = sha256_file(tmp_path / ADAPTER)
    (tmp_path / "run/ledger").rename(tmp_path / "ledgers")
    capsys.readouterr()
    assert run(tmp_path, stages, {"target_epsilon": 3.0, "cap_epsilon": 3.5, "ledger_dir": "ledgers"}) == 0
    assert re.search(r"dp_train\s+│ cached", capsys.readouterr().err)
    assert sha256_file(tmp_path / ADAPTER) == adapter and sum(1 for p in (tmp_path / "ledgers").glob("*.jsonl") for _ in p.read_text().splitlines()) == 2


def test_a_resume_with_another_ledger_directory_is_refused(tmp_path: Path, monkeypatch, capsys):
    """The ledger pointed elsewhere without its entries (another $KSG_LEDGER_DIR in the shell that
    resumes): the run's releases would be counted apart from its next ones, and a stage that
    reruns (ingest, after a code change) would draw a second count in a ledger without the first.
    Refused before any stage runs, until the ledger holding them is the one in use."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    stages = ["prepare_models", "ingest", TRAIN]
    assert run(tmp_path, stages) == 0
    adapter = sha256_file(tmp_path / ADAPTER)
    monkeypatch.setenv("KSG_LEDGER_DIR", str(tmp_path / "elsewhere"))
    capsys.readouterr()
    assert run(tmp_path, stages) == 2
    assert re.search(r"privacy ledger \S+/elsewhere: 2 of this run's 2 releases are not in it \(one of client 'client_\d' among them\): they were entered in another", capsys.readouterr().err)
    assert sha256_file(tmp_path / ADAPTER) == adapter and not (tmp_path / "elsewhere").exists()
    monkeypatch.delenv("KSG_LEDGER_DIR")
    assert run(tmp_path, stages) == 0  # the ledger that holds them: the run goes on


def test_a_resume_with_another_ledger_is_refused_for_a_stage_stopped_part_way_and_keeps_the_spec_copy(tmp_path: Path, monkeypatch, capsys):
    """The releases a stopped stage made (synthesize's label histogram: its marker under
    units/label_histogram/, which the check had not looked in) count too; and the refusal leaves
    the run's spec copy naming the ledger that holds them (ksg status and privacy-report read it)."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    histogram = dict(SYNTH, params=dict(SYNTH["params"], class_balance="dp_histogram", histogram_noise_multiplier=1.0))
    stages = ["prepare_models", "ingest", dict(TRAIN, params=dict(TRAIN["params"], epochs=0.2)), histogram]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Synthesize, "synthesize_client", stop_before("client_0", RuntimeError("killed"), "synthesize_client", Synthesize))
        with pytest.raises(RuntimeError, match="killed"):
            run(tmp_path, stages, {"target_epsilon": 8.0})
    ledgers = tmp_path / "run/ledger"
    kept = tmp_path / "kept"
    kept.mkdir()
    for path in ledgers.glob("*.jsonl"):  # the ledger without the histogram's entry: the dp_train entries alone
        lines = [line for line in path.read_text().splitlines() if '"dp_label_histogram"' not in line]
        (kept / path.name).write_text("".join(line + "\n" for line in lines))
    copy = (tmp_path / "run/spec.json").read_text()
    monkeypatch.setenv("KSG_LEDGER_DIR", str(kept))
    capsys.readouterr()
    assert run(tmp_path, stages, {"target_epsilon": 8.0}) == 2
    assert re.search(r"privacy ledger \S+/kept: 1 of this run's 3 releases are not in it \(one of client 'client_0' among them\)", capsys.readouterr().err)
    assert (tmp_path / "run/spec.json").read_text() == copy


def test_a_release_made_before_the_cap_left_the_fingerprint_is_kept(tmp_path: Path, monkeypatch, capsys):
    """A dp_train finished by the code before, whose content fingerprint held the cap, is still
    the same release for the code now (kept, not refused as changed)."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    stages = ["prepare_models", "ingest", TRAIN]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "NOT_WHAT_A_STAGE_COMPUTES", runner.EARLIER_LEFT_OUT)
        patch.setattr(runner, "code_sha256", lambda: "the code before")
        assert run(tmp_path, stages) == 0
    capsys.readouterr()
    assert run(tmp_path, stages) == 0
    assert re.search(r"dp_train\s+│ kept", capsys.readouterr().err)
    # and stays the same release when the cap is tightened after (its earlier content held the cap)
    assert run(tmp_path, stages, dict(PRIVACY, cap_epsilon=3.4)) == 0
    assert re.search(r"dp_train\s+│ kept", capsys.readouterr().err)
    assert releases(tmp_path) == {"client_0": 1, "client_1": 1}


def test_a_release_made_elsewhere_while_training_is_counted_before_the_adapter_is_entered(tmp_path: Path, monkeypatch, capsys):
    """Two runs over the same data and ledger: each checked the cap when its dp_train began. The
    release made by the other run while this one trained must be counted when this one is
    entered: it is refused under the ledger's lock, and its adapter never appears."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    real = DPTrain.train_client

    def another_run_released_meanwhile(self, ctx, plan, base):
        mechanism = plan.mechanism()
        ctx.client_ledger(plan.client_id).append(LedgerEntry(
            release_id=new_release_id(), client_id=plan.client_id, stage="dp_train", release="dp_adapter", artifact="stages/dp_train/elsewhere",
            run_dir="another run", released_at=now(), unit=plan.units.kind, num_units=plan.units.count, delta=plan.delta, mechanism=mechanism,
            epsilon=epsilons([mechanism], plan.delta), private=True, noise="os_entropy", trust=TRUST_CLIENT_NOISE))
        return real(self, ctx, plan, base)

    monkeypatch.setattr(DPTrain, "train_client", another_run_released_meanwhile)
    capsys.readouterr()
    assert run(tmp_path, ["prepare_models", "ingest", TRAIN]) == 2
    assert "client 'client_0': stage 'dp_train' would exceed the privacy budget cap" in capsys.readouterr().err
    assert releases(tmp_path) == {"client_0": 1}  # the other run's, alone
    assert not (tmp_path / "run/stages/dp_train").exists()


def test_a_release_stage_with_a_damaged_manifest_is_not_released_again_unasked(workdir: Path, capsys):
    """A dp_train manifest cut short (or written by a newer ksg) had read as no stage at all: the
    resume set the adapters aside and trained again, a second release nobody asked for. It is the
    same refusal as for any finished release made stale: remove the directory to make a new one."""
    stages = ["prepare_models", "ingest", TRAIN]
    assert run(workdir, stages) == 0
    (workdir / "run/stages/dp_train/manifest.json").write_text('{"stage": "dp_train", ', encoding="utf-8")
    adapter = sha256_file(workdir / ADAPTER)
    capsys.readouterr()
    assert run(workdir, stages) == 2
    assert re.search(r"dp_train: its manifest\.json cannot be read \(damaged\) \(its release\); running it again is a new release", capsys.readouterr().err)
    assert releases(workdir) == {"client_0": 1, "client_1": 1} and sha256_file(workdir / ADAPTER) == adapter
    spec, base_dir, built = load_pipeline(workdir / "spec.yaml")
    state = {s.name: (s.state, s.detail) for s in run_status(workdir / "run", spec, base_dir, built)}["dp_train"]
    assert state == ("stale", "its manifest.json cannot be read (damaged); `ksg run` stops before a new release (remove its directory to make one)"), state


def test_an_adapter_published_before_the_process_stopped_is_kept_not_drawn_again(tmp_path: Path, monkeypatch, capsys):
    """Killed between publishing client_0's adapter (its ledger entry fsynced first) and marking
    the client done: the resume had trained client_0 again, a second release of its data. It adopts
    the published one: one release per client, the adapter unchanged."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    stages = ["prepare_models", "ingest", TRAIN]
    from knowledgesg.stage import StageContext

    real = StageContext.mark_unit_done

    class Killed(BaseException):
        """What SIGKILL leaves on disk: no marker, no manifest (nothing catches it on the way out)."""

    def killed(self, unit, outputs, payload):
        if unit == "client_0":
            raise Killed
        return real(self, unit, outputs, payload)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StageContext, "mark_unit_done", killed)
        with pytest.raises(Killed):
            run(tmp_path, stages)
    adapter = sha256_file(tmp_path / ADAPTER)
    assert releases(tmp_path) == {"client_0": 1}
    # resumed with a ledger that does not hold it: refused (drawn again, the two would sit in two ledgers)
    monkeypatch.setenv("KSG_LEDGER_DIR", str(tmp_path / "elsewhere"))
    capsys.readouterr()
    assert run(tmp_path, stages) == 2
    assert "was released for client 'client_0', but no entry of the ledger in" in capsys.readouterr().err
    monkeypatch.delenv("KSG_LEDGER_DIR")
    # under the cap that holds one release per client: ksg run's check must not plan client_0's again
    assert run(tmp_path, stages) == 0
    assert "dp_train client_0: its adapter was published before the process stopped: that release kept" in capsys.readouterr().err
    assert releases(tmp_path) == {"client_0": 1, "client_1": 1} and sha256_file(tmp_path / ADAPTER) == adapter
    assert json.loads((tmp_path / "run/stages/dp_train/clients/client_0/privacy.json").read_text())["unit"] == "record"


def test_a_label_histogram_written_before_the_process_stopped_is_kept_not_drawn_again(tmp_path: Path, monkeypatch):
    """Killed between writing client_0's label counts (their ledger entry fsynced first) and marking
    them done: the resume had drawn them again. It adopts the written ones."""
    from knowledgesg.stage import StageContext

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(40))
    histogram = dict(SYNTH, params=dict(SYNTH["params"], class_balance="dp_histogram", histogram_noise_multiplier=1.0))
    stages = ["prepare_models", "ingest", dict(TRAIN, params=dict(TRAIN["params"], epochs=0.2)), histogram]
    real = StageContext.mark_unit_done

    class Killed(BaseException):
        """What SIGKILL leaves on disk: no marker, no manifest."""

    def killed(self, unit, outputs, payload):
        if self.stage_name == "synthesize" and "client_0" in unit:
            raise Killed
        return real(self, unit, outputs, payload)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StageContext, "mark_unit_done", killed)
        with pytest.raises(Killed):
            run(tmp_path, stages, {"target_epsilon": 8.0})
    counts = (tmp_path / "run/stages/synthesize/clients/client_0/label_histogram.json").read_text()
    assert run(tmp_path, stages, {"target_epsilon": 8.0}) == 0
    assert releases(tmp_path, "dp_label_histogram") == {"client_0": 1, "client_1": 1}
    assert (tmp_path / "run/stages/synthesize/clients/client_0/label_histogram.json").read_text() == counts
