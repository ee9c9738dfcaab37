"""Prompt pieces built from public text only, shared by the stages that generate and the audit.

A `Seed` is all a synthesis prompt may contain: no private record ever enters a prompt, which is
what makes generation from a DP adapter post-processing.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

from knowledgesg.records import InstructionRecord

MARK = "\x00USER_TEXT\x00"


class Seed(BaseModel):
    """Public text only: a task instruction (first line of the user turn) and/or an opening phrase."""

    model_config = ConfigDict(extra="forbid")

    instruction: str = ""
    prefix: str = ""
    domain: str = ""
    task: str = ""


def user_message(record: InstructionRecord) -> str:
    """A record's user turn: its instruction, and its input on the next line."""
    return f"{record.instruction}\n{record.input}" if record.input else record.instruction


def user_turn_prefix(tokenizer, seed: Seed) -> str:
    """The chat-template text up to where the user's own words start, after the public seed."""
    opening = (seed.instruction + "\n" if seed.instruction else "") + seed.prefix
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": opening + MARK}], tokenize=False, add_generation_prompt=False)
    return rendered.split(MARK)[0]


def label_named(response: str, labels: list[str]) -> str | None:
    """The label a labelled pair's response is (the whole answer, any case), or None: how refine
    and calibrate read a synthetic pair's label, where `parse_label` reads a generated answer."""
    return next((label for label in labels if label.lower() == response.strip().lower()), None)


def parse_label(response: str, labels: list[str]) -> str | None:
    """The label a response names first, or None."""
    found = [(m.start(), label) for label in labels for m in [re.search(rf"\b{re.escape(label.lower())}\b", response.lower())] if m]
    return min(found)[1] if found else None
