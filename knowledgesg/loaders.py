"""Read private data from files into validated records, failing on the first bad line.

Each problem is reported as one line naming the file, the line (or record number, for formats
without lines) and the field, so that a data owner can fix it without reading our code.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from knowledgesg.builtin_data import VENDOR, load_builtin
from knowledgesg.errors import InputError, SpecError, data_error
from knowledgesg.fileio import sha256_file
from knowledgesg.records import ID_FIELDS, RECORD_FIELDS, REQUIRED_FIELDS, InstructionRecord, Record, TextRecord, unpaired_surrogate
from knowledgesg.spec import DataSource

SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
Row = tuple[int, dict[str, Any]]  # (line or record number, the raw row)


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "hf_disk"
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(SUFFIX_FORMATS))
        raise InputError(f"{path}: unknown data format '{path.suffix or '(no suffix)'}' (known: {known}, or a saved datasets directory; or set 'format')")
    return fmt


def _decode(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:  # permissions, a vanished file
        raise data_error(path, f"cannot be read ({err.strerror or type(err).__name__})") from None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark, as Windows tools write one
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        # The line says where; the byte and its offset are the record's content, kept off the console.
        raise data_error(path, "not valid UTF-8; re-encode the file as UTF-8", line=line) from None


def _rows_jsonl(path: Path) -> Iterator[Row]:
    for number, line in enumerate(_decode(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            # no column: in an unterminated string or a bad escape it is a position inside a value
            raise data_error(path, f"malformed JSON ({err.msg})", line=number) from None
        except (ValueError, RecursionError) as err:  # an integer of over 4,300 digits, nesting deeper than the stack
            raise data_error(path, f"unreadable JSON ({type(err).__name__})", line=number) from None
        if not isinstance(row, dict):
            raise data_error(path, f"expected a JSON object, got {type(row).__name__}", line=number)
        yield number, row


def _rows_json(path: Path) -> Iterator[Row]:
    text = _decode(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise data_error(path, f"malformed JSON ({err.msg})", line=err.lineno) from None
    except (ValueError, RecursionError) as err:
        raise data_error(path, f"unreadable JSON ({type(err).__name__})") from None
    if not isinstance(data, list):
        raise data_error(path, f"expected a JSON list of objects, got {type(data).__name__}")
    for number, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise InputError(f"{path}: record {number}: expected a JSON object, got {type(row).__name__}")
        yield number, row


def _rows_csv(path: Path) -> Iterator[Row]:
    # a byte-order mark (Excel's "CSV UTF-8") would otherwise be part of the first column's name;
    # strict: a quote never closed is an error, not the rest of the file read as one cell
    reader = csv.DictReader(io.StringIO(_decode(path), newline=""), strict=True)
    starts = 1  # the line the row being read starts on (a quoted cell may span lines)
    try:
        names = reader.fieldnames or []
        repeated = [name for name, count in Counter(names).items() if count > 1]
        if repeated:  # DictReader would keep the last column of that name and drop the others
            # by position, not name: without a header row the "header" is a private record (`field_names`)
            first, second = [k + 1 for k, name in enumerate(names) if name == repeated[0]][:2]
            raise data_error(path, f"columns {first} and {second} have the same name in the header", line=1)
        starts = reader.line_num + 1
        for row in reader:
            if None in row:  # more cells than header columns
                raise data_error(path, f"{len(reader.fieldnames or [])} columns in the header but more cells on this line", line=reader.line_num)
            yield reader.line_num, row  # fewer: the missing cells are None, as an optional field left out
            starts = reader.line_num + 1
    except csv.Error as err:
        raise data_error(path, f"malformed CSV in the row that starts here ({err}; a quote never closed?)", line=starts) from None


def _rows_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several unrelated types for a corrupt file
        raise data_error(path, f"not a readable Parquet file ({type(err).__name__}: {err})") from None
    try:
        rows = table.to_pylist()
    except UnicodeDecodeError:  # its text names the byte and where it stands in a value
        raise data_error(path, "holds text that is not valid UTF-8") from None
    yield from enumerate(rows, start=1)


def _rows_hf_disk(path: Path) -> Iterator[Row]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError or ValueError for a non-dataset dir
        raise data_error(path, f"not a saved `datasets` directory ({type(err).__name__}: {err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise data_error(path, f"holds several splits ({', '.join(loaded)}); point 'path' at one split's directory")
        loaded = next(iter(loaded.values()))
    number = 0
    try:
        for number, row in enumerate(loaded, start=1):  # its strings are decoded as each row is read
            yield number, row
    except UnicodeDecodeError:  # its text names the byte and where it stands in a value
        raise data_error(path, f"record {number + 1}: holds text that is not valid UTF-8") from None


READERS = {"jsonl": _rows_jsonl, "json": _rows_json, "csv": _rows_csv, "parquet": _rows_parquet, "hf_disk": _rows_hf_disk}


def field_names(row: dict[str, Any], fmt: str) -> str:
    """A record's field names for an error message. Not a CSV file's: its "header" is its first
    private record when it has no header row (a sentence, a patient's name), and no rule tells a
    name from a value ("JaneRoe"); a JSON object's keys are names."""
    if not row:
        return "no fields"
    if fmt == "csv":
        return f"{len(row)} columns, their names not shown (without a header row they would be the first record; see it with `head -1 FILE`)"
    return ", ".join(map(str, row))


def _field_value(path: Path, number: int, row: dict[str, Any], record_field: str, column: str, required: bool, fmt: str) -> str | None:
    line_based = fmt in ("jsonl", "csv")
    where = {"line": number} if line_based else {}
    prefix = "" if line_based else f"record {number}: "
    if column not in row:
        if required:
            mapped = f" (mapped to record field '{record_field}')" if column != record_field else ""
            if fmt == "csv":  # every row has the header's columns: the header lacks it, not this line
                hint = "" if mapped else f"; map one with `fields: {{{record_field}: NAME}}` on the data source"
                raise data_error(path, f"no column '{column}' in the header{mapped}: it has {field_names(row, fmt)}{hint}", line=1)
            hint = mapped or f" (the record has {field_names(row, fmt)}; map one with `fields: {{{record_field}: NAME}}` on the data source)"
            raise data_error(path, f"{prefix}missing{hint}", field=column, **where)
        return None
    value = row[column]
    if value is None:
        if required:
            # a CSV row with fewer cells than the header leaves the rest None
            raise data_error(path, "fewer cells on this line than columns in the header" if fmt == "csv" else f"{prefix}is null", field=column, **where)
        return None
    if record_field in ("id", "user_id") and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        hint = " (labels given as numbers: write each as the word it stands for)" if record_field == "response" and isinstance(value, (int, float)) else ""
        raise data_error(path, f"{prefix}must be a string, got {type(value).__name__}{hint}", field=column, **where)
    unpaired = unpaired_surrogate(value)
    if unpaired is not None:
        raise data_error(path, f"{prefix}{unpaired}", field=column, **where)
    if not value.strip():
        if required:
            raise data_error(path, f"{prefix}is empty", field=column, **where)
        if record_field in ID_FIELDS:
            return None  # a blank optional cell is absent: "" as a user id made every such record one user
    return value


def rows_to_records(path: Path, rows: Iterator[Row], source: DataSource, source_name: str, fmt: str) -> list[Record]:
    line_based = fmt in ("jsonl", "csv")
    kind = source.kind or "instruction"
    allowed = RECORD_FIELDS[kind]
    for mapping_name, mapping in (("fields", source.fields), ("constants", source.constants)):
        unknown = sorted(set(mapping) - set(allowed))
        if unknown:
            raise InputError(f"{path}: {mapping_name} maps unknown record field '{unknown[0]}' (a {kind} record has: {', '.join(allowed)})")
    record_type = InstructionRecord if kind == "instruction" else TextRecord
    records: list[Record] = []
    first_seen: dict[str, int] = {}
    for number, row in rows:
        values: dict[str, str] = {}
        for record_field in allowed:
            if record_field in source.constants:
                values[record_field] = source.constants[record_field]
                continue
            column = source.fields.get(record_field, record_field)
            required = record_field in REQUIRED_FIELDS[kind] or record_field in source.fields
            value = _field_value(path, number, row, record_field, column, required, fmt)
            if value is not None:
                values[record_field] = value
        raw_id = values.pop("id", None) or str(number)
        if raw_id in first_seen:
            where = "line" if line_based else "record"
            # Named by position, not by value: an id may itself be private (a patient number).
            prefix = "" if line_based else f"record {number}: "
            raise data_error(path, f"{prefix}duplicate id (the same as at {where} {first_seen[raw_id]})", field=source.fields.get("id", "id"),
                             **({"line": number} if line_based else {}))
        first_seen[raw_id] = number
        records.append(record_type(id=f"{source_name}/{raw_id}", source=source_name, **values))
    if not records:
        raise data_error(path, "no records")
    return records


def subsample(records: list[Record], size: int | None, seed: int, source_name: str) -> list[Record]:
    """A seeded random subset, kept in file order so outputs diff cleanly (public data, and the pool
    a simulation partitions; a client's own files: `first_by_content`)."""
    if size is None or size >= len(records):
        return records
    keep = sorted(random.Random(f"{seed}:{source_name}").sample(range(len(records)), size))
    return [records[i] for i in keep]


def content_order(record: Record, seed: int, purpose: str) -> bytes:
    """A record's place in a seeded order that follows from its own content alone, not from its
    position or line-number id in the file, nor from the other records."""
    content = record.model_dump(exclude={"id", "client_id", "source"})
    return hashlib.sha256(f"{seed}:{purpose}:{json.dumps(content, sort_keys=True)}".encode()).digest()


def first_by_content(records: list[Record], size: int, seed: int, purpose: str) -> set[int]:
    """The indices of the `size` records first in `content_order`. On a client's private records this
    keeps neighbouring data sets neighbours: adding one record changes the selection by at most
    that record and the one it displaces. (A seeded sample of positions does not: one record
    inserted shifts every position after it, and the server, holding the seed and every other
    record, would see a training set that differs by dozens of records.)"""
    order = sorted(range(len(records)), key=lambda i: (content_order(records[i], seed, purpose), i))
    return set(order[:size])


def subsample_by_content(records: list[Record], size: int | None, seed: int, source_name: str) -> list[Record]:
    """A client's own data source cut to `size` records (`first_by_content`), kept in file order."""
    if size is None or size >= len(records):
        return records
    keep = first_by_content(records, size, seed, f"sample:{source_name}")
    return [r for i, r in enumerate(records) if i in keep]


def source_name_of(source: DataSource) -> str:
    if source.name:
        return source.name
    return source.builtin if source.builtin else Path(source.path).stem  # type: ignore[arg-type]


def source_path(source: DataSource, base_dir: Path, key: str | None = None) -> Path:
    """The file or directory a data source reads (the vendored data for a builtin). `key`: where
    the spec names the source (`clients.data[0]`), put in the error of a path that is not there."""
    if source.builtin is not None:
        return VENDOR
    path = source.path if source.path.is_absolute() else base_dir / source.path  # type: ignore[union-attr]
    problem = None if path.exists() else "data file not found"
    if problem is None and not (path.is_file() or path.is_dir()):  # a named pipe or a device: reading it may never end
        problem = "not a regular file or a directory"
    if problem is not None:
        raise SpecError(f"{key}.path: {path}: {problem}") if key else InputError(f"{path}: {problem}")
    return path


def load_source(source: DataSource, base_dir: Path, seed: int, own_data: bool = False, key: str | None = None) -> list[Record]:
    """Load one data source of the spec into records (ids prefixed with the source name); `own_data`:
    a client member's own files, whose `sample` must keep neighbouring data sets neighbours; `key`:
    where the spec names it (see `source_path`)."""
    name = source_name_of(source)
    if source.builtin is not None:
        records = load_builtin(source.builtin, source_name=name, expected_kind=source.kind)
    else:
        path = source_path(source, base_dir, key)
        fmt = detect_format(path) if source.format == "auto" else source.format
        records = rows_to_records(path, READERS[fmt](path), source, name, fmt)
    return (subsample_by_content if own_data else subsample)(records, source.sample, seed, name)


def load_example_pool(source: DataSource, base_dir: Path, seed: int, stage: str, minimum: int = 1) -> list[InstructionRecord]:
    """A public pool of instruction records (few-shot examples), refused if it has too few.
    `stage`: the spec key that names the pool ("refine params.pool")."""
    pool = [r for r in load_source(source, base_dir, seed, key=stage) if isinstance(r, InstructionRecord)]
    if len(pool) < minimum:
        raise SpecError(f"{stage}: the example pool {source.builtin or source.path} has {len(pool)} instruction records, fewer than the {minimum} needed")
    return pool


def load_labelled_pool(source: DataSource, base_dir: Path, seed: int, stage: str) -> list[InstructionRecord]:
    """A public pool's instruction records that carry a response (what a stage can train on),
    refused if there are none."""
    pool = [r for r in load_example_pool(source, base_dir, seed, stage) if r.response.strip()]
    if not pool:
        raise SpecError(f"{stage}: the pool {source.builtin or source.path} has no instruction records with a response")
    return pool


def same_data(public: DataSource, client: DataSource, base_dir: Path) -> bool:
    """Whether `public` could read `client`'s data: the same builtin, the same file or directory
    (by path, link or content), one inside the other, or a path into the built-in data. The
    client's files need not exist here (on the server, with roles, they do not)."""
    if public.builtin or client.builtin:  # a path into the vendored data may be a builtin's file
        paths = [absolute(source.path, base_dir) for source in (public, client) if source.path is not None]
        return public.builtin == client.builtin or any(path.is_relative_to(VENDOR.resolve()) for path in paths)
    mine, theirs = absolute(public.path, base_dir), absolute(client.path, base_dir)
    if mine == theirs or mine.is_relative_to(theirs) or theirs.is_relative_to(mine):
        return True
    if mine.exists() and theirs.exists():
        if mine.samefile(theirs):
            return True
        if mine.is_file() and theirs.is_file() and mine.stat().st_size == theirs.stat().st_size:
            return sha256_file(mine) == sha256_file(theirs)  # a copy
    return False


def refuse_client_data(public: DataSource, clients: list[DataSource], base_dir: Path, field: str) -> None:
    """A server stage's public data (`field` names it in the spec) must not be a client's."""
    if any(same_data(public, source, base_dir) for source in clients):
        raise SpecError(f"{field}: {public.builtin or public.path} is also a client's data source; it must be public data")


def absolute(path: Path | None, base_dir: Path) -> Path:
    assert path is not None
    return (path if path.is_absolute() else base_dir / path).resolve()
