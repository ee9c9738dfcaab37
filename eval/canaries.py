"""Canaries: random secrets in an in-distribution template, planted in one client's private data.

Each canary is planted with probability `include_probability` (1/2 for the one-run audit of
Steinke et al.), `repeats` times. Its secret is drawn uniformly from a known space R, so exposure
can be measured against it:

- `digits`: a random digit string (R: 10^digits), Carlini et al.'s secret sharer;
- `rare_words`: `words` words from a vendored list of 4,096 rare English words (R: 4096^words), a
  designed canary in input space after Panda et al. (ICLR 2025, "Privacy auditing of large
  language models"): text the model finds unlikely moves its loss most when trained on, so a
  planted one stands out from the ones that were not.

The canaries and which of them were planted live on the client (`canaries.json`, written by
`ingest`): the audit runs there.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

from knowledgesg.records import InstructionRecord
from knowledgesg.spec import CanaryKind, CanarySpec, CanaryTemplate, PipelineSpec
from privacy.units import privacy_units

NAMES = ["Avery", "Blake", "Casey", "Dana", "Ellis", "Finley", "Gray", "Harper", "Jordan", "Kendall", "Logan", "Morgan", "Parker", "Quinn", "Reese", "Sawyer"]
RARE_WORDS_FILE = Path(__file__).resolve().parent.parent / "knowledgesg" / "vendor" / "rare_words.txt"


@lru_cache(maxsize=1)
def rare_words() -> tuple[str, ...]:
    return tuple(RARE_WORDS_FILE.read_text(encoding="utf-8").split())


@dataclass(frozen=True)
class Canary:
    index: int
    name: str
    secret: str
    included: bool
    kind: CanaryKind = "digits"

    def record(self, template: CanaryTemplate, secret: str | None = None, copy: int = 0, client_id: str = "") -> InstructionRecord:
        """The canary as a training record; with another `secret`, a candidate for its exposure."""
        value = self.secret if secret is None else secret

        def fill(text: str) -> str:
            return text.replace("{secret}", value).replace("{name}", self.name)

        # every copy names the canary as its user: at user level a canary is one unit, at record
        # level its copies are a group (the audit compares with the group's epsilon)
        return InstructionRecord(id=f"canary/{self.index}/{copy}", source="canary", client_id=client_id, user_id=f"canary-{self.index}",
                                 instruction=fill(template.instruction), input=fill(template.input), response=fill(template.response))


def random_secret(spec: CanarySpec, kind: CanaryKind, rng: random.Random, words: tuple[str, ...] | None = None) -> str:
    """`words`: the rare words a secret may use (default: the whole list)."""
    if kind == "digits":
        return "".join(rng.choice("0123456789") for _ in range(spec.digits))
    return " ".join(rng.choice(words or rare_words()) for _ in range(spec.words))


def space_size(spec: CanarySpec, kind: CanaryKind, words: int | None = None) -> int:
    """|R|: how many secrets a canary of this kind could have had (`words`: from that many rare words)."""
    return 10**spec.digits if kind == "digits" else (words or len(rare_words())) ** spec.words


def space_log2(spec: CanarySpec, kind: CanaryKind) -> float:
    return spec.digits * math.log2(10) if kind == "digits" else spec.words * math.log2(len(rare_words()))


def secret_budget_tokens(spec: CanarySpec, kind: CanaryKind) -> int:
    """New tokens enough to write out a secret: a digit is a token; a rare word takes a few."""
    return spec.digits + 4 if kind == "digits" else 4 * spec.words + 4


def make_canaries(spec: CanarySpec, seed: int) -> list[Canary]:
    """`count` canaries of each kind, numbered across kinds. Each kind draws from a stream of its
    own (the first kind, `digits` alone, keeps the stream canaries have always had), so adding a
    kind leaves the others' secrets and inclusion draws as they were.

    Rare-word secrets share no word: a canary that was not planted but shares words with planted
    ones would have its loss lowered by theirs (in audit_power.md, the unplanted canaries among the
    top scores shared 2 or 3 of their 4 words with planted ones), which blurs the very separation
    the audit measures."""
    canaries = []
    for kind in spec.kinds:
        rng = random.Random(f"{seed}:canaries" if kind == "digits" else f"{seed}:canaries:{kind}")
        unused = rng.sample(rare_words(), spec.count * spec.words) if kind == "rare_words" else []
        drawn: set[str] = set()
        for k in range(spec.count):
            index = len(canaries)
            secret = " ".join(unused[k * spec.words : (k + 1) * spec.words]) if kind == "rare_words" else random_secret(spec, kind, rng)
            while secret in drawn:  # two canaries on one secret: an unplanted one would be "memorised" through a planted one
                secret = random_secret(spec, kind, rng)  # (drawn again only then: the stream is as it was elsewhere)
            drawn.add(secret)
            name = NAMES[index % len(NAMES)] + (f" {index // len(NAMES) + 1}" if index >= len(NAMES) else "")
            canaries.append(Canary(index, name, secret, rng.random() < spec.include_probability, kind))
    return canaries


def planted_records(spec: CanarySpec, canaries: list[Canary], client_id: str) -> list[InstructionRecord]:
    return [c.record(spec.template, copy=k, client_id=client_id) for c in canaries if c.included for k in range(spec.repeats)]


def canary_units(spec: PipelineSpec, client_id: str, every: bool) -> int:
    """The units of the canaries the spec makes for a client: the ones drawn in, or `every` one,
    planted or not. N is planned with every canary: the one-run audit's theorem needs the same
    mechanism (the same q and steps) whichever canaries are in, and how many are in is a function
    of which."""
    if spec.audit.canaries is None or spec.audit.canaries.client != client_id:
        return 0
    canaries = make_canaries(spec.audit.canaries, spec.seed)
    if every:
        canaries = [replace(c, included=True) for c in canaries]
    return privacy_units(planted_records(spec.audit.canaries, canaries, client_id), spec.privacy.unit, max_records=1, documents=False).count


def unplanted_canary_units(spec: PipelineSpec, client_id: str) -> int:
    """What a public N (`count_noise: 0`, counted from the records trained on, the planted
    canaries among them) is planned with on top: the canaries' units left out, as `planned_units`
    plans a noised count with every canary."""
    return canary_units(spec, client_id, every=True) - canary_units(spec, client_id, every=False)


def canaries_json(spec: CanarySpec, canaries: list[Canary]) -> dict:
    return {"spec": spec.model_dump(), "canaries": [asdict(c) for c in canaries]}


def read_canaries(payload: dict) -> tuple[CanarySpec, list[Canary]]:
    return CanarySpec.model_validate(payload["spec"]), [Canary(**c) for c in payload["canaries"]]
