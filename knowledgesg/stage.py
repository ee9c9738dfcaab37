"""The contract between the runner and a stage.

A stage is a small recipe: it declares its parameters (a pydantic model), the spec sections and
external files its result depends on, and a `run` that writes its outputs through the context.
It reads other stages only through their artifacts (`ctx.artifact`), never their internals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from rich.markup import escape

from knowledgesg.console import console
from knowledgesg.errors import KsgError
from knowledgesg.fileio import read_json, sha256_text, write_json, write_jsonl
from knowledgesg.manifest import read_manifest
from knowledgesg.models import read_models
from knowledgesg.spec import PipelineSpec
from privacy.ledger import ClientLedger, LedgerEntry, check_budget, client_entries, ledger_directory, merge_releases, read_received_ledger, read_stage_ledgers
from privacy.noise import SecureRandom

LEDGER_KEY = "ledger_key.json"  # ingest writes one per client (client side): its data's fingerprint


def releases_to_come(stages: list[Stage], run_dir: Path) -> list[Stage]:
    """The release stages of `stages` without a finished manifest in the run: one with a manifest
    is in the ledger already, and a resume keeps it (or refuses before a new release)."""
    return [s for s in stages if s.releases() and read_manifest(run_dir / "stages" / s.name) is None]


def unit_done(run_dir: Path, stage: str, unit: str) -> bool:
    """Whether `stage` finished `unit` (e.g. one client's DP release) in this run before a crash."""
    return (run_dir / "stages" / stage / "units" / f"{unit}.json").is_file()


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Stage:
    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams
    # Top-level spec sections whose values shape this stage's outputs (part of its fingerprint).
    uses: ClassVar[tuple[str, ...]] = ()
    # "server": the stage may read only server-side artifacts (the context refuses the rest).
    # "any": it runs where the data is (on each client, or a part of it on the server).
    runs_on: ClassVar[str] = "any"
    # True when the external inputs are private data: their digests are then keyed (HMAC), so a
    # manifest cannot be used to confirm a guess of the data.
    private_inputs: ClassVar[bool] = False
    # The earlier stages whose artifacts the stage reads, where that is fewer than all before it
    # (None: any). Its fingerprint then follows those only, so a change to another earlier stage
    # does not rerun it (tune_professional: public data only, not synthesize's output). The
    # context refuses it any other stage's artifact or ledger (`artifact`, `completed_stages_before`);
    # a stage that declares `reads` must read earlier outputs through those only.
    reads: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, params: BaseModel) -> None:
        self.params = params

    def requires(self) -> tuple[str, ...]:
        """Stages that must come before this one in a spec (checked before anything runs)."""
        return ()

    def fingerprint_settings(self, spec: PipelineSpec) -> dict[str, Any]:
        """Spec settings outside the `uses` sections that shape the outputs (part of the
        fingerprint where there are any)."""
        return {}

    def side(self) -> str:
        """Where the stage runs when each party runs its own part (`knowledgesg.roles`): "client"
        (on each client, with its own data only), "server", or "both" (on every party)."""
        return "server" if self.runs_on == "server" else "client"

    def releases(self) -> bool:
        """Whether running this stage releases something computed from private data (and so
        spends privacy budget): such a stage is not rerun for a code upgrade alone."""
        return False

    def released_part(self, stage_dir: Path) -> list[str]:
        """What this stage, stopped without a manifest, had released already (each in the clients'
        ledgers): kept for the resume, never wiped by a refusal. Its finished units by default."""
        return finished_units(stage_dir)

    def unfinished_releases(self, stage_dir: Path) -> list[LedgerEntry]:
        """The ledger entries of what this stage, stopped without a manifest, had released: those
        its unit markers hold by default (one client's DP adapter, its label histogram)."""
        entries = []
        for marker in sorted((stage_dir / "units").glob("**/*.json")):  # synthesize's under units/label_histogram/
            saved = read_json(marker)
            payload = saved.get("payload") if isinstance(saved, dict) else None
            entry = payload.get("entry", payload) if isinstance(payload, dict) else None
            if isinstance(entry, dict) and "release_id" in entry:
                entries.append(LedgerEntry.model_validate(entry))
        return entries

    def external_inputs(self, spec: PipelineSpec, base_dir: Path) -> list[Path]:
        """Files outside the run directory that this stage reads; their hashes join the fingerprint."""
        return []

    def client_side_inputs(self, spec: PipelineSpec, base_dir: Path) -> list[Path]:
        """External inputs only the clients hold (a client's private test set): in the
        fingerprint wherever the clients' data is, never on the server of a split run, which
        neither holds nor may read them."""
        return []

    def preflight(self, spec: PipelineSpec, base_dir: Path) -> None:
        """Checks that need the data, run before the run directory is touched (raise InputError)."""

    def preflight_private(self, spec: PipelineSpec, base_dir: Path) -> None:
        """Checks that need the clients' private data, run before the run directory is touched
        where that data is: not by the server of a run split over the parties."""

    def run(self, ctx: StageContext) -> None:
        raise NotImplementedError


def finished_units(stage_dir: Path) -> list[str]:
    """The clients a stage without a manifest released for before it stopped (its units: one
    client's DP adapter, one client's label histogram): each release is in the client's ledger."""
    return sorted({p.stem for p in (stage_dir / "units").rglob("*.json")})


@dataclass
class StageContext:
    spec: PipelineSpec
    base_dir: Path  # relative paths in the spec are resolved from here
    run_dir: Path
    stage_dir: Path
    stage_name: str = ""
    runs_on: str = "any"
    role: str = "all"  # "all" (the simulation), "client" or "server": see knowledgesg.roles
    reads: tuple[str, ...] | None = None  # the stage's `reads`: the only earlier stages it may read
    declared: dict[str, tuple[int | None, str]] = field(default_factory=dict)  # path -> (records, side)
    warnings: list[str] = field(default_factory=list)  # the manifest keeps them
    # working files a resume needs until the stage is complete: removed once its manifest is written
    scratch: list[Path] = field(default_factory=list)

    @property
    def seed(self) -> int:
        return self.spec.seed

    def derive_seed(self, *parts: str) -> int:
        """A seed for one public purpose (e.g. generation from a DP model, a LoRA initialisation)
        from the spec seed: anyone with the spec can reproduce it, so it never drives DP noise or
        sampling (see `release_random`)."""
        digest = sha256_text(":".join([str(self.spec.seed), self.stage_name, *parts]))
        return int(digest[:15], 16)

    def release_random(self, client_id: str, purpose: str) -> SecureRandom:
        """The randomness of one DP release on a client: fresh OS entropy every time, unless the
        spec asks for reproducible (NOT PRIVATE) noise."""
        return SecureRandom.for_release(self.spec.privacy.reproducible_noise, self.spec.seed, self.stage_name, client_id, purpose)

    @property
    def noise_origin(self) -> str:
        return "reproducible" if self.spec.privacy.reproducible_noise else "os_entropy"

    @property
    def ledger_dir(self) -> Path:
        return ledger_directory(self.spec.privacy.ledger_dir, self.base_dir, self.run_dir)

    def client_ledger(self, client_id: str) -> ClientLedger:
        """The client's own append-only ledger, found by the fingerprint of its data (with the
        client's ledgers of other versions of that data)."""
        key = read_json(self.artifact("ingest", f"clients/{client_id}/{LEDGER_KEY}"))["data_key"]
        return ClientLedger.of_data(self.ledger_dir, key, client_id)

    def spent(self, client_id: str) -> list[LedgerEntry]:
        """Every release ever made from this client's data: its own ledger (on the server: the
        copy the client sent with its releases) and this run's stage copies."""
        own = read_received_ledger(self.run_dir, client_id) if self.role == "server" else self.client_ledger(client_id).entries()
        return merge_releases(own, self.stage_copies(client_id))

    def sent_ledger(self, client_id: str) -> list[LedgerEntry]:
        """Every release of this client's data as the server knows them, for a server stage: the
        ledger the client sends with its releases (on the server the received copy; in a
        simulation its entries in the ledger directory, the same ones) and this run's stage copies."""
        own = read_received_ledger(self.run_dir, client_id) if self.role == "server" else client_entries(self.ledger_dir, client_id)
        return merge_releases(own, self.stage_copies(client_id))

    def stage_copies(self, client_id: str) -> list[LedgerEntry]:
        """The client's releases in the `ledger.json` of this run's stages completed before this one."""
        return [e for e in read_stage_ledgers(self.run_dir, self.completed_stages_before()) if e.client_id == client_id]

    def record_release(self, entry: LedgerEntry, ledger: ClientLedger | None = None, same: Callable[[LedgerEntry], bool] | None = None) -> LedgerEntry:
        """Enter a release in its client's ledger (fsynced) before it is written where anyone
        reads it, the cap checked again under the ledger's lock: the stage checked it when it
        began, but another run may have released from the same data since. `ledger`: the one to
        enter it in (ingest's own, before its manifest names it); `same`: a release made once per
        data set, whose earlier entry, where there is one, is returned instead (nothing new drawn)."""
        copies = self.stage_copies(entry.client_id)
        planned = [entry.effective_mechanism()] if entry.counts_against_budget else []

        def within_cap(own: list[LedgerEntry]) -> None:
            check_budget(merge_releases(own, copies), entry.client_id, planned, entry.delta, self.spec.privacy.cap_epsilon, self.stage_name, entry.unit)

        ledger = ledger or self.client_ledger(entry.client_id)
        if same is not None:
            return ledger.append_once(entry, same, within_cap)
        ledger.append(entry, within_cap)
        return entry

    def warn(self, message: str) -> None:
        """A finding the user should act on: printed now, kept in the manifest, shown by `ksg
        status` and the run report. Server-side stages only: a warning is free text in a
        server-side file, and one from a client's stage could describe its private data."""
        if self.runs_on != "server" or self.role == "client":
            raise RuntimeError(f"{self.stage_name}: only a server-side stage may warn (its manifest is read on the server)")
        console.print(f"[yellow]warning[/] {self.stage_name}: {escape(message)}")
        self.warnings.append(message)

    def path(self, relative: str) -> Path:
        return self.stage_dir / relative

    def declare_output(self, relative: str, records: int | None = None, side: str = "server") -> Path:
        """Register a file the stage wrote itself (atomically!); hashed when the stage finishes."""
        self.declared[relative] = (records, side)
        return self.path(relative)

    def write_jsonl(self, relative: str, rows: list[dict[str, Any]], side: str = "server", records: bool = True) -> Path:
        """`records=False` where the manifest is not to count the rows: a log (e.g. prompts sent),
        whose rows are not data records, or a client's file whose size is a function of its
        records' content rather than of their number N (which the runner counts only where N is public)."""
        count = write_jsonl(self.path(relative), rows)
        return self.declare_output(relative, records=count if records else None, side=side)

    def write_json(self, relative: str, obj: Any, side: str = "server") -> Path:
        write_json(self.path(relative), obj)
        return self.declare_output(relative, side=side)

    def unit_done(self, unit: str) -> bool:
        """Whether this stage finished `unit` before a crash (nothing declared, unlike completed_unit)."""
        return unit_done(self.run_dir, self.stage_name, unit)

    def completed_unit(self, unit: str) -> dict | None:
        """A unit (e.g. one client) this stage finished before a crash: its outputs are re-declared.

        Returns the payload given to `mark_unit_done`, or None if the unit must be (re)done.
        """
        if not self.unit_done(unit):
            return None
        saved = read_json(self.path(f"units/{unit}.json"))
        for relative, (records, side) in saved["outputs"].items():
            self.declare_output(relative, records=records, side=side)
        return saved["payload"]

    def mark_unit_done(self, unit: str, outputs: list[str], payload: Any) -> None:
        """Written after the unit's outputs (atomically, last): the unit survives a crash."""
        write_json(self.path(f"units/{unit}.json"), {"outputs": {r: list(self.declared[r]) for r in outputs}, "payload": payload})

    def artifact(self, stage: str, relative: str) -> Path:
        """A completed earlier stage's output; refuses what its manifest does not list."""
        if self.reads is not None and stage not in self.reads:
            raise KsgError(f"stage '{self.stage_name}' reads only {', '.join(self.reads)} (its fingerprint covers no other stage), not '{stage}'")
        stage_dir = self.run_dir / "stages" / stage
        manifest = read_manifest(stage_dir)
        if manifest is None:
            raise KsgError(f"stage '{stage}' has not completed in {self.run_dir}; it must run before this one")
        if relative not in manifest.outputs:
            raise KsgError(f"stage '{stage}' has no output '{relative}'")
        side = manifest.outputs[relative].side
        if (self.runs_on == "server" or self.role == "server") and side != "server":
            raise KsgError(f"stage '{self.stage_name}' runs on the server and may not read '{stage}/{relative}' ({side} side: it never leaves that client)")
        return stage_dir / relative

    def completed_stages_before(self) -> list[str]:
        """Names of the stages before this one in the spec that have completed."""
        names = [s.name for s in self.spec.stages]
        earlier = names[: names.index(self.stage_name)] if self.stage_name in names else []
        if self.reads is not None:  # the stages its fingerprint follows, no others
            earlier = [n for n in earlier if n in self.reads]
        return [n for n in earlier if read_manifest(self.run_dir / "stages" / n) is not None]

    def read_artifact_json(self, stage: str, relative: str) -> Any:
        return read_json(self.artifact(stage, relative))

    def models(self) -> dict[str, dict]:
        """prepare_models' models.json, each model's path where this machine's cache holds it."""
        return read_models(self.artifact("prepare_models", "models.json"), self.spec.models.cache_dir)
