"""Who runs which stages: the whole pipeline in one process (the simulation), or one party's part.

A federation is one spec whose clients are `members`, each bringing its own data. Each party runs
`ksg run SPEC --role client --client ID --exchange DIR` on its own machine (its data, its run
directory, its ledger) or `ksg run SPEC --role server --exchange DIR`:

- a stage's side says where it runs: `client` stages (ingest, structure, dp_train, a synthesize
  that needs the client's labels) on each client, `server` stages (refine, fedtune, evaluate,
  publish, a synthesize from the released adapters alone) on the server, `both` (prepare_models)
  on every party;
- the client stages come first; a client runs them for its own data only (`narrow_to_client`)
  and then sends their releases (`knowledgesg.exchange`);
- the server receives the client stages' releases in their place and runs its stages after them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from knowledgesg.errors import InputError
from knowledgesg.spec import PipelineSpec
from knowledgesg.stage import Stage

RoleKind = Literal["all", "client", "server"]


@dataclass(frozen=True)
class Role:
    kind: RoleKind = "all"
    client: str | None = None  # the client this process is, with kind "client"
    exchange: Path | None = None  # where clients put their releases and the server takes them

    @property
    def label(self) -> str:
        return {"all": "simulation (every party in one process)", "client": f"client {self.client}", "server": "server"}[self.kind]

    def runs(self, stage: Stage) -> bool:
        """Whether this process runs the stage itself (else: it does not run here at all, or, on the
        server, its releases are received from the clients)."""
        return self.kind == "all" or stage.side() in ("both", self.kind)

    def receives(self, stage: Stage) -> bool:
        return self.kind == "server" and stage.side() == "client"


def check_role(role: Role, spec: PipelineSpec, stages: list[Stage], source: str) -> list[Stage]:
    """The stages this process takes part in (run or receive), in order; refuses a role that
    cannot work with this spec (exit 2, nothing written)."""
    if role.kind == "all":
        return stages
    if not spec.clients.members:
        raise InputError(f"{source}: clients: --role {role.kind} needs clients given as 'members', each with its own data (pooled 'data' with a 'partition' is a simulation)")
    members = [m.id for m in spec.clients.members]
    if role.kind == "client" and role.client not in members:
        raise InputError(f"--client: no member '{role.client}' in {source} (members: {', '.join(members)})")
    if role.kind == "server" and role.client is not None:
        raise InputError("--client goes with --role client only")
    first_server = next((i for i, s in enumerate(stages) if s.side() == "server"), len(stages))
    late = next((s for s in stages[first_server:] if s.side() == "client"), None)
    if late is not None:
        raise InputError(f"{source}: stage '{late.name}' runs on the clients but comes after server stage '{stages[first_server].name}': "
                         "with roles, the client stages come first")
    if role.kind == "client":
        return stages[:first_server]
    return stages


def narrow_to_client(spec: PipelineSpec, client_id: str) -> PipelineSpec:
    """The spec as one client runs it: its own member only (it never opens another's data), and the
    audit's canaries only if they are planted in its data."""
    member = next(m for m in spec.clients.members if m.id == client_id)
    audit = spec.audit
    if audit.canaries is not None and audit.canaries.client != client_id:
        audit = audit.model_copy(update={"canaries": None})
    return spec.model_copy(update={"clients": spec.clients.model_copy(update={"members": [member]}), "audit": audit})
