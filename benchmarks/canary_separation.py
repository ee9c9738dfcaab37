"""How far apart are planted and unplanted canaries? A quick look at one trained run, without the whole audit.

Usage:  .venv/bin/python benchmarks/canary_separation.py RUN_DIR [--client bank_a]

Scores every canary of the run (the drop of its secret's loss from the base model to the client's
DP adapter, as `ksg audit` does), then prints per kind: the one-run bound at the declared guesses,
and how many planted canaries score above every unplanted one (what "in"-only guessing can
certify: about 95 such canaries for epsilon 3 at 95%). Used to size the design of
`audit_power.py` (epochs, canary count) before spending the hours it takes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command  # noqa: E402

from eval.audit import AuditOptions, canary_results, load_target, own_secret_nll, targets_of  # noqa: E402
from eval.canaries import read_canaries  # noqa: E402
from knowledgesg.fileio import read_json  # noqa: E402
from knowledgesg.runner import run_models  # noqa: E402


def planted_above_every_unplanted(scores: list[float], planted: list[bool]) -> int:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return next((k for k, i in enumerate(order) if not planted[i]), len(order))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--client", default="bank_a")
    args = parser.parse_args()
    print(f"command: {command()}")
    base = run_models(args.run_dir)["base"]
    spec, canaries = read_canaries(read_json(args.run_dir / "stages/ingest/clients" / args.client / "canaries.json"))
    start = time.perf_counter()
    reference, tokenizer = load_target(base, None, "cpu")
    before = own_secret_nll(reference, tokenizer, spec.template, canaries, 16, "cpu")
    del reference
    target = next(t for t in targets_of(args.run_dir, [args.client]) if t.name == f"dp_adapter:{args.client}")
    model, _ = load_target(base, target.adapter_dir, "cpu")
    after = own_secret_nll(model, tokenizer, spec.template, canaries, 16, "cpu")
    scores = [b - a for b, a in zip(before, after)]
    print(f"{len(canaries)} canaries scored on two models in {time.perf_counter() - start:.0f} s")
    results = canary_results(canaries, scores, AuditOptions(), 1e-5, spec.include_probability)
    for kind, entry in results.items():
        rows = [i for i, c in enumerate(canaries) if kind in ("all", c.kind)]
        planted = [canaries[i].included for i in rows]
        run = entry["one_run"]
        print(f"{kind}: planted {sum(planted)}/{len(rows)}, above every unplanted {planted_above_every_unplanted([scores[i] for i in rows], planted)}, "
              f"one-run bound {run['epsilon_lower_bound']} ({run['correct']}/{run['guesses']}{' in' if run['in_only'] else ''}), "
              f"TPR at 1% FPR {entry['membership']['tpr_at_1pct_fpr']:.3f}, AUC {entry['membership']['auc']:.3f}")


if __name__ == "__main__":
    main()
