"""Stage `synthesize`: new instruction-response pairs from the base model plus each DP adapter.

Generation from a DP adapter is post-processing, free of privacy cost, *because* no private
record enters a prompt: every prompt is built from public seeds only (a task instruction, a
public opening phrase, control codes), and every prompt actually sent is kept in
`clients/<id>/prompts.jsonl` for audit. Class balance for a labelled task comes from a uniform
prior, from a DP histogram of the client's labels whose cost enters the ledger, or from the DP
model itself (the labels in the proportions it writes them); never from the exact private counts. The histogram runs on the client: each unit's records are truncated to
its contribution bound before counting, the noise comes from OS entropy, and the release is in
the client's ledger before the noisy counts are written.

Two passes per candidate: the model writes the user turn (continuing a public seed), then answers
it. Candidates are filtered (unfinished, unparseable, too short or long, exact and near
duplicates), then selected to the target class balance.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from eval.audit import load_target
from knowledgesg.console import console
from knowledgesg.dedup import near_duplicates, normalized, words
from knowledgesg.errors import InputError, SpecError
from knowledgesg.fileio import json_text, read_json, read_jsonl, sha256_file, sha256_text, write_text
from knowledgesg.generation import Generator, SamplingParams, chat_prompt_ids
from knowledgesg.models import Precision, resolve_device, resolve_precision
from knowledgesg.prompts import Seed, parse_label, user_turn_prefix
from knowledgesg.records import InstructionRecord
from knowledgesg.stage import Stage, StageContext
from knowledgesg.spec import PipelineSpec, StrictModel
from privacy.accounting import NOISE_MULTIPLIER_RANGE, Mechanism, epsilons
from privacy.ledger import LEDGER, LedgerEntry, check_budget, new_release_id, now, published_release, read_stage_ledgers, trust_line
from privacy.noise import SecureRandom
from privacy.units import Units, bounded_label_counts, privacy_units
from pipelines.dp_train import DPTrainParams


class SynthesizeParams(StrictModel):
    per_client: int = Field(default=60, ge=1, description="pairs to keep per client")
    oversample: float = Field(default=2.0, ge=1.0, description="candidates generated per kept pair")
    seeds: list[Seed] = Field(min_length=1)
    labels: list[str] | None = Field(default=None, description="a labelled task's answers; responses must name one")
    # uniform: equal quotas; dp_histogram: quotas from a DP histogram of the client's labels (a
    # release with a cost); model: no quotas, the labels in the proportions the DP model writes
    # them, the label prior it learned under DP (post-processing: no cost). A uniform prior
    # teaches the final model that a third of the items are neutral where FPB's and TFNS's test
    # sets hold about 60%
    class_balance: Literal["uniform", "dp_histogram", "model"] = "uniform"
    histogram_noise_multiplier: float = Field(default=20.0, **NOISE_MULTIPLIER_RANGE, description="DP histogram: noise std / sensitivity")
    user_contribution_bound: int = Field(default=8, ge=1, description="user-level privacy: the most records one user adds to the histogram (the rest are not counted)")
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    response_max_new_tokens: int = Field(default=96, ge=1, le=8192)
    batch_size: int = Field(default=64, ge=1, description="rows decoded together: on 2 cores the demo's two passes ran 1.77x faster at 64 than at 16 "
                            "(synthesize_batch.md), a decoding step of 64 rows costing far less than four of 16")
    precision: Precision = Field(
        default="float32", description="the sampling model's weights, after the adapter is merged in float32 (bfloat16: the demo's synthesize 1.51x "
        "faster on a CPU with AVX512-BF16, demo_precision.md; auto: bfloat16 where native); the next-token distribution is taken in float32 either way")
    min_words: int = Field(default=4, ge=1)
    max_words: int = Field(default=120, ge=1)
    near_duplicate_jaccard: float = Field(default=0.7, gt=0, le=0.9, description="MinHash LSH cannot band a threshold above 0.9")
    single_paragraph: bool = Field(default=True, description="an input is one paragraph: keep the first, which is complete once a line break follows it")
    cut_unfinished: bool = Field(default=True, description="an input or open answer that ran out of tokens is cut after its last full sentence "
                                                           "(then filtered like any other) instead of dropped")

    @model_validator(mode="after")
    def _histogram_needs_labels(self) -> SynthesizeParams:
        if self.class_balance != "uniform" and not self.labels:
            raise ValueError(f"class_balance '{self.class_balance}' needs labels")
        return self

    @model_validator(mode="after")
    def _possible(self) -> SynthesizeParams:
        """Settings that would keep nothing are refused before dp_train spends the budget, not found after."""
        if self.min_words > self.max_words:
            raise ValueError(f"min_words {self.min_words} is above max_words {self.max_words}: no input could be kept")
        if self.labels is not None:
            if any(not label.strip() for label in self.labels):
                raise ValueError("labels: a label is empty")
            folded = [label.strip().lower() for label in self.labels]
            if len(set(folded)) != len(folded):
                raise ValueError(f"labels: {sorted({lb for lb in folded if folded.count(lb) > 1})[0]!r} appears more than once (letter case aside)")
        return self


SENTENCE_END = re.compile(r"[.!?][\"')\]]?(?=\s|$)")  # "3.5" is no sentence end: a space or the end must follow


def last_full_sentence(text: str) -> str | None:
    """`text` up to the end of its last full sentence, or None if it has none."""
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    return text[: ends[-1]].rstrip() if ends else None


def class_quotas(total: int, labels: list[str], weights: list[float]) -> dict[str, int]:
    weights = [max(0.0, w) for w in weights]
    if sum(weights) <= 0:
        weights = [1.0] * len(labels)
    raw = [total * w / sum(weights) for w in weights]
    quotas = [math.floor(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - quotas[i], reverse=True)[: total - sum(quotas)]:
        quotas[i] += 1
    return dict(zip(labels, quotas))


def dp_label_histogram(records: list[InstructionRecord], labels: list[str], units: Units, noise_multiplier: float, random: SecureRandom) -> dict[str, float]:
    """Runs on the client: label counts over the units' bounded records, plus Gaussian noise of
    std noise_multiplier * sensitivity, where the sensitivity is the most records one unit adds."""
    counts = bounded_label_counts(records, labels, units)
    noise = random.normal_values((len(labels),), noise_multiplier * units.max_records)
    return {label: float(counts[label]) + float(n) for label, n in zip(labels, noise)}


@dataclass
class Passes:
    """What synthesize's two generation passes wrote for one client."""

    prefixes: list[str]  # pass 1's prompts: the chat template up to the user's words, after a public seed
    first: list  # pass 1's completions
    user_texts: list[str]
    complete: list[bool]
    cut_inputs: list[bool]
    second_prompts: list[list[int]]  # pass 2's prompts, for the finished user turns
    answer_of: dict  # index of a finished user turn -> pass 2's completion


def histogram_unit(client_id: str) -> str:
    return f"label_histogram/{client_id}"  # a unit file per client, as dp_train's are: units/label_histogram/<client>.json


def histogram_path(client_id: str) -> str:
    """Where synthesize writes a client's noised label counts, in its stage directory."""
    return f"clients/{client_id}/label_histogram.json"


class Synthesize(Stage):
    name = "synthesize"
    Params = SynthesizeParams
    uses = ("privacy",)

    def requires(self) -> tuple[str, ...]:
        return ("prepare_models", "ingest", "dp_train")

    def releases(self) -> bool:
        return self.params.class_balance == "dp_histogram"

    def side(self) -> str:
        # generating from a released DP adapter is post-processing: the server can do it; a DP
        # histogram of the labels needs the client's records
        return "client" if self.params.class_balance == "dp_histogram" else "server"

    def preflight(self, spec: PipelineSpec, base_dir: Path) -> None:
        train = next((stage for stage in spec.stages if stage.name == "dp_train"), None)
        if self.params.class_balance != "dp_histogram" or train is None or DPTrainParams.model_validate(train.params).source_stage != "structure":
            return
        # the histogram counts the labels of ingest's instruction records: a client that holds
        # text only, whose training pairs structure made from it, has none, and its histogram would
        # be noise alone, an epsilon spent for nothing (labelled records beside the text are counted)
        holdings = {"pooled data": spec.clients.data} if spec.clients.data else {f"client '{m.id}'": m.data for m in spec.clients.members}
        text_only = next((who for who, sources in holdings.items() if all(source.record_kind == "text" for source in sources)), None)
        if text_only is not None:
            raise SpecError(f"synthesize params.class_balance: dp_histogram counts the labels of a client's instruction records, and {text_only} holds text only "
                            "(dp_train trains on structure's pairs from it): use class_balance model or uniform")

    def run(self, ctx: StageContext) -> None:
        p: SynthesizeParams = self.params
        partition = ctx.read_artifact_json("ingest", "partition.json")
        released = read_stage_ledgers(ctx.run_dir, ctx.completed_stages_before())
        adapters = {e.client_id: e for e in released if e.release == "dp_adapter"}
        missing = [c for c in partition["clients"] if c not in adapters]
        if missing:
            raise InputError(f"synthesize needs a DP adapter per client; none for {', '.join(missing)} (run dp_train first)")
        if p.class_balance == "dp_histogram":  # refuse before any client's work, not midway
            for client_id in partition["clients"]:
                # a histogram released before a crash is in the client's ledger already, and is reused
                published = ctx.unit_done(histogram_unit(client_id)) or self.published_unmarked(ctx, client_id)
                planned = [] if published else [self.histogram_mechanism()]
                check_budget(ctx.spent(client_id), client_id, planned, adapters[client_id].delta, ctx.spec.privacy.cap_epsilon, self.name, ctx.spec.privacy.unit)
        models = ctx.models()
        ledger: list[LedgerEntry] = []
        for client_id in partition["clients"]:
            adapter = adapters[client_id]
            weights = [1.0] * len(p.labels or [])
            if p.class_balance == "dp_histogram":
                histogram_entry, weights = self.release_histogram(ctx, client_id, adapter)
                ledger.append(histogram_entry)
            ledger.append(self.synthesize_client(ctx, client_id, adapter, models["base"], weights))
        ctx.write_json(LEDGER, [e.model_dump(mode="json") for e in ledger])

    def histogram_mechanism(self) -> Mechanism:
        return Mechanism(kind="gaussian", noise_multiplier=self.params.histogram_noise_multiplier)

    def release_histogram(self, ctx: StageContext, client_id: str, adapter: LedgerEntry) -> tuple[LedgerEntry, list[float]]:
        """Runs on the client: the one release of this stage that reads private records. Released
        once per run: a resume after a crash reuses it (a new draw would be a new release)."""
        p: SynthesizeParams = self.params
        done = ctx.completed_unit(histogram_unit(client_id))
        if done:
            return LedgerEntry.model_validate(done["entry"]), done["weights"]
        relative = histogram_path(client_id)
        published = self.published_unmarked(ctx, client_id)
        if published is not None:  # written (its entry fsynced first) by a process killed before it marked it: that release, not a new draw
            ctx.declare_output(relative)
            weights = [read_json(ctx.path(relative))["labels"][label] for label in p.labels]
            ctx.mark_unit_done(histogram_unit(client_id), [relative], {"entry": published.model_dump(mode="json"), "weights": weights})
            return published, weights
        mechanism = self.histogram_mechanism()
        rows = read_jsonl(ctx.artifact("ingest", f"clients/{client_id}/records.jsonl"))
        records = [InstructionRecord.model_validate(r) for r in rows if r["kind"] == "instruction"]
        units = privacy_units(records, ctx.spec.privacy.unit, p.user_contribution_bound, documents=ctx.spec.clients.holds_documents(client_id))
        random = ctx.release_random(client_id, "histogram")
        noisy = dp_label_histogram(records, p.labels, units, p.histogram_noise_multiplier, random)
        text = json_text({"labels": noisy, "noise_std": p.histogram_noise_multiplier * units.max_records, "sensitivity": units.max_records, "unit": units.kind})
        origin = ctx.noise_origin
        entry = LedgerEntry(release_id=new_release_id(), client_id=client_id, stage=self.name, release="dp_label_histogram", artifact=f"stages/{self.name}/{relative}",
                            artifact_sha256=sha256_text(text), run_dir=str(ctx.run_dir.resolve()), released_at=now(), unit=units.kind, num_units=adapter.num_units,
                            delta=adapter.delta, mechanism=mechanism, epsilon=epsilons([mechanism], adapter.delta), private=random.private, noise=origin,
                            trust=trust_line(origin, mechanism))
        ctx.record_release(entry)  # before the counts are written where the server reads them
        write_text(ctx.path(relative), text)
        ctx.declare_output(relative)
        weights = [noisy[label] for label in p.labels]
        ctx.mark_unit_done(histogram_unit(client_id), [relative], {"entry": entry.model_dump(mode="json"), "weights": weights})
        return entry, weights

    def released_part(self, stage_dir: Path) -> list[str]:
        """Its finished units, and the clients whose counts it wrote before the process stopped
        (their ledger entries fsynced first): a refusal must not wipe what the resume adopts."""
        written = [p.parent.name for p in sorted(stage_dir.glob(histogram_path("*")))]
        return sorted(set(super().released_part(stage_dir)) | set(written))

    def published_unmarked(self, ctx: StageContext, client_id: str) -> LedgerEntry | None:
        """The ledger entry of the client's histogram this run wrote, if it is there unmarked."""
        return published_release(ctx.path(histogram_path(client_id)), ctx.client_ledger(client_id), client_id, self.name, "dp_label_histogram")

    def synthesize_client(self, ctx: StageContext, client_id: str, adapter: LedgerEntry, base: dict, weights: list[float]) -> LedgerEntry:
        p: SynthesizeParams = self.params
        device = resolve_device(ctx.spec.models.device)
        dtype = resolve_precision(p.precision, device)
        model, tokenizer = load_target(base, ctx.run_dir / Path(adapter.artifact).parent, device, dtype)  # merged in float32, then cast
        count = math.ceil(p.per_client * p.oversample)
        seeds = [p.seeds[i % len(p.seeds)] for i in range(count)]
        passes = self.two_passes(Generator(model, tokenizer, p.batch_size, device), seeds, ctx.derive_seed(client_id, "inputs"), ctx.derive_seed(client_id, "responses"),
                                 f"synthesize {client_id}")
        prompts_sent = [{"pass": 1, "prompt": text} for text in passes.prefixes] + [{"pass": 2, "prompt": tokenizer.decode(ids)} for ids in passes.second_prompts]
        ctx.write_jsonl(f"clients/{client_id}/prompts.jsonl", prompts_sent, records=False)
        kept, stats = self.filter(ctx, client_id, seeds, passes.user_texts, passes.complete, passes.answer_of, sha256_file(ctx.run_dir / adapter.artifact), weights,
                                  passes.cut_inputs)
        ctx.write_jsonl(f"clients/{client_id}/synthetic.jsonl", kept)
        ctx.write_json(f"clients/{client_id}/filter_stats.json", stats)  # not the precision: whether the client's CPU runs bfloat16 is its own
        console.print(f"synthesize {client_id}: kept {len(kept)} of {count} candidates; rejected {dict(sorted(stats['rejected'].items()))}")
        mechanism = Mechanism(kind="post_processing")
        artifact = f"stages/{self.name}/clients/{client_id}/synthetic.jsonl"
        return LedgerEntry(release_id=new_release_id(), client_id=client_id, stage=self.name, release="synthetic_data (post-processing of the DP adapter)",
                           artifact=artifact, artifact_sha256=sha256_file(ctx.run_dir / artifact), run_dir=str(ctx.run_dir.resolve()), released_at=now(),
                           unit=adapter.unit, num_units=adapter.num_units, delta=adapter.delta, mechanism=mechanism, epsilon=epsilons([mechanism], adapter.delta),
                           private=adapter.private, noise="none", trust=trust_line("none", mechanism))

    def two_passes(self, generator, seeds: list[Seed], input_seed: int, response_seed: int, progress: str | None = None) -> Passes:
        """Pass 1: the DP model writes a user turn after each public seed; pass 2: it answers each
        finished user turn."""
        p: SynthesizeParams = self.params
        tokenizer = generator.tokenizer
        prefixes = [user_turn_prefix(tokenizer, seed) for seed in seeds]
        first = generator.generate([tokenizer(text, add_special_tokens=False)["input_ids"] for text in prefixes], p.sampling, input_seed, progress and f"{progress}: inputs")
        user_texts, complete, cut_inputs = self.user_turns(seeds, first)
        answerable = [i for i, text in enumerate(user_texts) if complete[i] and text.strip()]
        second_prompts = [chat_prompt_ids(tokenizer, (seeds[i].instruction + "\n" if seeds[i].instruction else "") + user_texts[i]) for i in answerable]
        answers = generator.generate(second_prompts, p.sampling.model_copy(update={"max_new_tokens": p.response_max_new_tokens}), response_seed,
                                     progress and f"{progress}: responses")
        return Passes(prefixes, first, user_texts, complete, cut_inputs, second_prompts, dict(zip(answerable, answers)))

    def user_turns(self, seeds: list[Seed], first) -> tuple[list[str], list[bool], list[bool]]:
        """Each generated user turn, whether it is complete, and whether it was cut at a sentence
        end. With `single_paragraph`, a turn that runs on past a line break is cut there: the
        first paragraph is whole (measured on the demo, a third of the DP model's inputs ran on
        into a second paragraph)."""
        texts, complete, cut = [], [], []
        for seed, completion in zip(seeds, first):
            text = seed.prefix + completion.text
            stripped = text.strip()
            whole = last_full_sentence(completion.text) if not completion.finished and self.params.cut_unfinished else None
            if self.params.single_paragraph and "\n" in stripped:
                texts.append(stripped.split("\n")[0].strip())
                complete.append(True)
                cut.append(False)
            elif whole:
                # out of tokens mid-sentence: the sentences before it are whole (the cut is within
                # what the model wrote, never inside the public seed)
                texts.append(seed.prefix + whole)
                complete.append(True)
                cut.append(True)
            else:
                texts.append(text)
                complete.append(completion.finished)
                cut.append(False)
        return texts, complete, cut

    def whole_response(self, answer, label: str | None) -> str | None:
        """The answer's text if it is whole: finished, naming a label, or (open answers, with
        `cut_unfinished`) cut after its last full sentence; else None."""
        if answer is None or not answer.text.strip():
            return None
        if answer.finished or label is not None:
            return answer.text.strip()
        return last_full_sentence(answer.text.strip()) if self.params.cut_unfinished and not self.params.labels else None

    def filter(self, ctx: StageContext, client_id: str, seeds: list[Seed], user_texts: list[str], complete: list[bool], answer_of: dict, adapter_sha256: str, weights: list[float],
               cut_inputs: list[bool] | None = None) -> tuple[list[dict], dict]:
        p: SynthesizeParams = self.params
        rejected: Counter = Counter()
        candidates = []  # (index, label)
        responses: dict[int, str] = {}
        seen = set()
        for i in range(len(user_texts)):
            text = user_texts[i].strip()
            if not complete[i]:
                rejected["input unfinished"] += 1
                continue
            if not p.min_words <= len(words(text)) <= p.max_words:
                rejected["input length"] += 1
                continue
            if "\n" in text or (p.labels and sum(label.lower() in words(text) for label in p.labels) >= 2):
                rejected["input format (several paragraphs, or lists the answers)"] += 1
                continue
            answer = answer_of.get(i)
            label = parse_label(answer.text, p.labels) if p.labels and answer is not None else None
            response = self.whole_response(answer, label)
            # a labelled answer is complete once it names a label, even if it runs on
            if answer is None or not response:
                rejected["response unfinished or empty"] += 1
                continue
            if p.labels and label is None:
                rejected["no label in response"] += 1
                continue
            key = normalized(text)
            if key in seen:
                rejected["exact duplicate"] += 1
                continue
            seen.add(key)
            candidates.append((i, label))
            responses[i] = response
        dropped = near_duplicates([user_texts[i] for i, _ in candidates], p.near_duplicate_jaccard, ctx.derive_seed(client_id, "minhash") % (2**31))
        rejected["near duplicate"] += len(dropped)
        candidates = [c for k, c in enumerate(candidates) if k not in dropped]
        if p.labels and p.class_balance != "model":
            quotas = class_quotas(p.per_client, p.labels, weights)
            chosen, taken = [], Counter()
            for i, label in candidates:
                if taken[label] < quotas[label]:
                    chosen.append((i, label))
                    taken[label] += 1
            rejected["over class quota"] += len(candidates) - len(chosen)
            candidates = chosen
        else:
            quotas = None
            # the candidates come in generation order, each drawn alike: the first per_client are a
            # fair sample of what the model writes, its labels' proportions included
            rejected["over per_client"] += max(0, len(candidates) - p.per_client)
            candidates = candidates[: p.per_client]
        rows = []
        for n, (i, label) in enumerate(candidates):
            seed = seeds[i]
            instruction, input_text = (seed.instruction, user_texts[i].strip()) if seed.instruction else (user_texts[i].strip(), "")
            rows.append({
                "kind": "instruction", "id": f"synthetic/{client_id}/{n}", "client_id": client_id, "source": f"synthetic:{client_id}",
                "instruction": instruction, "input": input_text, "response": label if label else responses[i], "user_id": None,
                "provenance": {"seed": seed.model_dump(), "sampling": p.sampling.model_dump(), "adapter_sha256": adapter_sha256,
                               "raw_response": answer_of[i].text.strip()},
            })
        cut = sum(1 for i, _ in candidates if answer_of[i].text.strip() != responses[i] and not p.labels)
        stats = {"generated": len(user_texts), "kept": len(rows), "rejected": dict(rejected), "quotas": quotas,
                 "inputs_cut_at_a_sentence_end": sum(1 for i, _ in candidates if cut_inputs and cut_inputs[i]), "responses_cut_at_a_sentence_end": cut,
                 "kept_per_label": dict(Counter(r["response"] for r in rows)) if p.labels else None, "class_balance": p.class_balance}
        return rows, stats

