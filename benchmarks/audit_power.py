"""Does the audit have power? The same data and canaries, trained without privacy and at epsilon 1, 4 and 8.

Usage:  .venv/bin/python benchmarks/audit_power.py --workdir DIR [--records 600] [--holdout 500] [--canaries 600] [--kinds rare_words] [--epochs 6] [--in-guesses 120] [--seed 10]

One client holds FPB training sentences plus canaries ("Customer <name> confirmed the wire
transfer with security code <secret>."): designed ones of 4 rare words (`--kinds rare_words`, the
default) and, with `--kinds digits,rare_words`, random 6-digit secrets too; `--canaries` of each,
each planted once with probability 1/2 (the one-run design).
`--holdout` further sentences are held out as non-members. SmolLM2-135M-Instruct gets a LoRA
adapter with loss on the whole sequence (as the demo trains its synthesizing model), with no
noise (NOT PRIVATE) and with DP-SGD calibrated to epsilon 1, 4 and 8; everything else is
identical. Then `ksg audit` on each.

Resumable: every run lives in DIR and `ksg run` caches finished stages; a finished audit is kept
(audit/audit_report.json), so running the same command again picks up where it stopped. A
finished row (its table lines, times, code and machine) goes to
benchmarks/results/audit_power_runs.json, which is committed: a later session, on a machine
without DIR, reads it and runs only the rows it lacks (`--only nonprivate,eps8` measures those
again). The results file is rewritten after each row with the rows done so far.
Writes benchmarks/results/audit_power.md.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, RunStore, command, machine, write_result  # noqa: E402
from _comparison import ksg  # noqa: E402

from eval.audit import CANARY_SCORE  # noqa: E402

EPSILONS = (math.inf, 8.0, 4.0, 1.0)  # the rows that decide the goals first


def result_name(variant: str | None) -> str:
    """The results file's name (without .md); a variant design's is its own, so its rows never displace the main table's."""
    return f"audit_power_{variant}" if variant else "audit_power"


def store_for(variant: str | None) -> RunStore:
    """Finished rows (see RunStore), beside the results file; an entry belongs to the spec, the
    audit's arguments and the canary score it ran."""
    return RunStore(RESULTS / f"{result_name(variant)}_runs.json")


def label(epsilon: float) -> str:
    return "NOT PRIVATE" if math.isinf(epsilon) else f"epsilon {epsilon:g}"


def short_name(epsilon: float) -> str:
    return "nonprivate" if math.isinf(epsilon) else f"eps{epsilon:g}"


def spec_for(epsilon: float, args) -> dict:
    return {
        "name": f"audit-power-{short_name(epsilon)}",
        "seed": args.seed,
        "models": {"base": "smollm2-135m-instruct"},
        "clients": {"data": [{"builtin": "fpb_train", "sample": args.records}], "partition": {"method": "iid", "num_clients": 1, "names": ["bank_a"]}},
        "privacy": {"target_epsilon": epsilon},
        "audit": {"canaries": {"client": "bank_a", "count": args.canaries, "kinds": args.kinds.split(","), "repeats": 1, "digits": 6, "words": 4},
                  "holdout_per_client": args.holdout},
        "stages": ["prepare_models", "ingest", {"name": "dp_train", "params": {
            "loss_on": "all", "epochs": args.epochs, "batch_size": 8, "max_length": 96, "learning_rate": args.lr, "clip_norm": 1.0}}],
    }


def measured(epsilon: float, args) -> dict:
    """What a row's figures depend on: its spec, the audit's arguments and the canary score."""
    return {"spec": spec_for(epsilon, args), "audit": audit_args(args), "score": CANARY_SCORE}


def audit_args(args) -> list[str]:
    # float32 scoring: the designs scored in bfloat16 (ap4, ap5) put fewer planted canaries among the top scores than the one scored in float32 (ap3)
    declared = ["--in-guesses", str(args.in_guesses)] if args.in_guesses else []
    return ["--candidates", "100", "--exposure-canaries", "8", "--samples", "4", "--mia-members", "100", "--pii-spans", "0", "--bootstrap", "1000", "--models", "dp",
            "--precision", "float32", *declared]


def run_row(epsilon: float, args, timings: dict) -> dict:
    spec = spec_for(epsilon, args)
    spec_path = args.workdir / f"{spec['name']}.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    run_dir = args.workdir / spec["name"]
    report_path = run_dir / "audit/audit_report.json"
    if spec["name"] not in timings:
        timings[spec["name"]] = {"run_s": round(ksg("run", str(spec_path), "--run-dir", str(run_dir)), 1)}
    # an audit from before the canary score changed is redone on the same trained model
    if "audit_s" not in timings[spec["name"]] or json.loads(report_path.read_text())["canaries"].get("score") != CANARY_SCORE:
        timings[spec["name"]]["audit_s"] = round(ksg("audit", str(run_dir), *audit_args(args)), 1)
    (args.workdir / "timings.json").write_text(json.dumps(timings, indent=1))
    return json.loads(report_path.read_text())


def ci(interval: list[float] | None) -> str:
    return f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""


def canary_rows(epsilon: float, report: dict) -> list[str]:
    section = report["canaries"]
    target = section["targets"]["dp_adapter:bank_a"]
    claimed = target["claimed"]["epsilon"]
    rows = []
    for kind, entry in target["kinds"].items():
        run, member = entry["one_run"], entry["membership"]
        exposure = f"{entry['mean_exposure_planted']} / {entry['mean_exposure_not_planted']}"
        rows.append(f"| {label(epsilon)} | {'inf' if claimed is None or math.isinf(claimed) else f'{claimed:.2f}'} | {kind} | {entry['planted']}/{entry['canaries']} | "
                    f"{run['correct']}/{run['guesses']}{' in' if run.get('in_only') else ''} | **{run['epsilon_lower_bound']:.3f}** | {run['largest_certifiable']:.2f} | "
                    f"{member['tpr_at_1pct_fpr']:.3f}{ci(member.get('tpr_at_1pct_fpr_ci'))} | {member['auc']:.3f}{ci(member.get('auc_ci'))} | {exposure} | "
                    f"{entry['greedy_extracted_planted']}/{entry['tried_planted']} |")
    return rows


def mia_rows(epsilon: float, report: dict) -> list[str]:
    entry = report["membership_inference"]["dp_adapter:bank_a|bank_a"]
    return [f"| {label(epsilon)} | {entry['members']}/{entry['non_members']} | {name} | {r['auc']:.3f}{ci(r.get('auc_ci'))} | "
            f"{r['tpr_at_1pct_fpr']:.3f}{ci(r.get('tpr_at_1pct_fpr_ci'))} | {r['tpr_at_0_1pct_fpr']:.3f}{ci(r.get('tpr_at_0_1pct_fpr_ci'))}"
            f"{'' if r['tpr_at_0_1pct_fpr_measurable'] else ' (at 0 FPR)'} |"
            for name, r in entry["scores"].items()]


def designed_against_random(epsilon: float, report: dict) -> str | None:
    kinds = report["canaries"]["targets"]["dp_adapter:bank_a"]["kinds"]
    if not {"digits", "rare_words"} <= set(kinds):
        return None
    random_tpr, designed_tpr = kinds["digits"]["membership"]["tpr_at_1pct_fpr"], kinds["rare_words"]["membership"]["tpr_at_1pct_fpr"]
    ratio = "inf" if random_tpr == 0 and designed_tpr > 0 else ("n/a" if random_tpr == 0 else f"{designed_tpr / random_tpr:.1f}x")
    return f"| {label(epsilon)} | {random_tpr:.3f} | {designed_tpr:.3f} | {ratio} |"


def designed_table(rows: list[str | None]) -> list[str]:
    rows = [r for r in rows if r is not None]
    if not rows:
        return ["Designed against random canaries: this design plants rare-word canaries only; the comparison is in the earlier designs below (14.8x and 43.5x).", ""]
    return ["## Designed against random canaries: TPR at 1% FPR", "", "| training | random digits | rare words | ratio |", "|---|---|---|---|", *rows, ""]


# What the earlier designs gave (kept: an ablation that did not reach the goal is still a result)
EARLIER = [
    "## Earlier designs (what led to this one)", "",
    "| design | command | NOT PRIVATE one-run bound, rare words | all canaries | TPR at 1% FPR rare words / digits | planted rare-word canaries above every unplanted one |",
    "|---|---|---|---|---|---|",
    "| 2 epochs, 700 records (500 held out), 250 canaries of each kind; score: the loss of the text from the secret to the end; guesses half in, half out at 5-100% | "
    "`benchmarks/audit_power.py --workdir /tmp/ap` at commit 6b508ab | 1.138 (45/50) | 0.876 | 0.331 / 0.009 | not measured |",
    "| the same adapter, scored on the secret's own tokens, with \"in\"-only guesses declared | `benchmarks/canary_separation.py /tmp/ap/audit-power-nonprivate` | "
    "1.611 (48/50 in) | 1.599 | 0.370 / 0.000 | 33 of 127 |",
    "| pilot: 4 epochs, 60 FPB records, 40 canaries of each kind, otherwise as above | `ksg run` on that spec, then `benchmarks/canary_separation.py RUN` | "
    "1.013 (16/16 in; 40 canaries certify little) | 1.008 | 0.864 / 0.250 | 19 of 22 |",
    "| 4 epochs, 600 records (500 held out), 400 canaries of each kind, secret-token score, \"in\" guesses; rare words drawn with replacement across canaries | "
    "`benchmarks/audit_power.py --workdir /tmp/ap2` at commit 7219a36 (NOT PRIVATE row only; rare-word AUC 0.910, MIA AUC 0.79-0.85) | 2.118 (78/80 in) | 2.100 | 0.264 / 0.016 | 35 of 201 |",
    "| the same with the rare words disjoint across canaries (float32 scoring) | `benchmarks/audit_power.py --workdir /tmp/ap3 --canaries 400` at commit f33769c (NOT PRIVATE row only; "
    "rare-word AUC 0.940, MIA AUC 0.82-0.89) | 2.784 (119/120 in) | 2.687 | 0.705 / 0.016 | 119 of 207 |",
    "| the same with 600 canaries of each kind (bfloat16 scoring; `ksg run` 1609 s and `ksg audit` 1445 s beside other jobs) | `benchmarks/audit_power.py --workdir /work/bench/ap4 --kinds digits,rare_words` "
    "at commit 8f496b1 (NOT PRIVATE row only; rare-word AUC 0.800, digits 0.514, MIA AUC 0.72-0.80) | 1.609 (110/120 in) | 1.598 | 0.201 / 0.014 | not measured |",
    "| 600 rare-word canaries only, seed 7 (bfloat16 scoring; `ksg run` 3695 s, `ksg audit` 895 s) | `benchmarks/audit_power.py --workdir /work/bench/ap5` at commit 87ca4c6 (NOT PRIVATE row only; "
    "rare-word AUC 0.913 [0.890, 0.936], TPR at 1% FPR 0.398 [0.323, 0.534]; MIA AUC 0.80-0.89, Min-K%++ TPR at 1% FPR 0.29) | 2.358 (117/120 in) | 2.358 | 0.398 / - | not measured |",
    "| the same on fresh canaries (seed 9), 100 \"in\" guesses declared in advance, float32 scoring (`ksg run` 736 s, `ksg audit` 333 s), tried after the seed-8 design's NOT PRIVATE row (next line) | "
    "`benchmarks/audit_power.py --workdir /work/bench/ap7 --seed 9 --in-guesses 100` at commit 1d15132 (NOT PRIVATE row only; rare-word AUC 0.757 [0.718, 0.794], "
    "TPR at 1% FPR 0.113 [0.068, 0.245]) | 1.718 (91/100 in) | 1.718 | 0.113 / - | not measured |",
    "| 4 epochs, fresh canaries (seed 8), 120 \"in\" guesses declared in advance, float32 scoring (`ksg run` 884 s, `ksg audit` 283 s); its DP rows: 70-72 of 120 at epsilon 8, 4, 1, "
    "bounds 0.016, 0.083, 0.049, AUC 0.51-0.53 (their rows: audit_power_runs_4epochs.json) | `benchmarks/audit_power.py --workdir /work/bench/ap6 --seed 8 --epochs 4` at commit 776d4ab, DP rows at 44b9400 (rare-word AUC 0.894 "
    "[0.866, 0.918]; MIA AUC 0.82-0.91, Min-K%++ TPR at 1% FPR 0.34 [0.12, 0.49]) | 2.905 (118/120 in) | 2.905 | 0.374 / - | 81 of 326 |", "",
    "The template text after the secret (\".\", the end of the turn, \"neutral\") is learned by every canary's training alike, by 10-60 nats that vary from "
    "one canary to the next; scoring the secret's own tokens removes it. The low end of the scores says little (an unplanted canary's loss does not rise), "
    "so guessing \"in\" on the top scores and abstaining on the rest certifies more. With 2 epochs a quarter of the planted rare-word canaries stood above "
    "every unplanted one; with 4 epochs, most: an epsilon of 3 at 95% needs about 95 correct guesses in a row, hence 4 epochs and 400 canaries of each kind. "
    "With disjoint words 119 of the 120 highest rare-word scores were planted (2.78; 120 of 120 would have given 3.15). 600 canaries of each kind were meant to "
    "put more planted canaries above the first unplanted one; instead every canary was memorized less (rare-word AUC 0.94 to 0.80, the training records' MIA AUC "
    "0.82-0.89 to 0.72-0.80): 1,200 canaries beside 100 sentences share the same adapter (r=8 on q,v) and the same 4 epochs. The random-digit canaries certify "
    "nothing at any size (AUC 0.51-0.53) and take half that capacity, so this design plants rare-word canaries only. "
    "At that size the unplanted canaries among the top scores shared 2 or 3 of their 4 words with planted ones (half of all unplanted canaries shared at least one): "
    "a planted canary's words lowered their loss too. The rare-word canaries now share no word. "
    "With 600 rare-word canaries and no digits, 117 of the 120 highest scores were planted: 2.36 after the correction for seven tries (one declared number, 120, would have "
    "given 2.69 from the same guesses, 119 of 120 3.20). Both that design and the one with disjoint words did best with the top 120 (20% of 600, 30% of 400), so the "
    "next design declared 120 \"in\" guesses in advance, on fresh canaries (seed 8) whose coins no earlier result saw, and scores in float32: 118 of its 120 were "
    "planted, 2.91, short of 3. Its top 100 held 99 planted canaries (3.01) and its top 80 all 80 (3.25), so 100 declared guesses were tried on fresh canaries "
    "(seed 9): that run memorized far less (planted canaries' loss drop 26 nats against 35 at seed 8, unplanted 19 in both; final training loss 1.16 against 0.93; "
    "AUC 0.76 against 0.89), and certified 1.72. The same recipe gives NOT PRIVATE bounds from 1.7 to 2.9 from one draw of records, canaries and batches to the next: "
    "a bound of 3 needs a recipe that memorizes with margin (more epochs or a larger adapter), not a better number of guesses. The current design trains 6 epochs "
    "instead of 4, declared with its seed (10) and its 120 guesses before it ran, and was run once.", "",
]


def row_entry(epsilon: float, report: dict, timing: dict) -> dict:
    """What the store keeps of a finished row: its table lines, the precision it was scored in and its times."""
    return {"canary_rows": canary_rows(epsilon, report), "mia_rows": mia_rows(epsilon, report), "designed_row": designed_against_random(epsilon, report),
            "precision": report["options"].get("precision", "float32"), "run_s": timing["run_s"], "audit_s": timing["audit_s"]}


def write(args, rows: dict[float, dict], from_store: set[float]) -> None:
    store = store_for(args.variant)
    pending = [label(e) for e in EPSILONS if e not in rows]
    title = "# Audit power: the same data and canaries, NOT PRIVATE and at epsilon 1, 4, 8"
    lines = [
        title + (f" (variant {args.variant}; the main design is in audit_power.md)" if args.variant else ""), "",
        f"Command: `{command()}`" + (f" (it read {', '.join(label(e) for e in EPSILONS if e in from_store)} from {store.path.name}: where and how those ran is at the end)" if from_store else ""),
        f"Machine: {machine()}",
        f"Data: {args.records} FPB training sentences in one client, {args.holdout} of them held out as non-members; {args.canaries} canaries of each kind "
        f"({args.kinds}; digits: random 6-digit secrets, log2 |R| = 19.9; rare_words, designed: 4 rare words from a list of 4,096, log2 |R| = 48) planted once each with probability 1/2. "
        f"SmolLM2-135M-Instruct, LoRA r=8 on q,v, loss on all tokens, {args.epochs:g} epochs, batch 8, lr {args.lr}, clip 1.0, seed {args.seed}; "
        "DP-SGD with Poisson sampling, PRV accounting, delta 1e-5.",
        f"Audit: `ksg audit RUN {' '.join(audit_args(args))}`. Canary score: the drop of the loss of the secret's own tokens from the base model to the released one. "
        + (f"One-run bound (Steinke et al. 2023 with its delta term): \"in\" on the {args.in_guesses} highest-scoring canaries, abstaining on the rest, at 95%: one number of guesses, "
           f"declared before this design ran, from the earlier designs {'in audit_power.md' if args.variant else 'below'} (the best count in the two designs before the declared ones, on other canaries: seed 7), so no correction for trying several. "
           if args.in_guesses else
           "One-run bound (Steinke et al. 2023 with its delta term): \"in\" on the highest-scoring 5, 10, 20, 30, 40 and 50% of the canaries (abstaining on the rest, marked \"in\"), "
           "and half \"in\", half \"out\" on all of them, Bonferroni-corrected to 95% overall. ") +
        "Each canary is one record, so the claimed epsilon for it is the per-record epsilon.", "",
    ]
    if pending and args.variant:
        lines += [f"Not run in this variant: {', '.join(pending)} (`--only` names the rows to run).", ""]
    elif pending:
        lines += [f"**Partial**: {', '.join(pending)} not run yet; the same command continues from here.", ""]
    order = [e for e in EPSILONS if e in rows]
    lines += ["## Canaries: one-run lower bound and the canaries as a membership test", "",
              "| training | claimed epsilon | canaries | planted | correct / guesses | epsilon lower bound (95%) | largest certifiable | TPR at 1% FPR [95% CI] | AUC [95% CI] | mean exposure planted / not (bits, 8 of each kind) | greedy extractions (planted, of the 8) |",
              "|---|---|---|---|---|---|---|---|---|---|---|", *[line for e in order for line in rows[e]["canary_rows"]], "",
              *designed_table([rows[e]["designed_row"] for e in order]),
              "## Membership inference of training records (held-out records as non-members)", "",
              "| training | members / non-members | score | AUC [95% CI] | TPR at 1% FPR [95% CI] | TPR at 0.1% FPR [95% CI] |", "|---|---|---|---|---|---|",
              *[line for e in order for line in rows[e]["mia_rows"]], "", *([] if args.variant else EARLIER),
              "## Where and how long each row ran", "",
              *[f"- {label(e)}: `ksg run` {rows[e]['run_s']:.0f} s, `ksg audit` {rows[e]['audit_s']:.0f} s; {rows[e]['code']}, {rows[e]['machine']}"
                + (f"; {rows[e]['note']}" if rows[e].get("note") else "") for e in order]]
    write_result(result_name(args.variant), lines)


def variant_name(text: str) -> str:
    """A variant names two files in benchmarks/results: letters, digits and underscores only, so it cannot reach outside."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", text):
        raise argparse.ArgumentTypeError(f"{text!r}: letters, digits and underscores only (it names audit_power_VARIANT.md)")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=600)
    parser.add_argument("--holdout", type=int, default=500)
    parser.add_argument("--canaries", type=int, default=600, help="canaries of each kind")
    parser.add_argument("--kinds", default="rare_words", help="canary kinds, comma-separated (digits,rare_words: also the designed-against-random table)")
    parser.add_argument("--epochs", type=float, default=6.0)
    parser.add_argument("--lr", type=float, default=0.004)
    parser.add_argument("--seed", type=int, default=10, help="the canaries and their coins (the designs that chose --in-guesses ran at 7; 8 and 9 ran the 4-epoch recipe)")
    parser.add_argument("--in-guesses", type=int, default=120, help="'in' guesses on the top scores, declared in advance (the best count of the two designs before it); 0: the audit's seven Bonferroni-corrected tries")
    parser.add_argument("--workdir", type=Path, required=True, help="the runs live here; the same command resumes from it")
    parser.add_argument("--variant", default=None, type=variant_name, help="a design beside the main one (e.g. mia1000 with --records 1100 --holdout 1000): rows in audit_power_VARIANT_runs.json, table in audit_power_VARIANT.md")
    parser.add_argument("--only", default=None, help="measure these rows (nonprivate, eps8, eps4, eps1; comma-separated) even if the store holds them, and no others; none: only rewrite the report")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    only = set(args.only.split(",")) if args.only else None
    known = {short_name(e) for e in EPSILONS} | {"none"}
    if only and only - known:
        sys.exit(f"--only: unknown {', '.join(sorted(only - known))} (known: {', '.join(short_name(e) for e in EPSILONS)}, none)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    timings_path = args.workdir / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    store = store_for(args.variant)
    rows: dict[float, dict] = {}
    from_store: set[float] = set()
    for epsilon in EPSILONS:
        key = measured(epsilon, args)
        entry = store.entry(short_name(epsilon), key)
        if (only is None and entry) or (only is not None and short_name(epsilon) not in only):
            if entry:
                rows[epsilon] = entry
                from_store.add(epsilon)
                print(f"{label(epsilon)}: in {store.path.name} already" + ("" if only else f" (pass --only {short_name(epsilon)} to measure it again)"), flush=True)
            continue
        start = time.perf_counter()
        report = run_row(epsilon, args, timings)
        print(f"{label(epsilon)}: {time.perf_counter() - start:.0f} s", flush=True)
        timing = timings[spec_for(epsilon, args)["name"]]
        store.save(short_name(epsilon), key, timing["run_s"] + timing["audit_s"], **row_entry(epsilon, report, timing))
        rows[epsilon] = store.entry(short_name(epsilon), key)
        write(args, rows, from_store)
    write(args, rows, from_store)


if __name__ == "__main__":
    main()
