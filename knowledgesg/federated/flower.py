"""`fedtune` over Flower: a ServerApp that runs the shared server loop through Flower's Grid, and a
ClientApp that runs the shared client `fit`. Used by both Flower engines:

- `flower-sim`: Flower's simulation runtime (Ray) in this process, one virtual SuperNode per client.
- `flower-deploy`: the app bundle in `flower_app/` (which imports `server_app` and `client_app`)
  is submitted with `flwr run` to a SuperLink; each client's SuperNode runs the ClientApp.

A SuperNode says which client it is: `client-id` in its node config (deploy), or its
`partition-id` in the job's client list (simulation). The server asks every node once ("query"),
then addresses each round's tasks by client id, so client sampling is the same as in `local`.
Private data never travels: a task for private data names the stage to read on the client.

With `secure_aggregation`, a round runs Flower's SecAgg+ workflow instead of one "train" message
per client (knowledgesg.federated.secagg); the ClientApp's train handler is the same, behind the
SecAgg+ mod.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from knowledgesg.console import console
from knowledgesg.errors import KsgError
from knowledgesg.exchange import replace_part, write_files
from knowledgesg.federated.client import ClientRuntime, NodeSettings
from knowledgesg.federated.engines import run_job_file
from knowledgesg.federated.protocol import DELIVER_PUBLISHED, RUN_STAGES, ClientTask, ClientUpdate, DeliveryJob, Params, StagesJob, failure_reason
from knowledgesg.federated.secagg import SecAggPlan, SecureSum, secure_aggregation_mod, secure_sum
from knowledgesg.fileio import named_crash_point, read_tree, sha256_bytes, write_json

QUERY = "query"
NODE_WAIT_S = 120.0
# Set by this process before it starts Flower's simulation runtime: a virtual node (its partition-id)
# is then the server's own process, where the spec's settings hold. A node config is the node
# operator's, and `partition-id` in it (a common Flower habit) makes no deployed node a simulation.
SIMULATION_FLAG = "KSG_FLOWER_SIMULATION"


def _quiet_flower() -> None:
    # No phoning home from a private deployment: no update check, no telemetry.
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def to_array_record(params: Params):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({name: Array(params[name]) for name in sorted(params)})


def from_array_record(record) -> Params:
    return {name: np.asarray(array.numpy()) for name, array in record.items()}  # as sent: an encoded update keeps its dtype


def identify_nodes(grid, clients: list[str]) -> dict[str, int]:
    """client id -> node id: every connected node is asked which client it is."""
    from flwr.app import ConfigRecord, Message, RecordDict

    deadline = time.monotonic() + NODE_WAIT_S
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < len(clients) and time.monotonic() < deadline:
        time.sleep(0.5)
        node_ids = list(grid.get_node_ids())
    query = [Message(RecordDict({"config": ConfigRecord({"clients": json.dumps(clients)})}), dst_node_id=n, message_type=QUERY) for n in node_ids]
    nodes = {}
    for reply in grid.send_and_receive(query, timeout=NODE_WAIT_S):
        if reply.has_content():
            nodes[str(reply.content["config"]["client-id"])] = reply.metadata.src_node_id
    missing = [c for c in clients if c not in nodes]
    if missing:
        raise KsgError(f"no SuperNode answered as client {', '.join(missing)} (connected nodes: {len(node_ids)})")
    return nodes


def ask_every_client(grid, nodes: dict[str, int], content_of: Callable[[str], dict], message_type: str, timeout_s: float | None,
                     take: Callable[[str, object], str | None]) -> tuple[list[str], dict[str, str]]:
    """One message to each client's node and its reply, kept by `take(client, reply content)`, which
    returns why a reply cannot be kept, or None. Returns the clients whose reply was kept, and for
    every other client why not (its error, what `take` said, or no reply within the timeout)."""
    from flwr.app import Message, RecordDict

    client_of = {node: client for client, node in nodes.items()}
    messages = [Message(RecordDict(content_of(client)), dst_node_id=node, message_type=message_type) for client, node in nodes.items()]
    kept, failed = [], {}
    for reply in grid.send_and_receive(messages, timeout=timeout_s):
        client = client_of.get(reply.metadata.src_node_id)
        if client is None or client in kept:
            continue
        if reply.has_error():
            failed[client] = reply.error.reason
            continue
        why = take(client, reply.content)
        if why is not None:
            failed[client] = why
            continue
        kept.append(client)
    failed.update(unanswered(list(nodes), kept, failed, timeout_s))
    return kept, failed


def collect_releases(grid, job: StagesJob) -> None:
    """In the ServerApp: ask every client's node to run its stages, keep what each sends in its part
    of the exchange, and say in `job.result` who sent and who failed, and why."""
    from flwr.app import ConfigRecord

    exchange = Path(job.exchange)

    def keep(client: str, content) -> str | None:
        try:
            files = {name: bytes(value) for name, value in content["files"].items()}
            replace_part(exchange, client, functools.partial(write_files, files=files, client_id=client))
        except (KeyError, KsgError) as err:
            return f"its reply could not be kept: {err}"
        return None

    sent, failed = ask_every_client(grid, identify_nodes(grid, job.clients), lambda client: {"config": ConfigRecord({"client-id": client})}, RUN_STAGES, job.timeout_s, keep)
    write_json(job.result, {"sent": sent, "failed": failed})


def deliver_published(grid, job: DeliveryJob) -> None:
    """In the ServerApp: send the server's published releases (final adapter, synthetic data) to
    every client's node, which keeps them and evaluates them against its own data there. A node
    answers with the digests of what it kept, never a figure; `job.result` says who kept them."""
    from flwr.app import ConfigRecord

    files = read_tree(Path(job.published))
    digests = {name: sha256_bytes(data) for name, data in files.items()}

    def check(client: str, content) -> str | None:
        return None if json.loads(str(content["config"]["kept"])) == digests else "the copy it kept differs from what was sent"

    kept, failed = ask_every_client(grid, identify_nodes(grid, job.clients), lambda client: {"files": ConfigRecord(files), "config": ConfigRecord({"client-id": client})},
                                    DELIVER_PUBLISHED, job.timeout_s, check)
    write_json(job.result, {"kept": kept, "failed": failed, "files": digests})


def unanswered(clients: list[str], answered: list[str], failed: dict[str, str], timeout_s: float | None) -> dict[str, str]:
    return {c: f"no reply within {timeout_s:g} s" if timeout_s else "no reply" for c in clients if c not in answered and c not in failed}


class FlowerTransport:
    """Delivers tasks through a Flower Grid and collects the replies."""

    def __init__(self, grid, clients: list[str], timeout_s: float | None = None) -> None:
        self.grid = grid
        self.nodes = identify_nodes(grid, clients)
        self.timeout_s = timeout_s

    def fit(self, tasks: list[ClientTask], params: Params, server_control: Params | None) -> tuple[list[ClientUpdate], dict[str, str]]:
        from flwr.app import ConfigRecord, Message, RecordDict

        shared = {"arrays": to_array_record(params)}  # the same for every client of the round: converted once
        if server_control:
            shared["control"] = to_array_record(server_control)
        messages = [Message(RecordDict({**shared, "config": ConfigRecord({"task": task.model_dump_json()})}), dst_node_id=self.nodes[task.client_id], message_type="train")
                    for task in tasks]
        client_of = {node: client for client, node in self.nodes.items()}
        updates, failed = [], {}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout_s):
            client = client_of.get(reply.metadata.src_node_id, "?")
            if not reply.has_content():
                failed[client] = reply.error.reason if reply.has_error() else "an empty reply"
                continue
            update = update_from_content(reply.content)
            if update.client_id != client:  # a node answers for itself only
                failed[client] = f"its reply claimed to come from client {update.client_id}"
                continue
            updates.append(update)
        failed.update(unanswered([t.client_id for t in tasks], [u.client_id for u in updates], failed, self.timeout_s))
        return updates, failed

    def fit_secure(self, tasks: list[ClientTask], params: Params, weights: dict[str, int], plan: SecAggPlan, round_number: int) -> SecureSum:
        return secure_sum(self.grid, self.nodes, tasks, params, weights, plan, round_number, self.timeout_s)

    def client_state(self) -> dict[str, Params]:
        return {}  # each node keeps its own (SCAFFOLD's c_i in its context state, for this Flower run)

    def restore(self, state: dict[str, Params]) -> None:
        pass

    @property
    def holds_client_state(self) -> bool:
        return False


def update_from_content(content) -> ClientUpdate:
    """A client's reply: only the fields it chose to send (no count or loss on private data)."""
    config, metrics = content["config"], content["metrics"]
    release = json.loads(str(config["release"])) if "release" in config else None
    return ClientUpdate(
        str(config["client-id"]), from_array_record(content["arrays"]) if "arrays" in content else None,
        int(metrics["num-examples"]) if "num-examples" in metrics else None, float(metrics["loss"]) if "loss" in metrics else None,
        from_array_record(content["control_delta"]) if "control_delta" in content else None, int(metrics["dp-steps"]), release,
    )


def update_content(update: ClientUpdate) -> dict:
    config = {"client-id": update.client_id, **({"release": json.dumps(update.release)} if update.release is not None else {})}
    metrics = {"dp-steps": update.dp_steps, **({"num-examples": update.num_examples} if update.num_examples is not None else {}),
               **({"loss": update.loss} if update.loss is not None else {})}
    content = {"config": config, "metrics": metrics}
    if update.update is not None:
        content["arrays"] = update.update
    if update.control_delta is not None:
        content["control_delta"] = update.control_delta
    return content


def log_on_node(message: str) -> None:
    """The whole story of a client's failure, in its node's own log (the server gets its kind
    only). A module function: the handlers that call it are pickled for Flower's simulation
    runtime, and the console itself cannot be."""
    console.print(message)


def client_identity(node_config: dict, clients: list[str]) -> str:
    if "client-id" in node_config:
        return str(node_config["client-id"])
    return clients[int(node_config["partition-id"])]


def node_settings(node_config: dict, task: ClientTask) -> NodeSettings | None:
    """The data owner's own settings on its SuperNode (`run-dir` in its node config), or None on
    a simulation's virtual node (`partition-id` where this process started the simulation: the
    server's process, the spec's settings). A deployed node without them would take its ledger,
    cap and noise source from the server's task: a server asking for reproducible noise could then
    regenerate the noise and subtract it, so a task on private data is refused there."""
    if "run-dir" in node_config:
        return NodeSettings.of(node_config)
    if task.local_dp is not None and not (SIMULATION_FLAG in os.environ and "partition-id" in node_config):
        raise KsgError(f"client '{task.client_id}': this node has no run-dir in its node config, so no ledger, cap or noise settings of its own; "
                       "it trains on private data only with them (flower-supernode --node-config \"run-dir=... client-id=...\")")
    return None


def make_client_app(run_stages: Callable[[dict], dict[str, bytes]] | None = None, take_published: Callable[[dict, dict[str, bytes]], dict[str, str]] | None = None):
    """The ClientApp; `run_stages` (node config -> the files of the node's releases) answers the
    server's request to run a client's stages (knowledgesg.federated.stages.run_client_stages),
    `take_published` (node config, files -> their digests) its delivery of the published releases
    (knowledgesg.federated.stages.take_published)."""
    from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    _quiet_flower()
    app = ClientApp()
    runtime = ClientRuntime()

    @app.query()
    def identify(msg: Message, context: Context) -> Message:
        clients = json.loads(str(msg.content["config"]["clients"]))
        return Message(RecordDict({"config": ConfigRecord({"client-id": client_identity(context.node_config, clients)})}), reply_to=msg)

    @app.query(RUN_STAGES.split(".", 1)[1])
    def client_stages(msg: Message, context: Context) -> Message:
        """The node's client stages on its own data; its releases as files. A failure goes back as
        the message's error, naming its kind only (failure_reason); the node's log has the rest."""
        if run_stages is None or str(msg.content["config"]["client-id"]) != str(context.node_config.get("client-id")):
            raise KsgError("this node runs no client stages, or is another client")
        try:
            files = run_stages(context.node_config)
        except Exception as err:
            log_on_node(f"client stages failed: {err}")
            raise KsgError(failure_reason(err)) from None
        return Message(RecordDict({"files": ConfigRecord(files)}), reply_to=msg)

    @app.query(DELIVER_PUBLISHED.split(".", 1)[1])
    def published(msg: Message, context: Context) -> Message:
        """The server's published releases: kept in the node's own run and evaluated there; the
        reply is the digests of the files kept (the figures stay on the node)."""
        if take_published is None or str(msg.content["config"]["client-id"]) != str(context.node_config.get("client-id")):
            raise KsgError("this node takes no published releases, or is another client")
        try:
            kept = take_published(context.node_config, {name: bytes(value) for name, value in msg.content["files"].items()})
        except Exception as err:
            log_on_node(f"the published releases could not be kept or evaluated: {err}")
            raise KsgError(failure_reason(err)) from None
        return Message(RecordDict({"config": ConfigRecord({"kept": json.dumps(kept)})}), reply_to=msg)

    @app.train(mods=[secure_aggregation_mod])  # SecAgg+ rounds; other train messages pass straight through
    def train(msg: Message, context: Context) -> Message:
        task = ClientTask.model_validate_json(str(msg.content["config"]["task"]))
        named_crash_point(f"fedtune-client-{task.client_id}-round-{task.round}")  # tests: a client that dies mid-round
        if "run-dir" in context.node_config:  # the node's own storage, whatever the task says (or leaves out: "." would be a fresh ledger key)
            task = task.model_copy(update={"run_dir": str(context.node_config["run-dir"])})
        server_control = from_array_record(msg.content["control"]) if "control" in msg.content else None
        # SCAFFOLD's c_i lives in the node's context state, which Flower keeps across rounds
        client_control = from_array_record(context.state["control"]) if "control" in context.state else None
        try:
            # on a data owner's node, its own ledger, cap and noise settings hold, not the server's
            node = node_settings(context.node_config, task)
            update = runtime.fit(task, from_array_record(msg.content["arrays"]), server_control, client_control, node)
        except Exception as err:
            log_on_node(f"round {task.round} failed: {err}")
            raise KsgError(failure_reason(err)) from None
        fields = update_content(update)
        content = {"config": ConfigRecord(fields["config"]), "metrics": MetricRecord(fields["metrics"])}
        for name in ("arrays", "control_delta"):
            if name in fields:
                content[name] = to_array_record(fields[name])
        if update.control_delta is not None:
            context.state["control"] = to_array_record(runtime.controls[update.client_id])
        return Message(RecordDict(content), reply_to=msg)

    return app


def make_server_app(job_path: Path | None = None):
    """The ServerApp; without `job_path` it reads the job from the run config (`flwr run --run-config`)."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    _quiet_flower()
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        path = Path(job_path or str(context.run_config["job"]))
        job = json.loads(path.read_text(encoding="utf-8"))
        if job.get("kind") == "stages":
            collect_releases(grid, StagesJob.model_validate(job))
            return
        if job.get("kind") == "deliver":
            deliver_published(grid, DeliveryJob.model_validate(job))
            return
        run_job_file(path, lambda job: FlowerTransport(grid, job.clients, job.round_timeout_s))

    return app


def run_simulation(job_path: Path, num_clients: int) -> None:
    """Flower's simulation runtime: Ray actors run the ClientApp, one virtual SuperNode per client."""
    _quiet_flower()
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation as flower_run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)
    os.environ[SIMULATION_FLAG] = "1"  # inherited by the Ray actors this process starts; this simulation's only
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            flower_run_simulation(make_server_app(job_path), make_client_app(), num_supernodes=num_clients,
                                  backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": max(1, min(num_clients, os.cpu_count() or 1))}})
    finally:
        os.environ.pop(SIMULATION_FLAG, None)
