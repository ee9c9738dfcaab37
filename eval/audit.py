"""`ksg audit RUN`: what the released models and data leak about the private records.

The audit runs with the client's data (the canaries' secrets, the held-out records): it is the
data owner checking the releases, not something the server could run. For each released model
(each client's DP adapter, and the final federated adapter), against the base model:

- canaries: exposure of every canary (planted and not planted), and extraction: the canary's text
  up to its secret as the prompt, greedy and sampled decoding, exact recoveries counted;
- the one-run epsilon lower bound (Steinke et al. 2023, with its delta term) from the planted and
  not planted canaries, scored by how much the model lowered the secret's loss relative to the
  base model, beside the epsilon it must stay below: the claimed epsilon of the canary's unit,
  which for a canary repeated k times at record level is the group epsilon of k records;
- membership inference of training records against the held-out ones (loss, zlib, reference,
  Min-K%, Min-K%++: AUC and TPR at 1% FPR);
- verbatim overlap between the synthetic data and the private data (8-word spans);
- PII replay: PII found in the private data that reappears verbatim in the synthetic data, or in
  samples from the final model beyond what the base model produces from the same prompts.

Writes `RUN/audit/audit_report.json` and `audit_report.html` (plots embedded).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from eval import metrics
from eval.canaries import Canary, read_canaries
from knowledgesg.console import console, track
from knowledgesg.errors import InputError
from knowledgesg.fileio import read_json, read_jsonl
from knowledgesg.manifest import read_manifest
from knowledgesg.prompts import Seed, user_message, user_turn_prefix
from knowledgesg.records import InstructionRecord
from knowledgesg.spec import CanaryTemplate, PipelineSpec
from privacy.accounting import group_epsilon
from privacy.ledger import LedgerEntry, compose, read_stage_ledgers

SENTINEL = "\ue000"
OVERLAP_WORDS = 8


class AuditOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    candidates: int = Field(default=200, ge=20, description="random candidate secrets per canary for the skew-normal fit")
    enumerate_limit: int = Field(default=2000, ge=10, description="enumerate every candidate when the space is at most this large")
    extraction_samples: int = Field(default=8, ge=0, description="sampled decodings per canary prompt")
    guesses: int | None = Field(default=None, ge=2, description="one-run audit: guesses (default: every canary)")
    mia_members: int = Field(default=200, ge=2)
    pii_samples: int = Field(default=32, ge=0, description="generations per model for PII replay")
    max_length: int = Field(default=128, ge=16)
    batch_size: int = Field(default=16, ge=1)
    models: list[Literal["dp", "final"]] = Field(default_factory=lambda: ["dp", "final"], min_length=1, description="released models to audit")
    seed: int = 0


@dataclass
class Target:
    name: str  # "dp_adapter:<client>" or "final"
    adapter_dir: Path | None  # None: the base model itself


# -- tokenisation of a canary, split where its secret starts ------------------------------------


def render_prompt(tokenizer, user: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False)


def split_at_secret(tokenizer, template: CanaryTemplate, canary: Canary, secret: str) -> tuple[list[int], list[int]]:
    """(ids before the secret, ids from the secret to the end), tokenised as training saw them:
    the chat prompt, then the response and end-of-turn token tokenised on their own."""

    record, marked = canary.record(template, secret), canary.record(template, SENTINEL)
    response = tokenizer(record.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_text = render_prompt(tokenizer, user_message(record))
    marked_prompt = render_prompt(tokenizer, user_message(marked))
    if SENTINEL in marked_prompt:
        ids, k = _split(tokenizer, prompt_text, marked_prompt.index(SENTINEL))
        return ids[:k], ids[k:] + response
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    ids, k = _split(tokenizer, record.response, marked.response.index(SENTINEL))
    return prompt + ids[:k], ids[k:] + [tokenizer.eos_token_id]


def _split(tokenizer, text: str, start: int) -> tuple[list[int], int]:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    k = next(i for i, (_, end) in enumerate(encoded["offset_mapping"]) if end > start)
    return encoded["input_ids"], k


def own_secret_nll(model, tokenizer, template: CanaryTemplate, canaries: list[Canary], batch_size: int, device: str) -> list[float]:
    """Each canary's negative log-likelihood of the text from its own secret on: one batched,
    length-grouped pass over all canaries."""
    from knowledgesg.scoring import continuation_logprobs, pad_id

    pairs = [split_at_secret(tokenizer, template, c, c.secret) for c in canaries]
    scores = continuation_logprobs(model, [p for p, _ in pairs], [r for _, r in pairs], pad_id(tokenizer), batch_size, device)
    return [-float(s.sum()) for s in scores]


def secret_nll(model, tokenizer, template: CanaryTemplate, canary: Canary, secrets: list[str], batch_size: int, device: str) -> np.ndarray:
    """Negative log-likelihood of the text from the secret on, for each candidate secret. The
    candidates share the canary's text before the secret: it is run once per distinct prefix
    (`shared_prefix_logprobs`)."""
    from knowledgesg.scoring import pad_id, shared_prefix_logprobs

    pairs = [split_at_secret(tokenizer, template, canary, s) for s in secrets]
    by_prefix: dict[tuple[int, ...], list[int]] = {}
    for i, (prefix, _) in enumerate(pairs):
        by_prefix.setdefault(tuple(prefix), []).append(i)
    nll = np.empty(len(secrets))
    for prefix, rows in by_prefix.items():
        # a candidate row is the secret and the text after it (about a dozen tokens), so even
        # 32 rows are fewer tokens than the batch_size rows of whole prompts the option sizes
        for i, scores in zip(rows, shared_prefix_logprobs(model, list(prefix), [pairs[i][1] for i in rows], pad_id(tokenizer), max(batch_size, 32), device)):
            nll[i] = -float(scores.sum())
    return nll


def candidate_secrets(canary: Canary, digits: int, count: int, enumerate_limit: int, seed: int) -> tuple[list[str], bool]:
    """Every secret of R when R is small enough (exact), else `count` random others (extrapolated)."""
    space = 10**digits
    if space <= enumerate_limit:
        return [str(i).zfill(digits) for i in range(space)], True
    rng = random.Random(f"{seed}:candidates:{canary.index}")
    others: set[str] = set()
    while len(others) < count:
        candidate = "".join(rng.choice("0123456789") for _ in range(digits))
        if candidate != canary.secret:
            others.add(candidate)
    return sorted(others), False


def exposure(model, tokenizer, template: CanaryTemplate, canary: Canary, digits: int, options: AuditOptions, device: str, own: float | None = None) -> float:
    """`own`: the canary's loss on this model, if the caller already has it."""
    secrets, exact = candidate_secrets(canary, digits, options.candidates, options.enumerate_limit, options.seed)
    if own is None:
        own = own_secret_nll(model, tokenizer, template, [canary], options.batch_size, device)[0]
    losses = secret_nll(model, tokenizer, template, canary, secrets, options.batch_size, device)
    if exact:
        return metrics.exposure_exact(own, losses)
    return metrics.exposure_extrapolated(own, losses, 10.0**digits)


def extractions(model, tokenizer, template: CanaryTemplate, canaries: list[Canary], digits: int, samples: int, seed: int, device: str) -> list[dict]:
    """Greedy and sampled continuations of each canary's text up to its secret, all canaries in
    one batched greedy pass and one batched sampled pass."""
    from knowledgesg.generation import Generator, SamplingParams

    prefixes = [split_at_secret(tokenizer, template, c, c.secret)[0] for c in canaries]
    generator = Generator(model, tokenizer, 32, device)
    budget = digits + 4
    greedy = generator.generate(prefixes, SamplingParams(do_sample=False, max_new_tokens=budget), seed)
    sampled = generator.generate([p for p in prefixes for _ in range(samples)], SamplingParams(do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=budget), seed) if samples else []

    def recovered(text: str, canary: Canary) -> bool:
        return text.lstrip().startswith(canary.secret)

    return [{"greedy": recovered(greedy[k].text, c), "sampled_hits": sum(recovered(x.text, c) for x in sampled[k * samples : (k + 1) * samples])}
            for k, c in enumerate(canaries)]


# -- models --------------------------------------------------------------------------------------


def load_target(base: dict, adapter_dir: Path | None, device: str):
    from peft import PeftModel

    from knowledgesg.models import ResolvedModel, load_causal_lm

    model, tokenizer = load_causal_lm(ResolvedModel(**base), device)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
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


def of_kinds(targets: list[Target], kinds: list[str]) -> list[Target]:
    """The targets of the kinds asked for: "dp" (every client's DP adapter), "final"."""
    return [t for t in targets if (t.name.startswith("dp_adapter:") and "dp" in kinds) or (t.name == "final" and "final" in kinds)]


# -- the sections of the report -----------------------------------------------------------------


def canary_group_size(spec: PipelineSpec) -> int:
    """Units one canary spans: at record level each copy is a unit; at user level a canary (all
    its copies share a user_id) is one unit."""
    return 1 if spec.privacy.unit == "user" else spec.audit.canaries.repeats


def claimed_for_canaries(entries: list[LedgerEntry], target: str, client: str, group: int) -> dict:
    """The epsilon the audited release claims for one canary (a group of `group` units): for a DP
    adapter, its own release; for the final adapter, everything this run released from the
    client's data (the final adapter is computed from all of it)."""
    mine = [e for e in entries if e.client_id == client and e.counts_against_budget]
    if target.startswith("dp_adapter:"):
        mine = [e for e in mine if e.release == "dp_adapter"][-1:]
    if not mine:
        return {"epsilon": None, "delta": None, "group_size": group, "releases": []}
    delta = mine[-1].delta
    epsilon = group_epsilon([e.effective_mechanism() for e in mine], group, delta)
    return {"epsilon": epsilon, "delta": delta, "group_size": group, "releases": [f"{e.stage}: {e.release}" for e in mine]}


def canary_section(run_dir: Path, spec: PipelineSpec, base: dict, reference, targets: list[Target], options: AuditOptions, device: str) -> dict | None:
    if spec.audit.canaries is None:
        return None
    client = spec.audit.canaries.client
    canary_spec, canaries = read_canaries(read_json(run_dir / "stages/ingest/clients" / client / "canaries.json"))
    template, digits = canary_spec.template, canary_spec.digits
    group = canary_group_size(spec)
    entries = read_stage_ledgers(run_dir, [s.name for s in spec.stages])
    reference_model, tokenizer = reference
    reference_nll = own_secret_nll(reference_model, tokenizer, template, canaries, options.batch_size, device)
    section = {"client": client, "count": len(canaries), "planted": sum(c.included for c in canaries), "repeats": canary_spec.repeats, "group_size": group,
               "digits": digits, "space_log2": round(digits * math.log2(10), 3), "method": "exact" if 10**digits <= options.enumerate_limit else f"skew-normal fit on {options.candidates} candidates",
               "targets": {}}
    for target in [t for t in targets if t.name in (f"dp_adapter:{client}", "final")]:
        model, tokenizer = load_target(base, target.adapter_dir, device)
        console.print(f"audit: canaries on {target.name}")
        target_nll = own_secret_nll(model, tokenizer, template, canaries, options.batch_size, device)
        exposures = [round(exposure(model, tokenizer, template, c, digits, options, device, own), 4) for c, own in track(list(zip(canaries, target_nll)), f"exposure on {target.name}", total=len(canaries))]
        extracted = extractions(model, tokenizer, template, canaries, digits, options.extraction_samples, options.seed, device)
        scores = [r - t for r, t in zip(reference_nll, target_nll)]  # how far training lowered the secret's loss
        planted = [c.included for c in canaries]
        claimed = claimed_for_canaries(entries, target.name, client, group)
        section["targets"][target.name] = {
            "exposure": exposures,
            "mean_exposure_planted": _mean([e for e, p in zip(exposures, planted) if p]),
            "mean_exposure_not_planted": _mean([e for e, p in zip(exposures, planted) if not p]),
            "extraction": {
                "greedy_planted": sum(x["greedy"] for x, p in zip(extracted, planted) if p),
                "greedy_not_planted": sum(x["greedy"] for x, p in zip(extracted, planted) if not p),
                "sampled_planted_canaries_hit": sum(x["sampled_hits"] > 0 for x, p in zip(extracted, planted) if p),
                "sampled_not_planted_canaries_hit": sum(x["sampled_hits"] > 0 for x, p in zip(extracted, planted) if not p),
                "samples_per_canary": options.extraction_samples,
            },
            "loss_drop_vs_base": [round(s, 4) for s in scores],
            "claimed": claimed,
            "one_run": metrics.one_run_audit(scores, planted, options.guesses or len(canaries), delta=claimed["delta"] or 0.0),
        }
        del model
    section["planted_flags"] = [c.included for c in canaries]
    return section


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def mia_sequences(tokenizer, records: list[InstructionRecord], max_length: int) -> list[list[int]]:
    from knowledgesg.sft import tokenize_example

    return [tokenize_example(tokenizer, r, max_length, "all").input_ids for r in records]


def mia_scores(model, tokenizer, reference_logprobs: list[np.ndarray], records: list[InstructionRecord], sequences: list[list[int]], options: AuditOptions,
               device: str) -> dict[str, list[float]]:
    """Every membership score from one pass of the target over the records' token ids (the
    variants reuse its per-token statistics) and the reference model's per-token log-probabilities."""
    from knowledgesg.scoring import pad_id, token_statistics

    target = token_statistics(model, sequences, pad_id(tokenizer), options.batch_size, device, "audit: membership scores")
    texts = [f"{user_message(r)}\n{r.response}" for r in records]
    return {
        "loss": [metrics.score_loss(t["logprobs"]) for t in target],
        "zlib": [metrics.score_zlib(t["logprobs"], text) for t, text in zip(target, texts)],
        "reference": [metrics.score_reference(t["logprobs"], r) for t, r in zip(target, reference_logprobs)],
        "min_k": [metrics.score_min_k(t["logprobs"]) for t in target],
        "min_k_plus_plus": [metrics.score_min_k_plus_plus(t["logprobs"], t["mu"], t["sigma"]) for t in target],
    }


def mia_records(run_dir: Path, client: str, options: AuditOptions) -> tuple[list[InstructionRecord], list[InstructionRecord]]:
    """(members sampled from the client's training records, its held-out non-members)."""
    members = [InstructionRecord.model_validate(r) for r in read_jsonl(run_dir / "stages/ingest/clients" / client / "records.jsonl")
               if r["kind"] == "instruction" and r["source"] != "canary"]
    members = random.Random(f"{options.seed}:members:{client}").sample(members, min(options.mia_members, len(members)))
    return members, [InstructionRecord.model_validate(r) for r in read_jsonl(run_dir / "stages/ingest/clients" / client / "holdout.jsonl")]


def mia_section(run_dir: Path, spec: PipelineSpec, base: dict, reference, targets: list[Target], clients: list[str], options: AuditOptions, device: str) -> dict | None:
    from knowledgesg.scoring import pad_id, token_statistics

    if not spec.audit.holdout_per_client:
        return None
    reference_model, tokenizer = reference
    records = {client: mia_records(run_dir, client, options) for client in clients}
    # tokenised once (every model shares the base tokenizer); (client, 0) members, (client, 1) non-members
    sequences = {(client, side): mia_sequences(tokenizer, group, options.max_length) for client, pair in records.items() for side, group in enumerate(pair)}
    reference_cache: dict[tuple[str, int], list[np.ndarray]] = {}

    def reference_logprobs(client: str, side: int) -> list[np.ndarray]:
        """The base model's pass over a record set, shared by every target that audits it."""
        if (client, side) not in reference_cache:
            stats = token_statistics(reference_model, sequences[(client, side)], pad_id(tokenizer), options.batch_size, device, "audit: reference scores")
            reference_cache[(client, side)] = [t["logprobs"] for t in stats]
        return reference_cache[(client, side)]

    section = {}
    for target in targets:
        model, tokenizer = load_target(base, target.adapter_dir, device)
        console.print(f"audit: membership inference on {target.name}")
        audited = [target.name.split(":", 1)[1]] if target.name.startswith("dp_adapter:") else clients
        for client in audited:
            members, holdout = records[client]
            inside = mia_scores(model, tokenizer, reference_logprobs(client, 0), members, sequences[(client, 0)], options, device)
            outside = mia_scores(model, tokenizer, reference_logprobs(client, 1), holdout, sequences[(client, 1)], options, device)
            section[f"{target.name}|{client}"] = {"members": len(members), "non_members": len(holdout),
                                                  "scores": {name: metrics.roc(inside[name], outside[name]) for name in inside}}
        del model
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
            return [f"{r['instruction']}\n{r['input']}\n{r['response']}" for r in read_jsonl(path)]
    return []


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
    from knowledgesg.generation import Generator, SamplingParams

    stage = next((s for s in spec.stages if s.name == "synthesize"), None)
    seeds = [Seed.model_validate(s) for s in stage.params.get("seeds", [])] if stage else []
    seeds = seeds or [Seed(instruction="Write a short note.")]
    prompts = [tokenizer(user_turn_prefix(tokenizer, seeds[i % len(seeds)]), add_special_tokens=False)["input_ids"] for i in range(count)]
    completions = Generator(model, tokenizer, 16, device).generate(prompts, SamplingParams(do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=64), seed, "audit: sampling")
    return [c.text for c in completions]


def pii_section(run_dir: Path, spec: PipelineSpec, base: dict, reference, targets: list[Target], clients: list[str], options: AuditOptions, device: str) -> dict:
    """PII of the private data replayed verbatim: in the synthetic data, and in samples from each
    released model beyond what the base model produces from the same public prompts."""
    from eval.pii import find_pii, replayed

    found: dict[str, str] = {}
    for client in clients:
        found.update(find_pii(private_texts(run_dir, client)))
    synthetic = [t for client in clients for t in synthetic_texts(run_dir, client)]
    section = {"private_pii_values": len(found), "by_type": _count_types(found),
               "replayed_in_synthetic": len(replayed(found, synthetic)), "synthetic_texts": len(synthetic), "models": {}}
    if not (options.pii_samples and found):
        return section
    base_model, tokenizer = reference
    base_replays = replayed(found, generations(base_model, tokenizer, spec, options.pii_samples, options.seed, device))
    section.update(samples_per_model=options.pii_samples, replayed_by_base=len(base_replays))
    for target in targets:
        model, tokenizer = load_target(base, target.adapter_dir, device)
        replays = replayed(found, generations(model, tokenizer, spec, options.pii_samples, options.seed, device))
        beyond = {v: k for v, k in replays.items() if v not in base_replays}
        section["models"][target.name] = {"replayed": len(replays), "replayed_not_by_base": len(beyond), "types_not_by_base": _count_types(beyond)}
        del model
    return section


def _count_types(values: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for kind in values.values():
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def claimed_epsilons(run_dir: Path, spec: PipelineSpec) -> dict[str, float]:
    """Each client's record-level total over this run's releases (per unit, not per canary)."""
    entries = read_stage_ledgers(run_dir, [s.name for s in spec.stages])
    totals = {}
    for client in dict.fromkeys(e.client_id for e in entries):
        mine = [e for e in entries if e.client_id == client and e.counts_against_budget]
        if mine:
            totals[client] = compose([e.effective_mechanism() for e in mine], mine[-1].delta).reported
    return totals


def run_audit(run_dir: Path, options: AuditOptions) -> dict:
    from knowledgesg.models import resolve_device
    from knowledgesg.runner import load_run_spec

    spec, _ = load_run_spec(run_dir)
    if not completed(run_dir, "ingest") or not completed(run_dir, "prepare_models"):
        raise InputError(f"{run_dir}: the audit needs completed prepare_models and ingest stages")
    base = read_json(run_dir / "stages/prepare_models/models.json")["base"]
    clients = list(read_json(run_dir / "stages/ingest/partition.json")["clients"])
    targets = of_kinds(targets_of(run_dir, clients), options.models)
    if not targets:
        raise InputError(f"{run_dir}: no released model of the kinds asked for ({', '.join(options.models)}) to audit yet (run dp_train or fedtune first)")
    device = resolve_device(spec.models.device)
    reference = load_target(base, None, device)  # the base model: every section compares against it
    return {
        "run_dir": str(run_dir), "spec_name": spec.name, "options": options.model_dump(), "targets": [t.name for t in targets],
        "claimed_epsilon": claimed_epsilons(run_dir, spec),
        "canaries": canary_section(run_dir, spec, base, reference, targets, options, device),
        "membership_inference": mia_section(run_dir, spec, base, reference, targets, clients, options, device),
        "synthetic_overlap": overlap_section(run_dir, clients),
        "pii": pii_section(run_dir, spec, base, reference, targets, clients, options, device),
    }
