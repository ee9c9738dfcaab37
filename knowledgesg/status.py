"""`ksg status RUN`: where each stage of a run stands, read from manifests and the event log."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from knowledgesg.client_key import existing_client_key
from knowledgesg.errors import InputError
from knowledgesg.manifest import read_manifest
from knowledgesg.roles import Role, check_role
from knowledgesg.runner import EVENTS, Chain, HashCache, partial_release_problem, reusable_manifest, run_in_progress, stage_fingerprint
from knowledgesg.spec import PipelineSpec
from knowledgesg.stage import Stage


@dataclass
class StageState:
    name: str
    state: str  # done | cached | kept | received | stale | failed | running | interrupted | pending
    duration_s: float | None
    records: int | None
    finished_at: str | None
    detail: str = ""
    peak_rss_mib: float | None = None


def _last_events(run_dir: Path) -> tuple[dict[str, dict], str | None]:
    """Each stage's last event, and the stage of the run's last event if that is a start (the one
    a live `ksg run` is running: a stage a killed run left started before it is not)."""
    path = run_dir / EVENTS
    last: dict[str, dict] = {}
    newest = None
    if path.is_file():
        for event in readable_events(path):
            last[event["stage"]] = event
            newest = event
    return last, newest["stage"] if newest is not None and newest.get("status") == "started" else None


def readable_events(path: Path) -> list[dict]:
    """The run's events, but for lines cut short (a full disk, the power lost mid-append): the
    event each began was never written. Events are a log for `ksg status`; nothing a run reuses
    is computed from them."""
    events = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short (append_event ends it before the next event)
    return events


def run_status(run_dir: Path, spec: PipelineSpec, base_dir: Path, stages: list[Stage], role: Role = Role()) -> list[StageState]:
    """`spec`, `base_dir` and `role` as saved in the run (runner.load_run_spec, load_run_role),
    `stages` built from it."""
    hashes = HashCache(run_dir / ".input_hashes.json")
    key = existing_client_key(run_dir, spec)
    events, newest_start = _last_events(run_dir)
    running = newest_start if run_in_progress(run_dir) else None  # the stage a live `ksg run` holds the lock for
    states, chain, current = [], Chain(), True  # current: every stage so far is done (after one that is not, nothing can be)
    for stage in check_role(role, spec, stages, str(run_dir)):
        stage_dir = run_dir / "stages" / stage.name
        manifest = read_manifest(stage_dir)
        last = events.get(stage.name, {})
        if role.receives(stage):
            if manifest is not None and manifest.received and current:
                states.append(StageState(stage.name, "received", manifest.duration_s, manifest.record_count(), manifest.finished_at, f"from {', '.join(manifest.received)}"))
                chain.add(stage, manifest)
            else:
                states.append(StageState(stage.name, "pending", None, None, None, "waiting for the clients' releases"))
                current = False
            continue
        # a stage that declares what it reads is judged by those stages alone, as `ksg run` judges it
        judged = current or (stage.reads is not None and all(name in chain.links for name in stage.reads))
        try:
            fingerprint = stage_fingerprint(stage, spec, base_dir, chain.before(stage), hashes, key, role) if judged else None
        except InputError as err:  # an input gone since it ran (raw data deleted after training, say): a state, not a failure
            if manifest is None:
                states.append(StageState(stage.name, "pending", None, None, None, str(err)))
            else:
                states.append(StageState(stage.name, "stale", manifest.duration_s, manifest.record_count(), manifest.finished_at, str(err), manifest.peak_rss_mib))
            current = False
            continue
        reusable, status, problem = reusable_manifest(stage, stage_dir, fingerprint, key) if fingerprint else (None, "", "")
        if reusable is not None:
            state = "kept" if status == "kept" else ("cached" if last.get("status") == "cached" else "done")
            detail = "; ".join([*(["code changed; its privacy release is kept"] if status == "kept" else []), *(f"warning: {w}" for w in manifest.warnings)])
            states.append(StageState(stage.name, state, manifest.duration_s, manifest.record_count(), manifest.finished_at, detail, manifest.peak_rss_mib))
            chain.add(stage, manifest)
            continue
        if manifest is None and problem:  # damaged: no proof of completion, but a release stage's release was made
            then = "`ksg run` stops before a new release (remove its directory to make one)" if stage.releases() else "`ksg run` runs it again"
            states.append(StageState(stage.name, "stale", None, None, None, f"{problem}; {then}"))
            current = False
            continue
        if manifest is not None and problem and "changed since" not in problem:
            states.append(StageState(stage.name, "stale", manifest.duration_s, manifest.record_count(), manifest.finished_at, problem, manifest.peak_rss_mib))
            current = False
            continue
        if manifest is not None and fingerprint is not None and fingerprint.same_release(manifest):
            # only the code changed: `ksg run` reruns it, and if its outputs come out the same the
            # stages after it are judged as before, so the chain goes on
            states.append(StageState(stage.name, "stale", manifest.duration_s, manifest.record_count(), manifest.finished_at,
                                     "the code changed since it ran; `ksg run` reruns it", manifest.peak_rss_mib))
            chain.add(stage, manifest)
            continue
        current = False  # nothing after an incomplete stage can be current
        blocked = partial_release_problem(stage, stage_dir, fingerprint) if fingerprint is not None and stage.name != running else None
        if blocked:  # `ksg run` stops before this stage: say why, whatever its last event was
            states.append(StageState(stage.name, "stale", None, None, last.get("time"), f"`ksg run` stops here: {blocked}"))
        elif last.get("status") == "failed":
            states.append(StageState(stage.name, "failed", None, None, last.get("time"), last.get("message", "")))
        elif manifest is not None:
            detail = "spec, inputs or code changed since it ran" + ("; `ksg run` keeps its release if only code changed, else stops before a new one (remove its directory to make it)"
                                                                          if stage.releases() else "")
            states.append(StageState(stage.name, "stale", manifest.duration_s, manifest.record_count(), manifest.finished_at, detail, manifest.peak_rss_mib))
        elif last.get("status") == "started" and stage.name == running:
            states.append(StageState(stage.name, "running", None, None, last.get("time"), "a `ksg run` is running it now"))
        elif last.get("status") == "started":
            states.append(StageState(stage.name, "interrupted", None, None, last.get("time"), "started but never finished; `ksg run` resumes it"))
        else:
            states.append(StageState(stage.name, "pending", None, None, None))
    return states
