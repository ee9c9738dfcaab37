"""The canary audit on one released model, before and after batching: exposure, own-secret loss, extraction.

Usage:  .venv/bin/python benchmarks/audit_speed.py [--canaries 32] [--candidates 100] [--samples 4] [--repeats 2]

On the packaged SmolLM2-135M-Instruct (a released adapter, merged, costs the same), with the
canaries `ksg audit` plants (6-digit secrets in the default template), the per-model canary
work of `ksg audit` runs two ways, alternating, in one process:
- before: one scoring call per canary for its own secret, one per canary for its candidates
  (every candidate scored with its whole prefix), one greedy and one sampled generation call
  per canary (the code before this change, kept here as the baseline);
- after: every canary's own secret in one batched call, each canary's candidates scored after
  its prefix's key-value cache (`prefixed_logprobs`; `shared_prefix_logprobs` when audit_speed.md was made), extraction of all canaries in one
  greedy and one sampled call (`eval.audit`).
It checks that both give the same exposures (to float tolerance). Membership inference is not
timed here: its change is that the base model's pass over each record set is shared by every
target instead of repeated per target. Writes benchmarks/results/audit_speed.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402


def before(model, tokenizer, spec, canaries, options, samples) -> list[float]:
    from eval import metrics
    from eval.audit import candidate_secrets, split_at_secret
    from knowledgesg.generation import Generator, SamplingParams
    from knowledgesg.scoring import continuation_logprobs, pad_id

    template, digits = spec.template, spec.digits

    def nll(canary, secrets):
        pairs = [split_at_secret(tokenizer, template, canary, s)[:2] for s in secrets]
        scores = continuation_logprobs(model, [p for p, _ in pairs], [r for _, r in pairs], pad_id(tokenizer), options.batch_size, "cpu")
        return [-float(s.sum()) for s in scores]

    exposures = []
    for canary in canaries:
        own = nll(canary, [canary.secret])[0]
        secrets, _ = candidate_secrets(canary, spec, options.candidates, options.enumerate_limit, options.seed)
        exposures.append(metrics.exposure_extrapolated(own, np.array(nll(canary, secrets)), 10.0**digits))
        prefix = split_at_secret(tokenizer, template, canary, canary.secret)[0]
        generator = Generator(model, tokenizer, max(1, samples), "cpu")
        generator.generate([prefix], SamplingParams(do_sample=False, max_new_tokens=digits + 4), options.seed)
        generator.generate([prefix] * samples, SamplingParams(do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=digits + 4), options.seed)
    return exposures


def after(model, tokenizer, spec, canaries, options, samples) -> list[float]:
    from eval.audit import exposure, extractions, own_secret_nll

    own = own_secret_nll(model, tokenizer, spec.template, canaries, options.batch_size, "cpu")
    exposures = [exposure(model, tokenizer, spec, c, options, "cpu", o) for c, o in zip(canaries, own)]
    extractions(model, tokenizer, spec, canaries, samples, options.seed, "cpu")
    return exposures


def main() -> None:
    from eval.audit import AuditOptions
    from eval.canaries import make_canaries
    from knowledgesg.models import load_causal_lm, resolve_model
    from knowledgesg.spec import CanarySpec

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--canaries", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    model, tokenizer = load_causal_lm(resolve_model(args.model))
    spec = CanarySpec(client="bank_a", count=args.canaries, digits=6)
    canaries = make_canaries(spec, seed=0)
    options = AuditOptions(candidates=args.candidates)
    times: dict[str, list[float]] = {"before": [], "after": []}
    results = {}
    for repeat in range(args.repeats):
        for name, fn in ((("before", before), ("after", after)) if repeat % 2 == 0 else (("after", after), ("before", before))):
            start = time.perf_counter()
            results[name] = fn(model, tokenizer, spec, canaries, options, args.samples)
            times[name].append(time.perf_counter() - start)
            print(name, round(times[name][-1], 1), "s", flush=True)
    largest = max(abs(a - b) for a, b in zip(results["before"], results["after"]))
    old, new = statistics.median(times["before"]), statistics.median(times["after"])
    write_result("audit_speed", [
        "# Canary audit of one released model: before and after batching", "",
        f"Command: `{command()}`", f"Machine: {machine()}",
        f"Model: {args.model}; {args.canaries} canaries, 6-digit secrets, {args.candidates} candidates each (skew-normal exposure), "
        f"{args.samples} sampled extractions + 1 greedy per canary; {args.repeats} runs per variant, alternating; medians.", "",
        "| variant | seconds per model |", "|---|---:|", f"| before (per-canary calls, whole-prefix candidates) | {old:.1f} |",
        f"| after (batched, shared prefix cache) | {new:.1f} |", f"| **speed-up** | **{old / new:.1f}x** |", "",
        f"Largest exposure difference between the two: {largest:.2e} bits (same model, same candidates).",
    ])


if __name__ == "__main__":
    main()
