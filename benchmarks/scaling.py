"""How pipeline time grows with private records (1x, 2x, 4x) and with clients (1, 2, 4).

Usage:  .venv/bin/python benchmarks/scaling.py [--records 64] [--synthetic 8] [--workdir DIR]

One spec, real models (SmolLM2 base, Gemma 3 270M professional), stages ingest -> dp_train
(epsilon 8, one epoch) -> synthesize -> refine -> fedtune (2 rounds x 2 steps, every client).
- records: one client holding 1x, 2x, 4x `--records` FPB sentences, and 1x, 2x, 4x `--synthetic`
  synthetic pairs asked of it (the synthetic set grows with the data it stands for);
- clients: 1, 2, 4 clients, each holding `--records` sentences and asked for `--synthetic` pairs.
Each configuration is a fresh run directory (models cached beforehand, so no conversion is
timed). Per stage, its `duration_s` from the manifest; the ratio columns divide by the 1x / one-
client run, so linear cost reads 1, 2, 4. Fixed costs (loading a model per stage, fedtune's fixed
step count) make the whole-run ratios sublinear. Writes benchmarks/results/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402
from _comparison import run_spec  # noqa: E402

STAGES = ["ingest", "dp_train", "synthesize", "refine", "fedtune"]
LABELS = ["negative", "neutral", "positive"]


def spec(args, name: str, clients: int, records_per_client: int, synthetic_per_client: int) -> dict:
    return {
        "name": name, "seed": 3,
        "models": {"base": args.base, "professional": args.professional},
        "clients": {"data": [{"builtin": "fpb_train", "sample": clients * records_per_client}],
                    "partition": {"method": "iid", "num_clients": clients}},
        "privacy": {"target_epsilon": 8.0, "unit": "record"},
        "stages": [
            "prepare_models", "ingest",
            {"name": "dp_train", "params": {"loss_on": "all", "epochs": 1.0, "batch_size": 8, "max_length": 96, "learning_rate": 0.002}},
            {"name": "synthesize", "params": {"per_client": synthetic_per_client, "oversample": 2.0, "labels": LABELS, "class_balance": "uniform",
                                              "seeds": [{"instruction": "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}.",
                                                         "domain": "finance", "task": "sentiment"}],
                                              "sampling": {"max_new_tokens": 40, "temperature": 0.9, "top_p": 0.95}, "response_max_new_tokens": 8,
                                              "min_words": 5, "max_words": 60}},
            {"name": "refine", "params": {"pool": {"builtin": "fiqa_train"}, "labels": LABELS, "shots": 6, "threshold": 0.0,
                                          "task": "financial sentiment analysis: a single news headline about markets or companies"}},
            {"name": "fedtune", "params": {"engine": "local", "rounds": 2, "rule": {"name": "fedavg"},
                                           "training": {"steps": 2, "batch_size": 8, "max_length": 96, "learning_rate": 0.002, "loss_on": "response"}}},
        ],
    }


def stage_times(run_dir: Path) -> dict[str, float]:
    return {s: json.loads((run_dir / "stages" / s / "manifest.json").read_text())["duration_s"] for s in STAGES}


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=64, help="private records per client at 1x")
    parser.add_argument("--synthetic", type=int, default=8, help="synthetic pairs per client at 1x")
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--professional", default="gemma-3-270m")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="scaling-"))

    configs = {  # label -> (clients, records per client, synthetic per client)
        "1 client, 1x": (1, args.records, args.synthetic),
        "1 client, 2x": (1, 2 * args.records, 2 * args.synthetic),
        "1 client, 4x": (1, 4 * args.records, 4 * args.synthetic),
        "2 clients, 1x each": (2, args.records, args.synthetic),
        "4 clients, 1x each": (4, args.records, args.synthetic),
    }
    from knowledgesg.fileio import write_json

    totals_path = workdir / "times.json"  # whole-run seconds, kept so that an interrupted benchmark goes on
    totals = json.loads(totals_path.read_text()) if totals_path.is_file() else {}
    stages = {}
    for n, (label, (clients, records, synthetic)) in enumerate(configs.items()):
        run_dir = workdir / f"run{n}"
        if label not in totals:
            totals[label] = run_spec(workdir, spec(args, f"scaling-{n}", clients, records, synthetic), run_dir)
            write_json(totals_path, totals)
        stages[label] = stage_times(run_dir)
        print(label, f"{totals[label]:.0f} s", stages[label], flush=True)

    lines = ["| configuration | scale | " + " | ".join(STAGES) + " | whole `ksg run` | ratio, whole run | ratio, dp_train | ratio, synthesize + refine |",
             "|---|---|" + "---|" * (len(STAGES) + 4)]
    reference = "1 client, 1x"
    for label, (clients, records, _) in configs.items():
        scale = clients * records / args.records
        work = stages[label]["synthesize"] + stages[label]["refine"]
        base_work = stages[reference]["synthesize"] + stages[reference]["refine"]
        lines.append(f"| {label} | {scale:g} | " + " | ".join(f"{stages[label][s]:.1f}" for s in STAGES) + f" | {totals[label]:.1f} | "
                     f"{totals[label] / totals[reference]:.2f} | {stages[label]['dp_train'] / stages[reference]['dp_train']:.2f} | {work / base_work:.2f} |")
    fits = []
    for axis, labels in (("records (1 client)", ["1 client, 1x", "1 client, 2x", "1 client, 4x"]), ("clients (1x each)", ["1 client, 1x", "2 clients, 1x each", "4 clients, 1x each"])):
        scales = [1.0, 2.0, 4.0]
        seconds = [totals[label] for label in labels]
        slope, intercept = np.polyfit(scales, seconds, 1)
        worst = max(abs(t - (intercept + slope * x)) for x, t in zip(scales, seconds))
        fits.append(f"| {axis} | {intercept:.1f} | {slope:.1f} | {worst:.1f} |")
    write_result("scaling", [
        "# Pipeline time against records and clients", "",
        f"Command: `{command()}`", f"Machine: {machine()}",
        f"1x = {args.records} FPB training sentences and {args.synthetic} synthetic pairs per client; one epoch of DP-SGD at epsilon 8 "
        "(batch 8, 96 tokens); fedtune 2 rounds x 2 steps with every client. Seconds per stage from each stage's manifest; "
        "the whole run includes process start and prepare_models (cached models).", "",
        *lines, "",
        "Least-squares line through the whole-run times, seconds = fixed + per_unit x scale; the largest distance of a point from it:", "",
        "| axis | fixed (s) | per 1x (s) | largest residual (s) |", "|---|---|---|---|", *fits,
    ])


if __name__ == "__main__":
    main()
