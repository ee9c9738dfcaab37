"""`ksg audit` of the demo run: its time, per section, under two settings, and what the setting
changes in the audit's figures. `--compare precision`: float32 against bfloat16; `--compare
pii-score`: PII candidates ranked by the record from the value to its end against by the value's
own tokens; `--compare pii-sentence`: the record against the value and the rest of its sentence
(both at the default precision); `--compare code`: the defaults by the code of `--before`, then
by this checkout's (demo_audit_code.md).

Usage:  .venv/bin/python benchmarks/demo_audit.py [--compare precision|pii-score|pii-sentence|code] [--run runs/demo-finance] [--workdir DIR]
        [--before WORKTREE]

Needs a finished demo run (`ksg run pipelines/specs/demo.yaml`). Runs `ksg audit RUN` with each
setting, one after the other on the same run (the audit's own defaults otherwise), and keeps each
report in DIR (a finished one is reused: the command resumes). `--before`: a worktree of earlier
code, whose audit with the defaults is timed first, for a before-and-after ratio from one session. Compares, per audited release, the
canary loss drops, the one-run bounds, the membership AUCs and the PII attack hits. Writes
benchmarks/results/demo_audit.md (precision), demo_audit_pii_score.md or demo_audit_pii_sentence.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402
from _comparison import ksg  # noqa: E402

from knowledgesg.fileio import write_json  # noqa: E402

# each comparison: its title, and (name, `ksg audit` arguments) for the two settings, the earlier first
COMPARISONS = {
    "precision": ("float32 against bfloat16", {"float32": ["--precision", "float32"], "bfloat16": ["--precision", "bfloat16"]},
                  "What the precision changes: bfloat16 weights, the adapter merged in float32 first; log-probabilities in float32 either way. "
                  "Sampling differs with precision, so the PII figures are two draws."),
    "pii-score": ("PII candidates ranked by the record from the value on against by the value's own tokens",
                  {"record": ["--pii-score", "record"], "value": ["--pii-score", "value"]},
                  "What the score changes: only the ranking of the PII reconstruction and inference candidates (the canaries, membership scores "
                  "and samples are the same computation in both)."),
    "pii-sentence": ("PII candidates ranked by the record from the value on against by the value and the rest of its sentence",
                     {"record": ["--pii-score", "record"], "sentence": ["--pii-score", "sentence"]},
                     "What the score changes: only the ranking of the PII reconstruction and inference candidates (the canaries, membership scores "
                     "and samples are the same computation in both)."),
}
SECTIONS = ("canaries", "membership_inference", "pii", "synthetic_overlap")
PACKAGE_DIRS = ("knowledgesg", "pipelines", "privacy", "eval")  # the code `ksg audit` imports


def audited(run: Path, name: str, arguments: list[str], workdir: Path, code: Path | None = None) -> dict:
    """The audit with `arguments`, run by this checkout's code or by that of `code` (a worktree)."""
    kept = workdir / f"{name}.json"
    if not kept.is_file():
        seconds = ksg("audit", str(run), *arguments, cwd=code)
        report = json.loads((run / "audit/audit_report.json").read_text())
        report["wall_s"] = round(seconds, 1)
        report["code"] = code_commit(code or Path.cwd())  # the package code that ran it
        shutil.copy(run / "audit/audit_report.html", workdir / f"{name}.html")
        write_json(kept, report)  # last, whole or not at all: a kept report marks the audit done
    return json.loads(kept.read_text())


def code_commit(checkout: Path) -> str:
    """The checkout's commit, marked where the package's tracked files differ from it (the audit ran
    other code; a changed benchmark script or README does not count)."""
    def git(*arguments: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), *arguments], capture_output=True, text=True, check=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (" with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no", "--", *PACKAGE_DIRS) else "")


def canary_rows(reports: dict[str, dict]) -> list[str]:
    a, b = (r["canaries"] for r in reports.values())
    rows = []
    for target in a["targets"]:
        if "loss_drop_vs_base" not in a["targets"][target]:
            continue
        x, y = np.array(a["targets"][target]["loss_drop_vs_base"]), np.array(b["targets"][target]["loss_drop_vs_base"])
        bounds = [r["targets"][target]["kinds"]["all"]["one_run"]["epsilon_lower_bound"] for r in (a, b)]
        rows.append(f"| {target} | {np.corrcoef(x, y)[0, 1]:.4f} | {np.abs(x - y).max():.3f} | {np.abs(x).mean():.3f} | {bounds[0]} | {bounds[1]} |")
    return rows


def mia_rows(reports: dict[str, dict]) -> list[str]:
    a, b = (r["membership_inference"] for r in reports.values())
    rows = []
    for key in a:
        cells = [f"{a[key]['scores'][s]['auc']:.3f} / {b[key]['scores'][s]['auc']:.3f}" for s in ("loss", "reference", "min_k_plus_plus", "rmia")]
        rows.append(f"| {key} | {' | '.join(cells)} |")
    return rows


def pii_rows(reports: dict[str, dict]) -> list[str]:
    a, b = (r["pii"] for r in reports.values())
    rows = []
    for name in a.get("models", {}):
        cells = []
        for attack in ("extraction", "reconstruction", "inference"):
            hits = [r["models"][name]["attacks"][attack]["hits"] for r in (a, b)]
            cells.append(f"{hits[0]} / {hits[1]} of {a['models'][name]['attacks'][attack]['tried']}")
        rows.append(f"| {name} | {' | '.join(cells)} | {a['models'][name].get('replayed', 'n/a')} / {b['models'][name].get('replayed', 'n/a')} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--compare", choices=[*COMPARISONS, "code"], default="precision",
                        help="code: the audit with the defaults by the code of --before, then by this checkout's")
    parser.add_argument("--run", type=Path, default=Path("runs/demo-finance"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/demo-audit"))
    parser.add_argument("--before", type=Path, help="a worktree of earlier code: its `ksg audit RUN` with the defaults is timed too, first")
    args = parser.parse_args()
    if not (args.run / "stages/fedtune/manifest.json").is_file():
        parser.exit(2, f"{args.run}: no finished demo run; run `.venv/bin/ksg run pipelines/specs/demo.yaml` first\n")
    if args.before and not (args.before / "knowledgesg/cli.py").is_file():
        parser.exit(2, f"--before {args.before}: not a checkout of this project (no knowledgesg/cli.py there)\n")
    if args.compare == "code" and not args.before:
        parser.exit(2, "--compare code needs --before WORKTREE: the earlier code to compare this checkout's with\n")
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.compare == "code":
        return compare_code(args)
    title, variants, note = COMPARISONS[args.compare]
    # the earlier code first, then the two settings: one after the other, the machine otherwise idle
    before = audited(args.run, "before", [], args.workdir, args.before) if args.before else None
    reports = {name: audited(args.run, name, arguments, args.workdir) for name, arguments in variants.items()}
    first, second = variants
    settings = " and ".join("`" + " ".join(a) + "`" for a in variants.values())
    write_result("demo_audit" if args.compare == "precision" else f"demo_audit_{args.compare.replace('-', '_')}", [
        f"# `ksg audit` of the demo run, {title}", "",
        f"Command: `{command()}`", f"Machine: {machine()}",
        f"Run: `{args.run}` (`ksg run pipelines/specs/demo.yaml`: 3 DP adapters and the final adapter, 64 canaries in bank_b, 20 held-out records per bank). "
        f"Each audit is `ksg audit RUN` with {settings} and the audit's defaults otherwise (100 candidates, "
        "4 exposure canaries per kind, 8 samples, as many members per client as it holds out, 16 PII spans per client, 1000 bootstrap resamples); run one after the "
        f"other, the machine otherwise idle. Weights: {', '.join(sorted({r['options'].get('precision', 'float32') for r in reports.values()}))} "
        "(`--precision auto` runs bfloat16 only where the CPU named above has it natively).", "",
        "| setting | whole command, s | " + " | ".join(f"{s}, s" for s in SECTIONS) + " |", "|---|---:|" + "---:|" * len(SECTIONS),
        *([timing_row(f"before: the code of {args.before} at {before.get('code', 'not recorded')}, defaults", before)] if before else []),
        *[timing_row(f"{name} (code {reports[name].get('code', 'not recorded')})", reports[name]) for name in variants],
        ratio_row(f"{first} / {second}", reports[first], reports[second]),
        *([ratio_row(f"before / {first}", before, reports[first])] if before else []), "",
        *figure_tables(reports, f"{note} Canaries: each canary's loss drop from the base model to the release, {first} against {second}:"),
        *(["", *figure_tables({"before": before, first: reports[first]}, f"The code before against this code ({first}): what the change did to the figures. "
                              "Canary loss drops:", " (a sampled row's draws depend on the rows decoded beside it: where the code batches its samplers "
                              "differently, extraction and reconstruction are two draws)")] if before else []),
    ])


def compare_code(args: argparse.Namespace) -> None:
    """The earlier code's audit with the defaults, then this checkout's, one after the other on the same run."""
    reports = {"before": audited(args.run, "before", [], args.workdir, args.before), "this code": audited(args.run, "this_code", [], args.workdir)}
    write_result("demo_audit_code", [
        "# `ksg audit` of the demo run, this code against earlier code", "",
        f"Command: `{command()}`", f"Machine: {machine()}",
        f"Run: `{args.run}` (`ksg run pipelines/specs/demo.yaml`: 3 DP adapters and the final adapter, 64 canaries in bank_b, 20 held-out records per bank). "
        "Each audit is `ksg audit RUN` with the audit's defaults (100 candidates, 4 exposure canaries per kind, 8 samples, as many members per client as it "
        "holds out, 16 PII spans per client, 1000 bootstrap resamples), first by the code of the worktree named below, then by this checkout's; "
        f"the machine otherwise idle. Weights: {', '.join(sorted({r['options'].get('precision', 'float32') for r in reports.values()}))}.", "",
        "| code | whole command, s | " + " | ".join(f"{s}, s" for s in SECTIONS) + " |", "|---|---:|" + "---:|" * len(SECTIONS),
        timing_row(f"before: {args.before} at {reports['before'].get('code')}", reports["before"]),
        timing_row(f"this code: {reports['this code'].get('code')}", reports["this code"]),
        ratio_row("before / this code", reports["before"], reports["this code"]), "",
        *figure_tables(reports, "What the change did to the figures. Canary loss drops:", " (a sampled row's draws depend on the rows decoded beside it: "
                       "where the code batches its samplers differently, extraction and reconstruction are two draws)"),
    ])


def timing_row(label: str, report: dict) -> str:
    return f"| {label} | {report['wall_s']} | " + " | ".join(str(report["seconds"].get(s, "")) for s in SECTIONS) + " |"


def ratio_row(label: str, slower: dict, faster: dict) -> str:
    """`slower`'s times over `faster`'s, whole command and per section."""
    return (f"| **{label}** | **{slower['wall_s'] / faster['wall_s']:.2f}x** | "
            + " | ".join(f"{slower['seconds'][s] / faster['seconds'][s]:.2f}x" if faster["seconds"].get(s) else "" for s in SECTIONS) + " |")


def figure_tables(pair: dict[str, dict], lead: str, pii_caveat: str = "") -> list[str]:
    """The canary, membership and PII figures of two audits side by side, under `lead`."""
    first, second = pair
    return [lead, "", f"| release | correlation | largest difference, nats | mean absolute drop, nats | one-run bound, {first} | {second} |", "|---|---:|---:|---:|---:|---:|",
            *canary_rows(pair), "", f"Membership inference AUC ({first} / {second}):", "",
            "| release and client | loss | reference | Min-K%++ | RMIA |", "|---|---|---|---|---|", *mia_rows(pair), "",
            f"PII attacks, hits ({first} / {second}), and values replayed in samples from public prompts{pii_caveat}:", "",
            "| release | extraction | reconstruction | inference | replayed |", "|---|---|---|---|---|", *pii_rows(pair)]


if __name__ == "__main__":
    main()
