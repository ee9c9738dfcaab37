"""PII leakage with power: Lukas et al.'s attacks on a model trained on text full of PII, NOT PRIVATE and at epsilon 8.

Usage:  .venv/bin/python benchmarks/pii_power.py --workdir DIR [--records 200] [--epochs 4] [--spans 150] [--samples 8]
        [--scores record,value] [--epsilons inf,8] [--result pii_power]

One client holds `--records` sentences of presidio's synthetic PII data set (names, addresses,
phone numbers, cards, e-mails; none of a real person), each as the response to "Write the
customer's message." SmolLM2-135M-Instruct gets a LoRA adapter (r=8 on q,v) with no noise and with
DP-SGD at epsilon 8. Then `ksg audit` attacks `--spans` PII spans found in the training records:
extraction (the text before the span, `--samples` sampled continuations), reconstruction (the
model's own candidates) and inference (the true value among 10 of its type), each against the base
model on the same spans. Each model is audited once per `--scores`, one audit after the other:
candidates ranked by the likelihood of the record from the value to its end, of the value and the
rest of its sentence (Lukas et al. rank the filled-in sentence), or of the value's own tokens, to
compare their power and time. Rates with 95% Wilson
intervals. Resumable like audit_power.py: runs and finished audits are kept in DIR.
Writes benchmarks/results/<--result>.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402
from _comparison import ksg  # noqa: E402

SOURCE = Path(__file__).resolve().parent.parent / "knowledgesg" / "vendor" / "presidio_synth_pii" / "synth_dataset_v2.json"
# what ranks a reconstruction or inference candidate (`ksg audit --pii-score`)
SCORES = {"record": "the likelihood of the record from the value to its end", "sentence": "the likelihood of the value and the rest of its sentence (Lukas et al.'s filled-in sentence)",
          "value": "the likelihood of the value's own tokens after the text before it"}


def write_records(path: Path, count: int) -> None:
    rows = json.loads(SOURCE.read_text(encoding="utf-8"))[:count]
    path.write_text("".join(json.dumps({"id": f"pii{i}", "instruction": "Write the customer's message.", "response": row["full_text"].strip()}) + "\n"
                            for i, row in enumerate(rows)), encoding="utf-8")


def spec_for(epsilon: float, args) -> dict:
    return {
        "name": f"pii-power-{'nonprivate' if math.isinf(epsilon) else f'eps{epsilon:g}'}",
        "seed": args.seed,
        "models": {"base": "smollm2-135m-instruct"},
        "clients": {"members": [{"id": "bank_a", "data": [{"path": "pii_records.jsonl"}]}]},
        "privacy": {"target_epsilon": epsilon},
        "stages": ["prepare_models", "ingest", {"name": "dp_train", "params": {
            "epochs": args.epochs, "batch_size": 8, "max_length": 96, "learning_rate": args.lr, "clip_norm": 1.0}}],
    }


def rate(entry: dict) -> str:
    return f"{entry['hits']}/{entry['tried']} = {entry['rate']:.3f} [{entry['ci'][0]:.3f}, {entry['ci'][1]:.3f}]" if entry["tried"] else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--spans", type=int, default=150)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.004)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--scores", default="record,value", help="comma-separated: " + ", ".join(SCORES))
    parser.add_argument("--epsilons", default="inf,8", help="comma-separated training epsilons (inf: NOT PRIVATE)")
    parser.add_argument("--result", default="pii_power", help="results file name (benchmarks/results/NAME.md)")
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    scores = args.scores.split(",")
    if any(score not in SCORES for score in scores):
        parser.exit(2, f"--scores {args.scores}: choose from {', '.join(SCORES)}\n")
    try:
        epsilons = [float(e) for e in args.epsilons.split(",")]
    except ValueError:
        parser.exit(2, f"--epsilons {args.epsilons}: comma-separated numbers or inf\n")
    args.workdir.mkdir(parents=True, exist_ok=True)
    write_records(args.workdir / "pii_records.jsonl", args.records)
    audit_args = ["--pii-spans", str(args.spans), "--pii-attack-samples", str(args.samples), "--samples", "8", "--mia-members", "2", "--models", "dp"]
    tables: dict[str, list[str]] = {score: [] for score in scores}
    base: dict[str, dict] = {}
    seconds: dict[str, list[float]] = {score: [] for score in scores}
    precision = "float32"
    for epsilon in epsilons:
        spec = spec_for(epsilon, args)
        spec_path = args.workdir / f"{spec['name']}.yaml"
        spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
        run_dir = args.workdir / spec["name"]
        if not (run_dir / "stages/dp_train/manifest.json").is_file():
            ksg("run", str(spec_path), "--run-dir", str(run_dir))
        name = "NOT PRIVATE" if math.isinf(epsilon) else f"epsilon {epsilon:g}"
        for score in scores:  # the same released model audited once per scoring, one after the other
            kept = args.workdir / f"{spec['name']}-audit-{score}.json"
            if not kept.is_file():
                started = time.perf_counter()
                ksg("audit", str(run_dir), *audit_args, "--pii-score", score)
                report = json.loads((run_dir / "audit/audit_report.json").read_text())
                report["seconds"] = round(time.perf_counter() - started, 1)
                kept.write_text(json.dumps(report))
            report = json.loads(kept.read_text())
            pii, precision = report["pii"], report["options"].get("precision", "float32")
            if not pii.get("base_attacks"):
                raise SystemExit(f"{run_dir}: presidio found no PII span to attack in the training records")
            base.setdefault(score, pii["base_attacks"])
            seconds[score].append(report["seconds"])
            attacks = pii["models"]["dp_adapter:bank_a"]["attacks"]
            tables[score].append(f"| {name} | {attacks['spans']} | {rate(attacks['extraction'])} ({attacks['extraction']['hits_not_by_base']}) | "
                                 f"{rate(attacks['reconstruction'])} ({attacks['reconstruction']['hits_not_by_base']}) | {rate(attacks['inference'])} ({attacks['inference']['hits_not_by_base']}) |")
    lines = [
        f"# PII leakage with power: Lukas et al.'s attacks, {' and '.join('NOT PRIVATE' if math.isinf(e) else f'at epsilon {e:g}' for e in epsilons)}", "",
        f"Command: `{command()}`", f"Machine: {machine()}",
        f"Data: the first {args.records} sentences of presidio's synthetic PII data set (`knowledgesg/vendor/presidio_synth_pii`), each the response to "
        f"\"Write the customer's message.\"; SmolLM2-135M-Instruct, LoRA r=8 on q,v, {args.epochs:g} epochs, batch 8, lr {args.lr}, seed {args.seed}.",
        f"Audit: `ksg audit RUN {' '.join(audit_args)} --pii-score SCORE` (models in {precision}); the PII spans are found by presidio in the training records; {args.samples} samples per span; "
        f"inference among the true value and up to 9 others of its type (chance {base[scores[0]]['inference']['chance']}). In brackets: hits the base model did not also make. "
        "Extraction does not depend on the score (the same seeded samples); reconstruction and inference rank their candidates by it.",
    ]
    for score in scores:
        b = base[score]
        lines += ["", f"### Candidates ranked by {SCORES[score]} (`--pii-score {score}`; audits took {', '.join(f'{x:.0f} s' for x in seconds[score])})", "",
                  "| model | spans | extraction | reconstruction | inference |", "|---|---|---|---|---|",
                  f"| base model | {b['spans']} | {rate(b['extraction'])} | {rate(b['reconstruction'])} | {rate(b['inference'])} |", *tables[score]]
    first = scores[0]
    lines += ["", "Whole audits, run one after the other on the same models: " + ", ".join(
        f"{first} over {score} scoring **{sum(seconds[first]) / sum(seconds[score]):.2f}x** the time" for score in scores[1:]) + "."]
    write_result(args.result, lines)


if __name__ == "__main__":
    main()
