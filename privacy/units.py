"""Privacy units: which records are protected together, and how much one unit may contribute.

Neighbouring data sets differ in one unit, so the unit is what an epsilon is about:

- `record`: each record is a unit, except that the records derived from one source document
  (the pairs `structure` makes from one transcript or abstract carry its id as `document_id`)
  form one unit together. A transcript turned into eight pairs is then protected as the one
  thing its owner cares about, and the unit is named `source_document` (a record not derived
  from a document is still a unit of its own).
- `user`: all of one user's records (`user_id`) form a unit.

A unit contributes at most `max_records` records (its first ones): bounded contribution is what
makes the sensitivity of a unit finite. Every mechanism (DP-SGD, the label histogram) takes its
units from here.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Literal

from knowledgesg.errors import SpecError
from knowledgesg.records import InstructionRecord

SpecUnit = Literal["record", "user"]
UnitKind = Literal["record", "source_document", "user"]

UNIT_NAMES = {"record": "record", "source_document": "source document", "user": "user", "client": "client"}


@dataclass(frozen=True)
class Units:
    kind: UnitKind
    members: list[list[int]]  # record indices of each unit, at most max_records each
    max_records: int  # the most records one unit contributes (1 for plain records)

    @property
    def count(self) -> int:
        return len(self.members)

    @property
    def rows_per_unit(self) -> list[int]:
        return [len(m) for m in self.members]


def privacy_units(records: list[InstructionRecord], unit: SpecUnit, max_records: int, derived: bool | None = None) -> Units:
    """Group records into units (in first-seen order), each truncated to `max_records` records.
    `derived`: whether the records may hold pairs derived from a source document, as the pipeline
    (not the data) says; None: whether any record does. Stated by the pipeline, the unit kind and
    its bound no longer tell whether a client's documents gave any pair."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        if unit == "user":
            if record.user_id is None:
                raise SpecError(f"privacy.unit is 'user' but record '{record.id}' has no user_id (map one with fields: {{user_id: ...}})")
            groups[f"user:{record.user_id}"].append(index)
        else:
            groups[f"document:{record.document_id}" if record.document_id else f"record:{index}"].append(index)
    if derived is None:
        derived = any(r.document_id for r in records)
    kind: UnitKind = "user" if unit == "user" else ("source_document" if derived else "record")
    bound = 1 if kind == "record" else max_records
    return Units(kind=kind, members=[indices[:bound] for indices in groups.values()], max_records=bound)


def bounded_label_counts(records: list[InstructionRecord], labels: list[str], units: Units) -> dict[str, int]:
    """Label counts over the units' (truncated) records: one unit moves them by at most
    `units.max_records` in total, which is the histogram's L2 sensitivity."""
    counts = Counter(records[i].response.strip().lower() for member in units.members for i in member)
    return {label: counts.get(label.lower(), 0) for label in labels}
