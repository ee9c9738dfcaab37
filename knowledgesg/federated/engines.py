"""Engines run a job directory: `job.json` and `initial.npz` in, `final.npz` and `rounds.json` out.

The job travels as files so that the server loop can run in this process (`local`, and
`flower-sim`, whose ServerApp runs in a thread here) or in a ServerApp process that a SuperLink
started (`flower-deploy`); the results come back the same way in every case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from knowledgesg.console import console
from knowledgesg.federated.protocol import RoundRecord, load_params, save_params
from knowledgesg.federated.server import FedJob, LocalTransport, Transport, run_federation
from knowledgesg.fileio import read_json, write_json

JOB, INITIAL, FINAL, ROUNDS, CHECKPOINT = "job.json", "initial.npz", "final.npz", "rounds.json", "checkpoint.npz"


def print_round(record: RoundRecord) -> None:
    loss = f"{record.mean_loss:.4f}" if record.mean_loss is not None else "- (stays on the clients)"
    failed = f", failed: {'; '.join(f'{c} ({why})' for c, why in record.failed.items())}" if record.failed else ""
    examples = record.num_examples if record.num_examples is not None else "-"
    joined = ", ".join(record.joined) if record.joined is not None else "not recorded (each client's own coin)"
    console.print(f"fedtune round {record.round}: asked {', '.join(record.clients) or '(none sampled)'}, joined {joined}, examples {examples}, "
                  f"mean local loss {loss}, global step norm {record.update_norm:.4g}, {'' if record.bytes_up is None else f'{record.bytes_up / 1e6:.2f} MB up, '}{record.seconds:.1f}s{failed}")


def run_job_file(job_path: Path, make_transport: Callable[[FedJob], Transport]) -> None:
    job = FedJob.model_validate(read_json(job_path))
    final, history = run_federation(job, load_params(job_path.parent / INITIAL), make_transport(job), print_round, job_path.parent / CHECKPOINT)
    save_params(job_path.parent / FINAL, final)
    write_json(job_path.parent / ROUNDS, [asdict(r) for r in history])


def run_local(job_path: Path) -> None:
    run_job_file(job_path, lambda job: LocalTransport())
