"""Loaders (all formats, field mapping), partitioning, and the built-in data adapters."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from knowledgesg.builtin_data import TFNS_LABELS, VENDOR, load_builtin, normalise
from knowledgesg.errors import InputError
from knowledgesg.loaders import load_source
from knowledgesg.partition import partition
from knowledgesg.records import InstructionRecord
from knowledgesg.spec import DataSource, PartitionSpec

ROWS = [{"qid": "q1", "question": "What is A1C?", "answer": "A blood test.", "patient": "p1"},
        {"qid": "q2", "question": "What is HbA1c?", "answer": "The same test.", "patient": "p2"}]
MAPPING = {"id": "qid", "instruction": "question", "response": "answer", "user_id": "patient"}


def _write(fmt: str, directory: Path) -> Path:
    if fmt == "jsonl":
        path = directory / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        path = directory / "d.json"
        path.write_text(json.dumps(ROWS))
    elif fmt == "csv":
        path = directory / "d.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(ROWS[0]))
            writer.writeheader()
            writer.writerows(ROWS)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = directory / "d.parquet"
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    else:
        import datasets

        path = directory / "ds"
        datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "hf_disk"])
def test_every_format_loads_the_same_records(fmt: str, tmp_path: Path):
    path = _write(fmt, tmp_path)
    records = load_source(DataSource(path=path, fields=MAPPING, name="med"), tmp_path, seed=0)
    assert records == [
        InstructionRecord(id="med/q1", instruction="What is A1C?", response="A blood test.", source="med", user_id="p1"),
        InstructionRecord(id="med/q2", instruction="What is HbA1c?", response="The same test.", source="med", user_id="p2"),
    ]


def test_constants_and_text_records(tmp_path: Path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"body": "Patient improved after therapy."}\n')
    texts = load_source(DataSource(path=path, kind="text", fields={"text": "body"}), tmp_path, seed=0)
    assert texts[0].kind == "text" and texts[0].text == "Patient improved after therapy." and texts[0].id == "notes/1"
    path = tmp_path / "s.csv"
    path.write_text("sentence,label\nProfits rose,positive\n")
    recs = load_source(DataSource(path=path, fields={"input": "sentence", "response": "label"}, constants={"instruction": "Sentiment?"}), tmp_path, seed=0)
    assert recs[0].instruction == "Sentiment?" and recs[0].input == "Profits rose" and recs[0].response == "positive"


def test_dataset_dict_with_several_splits_is_refused(tmp_path: Path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match="holds several splits"):
        load_source(DataSource(path=tmp_path / "dd", fields=MAPPING), tmp_path, seed=0)


def test_sample_is_seeded_and_keeps_file_order():
    a = load_source(DataSource(builtin="fpb_train", sample=50), Path("."), seed=1)
    b = load_source(DataSource(builtin="fpb_train", sample=50), Path("."), seed=1)
    c = load_source(DataSource(builtin="fpb_train", sample=50), Path("."), seed=2)
    assert a == b and a != c and len(a) == 50
    numbers = [int(r.id.split("/")[1]) for r in a]
    assert numbers == sorted(numbers)


def _records(labels: list[str]) -> list[InstructionRecord]:
    return [InstructionRecord(id=f"s/{i}", instruction="Q", response=label, source="s" if i % 2 else "t") for i, label in enumerate(labels)]


def test_iid_partition_sizes_and_coverage():
    records = _records(["a"] * 101)
    clients = partition(records, PartitionSpec(method="iid", num_clients=3), seed=0)
    assert sorted(len(v) for v in clients.values()) == [33, 34, 34]
    assert sorted(r.id for part in clients.values() for r in part) == sorted(r.id for r in records)


def test_natural_partition_by_field():
    clients = partition(_records(["a"] * 10), PartitionSpec(method="natural", field="source", names=["even", "odd"]), seed=0)
    assert {k: {r.source for r in v} for k, v in clients.items()} == {"even": {"s"}, "odd": {"t"}}
    with pytest.raises(InputError, match="does not have 3 distinct values, one for each client"):
        partition(_records(["a"] * 10), PartitionSpec(method="natural", field="source", num_clients=3), seed=0)


def test_dirichlet_skew_follows_alpha():
    records = _records(["neg", "neu", "pos"] * 300)

    def spread(alpha: float) -> float:
        clients = partition(records, PartitionSpec(method="dirichlet", num_clients=3, alpha=alpha), seed=3)
        shares = [np.array([Counter(r.response for r in part)[label] for label in ("neg", "neu", "pos")]) / len(part) for part in clients.values()]
        return float(np.mean([np.abs(s - 1 / 3).sum() for s in shares]))

    assert spread(0.1) > 0.5 > 0.1 > spread(1000.0)
    first = partition(records, PartitionSpec(method="dirichlet", num_clients=3, alpha=0.5), seed=9)
    again = partition(records, PartitionSpec(method="dirichlet", num_clients=3, alpha=0.5), seed=9)
    assert first == again


def test_dirichlet_gives_up_loudly_when_a_client_stays_empty():
    with pytest.raises(InputError, match="Dirichlet\\(alpha=0.01\\) left a client with fewer than 5 records"):
        partition(_records(["a"] * 12), PartitionSpec(method="dirichlet", num_clients=4, alpha=0.01, min_client_records=5), seed=0)


@pytest.mark.parametrize("train,test", [("fpb_train", "fpb_test"), ("tfns_train", "tfns_test"), ("fiqa_train", "fiqa_test")])
def test_training_sets_hold_no_test_sentence(train: str, test: str):
    test_keys = {normalise(r.input) for r in load_builtin(test, test)}
    train_records = load_builtin(train, train)
    assert train_records and not [r for r in train_records if normalise(r.input) in test_keys]
    assert {r.response for r in train_records} == {"negative", "neutral", "positive"}


def test_fpb_decontamination_removes_the_overlap_that_exists():
    raw = (VENDOR / "financial_phrasebank/Sentences_50Agree.txt").read_text(encoding="latin-1").splitlines()
    assert len(raw) == 4846 and len(load_builtin("fpb_test", "t")) == 1212
    assert len(load_builtin("fpb_train", "f")) == 3625  # 4846 minus 1217 test lines, minus 4 repeats


def test_tfns_labels_follow_the_dataset_card():
    assert TFNS_LABELS == {"0": "negative", "1": "positive", "2": "neutral"}
    test = load_builtin("tfns_test", "t")
    bullish = next(r for r in test if "upgrade" in r.input.lower() and r.response == "positive")
    assert bullish and Counter(r.response for r in test) == {"neutral": 1566, "positive": 475, "negative": 347}


def test_pubmed_corpus_excludes_the_test_abstracts():
    test_ids = set(json.loads((VENDOR / "pubmedqa/test_ground_truth.json").read_text()))
    corpus = load_builtin("pubmed_abstracts", "pm")
    assert len(corpus) == 500 and not {r.id.split("/")[1] for r in corpus} & test_ids
