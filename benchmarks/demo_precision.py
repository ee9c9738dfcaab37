"""The demo with float32 weights against bfloat16 weights in the stages `--stages` names (by
default every stage that takes a `precision`: structure, dp_train, synthesize, refine and
fedtune's training), from a warm model cache: per-stage time and what came out.

Usage:  .venv/bin/python benchmarks/demo_precision.py --workdir DIR [--spec pipelines/specs/demo.yaml] [--limit 200]
        [--stages structure,dp_train,synthesize,refine,fedtune]

Two `ksg run`s of the demo spec into fresh run directories, one with `precision: float32` and one
with `precision: bfloat16` set on `--stages` (every other stage as the spec leaves it), then
`ksg eval` of each run's final adapter and DP adapters on `--limit` FPB, FiQA and TFNS items
(label log-probability). Quality is compared by what the runs produce: synthetic pairs kept,
pairs after refine, and accuracy. A finished run leaves `<variant>.done` in the work directory
and is not run again. Writes benchmarks/results/demo_precision.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402
from _comparison import count_lines, ksg  # noqa: E402

VARIANTS = ["float32", "bfloat16"]
TASKS = ["fpb", "fiqa", "tfns"]
STAGES = ("dp_train", "synthesize", "refine", "structure", "fedtune")


def variant_spec(spec: dict, precision: str, chosen: list[str]) -> dict:
    """`spec` with `precision` set where each chosen stage takes it (fedtune: in its training)."""
    stages = []
    for stage in spec["stages"]:
        if isinstance(stage, dict) and stage["name"] in chosen:
            params = stage.get("params", {})
            if stage["name"] == "fedtune":
                params = {**params, "training": {**params.get("training", {}), "precision": precision}}
            else:
                params = {**params, "precision": precision}
            stage = {**stage, "params": params}
        stages.append(stage)
    return {**spec, "stages": stages}


def stage_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STAGES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"comma-separated stages among {', '.join(STAGES)}, got '{text}'")
    return names


def run_variant(workdir: Path, spec: dict, precision: str, limit: int, chosen: list[str]) -> dict:
    marker, run_dir = workdir / f"{precision}.done", workdir / precision
    if not marker.is_file():
        path = workdir / f"{precision}.yaml"
        path.write_text(yaml.safe_dump(variant_spec(spec, precision, chosen), sort_keys=False))
        seconds = ksg("run", str(path), "--run-dir", str(run_dir))
        ksg("eval", str(run_dir), "--models", "dp,final", "--tasks", ",".join(TASKS), "--modes", "logprob", "--limit", str(limit))
        marker.write_text(json.dumps({"seconds": seconds}))
    stages = {s: json.loads((run_dir / "stages" / s / "manifest.json").read_text())["duration_s"] for s in [p.name for p in (run_dir / "stages").iterdir()]}
    models = json.loads((run_dir / "eval/eval_report.json").read_text())["models"]
    return {"seconds": json.loads(marker.read_text())["seconds"], "stages": stages, "models": models,
            "synthetic": count_lines(run_dir, "synthesize", "synthetic.jsonl"), "refined": count_lines(run_dir, "refine", "refined.jsonl")}


def mean_accuracy(entry: dict) -> float:
    return sum(entry["tasks"][t]["logprob"]["accuracy"] for t in TASKS) / len(TASKS)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--spec", type=Path, default=Path("pipelines/specs/demo.yaml"))
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--stages", type=stage_list, default=list(STAGES), help="the stages whose precision is set (a stage left out runs as the spec says)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    spec = yaml.safe_load(args.spec.read_text())
    results = {precision: run_variant(args.workdir, spec, precision, args.limit, args.stages) for precision in VARIANTS}

    stage_names = list(results["float32"]["stages"])
    lines = [f"# The demo in float32 and with bfloat16 weights in {', '.join(args.stages)}", "",
             f"Command: `{command()}`", f"Machine: {machine()}", "",
             f"Spec: {args.spec} (its audit canaries planted and holdout kept out, as in the README's demo); the runs set `precision: float32` and `precision: bfloat16` on "
             f"{', '.join(args.stages)} (frozen base weights where a stage trains, with the adapter, its gradients, their clipping and any noise in float32; the merged "
             "model where a stage samples or scores). "
             "Models cached; one run each, one after the other.", "",
             "| stage | float32, s | bfloat16, s | speed-up |", "|---|---:|---:|---:|"]
    for name in stage_names:
        a, b = results["float32"]["stages"][name], results["bfloat16"]["stages"].get(name, float("nan"))
        lines.append(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x |" if b == b and b > 0 else f"| {name} | {a:.1f} | {b} | |")
    a, b = results["float32"]["seconds"], results["bfloat16"]["seconds"]
    lines += [f"| whole `ksg run` | {a:.1f} | {b:.1f} | {a / b:.2f}x |", "",
              "| what came out | float32 | bfloat16 |", "|---|---:|---:|",
              f"| synthetic pairs kept | {results['float32']['synthetic']} | {results['bfloat16']['synthetic']} |",
              f"| pairs after refine | {results['float32']['refined']} | {results['bfloat16']['refined']} |"]
    for model in results["float32"]["models"]:
        if model in results["bfloat16"]["models"] and "tasks" in results["float32"]["models"][model]:  # not the "dp (mean over clients)" summary
            lines.append(f"| {model}: mean accuracy, FPB / FiQA / TFNS ({args.limit} items each, label log-prob) | "
                         f"{mean_accuracy(results['float32']['models'][model]):.3f} | {mean_accuracy(results['bfloat16']['models'][model]):.3f} |")
    lines += ["", "Each DP adapter is a fresh release with its own noise, so the two runs differ by the noise as well as by the precision: "
              "one pair of runs shows whether bfloat16 changes the outcome grossly, not a small difference."]
    write_result("demo_precision", lines)


if __name__ == "__main__":
    main()
