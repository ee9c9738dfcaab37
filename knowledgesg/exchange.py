"""Releases crossing from a client to the server (`knowledgesg.roles`), through an exchange directory.

    EXCHANGE/<client>/<stage>/manifest.json   the stage's manifest as it ran on the client, cut to
                                              its server-side outputs (no input paths or digests)
    EXCHANGE/<client>/<stage>/<outputs>       those outputs: releases only (a DP adapter with its
                                              privacy statement and ledger entry, a DP histogram,
                                              the client's record count, the public pool index)
    EXCHANGE/<client>/ledger.jsonl            the client's ledger: every release ever made from its
                                              data, so the server counts them all

A client checks its ledger against its own budget cap before anything is sent and writes its part
whole (a temporary directory, then a rename). The server checks every file against the client's
manifest, lets a client write only under its own `clients/<id>/` or into the top-level files the
stages share (merged: each client's record count, the ledger entries; anything else must be the
same from every client), and keeps every ledger entry it received (`privacy.ledger.received_ledger`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from knowledgesg import __version__
from knowledgesg.errors import KsgError
from knowledgesg.fileio import canonical_json, read_json, read_jsonl, sha256_file, sha256_text, write_json, write_jsonl
from knowledgesg.manifest import Manifest, OutputEntry, read_manifest, write_manifest
from privacy.ledger import LEDGER, LedgerEntry, client_delta, composed_total, received_ledger

CLIENT_LEDGER = "ledger.jsonl"


def _merge_partition(values: dict[str, Any]) -> Any:
    first = next(iter(values.values()))
    merged = {key: value for key, value in first.items() if key != "clients"}
    merged["clients"] = {}
    for value in values.values():
        merged["clients"].update(value["clients"])
    return merged


def _concatenate(values: dict[str, Any]) -> Any:
    return [item for value in values.values() for item in value]


# top-level files that several clients' stages write, each from its own data
MERGES: dict[str, Callable[[dict[str, Any]], Any]] = {"partition.json": _merge_partition, LEDGER: _concatenate}


def check_sendable(client_id: str, ledger: list[LedgerEntry], cap: float | None) -> None:
    """A client sends nothing once its releases compose past its own cap."""
    if cap is None or not ledger:
        return
    total = composed_total(ledger, client_delta(ledger)).reported
    if total > cap:
        raise KsgError(f"client '{client_id}': its releases compose to epsilon {total:.3f}, above its cap {cap:g}; nothing is sent")


def export_releases(run_dir: Path, stage_names: list[str], client_id: str, exchange: Path, ledger: list[LedgerEntry], cap: float | None) -> Path:
    """Put the server-side outputs of this client's stages, and its ledger, in EXCHANGE/<client>."""
    check_sendable(client_id, ledger, cap)
    exchange.mkdir(parents=True, exist_ok=True)
    staging = exchange / f".{client_id}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    for name in stage_names:
        manifest = read_manifest(run_dir / "stages" / name)
        if manifest is None:
            raise KsgError(f"stage '{name}' has not completed in {run_dir}: nothing to send")
        sent = {relative: entry for relative, entry in manifest.outputs.items() if entry.side == "server"}
        for relative in sent:
            _check_path(relative, client_id, name, "this client")
            target = staging / name / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_dir / "stages" / name / relative, target)
        write_manifest(staging / name, manifest.model_copy(update={"outputs": sent, "inputs": {}}))
    write_jsonl(staging / CLIENT_LEDGER, [e.model_dump(mode="json") for e in ledger])
    target = exchange / client_id
    old = exchange / f".{client_id}.old.tmp"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def _check_path(relative: str, client_id: str, stage: str, who: str) -> None:
    parts = PurePosixPath(relative).parts
    if ".." in parts or PurePosixPath(relative).is_absolute():
        raise KsgError(f"{who}: stage '{stage}' output '{relative}' is not a plain relative path")
    if len(parts) == 1:
        return
    if parts[0] != "clients" or len(parts) < 3 or parts[1] != client_id:
        raise KsgError(f"{who}: stage '{stage}' output '{relative}' is outside clients/{client_id}/: a client sends only its own releases")


def _received_manifest(exchange: Path, client_id: str, stage: str) -> Manifest:
    manifest = read_manifest(exchange / client_id / stage)
    if manifest is None:
        raise KsgError(f"waiting for client '{client_id}': no release of stage '{stage}' in {exchange} "
                       f"(on its machine: ksg run SPEC --role client --client {client_id} --exchange ...)")
    for relative, entry in manifest.outputs.items():
        _check_path(relative, client_id, stage, f"client '{client_id}'")
        path = exchange / client_id / stage / relative
        if entry.side != "server" or not path.is_file() or sha256_file(path) != entry.sha256:
            raise KsgError(f"client '{client_id}': {stage}/{relative} does not match the manifest it sent (missing, changed, or not a release)")
    return manifest


def receive_stage(run_dir: Path, exchange: Path, stage: str, clients: list[str]) -> tuple[Manifest, bool]:
    """The stage's releases from every client, merged into RUN/stages/<stage> with a manifest that
    names each client's run of it. (manifest, whether anything new was received)."""
    received = {c: _received_manifest(exchange, c, stage) for c in clients}
    fingerprint = sha256_text(canonical_json({c: [m.fingerprint, m.outputs_digest()] for c, m in received.items()}))
    stage_dir = run_dir / "stages" / stage
    existing = read_manifest(stage_dir)
    if existing is not None and existing.fingerprint == fingerprint:
        return existing, False
    params = {canonical_json(m.params) for m in received.values()}
    if len(params) > 1:
        raise KsgError(f"stage '{stage}': the clients ran it with different parameters (is every party on the same spec?)")
    shutil.rmtree(stage_dir, ignore_errors=True)
    stage_dir.mkdir(parents=True)
    outputs: dict[str, OutputEntry] = {}
    shared: dict[str, dict[str, Any]] = {}
    for client_id, manifest in received.items():
        for relative, entry in manifest.outputs.items():
            source = exchange / client_id / stage / relative
            if "/" not in relative:
                shared.setdefault(relative, {})[client_id] = read_json(source)
                continue
            target = stage_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            outputs[relative] = entry
    for relative, values in shared.items():
        if relative in MERGES:
            merged = MERGES[relative](values)
        elif len({canonical_json(v) for v in values.values()}) == 1:
            merged = next(iter(values.values()))
        else:
            raise KsgError(f"stage '{stage}': the clients sent different '{relative}' (it must be the same from every client)")
        write_json(stage_dir / relative, merged)
        outputs[relative] = OutputEntry(sha256=sha256_file(stage_dir / relative), bytes=(stage_dir / relative).stat().st_size, side="server")
    first = next(iter(received.values()))
    manifest = Manifest(stage=stage, package_version=__version__, code_sha256=first.code_sha256, fingerprint=fingerprint, content_fingerprint=fingerprint,
                        params=first.params, seed=first.seed, inputs={}, outputs=outputs, started_at=min(m.started_at for m in received.values()),
                        finished_at=max(m.finished_at for m in received.values()), duration_s=max(m.duration_s for m in received.values()),
                        received={c: m.fingerprint for c, m in received.items()})
    write_manifest(stage_dir, manifest)
    return manifest, True


def receive_ledgers(run_dir: Path, exchange: Path, clients: list[str]) -> int:
    """Append to the server's copy of each client's ledger the entries it has not seen; how many."""
    added = 0
    for client_id in clients:
        path = exchange / client_id / CLIENT_LEDGER
        if not path.is_file():
            continue
        entries = [LedgerEntry.model_validate(row) for row in read_jsonl(path)]
        if any(e.client_id != client_id for e in entries):
            raise KsgError(f"client '{client_id}': its ledger holds another client's entries")
        copy = received_ledger(run_dir, client_id)
        seen = {e.release_id for e in copy.entries()}
        for entry in entries:
            if entry.release_id not in seen:
                copy.append(entry)
                added += 1
    return added
