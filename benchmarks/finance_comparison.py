"""The headline comparison, finance: does the pipeline beat the obvious private alternatives?

Usage:  .venv/bin/python benchmarks/finance_comparison.py [--per-source 150] [--limit 100] [--workdir DIR]

Private data: FPB and TFNS training sentences (their test sentences removed), `--per-source` of
each, split over 3 banks (Dirichlet 1.0 over labels), with 32 canaries planted in bank_a (each
with probability 1/2, 4 copies) and 10 sentences per bank held out for membership inference.
Three runs of the same spec, differing only where the row says:

- A (epsilon 8): dp_train -> synthesize -> refine -> fedtune on the refined data -> evaluate;
- B: A's directory copied, fedtune on the unrefined synthetic data (earlier stages are cached);
- C (NOT PRIVATE): dp_train with no noise -> evaluate.

Rows: base model; non-private fine-tuning (C, each bank's adapter, mean over banks); DP
fine-tuning at epsilon 8 evaluated directly (A, the same); synthetic data without refinement (B,
the federated adapter); the full pipeline (A, the federated adapter). Accuracy by label
log-probability on `--limit` seeded items of each test set (the same items for every row).
Exposure: mean over planted canaries on the row's model (bank_a's adapter, or the federated
one). PII: values found in the private data that the row's model replays and the base model
does not. Epsilon: bank_a's composed total from the ledger. Writes
benchmarks/results/finance_comparison.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402
from _comparison import AUDITED_MODELS, add_run_arguments, audit_argv, count_lines, per_client_table, run_three, table  # noqa: E402

LABELS = ["negative", "neutral", "positive"]
TASKS = ["fpb", "fiqa", "tfns"]
SEEDS = [
    {"instruction": "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}.", "domain": "finance", "task": "sentiment"},
    {"instruction": "What is the sentiment of this tweet? Please choose an answer from {negative/neutral/positive}.", "domain": "finance", "task": "sentiment"},
]


def base_spec(args, name: str, epsilon: float) -> dict:
    return {
        "name": f"finance-{name}", "seed": args.seed,
        "models": {"base": "smollm2-135m-instruct", "professional": "gemma-3-270m", "embedder": "minilm-l6-v2"},
        "clients": {"data": [{"builtin": "fpb_train", "sample": args.per_source}, {"builtin": "tfns_train", "sample": args.per_source}],
                    "partition": {"method": "dirichlet", "num_clients": 3, "alpha": 1.0, "label_field": "response", "names": ["bank_a", "bank_b", "bank_c"]}},
        "privacy": {"target_epsilon": epsilon, "unit": "record"},
        "audit": {"canaries": {"client": "bank_a", "count": 32, "repeats": 4, "digits": 6}, "holdout_per_client": 10},
        "stages": ["prepare_models", "ingest",
                   {"name": "dp_train", "params": {"loss_on": "all", "epochs": args.epochs, "batch_size": 8, "max_length": 128, "learning_rate": 0.002, "clip_norm": 1.0}}],
    }


def evaluate(args, models: list[str]) -> dict:
    return {"name": "evaluate", "params": {"tasks": TASKS, "modes": ["logprob"], "models": models, "limit": args.limit, "fidelity": True}}


def synthesis_stages(args, synthetic_stage: str) -> list[dict]:
    return [
        {"name": "synthesize", "params": {"per_client": args.synthetic, "oversample": 2.5, "labels": LABELS, "class_balance": "uniform", "seeds": SEEDS,
                                          "sampling": {"max_new_tokens": 48, "temperature": 0.9, "top_p": 0.95}, "response_max_new_tokens": 8,
                                          "min_words": 5, "max_words": 60}},
        {"name": "refine", "params": {"pool": {"builtin": "fiqa_train"}, "labels": LABELS, "shots": 6, "threshold": 0.5, "min_fluency": -6.5,
                                      "task": "financial sentiment analysis: a single news headline or tweet about markets or companies"}},
        {"name": "fedtune", "params": {"engine": "local", "synthetic_stage": synthetic_stage, "rounds": args.rounds, "rule": {"name": "fedavg"},
                                       "training": {"steps": args.local_steps, "batch_size": 8, "max_length": 128, "learning_rate": 0.002, "loss_on": "response"}}},
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-source", type=int, default=150)
    add_run_arguments(parser, synthetic=40, seed=42, mia_members=60)
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="finance-comparison-"))
    audits = audit_argv(args)
    runs, times = run_three(workdir, lambda name, eps: base_spec(args, name, eps), lambda stage: synthesis_stages(args, stage),
                            lambda models: evaluate(args, models), 8.0, audits)
    write_result("finance_comparison", [
        "# Finance: the pipeline against the obvious private alternatives", "",
        f"Command: `{command()}`", f"Machine: {machine()}", f"Seed {args.seed}; {args.per_source} FPB + {args.per_source} TFNS training sentences over 3 banks; "
        f"{count_lines(runs['A'], 'synthesize', 'synthetic.jsonl')} synthetic pairs kept by synthesize, {count_lines(runs['A'], 'refine', 'refined.jsonl')} after refine; "
        f"fedtune {args.rounds} rounds x {args.local_steps} local steps; accuracy by label log-probability on {args.limit} seeded test items per task.", "",
        f"Audit: `ksg audit RUN --models M {' '.join(audits)}` with M = {AUDITED_MODELS}." if audits else "Audit: not run.", "",
        "| row | FPB | FiQA | TFNS | mean | synthetic texts with a private 8-word span | canary exposure (planted, bits of 19.9) | PII replays beyond base | epsilon (bank_a) |",
        "|---|---|---|---|---|---|---|---|---|", *table(runs, TASKS, "bank_a", 8.0, audits is not None), "", "Each client's own adapter (the DP and NOT PRIVATE rows are their means):", "", *per_client_table(runs, TASKS),
        "", "Times (wall clock; other jobs shared the 2 cores for much of it, so these are not speed figures):", *[f"- {k}: {v:.0f} s" for k, v in times.items()],
    ])


if __name__ == "__main__":
    main()
