"""Privacy units: which records are protected together, and how much one unit may contribute.

Neighbouring data sets differ in one unit, so the unit is what an epsilon is about:

- `record`: each record is a unit, except that where the spec says a client's records come from
  source documents (text that `structure` turns into pairs carrying its id as `document_id`, or a
  `document_id` the spec maps), the records of one document form one unit together. A transcript
  turned into eight pairs is then protected as the one thing its owner cares about, and the unit
  is named `source_document` (a record with no document id is still a unit of its own).
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


def privacy_units(records: list[InstructionRecord], unit: SpecUnit, max_records: int, documents: bool) -> Units:
    """Group records into units (in first-seen order), each truncated to `max_records` records.
    `documents`: whether the records may hold pairs derived from a source document, as the spec
    says (`ClientsSpec.holds_documents`, or dp_train reading structure's pairs), never the data:
    then the records of one `document_id` form one unit, and the unit is the source document.
    Otherwise every record is its own unit, a document id or not. Decided from the data, the unit
    kind and its bound (stated in every release, and the histogram's noise) would tell whether a
    record carrying a document id is in, or whether any document gave a pair."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        if unit == "user":
            if record.user_id is None:
                # by its source, not its id: an id may itself be private, and this line reaches the event log
                raise SpecError(f"privacy.unit is 'user' but a record of source '{record.source}' has no user_id (map one with fields: {{user_id: ...}})")
            groups[f"user:{record.user_id}"].append(index)
        else:
            groups[f"document:{record.document_id}" if documents and record.document_id else f"record:{index}"].append(index)
    kind: UnitKind = "user" if unit == "user" else ("source_document" if documents else "record")
    bound = 1 if kind == "record" else max_records
    return Units(kind=kind, members=[indices[:bound] for indices in groups.values()], max_records=bound)


def bounded_label_counts(records: list[InstructionRecord], labels: list[str], units: Units) -> dict[str, int]:
    """Label counts over the units' (truncated) records: one unit moves them by at most
    `units.max_records` in total, which is the histogram's L2 sensitivity."""
    counts = Counter(records[i].response.strip().lower() for member in units.members for i in member)
    return {label: counts.get(label.lower(), 0) for label in labels}
