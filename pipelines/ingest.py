"""Stage `ingest`: load each client's private data, validate it, and partition pooled data.

Outputs per client (client side: they never leave it): `clients/<id>/records.jsonl` and
`clients/<id>/stats.json`. Server side: `partition.json`, the client sizes only.

For the audits (spec `audit`): canaries are planted in one client's records (and listed, with
which were planted, in its `canaries.json`), and `holdout_per_client` records of each client are
set aside in `holdout.jsonl`, never trained on: the non-members of membership inference.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from rich.table import Table

from knowledgesg.console import console, track
from knowledgesg.errors import InputError
from knowledgesg.loaders import load_source, source_name_of, source_path
from knowledgesg.partition import partition
from knowledgesg.records import Record
from knowledgesg.spec import DataSource, PipelineSpec, repeated
from knowledgesg.stage import Stage, StageContext

MAX_HISTOGRAM_CLASSES = 20  # responses with more distinct values than this are not labels


def _sources(spec: PipelineSpec) -> list[DataSource]:
    return spec.clients.data or [source for member in spec.clients.members for source in member.data]


def _load_all(sources: list[DataSource], base_dir: Path, seed: int) -> list[Record]:
    twice = repeated([source_name_of(s) for s in sources])
    if twice:
        raise InputError(f"clients: two data sources are named '{twice[0]}'; give each a distinct 'name'")
    records: list[Record] = []
    for source in track(sources, "loading data", total=len(sources)):
        records.extend(load_source(source, base_dir, seed))
    return records


def client_stats(records: list[Record]) -> dict:
    kinds = Counter(r.kind for r in records)
    responses = Counter(r.response for r in records if r.kind == "instruction")
    stats = {"records": len(records), "kinds": dict(sorted(kinds.items())), "sources": dict(sorted(Counter(r.source for r in records).items()))}
    if 0 < len(responses) <= MAX_HISTOGRAM_CLASSES:
        stats["labels"] = dict(sorted(responses.items()))
    return stats


def hold_out(records: list[Record], count: int, seed: int, client_id: str) -> tuple[list[Record], list[Record]]:
    """A seeded sample of instruction records set aside; the rest is trained on."""
    candidates = [i for i, r in enumerate(records) if r.kind == "instruction"]
    if count >= len(candidates) - 1:
        raise InputError(f"audit.holdout_per_client: {count} is too many for client '{client_id}' ({len(candidates)} instruction records)")
    held = set(random.Random(f"{seed}:holdout:{client_id}").sample(candidates, count))
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


class Ingest(Stage):
    name = "ingest"
    uses = ("clients", "audit")

    def external_inputs(self, spec: PipelineSpec, base_dir: Path) -> list[Path]:
        return sorted({source_path(source, base_dir) for source in _sources(spec)})

    def run(self, ctx: StageContext) -> None:
        clients_spec = ctx.spec.clients
        if clients_spec.members:
            clients = {member.id: _load_all(member.data, ctx.base_dir, ctx.seed) for member in clients_spec.members}
        else:
            clients = partition(_load_all(clients_spec.data, ctx.base_dir, ctx.seed), clients_spec.partition, ctx.seed)
        audit = ctx.spec.audit
        if audit.canaries is not None and audit.canaries.client not in clients:
            raise InputError(f"audit.canaries.client: no client '{audit.canaries.client}' (clients: {', '.join(clients)})")
        sizes = {}
        for client_id, records in clients.items():
            side = f"client:{client_id}"
            if audit.holdout_per_client:
                records, held = hold_out(records, audit.holdout_per_client, ctx.seed, client_id)
                ctx.write_jsonl(f"clients/{client_id}/holdout.jsonl", [r.model_copy(update={"client_id": client_id}).model_dump() for r in held], side=side)
            if audit.canaries is not None and audit.canaries.client == client_id:
                from eval.canaries import canaries_json, make_canaries, planted_records

                canaries = make_canaries(audit.canaries, ctx.seed)
                records = records + planted_records(audit.canaries, canaries, client_id)
                ctx.write_json(f"clients/{client_id}/canaries.json", canaries_json(audit.canaries, canaries), side=side)
            rows = [r.model_copy(update={"client_id": client_id}).model_dump() for r in records]
            ctx.write_jsonl(f"clients/{client_id}/records.jsonl", rows, side=side)
            ctx.write_json(f"clients/{client_id}/stats.json", client_stats(records), side=side)
            sizes[client_id] = len(records)
        method = clients_spec.partition.method if clients_spec.partition else "members"
        ctx.write_json("partition.json", {"method": method, "seed": ctx.seed, "clients": sizes})
        table = Table(title=f"clients ({method})")
        table.add_column("client")
        table.add_column("records", justify="right")
        for client_id, size in sizes.items():
            table.add_row(client_id, str(size))
        console.print(table)
