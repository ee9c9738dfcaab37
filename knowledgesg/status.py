"""`ksg status RUN`: where each stage of a run stands, read from manifests and the event log."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from knowledgesg.fileio import read_jsonl
from knowledgesg.manifest import read_manifest, verify_outputs
from knowledgesg.runner import EVENTS, HashCache, build_stage, chain_after, load_run_spec, stage_fingerprint


@dataclass
class StageState:
    name: str
    state: str  # done | cached | stale | failed | running? | pending
    duration_s: float | None
    records: int | None
    finished_at: str | None
    detail: str = ""


def _last_events(run_dir: Path) -> dict[str, dict]:
    path = run_dir / EVENTS
    last: dict[str, dict] = {}
    if path.is_file():
        for event in read_jsonl(path):
            last[event["stage"]] = event
    return last


def run_status(run_dir: Path) -> list[StageState]:
    spec, base_dir = load_run_spec(run_dir)
    hashes = HashCache(run_dir / ".input_hashes.json")
    events = _last_events(run_dir)
    states, previous = [], "root"
    for index, stage_spec in enumerate(spec.stages):
        stage = build_stage(spec, index)
        stage_dir = run_dir / "stages" / stage.name
        manifest = read_manifest(stage_dir)
        last = events.get(stage.name, {})
        fingerprint = stage_fingerprint(stage, spec, base_dir, previous, hashes)[0] if previous else None
        if manifest is not None and fingerprint == manifest.fingerprint:
            problem = verify_outputs(stage_dir, manifest)
            state = "stale" if problem else ("cached" if last.get("status") == "cached" else "done")
            states.append(StageState(stage.name, state, manifest.duration_s, manifest.record_count(), manifest.finished_at, problem or ""))
            previous = chain_after(fingerprint, manifest) if not problem else ""
            continue
        previous = ""  # nothing after an incomplete stage can be current
        if last.get("status") == "failed":
            states.append(StageState(stage.name, "failed", None, None, last.get("time"), last.get("message", "")))
        elif manifest is not None:
            states.append(StageState(stage.name, "stale", manifest.duration_s, manifest.record_count(), manifest.finished_at, "spec, inputs or code changed since it ran"))
        elif last.get("status") == "started":
            states.append(StageState(stage.name, "interrupted", None, None, last.get("time"), "started but never finished; `ksg run` resumes it"))
        else:
            states.append(StageState(stage.name, "pending", None, None, None))
    return states
