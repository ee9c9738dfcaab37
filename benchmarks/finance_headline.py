"""The headline where privacy bites: finance with about a thousand records per bank, every private
alternative beside the pipeline, at the same epsilon per bank.

Usage:  .venv/bin/python benchmarks/finance_headline.py --workdir DIR [--epsilons 8] [--ablations agreement,volume] [--per-source 1800] [--limit 400] [--full-eval]

Private data: FPB and TFNS training sentences (their test sentences and repeats removed),
`--per-source` of each, split over 3 banks by Dirichlet(1.0) over labels with at least
`--min-bank` records each. Public data: FiQA's training set (872 labelled records). Runs, each a
`ksg run` of one spec (resumable: a finished run leaves `<run>.done` in the work directory, an
interrupted one resumes at its last finished stage):

- U (public only): SmolLM2 tuned without noise on FiQA's public training set, the same recipe
  as dp_train (no private record is read);
- A<eps>: dp_train at epsilon <eps> -> synthesize -> tune_professional (Gemma 3 270M on FiQA,
  public) -> refine -> fedtune on the refined data -> evaluate base, professional, DP adapters, final;
- B<eps>: A's directory copied, fedtune on the unrefined synthetic data;
- D<eps>: DP-FedAvg: fedtune on the private data with DP-SGD local steps at the same epsilon
  and about as many steps per bank as dp_train;
- C (NOT PRIVATE, upper bound): one client holding all banks' records, dp_train without noise;
- A<eps>-<ablation> (`--ablations` among ABLATIONS below): A's
  directory copied, one change (refine's label_source, twice the synthetic pairs, the final
  tuning's data: FiQA's public training set beside the refined or unrefined pairs, or
  synthesize's class balance: the DP models' own label proportions), the stages it touches rerun.

Accuracy by label log-probability on `--limit` seeded items of each test set (the same items for
every row), with standard errors (binomial per task; the mean's from the three). "Share of the gap
closed" = (pipeline - best private alternative among rows 2-4) / (NOT PRIVATE - that alternative).
`--full-eval` then scores each finished run's released models on every item of the three test
sets, by label log-probability and by parsed generation (`ksg eval --limit 0`; nothing is trained
or released again), and keeps those rows beside the run's: the report's full-test-set tables.
Writes benchmarks/results/finance_headline.md (partial results as runs finish).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, RunStore, code_version, command, machine, spec_digest, write_result  # noqa: E402
from _comparison import client_epsilon, client_sizes, count_lines, ksg  # noqa: E402

from eval.benchmarks import CALIBRATED, load_task, score as score_items  # noqa: E402
from eval.evaluate import EvalOptions  # noqa: E402
from knowledgesg.runner import run_in_progress  # noqa: E402

LABELS = ["negative", "neutral", "positive"]
TASKS = ["fpb", "fiqa", "tfns"]
TASK_NAMES = {"fpb": "FPB", "fiqa": "FiQA", "tfns": "TFNS"}
BANKS = ["bank_a", "bank_b", "bank_c"]
SEEDS = [
    {"instruction": "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}.", "domain": "finance", "task": "sentiment"},
    {"instruction": "What is the sentiment of this tweet? Please choose an answer from {negative/neutral/positive}.", "domain": "finance", "task": "sentiment"},
]
# the precisions a run's spec may name (float32: no key, as before the flag). auto: bfloat16 where
# native in the stages that train (dp_train, fedtune); auto-all: in every stage that loads a model
# but evaluate (synthesize, tune_professional, refine and calibrate too), for the time goal
PRECISIONS = ("float32", "auto", "auto-all")
MODELS = {"base": "smollm2-135m-instruct", "professional": "gemma-3-270m", "embedder": "minilm-l6-v2"}
# one change each to the pipeline's arguments, and what it asks
ABLATIONS_BEFORE_REPLICATES = {
    "agreement": ({"label_source": "agreement"}, "refine keeps only the pairs where the professional and the DP model give the same label"),
    "confident": ({"label_source": "confident"}, "refine takes the professional's label where it is at least 0.6 sure, else the DP model's"),
    "dp_labels": ({"label_source": "dp"}, "refine judges and filters the inputs but keeps the DP model's labels"),
    "dp_labels_model_prior": ({"label_source": "dp", "class_balance": "model"},
                              "refine keeps the DP model's labels, in the proportions the DP models write them (class_balance: model)"),
    "volume": ({"synthetic": 600}, "twice the synthetic pairs per bank (600)"),
    # the unrefined pairs keep the banks' tasks (FPB, TFNS) and the public row keeps FiQA: the
    # final tuning on both (fedtune's `public` pool, new in the package code after the rows above ran)
    "public": ({"final_public": True}, "the final tuning also trains on FiQA's public training set (dealt out over the banks' shares)"),
    "unrefined_public": ({"final_public": True, "final_stage": "synthesize"},
                         "the final tuning on the unrefined synthetic pairs (the DP models' own labels) and FiQA's public training set"),
    # a uniform prior makes a third of the synthetic pairs neutral, where FPB's and TFNS's test
    # sets hold about 60%: the DP models' own proportions carry the prior they learned (no cost)
    "model_prior": ({"class_balance": "model"}, "synthesize keeps the labels in the proportions the DP model writes them (its learned prior, no cost), not uniform"),
    # without tune_professional and refine, which the final tuning does not read: a copy run
    # with newer code than its A run reruns every stage but the DP release (the code version is
    # in each fingerprint), and these two take about 40 minutes
    "unrefined_model_prior": ({"class_balance": "model", "final_stage": "synthesize", "refine": False},
                              "the final tuning on the unrefined synthetic pairs (the DP models' own labels) in the proportions the DP models write them"),
    "unrefined_public_model_prior": ({"class_balance": "model", "final_stage": "synthesize", "refine": False, "final_public": True},
                                     "the final tuning on the unrefined synthetic pairs in the proportions the DP models write them, and FiQA's public training set"),
    # all 872 public records beside 900 synthetic ones pulled FPB's predictions to the public
    # prior (11% neutral against FPB's 63%) at epsilon 1; a quarter of the mix keeps FiQA's task in
    # view without outweighing the banks' (the size was set before any run of it)
    "unrefined_public300_model_prior": ({"class_balance": "model", "final_stage": "synthesize", "refine": False, "final_public": True, "public_sample": 300},
                                        "the final tuning on the unrefined synthetic pairs in the proportions the DP models write them, and 300 of FiQA's public training records"),
    # the variant above with refine back in the pipeline (it judges and filters the inputs, the
    # labels stay the DP models'): whether the whole pipeline keeps what the unrefined pairs carry
    "dp_labels_model_prior_public300": ({"label_source": "dp", "class_balance": "model", "final_public": True, "public_sample": 300},
                                        "refine keeps the DP model's labels, in the proportions the DP models write them, and the final tuning adds 300 of FiQA's public training records"),
    # refine kept 605 of the 900 pairs, so 300 public records made a third of the final tuning
    # where the unrefined variant's made a quarter, and FiQA's prior (8% neutral) pulled TFNS's
    # neutral predictions from 30% to 3-12%: the same with the public sample scaled to the kept
    # pairs (300 x 605 / 900, about 200; set before it ran)
    "dp_labels_model_prior_public200": ({"label_source": "dp", "class_balance": "model", "final_public": True, "public_sample": 200},
                                        "refine keeps the DP model's labels, in the proportions the DP models write them, and the final tuning adds 200 of FiQA's public training records (a quarter of the mix, as unrefined)"),
    # that refine dropped the pairs written under the tweet seed about twice as often as the news
    # ones (its judge and fluency scores are lower for tweets): the same, its scores centred per seed
    "dp_labels_model_prior_public300_centred": ({"label_source": "dp", "class_balance": "model", "final_public": True, "public_sample": 300, "centre_by_seed": True},
                                                "as the row before, with refine's scores centred per synthesize seed (centre_by_seed)"),
}
ABLATIONS = {**ABLATIONS_BEFORE_REPLICATES,
    # replicates of the final tuning (fedtune's own seed: initialisation, batch order, the public
    # records' dealing; the same pairs and public records): how far the final tuning alone moves
    # the mean, against which the ablations' differences (0.05 and less) are to be read
    **{f"{name}_seed{seed}": ({**ABLATIONS_BEFORE_REPLICATES[name][0], "fedtune_seed": seed}, f"{ABLATIONS_BEFORE_REPLICATES[name][1]}; fedtune replicate seed {seed}")
       for name in ("unrefined_public300_model_prior", "dp_labels_model_prior_public300") for seed in (2, 3)},
    # the replicates above moved the mean by about 0.1 with the final model's share of "neutral"
    # answers: each client's 25 Adam steps a round at 0.002 end where the last batches leave the
    # label prior. The same with a quarter of the step size (set before it ran), three replicates
    **{f"unrefined_public300_model_prior_lr0005{suffix}": ({**ABLATIONS_BEFORE_REPLICATES["unrefined_public300_model_prior"][0], "final_learning_rate": 0.0005, "fedtune_seed": seed},
                                                          f"{ABLATIONS_BEFORE_REPLICATES['unrefined_public300_model_prior'][1]}; the final tuning at learning rate 0.0005"
                                                          + (f"; fedtune replicate seed {seed}" if seed else ""))
       for suffix, seed in (("", None), ("_seed2", 2), ("_seed3", 3))},
    # nor was it steadier; the end of one run steadied by its own last rounds instead: twice the
    # rounds at about half the local steps (8 x 12 against 4 x 25, the same passes over the data),
    # the final adapter the mean of the global adapters after rounds 5-8 (fedtune `average_last`;
    # set before it ran), three replicates
    **{f"unrefined_public300_model_prior_avg{suffix}": ({**ABLATIONS_BEFORE_REPLICATES["unrefined_public300_model_prior"][0], "rounds": 8, "local_steps": 12,
                                                         "final_average_last": 4, "fedtune_seed": seed},
                                                        f"{ABLATIONS_BEFORE_REPLICATES['unrefined_public300_model_prior'][1]}; the final tuning 8 rounds x 12 local steps, "
                                                        "its adapter the mean of the global adapters after rounds 5-8" + (f"; fedtune replicate seed {seed}" if seed else ""))
       for suffix, seed in (("", None), ("_seed2", 2), ("_seed3", 3))},
    # the replicates differ mostly in the final model's label prior, and fitting it to the synthetic
    # pairs after the fact (prior_calibration.md) took the three at epsilon 4 from 0.569 (SD 0.039)
    # to 0.623 (SD 0.022): the pipeline's own `calibrate` stage after the best variant's final
    # tuning, three replicates. Its fedtune is the best variant's (the same fingerprint), so each
    # run gives both rows: the raw answers ("final") and those with the label prior ("final_calibrated")
    **{f"unrefined_public300_model_prior_calibrated{suffix}": ({**ABLATIONS_BEFORE_REPLICATES["unrefined_public300_model_prior"][0], "calibrate": True, "fedtune_seed": seed},
                                                               f"{ABLATIONS_BEFORE_REPLICATES['unrefined_public300_model_prior'][1]}, then calibrate (the final adapter's label prior "
                                                               "fitted to those synthetic pairs)" + (f"; fedtune replicate seed {seed}" if seed else ""))
       for suffix, seed in (("", None), ("_seed2", 2), ("_seed3", 3))},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True, help="runs and markers; run again with the same directory to resume")
    parser.add_argument("--epsilons", default="8", help="comma-separated, per bank (the curve: 1,2,4,8)")
    parser.add_argument("--per-source", type=int, default=1800, help="FPB and TFNS training sentences each")
    parser.add_argument("--min-bank", type=int, default=1000, help="records each bank holds at least (the Dirichlet split is redrawn until it does)")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=16, help="dp_train's expected Poisson batch")
    parser.add_argument("--synthetic", type=int, default=300, help="synthetic pairs per bank")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=25)
    parser.add_argument("--limit", type=int, default=400, help="test items per task")
    parser.add_argument("--label-source", default="professional", choices=["professional", "agreement", "confident"])
    parser.add_argument("--ablations", default="", help="comma-separated changes to the pipeline, each a copy of a finished A<eps> run with only that "
                                                       f"changed (its DP adapters reused, never redrawn): {', '.join(ABLATIONS)}; `stored`: every ablation the store holds")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="with --only: dp_train's and fedtune's base weights in the runs it names that are not copies (auto: bfloat16 where the CPU runs "
                             "it natively, 1.7x faster dp_train there: demo_precision.md; auto-all: also synthesize, tune_professional, refine and calibrate); a copy runs at its A's, every other run at the precision it "
                             "was started or stored at")
    parser.add_argument("--full-eval", action="store_true", help="score each finished run here on the whole test sets in both answer modes (`ksg eval --limit 0 "
                        "--modes logprob,generation`, no new training) and keep those rows beside the run's in the store; then the report")
    parser.add_argument("--only", default=None, help="comma-separated runs to do now (U, P, A8, B8, D8, C); default all")
    parser.add_argument("--early-eval", default=None, help="a run (e.g. A8) whose base model and DP adapters to score now with `ksg eval`, "
                                                          "beside a benchmark still running it; then write the report and stop")
    parser.set_defaults(final_public=False, public_sample=None, final_stage="refine", class_balance="uniform", refine=True, centre_by_seed=False, fedtune_seed=None, final_learning_rate=0.002,
                        final_average_last=None, calibrate=False)  # the final tuning's data, as in row 6 (the ablations change them)
    return parser.parse_args()


def private_data(args) -> dict:
    return {"data": [{"builtin": "fpb_train", "sample": args.per_source}, {"builtin": "tfns_train", "sample": args.per_source}],
            "partition": {"method": "dirichlet", "alpha": 1.0, "label_field": "response", "names": BANKS, "min_client_records": args.min_bank}}


def precision(args) -> dict:
    """The training precision's spec key: none for float32, so the specs (and digests) of the runs
    stored before the flag existed stay what they were."""
    return {} if args.precision in (None, "float32") else {"precision": "auto"}


def model_precision(args) -> dict:
    """The precision key of the stages that sample, judge or score with a model (and of the
    professional's tuning): bfloat16 where native with auto-all only, so auto's runs stay as stored."""
    return {"precision": "auto"} if args.precision == "auto-all" else {}


def dp_train(args) -> dict:
    return {"name": "dp_train", "params": {"loss_on": "all", "epochs": args.epochs, "batch_size": args.batch_size, "max_physical_batch": 16,
                                           "max_length": 128, "learning_rate": 0.002, "clip_norm": 1.0, **precision(args)}}


def evaluate(args, models: list[str]) -> dict:
    return {"name": "evaluate", "params": {"tasks": TASKS, "modes": ["logprob"], "models": models, "limit": args.limit, "fidelity": False}}


def spec(args, name: str, epsilon: float, clients: dict, stages: list) -> dict:
    return {"name": f"headline-{name}", "seed": args.seed, "models": MODELS, "clients": clients,
            "privacy": {"target_epsilon": epsilon, "unit": "record"}, "stages": ["prepare_models", "ingest", *stages]}


def fedtune(args, synthetic_stage: str) -> dict:
    sample = {"sample": args.public_sample} if args.public_sample else {}
    public = {"public": {"builtin": "fiqa_train", **sample}} if args.final_public else {}
    replicate = {"seed": args.fedtune_seed} if args.fedtune_seed is not None else {}
    tail = {"average_last": args.final_average_last} if args.final_average_last else {}
    return {"name": "fedtune", "params": {"engine": "local", "synthetic_stage": synthetic_stage, "rounds": args.rounds, "rule": {"name": "fedavg"}, **public, **replicate, **tail,
                                          "training": {"steps": args.local_steps, "batch_size": 8, "max_length": 128, "learning_rate": args.final_learning_rate,
                                                       "loss_on": "response", **precision(args)}}}


def synthesis(args) -> list[dict]:
    """synthesize, and unless `args.refine` is off, tune_professional and refine."""
    stages = [
        {"name": "synthesize", "params": {"per_client": args.synthetic, "oversample": 2.0, "labels": LABELS, "class_balance": args.class_balance, "seeds": SEEDS,
                                          "sampling": {"max_new_tokens": 48, "temperature": 0.9, "top_p": 0.95}, "response_max_new_tokens": 8,
                                          "min_words": 5, "max_words": 60, "batch_size": 32, **model_precision(args)}},
        {"name": "tune_professional", "params": {"data": {"builtin": "fiqa_train"}, "epochs": 2, "batch_size": 8, "learning_rate": 0.001, "max_length": 128, **model_precision(args)}},
        {"name": "refine", "params": {"pool": {"builtin": "fiqa_train"}, "labels": LABELS, "shots": 6, "threshold": 0.5, "min_fluency": -6.5, "label_source": args.label_source,
                                      "task": "financial sentiment analysis: a single news headline or tweet about markets or companies",
                                      **({"centre_by_seed": True} if args.centre_by_seed else {}), **model_precision(args)}},
    ]
    return stages if args.refine else stages[:1]


def calibration(args) -> list[dict]:
    """The calibrate stage where the run asks for it: the final adapter's label prior, fitted to the
    synthetic pairs the final tuning read; evaluate then scores both answers."""
    return [{"name": "calibrate", "params": {"labels": LABELS, **model_precision(args)}}] if args.calibrate else []


def eps_name(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def plan(args) -> dict[str, dict]:
    """Every run's spec by name, in the order they run (the most telling first), each at its own
    training precision: a run --only names at --precision; else the precision of the run started
    in the work directory, else of the one the store holds, else float32. A copy (B, an ablation)
    runs on its A's directory, so it runs at A's precision; one the store holds keeps its own."""
    by_precision = {p: plan_at(argparse.Namespace(**{**vars(args), "precision": p})) for p in PRECISIONS}
    only = set(args.only.split(",")) if args.only else set()

    def started_here(name: str) -> str | None:
        started = started_spec(args.workdir, name)
        return next((p for p in PRECISIONS if by_precision[p][name] == started), None)

    def precision_of(name: str) -> str:
        source = copied_from(name)
        if source is not None:
            return (None if name in only else started_here(name) or stored_measurement(args, name)[0]) or precision_of(source)
        if name in only and args.precision:
            return args.precision
        return started_here(name) or stored_measurement(args, name)[0] or "float32"

    return {name: by_precision[precision_of(name)][name] for name in by_precision["float32"]}


def plan_at(args) -> dict[str, dict]:
    """Every run's spec by name at one training precision (`args.precision`)."""
    public = {"data": [{"builtin": "fiqa_train"}], "partition": {"method": "iid", "names": ["public"]}}
    runs = {"U": spec(args, "public", math.inf, public, [dp_train(args), evaluate(args, ["dp"])]),
            # rows 1 and 3 on their own (each A run scores them too): nothing trained on a client's
            # records, no epsilon, so one run gives them to the full test sets at every epsilon. The
            # stages need a client; not FiQA's training set, the professional's public data (refused as
            # a client's): twenty public TFNS sentences nothing reads past ingest
            "P": spec(args, "public-models", math.inf, {"data": [{"builtin": "tfns_train", "sample": 20}], "partition": {"method": "iid", "names": ["placeholder"]}},
                      [synthesis(args)[1], evaluate(args, ["base", "professional"])])}
    pooled = dict(private_data(args), partition={"method": "iid", "names": ["pooled"]})
    for i, epsilon in enumerate(float(e) for e in args.epsilons.split(",")):
        e = eps_name(epsilon)
        runs[f"A{e}"] = spec(args, f"pipeline-{e}", epsilon, private_data(args),
                             [dp_train(args), *synthesis(args), fedtune(args, "refine"), evaluate(args, ["base", "professional", "dp", "final"])])
        runs[f"B{e}"] = spec(args, f"pipeline-{e}", epsilon, private_data(args), [dp_train(args), *synthesis(args), fedtune(args, "synthesize"), evaluate(args, ["final"])])
        if i == 0:
            # the upper bound right after the first pipeline rows: it runs in one piece (one
            # client's dp_train), while DP-FedAvg below resumes from its last finished round
            runs["C"] = spec(args, "nonprivate-pooled", math.inf, pooled, [dp_train(args), evaluate(args, ["dp"])])
        steps = max(1, round(args.epochs * args.min_bank / args.batch_size / args.rounds))
        runs[f"D{e}"] = spec(args, f"dp-fedavg-{e}", epsilon, private_data(args), [
            {"name": "fedtune", "params": {"engine": "local", "data": "private", "rounds": args.rounds, "rule": {"name": "fedavg"},
                                           "local_dp": {"target_epsilon": epsilon, "clip_norm": 1.0},
                                           "training": {"steps": steps, "batch_size": args.batch_size, "max_length": 128, "learning_rate": 0.002, "loss_on": "all", **precision(args)}}},
            evaluate(args, ["final"])])
        for ablation in filter(None, args.ablations.split(",")):
            changed = argparse.Namespace(**{**vars(args), **ABLATIONS[ablation][0]})
            runs[f"A{e}-{ablation}"] = spec(args, f"pipeline-{e}", epsilon, private_data(args),
                                            [dp_train(args), *synthesis(changed), fedtune(changed, changed.final_stage), *calibration(changed), evaluate(args, ["final"])])
    return runs


def finished(workdir: Path, name: str, spec_: dict | None = None) -> bool:
    """A run is finished when its marker holds the digest of the spec it finished with (other
    arguments make another spec, which `ksg run` resumes from the stages they leave alike)."""
    marker = workdir / f"{name}.done"
    return marker.is_file() and (spec_ is None or marker.read_text() == spec_digest(spec_))


def started_spec(workdir: Path, name: str) -> dict | None:
    """The spec a run was started with in the work directory (`run` writes it before `ksg run`), or None."""
    path = workdir / f"{name}.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def released(workdir: Path, name: str, spec_: dict) -> bool:
    """Whether a pipeline run's DP adapters are made here, so a copy may start from its directory:
    the run finished, or it was started with this spec and its dp_train finished (manifest and
    ledger written); and no `ksg run` is in its directory now (a copy would catch a stage half-written).
    So an ablation need not wait for the rest of A (synthesize, refine, fedtune, evaluate)."""
    run_dir = workdir / name
    made = finished(workdir, name, spec_) or (started_spec(workdir, name) == spec_
                                              and all((run_dir / "stages/dp_train" / f).is_file() for f in ("manifest.json", "ledger.json")))
    return made and not run_in_progress(run_dir)


def copied_from(name: str) -> str | None:
    """The run whose directory this one starts from: A<eps> for B<eps> and for A<eps>-<ablation>."""
    if name.startswith("B"):
        return f"A{name[1:]}"
    if name.startswith("A") and "-" in name:
        return name.split("-")[0]
    return None


def ledger_release_ids(run_dir: Path) -> list[str] | None:
    """The release ids of the DP adapters in a run directory's dp_train ledger (None: none there)."""
    ledger = run_dir / "stages/dp_train/ledger.json"
    return sorted(e["release_id"] for e in json.loads(ledger.read_text())) if ledger.is_file() else None


def dp_releases(args, name: str, spec_: dict) -> list[str] | None:
    """The DP adapters a pipeline run (A<eps>, or a copy of one) is built on: from its directory
    when it finished here, else as stored (None: not known, e.g. stored before they were kept)."""
    if finished(args.workdir, name, spec_):
        return ledger_release_ids(args.workdir / name)
    entry = STORE.entry(name, spec_)
    return entry.get("dp_releases") if entry else None


def on_earlier_adapters(args, name: str, specs: dict[str, dict]) -> bool:
    """A copied run (B<eps>, an ablation) whose rows were measured on DP adapters other than its
    source's now: its source was measured again after it, so the two do not belong together.
    Where either side's adapters are not known, the store's order decides: the source measured
    again (it keeps earlier measurements) and saved after the copy, or with no time to tell."""
    source = copied_from(name)
    if source is None or name not in specs or source not in specs or not run_rows(args, name, specs):
        return False
    mine, theirs = dp_releases(args, name, specs[name]), dp_releases(args, source, specs[source])
    if theirs is None and not finished(args.workdir, source, specs[source]):  # A measured again at another precision: its stored rows are shown
        theirs = (stored_measurement(args, source)[1] or {}).get("dp_releases")
    if mine is not None and theirs is not None:
        return mine != theirs
    copy, original = STORE.entry(name, specs[name]), STORE.entry(source, specs[source])
    if copy is None or original is None or not original.get("earlier"):
        return False
    return copy.get("saved_at") is None or original.get("saved_at") is None or copy["saved_at"] < original["saved_at"]


def stale_mark(args, name: str, specs: dict[str, dict]) -> str:
    """What a row's label says when its run is on other DP adapters than its source's rows shown:
    another draw's (earlier, or later and not finished here), or the A being measured again here (whose own rows are its last measurement's
    until it finishes)."""
    if not on_earlier_adapters(args, name, specs):
        return ""
    source = copied_from(name)
    measuring = ledger_release_ids(args.workdir / source) if not finished(args.workdir, source, specs[source]) else None
    if measuring is not None and dp_releases(args, name, specs[name]) == measuring:
        return f" (on the DP adapters of the {source} being measured again here, not those of its rows shown)"
    return f" (on another draw of DP adapters than the {source} rows shown)"


def backfill_dp_release_ids(args, specs: dict[str, dict]) -> None:
    """Into each stored pipeline run (A, B, ablation) that lacks them, the ids of its DP adapters,
    read from its directory here when that is the stored measurement (runs saved before the ids
    were kept): so a later session, without this directory, still tells which rows belong together."""
    for name, spec_ in specs.items():
        entry = STORE.entry(name, spec_)
        if not name.startswith(("A", "B")) or entry is None or "dp_releases" in entry or not finished(args.workdir, name, spec_):
            continue
        if is_stored_measurement(args, name, spec_, entry):
            STORE.add(name, spec_, entry, dp_releases=ledger_release_ids(args.workdir / name))


def run(args, name: str, spec_: dict, times: dict) -> None:
    workdir: Path = args.workdir
    if finished(workdir, name, spec_):
        return
    run_dir = workdir / name
    source = copied_from(name)
    if source and not (run_dir / "stages").is_dir():
        # A's stages are reused where this run leaves them alike: a copy of an A whose DP adapters
        # are made (without them this run would draw its own, a second release of the banks' data)
        if not released(workdir, source, plan(args)[source]):
            print(f"run {name} waits for {source}'s DP adapters" + (f" (its results are in {STORE.path.name}, but its directory is not in {workdir}: run it here with --only {source})"
                                                                    if source in STORE.runs() else ""), flush=True)
            return
        shutil.copytree(workdir / copy_source(args, name, spec_), run_dir)
        drop_unused_stages(run_dir, spec_)
    elif name.startswith("A") and not (run_dir / "stages").is_dir():
        shared = share_professional(workdir, run_dir)
        if shared:
            (run_dir / SHARED).write_text(json.dumps({"from": shared, "finished_at": professional_finished_at(run_dir)}))
            print(f"run {name}: tune_professional from {shared} (public data only; `ksg run` reruns it unless its fingerprint matches)", flush=True)
    print(f"[{time.strftime('%H:%M:%S')}] run {name}", flush=True)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec_, sort_keys=False))
    seconds = ksg("run", str(path), "--run-dir", str(run_dir))
    times[name] = round(times.get(name, 0) + seconds, 1)
    (workdir / "times.json").write_text(json.dumps(times, indent=1))
    (workdir / f"{name}.done").write_text(spec_digest(spec_))
    shared = json.loads((run_dir / SHARED).read_text()) if (run_dir / SHARED).is_file() else None
    kept = shared is not None and shared["finished_at"] == professional_finished_at(run_dir)  # not rerun: the copy's manifest
    STORE.save(name, spec_, times[name], rows={k: asdict(v) for k, v in rows_of(name, results(args, name, spec_)).items()},
               **({"note": f"its tune_professional is {shared['from']}'s (public data, the same fingerprint: kept), so its time leaves that stage out"} if kept else {}),
               details=details(workdir / name) if name.startswith("A") else [],
               **({"dp_releases": ledger_release_ids(workdir / name)} if name.startswith(("A", "B")) else {}),
               **({"synthetic_pairs": synthetic_pairs(args, name, spec_)} if name.startswith("A") else {}))


def stage_name(stage: dict | str) -> str:
    return stage if isinstance(stage, str) else stage["name"]


def stage_entry(spec_: dict, name: str) -> dict | str | None:
    return next((stage for stage in spec_["stages"] if stage_name(stage) == name), None)


def copy_source(args, name: str, spec_: dict) -> str:
    """The finished run here whose directory a copy starts from: its A, or a finished ablation of
    that A on the same DP adapters with the same dp_train and synthesize and more stages alike (on
    the same adapters and seed synthesize writes the same pairs; copying them saves its 17 minutes,
    nothing else changes). Ties go to A."""
    source = copied_from(name)
    specs = plan(args)

    def alike(other: str) -> int:
        return sum(stage_entry(specs[other], stage) == stage_entry(spec_, stage) for stage in stage_names(spec_))

    adapters = ledger_release_ids(args.workdir / source)
    candidates = [other for other in specs if other.startswith(f"{source}-") and other != name and finished(args.workdir, other, specs[other])
                  and all(stage_entry(specs[other], stage) == stage_entry(spec_, stage) for stage in ("dp_train", "synthesize"))
                  and ledger_release_ids(args.workdir / other) == adapters]
    return max([source, *candidates], key=alike)  # max keeps the first of equals: A


def stage_names(spec_: dict) -> list[str]:
    return [stage_name(stage) for stage in spec_["stages"]]


def drop_unused_stages(run_dir: Path, spec_: dict) -> None:
    """From a copied run directory, the stages its spec leaves out (an ablation without refine):
    their artifacts would read as this run's. A stage that holds a ledger is never removed."""
    names = set(stage_names(spec_))
    for stage_dir in sorted((run_dir / "stages").iterdir()):
        if stage_dir.name not in names and not (stage_dir / "ledger.json").exists():
            shutil.rmtree(stage_dir)


SHARED = "shared_professional.json"  # in a run directory: whose tune_professional was copied in, and its manifest's time


def professional_finished_at(run_dir: Path) -> str | None:
    manifest = run_dir / "stages/tune_professional/manifest.json"
    return json.loads(manifest.read_text())["finished_at"] if manifest.is_file() else None


def share_professional(workdir: Path, run_dir: Path) -> str | None:
    """Into a new pipeline run at another epsilon, the professional another run in the work
    directory tuned: it reads public data only and the same spec sections at every epsilon, and
    its fingerprint does not follow dp_train's (`Stage.reads`), so `ksg run` keeps it where the
    code and parameters are the same and reruns it where they are not. The run it came from, or None."""
    for other in sorted(workdir.glob("A*/stages/tune_professional/manifest.json")):
        source = other.parents[2]
        if source != run_dir:
            (run_dir / "stages").mkdir(parents=True)
            shutil.copytree(other.parent, run_dir / "stages/tune_professional")
            return source.name
    return None


def results(args, name: str, spec_: dict) -> dict:
    """A finished run's evaluation (a B copied from A holds A's until its own evaluate ran). Before
    it finishes, `ksg eval` of its released models (`--early-eval`: the same items and mode) stands in."""
    path = args.workdir / name / "stages/evaluate/results.json"
    if finished(args.workdir, name, spec_):
        return json.loads(path.read_text())["models"] if path.is_file() else {}
    early = args.workdir / name / "eval/eval_report.json"
    # an ablation's copy holds A's eval directory, not its own; and --full-eval leaves another limit there
    if not (early.is_file() and name.startswith("A") and "-" not in name):
        return {}
    report = json.loads(early.read_text())
    return report["models"] if report["options"]["limit"] == args.limit and "logprob" in report["options"]["modes"] else {}


def early_eval(args, name: str) -> None:
    """`ksg eval` of a run's base model and DP adapters while the run goes on (rows 1 and 4a
    before the pipeline's own evaluate stage): the same tasks, items and mode."""
    run_dir = args.workdir / name
    if (run_dir / "eval/eval_report.json").is_file() or not (run_dir / "stages/dp_train/manifest.json").is_file():
        return
    ksg("eval", str(run_dir), "--models", "base,dp", "--tasks", ",".join(TASKS), "--modes", "logprob", "--limit", str(args.limit))


@dataclass(frozen=True)
class RowScore:
    """One row's accuracy per task, their mean and the mean's standard error, and the mean of the
    tasks' macro-F1 (None in rows stored before it was kept: they show "n/a")."""

    acc: dict[str, float]
    mean: float
    se: float
    f1: float | None = None

    def cells(self) -> str:
        f1 = "n/a" if self.f1 is None else f"{self.f1:.3f}"
        return " | ".join(f"{self.acc[t]:.3f}" for t in TASKS) + f" | **{self.mean:.3f}** +- {self.se:.3f} | {f1}"


def score(entry: dict | list[dict], mode: str = "logprob") -> RowScore:
    """Accuracy per task with binomial standard errors; a list (the banks' DP adapters) is
    averaged, and as its models are scored on the same items their errors are not independent, so
    the mean's SE is taken as the mean of theirs (an upper bound), not divided by sqrt(3).
    Macro-F1 (mean over labels, so a model that never says "neutral" loses a third of it) is
    averaged over the tasks and the list the same way."""
    entries = entry if isinstance(entry, list) else [entry]
    acc = {t: 0.0 for t in TASKS}
    se = {t: 0.0 for t in TASKS}
    f1 = 0.0
    for one in entries:
        for task in TASKS:
            s = one["tasks"][task][mode]
            acc[task] += s["accuracy"] / len(entries)
            se[task] += math.sqrt(s["accuracy"] * (1 - s["accuracy"]) / s["n"]) / len(entries)
            f1 += s["macro_f1"] / len(entries) / len(TASKS)
    return RowScore(acc, sum(acc.values()) / len(acc), math.sqrt(sum(v * v for v in se.values())) / len(se), round(f1, 4))


def rows_of(name: str, models: dict, mode: str = "logprob") -> dict[str, RowScore]:
    """The table rows a finished run gives, by row number ("final" for an ablation's pipeline)."""
    picked: dict[str, dict | list[dict] | None]
    if name == "U":
        picked = {"2": models.get("dp_adapter:public")}
    elif name == "P":
        picked = {"1": models.get("base"), "3": models.get("professional")}
    elif name == "C":
        picked = {"7": models.get("dp_adapter:pooled")}
    elif name.startswith("D"):
        picked = {"4b": models.get("final")}
    elif name.startswith("B"):
        picked = {"5": models.get("final")}
    elif "-" in name:
        final = models.get("final")
        calibrated = final is not None and all(CALIBRATED in final["tasks"][t] for t in TASKS)
        return {"final": score(final, mode), **({"final_calibrated": score(final, CALIBRATED)} if calibrated and mode == "logprob" else {})} if final else {}
    else:
        dp = [models[f"dp_adapter:{bank}"] for bank in BANKS if f"dp_adapter:{bank}" in models] or None
        picked = {"1": models.get("base"), "3": models.get("professional"), "4a": dp, "6": models.get("final")}
    return {number: score(entry, mode) for number, entry in picked.items() if entry}


# finished runs' rows, details and wall clock (see RunStore)
STORE = RunStore(RESULTS / "finance_headline_runs.json")


FULL_MODES = ["logprob", "generation"]


def full_eval(args, name: str, spec_: dict) -> None:
    """`ksg eval` of a finished run's released models (those its evaluate stage scored) on every
    item of the three test sets, by label log-probability and by parsed generation. Scoring
    released models again trains nothing and releases nothing; the rows join the run's entry."""
    entry = STORE.entry(name, spec_)
    if not finished(args.workdir, name, spec_) or entry is None:
        print(f"run {name}: not finished here, so not scored on the full test sets", flush=True)
        return
    if "full_rows" in entry:
        return
    if not is_stored_measurement(args, name, spec_, entry):
        # e.g. a run measured again here while the store still holds the measurement before it
        print(f"run {name}: the run here is not the measurement the store holds, so not scored on the full test sets", flush=True)
        return
    run_dir = args.workdir / name
    models = next(stage["params"]["models"] for stage in spec_["stages"] if isinstance(stage, dict) and stage["name"] == "evaluate")
    report_path = run_dir / "eval/eval_report.json"
    if full_report_here(report_path, models):  # made by an invocation stopped before it stored the rows: not scored again
        print(f"run {name}: its models' scores on the full test sets are in {report_path} already", flush=True)
        seconds = None
    else:
        print(f"[{time.strftime('%H:%M:%S')}] run {name}: its models on the full test sets", flush=True)
        seconds = ksg("eval", str(run_dir), "--models", ",".join(models), "--tasks", ",".join(TASKS), "--modes", ",".join(FULL_MODES), "--limit", "0",
                      "--no-fidelity")
    report = json.loads(report_path.read_text())["models"]
    scored = next(entry["tasks"] for entry in report.values() if "tasks" in entry)  # not a mean over clients' entry
    STORE.add(name, spec_, entry, full_rows={mode: {k: asdict(v) for k, v in rows_of(name, report, mode).items()} for mode in FULL_MODES},
              full_items={t: scored[t]["logprob"]["n"] for t in TASKS}, full_eval_seconds=None if seconds is None else round(seconds, 1))


def full_report_here(path: Path, models: list[str]) -> bool:
    """Whether `ksg eval` left there the full-test-set scores `full_eval` asks for."""
    if not path.is_file():
        return False
    options = json.loads(path.read_text()).get("options", {})
    return options.get("limit") is None and options.get("modes") == FULL_MODES and options.get("tasks") == TASKS and options.get("models") == models and not options.get("fidelity")


def measured_rows(rows: dict[str, RowScore]) -> dict[str, tuple]:
    """What identifies a measurement's rows (macro-F1 aside: rows stored before it was kept lack it)."""
    return {k: (v.acc, v.mean, v.se) for k, v in rows.items()}


def is_stored_measurement(args, name: str, spec_: dict, entry: dict) -> bool:
    """The run's directory here gives the rows of the store's entry: the same measurement (a run
    measured again has the same spec and other noise, so the spec alone does not tell)."""
    return measured_rows(rows_of(name, results(args, name, spec_))) == measured_rows({k: RowScore(**v) for k, v in entry["rows"].items()})


def full_table(args, e: str, specs: dict[str, dict]) -> list[str]:
    """The rows scored on the full test sets, one table per answer mode; [] before any is."""
    names = [n for n in ("P", "U", f"A{e}", f"B{e}", f"D{e}", "C") if n in specs] + [n for n in specs if n.startswith(f"A{e}-")]
    entries = {n: STORE.entry(n, specs[n]) for n in names}
    entries = {n: v for n, v in entries.items() if v and "full_rows" in v}
    if not entries:
        return []
    sizes = ", ".join(f"{t} {n}" for t, n in next(iter(entries.values()))["full_items"].items())
    lines = [f"### epsilon {e}, every item of the test sets ({sizes})", "",
             "Accuracy and macro-F1 by label log-probability and by parsed generation (greedy, 12 new tokens; an answer naming no label counts as wrong). "
             "Rows not listed have not been scored on the full sets yet.", ""]
    for mode in FULL_MODES:
        lines += [f"By {'label log-probability' if mode == 'logprob' else 'parsed generation'}:", "",
                  "| row | model | FPB | FiQA | TFNS | mean +- SE | macro-F1 |", "|---|---|---|---|---|---|---|"]
        for name, entry in entries.items():
            for number, value in entry["full_rows"][mode].items():
                label = ROW_LABELS[number].format(e=e) if number in ROW_LABELS else f"6 with one change: {ABLATIONS[name.split('-', 1)[1]][1]}"
                label += "; the final adapter answering with its label prior" if number == "final_calibrated" else ""
                label += stale_mark(args, name, specs)
                lines.append(f"| {number if number in ROW_LABELS else name} | {label} | {RowScore(**value).cells()} |")
        lines.append("")
    return lines + full_gap_lines(entries)


def full_gap_lines(entries: dict[str, dict]) -> list[str]:
    """The share of the gap closed on the full test sets (log-probability), for row 6 and each
    ablation scored there, over the best private alternative among rows 2-4 scored there too
    (named, since a row not scored on the full sets yet cannot be the best)."""
    means = {number: RowScore(**value).mean for entry in entries.values() for number, value in entry["full_rows"]["logprob"].items() if number in ROW_LABELS}
    alternatives = {k: means[k] for k in ("2", "3", "4a", "4b") if k in means}
    if "7" not in means or not alternatives:
        return []
    best = max(alternatives, key=alternatives.get)
    if means["7"] <= alternatives[best]:
        return [f"Share of the gap closed on the full test sets: none to close (row {best} {alternatives[best]:.3f} is at or above NOT PRIVATE's {means['7']:.3f}).", ""]
    lines = []
    for name, entry in entries.items():
        for number, value in entry["full_rows"]["logprob"].items():
            if number in ("6", "final", "final_calibrated"):
                mean = RowScore(**value).mean
                which = "row 6" if number == "6" else name + (", answering with its label prior" if number == "final_calibrated" else "")
                lines.append(f"- {which}: ({mean:.3f} - row {best} {alternatives[best]:.3f}) / (row 7 {means['7']:.3f} - row {best}) = **{(mean - alternatives[best]) / (means['7'] - alternatives[best]):.0%}**")
    if not lines:
        return []
    missing = [k for k in ("2", "3", "4a", "4b") if k not in alternatives]
    return ["Share of the gap closed on the full test sets (log-probability), over the best private alternative scored there"
            + (f" (rows {', '.join(missing)} not scored on them yet)" if missing else "") + ":", *lines, ""]


def run_rows(args, name: str, specs: dict[str, dict]) -> dict[str, RowScore]:
    """A run's rows: from its directory here when it has finished, else from the store, else (a
    first measurement under way) from its early `ksg eval`. A run measured again shows the stored
    measurement until the new one finishes: rows of two measurements are never mixed."""
    if name not in specs:
        return {}
    entry = STORE.entry(name, specs[name]) or stored_measurement(args, name)[1]
    if finished(args.workdir, name, specs[name]) or entry is None:
        return rows_of(name, results(args, name, specs[name]))
    return {k: RowScore(**v) for k, v in entry["rows"].items()}


def stored_measurement(args, name: str) -> tuple[str | None, dict | None]:
    """(the training precision, the store's entry) of a run's stored measurement, at whichever
    precision it ran (its spec differs by that key only): a run measured again here at another
    precision shows it until the new one finishes. (None, None) where the store holds none."""
    for precision in PRECISIONS:
        spec_ = plan_at(argparse.Namespace(**{**vars(args), "precision": precision})).get(name)
        entry = STORE.entry(name, spec_) if spec_ is not None else None
        if entry is not None:
            return precision, entry
    return None, None


ROW_LABELS = {
    "1": "base model (SmolLM2-135M-Instruct), no tuning",
    "2": "public only: tuned on FiQA's public training set, no private record",
    "3": "professional model (Gemma 3 270M tuned on FiQA, public), evaluated directly",
    "4a": "each bank's own DP adapter at epsilon {e} (mean over banks)",
    "4b": "DP-FedAvg: federated DP-SGD on the private data at epsilon {e}",
    "5": "synthetic data from the DP models, unrefined, federated",
    "6": "full pipeline: synthesize, refine, fedtune",
    "7": "NOT PRIVATE: one model on the pooled private data (upper bound)",
}


def row_scores(args, e: str, specs: dict[str, dict]) -> dict[str, RowScore]:
    """Every row measured so far at one epsilon, by row number."""
    found: dict[str, RowScore] = {}
    for name in ("U", f"A{e}", f"B{e}", f"D{e}", "C"):
        for number, value in run_rows(args, name, specs).items():
            found.setdefault(number, value)
    return found


def table(args, e: str, specs: dict[str, dict]) -> tuple[list[str], dict[str, float]]:
    lines = ["| row | model | FPB | FiQA | TFNS | mean +- SE | macro-F1 |", "|---|---|---|---|---|---|---|"]
    found = row_scores(args, e, specs)
    for number, label in ROW_LABELS.items():
        label = label.format(e=e) + (stale_mark(args, f"B{e}", specs) if number == "5" else "")
        lines.append(f"| {number} | {label} | {found[number].cells()} |" if number in found else f"| {number} | {label} | not run yet | | | | |")
    return lines, {k: v.mean for k, v in found.items()}


def constant_answer_line(args) -> str:
    """What one label given to every item scores on the same seeded test items evaluate draws: the
    floor of a model that learned a label prior and nothing else. "neutral" is most of FPB's and
    TFNS's items, so the mean of accuracies rewards it: each row's macro-F1 belongs beside its mean."""
    items = {task: load_task(task, args.limit, EvalOptions.model_fields["seed"].default) for task in TASKS}
    parts = []
    for label in LABELS:
        scores = {task: score_items(task_items, [item.choices.index(label) for item in task_items]) for task, task_items in items.items()}
        mean, f1 = (sum(getattr(s, field) for s in scores.values()) / len(scores) for field in ("accuracy", "macro_f1"))
        parts.append(f"{label} {mean:.3f} (" + ", ".join(f"{TASK_NAMES[t]} {s.accuracy:.3f}" for t, s in scores.items()) + f"; macro-F1 {f1:.3f})")
    return "One answer to every test item, no model: " + "; ".join(parts) + "."



def gap_line(means: dict[str, float]) -> str:
    alternatives = {k: means[k] for k in ("2", "3", "4a", "4b") if k in means}
    if "6" not in means or "7" not in means or len(alternatives) < 4:
        return "Share of the gap closed: needs rows 2-4, 6 and 7."
    best = max(alternatives, key=alternatives.get)
    if means["7"] <= alternatives[best]:
        return f"Share of the gap closed: none to close (row {best} {alternatives[best]:.3f} is at or above NOT PRIVATE's {means['7']:.3f})."
    share = (means["6"] - alternatives[best]) / (means["7"] - alternatives[best])
    return f"Share of the gap closed: (row 6 {means['6']:.3f} - row {best} {alternatives[best]:.3f}) / (row 7 {means['7']:.3f} - row {best}) = **{share:.0%}**."


def ablation_table(args, e: str, specs: dict[str, dict]) -> list[str]:
    """The full pipeline (row 6) beside each ablation's final model, with what refine kept."""
    ablations = list(filter(None, args.ablations.split(",")))
    if not ablations:
        return []
    lines = [f"### Ablations at epsilon {e}: one change each to the full pipeline, its DP adapters reused", "",
             "| pipeline | FPB | FiQA | TFNS | mean +- SE | macro-F1 | synthetic pairs the final tuning reads |", "|---|---|---|---|---|---|---|"]
    not_run = []  # listed by name under the table: a row for each ablation not run at this epsilon hid the ones that ran
    for name, label in [(f"A{e}", "as in row 6"), *((f"A{e}-{a}", ABLATIONS[a][1]) for a in ablations)]:
        found = run_rows(args, name, specs)
        value = found.get("6" if name == f"A{e}" else "final")
        if value is None and name != f"A{e}":
            not_run.append(f"`{name.removeprefix(f'A{e}-')}`")
            continue
        if value is None:
            lines.append(f"| {label} | not run yet | | | | | |")
            continue
        stage = final_stage(specs[name])
        count = synthetic_pairs(args, name, specs[name]).get(stage, "not kept")
        lines.append(f"| {label}{stale_mark(args, name, specs)} | {value.cells()} | {count} ({stage}) |")
        if "final_calibrated" in found:
            lines.append(f"| the same final adapter answering with its label prior (calibrate){stale_mark(args, name, specs)} | {found['final_calibrated'].cells()} | {count} ({stage}) |")
    found_lines = {name: run_label_lines(args, name, specs[name]) for name in (f"A{e}-{a}" for a in ablations)}
    priors = [f"- {name}: " + " ".join(lines) for name, lines in found_lines.items() if lines]
    if not_run:
        lines += ["", f"Not run at epsilon {e} yet: {', '.join(not_run)}."]
    return [*lines, "", *(["Label priors of the ablations (kept since the predictions were):", *priors, ""] if priors else [])]


def run_label_lines(args, name: str, spec_: dict) -> list[str]:
    """`label_lines` of a run: from its directory when it finished here, else as stored."""
    if finished(args.workdir, name, spec_):
        return label_lines(args.workdir / name)
    entry = STORE.entry(name, spec_)
    return [line for line in (entry or {}).get("details", []) if line.startswith(("Labels of", "Predicted labels"))]


SYNTHETIC_FILES = {"synthesize": "synthetic.jsonl", "refine": "refined.jsonl"}


def final_stage(spec_: dict) -> str:
    """The stage whose synthetic pairs the run's fedtune trains on."""
    return next(stage["params"]["synthetic_stage"] for stage in spec_["stages"] if isinstance(stage, dict) and stage["name"] == "fedtune")


def synthetic_pairs(args, name: str, spec_: dict) -> dict[str, int]:
    """Synthetic pairs per stage (synthesize, refine) in a pipeline run: counted in its directory
    when it finished here, else as stored."""
    if finished(args.workdir, name, spec_):
        return {stage: count_lines(args.workdir / name, stage, file) for stage, file in SYNTHETIC_FILES.items()}
    entry = STORE.entry(name, spec_)
    return entry.get("synthetic_pairs", {}) if entry else {}


def details(run_dir: Path) -> list[str]:
    """What a pipeline run did: the banks' sizes and composed epsilons, synthetic pairs, refine and tune_professional."""
    lines = []
    if (run_dir / "stages/ingest/partition.json").is_file():
        sizes = client_sizes(run_dir)
        lines.append("Banks' records: " + ", ".join(f"{k} {v}" for k, v in sizes.items()) + ".")
        eps = ", ".join(f"{bank} {client_epsilon(run_dir, bank):.2f}" for bank in BANKS) if (run_dir / "stages/dp_train/ledger.json").is_file() else "dp_train not finished"
        lines.append(f"Composed epsilon per bank in run {run_dir.name} (every release in its ledger): {eps}.")
    if (run_dir / "stages/synthesize").is_dir() and count_lines(run_dir, "synthesize", "synthetic.jsonl"):
        lines.append(f"Synthetic pairs kept by synthesize: {count_lines(run_dir, 'synthesize', 'synthetic.jsonl')}; "
                     f"after refine: {count_lines(run_dir, 'refine', 'refined.jsonl') or ('not run yet' if (run_dir / 'stages/refine').is_dir() else 'no refine in this run')}.")
    summary = run_dir / "stages/refine/summary.json"
    if summary.is_file():
        clients = json.loads(summary.read_text())["clients"]
        lines.append("Refine per bank: " + "; ".join(f"{k}: kept {v['kept']} of {v['candidates']}, labels changed {v['labels_changed']}, dropped {v['dropped_by_reason']}"
                                                      for k, v in clients.items()) + ".")
    tuned = run_dir / "stages/tune_professional/summary.json"
    if tuned.is_file():
        t = json.loads(tuned.read_text())
        lines.append(f"tune_professional: {t['steps']} steps on {t['records']} public FiQA records, loss {t['first_loss']:.3f} -> {t['last_loss']:.3f}.")
    return lines + label_lines(run_dir)


def shares(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    return " / ".join(f"{counts.get(label, 0) / total:.0%}" for label in LABELS) if total else "none"


def label_lines(run_dir: Path) -> list[str]:
    """The label prior along the run, as negative / neutral / positive shares: the synthetic pairs
    (synthesize, refine) and each model's predictions on the test items beside their truth."""
    lines = []
    for stage, file in SYNTHETIC_FILES.items():
        rows = [json.loads(line) for path in sorted((run_dir / "stages" / stage / "clients").glob(f"*/{file}")) for line in path.read_text().splitlines() if line]
        if rows:
            lines.append(f"Labels of the synthetic pairs after {stage} (negative / neutral / positive): {shares(Counter(r.get('response') for r in rows))} of {len(rows)}.")
    evaluated = run_dir / "stages/evaluate/results.json"
    models = json.loads(evaluated.read_text())["models"] if evaluated.is_file() else {}
    for model, entry in models.items():
        scores = {task: entry["tasks"][task]["logprob"] for task in TASKS if "predicted" in entry.get("tasks", {}).get(task, {}).get("logprob", {})}
        if scores:
            lines.append(f"Predicted labels of {model} (negative / neutral / positive; the test items' truth in parentheses): "
                         + "; ".join(f"{task.upper() if task != 'fiqa' else 'FiQA'} {shares(s['predicted'])} (truth {shares(s['truth'])})" for task, s in scores.items()) + ".")
    return lines


def run_details(args, e: str, specs: dict[str, dict]) -> list[str]:
    name = f"A{e}"
    if finished(args.workdir, name, specs[name]):  # an unfinished run here (measured again) has not replaced the stored one yet
        return details(args.workdir / name)
    entry = STORE.entry(name, specs[name])
    return entry["details"] if entry else []


# the pipeline as it runs best so far (finance_headline_notes.md: "Replicates of the final tuning"), plotted beside
# the rows: each replicate of its final tuning a dot, their mean the line
BEST_VARIANT = "unrefined_public300_model_prior"
BEST_VARIANT_REPLICATES = ("", "_seed2", "_seed3")
CALIBRATED_VARIANT = f"{BEST_VARIANT}_calibrated"  # the same final tuning, then the calibrate stage


# every stored measurement of a replicated variant, on every draw of DP adapters: the curve draws
# them, finance_replicates.py tabulates them
REPLICATE = re.compile(r"_seed(\d+)$")
CALIBRATED_SUFFIX = "_calibrated"  # the variants with the calibrate stage after their final tuning
LABEL_PRIOR_ANSWERS = " (answers with its label prior)"  # a calibrated run's answers with its label prior, as a variant of their own


@dataclass
class Replicate:
    draw: str  # the work directory and the first DP release id: which DP adapters
    variant: str
    seed: str  # fedtune's replicate seed ("spec" when unset: the spec's seed alone)
    row: RowScore

    def cells(self) -> str:
        return f"| {self.draw} | {self.variant} | {self.seed} | {self.row.cells()} |"


def stored_replicates(store: Path) -> list[Replicate]:
    """Every stored measurement of a variant that has `_seed<N>` replicates (at any epsilon: one
    run at a new epsilon is that variant's first replicate there), one per run name and draw (a
    run measured again on the same draw counts once, its latest), by draw then name."""
    runs = json.loads(store.read_text())["runs"] if store.is_file() else {}

    def variant_of(name: str) -> str:  # without the epsilon's run and the replicate seed: A8-x_seed2 -> x
        return REPLICATE.sub("", name).split("-", 1)[-1]

    replicated = {variant_of(name) for name in runs if REPLICATE.search(name)}
    measured: dict[tuple[str, str], dict] = {}
    for name, entry in runs.items():
        if "-" not in name or variant_of(name) not in replicated:
            continue
        for m in [*entry.get("earlier", []), entry]:  # oldest first: a later one on the same draw replaces it
            if "final" in m.get("rows", {}) and m.get("dp_releases"):
                measured[(name, sorted(m["dp_releases"])[0])] = m
    draw_number: dict[str, int] = {}  # a draw's number: the order in which its first measurement was saved
    for (_, release), m in sorted(measured.items(), key=lambda item: item[1]["saved_at"]):
        draw_number.setdefault(release, len(draw_number) + 1)

    def seed(name: str) -> str:
        match = REPLICATE.search(name)
        return match.group(1) if match else "spec"

    ordered = sorted(measured.items(), key=lambda item: (draw_number[item[0][1]], REPLICATE.sub("", item[0][0]), seed(item[0][0]) != "spec", seed(item[0][0])))
    replicates = []
    for (name, release), m in ordered:
        draw, variant = f"draw {draw_number[release]} ({release[:8]})", REPLICATE.sub("", name)
        if variant.endswith(CALIBRATED_SUFFIX):
            # the calibrate stage runs after the variant's own fedtune (the same fingerprint): its raw
            # answers are a replicate of that variant, its answers with the label prior a variant of their own;
            # where the plain variant ran on the same draw with the same seed, that is the same final
            # tuning, counted once (the plain run's)
            raw = Replicate(draw, variant.removesuffix(CALIBRATED_SUFFIX), seed(name), RowScore(**m["rows"]["final"]))
            if not any((r.draw, r.variant, r.seed) == (raw.draw, raw.variant, raw.seed) for r in replicates):
                replicates.append(raw)
            if "final_calibrated" in m["rows"]:
                replicates.append(Replicate(draw, f"{variant}{LABEL_PRIOR_ANSWERS}", seed(name), RowScore(**m["rows"]["final_calibrated"])))
        else:
            replicates.append(Replicate(draw, variant, seed(name), RowScore(**m["rows"]["final"])))
    return replicates


def best_variant_points(args, epsilons: list[str], specs: dict[str, dict], variant: str = BEST_VARIANT, row: str = "final") -> list[tuple[float, list[float]]]:
    """(epsilon, the final models' means) of a variant's replicates measured at each epsilon: the
    newest measurement of each name in --ablations, as the ablation tables show them (`row`:
    "final_calibrated" for the answers with the label prior); `variant_draws` has every draw."""
    points = []
    for e in epsilons:
        means = [value.mean for suffix in BEST_VARIANT_REPLICATES
                 if (value := run_rows(args, f"A{e}-{variant}{suffix}", specs).get(row)) is not None]
        if means and e != "inf":
            points.append((float(e), means))
    return points


def variant_draws(e: str, variant: str) -> list[list[float]]:
    """Each DP draw's replicate means of a variant at epsilon e, from every stored measurement
    (earlier draws too, whose run directories may be gone), in the order the draws were measured."""
    by_draw: dict[str, list[float]] = {}
    for run in stored_replicates(STORE.path):
        if run.variant == f"A{e}-{variant}":
            by_draw.setdefault(run.draw, []).append(run.row.mean)
    return list(by_draw.values())


def draws_mean(draws: list[list[float]]) -> float:
    """The mean over draws of each draw's replicate mean: a draw with more replicates counts once."""
    return statistics.mean(statistics.mean(d) for d in draws)


def variant_lines(args, e: str, specs: dict[str, dict], means: dict[str, float]) -> list[str]:
    """The best variant's replicates at one epsilon, raw and with the label prior, and over every
    stored draw of DP adapters: their mean, SD and share of the gap closed over the best private
    alternative (rows 2-4)."""
    if e == "inf":
        return []
    alternatives = {k: means[k] for k in ("2", "3", "4a", "4b") if k in means}

    def share(mean: float) -> str:
        if len(alternatives) < 4 or "7" not in means or means["7"] <= max(alternatives.values()):
            return ""
        best = max(alternatives, key=alternatives.get)
        return f"; share of the gap closed over row {best} ({alternatives[best]:.3f}): **{(mean - alternatives[best]) / (means['7'] - alternatives[best]):.0%}**"

    lines = []
    for variant, row, label in ((BEST_VARIANT, "final", "Best variant (unrefined pairs, model prior, 300 public)"),
                                (CALIBRATED_VARIANT, "final", "Its calibrated runs' final adapters, raw answers"),
                                (CALIBRATED_VARIANT, "final_calibrated", "The same adapters with their label prior (calibrate)")):
        found = dict(best_variant_points(args, [e], specs, variant, row)).get(float(e))
        if not found:
            continue
        mean = statistics.mean(found)
        spread = f", SD {statistics.stdev(found):.3f}" if len(found) > 1 else ""
        lines.append(f"- {label}{stale_mark(args, f'A{e}-{variant}', specs)}: " + ", ".join(f"{m:.3f}" for m in found) + f" ({len(found)} replicate{'s' if len(found) > 1 else ''}): mean **{mean:.3f}**{spread}{share(mean)}.")
    draws = variant_draws(e, BEST_VARIANT)
    if len(draws) > 1:
        per_draw = [statistics.mean(d) for d in draws]
        lines.append(f"- Best variant over {len(draws)} draws of DP adapters (every stored measurement, calibrated runs' raw answers included; finance_replicates.md): "
                     "each draw's replicate mean (replicates) " + ", ".join(f"{m:.3f} ({len(d)})" for m, d in zip(per_draw, draws))
                     + f": mean **{draws_mean(draws):.3f}**, SD {statistics.stdev(per_draw):.3f} between draws{share(draws_mean(draws))}.")
    return [*lines, ""] if lines else []


def plot_curve(args, epsilons: list[str], specs: dict[str, dict], path: Path) -> bool:
    """Mean accuracy against epsilon for the rows that depend on it and the best variant's
    replicates, with the rows that do not as lines across; False (and no file) with fewer than two
    epsilons finished."""
    curves: dict[str, list[tuple[float, float]]] = {}
    flat: dict[str, float] = {}
    for e in epsilons:
        x = math.inf if e == "inf" else float(e)
        for number, value in row_scores(args, e, specs).items():
            if number == "5" and on_earlier_adapters(args, f"B{e}", specs):
                continue  # not of this epsilon's pipeline run any more
            if number in ("1", "2", "3", "7"):
                flat[number] = value.mean
            else:
                curves.setdefault(number, []).append((x, value.mean))
    variant = [(float(e), draws) for e in epsilons if e != "inf" and (draws := variant_draws(e, BEST_VARIANT))]
    calibrated = [(float(e), draws) for e in epsilons if e != "inf" and (draws := variant_draws(e, CALIBRATED_VARIANT + LABEL_PRIOR_ANSWERS))]
    if max((len(points) for points in [*curves.values(), variant, calibrated]), default=0) < 2:
        return False
    matplotlib.use("Agg")
    finite = sorted({x for points in curves.values() for x, _ in points if not math.isinf(x)} | {x for x, _ in [*variant, *calibrated]})
    position = {x: i for i, x in enumerate(finite)}
    fig, ax = plt.subplots(figsize=(8, 5))
    for number, points in sorted(curves.items()):
        points = sorted(p for p in points if not math.isinf(p[0]))
        ax.plot([position[x] for x, _ in points], [y for _, y in points], marker="o", label=f"{number}: {ROW_LABELS[number].format(e='e')}")
    for points, label in ((variant, "best variant: unrefined pairs, model prior, 300 public"),
                          (calibrated, "the best variant with its label prior (calibrate stage)")):
        if points:
            label += " (mean over DP draws of each draw's replicate mean; dots: each replicate)"
            line = ax.plot([position[x] for x, _ in points], [draws_mean(draws) for _, draws in points], marker="s", linewidth=2, label=label)[0]
            ax.scatter([position[x] for x, draws in points for d in draws for _ in d], [m for _, draws in points for d in draws for m in d],
                       s=14, color=line.get_color(), alpha=0.6)
    for number, y in sorted(flat.items()):
        ax.axhline(y, linestyle="--", linewidth=1, color="grey" if number != "7" else "black")
        ax.text(1.0, y, f" {number}", va="center", fontsize=8, transform=ax.get_yaxis_transform())  # right of the axes, clear of the points
    ax.set_xticks(range(len(finite)), [f"{x:g}" for x in finite])
    ax.set_xlabel("epsilon per bank (delta 1e-6 each)")
    ax.set_ylabel("mean accuracy, FPB / FiQA / TFNS")
    ax.set_title("The headline against epsilon (dashed: rows that spend no budget, and NOT PRIVATE)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1)  # below the axes: inside, it hid the lines
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def report(args) -> None:
    specs = plan(args)
    lines = ["# The headline: finance at about a thousand records per bank, every private alternative beside the pipeline", "",
             f"Command: `{command()}` (from `{Path.cwd()}`)", f"Machine: {machine()}", f"Package code in the working directory, which a `ksg` run started by this command imports: {code_version()} (each finished run's own is listed at the end)", "",
             f"{args.per_source} FPB + {args.per_source} TFNS training sentences (test sentences removed) over 3 banks, Dirichlet(1.0) over labels, "
             f"at least {args.min_bank} each; dp_train {args.epochs:g} epochs, expected batch {args.batch_size}, LoRA r=8 on q,v, loss on the whole turn; "
             f"{args.synthetic} synthetic pairs per bank; refine label_source {args.label_source}; fedtune {args.rounds} rounds x {args.local_steps} local steps; accuracy by label log-probability "
             f"on {args.limit} seeded items per test set (FinLoRA's FPB and FiQA test files, TFNS's validation split), the same items for every row; "
             "SE: binomial per task, the mean's from the three (row 4a: the mean of the banks' SEs, as they share test items); macro-F1: the mean of the three tasks' "
             "(n/a: a row stored before it was kept). "
             "DP-FedAvg runs as many local DP-SGD steps per bank as dp_train gives the smallest bank.", ""]
    for e in [eps_name(float(x)) for x in args.epsilons.split(",")]:
        rows, means = table(args, e, specs)
        lines += [f"## epsilon {e} per bank (delta at most 1e-5 and 1/(100 N), rounded down to a power of ten: 1e-6 for banks of 1,000-9,999 records, as here)", "", *rows, "", gap_line(means), "", constant_answer_line(args), "", *run_details(args, e, specs), ""]
        lines += ablation_table(args, e, specs)
        lines += variant_lines(args, e, specs, means)
        lines += full_table(args, e, specs)
    curve = RESULTS / "finance_headline_curve.png"
    if plot_curve(args, [eps_name(float(x)) for x in args.epsilons.split(",")], specs, curve):
        lines += [f"![mean accuracy against epsilon]({curve.name})", ""]
    lines += [f"Where each run was measured ({STORE.path.name} keeps every finished run's rows; a run measured on another machine is read from there):"]
    for name in specs:
        # the store records the code each finished run imported; the checkout running this report may be newer
        entry = STORE.entry(name, specs[name])
        if entry:
            trained_at = "; trained at precision auto (bfloat16 base weights where native)" if '"precision"' in json.dumps(specs[name]) else ""
            lines.append(f"- {name}: {entry['seconds']:.0f} s, {entry['code']}, {entry['machine']}{trained_at}" + (f"; {entry['note']}" if entry.get("note") else ""))
        precision, earlier = (None, None) if entry else stored_measurement(args, name)
        if earlier:
            lines.append(f"- {name}: {earlier['seconds']:.0f} s, {earlier['code']}, {earlier['machine']}; trained at precision {precision}, "
                         "its rows shown until its measurement at another precision finishes")
        if (args.workdir / name).is_dir() and not finished(args.workdir, name, specs[name]):
            lines.append(f"- {name}: {'measured again here, ' if entry or earlier else ''}not finished yet")
    lines.append("(A run resumed over several invocations adds their times; other jobs may have shared the 2 cores.)")
    repeats = [f"- {name}, measured before with {entry['code']}: " + "; ".join(f"row {k} {RowScore(**v).mean:.3f} +- {RowScore(**v).se:.3f}" for k, v in entry["rows"].items())
               for name, now in STORE.runs().items() for entry in now.get("earlier", [])]
    if repeats:
        lines += ["", "Earlier measurements of runs measured again (a DP run draws new noise each time: a second sample; the tables show the newest):", *repeats]
    write_result("finance_headline", lines)


def with_stored_ablations(ablations: str) -> str:
    """`--ablations` with the name `stored` replaced by every ablation the store holds a
    measurement of (at any epsilon), in the order ABLATIONS defines them: the report shows every
    ablation run, including the ones that did not help, without a command naming thirty."""
    named = list(filter(None, ablations.split(",")))
    if "stored" not in named:
        return ablations
    held = {name.split("-", 1)[1] for name in STORE.runs() if name.startswith("A") and "-" in name}
    named.remove("stored")
    return ",".join([*named, *(a for a in ABLATIONS if a in held and a not in named)])


def main() -> None:
    args = parse_args()
    if "stored" in args.ablations.split(",") and not args.only:
        sys.exit("--ablations stored: give --only too (e.g. --only none for the report): without it every stored ablation not finished here would run")
    args.ablations = with_stored_ablations(args.ablations)
    unknown = set(filter(None, args.ablations.split(","))) - set(ABLATIONS)
    if unknown:
        sys.exit(f"--ablations: unknown {', '.join(sorted(unknown))} (known: {', '.join(ABLATIONS)})")
    if args.precision and not args.only:
        sys.exit("--precision: give --only too (the runs to start at that precision; the others keep theirs)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    times = json.loads((args.workdir / "times.json").read_text()) if (args.workdir / "times.json").is_file() else {}
    if args.early_eval:
        early_eval(args, args.early_eval)
        report(args)
        return
    only = set(args.only.split(",")) if args.only else None
    backfill_dp_release_ids(args, plan(args))
    if args.full_eval:
        for name, spec_ in plan(args).items():
            if only is None or name in only:
                full_eval(args, name, spec_)
                report(args)
        return
    for name, spec_ in plan(args).items():
        if only is not None and name not in only:
            continue
        # a run the store already holds is not measured again, unless named in --only
        if only is None and STORE.entry(name, spec_) and not (args.workdir / name).is_dir():
            print(f"run {name}: in {STORE.path.name} already (pass --only {name} to run it again here)", flush=True)
            continue
        run(args, name, spec_, times)
        report(args)
    report(args)


if __name__ == "__main__":
    main()
