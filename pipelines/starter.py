"""`ksg init DATA...`: a starter spec from the user's own files, every choice commented.

For each file it detects the format, reads the columns and proposes the field mapping (a column
per record field, by name), whether it holds instruction pairs or unstructured text, and the
labels when the responses are few distinct values. Several files become one client each; one
file is split over three clients. The stages follow from the data: `structure` when there is
text, a DP histogram never (a uniform prior is free), refine and fedtune on the server, publish.
The spec is checked by the same validation as `ksg run` before it is written.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from knowledgesg.errors import InputError
from knowledgesg.fileio import unmakeable_directory, write_text
from knowledgesg.loaders import READERS, detect_format, field_names, rows_to_records
from knowledgesg.spec import DataSource, unsafe_identifier_reason
from pipelines import parse_pipeline

Domain = Literal["finance", "medicine"]
SAMPLE_ROWS = 500
MAX_LABELS = 20
# A response column is proposed as labels (written into the spec, which the server holds) only if
# its values look like labels: short, and each seen several times; a free-text answer never is.
LABEL_CHARACTERS = 40
LABEL_REPEATS = 3
HEADER_CELL = 64  # characters: a longer "column name" is a record, in a CSV file without a header row
LONG_TEXT = 300  # characters: a column this long on average is a document, not a field

CANDIDATES = {  # record field -> column names that usually hold it, most likely first
    "id": ("id", "uid", "qid", "record_id", "doc_id", "idx"),
    "instruction": ("instruction", "question", "prompt", "query", "title", "task"),
    "input": ("input", "context", "sentence", "tweet", "headline", "text", "passage"),
    "response": ("response", "answer", "output", "label", "sentiment", "target", "completion", "class"),
    "user_id": ("user_id", "user", "patient", "patient_id", "customer", "customer_id", "author", "account"),
}
TEXT_COLUMNS = ("text", "abstract", "transcript", "content", "body", "document", "note", "report")
SENTIMENT = {"negative", "neutral", "positive"}

DOMAINS = {
    "finance": {
        "pool": "fiqa_train",
        "instruction": "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}.",
        "task": "financial sentiment analysis: a single news headline or tweet about markets or companies",
    },
    "medicine": {
        "pool": "medquad",
        "instruction": "Answer the medical question.",
        "task": "medical question answering: a patient's or clinician's question about a condition or treatment",
    },
}


@dataclass
class FileGuess:
    path: Path
    format: str
    kind: Literal["instruction", "text"]
    fields: dict[str, str] = field(default_factory=dict)  # record field -> column, where they differ
    constants: dict[str, str] = field(default_factory=dict)
    labels: list[str] | None = None
    users: bool = False  # a user_id column: user-level privacy is possible
    notes: list[str] = field(default_factory=list)


def sample_rows(path: Path, fmt: str) -> list[tuple[int, dict]]:
    """The file's first rows, each with its line or record number."""
    rows = []
    for number, row in READERS[fmt](path):
        rows.append((number, row))
        if len(rows) >= SAMPLE_ROWS:
            break
    if not rows:
        raise InputError(f"{path}: no records")
    return rows


def pick(columns: list[str], names: tuple[str, ...], taken: set[str]) -> str | None:
    lowered = {c.lower(): c for c in columns if c not in taken}
    return next((lowered[n] for n in names if n in lowered), None)


def mean_length(rows: list[dict], column: str) -> float:
    values = [len(str(r.get(column) or "")) for r in rows]
    return sum(values) / max(1, len(values))


def guess_file(path: Path, domain: Domain) -> FileGuess:
    fmt = detect_format(path)
    numbered = sample_rows(path, fmt)
    rows = [row for _, row in numbered]
    columns = list(dict.fromkeys(c for row in rows for c in row))
    if fmt == "csv" and any(len(c) > HEADER_CELL or "\n" in c for c in columns):
        # its first line would be written into the spec as column names: a private record
        raise InputError(f"{path}: line 1 does not look like a header row (a cell of more than {HEADER_CELL} characters); add one naming the columns")
    guess = FileGuess(path=path, format=fmt, kind="instruction")
    taken: set[str] = set()
    chosen = {}
    for record_field in ("id", "response", "instruction", "input", "user_id"):
        column = pick(columns, CANDIDATES[record_field], taken)
        if column is not None:
            chosen[record_field] = column
            taken.add(column)
    guess.users = "user_id" in chosen
    if "response" not in chosen:
        # a CSV column it does not know by name is never written into the spec: in a file without a
        # header row its "name" is the first record's cell
        text = pick(columns, TEXT_COLUMNS, set()) or (None if fmt == "csv" else max(columns, key=lambda c: mean_length(rows, c)))
        if text is None or mean_length(rows, text) < LONG_TEXT / 3:
            raise InputError(f"{path}: no column looks like a response ({', '.join(CANDIDATES['response'])}) or a document ({', '.join(TEXT_COLUMNS)}); "
                             f"the records have {field_names(rows[0], fmt)}; rename a column to one of those, or map it in a spec by hand (fields: ...)")
        guess.kind = "text"
        guess.fields = {name: column for name, column in (("text", text), ("id", chosen.get("id")), ("user_id", chosen.get("user_id"))) if column and column != name}
        guess.notes.append(f"no response column: column '{text}', the longest, is unstructured text for `structure`")
        return guess
    # read as `ksg run` will read them (an integer label, a row without a response: named by file,
    # line and field here, not as an empty label in the spec this would write)
    placeholder = {} if "instruction" in chosen else {"instruction": "(to be chosen)"}
    rows_to_records(path, iter(numbered), DataSource(path=path, fields={k: v for k, v in chosen.items() if k != v}, constants=placeholder), path.stem, fmt)
    # counts and lengths of the data stay out of the notes: they become comments of the spec
    seen = Counter(r[chosen["response"]].strip().lower() for r in rows)
    if 2 <= len(seen) <= MAX_LABELS and all(len(v) <= LABEL_CHARACTERS and n >= LABEL_REPEATS for v, n in seen.items()):
        guess.labels = sorted(seen)
        guess.notes.append(f"'{chosen['response']}' takes a few short values, each repeated: a labelled task")
    if "instruction" not in chosen:
        if "input" not in chosen:
            raise InputError(f"{path}: found a response column '{chosen['response']}' but no text to go with it (the records have {field_names(rows[0], fmt)})")
        default = DOMAINS[domain]["instruction"]
        if guess.labels and not set(guess.labels) <= SENTIMENT:
            default = f"Classify the text. Answer with one of: {', '.join(guess.labels)}."
        guess.constants["instruction"] = default
        guess.notes.append(f"no instruction column: every record gets the instruction {default!r}")
    guess.fields = {name: column for name, column in chosen.items() if column != name}
    guess.notes.append("mapping " + ", ".join(f"{name} <- '{column}'" for name, column in chosen.items()))
    return guess


def client_name(path: Path, taken: set[str]) -> str:
    """A safe client name from a file's stem, unique among `taken` even on a case-insensitive
    file system (each client is a directory). Made safe once, then only numbered: a suffix
    cannot mend an unsafe name ('..', too long), so numbering one would never end."""
    stem = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)).strip("._-")
    base = stem[:56].rstrip("._-") or "client"  # room for a '_<n>' suffix within 64 characters
    folded = {t.casefold() for t in taken}
    name, number = base, 0
    while name.casefold() in folded:
        number += 1
        name = f"{base}_{number}"
    assert unsafe_identifier_reason(name) is None, name
    taken.add(name)
    return name


def _value(value) -> str:
    """A YAML scalar or flow collection (JSON is valid YAML)."""
    return json.dumps(value, ensure_ascii=False)


def _source(guess: FileGuess, spec_dir: Path, indent: str) -> list[str]:
    path = Path(_relative(guess.path, spec_dir))
    lines = [f"{indent}- path: {_value(str(path))}  # {guess.format}"]  # not its size: N is the noised count's to tell
    if guess.kind == "text":
        lines.append(f"{indent}  kind: text  # unstructured documents: `structure` turns them into pairs on the client")
    if guess.fields:
        lines.append(f"{indent}  fields: {_value(guess.fields)}  # record field: column")
    if guess.constants:
        lines.append(f"{indent}  constants: {_value(guess.constants)}")
    return lines


def _relative(path: Path, start: Path) -> str:
    return os.path.relpath(path.resolve(), start.resolve())


def starter_spec(files: list[Path], domain: Domain, name: str, spec_path: Path) -> str:
    guesses = [guess_file(path, domain) for path in files]
    preset = DOMAINS[domain]
    spec_dir = spec_path.parent
    labels = next((g.labels for g in guesses if g.labels), None)
    has_text = any(g.kind == "text" for g in guesses)
    has_users = all(g.users for g in guesses)
    lines = [f"# Run: ksg run {spec_path}", "#", f"# A starter spec written by `ksg init` from {len(files)} file(s); check it with `ksg check {spec_path}`.",
             "# What was found:"]
    lines += [f"# - {g.path.name}: " + "; ".join(g.notes) for g in guesses]
    lines += [f"name: {_value(name)}", "seed: 0", "", "models:",
              "  base: smollm2-135m-instruct  # the packaged 135M chat model; any Hugging Face id or local directory works",
              "  professional: gemma-3-270m  # judges and relabels synthetic data on the server; a stronger model helps most here"]
    if has_text:
        lines.append("  embedder: minilm-l6-v2  # retrieves public few-shot examples for `structure`")
    lines += ["", "clients:"]
    if len(guesses) > 1:
        taken: set[str] = set()
        lines.append("  members:  # one client per file: each keeps its own records")
        for guess in guesses:
            lines.append(f"    - id: {client_name(guess.path, taken)}")
            lines.append("      data:")
            lines += _source(guess, spec_dir, "        ")
    else:
        lines.append("  data:")
        lines += _source(guesses[0], spec_dir, "    ")
        if labels:
            lines.append("  partition: {method: dirichlet, num_clients: 3, alpha: 1.0, label_field: response}  # one file split over 3 clients, skewed by label; edit to your parties")
        else:
            lines.append("  partition: {method: iid, num_clients: 3}  # one file split evenly over 3 clients; edit to your parties")
    unit = "user" if has_users else "record"
    lines += ["", "privacy:",
              "  target_epsilon: 8.0  # per client, for dp_train; at about 1,000 records per client DP-SGD learns most of a task",
              f"  unit: {unit}  # " + ("records with a user_id: all of one user's records are protected together" if has_users
                                      else "each record (pairs structured from one document are protected together)"),
              "  cap_epsilon: 10.0  # no client may ever spend more, over every release its ledger holds",
              "  # delta: default at most 1e-5 and 1/(100 N) per client",
              "  # count_noise: 10  # each client's N leaves it as N + Gaussian noise of this std, once per data set (0: N public)", "", "stages:",
              "  - prepare_models", "  - ingest"]
    if has_text:
        lines += ["  - name: structure  # text -> pairs, prompted with retrieved public examples",
                  f"    params: {_value({'pool': {'builtin': preset['pool']}, **({'labels': labels} if labels else {})})}"]
    lines += ["  - name: dp_train  # LoRA with DP-SGD on each client; loss on the whole turn so the model learns to write inputs",
              f"    params: {_value({'epochs': 1.0, 'batch_size': 8, 'loss_on': 'all', **({'source_stage': 'structure'} if has_text else {})})}"]
    seed = {"instruction": preset["instruction"], "domain": domain}
    # for a labelled task, what the headline benchmark measured (benchmarks/results/finance_headline.md):
    # the DP models' own label proportions, their labels kept through refine, the label prior calibrated
    labelled = {"labels": labels, "class_balance": "model", "response_max_new_tokens": 8} if labels else {"response_max_new_tokens": 128}
    synthesize = {"per_client": 60, "seeds": [seed], **labelled}
    lines += ["  - name: synthesize  # new pairs from each DP adapter, from public prompts only (post-processing: free)"
              + ("; labels in the proportions the DP model writes them (the prior it learned), not uniform quotas" if labels else ""),
              f"    params: {_value(synthesize)}"]
    refine = {"pool": {"builtin": preset["pool"]}, "task": preset["task"], **({"labels": labels, "label_source": "dp"} if labels else {})}
    lines += ["  - name: refine  # the professional model keeps the good pairs" + ("; label_source: dp keeps the DP models' labels, since a professional "
                                                                              "tuned on public data relabelled away the private label shares in the benchmark"
                                                                              if labels else " and rewrites their answers"),
              f"    params: {_value(refine)}",
              "  - name: fedtune  # FedAvg over the clients on the refined synthetic data (free)", f"    params: {_value({'rounds': 3})}"]
    if labels:
        lines += ["    # with a public labelled set that has these same labels, add it beside the synthetic pairs as about a quarter of the mix"
                  " (the benchmark's mean went from 0.49 to 0.62 with it): public: {builtin: fiqa_train, sample: 300}",
                  "  - name: calibrate  # the final adapter's label prior, fitted to the pairs it was tuned on (server side, free); shipped with it",
                  f"    params: {_value({'labels': labels})}"]
    lines += ["  - publish  # the final adapter and the synthetic data, each with a card carrying the privacy statement", ""]
    return "\n".join(lines)


def write_starter_spec(files: list[Path], domain: Domain, spec_path: Path, name: str | None, force: bool) -> str:
    if spec_path.exists() and not force:
        raise InputError(f"{spec_path}: exists; choose another --out or pass --force")
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise InputError(f"{missing[0]}: data file not found")
    special = [str(f) for f in files if not (f.is_file() or f.is_dir())]
    if special:  # a named pipe or a device: reading it may never end
        raise InputError(f"{special[0]}: not a regular file or a directory")
    first: dict[Path, Path] = {}
    for f in files:
        if f.resolve() in first:  # each file is a client: one file twice puts its records in two clients' data
            raise InputError(f"{f}: given twice (as {first[f.resolve()]}); a record in two clients' data would be counted in neither's ledger alone")
        first[f.resolve()] = f
    if any((spec_path.exists() and spec_path.samefile(f)) or (f.is_dir() and spec_path.resolve().is_relative_to(f.resolve())) for f in files):
        raise InputError(f"{spec_path}: is one of the data files (or inside one); --force would overwrite your data: choose another --out")
    # where the spec file could not be written (as where a directory could not be made: its nearest existing ancestor)
    problem = "is a directory" if spec_path.is_dir() else None if spec_path.exists() else unmakeable_directory(spec_path)
    if problem:
        raise InputError(f"--out {spec_path}: {problem}")
    name = name or re.sub(r"[^A-Za-z0-9_.-]+", "-", spec_path.stem).strip(".-") or "my-pipeline"
    text = starter_spec(files, domain, name, spec_path)
    parse_pipeline(yaml.safe_load(text), str(spec_path))  # never write a spec `ksg run` would refuse
    write_text(spec_path, text)
    return text
