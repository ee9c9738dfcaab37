"""The privacy ledger: every release that ever left a client, kept on the client, never forgotten.

Each release is recorded twice:

- in the client's own ledger (`ClientLedger`): one append-only JSONL file per client data set in
  the ledger directory, named by a fingerprint of the client's data keyed with a secret kept in
  that directory (`.name_key`), so that a rerun, or another run over the same data pointed at the
  same directory, keeps counting, and the name, which error lines print, tells nothing to whoever
  holds all the data but one record (an unkeyed digest did: hash each candidate for it, compare).
  Ledgers that earlier versions named by the unkeyed digest keep their names (a file renamed
  would vanish from under a process listing the directory); the name key moves with the ledgers.
  An entry is appended and fsynced *before* the release is published (renamed into the stage's
  outputs, or sent to the server), and it is never rewritten or deleted: a rerun is a new release that adds to the
  total, and a release that a crash may have let out is counted even if it is redone.
- in the stage's `ledger.json` among its artifacts: the server's copy of what it received.

A data set that changes (a record added or edited, the file renamed, another sample of the same
source) gets a ledger of its own, but its budget is not fresh: a client's spent budget counts
every ledger in the directory whose entries name that client, whether or not the data sets share a
person (counting only those that did would make the budget, hence what the client sends and
whether its cap refuses, a function of that overlap, which tells whether a record is in). The
ledger directory is the budget's scope: over-counting is safe, and data with no person in common
goes to a ledger directory of its own. Another client's ledger is never counted (the simulation
keeps every client's ledgers in one directory).

A client's spent budget composes (PLD) every release found in either, each once (by its
`release_id`); a stage that would push it past `privacy.cap_epsilon` refuses to start. The
ledger directory is `$KSG_LEDGER_DIR` (the data owner's own setting wins), else
`privacy.ledger_dir`, else `RUN/ledger`. It holds a fingerprint of the client's data, so it
belongs to the client and is never copied to the server.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hmac
import math
import os
import re
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from knowledgesg.errors import InputError, KsgError
from knowledgesg.fileio import atomic_open, canonical_json, fsync_path, read_json, sha256_file, sha256_text
from knowledgesg.manifest import read_manifest
from privacy.accounting import Epsilons, Mechanism, epsilon_pld, epsilon_prv_or_none, epsilon_rdp

LEDGER = "ledger.json"
LEDGER_LOCK = ".lock"  # in a ledger directory: held while a release is checked against the cap and entered
LEDGER_ENV = "KSG_LEDGER_DIR"
NAME_KEY = ".name_key"  # in a ledger directory: the secret that keys its ledger files' names
NAME_KEY_BYTES = 32
KEYED = "k-"  # the names made with the key begin so; the unkeyed names earlier versions made are bare hex
_UNKEYED_NAME = re.compile(r"[0-9a-f]{32}\.jsonl")

NoiseUsed = Literal["os_entropy", "reproducible", "none"]

# Who a guarantee holds against, by how its noise was made; shown beside every release.
TRUST_CLIENT_NOISE = "everyone, the server operator included: the noise is drawn on the client from OS entropy"
TRUST_REPRODUCIBLE = "no one: the noise comes from the public spec seed (privacy.reproducible_noise), so anyone with the spec can regenerate and cancel it"
TRUST_NON_PRIVATE = "no one: trained without noise or clipping (the non-private reference)"
TRUST_POST_PROCESSING = "inherits the guarantee of the releases it is computed from: no private record is read"
TRUST_SERVER_NOISE = "holders of the final model only: the server adds this noise and sees each client's clipped update"


class LedgerEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    release_id: str  # the same release wherever a copy of its entry is kept
    client_id: str
    stage: str
    release: str  # what left the client, e.g. "dp_adapter"; or a post-processing step
    artifact: str  # the released artifact, relative to the run directory
    artifact_sha256: str | None = None  # of the released bytes, as they were published
    run_dir: str  # the run that released it
    released_at: str
    unit: str  # record | source_document | user | client
    num_units: int | None = None  # the N planned with: the client's noised count N̂ (privacy.count_noise), or N where it is 0 (public)
    delta: float
    mechanism: Mechanism
    epsilon: Epsilons
    private: bool
    noise: NoiseUsed
    trust: str

    @property
    def counts_against_budget(self) -> bool:
        """Client-level figures are a different unit (whole clients) and hold against fewer parties."""
        return self.unit != "client"

    @property
    def costs_privacy(self) -> bool:
        """A release that spends budget (not post-processing)."""
        return self.counts_against_budget and self.mechanism.kind != "post_processing"

    def effective_mechanism(self) -> Mechanism:
        """What the release is against the adversary of the threat model: a release whose noise
        anyone can regenerate, or that has none, guarantees nothing."""
        if not self.private and self.mechanism.kind != "post_processing":
            return Mechanism(kind="non_private", steps=self.mechanism.steps)
        return self.mechanism


def new_release_id() -> str:
    return uuid.uuid4().hex


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def trust_line(noise: NoiseUsed, mechanism: Mechanism) -> str:
    if mechanism.kind == "post_processing":
        return TRUST_POST_PROCESSING
    if mechanism.kind == "non_private":
        return TRUST_NON_PRIVATE
    return TRUST_REPRODUCIBLE if noise == "reproducible" else TRUST_CLIENT_NOISE


ROUND_ARTIFACT = "#round="  # a federated round's update: stages/fedtune/rounds.json#round=<n>


def as_sent(entry: LedgerEntry) -> dict:
    """A ledger entry as the server receives it (the client's own ledger keeps it whole): not where
    on the client it was made (its paths), nor when to the second (one release's time less
    another's is how long a client stage ran: the count's to the adapter's is structure and
    dp_train, which follows the sampled records' lengths), only the day; nor the digest of a
    federated round's update (under secure aggregation the server never sees that update, and the
    digest would confirm a guess of it, in this send or any later export of the ledger). The same
    release reads the same in every send, so a resend is no new release; the order of entries is kept."""
    update = {"run_dir": f"client:{entry.client_id}", "released_at": f"{entry.released_at[:10]}T00:00:00+00:00"}
    if ROUND_ARTIFACT in entry.artifact:
        update["artifact_sha256"] = None
    return entry.model_copy(update=update).model_dump(mode="json")


def data_key(rows: list[dict]) -> str:
    """A fingerprint of a client's data: its records by id, whatever their order or owner name."""
    lines = sorted(canonical_json({k: v for k, v in row.items() if k != "client_id"}) for row in rows)
    return sha256_text("\n".join(lines))


def ledger_directory(configured: Path | None, base_dir: Path, run_dir: Path) -> Path:
    if os.environ.get(LEDGER_ENV):
        return Path(os.environ[LEDGER_ENV])
    if configured is not None:
        return configured if configured.is_absolute() else base_dir / configured
    return run_dir / "ledger"


RECEIVED = "received"  # on the server: RUN/received/<client>.jsonl, the ledger each client sent


class ClientLedger:
    """One client data set's append-only ledger file; its entries count with those of the client's
    ledgers of its other data sets in the same directory (found by the client named in their entries)."""

    def __init__(self, path: Path, client_id: str | None = None, data_key: str | None = None) -> None:
        self.path = path
        self.client_id = client_id  # None: this file's entries alone (the server's received copy)
        # the data set's fingerprint, which names its file once the directory's name key exists; a
        # received copy or another data set's file (a plain path) has none
        self._data_key = data_key

    @classmethod
    def of_data(cls, directory: Path, key: str, client_id: str | None = None) -> ClientLedger:
        """The ledger of the client data set whose fingerprint is `key`, in `directory` (reading
        writes nothing: the name key is made by the first entry written)."""
        return cls(_ledger_file(directory, key), client_id, data_key=key)

    def entries(self) -> list[LedgerEntry]:
        """Every release of this data set and of the client's other data sets in the directory,
        each once, oldest first."""
        others = _client_data_sets(self.path.parent, self.client_id, skip=self.path) if self.client_id is not None else []
        merged = merge_releases(self.own_entries(), *others)
        if self.client_id is None:
            # the server's received copy, appended in the client's order: its entries give their day
            # only (as_sent), and copies received before that their send time, so a sort could reorder
            return merged
        return sorted(merged, key=lambda e: e.released_at)

    def own_entries(self) -> list[LedgerEntry]:
        """The releases of this data set alone (not of the client's other versions of it)."""
        if not self.path.is_file() and self._data_key is not None:
            self.path = _ledger_file(self.path.parent, self._data_key)  # another process made it since
        entries = _read_ledger(self.path) if self.path.is_file() else []
        twin = self._keyed_twin()
        return merge_releases(entries, _read_ledger(twin)) if twin is not None else entries

    def _keyed_twin(self) -> Path | None:
        """This data set's keyed file where its ledger kept an earlier version's unkeyed name and the
        directory has a keyed one too (an old ledger moved in beside newer ones of the same data):
        both hold its releases, and read alone the old one had the noised count drawn again and a
        release published before a crash refused rather than adopted."""
        if self._data_key is None or not _UNKEYED_NAME.fullmatch(self.path.name):
            return None
        name_key = _name_key(self.path.parent)
        if name_key is None:
            return None
        twin = self.path.parent / _keyed_name(name_key, self._data_key)
        return twin if twin.is_file() else None

    def append(self, entry: LedgerEntry, check: Callable[[list[LedgerEntry]], None] | None = None) -> None:
        """One line in one write, fsynced before returning, under an exclusive lock of the whole
        ledger directory. `check` sees the entries as they are under that lock (this data's and
        the client's other versions of it) and refuses the entry by raising: two runs releasing
        from the same person's records at once each checked the cap when they started, and
        without this both would be entered, past it."""
        with self._locked():
            if check is not None:
                check(self.entries())
            self._write(entry)

    def append_once(self, entry: LedgerEntry, same: Callable[[LedgerEntry], bool], check: Callable[[list[LedgerEntry]], None] | None = None) -> LedgerEntry:
        """`entry`, unless this data set's ledger already holds one that is `same`: then that one,
        and nothing is written. Under the lock, so two runs on the same data never both enter one
        (a release made once and reused, such as the noised count)."""
        with self._locked():
            found = next((e for e in self.own_entries() if same(e)), None)
            if found is not None:
                return found
            if check is not None:
                check(self.entries())
            self._write(entry)
            return entry

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.path.parent / LEDGER_LOCK, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._data_key is not None:
                self.path = _ledger_file(self.path.parent, self._data_key, create=True)
            yield
        finally:
            os.close(lock)  # releases the lock

    def _write(self, entry: LedgerEntry) -> None:
        """One line, fsynced (and the directory, when the file is new) before the caller publishes."""
        created = not self.path.exists()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as err:
            raise KsgError(f"{shown_path(self.path)}: cannot write the ledger ({err.strerror}); nothing was released") from None
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # an append cut short (power lost mid-write): its fsync never returned, so its release
                # was never published; cut it off rather than join this entry onto it
                os.ftruncate(fd, os.pread(fd, size, 0).rfind(b"\n") + 1)
            line = (entry.model_dump_json() + "\n").encode("utf-8")
            if os.write(fd, line) != len(line):
                raise KsgError(f"{shown_path(self.path)}: a ledger entry was written only in part (a full disk?); nothing was released")
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_path(self.path.parent)  # the new file's name, on file systems that need its directory flushed


def _name_key(directory: Path, create: bool = False) -> bytes | None:
    """The ledger directory's name key; None where it has none yet and `create` is false. It moves
    with the ledgers, and ledgers named with a key but without it are refused: a new key would not
    find a data set's ledger by name and begin another (the budget would still be whole, every
    ledger naming the client counts, but the noised count would be drawn again and a release
    published before a crash refused rather than adopted)."""
    path = directory / NAME_KEY
    if path.is_file():
        key = path.read_bytes()
        if len(key) != NAME_KEY_BYTES:
            raise KsgError(f"{path}: damaged (not {NAME_KEY_BYTES} bytes); it names this directory's ledgers, refusing to make another")
        return key
    if any(directory.glob(f"{KEYED}*.jsonl")):
        if path.is_file():  # another process made the key (before any keyed ledger) since the look above
            return _name_key(directory, create)
        raise KsgError(f"{directory}: holds ledgers named with a key but not the key ({NAME_KEY}: moved without it?); restore it, refusing to make another")
    if not create:
        return None
    key = os.urandom(NAME_KEY_BYTES)
    with atomic_open(path, "wb", encoding=None) as handle:  # mkstemp: mode 0600
        handle.write(key)
    return key


def _read_ledger(path: Path) -> list[LedgerEntry]:
    """A ledger file's entries; a damaged one is refused, never skipped in part."""
    try:
        data = path.read_bytes()
    except OSError as err:  # one line naming the file as `shown_path` does, not a traceback with its name
        raise KsgError(f"{shown_path(path)}: unreadable ledger ({err.strerror}); refusing to compute a budget") from None
    data = data[: data.rfind(b"\n") + 1]  # past the last newline, an append cut short: never published (see _write)
    try:
        lines = data.decode("utf-8").split("\n")[:-1]
    except UnicodeDecodeError as err:
        raise KsgError(f"{shown_path(path)}: unreadable ledger (not UTF-8 at byte {err.start}); refusing to compute a budget") from None
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entries.append(LedgerEntry.model_validate_json(line))
        except ValidationError as err:
            # never skip a line: a ledger we cannot read is no proof of what was spent
            raise KsgError(f"{shown_path(path)}:{number}: unreadable ledger entry ({err.errors()[0]['msg']}); refusing to compute a budget") from None
    return entries


def _keyed_name(name_key: bytes, data_key: str) -> str:
    return f"{KEYED}{hmac.new(name_key, data_key.encode(), 'sha256').hexdigest()[:32]}.jsonl"


def shown_path(path: Path) -> str:
    """A ledger file as an error line names it. A ledger an earlier version named by its data's
    unkeyed fingerprint (it keeps that name: see `_ledger_file`) is named by its inode instead:
    whoever reads the line (a console the server may log) could hash candidate data sets against
    the name and learn which one is in."""
    if not _UNKEYED_NAME.fullmatch(path.name):
        return str(path)
    try:
        inode = f"inode {path.stat().st_ino}"
    except OSError:
        inode = "gone since"
    return f"{path.parent}/<ledger named by an earlier version, {inode}: `ls -i` finds it>"


def _ledger_file(directory: Path, data_key: str, create: bool = False) -> Path:
    """A data set's ledger file: its fingerprint keyed with the directory's name key. A ledger that
    earlier versions named by the unkeyed fingerprint stays where it is (renamed, it would vanish
    from under a reader listing the directory), and so does a data set's ledger path before the
    directory has a name key (no file is there: reading writes nothing)."""
    unkeyed = directory / f"{data_key[:32]}.jsonl"
    name_key = None if unkeyed.is_file() else _name_key(directory, create)
    return unkeyed if name_key is None else directory / _keyed_name(name_key, data_key)


def published_release(path: Path, ledger: ClientLedger, client_id: str, stage: str, release: str) -> LedgerEntry | None:
    """The ledger entry of a release found written at `path` by a process killed before it marked it
    done (the entry is fsynced before the file is written): that release, to be adopted rather than
    drawn again. None where there is no file. A file that no entry of this data set's ledger names
    is refused: the ledger directory is not the one it was entered in, and drawing it again would
    count the two releases in two ledgers."""
    if not path.is_file():
        return None
    digest = sha256_file(path)
    named = [e for e in ledger.own_entries() if e.client_id == client_id and e.stage == stage and e.release == release and e.artifact_sha256 == digest]
    # two runs may write the same bytes (reproducible noise): this run's entry first, else one made where the run was before it moved
    here = str(path.resolve()).split("/stages/")[0]
    found = next((e for e in named if e.run_dir == here), named[0] if named else None)
    if found is None:
        raise InputError(f"{stage}: {path} was released for client '{client_id}', but no entry of the ledger in {ledger.path.parent} names it: it was entered "
                         "in another ledger directory (point $KSG_LEDGER_DIR or privacy.ledger_dir back to it), or the file was changed since")
    return found


def received_ledger(run_dir: Path, client_id: str) -> ClientLedger:
    """On the server: the copy of a client's ledger that came with its releases, every entry the
    client ever sent kept (append-only), so both sides can show what crossed."""
    return ClientLedger(run_dir / RECEIVED / f"{client_id}.jsonl")


def read_received_ledger(run_dir: Path, client_id: str) -> list[LedgerEntry]:
    return received_ledger(run_dir, client_id).entries()


def read_stage_ledgers(run_dir: Path, stages: list[str]) -> list[LedgerEntry]:
    """The entries in the `ledger.json` of the given completed stages, in that order."""
    entries = []
    for stage in stages:
        stage_dir = run_dir / "stages" / stage
        manifest = read_manifest(stage_dir)
        if manifest is not None and LEDGER in manifest.outputs:
            entries.extend(LedgerEntry.model_validate(e) for e in read_json(stage_dir / LEDGER))
    return entries


def _client_data_sets(directory: Path, client_id: str, skip: Path | None = None) -> list[list[LedgerEntry]]:
    """The entries of each ledger file in the directory (but `skip`) that holds one of the client's:
    its data sets, whether or not they share a person with each other. Counting only those that did
    made what the client sends, and whether the cap refused, a function of that overlap: whoever
    knows an earlier data set shared only record x with this one would learn whether x is in. The
    directory is the budget's scope (over-counting is safe); data with no person in common goes to
    a ledger directory of its own."""
    if not directory.is_dir():
        return []
    files = (ClientLedger(path).own_entries() for path in sorted(directory.glob("*.jsonl")) if path != skip)
    return [entries for entries in files if any(e.client_id == client_id for e in entries)]


def client_entries(directory: Path, client_id: str) -> list[LedgerEntry]:
    """Every release of the client's data sets in a ledger directory, each once, oldest first: what
    the client sends with its releases, found without its data's fingerprint, which names its own
    file and stays on the client."""
    return sorted(merge_releases(*_client_data_sets(directory, client_id)), key=lambda e: e.released_at)


def merge_releases(*sources: list[LedgerEntry]) -> list[LedgerEntry]:
    """Every release once, in order of first appearance."""
    seen: dict[str, LedgerEntry] = {}
    for entries in sources:
        for entry in entries:
            seen.setdefault(entry.release_id, entry)
    return list(seen.values())


def composed_total(entries: list[LedgerEntry], delta: float) -> Epsilons:
    """A client's total over its releases that count against its budget: PLD composition, with
    PRV and RDP beside it. A release without a guarantee makes the total infinite. Computed from
    the mechanisms, even for one release: its stored figures are, on the server, the client's word."""
    return compose([e.effective_mechanism() for e in entries if e.counts_against_budget], delta)


def compose(mechanisms: list[Mechanism], delta: float) -> Epsilons:
    return _compose(tuple(mechanisms), delta).model_copy()


@functools.lru_cache(maxsize=256)
def _compose(mechanisms: tuple[Mechanism, ...], delta: float) -> Epsilons:
    """The accountants cost seconds; a report asks for the same totals several times."""
    if not mechanisms or all(m.kind == "post_processing" or m.steps == 0 for m in mechanisms):
        return Epsilons(delta=delta, prv=0.0, rdp=0.0, pld=0.0, reported=0.0, reported_by="none")
    if any(m.kind == "non_private" for m in mechanisms):
        return Epsilons(delta=delta, prv=math.inf, rdp=math.inf, pld=math.inf, reported=math.inf, reported_by="none")
    pld = epsilon_pld(list(mechanisms), delta)
    return Epsilons(delta=delta, prv=epsilon_prv_or_none(list(mechanisms), delta), rdp=epsilon_rdp(list(mechanisms), delta), pld=pld, reported=pld, reported_by="pld")


def _protected(unit: str) -> str:
    """What one unit of a release stands for in the client's data: a user, or one of its records
    (a source document is one record of the data ingest read; structure's pairs come from it)."""
    return "user" if unit == "user" else "record"


def check_budget(before: list[LedgerEntry], client_id: str, planned: list[Mechanism], delta: float, cap: float | None, stage: str,
                 unit: str | None = None) -> None:
    """Refuse a stage whose releases would push a client past its cap. `before` is every release
    ever made from the client's data (its ledger); nothing to check without a cap. With `unit`
    (what the stage's releases protect), a stage whose unit differs from the earlier releases' is
    refused, cap or not: a record-level epsilon says nothing of a user with many records until it
    is turned into a group epsilon, which needs a bound the ledger does not have, so their sum
    would understate what a user spent."""
    earlier = {_protected(e.unit) for e in before if e.costs_privacy}
    if unit is not None and earlier and earlier != {_protected(unit)}:
        raise InputError(f"client '{client_id}': stage '{stage}' releases at the {_protected(unit)} level, but this data's earlier releases are at the "
                         f"{' and '.join(sorted(earlier))} level; the ledger cannot compose the two (group privacy needs a bound on each user's records): "
                         f"keep privacy.unit as before, or start another ledger")
    if cap is None:
        return
    spent_total = composed_total(before, delta).reported
    if spent_total >= cap:
        raise InputError(f"client '{client_id}': privacy budget cap already spent before stage '{stage}' "
                         f"(spent epsilon {spent_total:.3f} over {len(before)} release(s), cap {cap:g})")
    total = compose([e.effective_mechanism() for e in before if e.counts_against_budget] + planned, delta).reported
    if total > cap:
        requested = compose(planned, delta).reported
        raise InputError(
            f"client '{client_id}': stage '{stage}' would exceed the privacy budget cap "
            f"(spent epsilon {spent_total:.3f}, requested {requested:.3f}, composed total {total:.3f} > cap {cap:g})"
        )


def run_releases(run_dir: Path, stages: list[str], ledger_dir: Path) -> dict[str, list[LedgerEntry]]:
    """Per client of a run: every release ever made from its data (its ledger, wherever and
    whenever made; on the server, the copy the client sent) and every entry of this run's stage
    ledgers, each once."""
    copies = read_stage_ledgers(run_dir, stages)
    partition = run_dir / "stages" / "ingest" / "partition.json"
    clients = list(read_json(partition)["clients"]) if partition.is_file() else list(dict.fromkeys(e.client_id for e in copies))
    releases = {}
    for client in clients:
        key_file = run_dir / "stages" / "ingest" / "clients" / client / "ledger_key.json"
        own = ClientLedger.of_data(ledger_dir, read_json(key_file)["data_key"], client).entries() if key_file.is_file() else []
        mine = merge_releases(own, read_received_ledger(run_dir, client), [e for e in copies if e.client_id == client])
        if mine:
            releases[client] = mine
    return releases


def client_delta(entries: list[LedgerEntry]) -> float:
    """The delta a client's total is reported at: that of its latest record-level release."""
    counted = [e for e in entries if e.counts_against_budget]
    return (counted or entries)[-1].delta
