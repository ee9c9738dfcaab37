"""A client's number of privacy units, released as a noised count.

N (how many records, documents or users a client holds) sets the sampling rate q = B/N, the
number of steps and the default delta, and every statement sent with a release names it. Against
an adversary who holds every other record, an exact N tells whether the last one is in, whatever
noise the adapter carries. So N leaves the client only as N̂ = max(1, round(N + sigma Z)), a
Gaussian release of sensitivity 1 (one unit added or removed moves N by one) entered in the
client's ledger and composed with its other releases. Rounding and the floor are post-processing;
rounding to an integer also leaves no low bits of the float for an attack on the sampler to read.

The count is drawn once per data set and unit kind and reused ever after (a second draw would be
a second release, and averaging many would give N away). Every planned figure then follows from
N̂ and public spec settings; the Poisson coins still run over the actual units, each at rate q, so
the accounting is exact whatever N̂'s error (it only moves the expected batch away from B).
"""

from __future__ import annotations

from dataclasses import dataclass

from privacy.accounting import Mechanism
from privacy.ledger import ClientLedger, LedgerEntry
from privacy.noise import SecureRandom

COUNT_STAGE = "ingest"
COUNT_RELEASE = "noised_unit_count"


def count_mechanism(sigma: float) -> Mechanism:
    return Mechanism(kind="gaussian", noise_multiplier=sigma, steps=1)


def noised_count(n: int, sigma: float, random: SecureRandom) -> int:
    """N + N(0, sigma^2), rounded, at least 1."""
    return max(1, round(n + float(random.normal_values((1,), sigma)[0])))


def is_count_of(entry: LedgerEntry, client_id: str, kind: str) -> bool:
    return entry.stage == COUNT_STAGE and entry.release == COUNT_RELEASE and entry.client_id == client_id and entry.unit == kind


def released_count(ledger: ClientLedger, client_id: str, kind: str) -> LedgerEntry | None:
    """The count this client's data set already released at this unit kind (its own ledger file
    only: a count is of one data set, not of the client's other versions of it)."""
    return next((e for e in ledger.own_entries() if is_count_of(e, client_id, kind)), None)


@dataclass(frozen=True)
class ReleasedCount:
    """A client's size as the server plans with it: its noised count, less the audit's holdout and
    plus its canaries (ingest's `partition.json`)."""

    planned: int
    noise_multiplier: float


def partition_count(noise_multipliers: dict[str, float]) -> dict:
    """partition.json's note of how its sizes were released: each client's count with the sigma it
    was drawn at (a reused count keeps its own)."""
    return {"noised": True, "noise_multipliers": noise_multipliers}


def released_size(partition: dict, client_id: str) -> ReleasedCount | None:
    """The client's released size from ingest's `partition.json`; None where N is public."""
    count = partition.get("count")
    if not count or not count.get("noised"):
        return None
    return ReleasedCount(int(partition["clients"][client_id]), float(count["noise_multipliers"][client_id]))
