"""`ksg check SPEC`: everything that can be known before a run, without writing anything.

The spec (schema, stage parameters and order, budgets), every data file (ingest's own loading,
partitioning and checks, with the same one-line errors), the models (resolvable offline, without
converting anything), and the privacy each client will spend: dp_train's plan from the
calibration (its units, delta, sampling rate, steps, noise), a DP histogram if synthesize makes
one, fedtune's DP-SGD local steps on private data (as if asked in every round), composed with
everything its ledger already holds, against the cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from knowledgesg.errors import InputError
from knowledgesg.federated.engines import CHECKPOINT
from knowledgesg.federated.server import resumed_history
from knowledgesg.models import source_files
from knowledgesg.records import InstructionRecord
from knowledgesg.spec import PipelineSpec
from knowledgesg.stage import Stage, releases_to_come, unit_done
from pipelines.dp_train import DPTrain, published_adapter
from pipelines.fedtune import Fedtune
from pipelines.ingest import Ingest, client_records, data_units, planned_units, planning_records, public_size, training_records
from pipelines.prepare_models import model_kinds
from pipelines.synthesize import Synthesize, histogram_path, histogram_unit
from privacy.accounting import default_delta
from privacy.count import ReleasedCount, count_mechanism, released_count
from privacy.ledger import ClientLedger, LedgerEntry, check_budget, client_delta, compose, data_key, ledger_directory, published_release
from privacy.units import UNIT_NAMES


@dataclass
class ClientCheck:
    client_id: str
    records: int
    units: int | None
    unit: str | None
    sample_rate: float | None
    steps: int | None
    noise_multiplier: float | None
    delta: float | None
    planned_epsilon: float
    spent_epsilon: float
    total_epsilon: float
    cap: float | None
    releases_before: int
    count: str  # how N is planned: "public", "released" (the noised count in the ledger) or "to be released (sigma s)"

    @property
    def within_cap(self) -> bool:
        return self.cap is None or self.total_epsilon <= self.cap


MODEL_NOTES = {"packaged": "packaged: installed", "tiny": "built from a config", "local": "local directory: found",
               "hub": "a Hugging Face id: not checked offline (loaded at run time)"}


def model_notes(spec: PipelineSpec, base_dir: Path) -> list[tuple[str, str, str]]:
    """(role, name, what was checked) for each model of the spec (a local directory taken from
    `base_dir`, the spec's directory); a missing package is an error."""
    notes = []
    for role, kind in model_kinds(spec, base_dir).items():
        name = getattr(spec.models, role)
        if kind == "packaged":
            source_files(name)  # raises, naming the pip line, when a package is missing
        notes.append((role, name, MODEL_NOTES[kind]))
    return notes


def check_pipeline(spec: PipelineSpec, base_dir: Path, stages: list[Stage], run_dir: Path) -> tuple[list[tuple[str, str, str]], list[ClientCheck]]:
    for stage in stages:
        stage.preflight(spec, base_dir)
        stage.preflight_private(spec, base_dir)
    notes = model_notes(spec, base_dir)
    if not any(isinstance(s, Ingest) for s in stages):
        return notes, []
    return notes, plan_privacy(spec, base_dir, releases_to_come(stages, run_dir), run_dir)


def plan_privacy(spec: PipelineSpec, base_dir: Path, stages: list[Stage], run_dir: Path, sure_only: bool = False) -> list[ClientCheck]:
    """Each client's planned releases in `stages` (dp_train's calibrated plan, a DP histogram,
    fedtune's local DP-SGD), composed with everything its ledger already holds. Where the server's
    seed samples the clients of each round, fedtune is planned in every round (what `ksg check`
    shows: the most it may cost), or with `sure_only` in none (what the run will surely spend, for
    refusing a run before it starts; fedtune checks the rounds the seed gives when it runs).
    Nothing is read when none of `stages` releases anything."""
    train = next((s for s in stages if isinstance(s, DPTrain)), None)
    synthesize = next((s for s in stages if isinstance(s, Synthesize) and s.releases()), None)
    private_fedtune = next((s for s in stages if isinstance(s, Fedtune) and s.releases()), None)  # DP-SGD local steps on private data
    if train is None and synthesize is None and private_fedtune is None:
        return []
    ledger_dir = ledger_directory(spec.privacy.ledger_dir, base_dir, run_dir)
    checks = []
    loaded = client_records(spec, base_dir)
    for client_id, records in loaded.items():
        rows = [r.model_dump() for r in records]
        ledger = ClientLedger.of_data(ledger_dir, data_key(rows), client_id)
        before: list[LedgerEntry] = ledger.entries()
        trained = training_records(spec, client_id, records)
        planned, plan, count, how, count_to_come = [], None, None, "public", False
        if spec.privacy.count_noise:
            released = released_count(ledger, client_id, data_units(records, spec.privacy.unit, spec.clients.holds_documents(client_id)).kind)
            if released is not None:  # the stages plan with it, as the run will
                count, how = ReleasedCount(planned_units(spec, client_id, released.num_units), released.mechanism.noise_multiplier), "released"
            else:  # ingest will release it: planned with the exact N on the owner's own console, its cost added
                planned.append(count_mechanism(spec.privacy.count_noise))
                how, count_to_come = f"to be released (sigma {spec.privacy.count_noise:g})", True
        # Refusing a run on the exact N would publish a function of it (whether the run went on): until
        # the count exists, the run's own check counts only what needs no N; each stage checks the
        # rest, with the count, when it runs. `ksg check` shows the owner the plan at its exact N.
        sized_later = sure_only and count_to_come
        size = count.planned if count else public_size(spec, client_id, trained)
        if train is not None and not sized_later:
            trained_records = planning_records(trained) if train.params.source_stage == "structure" else [r for r in trained if isinstance(r, InstructionRecord)]
            plan = train.plan(spec, client_id, trained_records, count)
            # one released before a crash is in its ledger, reused (marked done, or published and adopted)
            if not unit_done(run_dir, train.name, client_id) and not adoptable(run_dir / "stages" / train.name / published_adapter(client_id), ledger, client_id, train.name, "dp_adapter"):
                planned.append(plan.mechanism())
            check_budget(before, client_id, [], plan.delta, None, train.name, plan.units.kind)  # releases at another privacy unit: refused, as the run would
        if synthesize is not None and not unit_done(run_dir, synthesize.name, histogram_unit(client_id)) and not adoptable(
                run_dir / "stages" / synthesize.name / histogram_path(client_id), ledger, client_id, synthesize.name, "dp_label_histogram"):  # as dp_train's above
            planned.append(synthesize.histogram_mechanism())
        # the delta the stages compose at: dp_train's, else the latest release's (the DP adapter's), else the spec's
        delta = plan.delta if plan else client_delta(before) if before else (spec.privacy.delta or (None if sized_later else default_delta(size)))
        if delta is None:  # the default delta is the count's to set (a step in N): nothing to refuse before it exists
            continue
        if private_fedtune is not None and not sized_later and (private_fedtune.asks_every_round(len(loaded)) or not sure_only):
            # rounds a stopped attempt released are in the ledger (spent): the rest are to come; the
            # noise is calibrated to every round, the budget counts those to come (the stage checks
            # again with its job, whose checkpoint it resumes only if it is this job's)
            rounds = private_fedtune.params.rounds
            left = rounds - len(resumed_history(run_dir / "stages" / private_fedtune.name / "work" / CHECKPOINT))
            if left > 0:
                mechanisms = private_fedtune.plan_mechanisms([client_id], {client_id: rounds}, {client_id: size}, {client_id: delta})[client_id]
                planned += [m.model_copy(update={"steps": m.steps * left // rounds}) for m in mechanisms]
        counted = [e.effective_mechanism() for e in before if e.counts_against_budget]
        checks.append(ClientCheck(
            client_id=client_id, records=len(trained), units=plan.num_units if plan else None, unit=UNIT_NAMES[plan.units.kind] if plan else None,
            sample_rate=plan.sample_rate if plan else None, steps=plan.steps if plan else None, noise_multiplier=plan.noise_multiplier if plan else None,
            delta=plan.delta if plan else None, planned_epsilon=compose(planned, delta).reported, spent_epsilon=compose(counted, delta).reported,
            total_epsilon=compose(counted + planned, delta).reported, cap=spec.privacy.cap_epsilon, releases_before=sum(e.costs_privacy for e in before),
            count=how,
        ))
    return checks


def adoptable(path: Path, ledger: ClientLedger, client_id: str, stage: str, release: str) -> bool:
    """Whether the stage will adopt a release it published before a crash (so plans none): where it
    will refuse instead (the data changed since, so this data set's ledger does not name it), the
    plan counts a new one, on the safe side, and the stage's own refusal says why."""
    try:
        return published_release(path, ledger, client_id, stage, release) is not None
    except InputError:
        return False


def refuse_over_cap(checks: list[ClientCheck]) -> None:
    """The first client whose planned releases would take it past the cap, as one line."""
    over = [c for c in checks if not c.within_cap]
    if over:
        c = over[0]
        raise InputError(f"client '{c.client_id}': the planned releases would exceed the privacy budget cap (spent epsilon {c.spent_epsilon:.3f}, "
                         f"planned {c.planned_epsilon:.3f}, composed total {c.total_epsilon:.3f} > cap {c.cap:g})")


def refuse_planned_over_cap(spec: PipelineSpec, stages: list[Stage], base_dir: Path, run_dir: Path) -> None:
    """`ksg run`'s check before anything is written: the releases `stages` will surely make, with
    the ledgers, within the cap (each stage checks again when it runs, with what it then knows)."""
    if spec.privacy.cap_epsilon is not None:  # without a cap, each stage checks its unit as it runs
        refuse_over_cap(plan_privacy(spec, base_dir, stages, run_dir, sure_only=True))
