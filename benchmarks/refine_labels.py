"""How well does the professional model label financial sentiment, as `refine` asks it to? Public data only.

Usage:  .venv/bin/python benchmarks/refine_labels.py [--n 60] [--model gemma-3-270m]

The labelling prompt of `refine` with the demo's parameters: 6 FiQA training examples, balanced
over the labels as far as FiQA allows, in the FinGPT format; the label with the highest
log-probability wins. Scored on `--n` seeded sentences of each public training set (FiQA minus
the shots, FPB, TFNS; never the test sets the benchmarks use). Beside it, what contextual
calibration (Zhao et al. 2021, "Calibrate before use": divide by the label probabilities of
content-free inputs "N/A", "" and "[MASK]") would do; `refine` does not calibrate. Writes
benchmarks/results/refine_labels.md.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

LABELS = ["negative", "neutral", "positive"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=60, help="sentences per data set")
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import numpy as np

    from knowledgesg.builtin_data import load_builtin
    from knowledgesg.models import load_causal_lm, resolve_model
    from knowledgesg.records import InstructionRecord
    from knowledgesg.scoring import choice_logprobs, normalized_choice_probs
    from pipelines.refine import balanced_shots, label_prompt

    model, tokenizer = load_causal_lm(resolve_model(args.model))
    pool = load_builtin("fiqa_train", "fiqa")
    shots = balanced_shots(pool, LABELS, 6)
    rng = random.Random(args.seed)
    sets = {"FiQA train (minus the shots)": rng.sample([r for r in pool if r not in shots], args.n),
            "FPB train": rng.sample(load_builtin("fpb_train", "fpb"), args.n), "TFNS train": rng.sample(load_builtin("tfns_train", "tfns"), args.n)}

    def probabilities(records) -> np.ndarray:
        return normalized_choice_probs(choice_logprobs(model, tokenizer, [label_prompt(shots, r, 40) for r in records], [" " + label for label in LABELS], 8))

    content_free = [InstructionRecord(id=f"content-free/{i}", source="content-free", instruction=shots[0].instruction, input=text, response="-")
                    for i, text in enumerate(["N/A", "", "[MASK]"])]
    prior = probabilities(content_free).mean(axis=0)

    def counts(indices) -> str:
        found = Counter(int(i) for i in indices)
        return " / ".join(str(found.get(k, 0)) for k in range(len(LABELS)))

    rows = []
    for name, records in sets.items():
        gold = np.array([LABELS.index(r.response.strip().lower()) for r in records])
        probs = probabilities(records)
        raw, calibrated = probs.argmax(axis=1), (probs / prior).argmax(axis=1)
        rows.append(f"| {name} | {counts(gold)} | **{(raw == gold).mean():.3f}** | {counts(raw)} | {(calibrated == gold).mean():.3f} | {counts(calibrated)} |")
    shot_labels = Counter(s.response.strip().lower() for s in shots)
    write_result("refine_labels", [
        f"# The professional model ({args.model}) as a sentiment labeller", "",
        f"Command: `{command()}`", f"Machine: {machine()}",
        f"Shots: {len(shots)} FiQA training examples ({', '.join(f'{shot_labels.get(label, 0)} {label}' for label in LABELS)}); {args.n} sentences per set, seed {args.seed}. "
        f"Label probabilities of the content-free inputs: {', '.join(f'{label} {p:.3f}' for label, p in zip(LABELS, prior))}.", "",
        "| data set | gold negative / neutral / positive | accuracy, as refine labels | predicted | accuracy, calibrated | predicted, calibrated |",
        "|---|---|---:|---|---:|---|", *rows,
    ])


if __name__ == "__main__":
    main()
