"""Crash-safe artifact I/O: every file is written to a temporary sibling and renamed into place.

A rename within one directory is atomic on POSIX, so a reader (or a resumed run) sees either the
old file, the new file, or no file, never a torn one.

`KSG_CRASH_AT=N` (tests only) makes the process SIGKILL itself at the N-th crash point, where the
crash points are "temporary file written, not yet renamed" and "file renamed" for every artifact.
The crash-safety tests walk N over every point of a run. `KSG_CRASH_AFTER=<name>` kills it at
one named point instead (`named_crash_point`, which can also hang or raise there).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from knowledgesg.errors import KsgError

_crash_points_passed = 0


def _crash_point() -> None:
    global _crash_points_passed
    target = os.environ.get("KSG_CRASH_AT")
    if not target:
        return
    _crash_points_passed += 1
    if _crash_points_passed == int(target):
        os.kill(os.getpid(), signal.SIGKILL)


def named_crash_point(name: str) -> None:
    """`KSG_CRASH_AFTER=<name>` (tests only): SIGKILL this process here, e.g. between two rounds;
    `KSG_HANG_AT=<name>`: stop here for good without dying (a client that never answers);
    `KSG_RAISE_AT=<name>`: raise here (a client that fails, e.g. one that drops out of SecAgg+
    after sharing its keys)."""
    if os.environ.get("KSG_RAISE_AT") == name:
        raise RuntimeError(f"failure injected at {name}")
    if os.environ.get("KSG_CRASH_AFTER") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("KSG_HANG_AT") == name:
        while True:
            time.sleep(3600)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on success, fsync and rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        _crash_point()
        os.replace(tmp_name, path)
        _crash_point()
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_dir(target: Path, build: Callable[[Path], None], before_publish: Callable[[Path], None] | None = None) -> None:
    """A directory written whole: `build` fills a temporary sibling, which then replaces `target`
    (a copy left by a run killed after the rename is replaced too). `before_publish` sees the
    finished temporary directory first (e.g. to record a release in a ledger before it is out)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        build(tmp)
        fsync_tree(tmp)  # on disk before a ledger entry or a unit marker vouches for it
        if before_publish is not None:
            before_publish(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    fsync_path(target.parent)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """Every file and directory under `directory`, and `directory` itself, flushed to disk."""
    for path in [*sorted(directory.rglob("*")), directory]:
        fsync_path(path)


def files_under(path: Path) -> list[Path]:
    """The files of a directory, recursively and sorted; a file path is itself."""
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as handle:
        handle.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Whole or not at all, and readable by its owner only from the first byte (mkstemp makes the
    file 0600): what keys are written with."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def unmakeable_directory(path: Path, must_write: bool = True) -> str | None:
    """Why `path` cannot be (or become) a directory this process writes in, or None: it is a
    file or (`must_write`) a directory it cannot write in, or its nearest existing ancestor is a
    file or not writable."""
    if path.exists():
        if not path.is_dir():
            return "exists and is not a directory"
        return None if not must_write or os.access(path, os.W_OK | os.X_OK) else "is not writable"
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable"
    return None


def canonical_json(obj: Any) -> str:
    """The one JSON spelling used for fingerprints and artifacts: sorted keys, no spaces."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def json_text(obj: Any) -> str:
    """The text `write_json` writes."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json_text(obj))


class DamagedJSON(json.JSONDecodeError, KsgError):
    """A JSON file the run wrote that cannot be read back (cut short, edited, not UTF-8): the CLI's
    one line naming it, and still a JSONDecodeError for callers that take a damaged cache as absent.
    It keeps neither the document nor a position in it: the file may be a client's records, and a
    position may fall inside a value."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "", 0)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # JSONDecodeError's takes (msg, doc, pos)
        return type(self), (self.message,)


def _decoded(path: Path, read: Callable[[], Any]) -> Any:
    try:
        return read()
    except json.JSONDecodeError as err:
        raise DamagedJSON(f"{path}: damaged JSON ({err.msg})") from None
    except UnicodeDecodeError:
        raise DamagedJSON(f"{path}: damaged JSON (not UTF-8)") from None


def read_json(path: str | Path) -> Any:
    return _decoded(Path(path), lambda: json.loads(Path(path).read_text(encoding="utf-8")))


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write one canonical JSON object per line; return the number of rows."""
    count = 0
    with atomic_open(path) as handle:
        for row in rows:
            handle.write(canonical_json(row) + "\n")
            count += 1
    return count


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    def read() -> list[dict[str, Any]]:
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    return _decoded(Path(path), read)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


KEYED_PREFIX = "hmac-sha256:"


def hmac_file(path: str | Path, key: bytes) -> str:
    """A keyed digest: it proves a file unchanged to whoever holds the key, and to no one else
    confirms a guess of the file's contents (what a plain hash of private data would do)."""
    digest = hmac.new(key, digestmod=hashlib.sha256)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return KEYED_PREFIX + digest.hexdigest()


def hmac_text(key: bytes, text: str) -> str:
    """`hmac_file` of a short text (a file's size and mtime, a record's digest)."""
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_tree(root: Path) -> dict[str, bytes]:
    """Every file under `root`, by its path relative to it (POSIX form), in sorted order."""
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}
