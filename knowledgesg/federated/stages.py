"""The client stages over Flower (`federation: {transport: flower}`): the server asks each client's
SuperNode to run its part of the spec, and what comes back is what a client writes to an exchange
directory (`knowledgesg.exchange`): its releases, their manifests and its ledger.

On the client, the ClientApp runs `ksg run SPEC --role client` in-process on the node's own spec,
data and run directory (its node config: `client-id`, `spec`, `run-dir`, optionally `base-dir`,
the directory the spec's relative paths resolve from), checks its ledger against its own cap,
writes its part of the exchange in its own outbox (`<run-dir>.outbox`) and sends those files. On
the server, the ServerApp writes each client's files into the server's exchange directory,
whole or not at all, and the server stages go on as with an exchange directory. (The ClientApp
and ServerApp handlers are in `knowledgesg.federated.flower`; the Flower App bundle hands them
`run_client_stages`.)
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from knowledgesg.errors import KsgError
from knowledgesg.federated.deploy import run_deployed
from knowledgesg.federated.protocol import StagesJob
from knowledgesg.roles import Role
from knowledgesg.runner import Runner
from knowledgesg.spec import PipelineSpec, spec_to_dict
from pipelines import load_pipeline

JOB, RESULT = "job.json", "result.json"


def outbox_of(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + ".outbox")


def run_client_stages(node_config: dict) -> dict[str, bytes]:
    """On the client's node: its stages on its own data; the files of its part of the exchange."""
    client_id, run_dir = str(node_config["client-id"]), Path(str(node_config["run-dir"]))
    spec, base_dir, stages = load_pipeline(Path(str(node_config["spec"])))
    if "base-dir" in node_config:
        base_dir = Path(str(node_config["base-dir"]))
    outbox = outbox_of(run_dir)
    Runner(spec, base_dir, run_dir, stages, Role("client", client_id, outbox)).run()
    part = outbox / client_id
    return {str(path.relative_to(part)): path.read_bytes() for path in sorted(part.rglob("*")) if path.is_file()}


def fetch_over_flower(spec: PipelineSpec, base_dir: Path, run_dir: Path, exchange: Path) -> None:
    """On the server: every client's releases into `exchange`, through the Flower deployment (with
    `launch: local`, SuperLink and SuperNodes started here on 127.0.0.1, each node with its own
    run directory under RUN.federation/nodes, beside the server's run: for tests and trials on one
    machine)."""
    settings = spec.federation.deploy
    work = run_dir.resolve().with_name(run_dir.name + ".federation")
    work.mkdir(parents=True, exist_ok=True)
    clients = [m.id for m in spec.clients.members]
    job = StagesJob(clients=clients, exchange=str(exchange.resolve()), timeout_s=settings.timeout_s, result=str(work / RESULT))
    (work / RESULT).unlink(missing_ok=True)
    (work / JOB).write_text(job.model_dump_json(), encoding="utf-8")
    spec_copy = work / "spec.yaml"  # with launch: local, the nodes' spec; its relative paths resolve from base-dir
    spec_copy.write_text(yaml.safe_dump(spec_to_dict(spec), sort_keys=False), encoding="utf-8")

    def node_config_of(client: str) -> str:
        return f"client-id='{client}' run-dir='{work / 'nodes' / client / 'run'}' spec='{spec_copy}' base-dir='{base_dir.resolve()}'"

    run_deployed(work / JOB, clients, settings, node_config_of, "federation.deploy")
    result = json.loads((work / RESULT).read_text(encoding="utf-8")) if (work / RESULT).is_file() else None
    if result is None:
        raise KsgError(f"the ServerApp ended without collecting the clients' releases (Flower logs in {work})")
    if result["failed"]:
        raise KsgError("client stages failed over Flower: " + "; ".join(f"{c}: {why}" for c, why in result["failed"].items()))
