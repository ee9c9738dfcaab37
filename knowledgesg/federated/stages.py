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
from pathlib import Path, PurePosixPath

import yaml

from eval.evaluate import EvalOptions, Published, evaluate_published_on_client
from knowledgesg.errors import KsgError, SpecError
from knowledgesg.federated.deploy import run_deployed
from knowledgesg.federated.protocol import DeliveryJob, StagesJob
from knowledgesg.fileio import read_tree, sha256_bytes, write_dir, write_text
from knowledgesg.models import resolve_device
from knowledgesg.roles import Role, narrow_to_client
from knowledgesg.runner import Runner, load_run_role
from knowledgesg.spec import PipelineSpec, spec_to_dict
from pipelines import load_pipeline

JOB, RESULT = "job.json", "result.json"
DELIVERY = "delivery.json"  # on the server, beside the run: who kept the published releases


def outbox_of(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + ".outbox")


def published_of(run_dir: Path) -> Path:
    """Where a client's node keeps the server's published releases: beside its run, as a bank
    would copy them for `ksg eval RUN --published DIR`."""
    return run_dir.with_name(run_dir.name + ".published")


def run_client_stages(node_config: dict) -> dict[str, bytes]:
    """On the client's node: its stages on its own data; the files of its part of the exchange."""
    client_id, run_dir = str(node_config["client-id"]), Path(str(node_config["run-dir"]))
    spec, base_dir, stages = load_pipeline(Path(str(node_config["spec"])))
    if "base-dir" in node_config:
        base_dir = Path(str(node_config["base-dir"]))
    outbox = outbox_of(run_dir)
    try:
        Runner(spec, base_dir, run_dir, stages, Role("client", client_id, outbox)).run()
    except SpecError as err:  # in the node's log; the server learns the error's kind only
        raise err.in_file(str(node_config["spec"])) from None
    return read_tree(outbox / client_id)


def federation_dir(run_dir: Path) -> Path:
    """Beside the server's run: the Flower jobs, their results, and with `launch: local` the nodes'
    own run directories (RUN.federation/nodes/<client>/run)."""
    return run_dir.resolve().with_name(run_dir.name + ".federation")


def run_server_job(spec: PipelineSpec, base_dir: Path, run_dir: Path, job: StagesJob | DeliveryJob) -> dict | None:
    """Submit a job to the Flower deployment (with `launch: local`, SuperLink and SuperNodes started
    here on 127.0.0.1, each node with its own run directory: for tests and trials on one machine)
    and return the result the ServerApp wrote, or None if it wrote none."""
    work = federation_dir(run_dir)
    Path(job.result).unlink(missing_ok=True)
    write_text(work / JOB, job.model_dump_json())
    spec_copy = work / "spec.yaml"  # with launch: local, the nodes' spec; its relative paths resolve from base-dir
    write_text(spec_copy, yaml.safe_dump(spec_to_dict(spec), sort_keys=False))

    def node_config_of(client: str) -> str:
        return f"client-id='{client}' run-dir='{work / 'nodes' / client / 'run'}' spec='{spec_copy}' base-dir='{base_dir.resolve()}'"

    run_deployed(work / JOB, job.clients, spec.federation.deploy, node_config_of, base_dir, "federation.deploy")
    result = Path(job.result)
    if not result.is_file():
        return None
    try:
        return json.loads(result.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:  # written whole by the ServerApp: this is another writer's file
        raise KsgError(f"{result}: the ServerApp's result is not JSON ({err})") from None


def fetch_over_flower(spec: PipelineSpec, base_dir: Path, run_dir: Path, exchange: Path) -> None:
    """On the server: every client's releases into `exchange`, through the Flower deployment."""
    work = federation_dir(run_dir)
    work.mkdir(parents=True, exist_ok=True)
    clients = [m.id for m in spec.clients.members]
    job = StagesJob(clients=clients, exchange=str(exchange.resolve()), timeout_s=spec.federation.deploy.timeout_s, result=str(work / RESULT))
    result = run_server_job(spec, base_dir, run_dir, job)
    if result is None:
        raise KsgError(f"the ServerApp ended without collecting the clients' releases (Flower logs in {work})")
    if result["failed"]:
        raise KsgError("client stages failed over Flower: " + "; ".join(f"{c}: {why}" for c, why in result["failed"].items()))


def take_published(node_config: dict, files: dict[str, bytes]) -> dict[str, str]:
    """On the client's node: the server's published releases, kept whole beside its run, then
    evaluated against its own data there, as `ksg eval RUN --published DIR` does (the spec's
    evaluate stage says which private test set, if any, and whether fidelity). Returns the digests
    of the files kept: the figures stay in the node's RUN/eval/."""
    client_id, run_dir = str(node_config["client-id"]), Path(str(node_config["run-dir"]))
    spec, base_dir, _ = load_pipeline(Path(str(node_config["spec"])))
    if "base-dir" in node_config:
        base_dir = Path(str(node_config["base-dir"]))
    for relative in files:
        path = PurePosixPath(relative)
        if not relative or path.as_posix() != relative or path.is_absolute() or ".." in path.parts:
            raise KsgError(f"the published releases: '{relative}' is not a plain relative path")

    def fill(directory: Path) -> None:
        for relative, data in files.items():
            (directory / relative).parent.mkdir(parents=True, exist_ok=True)
            (directory / relative).write_bytes(data)

    role = load_run_role(run_dir).kind
    # checked whole before it replaces an earlier copy; a bank whose synthetic pairs were all
    # dropped has no rows in it, and still measures the final adapter on its test set
    write_dir(published_of(run_dir), fill, before_publish=lambda copy: Published(copy).check(run_dir, role, []))
    published = Published(published_of(run_dir))
    evaluate_published_on_client(run_dir, client_eval_options(narrow_to_client(spec, client_id), client_id), published, resolve_device(spec.models.device), base_dir)
    return {relative: sha256_bytes(data) for relative, data in files.items()}


def client_eval_options(spec: PipelineSpec, client_id: str) -> EvalOptions:
    """The spec's evaluate options as one client applies them: its own private test set only."""
    params = next((dict(stage.params) for stage in spec.stages if stage.name == "evaluate"), {})
    options = EvalOptions.model_validate(params)
    return options.model_copy(update={"private_tasks": {k: v for k, v in options.private_tasks.items() if k == client_id}})


def deliver_over_flower(spec: PipelineSpec, base_dir: Path, run_dir: Path) -> dict:
    """On the server, once it has published: the `publish` directory to every client's node over
    the Flower deployment (each keeps it and evaluates it on its side). Returns the ServerApp's
    result (who kept the releases, the digests sent), also written to RUN.federation/delivery.json.
    Files every client kept already are not sent again: delete delivery.json to send them anew
    (a node that lost its copy, or changed its evaluate settings). A node replies once its
    evaluation is done, so the time it takes (a hint of the size of its test set) and
    `deploy.timeout_s` apply to the evaluation too."""
    work = federation_dir(run_dir)
    work.mkdir(parents=True, exist_ok=True)
    clients = [m.id for m in spec.clients.members]
    publish = run_dir / "stages/publish"
    digests = {name: sha256_bytes(data) for name, data in read_tree(publish).items()}
    earlier = json.loads((work / DELIVERY).read_text(encoding="utf-8")) if (work / DELIVERY).is_file() else None
    if earlier is not None and earlier["files"] == digests and sorted(earlier["kept"]) == sorted(clients):
        return earlier  # every client kept these very files already (a rerun of a finished run)
    job = DeliveryJob(clients=clients, published=str(publish.resolve()), timeout_s=spec.federation.deploy.timeout_s, result=str(work / DELIVERY))
    result = run_server_job(spec, base_dir, run_dir, job)
    if result is None:
        raise KsgError(f"the ServerApp ended without delivering the published releases (Flower logs in {work})")
    if result["failed"]:
        raise KsgError("delivering the published releases failed: " + "; ".join(f"{c}: {why}" for c, why in result["failed"].items()))
    return result
