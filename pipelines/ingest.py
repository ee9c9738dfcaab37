"""Stage `ingest`: load each client's private data, validate it, and partition pooled data.

Outputs per client (client side: they never leave it): `clients/<id>/records.jsonl`,
`clients/<id>/stats.json`, and `clients/<id>/ledger_key.json`, the fingerprint of the client's
data that names its privacy ledger. Server side: `partition.json`, each client's size as the
stages plan with it, and `ledger.json`, the releases of those sizes.

A client's size is private too: against an adversary holding every other record, an exact N
says whether the last one is in. So each client releases its number of privacy units once per
data set as a noised count (`privacy.count`, sigma `privacy.count_noise`), entered in its ledger
before anything is written; `partition.json` holds that count, less the audit's holdout and plus
its canaries (public arithmetic), and the true sizes stay in the client-side `stats.json`. With
`privacy.count_noise: 0` the sizes are exact and every statement says N is treated as public.

Before anything is written (`preflight`), the data is loaded and partitioned, and what can only
be checked against it is checked: every client id is safe as a directory name and unique, the
canary client exists, the holdout fits, and a given `privacy.delta` is below 1/N for every client.

For the audits (spec `audit`): canaries are planted in one client's records (and listed, with
which were planted, in its `canaries.json`), and `holdout_per_client` records of each client are
set aside in `holdout.jsonl`, never trained on: the non-members of membership inference.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from rich.table import Table

from eval.canaries import canaries_json, canary_units, make_canaries, planted_records, unplanted_canary_units
from knowledgesg.console import console, track
from knowledgesg.errors import InputError, SpecError
from knowledgesg.fileio import files_under, unmakeable_directory
from knowledgesg.loaders import first_by_content, load_source, source_name_of, source_path
from knowledgesg.partition import partition
from knowledgesg.records import InstructionRecord, Record
from knowledgesg.spec import DataSource, PipelineSpec, repeated
from knowledgesg.stage import LEDGER_KEY, Stage, StageContext
from privacy.accounting import check_delta, default_delta, epsilons
from privacy.count import COUNT_RELEASE, count_mechanism, is_count_of, noised_count, partition_count, released_count
from privacy.ledger import LEDGER, LEDGER_ENV, ClientLedger, LedgerEntry, data_key, ledger_directory, new_release_id, now, trust_line
from privacy.units import UNIT_NAMES, Units, privacy_units

MAX_HISTOGRAM_CLASSES = 20  # responses with more distinct values than this are not labels


def _load_all(sources: list[DataSource], base_dir: Path, seed: int, key: str, own_data: bool) -> list[Record]:
    """The records of `sources`, the spec's `key` (its record ids name their source); `own_data`: one
    client member's files (not a pool the spec partitions among simulated clients)."""
    twice = repeated([source_name_of(s) for s in sources])
    if twice:
        raise SpecError(f"{key}: two data sources are named '{twice[0]}'; give each a distinct 'name'")
    records: list[Record] = []
    for i, source in enumerate(track(sources, "loading data", total=len(sources))):
        records.extend(load_source(source, base_dir, seed, own_data, key=f"{key}[{i}]"))
    return records


def client_stats(records: list[Record]) -> dict:
    kinds = Counter(r.kind for r in records)
    responses = Counter(r.response for r in records if r.kind == "instruction")
    stats = {"records": len(records), "kinds": dict(sorted(kinds.items())), "sources": dict(sorted(Counter(r.source for r in records).items()))}
    if 0 < len(responses) <= MAX_HISTOGRAM_CLASSES:
        stats["labels"] = dict(sorted(responses.items()))
    return stats


def hold_out(records: list[Record], count: int, seed: int, client_id: str) -> tuple[list[Record], list[Record]]:
    """`count` instruction records set aside, chosen by their content (`first_by_content`): one
    record added to the client's data changes what is trained on by one record, as DP's neighbours
    must (a seeded sample of positions changed dozens); the rest is trained on."""
    candidates = [i for i, r in enumerate(records) if r.kind == "instruction"]
    if count >= len(candidates) - 1:
        raise SpecError(f"audit.holdout_per_client: {count} is too many for client '{client_id}' (it would leave fewer than 2 instruction records to train on)")
    held = {candidates[i] for i in first_by_content([records[i] for i in candidates], count, seed, f"holdout:{client_id}")}
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def planning_records(records: list[Record]) -> list[InstructionRecord]:
    """The records dp_train will see, as far as units go: each text document stands for the pairs
    `structure` will make of it (one unit)."""
    out = []
    for record in records:
        if isinstance(record, InstructionRecord):
            out.append(record)
        else:
            out.append(InstructionRecord(id=record.id, source=record.source, instruction="(pairs structured from this document)", response="-",
                                         user_id=record.user_id, document_id=record.id))
    return out


def training_records(spec: PipelineSpec, client_id: str, records: list[Record]) -> list[Record]:
    """A client's records as ingest will leave them for training: holdout out, canaries in."""
    if spec.audit.holdout_per_client:
        records, _ = hold_out(records, spec.audit.holdout_per_client, spec.seed, client_id)
    if spec.audit.canaries is not None and spec.audit.canaries.client == client_id:
        records = records + planted_records(spec.audit.canaries, make_canaries(spec.audit.canaries, spec.seed), client_id)
    return records


def client_ids(spec: PipelineSpec, base_dir: Path) -> list[str]:
    """The clients' names: the members', read from the spec alone (a server of a split run holds
    no client data), or the partition's of pooled data (a simulation: the data is here)."""
    if spec.clients.members:
        return [member.id for member in spec.clients.members]
    return list(client_records(spec, base_dir))


def client_records(spec: PipelineSpec, base_dir: Path) -> dict[str, list[Record]]:
    """Each client's records, loaded and (for pooled data) partitioned: pure, nothing written."""
    clients_spec = spec.clients
    if clients_spec.members:
        return {member.id: _load_all(member.data, base_dir, spec.seed, f"clients.members (id {member.id}).data", own_data=True) for member in clients_spec.members}
    return partition(_load_all(clients_spec.data, base_dir, spec.seed, "clients.data", own_data=False), clients_spec.partition, spec.seed)


def data_units(records: list[Record], unit: str, documents: bool) -> Units:
    """The privacy units of a client's data as loaded (before the audit's holdout and canaries),
    each text document one unit: what its noised count counts. `documents`: the spec's
    `ClientsSpec.holds_documents` for the client."""
    return privacy_units(planning_records(records), unit, max_records=1, documents=documents)


def planned_units(spec: PipelineSpec, client_id: str, released: int) -> int:
    """The size the stages plan a client's releases with: its released count, less the audit's
    holdout and plus every canary the spec makes for it (about half are planted). Public arithmetic on a release, so free; at
    `unit: user` the holdout is not taken off (which users it empties is not public): q is a
    public number either way, and the accounting holds whatever its error."""
    planned = released
    if spec.audit.holdout_per_client and spec.privacy.unit == "record":
        planned -= spec.audit.holdout_per_client
    return max(1, planned + canary_units(spec, client_id, every=True))


def public_size(spec: PipelineSpec, client_id: str, trained: list[Record]) -> int:
    """The size the stages plan a client's releases with where N is public (`count_noise: 0`):
    the privacy units of the records it trains on (the planted canaries among them), as dp_train
    counts them, and the canaries not planted, as `planned_units` plans a noised count with every
    canary. Units, not records: at `unit: user` the public N is the number of users, and how many
    records they hold is not public (it had been written to the server's `partition.json`)."""
    return data_units(trained, spec.privacy.unit, spec.clients.holds_documents(client_id)).count + unplanted_canary_units(spec, client_id)


def training_units(records: list[Record], unit: str, documents: bool) -> int:
    """N for DP training: units of the instruction records, each text document one unit (what
    `structure` makes of it stays one unit)."""
    instructions = [r for r in records if isinstance(r, InstructionRecord)]
    texts = {r.id for r in records if r.kind == "text"}
    return privacy_units(instructions, unit, max_records=1, documents=documents).count + len(texts) if instructions or texts else 0


def refuse_unmakeable_ledger_directory(spec: PipelineSpec, base_dir: Path) -> None:
    """A ledger directory set by the spec or $KSG_LEDGER_DIR that cannot be one (a file, under a
    file, not writable), refused before the run writes anything (the default, RUN/ledger, is
    checked with the run directory)."""
    from_env = bool(os.environ.get(LEDGER_ENV))
    if spec.privacy.ledger_dir is None and not from_env:
        return
    directory = ledger_directory(spec.privacy.ledger_dir, base_dir, base_dir)  # the run directory is not used: set explicitly
    problem = unmakeable_directory(directory)
    if problem:
        raise InputError(f"{f'${LEDGER_ENV}' if from_env else 'privacy.ledger_dir'} {directory}: {problem}")


def file_states(paths: list[Path]) -> dict[Path, tuple[int, int]]:
    """Size and modification time of every file under `paths`: whether a file changed since."""
    return {f: (stat.st_size, stat.st_mtime_ns) for path in paths for f in files_under(path) if f.is_file() for stat in [f.stat()]}


class Ingest(Stage):
    name = "ingest"
    uses = ("clients", "audit")
    private_inputs = True

    def __init__(self, params) -> None:
        super().__init__(params)
        self._loaded: dict[str, list[Record]] | None = None  # from preflight, for run
        self._loaded_from: dict[Path, tuple[int, int]] = {}  # each data file's size and mtime when preflight read it

    def external_inputs(self, spec: PipelineSpec, base_dir: Path) -> list[Path]:
        return sorted({source_path(source, base_dir, key) for key, source in spec.clients.keyed_sources()})

    def fingerprint_settings(self, spec: PipelineSpec) -> dict:
        """The count's settings, where a count is released (a run from before counts were noised resumes
        unchanged at `count_noise: 0`)."""
        privacy = spec.privacy
        return {"count": {"unit": privacy.unit, "noise": privacy.count_noise, "reproducible": privacy.reproducible_noise}} if privacy.count_noise else {}

    def preflight(self, spec: PipelineSpec, base_dir: Path) -> None:
        refuse_unmakeable_ledger_directory(spec, base_dir)
        self._loaded_from = file_states(self.external_inputs(spec, base_dir))  # before reading: an edit while it reads shows as a change
        clients = client_records(spec, base_dir)
        audit = spec.audit
        if audit.canaries is not None and audit.canaries.client not in clients:
            raise SpecError(f"audit.canaries.client: no client '{audit.canaries.client}' (clients: {', '.join(clients)})")
        for client_id, records in clients.items():
            trained = training_records(spec, client_id, records)  # the holdout checked here too
            documents = spec.clients.holds_documents(client_id)
            if spec.privacy.count_noise:
                data_units(records, spec.privacy.unit, documents)  # a user-level unit without user ids refused before any count is released
            if spec.privacy.delta is not None and not spec.privacy.count_noise:  # with a noised count, dp_train checks delta against it
                check_delta(spec.privacy.delta, training_units(trained, spec.privacy.unit, documents), spec.privacy.unit, client_id)
        self._loaded = clients

    def run(self, ctx: StageContext) -> None:
        # the fingerprint hashed the files after preflight read them (prepare_models may take
        # minutes between): records from files edited since would not be the ones it names
        unchanged = self._loaded is not None and file_states(self.external_inputs(ctx.spec, ctx.base_dir)) == self._loaded_from
        clients = self._loaded if unchanged else client_records(ctx.spec, ctx.base_dir)
        audit, privacy = ctx.spec.audit, ctx.spec.privacy
        sizes, counts = {}, {}
        for client_id, records in clients.items():
            side = f"client:{client_id}"
            # the fingerprint of the client's own data, before the audit's holdout and canaries:
            # changing the audit settings must not start a fresh ledger
            rows = [r.model_dump() for r in records]
            key = data_key(rows)
            ctx.write_json(f"clients/{client_id}/{LEDGER_KEY}", {"data_key": key}, side=side)
            ledger = ClientLedger.of_data(ctx.ledger_dir, key, client_id)
            units = data_units(records, privacy.unit, ctx.spec.clients.holds_documents(client_id)) if privacy.count_noise else None
            count = self.release_count(ctx, client_id, units, ledger) if units else None
            if audit.holdout_per_client:
                records, held = hold_out(records, audit.holdout_per_client, ctx.seed, client_id)
                ctx.write_jsonl(f"clients/{client_id}/holdout.jsonl", [r.model_copy(update={"client_id": client_id}).model_dump() for r in held], side=side)
            if audit.canaries is not None and audit.canaries.client == client_id:
                canaries = make_canaries(audit.canaries, ctx.seed)
                records = records + planted_records(audit.canaries, canaries, client_id)
                ctx.write_json(f"clients/{client_id}/canaries.json", canaries_json(audit.canaries, canaries), side=side)
            rows = [r.model_copy(update={"client_id": client_id}).model_dump() for r in records]
            ctx.write_jsonl(f"clients/{client_id}/records.jsonl", rows, side=side)
            stats = client_stats(records)
            if count is not None:
                sizes[client_id] = planned_units(ctx.spec, client_id, count.num_units)
                stats["units"] = {"unit": units.kind, "count": units.count, "released": count.num_units, "planned": sizes[client_id],
                                  "count_release_id": count.release_id, "noise_multiplier": count.mechanism.noise_multiplier}
                counts[client_id] = count
            else:
                sizes[client_id] = public_size(ctx.spec, client_id, records)
            ctx.write_json(f"clients/{client_id}/stats.json", stats, side=side)
        method = ctx.spec.clients.partition.method if ctx.spec.clients.partition else "members"
        partition = {"method": method, "seed": ctx.seed, "clients": sizes}
        if counts:
            partition["count"] = partition_count({client_id: entry.mechanism.noise_multiplier for client_id, entry in counts.items()})
            ctx.write_json(LEDGER, [entry.model_dump(mode="json") for entry in counts.values()])
        ctx.write_json("partition.json", partition)
        # a console may be a log the server holds: with a noised count it shows the count, not N
        table = Table(title=f"clients ({method})")
        table.add_column("client")
        table.add_column("N̂ planned (noised count)" if counts else f"N ({UNIT_NAMES[privacy.unit]}s, public)", justify="right")
        for client_id, size in sizes.items():
            table.add_row(client_id, str(size))
        console.print(table)

    def release_count(self, ctx: StageContext, client_id: str, units: Units, ledger: ClientLedger) -> LedgerEntry:
        """The client's noised count of its units: drawn on the client and entered in its ledger
        once per data set and unit kind, before anything is written; a rerun, or another run on the
        same data, finds that entry and reuses it (a second draw would be a second release)."""
        earlier = released_count(ledger, client_id, units.kind)
        if earlier is not None:
            return earlier
        other = next((e for e in ledger.own_entries() if e.client_id == client_id and e.release == COUNT_RELEASE), None)
        if other is not None:  # releases at another unit are never composed: a second count would be refused downstream, after it was drawn
            raise InputError(f"client '{client_id}': its ledger holds this data's count per {UNIT_NAMES.get(other.unit, other.unit)}, the spec now counts per "
                             f"{UNIT_NAMES[units.kind]} (whether records form source documents is the spec's: a document_id it maps); keep the unit, or use "
                             "another ledger directory")
        privacy = ctx.spec.privacy
        random = ctx.release_random(client_id, f"count:{units.kind}")
        released = noised_count(units.count, privacy.count_noise, random)
        mechanism = count_mechanism(privacy.count_noise)
        # the delta the stages will plan with (from the planned size), so the client's ledger is kept at one delta
        delta = privacy.delta if privacy.delta is not None else default_delta(planned_units(ctx.spec, client_id, released))
        origin = ctx.noise_origin
        entry = LedgerEntry(release_id=new_release_id(), client_id=client_id, stage=self.name, release=COUNT_RELEASE,
                            artifact=f"stages/{self.name}/partition.json#client={client_id}", run_dir=str(ctx.run_dir.resolve()), released_at=now(),
                            unit=units.kind, num_units=released, delta=delta, mechanism=mechanism, epsilon=epsilons([mechanism], delta),
                            private=random.private, noise=origin, trust=trust_line(origin, mechanism))
        return ctx.record_release(entry, ledger=ledger, same=lambda e: is_count_of(e, client_id, units.kind))
