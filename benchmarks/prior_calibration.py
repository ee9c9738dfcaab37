"""Calibrating a model's label prior to the synthetic data's, after the fact: would it steady the
headline's final tuning?

The headline's replicates of its final tuning differ mostly in how often the final model answers
"neutral" (finance_headline_notes.md: "Replicates of the final tuning"): on the same synthetic pairs (54% neutral) one
replicate predicts TFNS 37% neutral and another 8%. This scores each final model on the synthetic
pairs its tuning read (what the server holds: the DP models' output, post-processing, no privacy
cost) and on the headline's test items, and adds to each label's log-probability

    b = log(pi) - log(mean p)

where pi is the synthetic pairs' label shares and mean p the model's mean probability of each
label over the synthetic inputs (the prior-shift correction of Saerens, Latinne and Decaestecker,
2002: it moves the model's average answer on the synthetic inputs to their labels' shares). With
`--dp`, each bank's DP adapter is calibrated the same way to its own bank's synthetic pairs (what
the DP-adapter row would gain from the same step); with `--professional RUN`, the professional model
tuned in RUN (public data) is calibrated to the first run's synthetic pairs (what the server could
do with the professional and the same pairs, no tuning on them). Nothing is trained or released; the test items
are the headline's (the same seeded `--limit` per task, float32 weights as its evaluate stage).

Usage:  .venv/bin/python benchmarks/prior_calibration.py RUN_DIR [RUN_DIR ...] [--dp] [--professional RUN] [--no-finals] [--limit 400] [--name prior_calibration]
Writes benchmarks/results/<name>.md and .json (default prior_calibration)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, code_version, command, machine, write_result  # noqa: E402

from eval.audit import Target, load_target, professional_target, targets_of  # noqa: E402
from eval.benchmarks import SENTIMENT, Item, choice_logprobs, fit_label_prior, load_task, score  # noqa: E402
from eval.evaluate import EvalOptions  # noqa: E402
from knowledgesg.fileio import read_json, read_jsonl, write_text  # noqa: E402
from finance_headline import SYNTHETIC_FILES, TASKS  # noqa: E402
from knowledgesg.runner import run_models  # noqa: E402
from pipelines.calibrate import labelled_items  # noqa: E402

DEFAULTS = {name: EvalOptions.model_fields[name].default for name in ("seed", "batch_size", "precision")}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", type=Path, help="finished headline runs (a pipeline run or an ablation's copy)")
    parser.add_argument("--dp", action="store_true", help="also each bank's DP adapter of the first run, calibrated to its own bank's synthetic pairs")
    parser.add_argument("--professional", type=Path, default=None, help="a finished pipeline run whose tuned professional to calibrate to the first run's synthetic pairs")
    parser.add_argument("--limit", type=int, default=400, help="test items per task (the headline's)")
    parser.add_argument("--no-finals", action="store_true", help="leave the runs' final models out (e.g. only --professional on a run's pairs)")
    parser.add_argument("--name", default="prior_calibration", help="results file stem in benchmarks/results (another epsilon's runs: another file)")
    return parser.parse_args()


def synthetic_items(run_dir: Path, clients: list[str]) -> list[Item]:
    """The labelled synthetic pairs of `clients` that the run's final tuning read, as scoring items
    (the user turn as the final tuning and evaluate write it)."""
    stage = read_json(run_dir / "stages/fedtune/manifest.json")["params"]["synthetic_stage"]
    rows = [row for client in clients for row in read_jsonl(run_dir / "stages" / stage / "clients" / client / SYNTHETIC_FILES[stage])]
    return labelled_items(rows, SENTIMENT)[0]  # as the calibrate stage reads them


@dataclass
class Calibrated:
    prior: list[float]  # the synthetic pairs' label shares
    model_prior: list[float]  # the model's mean probability of each label on the synthetic inputs
    bias: list[float]
    before: dict[str, dict]  # task -> score of the raw predictions
    after: dict[str, dict]


def calibrate(model, tokenizer, synthetic: list[Item], tests: dict[str, list[Item]]) -> Calibrated:
    """The pipeline's `calibrate` stage's fit (eval.benchmarks.fit_label_prior) on `synthetic`,
    and the test items' answers before and after its bias."""
    prior = fit_label_prior(choice_logprobs(model, tokenizer, synthetic, DEFAULTS["batch_size"], "cpu"), [item.answer for item in synthetic], SENTIMENT)
    bias = np.array(prior.bias)
    before, after = {}, {}
    for task, items in tests.items():
        raw = np.array(choice_logprobs(model, tokenizer, items, DEFAULTS["batch_size"], "cpu"))
        before[task] = score(items, raw.argmax(axis=1).tolist()).__dict__
        after[task] = score(items, (raw + bias).argmax(axis=1).tolist()).__dict__
    return Calibrated(*(np.round(v, 4).tolist() for v in (prior.shares, prior.model_mean, prior.bias)), before, after)


def mean(scores: dict[str, dict]) -> float:
    return sum(scores[t]["accuracy"] for t in TASKS) / len(TASKS)


def shares(scores: dict[str, dict], task: str) -> str:
    predicted = scores[task]["predicted"]
    return "/".join(f"{100 * predicted[label] / scores[task]['n']:.0f}" for label in SENTIMENT)


def main() -> None:
    args = parse_args()
    tests = {task: load_task(task, args.limit, DEFAULTS["seed"]) for task in TASKS}
    jobs: list[tuple[Path, Target, list[str]]] = []
    for run_dir in args.runs:
        clients = list(read_json(run_dir / "stages/ingest/partition.json")["clients"])
        for target in targets_of(run_dir, clients):
            if target.name == "final" and not args.no_finals:
                jobs.append((run_dir, target, clients))
            elif args.dp and run_dir == args.runs[0]:
                jobs.append((run_dir, target, [target.name.split(":", 1)[1]]))
    if args.professional:
        professional = professional_target(args.professional, ["tune_professional"])
        if professional is None or professional.adapter_dir is None:
            sys.exit(f"{args.professional}: no tuned professional (tune_professional did not finish there)")
        clients = list(read_json(args.runs[0] / "stages/ingest/partition.json")["clients"])
        jobs.append((args.professional, professional, clients))
    rows = []
    for run_dir, target, clients in jobs:
        started = time.perf_counter()
        model, tokenizer = load_target(run_models(run_dir, {target.model_role})[target.model_role], target.adapter_dir, "cpu", DEFAULTS["precision"])
        pairs_from = args.runs[0] if target.name == "professional" else run_dir
        result = calibrate(model, tokenizer, synthetic_items(pairs_from, clients), tests)
        rows.append((run_dir.name, target.name, result))
        print(f"{run_dir.name} {target.name}: {mean(result.before):.3f} -> {mean(result.after):.3f} ({time.perf_counter() - started:.0f} s)", flush=True)

    lines = ["# Calibrating the label prior to the synthetic data's, after the fact", "",
             f"Command: `{command()}`", f"Machine: {machine()}", f"Code: {code_version()}", "",
             f"Each model scored by label log-probability on the headline's {args.limit} seeded items per test set (float32 weights, as its evaluate stage), "
             "before and after adding b = log(pi) - log(mean p) to each label's log-probability: pi the label shares of the synthetic pairs the model is "
             "calibrated to (a final model: all banks' pairs its tuning read; a DP adapter: its own bank's), mean p the model's mean probability of each "
             "label on those pairs' inputs. Label shares predicted: negative/neutral/positive, in percent.", "",
             "| run | model | FPB | FiQA | TFNS | mean | calibrated FPB | FiQA | TFNS | calibrated mean | TFNS shares before -> after |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run, name, result in rows:
        b, a = result.before, result.after
        lines.append(f"| {run} | {name} | " + " | ".join(f"{b[t]['accuracy']:.3f}" for t in TASKS) + f" | **{mean(b):.3f}** | "
                     + " | ".join(f"{a[t]['accuracy']:.3f}" for t in TASKS) + f" | **{mean(a):.3f}** | {shares(b, 'tfns')} -> {shares(a, 'tfns')} |")
    finals = [(mean(r.before), mean(r.after)) for _, name, r in rows if name == "final"]
    if len(finals) > 1:
        before, after = [f[0] for f in finals], [f[1] for f in finals]
        lines += ["", f"Final models: mean {statistics.mean(before):.3f} (SD {statistics.stdev(before):.3f}) before, "
                      f"{statistics.mean(after):.3f} (SD {statistics.stdev(after):.3f}) after."]
    lines += ["", "Priors and biases (negative, neutral, positive):"]
    lines += [f"- {run} {name}: synthetic pairs {result.prior}, the model's mean on them {result.model_prior}, bias {result.bias}" for run, name, result in rows]
    write_result(args.name, lines)
    write_text(RESULTS / f"{args.name}.json",
        json.dumps([{"run": run, "model": name, **result.__dict__} for run, name, result in rows], indent=1))


if __name__ == "__main__":
    main()
