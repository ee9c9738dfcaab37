"""A stage's manifest: what it was given, what it made, and the fingerprint that decides caching.

The manifest is written last, after every output is in place, so its presence is what makes a
stage complete. Its output hashes let a later run notice a tampered or truncated artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from knowledgesg.fileio import KEYED_PREFIX, hmac_file, read_json, sha256_file, sha256_text, write_json

MANIFEST = "manifest.json"


class OutputEntry(BaseModel):
    """One output. A client-side output (private data, or statistics of it) is recorded by a
    keyed digest and no size: a plain hash or a byte count of private data would let anyone who
    reads the manifest confirm a guess of one record, given the others. Record counts are kept:
    the number of records per client is treated as public (see the privacy report)."""

    model_config = ConfigDict(extra="forbid")

    sha256: str  # hex sha256 (server side) or "hmac-sha256:<hex>" keyed by the client key
    bytes: int | None
    records: int | None = None
    # Where the artifact lives in a real deployment: "server", or "client:<id>" for data that
    # never leaves that client. Server-side stages may only read "server" artifacts.
    side: str = "server"


def output_entry(path: Path, records: int | None, side: str, client_key: bytes) -> OutputEntry:
    if side == "server":
        return OutputEntry(sha256=sha256_file(path), bytes=path.stat().st_size, records=records, side=side)
    return OutputEntry(sha256=hmac_file(path, client_key), bytes=None, records=records, side=side)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str
    package_version: str
    code_sha256: str
    fingerprint: str
    content_fingerprint: str | None = None  # the fingerprint without the code version
    # a release kept across a change of how the fingerprint is taken: its content as the code now
    # takes it (runner.Fingerprint.earlier_content), so later changes are judged against that
    content_now: str | None = None
    params: dict[str, Any]
    seed: int
    inputs: dict[str, str]  # external input file -> sha256
    outputs: dict[str, OutputEntry]  # path relative to the stage directory -> entry
    started_at: str
    finished_at: str
    duration_s: float
    peak_rss_mib: float | None = None  # this process, sampled while the stage ran
    # on the server, for a stage the clients ran (knowledgesg.exchange): client -> the fingerprint
    # of the stage as it ran on that client
    received: dict[str, str] | None = None
    # what the stage found that its user should act on (server-side stages only: `StageContext.warn`)
    warnings: list[str] = []

    def outputs_digest(self) -> str:
        return sha256_text("".join(f"{path}={entry.sha256};" for path, entry in sorted(self.outputs.items())))

    def record_count(self) -> int | None:
        """Records in the stage's record files; None where it wrote none (models, adapters, reports)."""
        counts = [entry.records for entry in self.outputs.values() if entry.records is not None]
        return sum(counts) if counts else None


def read_manifest(stage_dir: Path) -> Manifest | None:
    path = stage_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        return Manifest.model_validate(read_json(path))
    except (ValueError, OSError):
        return None  # a manifest we cannot read is no proof of completion


def write_manifest(stage_dir: Path, manifest: Manifest) -> None:
    write_json(stage_dir / MANIFEST, manifest.model_dump(mode="json"))


def verify_outputs(stage_dir: Path, manifest: Manifest, client_key: bytes | None) -> str | None:
    """None if every output is on disk with its recorded digest, else what is wrong with the first
    that is not. Without the client key, client-side outputs cannot be checked: they count as changed."""
    for relative, entry in sorted(manifest.outputs.items()):
        path = stage_dir / relative
        if not path.is_file():
            return f"{path} is missing"
        if entry.sha256.startswith(KEYED_PREFIX):
            if client_key is None:
                return f"{path} cannot be checked without the run's client key"
            if hmac_file(path, client_key) != entry.sha256:
                return f"{path} no longer matches its manifest (digest changed)"
        elif path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
            return f"{path} no longer matches its manifest (sha256 changed)"
    return None
