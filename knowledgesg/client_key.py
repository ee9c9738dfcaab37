"""The client key: the secret that keys the digests of client-side files in manifests.

In a deployment each client keeps its own; in the single-process simulation one key in the run
directory (`.client_key`, mode 0600) stands for them. With `privacy.reproducible_noise` it is
derived from the public seed instead, like the noise, so that whole runs replay byte for byte;
such runs are marked NOT PRIVATE anyway.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from knowledgesg.fileio import atomic_open
from knowledgesg.spec import PipelineSpec

KEY_FILE = ".client_key"
KEY_BYTES = 32


def reproducible_key(spec: PipelineSpec) -> bytes:
    return hashlib.sha256(f"{spec.seed}:client-key".encode()).digest()


def existing_client_key(run_dir: Path, spec: PipelineSpec) -> bytes | None:
    if spec.privacy.reproducible_noise:
        return reproducible_key(spec)
    path = run_dir / KEY_FILE
    key = path.read_bytes() if path.is_file() else b""
    return key if len(key) == KEY_BYTES else None


def client_key(run_dir: Path, spec: PipelineSpec) -> bytes:
    """The run's key, made from OS entropy the first time (written whole, mode 0600)."""
    key = existing_client_key(run_dir, spec)
    if key is None:
        key = os.urandom(KEY_BYTES)
        with atomic_open(run_dir / KEY_FILE, "wb", encoding=None) as handle:  # mkstemp: mode 0600
            handle.write(key)
    return key
