"""Releases crossing from a client to the server (`knowledgesg.roles`), through an exchange directory.

    EXCHANGE/<client>/<stage>/manifest.json   the stage's manifest as it ran on the client, cut to
                                              its server-side outputs (no input paths or digests,
                                              no timings: its start and end are when it was sent)
    EXCHANGE/<client>/<stage>/<outputs>       those outputs: releases only (a DP adapter with its
                                              privacy statement and ledger entry, a DP histogram,
                                              the client's noised unit count, the public pool index)
    EXCHANGE/<client>/ledger.jsonl            the client's ledger: every release ever made from its
                                              data (run directories replaced by a label), so the
                                              server counts them all

A client checks its ledger against its own budget cap before anything is sent and writes its part
whole (a temporary directory, then a rename). The server checks every file against the client's
manifest and the stage's parameters against its own spec; a client may write only under its own
`clients/<id>/` or into the top-level files the stages share, and only about itself (its noised
unit count, its ledger entries). The server keeps every ledger entry it received
(`privacy.ledger.received_ledger`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import ValidationError

from knowledgesg import __version__
from knowledgesg.errors import InputError, KsgError
from knowledgesg.fileio import canonical_json, fsync_tree, read_json, sha256_file, sha256_text, write_json, write_jsonl
from knowledgesg.manifest import MANIFEST, Manifest, OutputEntry, output_entry, read_manifest, verify_outputs, write_manifest
from knowledgesg.spec import format_validation_error
from privacy.count import partition_count
from privacy.ledger import LEDGER, LedgerEntry, as_sent, client_delta, composed_total, now, received_ledger

CLIENT_LEDGER = "ledger.jsonl"


def _merge_partition(values: dict[str, Any]) -> Any:
    first = next(iter(values.values()))
    merged = {key: value for key, value in first.items() if key not in ("clients", "count")}
    merged["clients"] = {}
    for value in values.values():
        merged["clients"].update(value["clients"])
    counts = [value["count"] for value in values.values() if isinstance(value.get("count"), dict)]
    if counts:
        merged["count"] = partition_count({c: sigma for count in counts for c, sigma in count["noise_multipliers"].items()})
    return merged


def _concatenate(values: dict[str, Any]) -> Any:
    return [item for value in values.values() for item in value]


def _partition_about(value: Any) -> set[str]:
    if not isinstance(value, dict) or not isinstance(value.get("clients"), dict):
        raise ValueError("should be an object whose 'clients' is an object of client records")
    count = value.get("count")
    if count is not None and not (isinstance(count, dict) and isinstance(count.get("noise_multipliers"), dict)):
        raise ValueError("its 'count' should be an object with the 'noise_multipliers' of its noised counts")
    return set(value["clients"]) | set(count["noise_multipliers"] if count else ())


def _ledger_about(value: Any) -> set[str]:
    if not isinstance(value, list) or not all(isinstance(entry, dict) and isinstance(entry.get("client_id"), str) for entry in value):
        raise ValueError("should be a list of ledger entries, each with a 'client_id'")
    return {entry["client_id"] for entry in value}


# top-level files that several clients' stages write, each about its own data: how they merge,
# and which clients a client's copy speaks about (it may speak about itself only)
MERGES: dict[str, Callable[[dict[str, Any]], Any]] = {"partition.json": _merge_partition, LEDGER: _concatenate}
ABOUT: dict[str, Callable[[Any], set[str]]] = {"partition.json": _partition_about, LEDGER: _ledger_about}


def check_sendable(client_id: str, ledger: list[LedgerEntry], cap: float | None) -> None:
    """A client sends nothing once its releases compose past its own cap."""
    if cap is None or not ledger:
        return
    total = composed_total(ledger, client_delta(ledger)).reported
    if total > cap:
        raise KsgError(f"client '{client_id}': its releases compose to epsilon {total:.3f}, above its cap {cap:g}; nothing is sent")


def check_path(relative: str, client_id: str, who: str) -> None:
    """A file a client sends: a plain relative path, top-level or under its own clients/<id>/."""
    path = PurePosixPath(relative)
    if not relative or path.as_posix() != relative or path.is_absolute() or ".." in path.parts or path.name == MANIFEST:
        raise KsgError(f"{who}: '{relative}' is not a plain relative path to a release")
    parts = path.parts
    if len(parts) > 1 and (parts[0] != "clients" or len(parts) < 3 or parts[1] != client_id):
        raise KsgError(f"{who}: '{relative}' is outside clients/{client_id}/: a client sends only its own releases")


def replace_part(exchange: Path, client_id: str, fill: Callable[[Path], None]) -> Path:
    """EXCHANGE/<client>, written whole by `fill` into a fresh directory, then swapped in by rename."""
    exchange.mkdir(parents=True, exist_ok=True)
    staging, target, old = exchange / f".{client_id}.tmp", exchange / client_id, exchange / f".{client_id}.old.tmp"
    for leftover in (staging, old):
        if leftover.is_symlink():
            leftover.unlink()
        shutil.rmtree(leftover, ignore_errors=True)
    staging.mkdir()
    fill(staging)
    if target.is_symlink():
        target.unlink()
    elif target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def write_files(directory: Path, files: dict[str, bytes], client_id: str) -> None:
    """Files a client sent (over Flower) into its part of the exchange; the paths checked first."""
    for relative, data in files.items():
        stage, _, inside = relative.partition("/")
        if inside:  # <stage>/manifest.json or <stage>/<output>
            if not stage or stage.startswith("."):
                raise KsgError(f"client '{client_id}': '{relative}' names no stage")
            if inside != MANIFEST:
                check_path(inside, client_id, f"client '{client_id}'")
        elif relative != CLIENT_LEDGER:
            raise KsgError(f"client '{client_id}': '{relative}' is not part of a release")
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def export_releases(run_dir: Path, stage_names: list[str], client_id: str, exchange: Path, ledger: list[LedgerEntry], cap: float | None) -> Path:
    """Put the server-side outputs of this client's stages, and its ledger, in EXCHANGE/<client>."""
    check_sendable(client_id, ledger, cap)
    sent_at = now()

    def fill(staging: Path) -> None:
        for name in stage_names:
            manifest = read_manifest(run_dir / "stages" / name)
            if manifest is None:
                raise KsgError(f"stage '{name}' has not completed in {run_dir}: nothing to send")
            sent = {relative: entry for relative, entry in manifest.outputs.items() if entry.side == "server"}
            for relative in list(sent):
                check_path(relative, client_id, f"stage '{name}'")
                target = staging / name / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                if PurePosixPath(relative).name == LEDGER:
                    # the stage's copy of its ledger entries, as the ledger sent below
                    write_json(target, [as_sent(LedgerEntry.model_validate(entry)) for entry in read_json(run_dir / "stages" / name / relative)])
                    sent[relative] = output_entry(target, sent[relative].records, "server", b"")
                else:
                    shutil.copyfile(run_dir / "stages" / name / relative, target)
            # how long a stage took and the memory it used say something of the data (dp_train's time
            # follows the sampled records' lengths): not sent, nor the times that give it by
            # subtraction (each stage's start and end: the server learns only when the part was sent,
            # which it sees anyway), nor its warnings (free text; a client's stage may not make any:
            # StageContext.warn)
            write_manifest(staging / name, manifest.model_copy(update={"outputs": sent, "inputs": {}, "duration_s": 0.0, "peak_rss_mib": None, "warnings": [],
                                                                       "started_at": sent_at, "finished_at": sent_at}))
        write_jsonl(staging / CLIENT_LEDGER, [as_sent(e) for e in ledger])

    return replace_part(exchange, client_id, fill)


def _received_manifest(exchange: Path, client_id: str, stage: str) -> Manifest:
    part = exchange / client_id
    manifest = read_manifest(part / stage)
    if manifest is None:
        raise KsgError(f"waiting for client '{client_id}': no release of stage '{stage}' in {exchange} "
                       f"(on its machine: ksg run SPEC --role client --client {client_id} --exchange ...)")
    if manifest.warnings:
        raise KsgError(f"client '{client_id}': its {stage} manifest carries warnings (free text a client never sends)")
    for relative, entry in manifest.outputs.items():
        check_path(relative, client_id, f"client '{client_id}'")
        path = part / stage / relative
        if path.is_symlink() or not path.resolve().is_relative_to(part.resolve()):
            raise KsgError(f"client '{client_id}': {stage}/{relative} is a link out of its part of the exchange")
        if entry.side != "server" or not path.is_file() or sha256_file(path) != entry.sha256:
            raise KsgError(f"client '{client_id}': {stage}/{relative} does not match the manifest it sent (missing, changed, or not a release)")
    return manifest


def _merge_shared(stage: str, relative: str, values: dict[str, Any]) -> Any:
    for client_id, value in values.items():
        if relative not in ABOUT:
            continue
        try:
            about = ABOUT[relative](value)
        except ValueError as err:
            raise InputError(f"client '{client_id}': its {stage}/{relative} {err}") from None
        if about - {client_id}:
            raise KsgError(f"client '{client_id}': its {stage}/{relative} speaks about other clients ({', '.join(sorted(about - {client_id}))})")
    if relative in MERGES:
        return MERGES[relative](values)
    if len({canonical_json(v) for v in values.values()}) > 1:
        raise KsgError(f"stage '{stage}': the clients sent different '{relative}' (it must be the same from every client)")
    return next(iter(values.values()))


def _merge_into(building: Path, exchange: Path, stage: str, received: dict[str, Manifest], fingerprint: str, params: dict, seed: int) -> None:
    """Every client's files of the stage into `building`, the shared ones merged, manifest last."""
    outputs: dict[str, OutputEntry] = {}
    shared: dict[str, dict[str, Any]] = {}
    for client_id, manifest in received.items():
        for relative, entry in manifest.outputs.items():
            source = exchange / client_id / stage / relative
            if len(PurePosixPath(relative).parts) == 1:
                shared.setdefault(relative, {})[client_id] = _client_json(client_id, f"{stage}/{relative}", source)
                continue
            target = building / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            outputs[relative] = entry
    for relative, values in shared.items():
        write_json(building / relative, _merge_shared(stage, relative, values))
        outputs[relative] = OutputEntry(sha256=sha256_file(building / relative), bytes=(building / relative).stat().st_size, side="server")
    first = next(iter(received.values()))
    write_manifest(building, Manifest(stage=stage, package_version=__version__, code_sha256=first.code_sha256, fingerprint=fingerprint, content_fingerprint=fingerprint,
                                      params=params, seed=seed, inputs={}, outputs=outputs, started_at=min(m.started_at for m in received.values()),
                                      finished_at=max(m.finished_at for m in received.values()), duration_s=0.0, received={c: m.fingerprint for c, m in received.items()}))


def receive_stage(run_dir: Path, exchange: Path, stage: str, clients: list[str], params: dict, seed: int) -> tuple[Manifest, bool]:
    """The stage's releases from every client, merged into RUN/stages/<stage> with a manifest that
    names each client's run of it; the clients must have run it as the server's spec says
    (`params`, `seed`). (manifest, whether anything new was received)."""
    received = {c: _received_manifest(exchange, c, stage) for c in clients}
    for client_id, manifest in received.items():
        if canonical_json(manifest.params) != canonical_json(params) or manifest.seed != seed:
            raise KsgError(f"client '{client_id}' ran stage '{stage}' with other parameters or seed than this spec (is every party on the same spec?)")
    fingerprint = sha256_text(canonical_json({c: [m.fingerprint, m.outputs_digest()] for c, m in received.items()}))
    stage_dir = run_dir / "stages" / stage
    existing = read_manifest(stage_dir)
    # received before: reused only as it was received (a file torn or edited since is received again)
    if existing is not None and existing.fingerprint == fingerprint and verify_outputs(stage_dir, existing, None) is None:
        return existing, False
    building = stage_dir.with_name(f".{stage}.received.tmp")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    try:
        _merge_into(building, exchange, stage, received, fingerprint, params, seed)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    fsync_tree(building)  # whole on disk before it takes the stage's place
    shutil.rmtree(stage_dir, ignore_errors=True)  # what was received before stays until the new one is whole
    building.rename(stage_dir)
    manifest = read_manifest(stage_dir)
    assert manifest is not None
    return manifest, True


def _client_json(client_id: str, name: str, path: Path) -> Any:
    try:
        return read_json(path)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"client '{client_id}': its {name} is not JSON ({err})") from None


def _received_entries(client_id: str, path: Path) -> list[LedgerEntry]:
    """The ledger a client sent, each line a valid entry about that client (else one line naming
    the line and field)."""
    entries = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise InputError(f"client '{client_id}': its {CLIENT_LEDGER} is not UTF-8 text ({err})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entries.append(LedgerEntry.model_validate_json(line))
        except ValidationError as err:
            raise InputError(format_validation_error(f"client '{client_id}': its {CLIENT_LEDGER}, line {number}", err)) from None
    if any(e.client_id != client_id for e in entries):
        raise KsgError(f"client '{client_id}': its ledger holds another client's entries")
    return entries


def receive_ledgers(run_dir: Path, exchange: Path, clients: list[str]) -> int:
    """Append to the server's copy of each client's ledger the entries it has not seen; how many."""
    added = 0
    for client_id in clients:
        path = exchange / client_id / CLIENT_LEDGER
        if not path.is_file():
            continue
        if path.is_symlink():
            raise KsgError(f"client '{client_id}': its ledger is a link out of its part of the exchange")
        entries = _received_entries(client_id, path)
        copy = received_ledger(run_dir, client_id)
        seen = {e.release_id for e in copy.entries()}
        for entry in entries:
            if entry.release_id not in seen:
                copy.append(entry)
                added += 1
    return added
