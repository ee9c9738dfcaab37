"""fedtune at scale on Flower's simulation runtime, and what the update encodings cost.

Usage:  .venv/bin/python benchmarks/fed_scale.py --workdir DIR [--part scale|encodings|both]

Part `scale`: 50 and 100 simulated clients (`flower-sim`, one virtual SuperNode each) on the tiny
random Llama, 10 clients sampled per round, 3 rounds of 2 local steps on 8 records each. Variants:
plain LoRA with float32, float16 and int8 updates, FFA-LoRA (A frozen, B alone sent), and SecAgg+.
Per round: seconds and bytes down/up (from rounds.json, as the server recorded them), and the peak
resident memory of this process and of the whole process tree (Ray's workers included; shared
pages are counted once per process, so the tree figure is an upper bound), sampled every 0.1 s.

Part `encodings`: what float16 and int8 updates cost in accuracy on a real model. SmolLM2-135M-
Instruct, 3 clients with 400 FPB training sentences each (public data here: this measures the
encoding, not privacy), FedAvg over 4 rounds of 12 local steps (batch 8, Adam, lr 2e-3), the local
engine, one seed for every variant; then label log-probability accuracy on 400 rows of FinLoRA's
FPB test file (`ksg eval --limit 400`'s seeded sample, the same for every variant), with its
binomial standard error, and how far each variant's final adapter is from
the float32 one.

Resumable: each variant's result is kept in DIR as JSON, and a rerun skips what is there.
Writes benchmarks/results/fed_scale.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from knowledgesg.federated import engines  # noqa: E402
from knowledgesg.federated.client import initial_params  # noqa: E402
from knowledgesg.federated.engines import FINAL, INITIAL, JOB, ROUNDS  # noqa: E402
from knowledgesg.federated.protocol import LocalTraining, LoraShape, load_params, save_params  # noqa: E402
from knowledgesg.federated.secagg import SecureAggregation  # noqa: E402
from knowledgesg.federated.server import FedJob, RuleSettings  # noqa: E402
from knowledgesg.fileio import write_json  # noqa: E402
from knowledgesg.models import resolve_model  # noqa: E402

SCALES = (50, 100)
PER_ROUND = 10
VARIANTS = {  # name -> (update_encoding, ffa, secure aggregation)
    "float32": ("float32", False, False),
    "float16": ("float16", False, False),
    "int8": ("int8", False, False),
    "FFA-LoRA float32": ("float32", True, False),
    "SecAgg+ float32": ("float32", False, True),
}
ENCODINGS = ("float32", "float16", "int8")
LABELS = ("negative", "neutral", "positive")


def model_entry(name: str) -> dict:
    m = resolve_model(name)
    return {"name": m.name, "path": m.path, "kind": m.kind, "weights_sha256": m.weights_sha256, "description": m.description}


def tiny_records(client: int, n: int) -> list[dict]:
    return [{"kind": "instruction", "id": f"c{client}-{i}", "source": "synthetic", "instruction": "What is the sentiment?",
             "input": f"Firm {client} item {i} shares moved", "response": LABELS[(client + i) % 3]} for i in range(n)]


class MemorySampler:
    """Peak RSS of this process and of its whole process tree, sampled every 0.1 s; `mark` closes a
    round (engines.print_round is called once at the end of each) and starts the next one's peak."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()
        self.rounds: list[dict] = []
        self.own = self.tree = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        import psutil

        own = self.me.memory_info().rss
        tree = own
        for child in self.me.children(recursive=True):
            try:
                tree += child.memory_info().rss
            except psutil.Error:
                pass
        self.own, self.tree = max(self.own, own), max(self.tree, tree)

    def _loop(self) -> None:
        while not self.stop.wait(0.1):
            self._sample()

    def mark(self) -> None:
        self._sample()
        self.rounds.append({"own_peak_rss": self.own, "tree_peak_rss": self.tree})
        self.own = self.tree = 0


@dataclass
class Outcome:
    variant: str
    clients: int
    seconds: float  # the whole simulation, Ray's start and stop included
    rounds: list[dict] = field(default_factory=list)
    memory: list[dict] = field(default_factory=list)
    relative_distance: float | None = None  # ||final - float32 final|| / ||float32 final - initial||


def scale_job(clients: int, variant: str, seed: int) -> FedJob:
    encoding, ffa, secure = VARIANTS[variant]
    names = [f"c{i:03d}" for i in range(clients)]
    return FedJob(seed=seed, rounds=3, clients=names, clients_per_round=PER_ROUND, rule=RuleSettings(name="fedavg"),
                  training=LocalTraining(steps=2, batch_size=4, max_length=48), lora=LoraShape(r=8, ffa=ffa), base_model=model_entry("tiny-random-llama"),
                  records={n: tiny_records(i, 8) for i, n in enumerate(names)}, update_encoding=encoding,
                  secure_aggregation=SecureAggregation() if secure else None)


def write_job(directory: Path, job: FedJob) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_params(directory / INITIAL, initial_params(job.base_model, job.lora, job.seed))
    write_json(directory / JOB, job.model_dump(mode="json"))
    return directory / JOB


def distance(final: dict, reference: dict, initial: dict) -> float | None:
    if set(final) != set(reference):  # FFA-LoRA sends B alone
        return None
    step = np.sqrt(sum(float(((reference[k] - initial[k]).astype(np.float64) ** 2).sum()) for k in reference))
    return float(np.sqrt(sum(float(((final[k] - reference[k]).astype(np.float64) ** 2).sum()) for k in reference)) / step)


def run_scale(workdir: Path, clients: int, variant: str) -> Outcome:
    from knowledgesg.federated.flower import run_simulation

    directory = workdir / f"scale-{clients}-{variant}".replace(" ", "_").replace("+", "")
    job_path = write_job(directory, scale_job(clients, variant, seed=3))
    sampler = MemorySampler()
    print_round = engines.print_round
    engines.print_round = lambda record: (sampler.mark(), print_round(record))
    sampler.thread.start()
    start = time.perf_counter()
    try:
        run_simulation(job_path, clients)
    finally:
        seconds = time.perf_counter() - start
        sampler.stop.set()
        engines.print_round = print_round
    return Outcome(variant, clients, seconds, json.loads((directory / ROUNDS).read_text()), sampler.rounds)


def fpb_clients(per_client: int, clients: int) -> dict[str, list[dict]]:
    from knowledgesg.builtin_data import load_builtin

    records = [r.model_dump(mode="json") for r in load_builtin("fpb_train", "fpb")]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(records))[: per_client * clients]
    return {f"bank_{chr(97 + c)}": [records[i] for i in order[c * per_client : (c + 1) * per_client]] for c in range(clients)}


def run_encoding(workdir: Path, encoding: str) -> dict:
    """One local-engine run on SmolLM2 with this encoding, then FPB label log-probability."""
    import gc

    from eval.benchmarks import evaluate_model
    from knowledgesg.federated.client import LoraModel

    records = fpb_clients(400, 3)
    base = model_entry("smollm2-135m-instruct")
    job = FedJob(seed=5, rounds=4, clients=sorted(records), clients_per_round=3, rule=RuleSettings(name="fedavg"),
                 training=LocalTraining(steps=12, batch_size=8, max_length=96), lora=LoraShape(r=8), base_model=base,
                 records=records, update_encoding=encoding)
    directory = workdir / f"encoding-{encoding}"
    start = time.perf_counter()
    engines.run_local(write_job(directory, job))
    seconds = time.perf_counter() - start
    lora = LoraModel.get(base, job.lora, "cpu")
    lora.set_params(load_params(directory / FINAL))
    lora.model.eval()
    scores = evaluate_model(lora.model, lora.tokenizer, ["fpb"], ["logprob"], limit=400, seed=0)
    gc.collect()
    return {"encoding": encoding, "seconds": seconds, "fpb": scores["fpb"]["logprob"], "rounds": json.loads((directory / ROUNDS).read_text())}


def cached(path: Path, make):
    if path.is_file():
        return json.loads(path.read_text())
    value = make()
    path.write_text(json.dumps(value, indent=1))
    return value


def mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def scale_lines(scales: tuple[int, ...], results: dict[str, dict]) -> list[str]:
    lines = ["## Scale: flower-sim, tiny random Llama, 10 clients sampled per round, 3 rounds", "",
             "| clients | variant | whole simulation (s) | seconds per round | MB down / up per round | peak RSS per round, this process (MiB) | peak RSS per round, process tree (MiB) | distance from float32's adapter |",
             "|---|---|---|---|---|---|---|---|"]
    for clients in scales:
        for variant in VARIANTS:
            r = results.get(f"{clients}-{variant}")
            if r is None:
                continue
            rounds, memory = r["rounds"], r["memory"]
            per_round = " / ".join(f"{x['seconds']:.1f}" for x in rounds)
            traffic = " / ".join(f"{x['bytes_down'] / 1e6:.2f}, {x['bytes_up'] / 1e6:.3f}" if x["bytes_up"] is not None else f"{x['bytes_down'] / 1e6:.2f}, -" for x in rounds)
            own = " / ".join(mib(m["own_peak_rss"]) for m in memory)
            tree = " / ".join(mib(m["tree_peak_rss"]) for m in memory)
            d = "-" if r["relative_distance"] is None else f"{r['relative_distance']:.2e}"
            lines.append(f"| {clients} | {variant} | {r['seconds']:.1f} | {per_round} | {traffic} | {own} | {tree} | {d} |")
    return lines + ["", "Distance: the L2 norm of (final adapter - float32's final adapter) over that of (float32's final adapter - the initial one), same clients, same sample of clients each round. "
                    "FFA-LoRA and SecAgg+ train other parameters or round otherwise, so their distance says how far they move from plain LoRA, not an error. "
                    "SecAgg+'s bytes up are the masked vectors only (its key exchange adds messages the server does not count as updates).", ""]


def encoding_lines(results: dict[str, dict]) -> list[str]:
    if not results:
        return []
    lines = ["## Encodings on a real model: SmolLM2-135M-Instruct, 3 clients x 400 FPB sentences, 4 rounds", "",
             "| encoding | FPB accuracy (label log-prob, 400 rows) +- SE | macro-F1 | MB up per round | distance from float32's adapter | run (s) |", "|---|---|---|---|---|---|"]
    for encoding in ENCODINGS:
        r = results.get(encoding)
        if r is None:
            continue
        fpb = r["fpb"]
        up = r["rounds"][0]["bytes_up"] / 1e6
        d = "-" if r.get("relative_distance") is None else f"{r['relative_distance']:.2e}"
        se = (fpb["accuracy"] * (1 - fpb["accuracy"]) / fpb["n"]) ** 0.5
        lines.append(f"| {encoding} | {fpb['accuracy']:.3f} +- {se:.3f} | {fpb['macro_f1']:.3f} | {up:.2f} | {d} | {r['seconds']:.0f} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True, help="results live here; the same command resumes from it")
    parser.add_argument("--part", choices=["scale", "encodings", "both"], default="both")
    parser.add_argument("--clients", default=",".join(map(str, SCALES)), help="simulated client counts (a quick try: 12)")
    parser.add_argument("--cached-only", action="store_true", help="run nothing: write the results file from what DIR holds")
    parser.add_argument("--note", default="", help="a line on how the run went (e.g. other jobs on the machine), printed with the results")
    args = parser.parse_args()
    scales = tuple(int(n) for n in args.clients.split(","))
    args.workdir.mkdir(parents=True, exist_ok=True)
    scale: dict[str, dict] = {}
    encodings: dict[str, dict] = {}

    def write() -> None:
        write_result("fed_scale", ["# fedtune at scale on flower-sim, and the cost of 16- and 8-bit updates", "", f"Command: `{command()}`", f"Machine: {machine()}", *([args.note] if args.note else []), "",
                                   *scale_lines(scales, scale), *encoding_lines(encodings)])

    run_scale_part = args.part in ("scale", "both") and not args.cached_only
    run_encodings_part = args.part in ("encodings", "both") and not args.cached_only
    for clients in scales:
        for variant in VARIANTS:
            key, tag = f"{clients}-{variant}", f"{clients}-{variant}".replace(" ", "_").replace("+", "")
            if run_scale_part or (args.workdir / f"{tag}.json").is_file():
                scale[key] = cached(args.workdir / f"{tag}.json", lambda: run_scale(args.workdir, clients, variant).__dict__)
            if key in scale and variant != "float32" and f"{clients}-float32" in scale:
                runs = args.workdir / f"scale-{clients}-float32"
                scale[key]["relative_distance"] = distance(load_params(args.workdir / f"scale-{tag}" / FINAL), load_params(runs / FINAL), load_params(runs / INITIAL))
            write()
    for encoding in ENCODINGS:
        if run_encodings_part or (args.workdir / f"encoding-{encoding}.json").is_file():
            encodings[encoding] = cached(args.workdir / f"encoding-{encoding}.json", lambda: run_encoding(args.workdir, encoding))
        if encoding in encodings and encoding != "float32" and "float32" in encodings:
            runs = args.workdir / "encoding-float32"
            encodings[encoding]["relative_distance"] = distance(load_params(args.workdir / f"encoding-{encoding}" / FINAL), load_params(runs / FINAL), load_params(runs / INITIAL))
        write()
    write()


if __name__ == "__main__":
    main()
