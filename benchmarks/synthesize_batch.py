"""`synthesize`'s generation at engine batches of 16 and 64 rows, on a finished demo run's DP adapter.

Usage:  .venv/bin/python benchmarks/synthesize_batch.py --run /tmp/demo/run [--client bank_a] [--batches 16,64]

Needs a demo run whose dp_train finished (`ksg run pipelines/specs/demo.yaml`). With the demo
spec's synthesize parameters (60 candidates per bank, top-p 0.95, temperature 0.9, 48 tokens for
the user turn, 8 for the answer) and the client's DP adapter merged as synthesize merges it, the
stage's two passes run through the stage's own `Synthesize.two_passes`: the DP model writes each
user turn after a public seed, then answers the complete ones. Each batch size runs
twice, alternating, in one process; medians. The complete user turns are counted as a check that
the batch size changes the speed, not what is written (a row's draws depend on the rows decoded
beside it, so the texts are another sample). Writes benchmarks/results/synthesize_batch.md.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, positive_ints, write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, required=True, help="a demo run directory whose dp_train finished")
    parser.add_argument("--client", default="bank_a")
    parser.add_argument("--batches", type=positive_ints, default="16,64", help="comma-separated engine batch sizes")
    args = parser.parse_args()
    adapter = args.run / "stages/dp_train/clients" / args.client / "adapter"
    if not adapter.is_dir():
        parser.exit(2, f"{args.run}: no DP adapter of '{args.client}' (stages/dp_train/clients/{args.client}/adapter); run `ksg run pipelines/specs/demo.yaml` first\n")
    batches = args.batches

    import yaml

    from eval.audit import load_target
    from knowledgesg.generation import Generator
    from knowledgesg.runner import run_models
    from pipelines.synthesize import Synthesize, SynthesizeParams

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "pipelines/specs/demo.yaml").read_text())
    params = SynthesizeParams(**next(s["params"] for s in spec["stages"] if isinstance(s, dict) and s["name"] == "synthesize"))
    stage = Synthesize(params)
    base = run_models(args.run)["base"]
    model, tokenizer = load_target(base, adapter, "cpu", "float32")
    count = math.ceil(params.per_client * params.oversample)
    seeds = [params.seeds[i % len(params.seeds)] for i in range(count)]

    def both_passes(batch: int) -> tuple[float, int, int]:
        start = time.perf_counter()
        passes = stage.two_passes(Generator(model, tokenizer, batch), seeds, 1, 2)
        seconds = time.perf_counter() - start
        return seconds, sum(c.new_tokens for c in passes.first) + sum(c.new_tokens for c in passes.answer_of.values()), len(passes.answer_of)

    times: dict[int, list[float]] = {b: [] for b in batches}
    tokens: dict[int, list[int]] = {b: [] for b in batches}
    complete: dict[int, list[int]] = {b: [] for b in batches}
    for _ in range(2):
        for batch in batches:
            seconds, new_tokens, answerable = both_passes(batch)
            times[batch].append(seconds)
            tokens[batch].append(new_tokens)
            complete[batch].append(answerable)
            print(f"batch {batch}: {seconds:.1f} s, {new_tokens} new tokens, {answerable} complete user turns", flush=True)
    first = statistics.median(times[batches[0]])
    rows = [f"| {b} | {statistics.median(times[b]):.1f} | {statistics.median(tokens[b]) / statistics.median(times[b]):.1f} | **{first / statistics.median(times[b]):.2f}x** | "
            f"{', '.join(map(str, complete[b]))} of {count} |" for b in batches]
    write_result("synthesize_batch", [
        f"# `synthesize`'s generation at engine batches of {', '.join(map(str, batches))} rows", "",
        f"Command: `{command()}`", f"Machine: {machine()}", "",
        f"{args.client}'s DP adapter from `{args.run}`, merged in float32; the demo spec's synthesize parameters ({count} candidates, temperature "
        f"{params.sampling.temperature}, top-p {params.sampling.top_p}, {params.sampling.max_new_tokens} tokens for the user turn, {params.response_max_new_tokens} for the answer); "
        "both passes by the stage's own `Synthesize.two_passes`; each batch size twice, alternating, in one process; medians.", "",
        f"| engine batch | seconds, both passes | new tokens/s | speed-up over batch {batches[0]} | complete user turns, each run |",
        "|---:|---:|---:|---:|---:|", *rows, "",
        "A row's draws depend on the rows decoded beside it: each batch size writes another sample of the same distribution.",
    ])


if __name__ == "__main__":
    main()
