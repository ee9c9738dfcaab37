"""The two kinds of record that flow through the pipeline."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class InstructionRecord(BaseModel):
    """One instruction-response pair. `user_id` groups records for user-level privacy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["instruction"] = "instruction"
    id: str = Field(min_length=1)
    instruction: str = Field(min_length=1)
    input: str = ""
    response: str = Field(min_length=1)
    client_id: str = ""
    source: str = Field(min_length=1)
    user_id: str | None = None


class TextRecord(BaseModel):
    """A piece of unstructured text (an abstract, a transcript) before it is structured."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["text"] = "text"
    id: str = Field(min_length=1)
    text: str = Field(min_length=1)
    client_id: str = ""
    source: str = Field(min_length=1)
    user_id: str | None = None


Record = InstructionRecord | TextRecord

# The record fields a data source can fill from its columns, per record kind.
RECORD_FIELDS: dict[str, tuple[str, ...]] = {
    "instruction": ("id", "instruction", "input", "response", "user_id"),
    "text": ("id", "text", "user_id"),
}
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction", "response"),
    "text": ("text",),
}
