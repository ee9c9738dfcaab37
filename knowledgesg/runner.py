"""Run a pipeline spec stage by stage, skipping what is already done, surviving `kill -9`.

Caching: a stage's fingerprint covers its name, parameters, the seed, the spec sections it
declares, the code version, the hashes of the external files it reads, and the fingerprint and
output hashes of the stage before it. So a changed parameter reruns that stage and everything
after it, and an artifact edited on disk is noticed (by hash) and its stage rerun.

Crash safety: outputs are written atomically and the manifest last; a stage directory without a
manifest (or with one for another fingerprint) is wiped and the stage rerun from the start.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import shutil
import sysconfig
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from pathlib import Path

from pydantic import ValidationError

from knowledgesg import __version__
from knowledgesg.client_key import client_key, existing_client_key
from knowledgesg.console import console
from knowledgesg.errors import InputError, KsgError
from knowledgesg.exchange import export_releases, receive_ledgers, receive_stage
from knowledgesg.fileio import canonical_json, files_under, hmac_file, hmac_text, read_json, sha256_file, sha256_text, unmakeable_directory, write_json, write_text
from knowledgesg.manifest import MANIFEST, Manifest, output_entry, read_manifest, verify_outputs, write_manifest
from knowledgesg.memory import PeakMemory, release_freed_memory
from knowledgesg.models import read_models
from knowledgesg.roles import Role, check_role, narrow_to_client
from knowledgesg.spec import PipelineSpec, parse_spec, spec_to_dict, with_model_cache_under
from knowledgesg.stage import LEDGER_KEY, Stage, StageContext, releases_to_come
from privacy.ledger import ClientLedger, ledger_directory, read_stage_ledgers

SPEC_COPY = "spec.json"
STARTED_WITH = ".started_with"  # the fingerprint a stage directory was started with
EVENTS = "events.jsonl"
CODE_PACKAGES = ("knowledgesg", "pipelines", "privacy", "eval")


@dataclass
class StageOutcome:
    name: str
    status: str  # ran | cached | kept (a privacy release kept across a code upgrade) | received (from the clients) | failed
    duration_s: float
    records: int | None  # None: the stage wrote no record files
    reason: str = ""
    peak_rss_mib: float | None = None
    warnings: list[str] = field(default_factory=list)  # its manifest's: a cached stage's stand as when it ran


@cache
def code_sha256() -> str:
    """One hash over the source of every package a stage can call into: the code version."""
    digest = []
    for package in CODE_PACKAGES:
        root = Path(importlib.import_module(package).__file__).parent  # type: ignore[arg-type]
        for path in sorted(root.rglob("*.py")):
            digest.append(f"{path.relative_to(root.parent)}={sha256_file(path)}")
    return sha256_text(__version__ + "\n" + "\n".join(digest))


class HashCache:
    """Digests of external files, remembered by (size, mtime) so reruns do not reread large files.
    Private inputs get a keyed digest (HMAC), never a plain hash (see manifest.OutputEntry), and
    their size and mtime are kept keyed too: a byte count confirms a guess of a short record."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.entries: dict[str, list] = read_json(path) if path.is_file() else {}
        except json.JSONDecodeError:  # a cache: damaged, it is made again
            self.entries = {}
        self.dirty = False

    def digest(self, file: Path, key: bytes | None) -> str:
        stat = file.stat()
        name = ("keyed:" if key is not None else "") + str(file.resolve())
        signature: list = [stat.st_size, stat.st_mtime_ns]
        if key is not None:
            signature = [hmac_text(key, f"{stat.st_size}:{stat.st_mtime_ns}")]
        entry = self.entries.get(name)
        if entry and entry[:-1] == signature:
            return entry[-1]
        value = hmac_file(file, key) if key is not None else sha256_file(file)
        self.entries[name] = [*signature, value]
        self.dirty = True
        return value

    def save(self) -> None:
        if self.dirty:
            write_json(self.path, self.entries)
            self.dirty = False


@dataclass(frozen=True)
class Fingerprint:
    full: str  # everything that shapes the stage's outputs, the code version included
    content: str  # the same without the code version (a DP release is kept across code upgrades)
    inputs: dict[str, str]  # external input -> digest
    # the content as earlier versions of this code took it (the privacy cap and the ledger's place
    # were in it until December 2026), so releases made then are still recognised as the same
    earlier_content: tuple[str, ...] = ()

    def same_content(self, content: str | None) -> bool:
        return content is not None and (content == self.content or content in self.earlier_content)

    def same_release(self, manifest: Manifest) -> bool:
        """Whether a finished stage's manifest has this content, taken now or the earlier way."""
        return self.same_content(manifest.content_fingerprint) or manifest.content_now == self.content


PACKAGE_ROOT = Path(__file__).resolve().parent  # the built-in data sets are files under it
# where installed packages lie (a packaged model's GGUF file is one of them)
SITE_PACKAGES = tuple(dict.fromkeys(Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")))


def input_name(path: Path, base_dir: Path) -> str:
    """An external input's name in a fingerprint, wherever the project or the installed packages
    lie: relative to this package (a built-in data set), to the spec's directory, or to the
    environment's site-packages (a packaged model's weights), else absolute. An absolute name
    changed with the checkout's place or the virtual environment's, so a run resumed from another
    checkout or after a reinstall ran ingest (or prepare_models) again and, its fingerprint changed,
    dp_train too: a new release."""
    resolved = path.resolve()
    roots = ((PACKAGE_ROOT, "package"), (base_dir.resolve(), "spec dir"), *((root, "site-packages") for root in SITE_PACKAGES))
    holding = [(root, tag) for root, tag in roots if resolved.is_relative_to(root)]
    if holding:  # the innermost (a virtual environment or the package may lie in the spec's directory)
        root, tag = max(holding, key=lambda held: len(held[0].parts))
        return f"{tag}:{resolved.relative_to(root).as_posix()}"
    return str(resolved)


# Settings that say where things lie or whether a release may be made, not what a stage computes:
# the model cache's place (models.json names the models relative to it), the privacy budget's cap
# and the ledger's place. A run resumed with the cache elsewhere, the ledger moved or the cap
# tightened is the same run, and its releases are kept.
NOT_WHAT_A_STAGE_COMPUTES = {"models": ("cache_dir",), "privacy": ("cap_epsilon", "ledger_dir")}
EARLIER_LEFT_OUT = {"models": ("cache_dir",)}
# Settings added later, left out of a fingerprint while they hold the value that means what the
# code did before them: a run made before them resumes unchanged.
ADDED_LATER = {"privacy": {"count_noise": 0.0}}


def where_things_lie_left_out(section: str, settings: dict, left_out: dict[str, tuple[str, ...]] = NOT_WHAT_A_STAGE_COMPUTES) -> dict:
    """A spec section as a fingerprint takes it."""
    as_before = {name for name, value in ADDED_LATER.get(section, {}).items() if settings.get(name) == value}
    return {**{k: v for k, v in settings.items() if k not in as_before}, **{name: None for name in left_out.get(section, ())}}


def stage_fingerprint(stage: Stage, spec: PipelineSpec, base_dir: Path, previous: str, hashes: HashCache, key: bytes | None, role: Role = Role()) -> Fingerprint:
    """`key`: the client key, for a stage whose external inputs are private (None: not known yet);
    `role`: the party fingerprinting it (the server of a split run takes no client-side input)."""
    inputs = {}
    client_side = stage.client_side_inputs(spec, base_dir) if role.kind != "server" else []
    for path in [*stage.external_inputs(spec, base_dir), *client_side]:
        if not path.exists():  # the stage's own checks name it; the fingerprint only notes it
            inputs[input_name(path, base_dir)] = "(missing)"
            continue
        for file in files_under(path):
            if stage.private_inputs and key is None:
                inputs[input_name(file, base_dir)] = "(private, not keyed yet)"
            else:
                inputs[input_name(file, base_dir)] = hashes.digest(file, key if stage.private_inputs else None)
    spec_dict = spec_to_dict(spec)
    settings = stage.fingerprint_settings(spec)

    def content(left_out: dict[str, tuple[str, ...]]) -> dict:
        return {
            "stage": stage.name,
            "params": stage.params.model_dump(mode="json"),
            "seed": spec.seed,
            "sections": {section: where_things_lie_left_out(section, spec_dict[section], left_out) for section in stage.uses},
            **({"settings": settings} if settings else {}),
            "inputs": inputs,
            "previous": previous,
        }

    now = content(NOT_WHAT_A_STAGE_COMPUTES)
    earlier = sha256_text(canonical_json(content(EARLIER_LEFT_OUT)))
    return Fingerprint(full=sha256_text(canonical_json({**now, "code": code_sha256()})), content=sha256_text(canonical_json(now)), inputs=inputs,
                       earlier_content=(earlier,))


def reusable_manifest(stage: Stage, stage_dir: Path, fingerprint: Fingerprint, key: bytes | None) -> tuple[Manifest | None, str, str]:
    """(manifest, status, reason): "cached" when nothing changed; "kept" when a stage that
    releases private data changed only in code version, since running it again would be a new
    release that spends budget; else (None, "", why it must run)."""
    manifest = read_manifest(stage_dir)
    if manifest is None:
        return None, "", "its manifest.json cannot be read (damaged)" if (stage_dir / MANIFEST).is_file() else ""
    if manifest.fingerprint == fingerprint.full:
        status = "cached"
    elif stage.releases() and fingerprint.same_release(manifest):
        status = "kept"
    else:
        return None, "", "inputs, parameters or code changed since it last ran"
    problem = verify_outputs(stage_dir, manifest, key)
    if problem:
        return None, "", problem
    return manifest, status, ""


def remember_content_now(stage_dir: Path, manifest: Manifest, fingerprint: Fingerprint) -> None:
    """A release kept because its content matched as the earlier code took it: the manifest keeps
    its content as taken now, so a later change this code leaves out of fingerprints (a tightened
    cap, say) still finds the same release. Its own content fingerprint stays: the stages after
    it are chained to that."""
    if fingerprint.content not in (manifest.content_fingerprint, manifest.content_now):
        write_manifest(stage_dir, manifest.model_copy(update={"content_now": fingerprint.content}))


def refuse_a_silent_new_release(stage: Stage, stage_dir: Path, reason: str) -> None:
    """A stage that released private data in this run is not run again unasked: its rerun is a new
    release that spends budget again, and what made it stale may be no choice of the user's (the
    model cache or the checkout moved, a code upgrade changed an earlier stage's outputs). The user
    asks for the new release by removing the stage's directory; its ledger entries stay counted."""
    earlier = read_manifest(stage_dir)
    if stage.releases() and (earlier is not None or (stage_dir / MANIFEST).is_file()):  # damaged, it still says the stage finished its release
        when = f"its release of {earlier.finished_at}" if earlier is not None else "its release"
        raise InputError(f"{stage.name}: {reason or 'stale'} ({when}); running it again is a new release that "
                         f"spends privacy budget again. To make it, remove {stage_dir} (its ledger entries stay counted); to keep the release, "
                         "restore what changed")


def run_releases_made(run_dir: Path, stages: list[Stage]) -> dict[str, str]:
    """{release id: client} of every release this run directory made that spends budget and that
    its clients entered in the run's ledger directory: those of its finished stages (their
    ledger.json) and those a stage made before it stopped (`Stage.unfinished_releases`). Rounds on
    deployed nodes (`launch: none`) are entered in the nodes' own ledgers, elsewhere: not counted."""
    elsewhere = {s.name for s in stages if getattr(s.params, "engine", None) == "flower-deploy" and getattr(getattr(s.params, "deploy", None), "launch", None) == "none"}
    ours = [s for s in stages if s.name not in elsewhere and (run_dir / "stages" / s.name).is_dir()]
    try:
        entries = read_stage_ledgers(run_dir, [s.name for s in ours])
        for stage in ours:
            if read_manifest(run_dir / "stages" / stage.name) is None:
                entries += stage.unfinished_releases(run_dir / "stages" / stage.name)
    except ValidationError as err:  # a ledger.json or unit marker edited or cut short
        raise KsgError(f"{run_dir}: a stage's record of its releases cannot be read ({err.errors()[0]['msg']}); refusing to resume") from None
    return {e.release_id: e.client_id for e in entries if e.costs_privacy}


def refuse_a_ledger_without_this_runs_releases(run_dir: Path, stages: list[Stage], ledger_dir: Path) -> None:
    """A run resumed with another ledger directory ($KSG_LEDGER_DIR or privacy.ledger_dir changed
    since it released, the files not moved along) would count its earlier releases apart from its
    new ones: a redrawn count beside the first, two budgets where there is one. Refused until the
    ledger that holds them is the one in use (moving its files with it is fine, `.name_key` included)."""
    made = run_releases_made(run_dir, stages)
    if not made:
        return
    held = {e.release_id for path in sorted(ledger_dir.glob("*.jsonl")) for e in ClientLedger(path).own_entries()} if ledger_dir.is_dir() else set()
    missing = sorted(set(made) - held)
    if missing:
        raise InputError(f"privacy ledger {ledger_dir}: {len(missing)} of this run's {len(made)} releases are not in it (one of client '{made[missing[0]]}' among them): "
                         "they were entered in another ledger directory. Point $KSG_LEDGER_DIR or privacy.ledger_dir back to it (or move its files here, .name_key with them), "
                         "or start a new run")



def started_with_text(fingerprint: Fingerprint) -> str:
    return json.dumps({"full": fingerprint.full, "content": fingerprint.content})


def started_with(stage_dir: Path) -> dict:
    """The fingerprints a stage directory was started with: {"full", "content"}; only "full" in
    one started by code from before the content was kept beside it; {} if none."""
    path = stage_dir / STARTED_WITH
    if not path.is_file():
        return {}
    text = path.read_text()
    try:
        started = json.loads(text)
    except json.JSONDecodeError:
        started = None
    return started if isinstance(started, dict) else {"full": text}


def resumes(stage: Stage, stage_dir: Path, fingerprint: Fingerprint) -> bool:
    """Whether a stage directory without a manifest is resumed, its finished units kept: when it
    was started with the same fingerprint, or, for a stage that releases, the same content (only
    the code changed, as a finished release is kept: its units were released already, and
    running them again would spend budget on new releases)."""
    if (stage_dir / MANIFEST).exists():
        return False
    started = started_with(stage_dir)
    return bool(started) and (started.get("full") == fingerprint.full or (stage.releases() and fingerprint.same_content(started.get("content"))))


def partial_release_problem(stage: Stage, stage_dir: Path, fingerprint: Fingerprint) -> str | None:
    """Why a release stage that stopped part way cannot be resumed as it is (None if it can, or
    if it released nothing): starting it over would drop releases counted in the clients'
    ledgers and make them again."""
    if not stage.releases() or (stage_dir / MANIFEST).exists() or resumes(stage, stage_dir, fingerprint):
        return None
    clients = stage.released_part(stage_dir)
    if not clients:
        return None
    if "content" not in started_with(stage_dir):
        why = "it was started by an earlier version of ksg, which kept too little to tell whether only the code changed since: finish it with that version"
    else:
        why = ("its parameters, its inputs or an earlier stage's outputs changed since (what changed need not be your choice: an upgrade may change "
               "an earlier stage's outputs), so it cannot resume")
    return (f"stopped part way after releasing for {', '.join(clients)}; {why}. Starting it over is a new release that spends privacy budget "
            f"again: to make it, remove {stage_dir} (its ledger entries stay counted)")


def chain_after(manifest: Manifest) -> str:
    """What the next stage's fingerprint takes from this one: its content fingerprint (the code
    version is in every stage's own fingerprint already) and the digest of its outputs. So a
    stage rerun for a code change that gives the same outputs changes nothing downstream."""
    return sha256_text((manifest.content_fingerprint or manifest.fingerprint) + manifest.outputs_digest())


class Chain:
    """What each stage's fingerprint takes from the stages before it: for most, all of them (the
    last one's content fingerprint and outputs, which hold the rest); for a stage that declares
    `reads`, only those. A stage after it still depends on everything before it."""

    def __init__(self) -> None:
        self.running = "root"
        self.links: dict[str, str] = {}

    def before(self, stage: Stage) -> str:
        if stage.reads is None:
            return self.running
        return sha256_text(canonical_json({name: self.links.get(name) for name in stage.reads}))

    def add(self, stage: Stage, manifest: Manifest) -> None:
        link = chain_after(manifest)
        self.links[stage.name] = link
        self.running = link if stage.reads is None else sha256_text(self.running + link)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def append_event(run_dir: Path, **event: object) -> None:
    """One short line in one write with O_APPEND: a killed run's lines are whole or absent. A
    line cut short by a full disk or a power loss is ended first, so it stays the only bad line
    (`ksg status` skips it) instead of joining the next event."""
    fd = os.open(run_dir / EVENTS, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        cut_short = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        os.write(fd, (("\n" if cut_short else "") + canonical_json({"time": _now(), **event}) + "\n").encode("utf-8"))
    finally:
        os.close(fd)


LOCK_ATTEMPTS = 10  # 0.1 s apart


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    with open(run_dir / ".lock", "w") as handle:
        for attempt in range(LOCK_ATTEMPTS):
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == LOCK_ATTEMPTS - 1:
                    raise KsgError(f"{run_dir}: another `ksg run` is using this run directory") from None
                time.sleep(0.1)  # `ksg status` probes the lock for an instant: wait that out, not a run
        yield


def run_in_progress(run_dir: Path) -> bool:
    """Whether a `ksg run` holds this run directory's lock now (a shared probe, let go at once)."""
    lock = run_dir / ".lock"
    if not lock.is_file():
        return False
    with open(lock) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def sweep_orphans(run_dir: Path) -> None:
    """Remove the temporary files and directories a killed run left anywhere in the run
    (SIGKILL allows no cleanup). Call under the lock: then no temporary is anyone's work."""
    for orphan in list(run_dir.rglob(".*.tmp")):
        shutil.rmtree(orphan) if orphan.is_dir() else orphan.unlink(missing_ok=True)


# stages every run starts with, cheap to redo: a run refused after them is removed whole
PREPARATION = ("prepare_models", "ingest")


def holds_work(run_dir: Path) -> bool:
    """Whether a run refused for bad input has more than its preparation to lose: a ledger entry
    (never deleted: the release it counts may have been seen) or a finished later stage (a DP
    adapter, an hour of work that resuming keeps)."""
    ledgers = [*(run_dir / "ledger").glob("*.jsonl"), *(run_dir / "stages").glob("*/ledger.json")]
    finished = [m for m in (run_dir / "stages").glob("*/manifest.json") if m.parent.name not in PREPARATION]
    return any(path.stat().st_size for path in ledgers) or bool(finished) or any((run_dir / "stages").glob("*/units/**/*.json"))


def _saved_run(run_dir: Path) -> dict:
    """The run's copy of its spec (`spec.json`), refused in one line if it is not one."""
    path = run_dir / SPEC_COPY
    if not path.is_file():
        raise InputError(f"{run_dir}: not a run directory (no {SPEC_COPY})")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not the run's spec copy ({type(err).__name__}: {err}); the run directory is damaged") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("spec"), dict) or not isinstance(saved.get("base_dir"), str):
        raise InputError(f"{path}: not the run's spec copy (expected an object with 'spec' and 'base_dir'); the run directory is damaged")
    return saved


def load_run_spec(run_dir: Path) -> tuple[PipelineSpec, Path]:
    saved = _saved_run(run_dir)
    base_dir = Path(saved["base_dir"])
    # a copy written before relative model caches were taken from the spec's directory still holds one
    return with_model_cache_under(parse_spec(saved["spec"], source=str(run_dir / SPEC_COPY)), base_dir), base_dir


def run_models(run_dir: Path, roles: Iterable[str] | None = None) -> dict[str, dict]:
    """A run's models (prepare_models' models.json), each where this machine holds it: `roles`
    only, if given (finding a model may mean converting it into this machine's cache)."""
    spec, _ = load_run_spec(run_dir)
    return read_models(run_dir / "stages/prepare_models/models.json", spec.models.cache_dir, roles)


def load_run_role(run_dir: Path) -> Role:
    """The role the run directory was made by (the simulation for runs from before roles)."""
    saved = _saved_run(run_dir).get("role") or {}
    if not isinstance(saved, dict):
        saved = {"kind": None}  # refused below, with the others
    kind, client, exchange = saved.get("kind", "all"), saved.get("client"), saved.get("exchange")
    if kind not in ("all", "client", "server") or not isinstance(client, (str, type(None))) or not isinstance(exchange, (str, type(None))):
        raise InputError(f"{run_dir / SPEC_COPY}: not the run's spec copy (its role is not one of all, client, server with a client name); the run directory is damaged")
    return Role(kind, client, Path(exchange) if exchange else None)


# what a run directory holds at its top level, and of which kind: another kind there is damage
RUN_LAYOUT = {".lock": "file", SPEC_COPY: "file", "events.jsonl": "file", "stages": "directory", "ledger": "directory", "eval": "directory"}


def refuse_a_damaged_run_directory(run_dir: Path) -> None:
    """One line, before anything is written, where a run directory's own entries are of the wrong
    kind (`stages` a file, `.lock` a directory): each would otherwise fail midway with a traceback."""
    for name, kind in RUN_LAYOUT.items():
        path = run_dir / name
        if path.exists() and path.is_dir() != (kind == "directory"):
            found = "directory" if path.is_dir() else "file"
            raise InputError(f"--run-dir {run_dir}: damaged: {name} is a {found}, not a {kind}; move it aside or give another --run-dir")


class Runner:
    def __init__(self, spec: PipelineSpec, base_dir: Path, run_dir: Path, stages: list[Stage], role: Role = Role(),
                 plan_check: Callable[[PipelineSpec, list[Stage]], None] | None = None) -> None:
        """`spec` and `stages` whole, as every party has them; `role` says which part this process
        runs. `plan_check` refuses, before anything is written, a run whose releases to come (the
        release stages here without a finished manifest) would break the budget: the privacy
        planning lives above the core (pipelines.check)."""
        if [stage.name for stage in stages] != [s.name for s in spec.stages]:
            raise ValueError("the stages must be the spec's, in order (build them with pipelines.build_stages)")
        if role.kind != "all" and role.exchange is None:
            raise ValueError("a client or server role needs an exchange directory")
        self.stages = check_role(role, spec, stages, "spec")
        self.spec = narrow_to_client(spec, role.client) if role.kind == "client" else spec
        self.base_dir = base_dir
        self.run_dir = run_dir
        self.role = role
        self.plan_check = plan_check

    def run(self) -> list[StageOutcome]:
        for flag, directory in (("--run-dir", self.run_dir), ("--exchange", self.role.exchange)):
            # a server reading a file exchange may have it read-only; where the exchange is written, the writer says so
            problem = unmakeable_directory(directory, must_write=flag == "--run-dir" or self.role.kind == "client") if directory is not None else None
            if problem:
                raise InputError(f"{flag} {directory}: {problem}")
        refuse_a_damaged_run_directory(self.run_dir)
        self.preflight()  # before the run directory is created or touched
        created = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(f"--run-dir {self.run_dir}: cannot be created ({err.strerror})") from None
        try:
            with run_lock(self.run_dir):
                sweep_orphans(self.run_dir)
                role = {"kind": self.role.kind, "client": self.role.client, "exchange": str(self.role.exchange) if self.role.exchange else None}
                if self.role.kind != "server":  # the party holding the clients' ledgers; before the spec copy names the new ledger
                    refuse_a_ledger_without_this_runs_releases(self.run_dir, self.stages, ledger_directory(self.spec.privacy.ledger_dir, self.base_dir, self.run_dir))
                write_json(self.run_dir / SPEC_COPY, {"spec": spec_to_dict(self.spec), "base_dir": str(self.base_dir), "role": role})
                outcomes = self._run_stages(client_key(self.run_dir, self.spec))
                if self.role.kind == "client":
                    self._send()
                return outcomes
        except InputError:
            if created and not holds_work(self.run_dir):  # bad input: leave nothing behind that looks like a run
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    def refuse_another_partys_run_directory(self) -> None:
        """A run directory holds one party's part. Run as another party (the server in a client's
        directory, say), the stages that party receives would replace the ones made there: a
        client's released adapter deleted, a new release needed to make it again."""
        if not (self.run_dir / SPEC_COPY).is_file():
            return
        made_by = load_run_role(self.run_dir)
        if (made_by.kind, made_by.client) != (self.role.kind, self.role.client):
            raise InputError(f"--run-dir {self.run_dir}: made by the {made_by.label}, not the {self.role.label}; one run directory holds one "
                             "party's part: give this one another --run-dir")

    def refuse_a_count_that_would_restart_releases(self) -> None:
        """A run whose DP releases were planned with each client's exact N (made before counts were
        noised, or at `count_noise: 0`) is refused before ingest releases a noised count: the count
        would change every plan after it, and the releases could only be made again, spending budget."""
        partition = self.run_dir / "stages/ingest/partition.json"
        if not self.spec.privacy.count_noise or not partition.is_file() or "count" in read_json(partition):
            return
        released = [s.name for s in self.stages if s.releases() and read_manifest(self.run_dir / "stages" / s.name) is not None]
        if released:
            raise InputError(f"privacy.count_noise: {self.spec.privacy.count_noise:g}, but the releases of {', '.join(released)} in {self.run_dir} were planned "
                             "with each client's exact N (privacy.count_noise: 0, the behaviour before noised counts); set privacy.count_noise: 0 "
                             "to resume this run, or give a new --run-dir")

    def preflight(self) -> None:
        """The data checks of every stage that will run here (the ones after the last cached stage).
        First, that the run directory is this party's: the CLI calls this before a Flower server
        asks the nodes to run their stages."""
        self.refuse_another_partys_run_directory()
        self.refuse_a_count_that_would_restart_releases()
        for stage in self.stages[self._cached_prefix():]:
            if not self.role.receives(stage):
                stage.preflight(self.spec, self.base_dir)
                if self.role.kind != "server":
                    stage.preflight_private(self.spec, self.base_dir)
        if self.plan_check is not None:
            self.plan_check(self.spec, self.releases_to_come())

    def releases_to_come(self) -> list[Stage]:
        """The release stages this process will run (refuse_a_silent_new_release stops before a new
        release of one with a finished manifest)."""
        return releases_to_come([s for s in self.stages if not self.role.receives(s)], self.run_dir)

    def _send(self) -> None:
        """A client's releases, with its whole ledger, to the exchange (checked against its cap first)."""
        assert self.role.client is not None and self.role.exchange is not None
        key = read_json(self.run_dir / "stages/ingest/clients" / self.role.client / LEDGER_KEY)["data_key"]
        ledger = ClientLedger.of_data(ledger_directory(self.spec.privacy.ledger_dir, self.base_dir, self.run_dir), key, self.role.client).entries()
        stages = [s.name for s in self.stages if s.side() == "client"]  # what the server receives ("both" stages it runs itself)
        sent = export_releases(self.run_dir, stages, self.role.client, self.role.exchange, ledger, self.spec.privacy.cap_epsilon)
        console.print(f"client {self.role.client}: releases of {', '.join(stages)} and {len(ledger)} ledger entr{'y' if len(ledger) == 1 else 'ies'} sent to {sent}")

    def _cached_prefix(self) -> int:
        """How many leading stages have a manifest for their current fingerprint, judged without
        writing anything. The outputs are verified (hashed) later, under the lock; a stage whose
        outputs turn out tampered with then reruns, and checks its input as it runs."""
        key = existing_client_key(self.run_dir, self.spec) if self.run_dir.is_dir() else None
        hashes = HashCache(self.run_dir / ".input_hashes.json")
        chain = Chain()
        for index, stage in enumerate(self.stages):
            manifest = read_manifest(self.run_dir / "stages" / stage.name)
            if self.role.receives(stage):  # judged when it is received
                if manifest is None:
                    return index
                chain.add(stage, manifest)
                continue
            fingerprint = stage_fingerprint(stage, self.spec, self.base_dir, chain.before(stage), hashes, key, self.role)
            if manifest is None or fingerprint.full != manifest.fingerprint and not (stage.releases() and fingerprint.same_release(manifest)):
                return index
            chain.add(stage, manifest)
        return len(self.stages)

    def _run_stages(self, key: bytes) -> list[StageOutcome]:
        hashes = HashCache(self.run_dir / ".input_hashes.json")
        outcomes, chain = [], Chain()
        if self.role.kind == "server":
            assert self.role.exchange is not None
            receive_ledgers(self.run_dir, self.role.exchange, [m.id for m in self.spec.clients.members])
        for stage in self.stages:
            if self.role.receives(stage):
                assert self.role.exchange is not None
                manifest, new = receive_stage(self.run_dir, self.role.exchange, stage.name, [m.id for m in self.spec.clients.members],
                                              stage.params.model_dump(mode="json"), self.spec.seed)
                outcomes.append(StageOutcome(stage.name, "received" if new else "cached", manifest.duration_s, manifest.record_count(), peak_rss_mib=manifest.peak_rss_mib))
                append_event(self.run_dir, stage=stage.name, status="received" if new else "cached")
                chain.add(stage, manifest)
                continue
            fingerprint = stage_fingerprint(stage, self.spec, self.base_dir, chain.before(stage), hashes, key, self.role)
            hashes.save()
            stage_dir = self.run_dir / "stages" / stage.name
            manifest, status, reason = reusable_manifest(stage, stage_dir, fingerprint, key)
            if manifest is not None:
                if status == "kept":
                    remember_content_now(stage_dir, manifest, fingerprint)
                    console.print(f"[cyan]{stage.name}[/]: the code changed since it ran; its privacy release is kept (running it again would spend budget "
                                  f"on a new release: remove {stage_dir} to do so)")
                outcomes.append(StageOutcome(stage.name, status, manifest.duration_s, manifest.record_count(), peak_rss_mib=manifest.peak_rss_mib, warnings=manifest.warnings))
                append_event(self.run_dir, stage=stage.name, status=status)
            else:
                refuse_a_silent_new_release(stage, stage_dir, reason)
                if reason:
                    console.print(f"[yellow]{stage.name}[/]: {reason}; rerunning")
                manifest = self._execute(stage, stage_dir, fingerprint, key)
                outcomes.append(StageOutcome(stage.name, "ran", manifest.duration_s, manifest.record_count(), reason, manifest.peak_rss_mib, manifest.warnings))
            chain.add(stage, manifest)
        return outcomes

    def _execute(self, stage: Stage, stage_dir: Path, fingerprint: Fingerprint, key: bytes) -> Manifest:
        resumable = resumes(stage, stage_dir, fingerprint)
        problem = partial_release_problem(stage, stage_dir, fingerprint)
        if problem:
            raise InputError(f"{stage.name}: {problem}")
        # a stale stage is set aside, not deleted, until its rerun succeeds: a rerun refused (say,
        # by the privacy budget cap) leaves the earlier, complete outputs as they were
        previous = stage_dir.with_name(f".{stage.name}.previous.tmp")
        if stage_dir.exists() and not resumable:
            if (stage_dir / MANIFEST).exists():
                stage_dir.rename(previous)
            else:
                shutil.rmtree(stage_dir)  # partial from other settings: start it clean
        stage_dir.mkdir(parents=True, exist_ok=True)
        if not resumable:
            write_text(stage_dir / STARTED_WITH, started_with_text(fingerprint))
        ctx = StageContext(spec=self.spec, base_dir=self.base_dir, run_dir=self.run_dir, stage_dir=stage_dir, stage_name=stage.name, runs_on=stage.runs_on, role=self.role.kind,
                           reads=stage.reads)
        started_at, start = _now(), time.perf_counter()
        append_event(self.run_dir, stage=stage.name, status="started")
        release_freed_memory()  # the stages before freed their models: their pages leave before this stage's peak is taken
        try:
            with PeakMemory() as memory:
                stage.run(ctx)
        except BaseException as err:
            # refused: leave nothing behind, but for the units a release stage released (they are in
            # the clients' ledgers; the resume reuses them). A bug or an interrupt leaves completed
            # units for the resume too; without a manifest the stage is never taken as complete.
            if isinstance(err, KsgError) and not (stage.releases() and stage.released_part(stage_dir)):
                shutil.rmtree(stage_dir, ignore_errors=True)
                if previous.exists():
                    previous.rename(stage_dir)
            # a bug's or a library's text may quote a record (a decoder's bytes, a validator's input
            # value): the run's event log, which `ksg status` and the report show, keeps its kind only
            message = str(err) if isinstance(err, KsgError) else f"{type(err).__name__} (its message is on the console, not kept here)"
            append_event(self.run_dir, stage=stage.name, status="failed", message=message)
            raise
        # a client-side file's record count is its N (or a function of it): kept only where N is public
        n_public = not self.spec.privacy.count_noise
        outputs = {relative: output_entry(ctx.path(relative), records if side == "server" or n_public else None, side, key)
                   for relative, (records, side) in sorted(ctx.declared.items())}
        manifest = Manifest(
            stage=stage.name,
            package_version=__version__,
            code_sha256=code_sha256(),
            fingerprint=fingerprint.full,
            content_fingerprint=fingerprint.content,
            params=stage.params.model_dump(mode="json"),
            seed=self.spec.seed,
            inputs=fingerprint.inputs,
            outputs=outputs,
            started_at=started_at,
            finished_at=_now(),
            duration_s=round(time.perf_counter() - start, 3),
            peak_rss_mib=memory.mib,
            warnings=ctx.warnings,
        )
        write_manifest(stage_dir, manifest)
        for scratch in ctx.scratch:  # kept until now: killed before the manifest, the resume needed them
            shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(previous, ignore_errors=True)
        append_event(self.run_dir, stage=stage.name, status="done", duration_s=manifest.duration_s)
        return manifest
