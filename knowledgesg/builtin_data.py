"""Adapters for the public data sets vendored in `knowledgesg/vendor/` (see SOURCES.md there).

Financial sentiment follows the FinGPT instruction format. The FPB, TFNS and FiQA training sets
overlap the standard test sets they are evaluated on; every training adapter removes the test
sentences (matched on normalised text), so no evaluation figure is inflated by leakage.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path

from knowledgesg.errors import InputError
from knowledgesg.records import InstructionRecord, Record, TextRecord

VENDOR = Path(__file__).parent / "vendor"
SENTIMENT_LABELS = ("negative", "neutral", "positive")
NEWS_INSTRUCTION = "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."
TWEET_INSTRUCTION = "What is the sentiment of this tweet? Please choose an answer from {negative/neutral/positive}."
TFNS_LABELS = {"0": "negative", "1": "positive", "2": "neutral"}  # 0=Bearish, 1=Bullish, 2=Neutral


def normalise(text: str) -> str:
    """Key for overlap checks: lower case, URLs dropped, letters and digits only."""
    return re.sub(r"[^a-z0-9]+", "", re.sub(r"https?://\S+", "", text.lower()))


def _parse_fingpt(path: Path, source: str) -> list[InstructionRecord]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        row = json.loads(line)
        head, rest = row["context"].split("\nInput: ", 1)
        records.append(
            InstructionRecord(
                id=f"{source}/{number}",
                instruction=head.removeprefix("Instruction: ").strip(),
                input=rest.rsplit("\nAnswer: ", 1)[0].strip(),
                response=row["target"].strip(),
                source=source,
            )
        )
    return records


@cache
def _test_keys() -> frozenset[str]:
    keys = set()
    for name in ("fpb", "fiqa", "tfns"):
        keys.update(normalise(r.input) for r in _parse_fingpt(VENDOR / "finlora_sentiment_test" / f"{name}_test.jsonl", name))
    return frozenset(keys)


def _sentiment(source: str, rows: list[tuple[str, str, str, str]]) -> list[InstructionRecord]:
    """(id, instruction, sentence, label) rows, minus test sentences and exact repeats."""
    test, seen, records = _test_keys(), set(), []
    for raw_id, instruction, sentence, label in rows:
        key = normalise(sentence)
        if key in test or key in seen:
            continue
        seen.add(key)
        records.append(InstructionRecord(id=f"{source}/{raw_id}", instruction=instruction, input=sentence.strip(), response=label, source=source))
    return records


def fpb_train(source: str) -> list[Record]:
    lines = (VENDOR / "financial_phrasebank" / "Sentences_50Agree.txt").read_text(encoding="latin-1").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            sentence, label = line.rsplit("@", 1)
            rows.append((str(number), NEWS_INSTRUCTION, sentence, label.strip()))
    return _sentiment(source, rows)


def tfns_train(source: str) -> list[Record]:
    with open(VENDOR / "tfns" / "sent_train.csv", encoding="utf-8", newline="") as handle:
        rows = [(str(n), TWEET_INSTRUCTION, row["text"], TFNS_LABELS[row["label"]]) for n, row in enumerate(csv.DictReader(handle), start=1)]
    return _sentiment(source, rows)


def _fiqa_label(score: float) -> str:
    # FinGPT's thresholds for FiQA sentiment scores in [-1, 1].
    return "negative" if score < -0.1 else ("neutral" if score < 0.1 else "positive")


def fiqa_train(source: str) -> list[Record]:
    rows = []
    for part, instruction in (("headline", NEWS_INSTRUCTION), ("post", TWEET_INSTRUCTION)):
        for split in ("train", "test"):
            data = json.loads((VENDOR / "fiqa_task1" / f"task1_{part}_ABSA_{split}.json").read_text(encoding="utf-8"))
            for key, item in data.items():
                rows.append((f"{part}-{split}-{key}", instruction, item["sentence"], _fiqa_label(float(item["info"][0]["sentiment_score"]))))
    return _sentiment(source, rows)


def tfns_test(source: str) -> list[Record]:
    # Not FinLoRA's tfns_test.jsonl: it labels Bullish (1) "neutral" and Neutral (2) "positive",
    # against the data set card (0 Bearish, 1 Bullish, 2 Neutral). We label sent_valid.csv ourselves.
    with open(VENDOR / "tfns" / "sent_valid.csv", encoding="utf-8", newline="") as handle:
        return [
            InstructionRecord(id=f"{source}/{n}", instruction=TWEET_INSTRUCTION, input=row["text"].strip(), response=TFNS_LABELS[row["label"]], source=source)
            for n, row in enumerate(csv.DictReader(handle), start=1)
        ]


def _finlora_test(name: str) -> Callable[[str], list[Record]]:
    return lambda source: list(_parse_fingpt(VENDOR / "finlora_sentiment_test" / f"{name}_test.jsonl", source))


def medquad(source: str) -> list[Record]:
    records = []
    for line in (VENDOR / "medquad" / "medquad_answered_subset.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        records.append(InstructionRecord(id=f"{source}/{row['qid']}", instruction=row["question"].strip(), response=row["answer"].strip(), source=source))
    return records


def chatdoctor(source: str) -> list[Record]:
    rows = json.loads((VENDOR / "chatdoctor_genmedgpt5k" / "chatdoctor5k_first1500.json").read_text(encoding="utf-8"))
    return [
        InstructionRecord(id=f"{source}/{n}", instruction=row["instruction"].strip(), input=row["input"].strip(), response=row["output"].strip(), source=source)
        for n, row in enumerate(rows, start=1)
        if row["input"].strip() and row["output"].strip()
    ]


def pubmed_abstracts(source: str) -> list[Record]:
    """The 500 PubMedQA abstracts outside its test set, as unstructured text."""
    labelled = json.loads((VENDOR / "pubmedqa" / "ori_pqal.json").read_text(encoding="utf-8"))
    test_ids = set(json.loads((VENDOR / "pubmedqa" / "test_ground_truth.json").read_text(encoding="utf-8")))
    return [TextRecord(id=f"{source}/{pmid}", text=" ".join(item["CONTEXTS"]).strip(), source=source) for pmid, item in labelled.items() if pmid not in test_ids]


def ectsum_transcripts(source: str) -> list[Record]:
    records = []
    for line in (VENDOR / "ectsum_val" / "ectsum_val_first30.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        records.append(TextRecord(id=f"{source}/{row['id']}", text=row["transcript"].strip(), source=source))
    return records


BUILTINS: dict[str, tuple[str, Callable[[str], list[Record]]]] = {
    "fpb_train": ("instruction", fpb_train),
    "tfns_train": ("instruction", tfns_train),
    "fiqa_train": ("instruction", fiqa_train),
    "fpb_test": ("instruction", _finlora_test("fpb")),
    "fiqa_test": ("instruction", _finlora_test("fiqa")),
    "tfns_test": ("instruction", tfns_test),
    "medquad": ("instruction", medquad),
    "chatdoctor": ("instruction", chatdoctor),
    "pubmed_abstracts": ("text", pubmed_abstracts),
    "ectsum_transcripts": ("text", ectsum_transcripts),
}


def load_builtin(name: str, source_name: str, expected_kind: str | None = None) -> list[Record]:
    if name not in BUILTINS:
        raise InputError(f"unknown builtin data set '{name}' (known: {', '.join(sorted(BUILTINS))})")
    kind, loader = BUILTINS[name]
    if expected_kind is not None and expected_kind != kind:
        raise InputError(f"builtin data set '{name}' holds {kind} records, but the spec says kind: {expected_kind}")
    return loader(source_name)
