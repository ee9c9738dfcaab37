"""Accounting math against pinned reference values; calibration; budgets; composition."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from knowledgesg.errors import InputError
from privacy.accounting import Mechanism, calibrate_noise, smallest_noise_multiplier, check_delta, default_delta, epsilon_pld, epsilons, group_epsilon, pld_grid
from privacy.ledger import LedgerEntry, check_budget, compose, composed_total, new_release_id, now

REFERENCE = Mechanism(kind="poisson_gaussian", noise_multiplier=1.0, sample_rate=0.0256, steps=117)


def test_matches_dp_accounting_references_within_2_percent():
    eps = epsilons([REFERENCE], delta=1e-5)
    assert eps.rdp == pytest.approx(2.335, rel=0.02)
    assert eps.pld == pytest.approx(1.924, rel=0.02)
    assert eps.prv == pytest.approx(1.934, rel=0.02)
    assert eps.reported == eps.prv and eps.reported_by == "prv"


@pytest.mark.parametrize("target,q,steps,delta", [(8.0, 0.04, 25, 4e-4), (1.0, 0.01, 300, 1e-5), (3.0, 0.1, 50, 1e-4), (0.5, 0.005, 1000, 1e-6)])
def test_calibration_hits_the_target_within_1_percent(target, q, steps, delta):
    sigma, accountant = calibrate_noise(target, delta, q, steps)
    achieved = epsilons([Mechanism(kind="poisson_gaussian", noise_multiplier=sigma, sample_rate=q, steps=steps)], delta)
    assert accountant == "prv"
    assert achieved.prv <= target * 1.001  # never above the target (PRV's own error aside)
    assert achieved.prv == pytest.approx(target, rel=0.01)
    assert achieved.pld <= target  # the accountant the report and the cap use: not above it either


def _exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """The exact epsilon of the Gaussian mechanism at sensitivity 1 (Balle and Wang 2018, Theorem 8)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    return brentq(lambda eps: norm.cdf(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * norm.cdf(-1 / (2 * sigma) - eps * sigma) - delta, 0.0, 200.0)


@pytest.mark.parametrize("sigma", [1.0, 4.0, 10.0])
def test_a_gaussian_releases_epsilon_is_an_upper_bound_close_to_the_exact_one(sigma):
    """The noised count and the label histogram are Gaussian mechanisms: their PLD epsilon is
    checked against the closed form, from above (a figure below it would overstate the privacy)."""
    exact = _exact_gaussian_epsilon(sigma, 1e-5)
    stated = epsilons([Mechanism(kind="gaussian", noise_multiplier=sigma)], 1e-5)
    assert exact <= stated.pld <= exact + 0.01, (exact, stated)


@pytest.mark.parametrize("target", [0.05, 1.0, 8.0, 30.0, 200.0])
def test_noise_search_lands_just_under_the_target_in_few_calls_never_far_below_the_answer(target):
    """On a curve that grows faster than 1/sigma as the noise falls (as DP-SGD's epsilon does): the
    answer's epsilon is at most the target and within the tolerance, in at most 10 calls (Opacus's
    bisection: 11-16), and no call asks about a sigma more than 4x below the answer (an accountant
    asked about a tiny sigma can run out of memory)."""
    def epsilon(sigma: float) -> float:
        return 2.0 / sigma + 0.5 / sigma**3

    asked: list[float] = []
    sigma = smallest_noise_multiplier(lambda s: asked.append(s) or epsilon(s), target, 0.005 * target)
    assert 0 <= target - epsilon(sigma) <= 0.005 * target
    assert len(asked) <= 10 and min(asked) >= sigma / 4


def test_noise_search_never_takes_a_nan_epsilon_for_one_within_budget():
    """`eps > target` is False for NaN: an accountant's NaN must stop the search (the caller
    falls back to another accountant), never become the answer."""
    def epsilon(sigma: float) -> float:
        return math.nan if 0.4 < sigma < 0.6 else 2.0 / sigma + 0.5 / sigma**3

    with pytest.raises(ArithmeticError, match="NaN"):
        smallest_noise_multiplier(epsilon, 8.0, 0.04)
    with pytest.raises(ArithmeticError, match="no noise multiplier below"):
        smallest_noise_multiplier(lambda sigma: 0.0, 8.0, 0.04)


def test_more_noise_less_epsilon_more_steps_more_epsilon():
    base = epsilons([REFERENCE], 1e-5).reported
    assert epsilons([REFERENCE.model_copy(update={"noise_multiplier": 2.0})], 1e-5).reported < base
    assert epsilons([REFERENCE.model_copy(update={"steps": 500})], 1e-5).reported > base


def test_impossible_budgets_are_refused():
    with pytest.raises(InputError, match="target_epsilon must be > 0"):
        calibrate_noise(0.0, 1e-5, 0.01, 100)
    with pytest.raises(InputError, match="budget is too low"):
        calibrate_noise(1e-6, 1e-9, 0.9, 10_000)
    with pytest.raises(InputError, match=r"privacy\.delta: 0\.01 is not below 1/N = 0\.01 for the N = 100 records"):
        check_delta(0.01, 100, "record")
    check_delta(default_delta(100), 100, "record")


@pytest.mark.parametrize("n,expected", [(20, 1e-5), (133, 1e-5), (1000, 1e-5), (1500, 1e-6), (20_000, 1e-7)])
def test_default_delta_is_far_below_one_over_n_and_a_power_of_ten(n, expected):
    delta = default_delta(n)
    assert delta == pytest.approx(expected) and delta <= 1e-5 and n * delta <= 0.01


def test_non_private_and_post_processing():
    assert math.isinf(epsilons([Mechanism(kind="non_private", steps=10)], 1e-5).reported)
    free = epsilons([Mechanism(kind="post_processing")], 1e-5)
    assert free.reported == 0.0 and free.reported_by == "none"
    assert compose([REFERENCE, Mechanism(kind="post_processing")], 1e-5).reported == pytest.approx(epsilon_pld([REFERENCE], 1e-5))


def test_composition_of_heterogeneous_releases():
    histogram = Mechanism(kind="gaussian", noise_multiplier=5.0)
    single = compose([REFERENCE], 1e-5).reported
    both = compose([REFERENCE, histogram], 1e-5)
    twice = compose([REFERENCE, REFERENCE], 1e-5).reported
    assert single < both.reported < twice < 2 * single  # composition is sub-additive for Gaussians
    assert both.reported_by == "pld" and both.prv is not None


def _entry(client: str, mechanism: Mechanism, private: bool = True, unit: str = "record") -> LedgerEntry:
    return LedgerEntry(release_id=new_release_id(), client_id=client, stage="dp_train", release="dp_adapter", artifact="x", run_dir="/r", released_at=now(),
                       unit=unit, delta=1e-5, mechanism=mechanism, epsilon=epsilons([mechanism], 1e-5), private=private,
                       noise="os_entropy" if private else "reproducible", trust="t")


def test_a_release_without_a_guarantee_makes_the_total_infinite_and_client_level_is_apart():
    assert math.isinf(composed_total([_entry("a", REFERENCE), _entry("a", REFERENCE, private=False)], 1e-5).reported)
    client_level = _entry("a", REFERENCE, unit="client")
    assert composed_total([_entry("a", REFERENCE), client_level], 1e-5).reported == pytest.approx(compose([REFERENCE], 1e-5).reported)


@pytest.mark.parametrize("mechanism", [REFERENCE, Mechanism(kind="poisson_gaussian", noise_multiplier=0.5748, sample_rate=0.0625, steps=16),
                                       Mechanism(kind="poisson_gaussian", noise_multiplier=0.8, sample_rate=0.001, steps=1000)])
def test_the_default_pld_grid_bounds_epsilon_from_above_within_0_0015_of_a_fine_one(mechanism, monkeypatch):
    import dp_accounting.pld

    grids = []
    real = dp_accounting.pld.PLDAccountant

    def recording(value_discretization_interval, **kwargs):
        grids.append(value_discretization_interval)
        return real(value_discretization_interval=value_discretization_interval, **kwargs)

    fine = epsilon_pld([mechanism], 1e-6, discretization=1e-4)
    monkeypatch.setattr(dp_accounting.pld, "PLDAccountant", recording)
    default = epsilon_pld([mechanism], 1e-6)
    assert grids == [pld_grid([mechanism])] and grids[0] >= 1e-3  # the composition ran on the coarse grid
    assert fine <= default <= fine + 0.0015


def test_the_pld_grid_gets_finer_with_the_steps_it_composes_down_to_1e_4():
    assert pld_grid([REFERENCE]) == 1e-3
    assert pld_grid([REFERENCE] * 20) == pytest.approx(1 / (20 * REFERENCE.steps))
    assert pld_grid([REFERENCE] * 200) == 1e-4
    assert pld_grid([Mechanism(kind="post_processing", steps=0)]) == 1e-3


def test_group_epsilon_is_tight_for_one_and_grows_with_the_group():
    single = epsilon_pld([REFERENCE], 1e-5)
    assert group_epsilon([REFERENCE], 1, 1e-5) == pytest.approx(single, rel=0.02)
    two, four = group_epsilon([REFERENCE], 2, 1e-5), group_epsilon([REFERENCE], 4, 1e-5)
    assert single < two < four
    histogram = Mechanism(kind="gaussian", noise_multiplier=8.0)
    # the Gaussian mechanism for a group of 4: sensitivity 4, i.e. sigma / 4
    assert group_epsilon([histogram], 4, 1e-5) == pytest.approx(epsilon_pld([Mechanism(kind="gaussian", noise_multiplier=2.0)], 1e-5), rel=0.02)


def test_budget_guard_names_spent_requested_and_cap():
    spent = [_entry("a", REFERENCE)]
    check_budget(spent, "a", [Mechanism(kind="post_processing")], 1e-5, cap=2.0, stage="synthesize")
    with pytest.raises(InputError, match=r"client 'a': stage 'dp_train' would exceed the privacy budget cap \(spent epsilon 1\.92\d, requested 1\.92\d, composed total 2\.\d+ > cap 2\.5\)"):
        check_budget(spent, "a", [REFERENCE], 1e-5, cap=2.5, stage="dp_train")
    with pytest.raises(InputError, match=r"client 'a': privacy budget cap already spent before stage 'fedtune' \(spent epsilon 1\.92\d over 1 release\(s\), cap 1\.5\)"):
        check_budget(spent, "a", [REFERENCE], 1e-5, cap=1.5, stage="fedtune")
    check_budget([], "b", [REFERENCE], 1e-5, cap=2.5, stage="dp_train")  # b's ledger is its own


def test_calibration_that_no_accountant_can_do_names_the_spec_key(monkeypatch):
    import opacus.accountants

    class Broken:
        history: list = []

        def get_epsilon(self, **kwargs):
            return math.nan

    monkeypatch.setattr(opacus.accountants, "create_accountant", lambda mechanism: Broken())
    calibrate_noise.cache_clear()
    with pytest.raises(InputError, match=r"^fedtune\.local_dp\.target_epsilon: could not calibrate noise for epsilon 3 "):
        calibrate_noise(3.0, 1e-5, 0.02, 77, "fedtune.local_dp.target_epsilon")
    calibrate_noise.cache_clear()


def test_rdp_is_reported_when_prv_fails(monkeypatch):
    import privacy.accounting as accounting

    def broken(*args, **kwargs):
        raise ArithmeticError("PRV returned nan")

    monkeypatch.setattr(accounting, "epsilon_prv", broken)
    accounting._epsilons.cache_clear()  # a figure cached by an earlier test came from a working PRV
    eps = accounting.epsilons([REFERENCE], 1e-5)
    accounting._epsilons.cache_clear()
    assert eps.prv is None and eps.reported_by == "rdp" and eps.reported == pytest.approx(2.335, rel=0.02)


def test_a_sent_ledger_says_neither_where_nor_when_each_release_was_made(tmp_path: Path, monkeypatch):
    """The times of a client's releases, one less another, say how long its stages ran (the count's
    to the adapter's is dp_train, which follows the sampled records' lengths): the ledger a client
    sends gives each release's day only, in the order its entries were made; and the same releases
    read the same in every send (a resend stamped anew had been a new release to the server, and
    every stage after it ran again)."""
    import knowledgesg.exchange
    from knowledgesg.exchange import CLIENT_LEDGER, export_releases

    mechanism = Mechanism(kind="poisson_gaussian", noise_multiplier=1.0, sample_rate=0.1, steps=10)
    entries = [_entry("bank", mechanism).model_copy(update={"released_at": at, "run_dir": "/home/owner/runs/x"})
               for at in ("2026-01-01T10:00:00+00:00", "2026-01-01T10:41:07+00:00")]
    sends = []
    for clock in ("2026-01-02T09:00:00+00:00", "2026-01-03T17:30:12+00:00"):  # two sends, days apart
        monkeypatch.setattr(knowledgesg.exchange, "now", lambda: clock)
        part = export_releases(tmp_path / "run", [], "bank", tmp_path / "exchange", entries, None)
        sends.append((part / CLIENT_LEDGER).read_bytes())
    sent = [json.loads(line) for line in sends[0].decode().splitlines()]
    assert [e["release_id"] for e in sent] == [e.release_id for e in entries]
    assert {e["released_at"] for e in sent} == {"2026-01-01T00:00:00+00:00"} and {e["run_dir"] for e in sent} == {"client:bank"}
    assert sends[0] == sends[1]


def test_the_servers_received_copy_keeps_the_clients_order(tmp_path: Path):
    """A received copy mixes entries sent before sent entries gave their day only (the send time to
    the second) with later ones (the day): sorted by time, a newer release would come first, and its
    delta would no longer be the client's latest."""
    from privacy.ledger import ClientLedger

    mechanism = Mechanism(kind="poisson_gaussian", noise_multiplier=1.0, sample_rate=0.1, steps=10)
    older = _entry("bank", mechanism).model_copy(update={"released_at": "2026-01-03T17:30:12+00:00", "delta": 1e-5})
    newer = _entry("bank", mechanism).model_copy(update={"released_at": "2026-01-03T00:00:00+00:00", "delta": 1e-6})
    path = tmp_path / "received" / "bank.jsonl"
    path.parent.mkdir()
    path.write_text("".join(e.model_dump_json() + "\n" for e in (older, newer)))
    assert [e.release_id for e in ClientLedger(path).entries()] == [older.release_id, newer.release_id]


def test_a_ledgers_file_name_does_not_confirm_a_guess_of_the_data(tmp_path: Path):
    """Whoever holds every record but one hashes each candidate data set: with ledger files named by
    the unkeyed fingerprint, the name an error line prints (a damaged ledger) told which one is in."""
    from privacy import ledger as ledgers
    from privacy.ledger import ClientLedger, data_key

    rows = [{"id": f"r{i}", "text": f"record {i}", "label": "positive"} for i in range(5)]
    candidates = [[*rows[:4], {**rows[4], "label": label}] for label in ("positive", "negative", "neutral")]
    first = _entry("bank_a", REFERENCE)
    ClientLedger.of_data(tmp_path, data_key(candidates[1]), "bank_a").append(first)
    names = {p.name for p in tmp_path.glob("*.jsonl")}
    assert len(names) == 1 and not names & {f"{data_key(c)[:32]}.jsonl" for c in candidates}
    assert (tmp_path / ledgers.NAME_KEY).stat().st_mode & 0o077 == 0
    # the same data finds its ledger again in the same directory, and has another name in another
    again = ClientLedger.of_data(tmp_path, data_key(candidates[1]), "bank_a")
    assert [e.release_id for e in again.own_entries()] == [first.release_id] and again.path.name in names
    elsewhere = ClientLedger.of_data(tmp_path / "other", data_key(candidates[1]), "bank_a")
    elsewhere.append(_entry("bank_a", REFERENCE))
    assert elsewhere.path.name not in names


def test_a_ledger_under_its_unkeyed_name_stays_where_it_is(tmp_path: Path):
    """Ledgers written by earlier versions, named by the unkeyed fingerprint, keep their name and
    their entries: renamed, a file would vanish from under a process listing the directory."""
    from privacy.ledger import NAME_KEY, ClientLedger, data_key

    key = data_key([{"id": "r1", "text": "x"}])
    old, new = _entry("bank_a", REFERENCE), _entry("bank_a", REFERENCE)
    (tmp_path / f"{key[:32]}.jsonl").write_text(old.model_dump_json() + "\n", encoding="utf-8")
    ClientLedger.of_data(tmp_path, key, "bank_a").append(new)
    assert [e.release_id for e in ClientLedger(tmp_path / f"{key[:32]}.jsonl").own_entries()] == [old.release_id, new.release_id]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", f"{key[:32]}.jsonl"] and not (tmp_path / NAME_KEY).exists()


def test_a_reader_made_before_the_first_entry_finds_it(tmp_path: Path):
    """A ledger object made while the directory had no name key (another run then wrote this data's
    first entry) reads that entry: it was made under the keyed name. (A guard of the keyed naming
    itself: with unkeyed names the path never changed.)"""
    from privacy.ledger import ClientLedger, data_key

    key = data_key([{"id": "r1", "text": "x"}])
    early = ClientLedger.of_data(tmp_path, key, "bank_a")
    entry = _entry("bank_a", REFERENCE)
    ClientLedger.of_data(tmp_path, key, "bank_a").append(entry)
    assert [e.release_id for e in early.own_entries()] == [entry.release_id]


@pytest.mark.parametrize("damage", [b"", b"short"])
def test_a_damaged_name_key_is_refused_not_replaced(tmp_path: Path, damage: bytes):
    """A new key would leave the directory's ledgers unfound by name: each data set's noised count
    drawn again, a release published before a crash refused rather than adopted."""
    from knowledgesg.errors import KsgError
    from privacy.ledger import NAME_KEY, ClientLedger

    (tmp_path / NAME_KEY).write_bytes(damage)
    with pytest.raises(KsgError, match=r"\.name_key: damaged"):
        ClientLedger.of_data(tmp_path, "a" * 64, "bank_a").append(_entry("bank_a", REFERENCE))
    assert (tmp_path / NAME_KEY).read_bytes() == damage and not list(tmp_path.glob("*.jsonl"))


def test_ledgers_moved_without_their_name_key_are_refused_not_begun_again(tmp_path: Path):
    """`mv old/* new/` leaves the dotfile behind: a new key would find no data set's ledger by name,
    begin a second one, and draw its noised count again."""
    from knowledgesg.errors import KsgError
    from privacy.ledger import ClientLedger, data_key

    key = data_key([{"id": "r1", "text": "x"}])
    ClientLedger.of_data(tmp_path / "old", key, "bank_a").append(_entry("bank_a", REFERENCE))
    (tmp_path / "new").mkdir()
    for path in (tmp_path / "old").glob("*.jsonl"):
        path.rename(tmp_path / "new" / path.name)
    with pytest.raises(KsgError, match=r"new: holds ledgers named with a key but not the key \(\.name_key"):
        ClientLedger.of_data(tmp_path / "new", key, "bank_a").append(_entry("bank_a", REFERENCE))
    assert len(list((tmp_path / "new").glob("*.jsonl"))) == 1


def test_a_reader_that_looked_just_before_another_process_made_the_key_is_not_refused(tmp_path: Path, monkeypatch):
    """Readers look for the name key outside the directory lock: one that found no key, then (after
    another process made the key and the directory's first keyed ledger) found a keyed ledger, took
    the directory for one moved without its key and refused a sound ledger."""
    from privacy import ledger as ledgers
    from privacy.ledger import ClientLedger, data_key

    key = data_key([{"id": "r1", "text": "x"}])
    entry = _entry("bank_a", REFERENCE)
    ClientLedger.of_data(tmp_path, key, "bank_a").append(entry)
    real_is_file, looked = Path.is_file, []

    def key_not_there_yet(path: Path) -> bool:  # the reader's first look comes before the writer's key
        if path.name == ledgers.NAME_KEY and not looked:
            looked.append(path)
            return False
        return real_is_file(path)

    monkeypatch.setattr(Path, "is_file", key_not_there_yet)
    assert [e.release_id for e in ClientLedger.of_data(tmp_path, key, "bank_a").own_entries()] == [entry.release_id]
    assert looked


def test_an_old_ledger_moved_in_beside_a_keyed_one_of_the_same_data_is_read_with_it(tmp_path: Path):
    """A ledger an earlier version named by the unkeyed fingerprint, moved into a directory that
    already keeps this data set's keyed ledger: read alone, the old file hid the keyed one's
    releases from this data set (its noised count drawn again, a release published before a crash
    refused rather than adopted); the budget, which reads every ledger naming the client, was whole."""
    from privacy.ledger import ClientLedger, data_key

    key = data_key([{"id": "r1", "text": "x"}])
    newer = _entry("bank_a", REFERENCE)
    ClientLedger.of_data(tmp_path, key, "bank_a").append(newer)  # keyed: the directory's first entry made its name key
    older = _entry("bank_a", REFERENCE)
    (tmp_path / f"{key[:32]}.jsonl").write_text(older.model_dump_json() + "\n", encoding="utf-8")  # moved in from elsewhere
    ledger = ClientLedger.of_data(tmp_path, key, "bank_a")
    assert ledger.path.name == f"{key[:32]}.jsonl"  # it keeps writing where it did
    assert sorted(e.release_id for e in ledger.own_entries()) == sorted([older.release_id, newer.release_id])
    assert sorted(e.release_id for e in ledger.entries()) == sorted([older.release_id, newer.release_id])


def test_a_federated_rounds_entry_leaves_the_client_without_the_digest_of_its_update():
    """The client's ledger names each round's update by its SHA-256; sent (beside the update, or in
    a later export of the ledger) that digest let a server that never saw the update, under secure
    aggregation, confirm a guess of it. A DP adapter's digest, of a file the server receives, stays."""
    from privacy.ledger import as_sent

    round_entry = _entry("bank_a", REFERENCE).model_copy(update={"stage": "fedtune", "artifact": "stages/fedtune/rounds.json#round=3", "artifact_sha256": "ab" * 32})
    adapter_entry = _entry("bank_a", REFERENCE).model_copy(update={"artifact_sha256": "cd" * 32})
    assert as_sent(round_entry)["artifact_sha256"] is None and as_sent(round_entry)["release_id"] == round_entry.release_id
    assert as_sent(adapter_entry)["artifact_sha256"] == "cd" * 32


def test_a_ledger_that_cannot_be_opened_is_one_line_without_an_old_unkeyed_name(tmp_path: Path, monkeypatch):
    """A ledger file the process may not read or write had raised an OSError whose traceback
    printed the path: for a ledger an earlier version named by its data's unkeyed fingerprint, the
    name that confirms a guess of the data. (The tests run as root, which reads anything: the
    refusals are the operating system's, simulated.)"""
    from knowledgesg.errors import KsgError
    from privacy import ledger as ledgers
    from privacy.ledger import ClientLedger

    legacy = tmp_path / f"{'c' * 32}.jsonl"
    legacy.write_text(_entry("bank_a", REFERENCE).model_dump_json() + "\n", encoding="utf-8")
    denied = PermissionError(13, "Permission denied")
    real_read, real_open = Path.read_bytes, os.open
    monkeypatch.setattr(Path, "read_bytes", lambda path: (_ for _ in ()).throw(denied) if path == legacy else real_read(path))
    monkeypatch.setattr(ledgers.os, "open", lambda path, *args: (_ for _ in ()).throw(denied) if Path(path) == legacy else real_open(path, *args))
    ledger = ClientLedger.of_data(tmp_path, "c" * 64, "bank_a")
    for attempt, what in ((ledger.own_entries, "unreadable ledger"), (lambda: ledger._write(_entry("bank_a", REFERENCE)), "cannot write the ledger")):
        with pytest.raises(KsgError, match=rf"<ledger named by an earlier version, inode \d+: `ls -i` finds it>: {what} \(Permission denied\)") as refused:
            attempt()
        assert "c" * 32 not in str(refused.value)
