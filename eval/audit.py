"""`ksg audit RUN`: what the released models and data leak about the private records.

The audit runs with the client's data (the canaries' secrets, the held-out records): it is the
data owner checking the releases, not something the server could run. Each figure names the
release it is about: each client's DP adapter, the final federated adapter (trained on refined
synthetic data only), or the synthetic data itself. Against the base model:

- canaries, of each kind (random digits; rare words, a designed canary): every canary scored by
  how far training lowered the loss of its secret's own tokens; exposure and sampled extraction on
  a sample of each kind;
- the one-run epsilon lower bound (Steinke et al. 2023, with its delta term) from the planted and
  not planted canaries, at declared numbers of guesses ("in" on the highest scores, or half "in"
  and half "out") with a Bonferroni correction, beside the epsilon it must stay below: the claimed epsilon of the canary's unit, which for a canary
  repeated k times at record level is the group epsilon of k records; and the canaries as a
  membership test (TPR at low FPR);
- the synthetic data as a release: how much of each canary's secret it contains, through the
  same one-run bound;
- membership inference of training records against the held-out ones (loss, zlib, reference,
  Min-K%, Min-K%++, RMIA-style: AUC and TPR at 1% and 0.1% FPR with bootstrap intervals);
- verbatim overlap between the synthetic data and the private data (8-word spans);
- PII: values found in the private data replayed verbatim in the synthetic data or in samples
  from public prompts, and Lukas et al.'s extraction, reconstruction and inference attacks on
  spans of the training records, beyond what the base model does on the same spans.

Writes `RUN/audit/audit_report.json` and `audit_report.html` (plots embedded).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from eval import metrics
from eval.canaries import Canary, random_secret, rare_words, read_canaries, secret_budget_tokens, space_log2, space_size
from eval.pii import PiiSpan, find_pii_spans, occurs, replayed
from knowledgesg.console import console, track
from knowledgesg.errors import InputError
from knowledgesg.fileio import read_json, read_jsonl
from knowledgesg.generation import SHARED_PREFIX_MIN, Generator, SamplingParams, common_prefix_length
from knowledgesg.manifest import read_manifest
from knowledgesg.models import Precision, ResolvedModel, load_causal_lm, resolve_device, resolve_precision
from knowledgesg.prompts import Seed, user_message, user_turn_prefix
from knowledgesg.records import InstructionRecord
from knowledgesg.runner import load_run_spec, run_models
from knowledgesg.scoring import continuation_logprobs, pad_id, prefixed_logprobs, token_statistics
from knowledgesg.spec import CanarySpec, CanaryTemplate, PipelineSpec, StrictModel
from privacy.accounting import group_epsilon
from privacy.ledger import LedgerEntry, client_delta, composed_total, read_stage_ledgers
from privacy.units import privacy_units

SENTINEL = "\ue000"
CANARY_SCORE = "secret tokens"  # what a canary's loss is summed over (before: the text from the secret to the end)
OVERLAP_WORDS = 8
# continuation tokens per batch of candidate scoring: about three PII spans' ten candidates of 33
# tokens, with the batch's [tokens, vocabulary] logits at 200 MB for SmolLM2
CANDIDATE_BATCH_TOKENS = 1024
# rows decoded together by the audit's samplers: on 2 cores a decoding step of 128 rows costs 2.2x
# one of 32, for 4x the tokens (decode_batch.md)
SAMPLING_ROWS = 128


class AuditOptions(StrictModel):
    candidates: int = Field(default=100, ge=20, description="random candidate secrets per canary for the skew-normal fit")
    enumerate_limit: int = Field(default=2000, ge=10, description="enumerate every candidate when the space is at most this large")
    exposure_canaries: int = Field(default=4, ge=0, description="canaries of each kind whose exposure and extraction are measured (every canary is scored for the one-run audit)")
    extraction_samples: int = Field(default=8, ge=0, description="sampled decodings per canary of the exposure sample (and one greedy)")
    guesses: int | None = Field(default=None, ge=2, description="one-run audit: one number of guesses, half in and half out (default: 'in' on the top 5-50% of the canaries, and all of them half in and half out, Bonferroni-corrected)")
    in_guesses: int | None = Field(default=None, ge=2, description="one-run audit: one number of 'in' guesses on the highest scores, abstaining on the rest. Declared "
        "before the run (from a pilot with other canaries), it needs no Bonferroni correction: 119 of 120 certify 3.20 where the default's seven tries certify 2.77")
    mia_members: int | None = Field(default=None, ge=2, description="training records per client scored as members (the non-members are all its held-out "
        "records); default: as many as its non-members. Past that, members add little: at AUC 0.5 with 20 non-members, 100 members give a standard error "
        "of 0.071 against 0.092 with 20 (Hanley and McNeil), for 3x the scoring")
    bootstrap: int = Field(default=1000, ge=0, description="bootstrap resamples for the intervals of AUC and TPR at low FPR")
    pii_samples: int = Field(default=32, ge=0, description="generations per model from public prompts for PII replay")
    pii_occurrences: int = Field(default=16, ge=0, description="PII spans in the private records attacked with the text before them")
    pii_attack_samples: int = Field(default=4, ge=1, description="sampled continuations per attacked PII span")
    pii_candidates: int = Field(default=10, ge=2, description="candidates per PII span in the inference attack (the true one among them)")
    pii_score: Literal["record", "sentence", "value"] = Field(default="record", description="what ranks a PII candidate: the log-likelihood of the record from the "
        "candidate to its end (record), of the candidate and the rest of its sentence (sentence: Lukas et al.'s filled-in sentence; 1.19x faster on a "
        "NOT PRIVATE model of 200 PII paragraphs, 43 inference hits beyond the base model against 53: pii_power_sentence.md), or of the candidate's own "
        "tokens only (value: 1.4x faster, but half the inference hits beyond the base model, 25 against 51 of 149: pii_power.md)")
    max_length: int = Field(default=128, ge=16)
    batch_size: int = Field(default=16, ge=1)
    models: list[Literal["dp", "final"]] = Field(default_factory=lambda: ["dp", "final"], min_length=1, description="released models to audit")
    precision: Precision = Field(default="auto", description="weights of the scored and sampled models: bfloat16 "
        "(about 1.5-2x faster on a CPU with AVX512-BF16) or float32; auto: bfloat16 where it runs natively. Log-probabilities are taken in float32 either "
        "way, and any scores keep the bound valid (the one-run theorem holds for every guessing rule): precision changes power only")
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def one_way_of_guessing(self) -> AuditOptions:
        if self.guesses is not None and self.in_guesses is not None:
            raise ValueError("guesses and in_guesses are two ways of guessing: declare one")
        return self

    def guessing(self) -> str:
        """How the one-run audit guesses, in words for the report."""
        if self.in_guesses:
            return f"guesses \"in\" on the {self.in_guesses} highest-scoring canaries and abstains on the rest, a number declared before the run (no correction for trying several)"
        if self.guesses:
            return f"guesses \"in\" on the top half and \"out\" on the bottom half of {self.guesses} canaries, one declared number"
        return metrics.DECLARED_GUESSING


@dataclass
class Target:
    name: str  # "dp_adapter:<client>", "final", "base" or "professional"
    adapter_dir: Path | None  # None: the model itself
    model_role: str = "base"  # the models.json entry the adapter is merged into

    @property
    def release(self) -> str:
        """What was released, in a reader's words: the figures about this target are about it."""
        if self.name.startswith("dp_adapter:"):
            return f"{self.name.split(':', 1)[1]}'s DP adapter, trained with DP-SGD on its private records"
        return "the final adapter, tuned federatedly on the refined synthetic data"


# -- tokenisation of a record, split where a span (a canary's secret, a PII value) starts ---------


def render_prompt(tokenizer, user: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False)


def split_span(tokenizer, record: InstructionRecord, marked: InstructionRecord, length: int) -> tuple[list[int], list[int], list[int]]:
    """(ids before the span, the ids that write its `length` characters, the ids after it),
    tokenised as training saw them: the chat prompt, then the response and end-of-turn token
    tokenised on their own. `marked` is the same record with SENTINEL where the span starts and
    the text before it unchanged."""
    response = tokenizer(record.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_text = render_prompt(tokenizer, user_message(record))
    marked_prompt = render_prompt(tokenizer, user_message(marked))
    if SENTINEL in marked_prompt:
        ids, k, m = _split(tokenizer, prompt_text, marked_prompt.index(SENTINEL), length)
        return ids[:k], ids[k:m], ids[m:] + response
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    ids, k, m = _split(tokenizer, record.response, marked.response.index(SENTINEL), length)
    return prompt + ids[:k], ids[k:m], ids[m:] + [tokenizer.eos_token_id]


def split_at_secret(tokenizer, template: CanaryTemplate, canary: Canary, secret: str) -> tuple[list[int], list[int], list[int]]:
    """(ids before the secret, the secret's own ids, the ids after it). Canaries are scored on the
    secret's ids alone: the template text after it is the same for every canary, and training
    lowers its loss whether or not a canary was planted, by an amount that varies from one canary
    to the next (10 to 60 nats in `audit_power.md`) and drowns the secret's own signal."""
    return split_span(tokenizer, canary.record(template, secret), canary.record(template, SENTINEL), len(secret))


def _split(tokenizer, text: str, start: int, length: int) -> tuple[list[int], int, int]:
    """(ids of `text`, the first token that writes a character of text[start:start + length], the
    first token after them)."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    k = next(i for i, (_, end) in enumerate(offsets) if end > start)
    m = next((i for i, (begin, _) in enumerate(offsets) if i > k and begin >= start + length), len(offsets))
    return encoded["input_ids"], k, m


def own_secret_nll(model, tokenizer, template: CanaryTemplate, canaries: list[Canary], batch_size: int, device: str) -> list[float]:
    """Each canary's negative log-likelihood of its own secret's tokens: one batched,
    length-grouped pass over all canaries."""
    pairs = [split_at_secret(tokenizer, template, c, c.secret)[:2] for c in canaries]
    # the canaries share the chat template and the template's text up to the name: run it once
    shared = min(common_prefix_length([p + r for p, r in pairs]), *(len(p) for p, _ in pairs)) if len(pairs) > 1 else 0
    if shared < SHARED_PREFIX_MIN:
        scores = continuation_logprobs(model, [p for p, _ in pairs], [r for _, r in pairs], pad_id(tokenizer), batch_size, device)
        return [-float(s.sum()) for s in scores]
    scores = prefixed_logprobs(model, [(pairs[0][0][:shared], (p + r)[shared:]) for p, r in pairs], pad_id(tokenizer), CANDIDATE_BATCH_TOKENS, device)
    return [-float(s[len(s) - len(r):].sum()) for s, (_, r) in zip(scores, pairs)]


def continuations_nll(model, tokenizer, pairs: list[tuple[list[int], list[int]]], device: str) -> np.ndarray:
    """Negative log-likelihood of each (prefix, continuation) pair's continuation. Pairs that share
    a prefix (the candidates for one canary's secret or one PII span) run it once, and the rows of
    several prefixes share a batch (`prefixed_logprobs`)."""
    return np.array([-float(s.sum()) for s in prefixed_logprobs(model, pairs, pad_id(tokenizer), CANDIDATE_BATCH_TOKENS, device)])


def secret_nll(model, tokenizer, template: CanaryTemplate, canary: Canary, secrets: list[str], device: str) -> np.ndarray:
    """Negative log-likelihood of each candidate secret's own tokens."""
    return continuations_nll(model, tokenizer, [split_at_secret(tokenizer, template, canary, s)[:2] for s in secrets], device)


def candidate_words(canary: Canary, canaries: list[Canary]) -> tuple[str, ...]:
    """The rare words a candidate for this canary's secret may use: not the other canaries' words,
    whose loss their own training lowered (a candidate made of them would outrank by that alone)."""
    others = {w for c in canaries if c.kind == "rare_words" and c.index != canary.index for w in c.secret.split()}
    return tuple(w for w in rare_words() if w not in others)


def candidate_secrets(canary: Canary, spec: CanarySpec, count: int, enumerate_limit: int, seed: int, words: tuple[str, ...] | None = None) -> tuple[list[str], bool]:
    """Every other secret of R when R is small enough (exact), else `count` random others
    (extrapolated), rare-word ones from `words` (candidate_words). The canary's own secret is never
    among them: its loss is the caller's."""
    space = space_size(spec, canary.kind, len(words) if words else None)
    if canary.kind == "digits" and space <= enumerate_limit:
        return [s for s in (str(i).zfill(spec.digits) for i in range(space)) if s != canary.secret], True
    rng = random.Random(f"{seed}:candidates:{canary.index}")
    others: set[str] = set()
    while len(others) < min(count, space - 1):
        candidate = random_secret(spec, canary.kind, rng, words)
        if candidate != canary.secret:
            others.add(candidate)
    return sorted(others), False


def exposure(model, tokenizer, spec: CanarySpec, canary: Canary, options: AuditOptions, device: str, own: float | None = None,
             words: tuple[str, ...] | None = None) -> float:
    """`own`: the canary's loss on this model, if the caller already has it; `words`: the rare words
    its candidates may use (candidate_words)."""
    secrets, exact = candidate_secrets(canary, spec, options.candidates, options.enumerate_limit, options.seed, words)
    if own is None:
        own = own_secret_nll(model, tokenizer, spec.template, [canary], options.batch_size, device)[0]
    losses = secret_nll(model, tokenizer, spec.template, canary, secrets, device)
    if exact:  # all of R: the others, and the canary's own secret at its own loss
        return metrics.exposure_exact(own, np.append(losses, own))
    return metrics.exposure_extrapolated(own, losses, float(space_size(spec, canary.kind, len(words) if words else None)))


def extractions(model, tokenizer, spec: CanarySpec, canaries: list[Canary], samples: int, seed: int, device: str) -> list[dict]:
    """Greedy and sampled continuations of each canary's text up to its secret, all canaries in
    one batched greedy pass and one batched sampled pass, each row under its own kind's budget."""
    prefixes = [split_at_secret(tokenizer, spec.template, c, c.secret)[0] for c in canaries]
    generator = Generator(model, tokenizer, SAMPLING_ROWS, device)
    budgets = [secret_budget_tokens(spec, c.kind) for c in canaries]
    greedy = generator.generate(prefixes, SamplingParams(do_sample=False, max_new_tokens=max(budgets)), seed, "audit: canary extraction", budgets)
    sampled = generator.generate([p for p in prefixes for _ in range(samples)], SamplingParams(do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=max(budgets)), seed,
                                 budgets=[b for b in budgets for _ in range(samples)]) if samples else []

    def recovered(text: str, canary: Canary) -> bool:
        return text.lstrip().startswith(canary.secret)

    return [{"greedy": recovered(greedy[k].text, c), "sampled_hits": sum(recovered(x.text, c) for x in sampled[k * samples : (k + 1) * samples])}
            for k, c in enumerate(canaries)]


# -- models --------------------------------------------------------------------------------------


def load_target(base: dict, adapter_dir: Path | None, device: str, precision: str = "float32"):
    """The base model with the adapter merged in float32, then cast to `precision` (merging in
    bfloat16 would round the adapter's small update into the base weights' coarser steps)."""
    import torch
    from peft import PeftModel

    if adapter_dir is None:
        model, tokenizer = load_causal_lm(ResolvedModel(**base), device, precision)
    else:
        model, tokenizer = load_causal_lm(ResolvedModel(**base), device)
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().to(getattr(torch, precision))
    model.eval()
    return model, tokenizer


def completed(run_dir: Path, stage: str) -> bool:
    return read_manifest(run_dir / "stages" / stage) is not None


def targets_of(run_dir: Path, clients: list[str]) -> list[Target]:
    found = []
    for client in clients:
        adapter = run_dir / "stages/dp_train/clients" / client / "adapter"
        if completed(run_dir, "dp_train") and adapter.is_dir():
            found.append(Target(f"dp_adapter:{client}", adapter))
    if completed(run_dir, "fedtune"):
        found.append(Target("final", run_dir / "stages/fedtune/adapter"))
    return found


def professional_target(run_dir: Path, stages_before: list[str]) -> Target | None:
    """The professional model as a stage after `stages_before` sees it: tuned by a completed
    `tune_professional` (public data) among them, else as named in `models.professional`; None
    without one."""
    if "professional" not in read_json(run_dir / "stages/prepare_models/models.json"):  # its names only: nothing is found or converted
        return None
    tuned = "tune_professional" in stages_before and completed(run_dir, "tune_professional")
    return Target("professional", run_dir / "stages/tune_professional/adapter" if tuned else None, "professional")


def of_kinds(targets: list[Target], kinds: list[str]) -> list[Target]:
    """The targets of the kinds asked for: "dp" (every client's DP adapter), "final"."""
    return [t for t in targets if (t.name.startswith("dp_adapter:") and "dp" in kinds) or (t.name == "final" and "final" in kinds)]


# -- the sections of the report -----------------------------------------------------------------


# a release whose last tenth of training steps averaged this multiple of its best tenth's loss rose
# again before it was saved: a NOT PRIVATE run that did so (lr 0.004, no clipping) forgot the
# canaries it had learned (AUC 0.53 against 0.98 for the same spec's run that did not), so a low
# audited bound on such a release says nothing about privacy
LOSS_ROSE_FACTOR = 1.5
LOSS_WINDOWS = 10


def training_curve(losses: list[dict]) -> dict | None:
    """The loss of a DP adapter's training in tenths of its steps (DP-SGD's step losses are noisy;
    steps with no sampled unit have none): the first, the lowest and the last tenth's means, and
    whether the last rose above LOSS_ROSE_FACTOR times the lowest. None without any loss."""
    values = [float(e["loss"]) for e in losses if e.get("loss") is not None]
    if not values:
        return None
    means = [float(np.mean(chunk)) for chunk in np.array_split(np.asarray(values), min(LOSS_WINDOWS, len(values)))]
    lowest = min(means)
    return {"steps_with_loss": len(values), "windows": len(means), "first": round(means[0], 4), "lowest": round(lowest, 4), "last": round(means[-1], 4),
            "rose_at_end": means[-1] > LOSS_ROSE_FACTOR * lowest}


def training_section(run_dir: Path, targets: list[Target]) -> dict:
    """Each audited DP adapter's training curve, read from its client's loss.json (client side, as
    the audit is): whether the release is the model its training fit, before its figures are read."""
    curves: dict[str, dict] = {}
    for target in targets:
        if target.name.startswith("dp_adapter:") and target.adapter_dir is not None:
            path = target.adapter_dir.parent / "loss.json"
            curve = training_curve(read_json(path)) if path.is_file() else None
            if curve is not None:
                curves[target.name] = curve
    return {"rose_factor": LOSS_ROSE_FACTOR, "releases": curves}


def canary_group_size(spec: PipelineSpec) -> int:
    """Units one canary spans: at record level each copy is a unit; at user level a canary (all
    its copies share a user_id) is one unit."""
    return 1 if spec.privacy.unit == "user" else spec.audit.canaries.repeats


def claimed_for_canaries(entries: list[LedgerEntry], target: str, client: str, group: int) -> dict:
    """The epsilon the audited release claims for one canary (a group of `group` units): for a DP
    adapter, its own release (the client's noised count, which its q and steps are planned from,
    is drawn before the canaries are planted and plans with all of them, planted or not: it depends
    neither on which are in nor on how many; with `count_noise: 0` the exact N, taken as public,
    is planned with every canary too, `unplanted_canary_units`); for the final adapter and the synthetic data, everything this run released from
    the client's data (they are computed from all of it)."""
    mine = [e for e in entries if e.client_id == client and e.counts_against_budget]
    if target.startswith("dp_adapter:"):
        mine = [e for e in mine if e.release == "dp_adapter"][-1:]
    if not mine:
        return {"epsilon": None, "delta": None, "group_size": group, "releases": []}
    delta = mine[-1].delta
    epsilon = group_epsilon([e.effective_mechanism() for e in mine], group, delta)
    return {"epsilon": epsilon, "delta": delta, "group_size": group, "releases": [f"{e.stage}: {e.release}" for e in mine]}


def exposure_sample(canaries: list[Canary], per_kind: int) -> list[Canary]:
    """The first `per_kind` canaries of each kind (their secrets and inclusion are random already)."""
    chosen: list[Canary] = []
    for kind in dict.fromkeys(c.kind for c in canaries):
        chosen += [c for c in canaries if c.kind == kind][:per_kind]
    return chosen


def one_run(scores: list[float], planted: list[bool], options: AuditOptions, delta: float) -> dict:
    if options.in_guesses:
        declared = [(min(options.in_guesses, len(scores)), True)]
    elif options.guesses:
        declared = [(min(options.guesses, len(scores)), False)]
    else:
        declared = metrics.declared_guesses(len(scores))
    return metrics.one_run_audit_declared(scores, planted, declared, delta=delta)


def canary_results(canaries: list[Canary], scores: list[float], options: AuditOptions, delta: float, include_probability: float) -> dict:
    """For each kind and for all canaries together: the one-run epsilon lower bound (its theorem
    needs each canary planted independently with probability 1/2; otherwise None), and the
    canaries as a membership test (planted against not planted, by the same score)."""
    results = {}
    for kind in [*dict.fromkeys(c.kind for c in canaries), "all"]:
        rows = [i for i, c in enumerate(canaries) if kind in ("all", c.kind)]
        planted = [canaries[i].included for i in rows]
        chosen = [scores[i] for i in rows]
        entry = {"canaries": len(rows), "planted": sum(planted), "one_run": one_run(chosen, planted, options, delta) if include_probability == 0.5 else None}
        if 0 < sum(planted) < len(rows):
            inside = [x for x, p in zip(chosen, planted) if p]
            entry["membership"] = metrics.roc(inside, [x for x, p in zip(chosen, planted) if not p], options.bootstrap, options.seed)
        results[kind] = entry
    return results


def canary_section(run_dir: Path, spec: PipelineSpec, load: Callable[[Path | None], tuple], reference, targets: list[Target], options: AuditOptions, device: str) -> dict | None:
    if spec.audit.canaries is None:
        return None
    client = spec.audit.canaries.client
    canary_spec, canaries = read_canaries(read_json(run_dir / "stages/ingest/clients" / client / "canaries.json"))
    template = canary_spec.template
    group = canary_group_size(spec)
    entries = read_stage_ledgers(run_dir, [s.name for s in spec.stages])
    reference_model, tokenizer = reference
    reference_nll = own_secret_nll(reference_model, tokenizer, template, canaries, options.batch_size, device)
    sample = exposure_sample(canaries, options.exposure_canaries)
    planted = [c.included for c in canaries]
    kinds = {kind: {"count": sum(c.kind == kind for c in canaries), "planted": sum(c.included for c in canaries if c.kind == kind),
                    "space_log2": round(space_log2(canary_spec, kind), 3), "exposure_measured": sum(c.kind == kind for c in sample),
                    "method": "exact" if space_size(canary_spec, kind) <= options.enumerate_limit else f"skew-normal fit on {options.candidates} candidates"}
             for kind in canary_spec.kinds}
    section = {"client": client, "score": CANARY_SCORE, "guessing": options.guessing(), "count": len(canaries), "planted": sum(planted), "repeats": canary_spec.repeats, "group_size": group, "kinds": kinds,
               "include_probability": canary_spec.include_probability,
               "canaries": [{"index": c.index, "kind": c.kind, "included": c.included} for c in canaries], "targets": {}}
    for target in [t for t in targets if t.name in (f"dp_adapter:{client}", "final")]:
        model, tokenizer = load(target.adapter_dir)
        console.print(f"audit: canaries on {target.name}")
        target_nll = own_secret_nll(model, tokenizer, template, canaries, options.batch_size, device)
        own = {c.index: target_nll[c.index] for c in sample}
        exposures = {c.index: round(exposure(model, tokenizer, canary_spec, c, options, device, own[c.index], candidate_words(c, canaries) if c.kind == "rare_words" else None), 4)
                     for c in track(sample, f"exposure on {target.name}", total=len(sample))}
        extracted = extractions(model, tokenizer, canary_spec, sample, options.extraction_samples, options.seed, device) if sample else []
        scores = [r - t for r, t in zip(reference_nll, target_nll)]  # how far training lowered the secret's loss
        claimed = claimed_for_canaries(entries, target.name, client, group)
        by_kind = canary_results(canaries, scores, options, claimed["delta"] or 0.0, canary_spec.include_probability)
        for kind, entry in by_kind.items():
            def of_kind(c: Canary) -> bool:
                return kind in ("all", c.kind)

            mine = [c for c in sample if of_kind(c)]
            entry.update(
                mean_exposure_planted=_mean([exposures[c.index] for c in mine if c.included]),
                mean_exposure_not_planted=_mean([exposures[c.index] for c in mine if not c.included]),
                greedy_extracted_planted=sum(x["greedy"] for x, c in zip(extracted, sample) if of_kind(c) and c.included),
                greedy_extracted_not_planted=sum(x["greedy"] for x, c in zip(extracted, sample) if of_kind(c) and not c.included),
                sampled_extracted_planted=sum(x["sampled_hits"] > 0 for x, c in zip(extracted, sample) if of_kind(c) and c.included),
                tried_planted=sum(c.included for c in mine))
        section["targets"][target.name] = {
            "release": target.release, "claimed": claimed, "exposure": {str(i): e for i, e in exposures.items()},
            "loss_drop_vs_base": [round(x, 4) for x in scores], "samples_per_canary": options.extraction_samples, "kinds": by_kind,
        }
    synthetic = synthetic_texts(run_dir, client)
    if synthetic:
        section["targets"]["synthetic_data"] = synthetic_canary_audit(canaries, synthetic, claimed_for_canaries(entries, "synthetic_data", client, group), options,
                                                                      canary_spec.include_probability)
    return section


def secret_parts(canary: Canary) -> list[str]:
    """What of a secret can turn up on its own: a rare word, or the whole digit string."""
    return canary.secret.split() if canary.kind == "rare_words" else [canary.secret]


def synthetic_canary_audit(canaries: list[Canary], synthetic: list[str], claimed: dict, options: AuditOptions, include_probability: float = 0.5) -> dict:
    """The synthetic data as a release: how much of each canary's secret it contains (the share of
    its rare words, or its digit string, found on word boundaries), scored the same way for planted
    and not planted canaries, so the one-run bound applies to the synthetic data itself."""
    corpus = "\n".join(synthetic).lower()

    def found(part: str) -> bool:
        return re.search(rf"(?<!\w){re.escape(part.lower())}(?!\w)", corpus) is not None

    scores = [float(np.mean([found(p) for p in secret_parts(c)])) for c in canaries]
    by_kind = canary_results(canaries, scores, options, claimed["delta"] or 0.0, include_probability)
    for kind in by_kind:
        rows = [(c, x) for c, x in zip(canaries, scores) if kind in ("all", c.kind)]
        by_kind[kind].update(whole_secret_found_planted=sum(x == 1.0 for c, x in rows if c.included),
                             whole_secret_found_not_planted=sum(x == 1.0 for c, x in rows if not c.included))
    return {"release": f"the synthetic data made from the canary client's DP adapter ({len(synthetic)} records)", "claimed": claimed,
            "secret_share_found": [round(x, 4) for x in scores], "kinds": by_kind}


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def mia_sequences(tokenizer, records: list[InstructionRecord], max_length: int) -> list[list[int]]:
    from knowledgesg.sft import tokenize_example  # imports torch and opacus: not when `ksg` starts

    return [tokenize_example(tokenizer, r, max_length, "all").input_ids for r in records]


def mia_scores(model, tokenizer, reference_logprobs: list[np.ndarray], sequences: list[list[int]], options: AuditOptions, device: str) -> dict[str, list[float]]:
    """Every membership score from one pass of the target over the records' token ids (the
    variants reuse its per-token statistics) and the reference model's per-token log-probabilities."""

    target = token_statistics(model, sequences, pad_id(tokenizer), options.batch_size, device, "audit: membership scores")
    # zlib's entropy of the text the log-probabilities are over: the record as cut to max_length
    # (the whole record's had divided a truncated sum by a longer text's entropy, adding length noise)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in sequences]
    return {
        "loss": [metrics.score_loss(t["logprobs"]) for t in target],
        "zlib": [metrics.score_zlib(t["logprobs"], text) for t, text in zip(target, texts)],
        "reference": [metrics.score_reference(t["logprobs"], r) for t, r in zip(target, reference_logprobs)],
        "min_k": [metrics.score_min_k(t["logprobs"]) for t in target],
        "min_k_plus_plus": [metrics.score_min_k_plus_plus(t["logprobs"], t["mu"], t["sigma"]) for t in target],
        "rmia": [metrics.score_rmia(t["logprobs"], r) for t, r in zip(target, reference_logprobs)],
    }


def trained_indices(run_dir: Path, spec: PipelineSpec, client: str, records: list[InstructionRecord]) -> list[int]:
    """Which of a client's ingested instruction records dp_train trained on: each unit's first
    records only, as many as its privacy.json's bound (a user's, or a source document's where the
    spec says the client's records come from documents); the rest were never trained."""
    trained = run_dir / "stages/dp_train/clients" / client / "privacy.json"
    if not trained.is_file():
        return list(range(len(records)))
    statement = read_json(trained)
    # the unit dp_train stated: a source document also where it trained on structure's pairs
    documents = statement.get("unit") == "source_document" or spec.clients.holds_documents(client)
    return sorted(i for unit in privacy_units(records, spec.privacy.unit, statement["max_records_per_unit"], documents=documents).members for i in unit)


def mia_records(run_dir: Path, spec: PipelineSpec, client: str, options: AuditOptions) -> tuple[list[InstructionRecord], list[InstructionRecord]]:
    """(members sampled from the records dp_train trained on, the client's held-out non-members)."""
    records = [InstructionRecord.model_validate(r) for r in read_jsonl(run_dir / "stages/ingest/clients" / client / "records.jsonl")
               if r["kind"] == "instruction" and r["source"] != "canary"]
    members = [records[i] for i in trained_indices(run_dir, spec, client, records)]
    holdout = [InstructionRecord.model_validate(r) for r in read_jsonl(run_dir / "stages/ingest/clients" / client / "holdout.jsonl")]
    wanted = options.mia_members or len(holdout)
    return random.Random(f"{options.seed}:members:{client}").sample(members, min(wanted, len(members))), holdout


def mia_section(run_dir: Path, spec: PipelineSpec, load: Callable[[Path | None], tuple], reference, targets: list[Target], clients: list[str], options: AuditOptions, device: str) -> dict | None:
    if not spec.audit.holdout_per_client:
        return None
    reference_model, tokenizer = reference
    records = {client: mia_records(run_dir, spec, client, options) for client in clients}
    # tokenised once (every model shares the base tokenizer); (client, 0) members, (client, 1) non-members
    sequences = {(client, side): mia_sequences(tokenizer, group, options.max_length) for client, pair in records.items() for side, group in enumerate(pair)}
    reference_cache: dict[tuple[str, int], list[np.ndarray]] = {}

    def reference_logprobs(client: str, side: int) -> list[np.ndarray]:
        """The base model's pass over a record set, shared by every target that audits it."""
        if (client, side) not in reference_cache:
            # the reference and RMIA scores read the base model's log-probabilities only, not Min-K%++'s moments
            stats = token_statistics(reference_model, sequences[(client, side)], pad_id(tokenizer), options.batch_size, device, "audit: reference scores", moments=False)
            reference_cache[(client, side)] = [t["logprobs"] for t in stats]
        return reference_cache[(client, side)]

    section = {}
    for target in targets:
        model, tokenizer = load(target.adapter_dir)
        console.print(f"audit: membership inference on {target.name}")
        audited = [target.name.split(":", 1)[1]] if target.name.startswith("dp_adapter:") else clients
        for client in audited:
            members, holdout = records[client]
            inside = mia_scores(model, tokenizer, reference_logprobs(client, 0), sequences[(client, 0)], options, device)
            outside = mia_scores(model, tokenizer, reference_logprobs(client, 1), sequences[(client, 1)], options, device)
            section[f"{target.name}|{client}"] = {"release": target.release, "members": len(members), "non_members": len(holdout),
                                                  "scores": {name: metrics.roc(inside[name], outside[name], options.bootstrap, options.seed) for name in inside}}
    return section


def word_spans(text: str, n: int) -> set[str]:
    tokens = re.findall(r"\w+", text.lower())
    return {" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


SYNTHETIC_FILES = {"refine": "refined.jsonl", "synthesize": "synthetic.jsonl"}


def synthetic_texts(run_dir: Path, client: str, stages: tuple[str, ...] = ("refine", "synthesize")) -> list[str]:
    """The client's synthetic records as texts, from the first of `stages` that has completed."""
    for stage in stages:
        path = run_dir / "stages" / stage / "clients" / client / SYNTHETIC_FILES[stage]
        if completed(run_dir, stage) and path.is_file():
            return [pair_text(r) for r in read_jsonl(path)]
    return []


def pair_text(row: dict) -> str:
    """A synthetic pair as one text (what fidelity and the overlap search compare with private records)."""
    return f"{row['instruction']}\n{row['input']}\n{row['response']}"


def private_texts(run_dir: Path, client: str) -> list[str]:
    rows = read_jsonl(run_dir / "stages/ingest/clients" / client / "records.jsonl")
    return [f"{r['instruction']}\n{r.get('input', '')}\n{r['response']}" if r["kind"] == "instruction" else r["text"] for r in rows]


def overlap_section(run_dir: Path, clients: list[str]) -> dict:
    section = {}
    for client in clients:
        synthetic = synthetic_texts(run_dir, client)
        copied = sharing_private_spans(synthetic, private_texts(run_dir, client), public_prompts(run_dir, client), OVERLAP_WORDS)
        section[client] = {"synthetic": len(synthetic), f"with_a_private_{OVERLAP_WORDS}_word_span": len(copied)}
    return section


def sharing_private_spans(synthetic: list[str], private: list[str], public: list[str], n: int) -> list[str]:
    """The synthetic texts that share an n-word span with a private text. Spans that also occur in
    the public prompts do not count: private records and synthetic ones repeat the same public
    instruction ("What is the sentiment of this news? ..."), which is no leak."""
    public_spans = set().union(*(line_spans(t, n) for t in public))
    private_spans = set().union(*(line_spans(t, n) for t in private)) - public_spans
    return [t for t in synthetic if line_spans(t, n) & private_spans]


def line_spans(text: str, n: int) -> set[str]:
    """Spans within one line: a record's fields are joined by line breaks, and a span that runs
    from the public instruction into the input would match every record that starts alike."""
    return set().union(*(word_spans(line, n) for line in text.split("\n")))


def public_prompts(run_dir: Path, client: str) -> list[str]:
    """The first-pass prompts synthesize sent for this client: public seeds only, by construction."""
    path = run_dir / "stages/synthesize/clients" / client / "prompts.jsonl"
    return [r["prompt"] for r in read_jsonl(path) if r["pass"] == 1] if completed(run_dir, "synthesize") and path.is_file() else []


def generations(model, tokenizer, spec: PipelineSpec, count: int, seed: int, device: str) -> list[str]:
    """Samples from public prompts only: the synthesize stage's seeds, or a neutral instruction."""
    stage = next((s for s in spec.stages if s.name == "synthesize"), None)
    seeds = [Seed.model_validate(s) for s in stage.params.get("seeds", [])] if stage else []
    seeds = seeds or [Seed(instruction="Write a short note.")]
    prompts = [tokenizer(user_turn_prefix(tokenizer, seeds[i % len(seeds)]), add_special_tokens=False)["input_ids"] for i in range(count)]
    completions = Generator(model, tokenizer, SAMPLING_ROWS, device).generate(prompts, SamplingParams(do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=64), seed, "audit: sampling")
    return [c.text for c in completions]


FIELDS = ("instruction", "input", "response")


@dataclass(frozen=True)
class PiiTarget:
    """One PII span in one private training record: what the targeted attacks go after."""

    client: str
    record: InstructionRecord
    field: str
    span: PiiSpan

    def with_value(self, value: str) -> InstructionRecord:
        text = getattr(self.record, self.field)
        return self.record.model_copy(update={self.field: text[: self.span.start] + value + text[self.span.end :]})

    def marked(self) -> InstructionRecord:
        return self.with_value(SENTINEL + self.span.value)


def trained_fields(spec: PipelineSpec) -> tuple[str, ...]:
    """The record fields DP training put in its loss: the response, and the user turn with
    `loss_on: all`. A span elsewhere was never a target the model was trained to write."""
    stage = next((s for s in spec.stages if s.name == "dp_train"), None)
    return FIELDS if stage is not None and stage.params.get("loss_on") == "all" else ("response",)


def pii_targets(run_dir: Path, clients: list[str], fields: tuple[str, ...], options: AuditOptions) -> tuple[dict[str, dict[str, str]], list[PiiTarget]]:
    """(each client's PII values -> their type, found in all its private data; a seeded sample of
    at most `pii_occurrences` spans per client in the trained fields of its training records, to
    attack)."""
    found: dict[str, dict[str, str]] = {}
    chosen: list[PiiTarget] = []
    for client in clients:
        rows = read_jsonl(run_dir / "stages/ingest/clients" / client / "records.jsonl")
        records = [InstructionRecord.model_validate(r) for r in rows if r["kind"] == "instruction" and r["source"] != "canary"]
        documents = [r["text"] for r in rows if r["kind"] == "text"]
        texts = [getattr(r, field) for r in records for field in FIELDS] + documents
        spans = find_pii_spans(texts)
        found[client] = {}
        for span in spans:
            found[client].setdefault(span.value, span.kind)
        mine = [PiiTarget(client, records[s.text // len(FIELDS)], FIELDS[s.text % len(FIELDS)], s) for s in spans
                if s.text < len(FIELDS) * len(records) and FIELDS[s.text % len(FIELDS)] in fields]
        chosen += random.Random(f"{options.seed}:pii:{client}").sample(mine, min(options.pii_occurrences, len(mine)))
    return found, chosen


@dataclass(frozen=True)
class ReplayControl:
    """A client's records that hold a PII value found in no other record of any client's private
    data (any field, documents too), by whether the record was trained on or held out: each
    record as the list of such values it holds. The holdout is chosen by each record's content,
    as any other record could have been, so a held-out record's value is as likely to be written
    by chance as a trained one's: only memorisation makes the trained ones likelier. A value found
    elsewhere too is left out: the model may have seen it in another record, field or client."""

    trained: list[list[str]]
    held_out: list[list[str]]


def replay_controls(run_dir: Path, spec: PipelineSpec, clients: list[str], fields: tuple[str, ...]) -> dict[str, ReplayControl]:
    """Each client's ReplayControl, for the clients that held records out (`audit.holdout_per_client`);
    the values are found by presidio in the trained fields and must occur verbatim nowhere else."""
    texts: list[tuple[str, str, int, str]] = []  # (client, "trained" or "held_out", record, the record's whole text)
    candidates: dict[str, set[str]] = {}
    for client in clients:
        ingest = run_dir / "stages/ingest/clients" / client
        rows = [r for r in read_jsonl(ingest / "records.jsonl") if r.get("source") != "canary"]
        held = [InstructionRecord.model_validate(r) for r in read_jsonl(ingest / "holdout.jsonl")] if (ingest / "holdout.jsonl").is_file() else []
        instructions = [InstructionRecord.model_validate(r) for r in rows if r["kind"] == "instruction"]
        kept = set(trained_indices(run_dir, spec, client, instructions))
        trained = [r for i, r in enumerate(instructions) if i in kept]
        # a record past its unit's bound was never trained, nor held out: its values only rule others out
        texts += [(client, "trained" if i in kept else "untrained", i, "\n".join(getattr(r, f) for f in FIELDS)) for i, r in enumerate(instructions)]
        texts += [(client, "trained", len(instructions) + i, r["text"]) for i, r in enumerate(x for x in rows if x["kind"] == "text")]
        texts += [(client, "held_out", i, "\n".join(getattr(r, f) for f in FIELDS)) for i, r in enumerate(held)]
        if held:
            candidates[client] = {span.value for span in find_pii_spans([getattr(r, f) for r in trained + held for f in fields])}
    controls = {client: ReplayControl([], []) for client in candidates}
    by_record: dict[tuple[str, str, int], list[str]] = {}
    for value in sorted(set().union(*candidates.values()) if candidates else ()):
        holders = [(client, side, i) for client, side, i, text in texts if occurs(value, text)]
        if len(holders) == 1 and holders[0][0] in controls:
            by_record.setdefault(holders[0], []).append(value)
    for (client, side, _), values in sorted(by_record.items()):
        if side != "untrained":
            getattr(controls[client], side).append(values)
    return controls


def control_comparison(controls: list[ReplayControl], texts: list[str]) -> dict | None:
    """How many trained and how many held-out records (of `controls`) have a value of theirs
    written in `texts`, each share with its 95% Wilson interval, and the difference trained -
    held-out with Newcombe's interval. Records, not values, are counted: a record's values go to
    one side together and are written together, so they are not independent trials. Above 0,
    the texts write trained records' values more often than those of records the model never
    saw (memorisation); otherwise the replays are no more than chance at this audit's size.
    None without texts or without records on either side."""
    trained = [values for c in controls for values in c.trained]
    held_out = [values for c in controls for values in c.held_out]
    if not texts or not trained or not held_out:
        return None
    joined = "\n".join(texts)

    def written(records: list[list[str]]) -> int:
        return sum(any(occurs(v, joined) for v in values) for values in records)

    hits_t, hits_h = written(trained), written(held_out)
    share_t, share_h = hits_t / len(trained), hits_h / len(held_out)
    difference = metrics.difference_interval(hits_t, len(trained), hits_h, len(held_out))
    return {"trained": {"records": len(trained), "values": sum(map(len, trained)), "replayed": hits_t, "share": round(share_t, 4), "ci": metrics.wilson_interval(hits_t, len(trained))},
            "held_out": {"records": len(held_out), "values": sum(map(len, held_out)), "replayed": hits_h, "share": round(share_h, 4), "ci": metrics.wilson_interval(hits_h, len(held_out))},
            "difference": round(share_t - share_h, 4), "difference_ci": difference, "more_than_held_out": difference[0] > 0}


def pii_attacks(model, tokenizer, targets: list[PiiTarget], found: dict[str, dict[str, str]], options: AuditOptions, device: str) -> list[dict]:
    """The attacks of Lukas et al. (IEEE S&P 2023) on each PII span, with the attacker holding the
    record's text before the span (extraction), or the whole record with the span masked
    (reconstruction, inference):

    - extraction: `pii_attack_samples` sampled continuations of the text before the span, as many
      tokens as the value takes and 4 more; hit if one of them writes the value verbatim;
    - reconstruction: the PII of the span's type that those samples wrote are the candidates, each
      filled into the masked record and ranked by the model's likelihood of the record from the
      span on (`pii_score` "record"), of the span and the rest of its sentence ("sentence") or of
      its own tokens there ("value"); hit if the best is the true value;
    - inference: the candidates are the true value and `pii_candidates - 1` other values of the
      same type from the same client's private data, in a seeded random order; hit if the model
      ranks the true one first (chance 1/k).
    """
    n = options.pii_attack_samples
    samples = extraction_samples(model, tokenizer, targets, n, options.seed, device)
    written = find_pii_spans([text for group in samples for text in group])
    candidate_sets = []
    for k, target in enumerate(targets):
        reconstruct = sorted({s.value for s in written if s.text // n == k and s.kind == target.span.kind})
        others = sorted(v for v, kind in found[target.client].items() if kind == target.span.kind and v != target.span.value)
        rng = random.Random(f"{options.seed}:pii-inference:{target.record.id}:{target.span.start}")
        infer = [target.span.value, *rng.sample(others, min(options.pii_candidates - 1, len(others)))]
        rng.shuffle(infer)  # a tie goes to whichever comes first: not always the true value
        candidate_sets.append((reconstruct, infer))
    pairs, scored, owners = [], {}, []
    for k, (target, (reconstruct, infer)) in enumerate(zip(targets, candidate_sets)):
        for attack, values in (("reconstruction", reconstruct), ("inference", infer)):
            if attack == "reconstruction" and target.span.value not in reconstruct:
                continue  # the samples never wrote the true value: a miss, whichever of theirs ranks first
            for value in values:
                if (k, value) not in scored:  # a value both attacks rank (the true one, reconstructed) is scored once
                    scored[(k, value)] = len(pairs)
                    pairs.append(candidate_pair(tokenizer, target, value, options.pii_score))
                owners.append((k, attack, value))
    nll = continuations_nll(model, tokenizer, pairs, device) if pairs else np.empty(0)
    best: dict[tuple[int, str], tuple[float, str]] = {}
    for k, attack, value in owners:
        loss = float(nll[scored[(k, value)]])
        if (k, attack) not in best or loss < best[(k, attack)][0]:
            best[(k, attack)] = (loss, value)
    results = []
    for k, (target, (reconstruct, infer)) in enumerate(zip(targets, candidate_sets)):
        results.append({"extracted": any(occurs(target.span.value, text) for text in samples[k]),
                        "reconstructed": target.span.value in reconstruct and best[(k, "reconstruction")][1] == target.span.value,
                        "inferred": best[(k, "inference")][1] == target.span.value if len(infer) > 1 else None, "choices": len(infer)})
    return results


def extraction_samples(model, tokenizer, targets: list[PiiTarget], n: int, seed: int, device: str) -> list[list[str]]:
    """`n` sampled continuations of the text before each span, at most as many tokens as the span's
    own value takes and 4 more, whatever other spans are attacked beside it (one budget for all let
    a 16-token address make every name's samples 20 tokens long): one batched call, each row
    leaving at its own budget."""
    prefixes = [split_span(tokenizer, t.record, t.marked(), len(t.span.value))[0] for t in targets]
    budgets = [len(tokenizer(t.span.value, add_special_tokens=False)["input_ids"]) + 4 for t in targets]
    completions = Generator(model, tokenizer, SAMPLING_ROWS, device).generate([p for p in prefixes for _ in range(n)], SamplingParams(do_sample=True, temperature=1.0, top_p=1.0,
                                                                   max_new_tokens=max(budgets)), seed, "audit: PII extraction", [b for b in budgets for _ in range(n)])
    return [[c.text for c in completions[k * n : (k + 1) * n]] for k in range(len(targets))]


def candidate_pair(tokenizer, target: PiiTarget, value: str, scored: str) -> tuple[list[int], list[int]]:
    """(the ids before the span, the ids whose likelihood ranks `value` there): the record from the
    value to its end, with `scored` "sentence" the value and the rest of its sentence, or with
    "value" the value's own tokens."""
    if scored == "sentence":
        before, sentence, _ = split_span(tokenizer, target.with_value(value), target.marked(), len(value) + sentence_tail(target))
        return before, sentence
    before, span, after = split_span(tokenizer, target.with_value(value), target.marked(), len(value))
    return before, span + after if scored == "record" else span


SENTENCE_END = re.compile(r"[.!?](?=\s)|\n")


def sentence_tail(target: PiiTarget) -> int:
    """Characters from the end of the span to the end of its sentence (its terminal mark or line
    break included; the end of the field where none comes first)."""
    text = getattr(target.record, target.field)
    end = SENTENCE_END.search(text, target.span.end)
    return (end.end() if end else len(text)) - target.span.end


def attack_summary(results: list[dict], baseline: list[dict]) -> dict:
    """Rates with 95% Wilson intervals, and the hits the base model did not also make."""
    summary = {"spans": len(results)}
    for attack, key in (("extraction", "extracted"), ("reconstruction", "reconstructed"), ("inference", "inferred")):
        rows = [(r[key], b[key]) for r, b in zip(results, baseline) if r[key] is not None]
        hits = sum(bool(r) for r, _ in rows)
        summary[attack] = {"tried": len(rows), "hits": hits, "rate": round(hits / len(rows), 4) if rows else None, "ci": metrics.wilson_interval(hits, len(rows)),
                           "hits_not_by_base": sum(bool(r) and not b for r, b in rows)}
    chances = [1 / r["choices"] for r in results if r["inferred"] is not None]
    summary["inference"]["chance"] = round(float(np.mean(chances)), 4) if chances else None
    return summary


def values_trained_on(target: str, by_client: dict[str, dict[str, str]], found: dict[str, str]) -> dict[str, str]:
    """The private PII values a released model could have learned: a client's DP adapter saw its own
    client's records only (a value only another client holds, written by it, is no replay of
    training data); a model of the synthetic data, every client's."""
    if target.startswith("dp_adapter:"):
        return by_client.get(target.split(":", 1)[1], {})
    return found


def pii_section(run_dir: Path, spec: PipelineSpec, load: Callable[[Path | None], tuple], reference, targets: list[Target], clients: list[str], options: AuditOptions, device: str) -> dict:
    """PII of the private data: replayed verbatim in the synthetic data and in samples from each
    released model from public prompts (beyond what the base model writes from the same prompts),
    and the targeted attacks of Lukas et al. on spans of the training records, each model against
    the base model on the same spans."""
    fields = trained_fields(spec)
    by_client, attacked = pii_targets(run_dir, clients, fields, options)
    found = {value: kind for values in by_client.values() for value, kind in values.items()}
    synthetic = [t for client in clients for t in synthetic_texts(run_dir, client)]
    controls = replay_controls(run_dir, spec, clients, fields)
    section = {"private_pii_values": len(found), "by_type": _count_types(found),
               "replayed_in_synthetic": len(replayed(found, synthetic)), "synthetic_texts": len(synthetic), "models": {},
               "control": {"clients": sorted(controls), "synthetic": control_comparison(list(controls.values()), synthetic)}}
    if not found:
        return section
    base_model, tokenizer = reference
    base_samples = generations(base_model, tokenizer, spec, options.pii_samples, options.seed, device) if options.pii_samples else []
    base_replays = replayed(found, base_samples)
    base_attacks = pii_attacks(base_model, tokenizer, attacked, by_client, options, device) if attacked else []
    section.update(samples_per_model=options.pii_samples, replayed_by_base=len(base_replays), base_replay_rate=replay_rate(base_replays, base_samples), attacked_spans=len(attacked),
                   attack_samples_per_span=options.pii_attack_samples, candidate_score=options.pii_score, attacked_types=_count_types({f"{t.client}:{i}": t.span.kind for i, t in enumerate(attacked)}),
                   base_attacks=attack_summary(base_attacks, base_attacks) if attacked else None)
    if options.pii_samples:
        section["control"]["base"] = control_comparison(list(controls.values()), base_samples)
    for target in targets:
        model, tokenizer = load(target.adapter_dir)
        entry: dict = {"release": target.release}
        if options.pii_samples:
            samples = generations(model, tokenizer, spec, options.pii_samples, options.seed, device)
            replays = replayed(values_trained_on(target.name, by_client, found), samples)
            beyond = {v: k for v, k in replays.items() if v not in base_replays}
            entry.update(replayed=len(replays), replayed_not_by_base=len(beyond), types_not_by_base=_count_types(beyond), replay_rate=replay_rate(beyond, samples))
            # a client's DP adapter saw that client's records only: its control is that client's values
            own = [c for client, c in controls.items() if not target.name.startswith("dp_adapter:") or target.name == f"dp_adapter:{client}"]
            entry["control"] = control_comparison(own, samples)
        rows = [i for i, t in enumerate(attacked) if not target.name.startswith("dp_adapter:") or t.client == target.name.split(":", 1)[1]]
        if rows:
            results = pii_attacks(model, tokenizer, [attacked[i] for i in rows], by_client, options, device)
            entry["attacks"] = attack_summary(results, [base_attacks[i] for i in rows])
        section["models"][target.name] = entry
    return section


def replay_rate(values: dict[str, str], samples: list[str]) -> dict:
    """The share of `samples` that write at least one of `values` verbatim, with its 95% Wilson
    interval: for a release, the private values the base model's samples from the same prompts
    did not write; for the base model, any private value. A count of values says how much leaked;
    this says how likely one sample is to leak, and how sure the audit is of it."""
    hits = sum(any(occurs(value, text) for value in values) for text in samples)
    return {"tried": len(samples), "hits": hits, "rate": round(hits / len(samples), 4) if samples else None, "ci": metrics.wilson_interval(hits, len(samples))}


def _count_types(values: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for kind in values.values():
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def claimed_epsilons(run_dir: Path, spec: PipelineSpec) -> dict[str, float]:
    """Each client's record-level total over this run's releases (per unit, not per canary), as the
    privacy report computes it (one release: its own recorded figures, no accountant rerun)."""
    entries = read_stage_ledgers(run_dir, [s.name for s in spec.stages])
    totals = {}
    for client in dict.fromkeys(e.client_id for e in entries):
        mine = [e for e in entries if e.client_id == client]
        if any(e.counts_against_budget for e in mine):
            totals[client] = composed_total(mine, client_delta(mine)).reported
    return totals


def run_audit(run_dir: Path, options: AuditOptions) -> dict:
    spec, _ = load_run_spec(run_dir)
    if not completed(run_dir, "ingest") or not completed(run_dir, "prepare_models"):
        raise InputError(f"{run_dir}: the audit needs completed prepare_models and ingest stages")
    base = run_models(run_dir, ["base"])["base"]
    clients = list(read_json(run_dir / "stages/ingest/partition.json")["clients"])
    targets = of_kinds(targets_of(run_dir, clients), options.models)
    if not targets:
        raise InputError(f"{run_dir}: no released model of the kinds asked for ({', '.join(options.models)}) to audit yet (run dp_train or fedtune first)")
    device = resolve_device(spec.models.device)
    options = options.model_copy(update={"precision": resolve_precision(options.precision, device)})  # the report says which ran
    # every section loads the same releases, each walking them in the same order: all stay loaded (a smaller cache would
    # evict each one just before it is asked for again); the demo's base model, 3 DP adapters and final one: 1.4 GB in bfloat16
    load = lru_cache(maxsize=len(targets) + 1)(partial(load_target, base, device=device, precision=options.precision))
    reference = load(None)  # the base model: every section compares against it
    report = {"run_dir": str(run_dir), "spec_name": spec.name, "options": options.model_dump(), "targets": [t.name for t in targets],
              "releases": {t.name: t.release for t in targets}, "claimed_epsilon": claimed_epsilons(run_dir, spec), "seconds": {}}
    sections = {"training": lambda: training_section(run_dir, targets),
                "canaries": lambda: canary_section(run_dir, spec, load, reference, targets, options, device),
                "membership_inference": lambda: mia_section(run_dir, spec, load, reference, targets, clients, options, device),
                "synthetic_overlap": lambda: overlap_section(run_dir, clients),
                "pii": lambda: pii_section(run_dir, spec, load, reference, targets, clients, options, device)}
    for name, section in sections.items():
        start = time.perf_counter()
        report[name] = section()
        report["seconds"][name] = round(time.perf_counter() - start, 1)
    return report
