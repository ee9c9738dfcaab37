"""The two kinds of record that flow through the pipeline."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Record(BaseModel):
    """What every record has: a unique id, its origin, and its owner."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    client_id: str = ""
    source: str = Field(min_length=1)
    user_id: str | None = None  # groups records for user-level privacy
    # the source document a record was derived from (`structure`): its records are one privacy unit
    document_id: str | None = None


class InstructionRecord(_Record):
    """One instruction-response pair."""

    kind: Literal["instruction"] = "instruction"
    instruction: str = Field(min_length=1)
    input: str = ""
    response: str = Field(min_length=1)


class TextRecord(_Record):
    """A piece of unstructured text (an abstract, a transcript) before it is structured."""

    kind: Literal["text"] = "text"
    text: str = Field(min_length=1)


Record = InstructionRecord | TextRecord

# The record fields a data source can fill from its columns, per record kind.
RECORD_FIELDS: dict[str, tuple[str, ...]] = {
    "instruction": ("id", "instruction", "input", "response", "user_id", "document_id"),
    "text": ("id", "text", "user_id"),
}
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction", "response"),
    "text": ("text",),
}

# The fields that name a record, its user or its document: never empty (a blank one is absent).
ID_FIELDS = ("id", "user_id", "document_id")


def unpaired_surrogate(value: str) -> str | None:
    """What is wrong with a string JSON could hold but UTF-8 cannot (an escape such as \\ud800 left
    without its pair, as a tweet cut mid-emoji has), or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # Neither the code unit nor its position is named: the value may be a private record's, and an
        # error line reaches consoles and logs the server may read (file, line and field say where).
        return "holds an unpaired surrogate (half of a UTF-16 pair, as text cut mid-emoji has): not text UTF-8 can hold"
    return None
