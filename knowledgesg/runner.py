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
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cache
from pathlib import Path

from knowledgesg import __version__
from knowledgesg.console import console
from knowledgesg.errors import InputError, KsgError
from knowledgesg.fileio import canonical_json, read_json, sha256_file, sha256_text, write_json, write_text
from knowledgesg.manifest import MANIFEST, Manifest, OutputEntry, read_manifest, verify_outputs, write_manifest
from knowledgesg.spec import PipelineSpec, parse_spec, spec_to_dict
from knowledgesg.stage import Stage, StageContext

SPEC_COPY = "spec.json"
STARTED_WITH = ".started_with"  # the fingerprint a stage directory was started with
EVENTS = "events.jsonl"
CODE_PACKAGES = ("knowledgesg", "pipelines", "privacy", "eval")


@dataclass
class StageOutcome:
    name: str
    status: str  # ran | cached | failed
    duration_s: float
    records: int
    reason: str = ""


@cache
def code_sha256() -> str:
    """One hash over the source of every package a stage can call into: the code version."""
    import importlib

    digest = []
    for package in CODE_PACKAGES:
        root = Path(importlib.import_module(package).__file__).parent  # type: ignore[arg-type]
        for path in sorted(root.rglob("*.py")):
            digest.append(f"{path.relative_to(root.parent)}={sha256_file(path)}")
    return sha256_text(__version__ + "\n" + "\n".join(digest))


class HashCache:
    """sha256 of external files, remembered by (size, mtime) so reruns do not reread large files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, list] = read_json(path) if path.is_file() else {}
        self.dirty = False

    def sha256(self, file: Path) -> str:
        stat = file.stat()
        key = str(file.resolve())
        entry = self.entries.get(key)
        if entry and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
            return entry[2]
        value = sha256_file(file)
        self.entries[key] = [stat.st_size, stat.st_mtime_ns, value]
        self.dirty = True
        return value

    def save(self) -> None:
        if self.dirty:
            write_json(self.path, self.entries)
            self.dirty = False


def build_stage(spec: PipelineSpec, index: int) -> Stage:
    from pipelines import STAGES

    stage_spec = spec.stages[index]
    stage_class = STAGES[stage_spec.name]
    return stage_class(stage_class.Params.model_validate(stage_spec.params))


def _files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def stage_fingerprint(stage: Stage, spec: PipelineSpec, base_dir: Path, previous: str, hashes: HashCache) -> tuple[str, dict[str, str]]:
    inputs = {}
    for path in stage.external_inputs(spec, base_dir):
        for file in _files_under(path):
            inputs[str(file)] = hashes.sha256(file)
    spec_dict = spec_to_dict(spec)
    payload = {
        "stage": stage.name,
        "params": stage.params.model_dump(mode="json"),
        "seed": spec.seed,
        "sections": {section: spec_dict[section] for section in stage.uses},
        "code": code_sha256(),
        "inputs": inputs,
        "previous": previous,
    }
    return sha256_text(canonical_json(payload)), inputs


def chain_after(fingerprint: str, manifest: Manifest) -> str:
    return sha256_text(fingerprint + manifest.outputs_digest())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def append_event(run_dir: Path, **event: object) -> None:
    # One short line per write with O_APPEND: lines from a killed run are whole or absent.
    with open(run_dir / EVENTS, "a", encoding="utf-8") as handle:
        handle.write(canonical_json({"time": _now(), **event}) + "\n")


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    with open(run_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KsgError(f"{run_dir}: another `ksg run` is using this run directory") from None
        yield


def sweep_orphans(run_dir: Path) -> None:
    """Remove the temporary files and directories a killed run left anywhere in the run
    (SIGKILL allows no cleanup). Call under the lock: then no temporary is anyone's work."""
    for orphan in list(run_dir.rglob(".*.tmp")):
        shutil.rmtree(orphan) if orphan.is_dir() else orphan.unlink(missing_ok=True)


def load_run_spec(run_dir: Path) -> tuple[PipelineSpec, Path]:
    path = run_dir / SPEC_COPY
    if not path.is_file():
        raise InputError(f"{run_dir}: not a run directory (no {SPEC_COPY})")
    saved = read_json(path)
    return parse_spec(saved["spec"], source=str(path)), Path(saved["base_dir"])


class Runner:
    def __init__(self, spec: PipelineSpec, base_dir: Path, run_dir: Path) -> None:
        self.spec = spec
        self.base_dir = base_dir
        self.run_dir = run_dir

    def run(self) -> list[StageOutcome]:
        created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            with run_lock(self.run_dir):
                sweep_orphans(self.run_dir)
                write_json(self.run_dir / SPEC_COPY, {"spec": spec_to_dict(self.spec), "base_dir": str(self.base_dir)})
                return self._run_stages()
        except InputError:
            if created:  # bad input: leave nothing behind that looks like a run
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    def _run_stages(self) -> list[StageOutcome]:
        hashes = HashCache(self.run_dir / ".input_hashes.json")
        outcomes, previous = [], "root"
        for index in range(len(self.spec.stages)):
            stage = build_stage(self.spec, index)
            fingerprint, inputs = stage_fingerprint(stage, self.spec, self.base_dir, previous, hashes)
            hashes.save()
            stage_dir = self.run_dir / "stages" / stage.name
            manifest, reason = self._cached_manifest(stage_dir, fingerprint)
            if manifest is not None:
                outcomes.append(StageOutcome(stage.name, "cached", manifest.duration_s, manifest.record_count()))
                append_event(self.run_dir, stage=stage.name, status="cached")
            else:
                if reason:
                    console.print(f"[yellow]{stage.name}[/]: {reason}; rerunning")
                manifest = self._execute(stage, stage_dir, fingerprint, inputs)
                outcomes.append(StageOutcome(stage.name, "ran", manifest.duration_s, manifest.record_count(), reason))
            previous = chain_after(fingerprint, manifest)
        return outcomes

    @staticmethod
    def _cached_manifest(stage_dir: Path, fingerprint: str) -> tuple[Manifest | None, str]:
        manifest = read_manifest(stage_dir)
        if manifest is None:
            return None, ""
        if manifest.fingerprint != fingerprint:
            return None, "inputs, parameters or code changed since it last ran"
        problem = verify_outputs(stage_dir, manifest)
        if problem:
            return None, problem
        return manifest, ""

    def _execute(self, stage: Stage, stage_dir: Path, fingerprint: str, inputs: dict[str, str]) -> Manifest:
        started_with = stage_dir / STARTED_WITH
        resumable = started_with.is_file() and started_with.read_text() == fingerprint and not (stage_dir / MANIFEST).exists()
        if stage_dir.exists() and not resumable:
            shutil.rmtree(stage_dir)  # stale, or partial from other settings: start it clean
        stage_dir.mkdir(parents=True, exist_ok=True)
        if not resumable:
            write_text(started_with, fingerprint)
        ctx = StageContext(spec=self.spec, base_dir=self.base_dir, run_dir=self.run_dir, stage_dir=stage_dir, stage_name=stage.name, runs_on=stage.runs_on)
        started_at, start = _now(), time.perf_counter()
        append_event(self.run_dir, stage=stage.name, status="started")
        try:
            stage.run(ctx)
        except BaseException as err:
            if isinstance(err, KsgError):
                shutil.rmtree(stage_dir, ignore_errors=True)  # refused: leave nothing behind
            # otherwise (a bug, an interrupt) completed units stay for the resume; without a
            # manifest the stage is never taken as complete
            message = str(err) if isinstance(err, KsgError) else f"{type(err).__name__}: {err}"
            append_event(self.run_dir, stage=stage.name, status="failed", message=message)
            raise
        outputs = {
            relative: OutputEntry(sha256=sha256_file(ctx.path(relative)), bytes=ctx.path(relative).stat().st_size, records=records, side=side)
            for relative, (records, side) in sorted(ctx.declared.items())
        }
        manifest = Manifest(
            stage=stage.name,
            package_version=__version__,
            code_sha256=code_sha256(),
            fingerprint=fingerprint,
            params=stage.params.model_dump(mode="json"),
            seed=self.spec.seed,
            inputs=inputs,
            outputs=outputs,
            started_at=started_at,
            finished_at=_now(),
            duration_s=round(time.perf_counter() - start, 3),
        )
        write_manifest(stage_dir, manifest)
        append_event(self.run_dir, stage=stage.name, status="done", duration_s=manifest.duration_s)
        return manifest
