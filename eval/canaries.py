"""Canaries: random secrets in an in-distribution template, planted in one client's private data.

Each canary is planted with probability `include_probability` (1/2 for the one-run audit of
Steinke et al.), `repeats` times. The secret is a random digit string, so the space of
candidates R (10^digits) is known exactly. The canaries and which of them were planted live on
the client (`canaries.json`, written by `ingest`): the audit runs there.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from knowledgesg.records import InstructionRecord
from knowledgesg.spec import CanarySpec, CanaryTemplate

NAMES = ["Avery", "Blake", "Casey", "Dana", "Ellis", "Finley", "Gray", "Harper", "Jordan", "Kendall", "Logan", "Morgan", "Parker", "Quinn", "Reese", "Sawyer"]


@dataclass(frozen=True)
class Canary:
    index: int
    name: str
    secret: str
    included: bool

    def record(self, template: CanaryTemplate, secret: str | None = None, copy: int = 0, client_id: str = "") -> InstructionRecord:
        """The canary as a training record; with another `secret`, a candidate for its exposure."""
        value = self.secret if secret is None else secret

        def fill(text: str) -> str:
            return text.replace("{secret}", value).replace("{name}", self.name)

        # every copy names the canary as its user: at user level a canary is one unit, at record
        # level its copies are a group (the audit compares with the group's epsilon)
        return InstructionRecord(id=f"canary/{self.index}/{copy}", source="canary", client_id=client_id, user_id=f"canary-{self.index}",
                                 instruction=fill(template.instruction), input=fill(template.input), response=fill(template.response))


def make_canaries(spec: CanarySpec, seed: int) -> list[Canary]:
    rng = random.Random(f"{seed}:canaries")
    canaries = []
    for index in range(spec.count):
        secret = "".join(rng.choice("0123456789") for _ in range(spec.digits))
        name = NAMES[index % len(NAMES)] + (f" {index // len(NAMES) + 1}" if index >= len(NAMES) else "")
        canaries.append(Canary(index, name, secret, rng.random() < spec.include_probability))
    return canaries


def planted_records(spec: CanarySpec, canaries: list[Canary], client_id: str) -> list[InstructionRecord]:
    return [c.record(spec.template, copy=k, client_id=client_id) for c in canaries if c.included for k in range(spec.repeats)]


def canaries_json(spec: CanarySpec, canaries: list[Canary]) -> dict:
    return {"spec": spec.model_dump(), "canaries": [asdict(c) for c in canaries]}


def read_canaries(payload: dict) -> tuple[CanarySpec, list[Canary]]:
    return CanarySpec.model_validate(payload["spec"]), [Canary(**c) for c in payload["canaries"]]
