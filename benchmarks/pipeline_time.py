"""End-to-end time of the demo, from an empty model cache and from a warm one, and of a resumed
finished run.

Usage:  .venv/bin/python benchmarks/pipeline_time.py [--spec pipelines/specs/demo.yaml] [--workdir DIR]

1. `ksg run SPEC` into a fresh run directory with an empty model cache ($KSG_CACHE_DIR pointed
   at a new folder): what a fresh machine pays once `scripts/setup.sh` has installed the
   packages (the GGUF conversions are included);
2. the same into another fresh run directory with the now-filled cache: every later run;
3. `ksg run SPEC` again on run 2's finished directory: a resume that finds every stage done.
Per stage, `duration_s` from the manifests of runs 1 and 2. Writes benchmarks/results/pipeline_time.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402
from _comparison import ksg  # noqa: E402


def timed_run(spec: Path, run_dir: Path, cache: Path) -> float:
    return ksg("run", str(spec), "--run-dir", str(run_dir), env={"KSG_CACHE_DIR": str(cache)})


def stage_manifests(run_dir: Path) -> dict[str, dict]:
    from knowledgesg.runner import load_run_spec

    spec, _ = load_run_spec(run_dir)
    return {s.name: json.loads((run_dir / "stages" / s.name / "manifest.json").read_text()) for s in spec.stages}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", type=Path, default=Path("pipelines/specs/demo.yaml"))
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pipeline-time-"))
    cache = workdir / "model-cache"
    cache.mkdir(parents=True, exist_ok=True)

    cold = timed_run(args.spec, workdir / "cold", cache)
    warm = timed_run(args.spec, workdir / "warm", cache)
    resumed = timed_run(args.spec, workdir / "warm", cache)
    cold_stages, warm_stages = stage_manifests(workdir / "cold"), stage_manifests(workdir / "warm")
    peak = max(m.get("peak_rss_mib") or 0 for m in [*cold_stages.values(), *warm_stages.values()])
    write_result("pipeline_time", [
        f"# End-to-end time: `ksg run {args.spec}`", "",
        f"Command: `{command()}`", f"Machine: {machine()}", "",
        "| run | seconds | minutes |", "|---|---|---|",
        f"| fresh run directory, empty model cache (conversions included) | {cold:.0f} | {cold / 60:.1f} |",
        f"| fresh run directory, models cached | {warm:.0f} | {warm / 60:.1f} |",
        f"| resumed finished run (every stage found done) | {resumed:.1f} | {resumed / 60:.2f} |", "",
        "| stage | empty cache, s | models cached, s | peak resident memory, empty cache / cached, MiB |", "|---|---|---|---|",
        *[f"| {name} | {cold_stages[name]['duration_s']:.1f} | {warm_stages[name]['duration_s']:.1f} | "
          f"{cold_stages[name].get('peak_rss_mib') or 0:.0f} / {warm_stages[name].get('peak_rss_mib') or 0:.0f} |" for name in cold_stages],
        "", "The whole-run times include process start and the privacy summary; stage times are the stages' own.",
        f"Peak resident memory (each stage's manifest: the `ksg` process's peak while the stage ran): {peak:.0f} MiB, {peak / 1024:.2f} GiB.",
    ])


if __name__ == "__main__":
    main()
