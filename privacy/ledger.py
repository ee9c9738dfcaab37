"""The privacy ledger: every release that leaves a client, and each client's composed total.

A stage that releases something writes `ledger.json` (a list of entries) among its artifacts;
the ledger of a run is those lists in stage order. Nothing is tracked in memory across stages,
so a resumed run recomputes exactly the same totals.
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from knowledgesg.errors import InputError
from knowledgesg.fileio import read_json
from knowledgesg.manifest import read_manifest
from privacy.accounting import Epsilons, Mechanism, epsilon_pld, epsilon_prv_or_none, epsilon_rdp

LEDGER = "ledger.json"


class LedgerEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    client_id: str
    stage: str
    release: str  # what left the client, e.g. "dp_adapter"; or a post-processing step
    artifact: str  # the released artifact, relative to the run directory
    unit: str  # record | user
    delta: float
    mechanism: Mechanism
    epsilon: Epsilons
    private: bool


def read_ledger(run_dir: Path, stages: list[str]) -> list[LedgerEntry]:
    """Entries of the given completed stages, in that order."""
    entries = []
    for stage in stages:
        stage_dir = run_dir / "stages" / stage
        manifest = read_manifest(stage_dir)
        if manifest is not None and LEDGER in manifest.outputs:
            entries.extend(LedgerEntry.model_validate(e) for e in read_json(stage_dir / LEDGER))
    return entries


def composed_total(mechanisms: list[Mechanism], delta: float) -> Epsilons:
    """A client's total over heterogeneous releases: PLD composition (PRV and RDP beside it)."""
    if not mechanisms or all(m.kind == "post_processing" for m in mechanisms):
        return Epsilons(delta=delta, prv=0.0, rdp=0.0, pld=0.0, reported=0.0, reported_by="none")
    pld = epsilon_pld(mechanisms, delta)
    return Epsilons(delta=delta, prv=epsilon_prv_or_none(mechanisms, delta), rdp=epsilon_rdp(mechanisms, delta), pld=pld, reported=pld, reported_by="pld" if math.isfinite(pld) else "none")


def check_budget(spent: list[LedgerEntry], client_id: str, planned: list[Mechanism], delta: float, cap: float | None, stage: str) -> None:
    """Refuse a stage whose releases would push a client past its cap (nothing to check without one)."""
    if cap is None:
        return
    before = [e.mechanism for e in spent if e.client_id == client_id]
    spent_total = composed_total(before, delta).reported
    if spent_total >= cap:
        raise InputError(f"client '{client_id}': privacy budget cap already spent before stage '{stage}' (spent epsilon {spent_total:.3f}, cap {cap:g})")
    total = composed_total(before + planned, delta).reported
    if total > cap:
        requested = composed_total(planned, delta).reported
        raise InputError(
            f"client '{client_id}': stage '{stage}' would exceed the privacy budget cap "
            f"(spent epsilon {spent_total:.3f}, requested {requested:.3f}, composed total {total:.3f} > cap {cap:g})"
        )
