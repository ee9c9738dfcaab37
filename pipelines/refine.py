"""Stage `refine` (server): a professional model judges the synthetic data and rewrites its answers.

Judging is a constrained answer scored by log-probability: the professional model reads a few
public examples of good and bad task inputs, then the candidate, and we compare the probability
it gives " Yes" and " No" after "Good:". This needs no output parsing (a small base model's free
text often cannot be parsed), gives a graded score that can be thresholded or ranked, and costs
one forward pass per candidate and answer. The candidate's mean token log-probability (fluency)
is recorded beside it.

Then knowledge distillation: for a labelled task the professional model assigns the label (the
choice with the highest log-probability after public few-shot examples in the FinGPT format);
for an open task it writes the response (greedy, few-shot). Every candidate keeps its scores and
the decision with its reason in `clients/<id>/decisions.jsonl`; the kept ones, with their new
responses, are `clients/<id>/refined.jsonl`.

It runs on the server, so it reads only server-side artifacts (synthetic data and the model
list): the context refuses a client-side artifact, and a test audits every file it opens.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, replace
from itertools import zip_longest
from pathlib import Path
from statistics import median
from typing import Literal

from pydantic import Field, model_validator

from eval.audit import load_target
from eval.benchmarks import choice_ids, context_ids
from knowledgesg.console import console
from knowledgesg.errors import SpecError
from knowledgesg.fileio import read_jsonl
from knowledgesg.generation import Generator, SamplingParams
from knowledgesg.loaders import load_example_pool, refuse_client_data, source_path
from knowledgesg.models import Precision, resolve_device, resolve_precision
from knowledgesg.prompts import label_named, user_message
from knowledgesg.records import InstructionRecord
from knowledgesg.scoring import choice_logprobs, choice_logprobs_of_ids, continuation_logprobs, encode_context, encode_continuation, normalized_choice_probs, pad_id
from knowledgesg.spec import DataSource, PipelineSpec, StrictModel
from knowledgesg.stage import Stage, StageContext
from pipelines.tune_professional import tuned_professional_adapter

# Written for any domain; a spec can replace them with its own public examples.
DEFAULT_BAD_EXAMPLES = [
    "Click here to subscribe to our newsletter and get the latest offers!",
    "the the company company said said that that",
    "I love pizza and my cat sleeps on the sofa all day.",
    "asdf qwerty lorem ipsum 1234",
]


class RefineParams(StrictModel):
    pool: DataSource = Field(description="public examples for the few-shot prompts, e.g. {builtin: fiqa_train}")
    task: str = Field(description="what a good input is for, in words, e.g. 'financial news sentiment'")
    labels: list[str] | None = Field(default=None, description="a labelled task: the professional model assigns one of these")
    shots: int = Field(default=3, ge=1, le=12, description="few-shot examples in each prompt")
    bad_examples: list[str] = Field(default_factory=lambda: list(DEFAULT_BAD_EXAMPLES), min_length=1)
    threshold: float = Field(default=0.5, ge=0, le=1, description="keep candidates whose judge p(yes) reaches this")
    keep_top_fraction: float | None = Field(default=None, gt=0, le=1, description="instead: keep this top share of each client's candidates by p(yes)")
    min_fluency: float | None = Field(default=None, description="also drop inputs whose mean token log-probability is below this (word salad, fragments)")
    example_words: int = Field(default=60, ge=5, description="a pool example is cut to this many words in a prompt")
    sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(do_sample=False, max_new_tokens=96))
    batch_size: int = Field(default=8, ge=1)
    label_source: Literal["professional", "agreement", "confident", "dp"] = Field(
        default="professional", description="a labelled task's answer: the professional's label; only pairs where it agrees with the DP model's; "
                                            "the professional's where it is at least min_label_confidence sure, else the DP model's; or the DP "
                                            "model's own (dp: the professional judges and filters the inputs only, for a professional that "
                                            "knows good text but not the clients' labelling)")
    min_label_confidence: float = Field(default=0.6, gt=0, le=1, description="with label_source: confident")
    centre_by_seed: bool = Field(default=False, description="judge and fluency scores compared within each synthesize seed of a client: each seed's scores "
                                                            "shifted so their median meets the client's (p(yes) in logits), so a style the professional reads "
                                                            "less easily (tweets beside news) is filtered about as often as the others, not wholesale; "
                                                            "a seed with fewer than 5 candidates keeps its scores. The reasons quote the centred scores")
    precision: Precision = Field(default="float32", description="the professional's weights while it judges, scores and answers (auto: bfloat16 where native)")

    @model_validator(mode="after")
    def _enough_labels(self) -> RefineParams:
        if self.labels is not None and len(self.labels) < 2:
            raise ValueError("labels: a labelled task needs at least two labels")
        if self.labels is None and self.label_source != "professional":
            raise ValueError(f"label_source: {self.label_source} needs labels (a labelled task)")
        return self


def candidate_text(record: InstructionRecord) -> str:
    """What is judged: the part the DP model wrote (the input of a labelled pair, else the instruction)."""
    return record.input or record.instruction


def clip_words(text: str, limit: int) -> str:
    return " ".join(text.split()[:limit])


def judge_prompt(task: str, good: list[str], bad: list[str], candidate: str) -> str:
    """Good and bad public examples alternate, so neither answer is favoured by position."""
    blocks = []
    for g, b in zip_longest(good, bad):
        if g is not None:
            blocks.append(f"Text: {g}\nGood: Yes")
        if b is not None:
            blocks.append(f"Text: {b}\nGood: No")
    header = f"Is each text a clear, well-formed example of {task}? Answer Yes or No."
    return header + "\n\n" + "\n\n".join(blocks) + f"\n\nText: {candidate}\nGood:"


def label_prompt(shots: list[InstructionRecord], record: InstructionRecord, example_words: int) -> str:
    """The FinGPT instruction format, with public labelled examples first."""
    blocks = [f"Instruction: {s.instruction}\nInput: {clip_words(s.input, example_words)}\nAnswer: {s.response.strip()}" for s in shots]
    return "\n\n".join(blocks + [f"Instruction: {record.instruction}\nInput: {record.input}\nAnswer:"])


def answer_prompt(shots: list[InstructionRecord], record: InstructionRecord, example_words: int) -> str:
    def question(r: InstructionRecord) -> str:
        return f"{r.instruction} {r.input}".strip()

    blocks = [f"Question: {question(s)}\nAnswer: {clip_words(s.response, example_words)}" for s in shots]
    return "\n\n".join(blocks + [f"Question: {question(record)}\nAnswer:"])


def balanced_shots(pool: list[InstructionRecord], labels: list[str] | None, count: int) -> list[InstructionRecord]:
    """The first examples of each label in turn (a fixed, balanced, public prompt)."""
    if not labels:
        return pool[:count]
    by_label = {label: [r for r in pool if r.response.strip().lower() == label.lower()] for label in labels}
    shots = [r for group in zip_longest(*by_label.values()) for r in group if r is not None]
    return shots[:count]


def fluency_scores(model, tokenizer, texts: list[str], batch_size: int, device: str) -> list[float]:
    """Mean token log-probability of each text after "Text:" (higher: more fluent)."""
    context = encode_context(tokenizer, "Text:")
    scores = continuation_logprobs(model, [context] * len(texts), [encode_continuation(tokenizer, " " + t) for t in texts], pad_id(tokenizer), batch_size, device)
    return [float(s.mean()) for s in scores]


@dataclass(frozen=True)
class Verdict:
    kept: bool
    reason: str
    dropped_by: str | None = None  # "judge", "fluency" or "empty answer"


MIN_CENTRED_GROUP = 5  # a seed with fewer candidates keeps its scores: its median would be mostly noise


def seed_key(row: dict) -> str:
    """The synthesize seed (public: instruction, prefix, domain, task) a candidate was written
    under, as one string; "" where the row names none (one group, nothing centred)."""
    seed = (row.get("provenance") or {}).get("seed")
    return json.dumps(seed, sort_keys=True) if seed else ""


def centre_by_group(values: list[float], groups: list[str]) -> list[float]:
    """Each value of a group of at least MIN_CENTRED_GROUP shifted by the median of all minus the
    median of its group: every such group's median meets the overall one, and a threshold then
    drops about the same share of each (exactly where the groups differ by a shift only)."""
    overall = median(values)
    members = {group: [v for v, g in zip(values, groups) if g == group] for group in set(groups)}
    shift = {group: overall - median(vs) if len(vs) >= MIN_CENTRED_GROUP else 0.0 for group, vs in members.items()}
    return [v + shift[g] for v, g in zip(values, groups)]


def centre_probabilities(p_yes: list[float], groups: list[str]) -> list[float]:
    """`centre_by_group` for probabilities: in logits, mapped back, so they stay in (0, 1)."""
    clipped = [min(max(p, 1e-9), 1 - 1e-9) for p in p_yes]
    logits = centre_by_group([math.log(p / (1 - p)) for p in clipped], groups)
    return [1 / (1 + math.exp(-x)) for x in logits]


def decide(p_yes: list[float], threshold: float, top_fraction: float | None, fluency: list[float] | None = None, min_fluency: float | None = None) -> list[Verdict]:
    """Keep or drop each candidate, with the reason: by judge threshold or rank (ties broken by
    position), then by fluency. The judge catches off-domain text; fluency catches word salad and
    fragments (benchmarks/results/refine_judge.md)."""
    if top_fraction is None:
        verdicts = [Verdict(p >= threshold, f"judge p(yes) {p:.3f} {'>=' if p >= threshold else '<'} threshold {threshold:g}", None if p >= threshold else "judge") for p in p_yes]
    else:
        keep = math.ceil(top_fraction * len(p_yes))
        order = sorted(range(len(p_yes)), key=lambda i: (-p_yes[i], i))
        rank = {i: r for r, i in enumerate(order)}
        verdicts = [Verdict(rank[i] < keep, f"judge p(yes) {p_yes[i]:.3f} ranks {rank[i] + 1} of {len(p_yes)}; top {keep} kept", None if rank[i] < keep else "judge") for i in range(len(p_yes))]
    if min_fluency is None or fluency is None:
        return verdicts
    out = []
    for verdict, f in zip(verdicts, fluency):
        fluent = f >= min_fluency
        reason = f"{verdict.reason}; fluency {f:.2f} {'>=' if fluent else '<'} {min_fluency:g}"
        out.append(Verdict(verdict.kept and fluent, reason, verdict.dropped_by or (None if fluent else "fluency")))
    return out


# A label at least this common among the synthetic pairs that refine keeps at under a quarter of
# its share: the professional's labels took it away (FiQA's professional never says "neutral"; the
# final model then rarely does, and FPB's and TFNS's test items are two-thirds neutral:
# finance_headline.md, row 6 against the variants without relabelling)
LABEL_SHIFT_MIN_SHARE = 0.10
LABEL_SHIFT_FACTOR = 4


def label_counts(counts: Counter, labels: list[str]) -> dict[str, int]:
    """Pairs per label, in the labels' order, and those that answer with none of them."""
    return {**{label: counts[label] for label in labels}, **({"(none of the labels)": counts[None]} if counts[None] else {})}


def label_shift_warnings(synthetic: Counter, kept: Counter, labels: list[str], label_source: str) -> list[str]:
    """One line for each label that refine's kept pairs hold at under a quarter of its share among
    the synthetic pairs, where it was at least a tenth of them."""
    total_before, total_after = sum(synthetic.values()), sum(kept.values())
    if not total_before or not total_after:
        return []
    warnings = []
    for label in labels:
        share_before, share_after = synthetic[label] / total_before, kept[label] / total_after
        if share_before >= LABEL_SHIFT_MIN_SHARE and share_after * LABEL_SHIFT_FACTOR < share_before:
            advice = ("label_source: dp keeps the DP models' labels, which carry the label shares the clients' data taught them"
                      if label_source != "dp" else "the judge and fluency filter dropped them; a lower threshold or min_fluency keeps more")
            warnings.append(f"label {label!r} is {share_before:.0%} of the synthetic pairs and {share_after:.0%} of the {total_after} refine kept "
                            f"(label_source: {label_source}); a final model tuned on them will seldom answer {label!r}. {advice}")
    return warnings


class Refine(Stage):
    name = "refine"
    Params = RefineParams
    runs_on = "server"

    def requires(self) -> tuple[str, ...]:
        return ("prepare_models", "ingest", "synthesize")

    def external_inputs(self, spec: PipelineSpec, base_dir: Path) -> list[Path]:
        return [source_path(self.params.pool, base_dir, f"{self.name} params.pool")]

    def preflight(self, spec: PipelineSpec, base_dir: Path) -> None:
        """Before the run starts, not after dp_train has spent the budget. The pool's examples go
        into the server's prompts: a client's data there would put private records in them."""
        if spec.models.professional is None:
            raise SpecError("models.professional: missing, and refine needs it (e.g. gemma-3-270m)")
        refuse_client_data(self.params.pool, spec.clients.sources(), base_dir, "refine params.pool")
        load_example_pool(self.params.pool, base_dir, spec.seed, "refine params.pool")

    def run(self, ctx: StageContext) -> None:
        p: RefineParams = self.params
        models = ctx.models()
        pool = load_example_pool(p.pool, ctx.base_dir, ctx.seed, "refine params.pool")
        shots = balanced_shots(pool, p.labels, p.shots)
        good = [clip_words(candidate_text(r), p.example_words) for r in shots]
        partition = ctx.read_artifact_json("ingest", "partition.json")
        device = resolve_device(ctx.spec.models.device)
        tuned = tuned_professional_adapter(ctx)
        dtype = resolve_precision(p.precision, device)
        model, tokenizer = load_target(models["professional"], None, device, dtype)
        if tuned is not None:  # unmerged: the judge and the fluency score run without it, on the model refine_judge.md measured
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, tuned)
        summary = {}
        before, after = Counter(), Counter()  # labels of the synthetic pairs and of those kept, over every client
        for client_id in partition["clients"]:
            rows = read_jsonl(ctx.artifact("synthesize", f"clients/{client_id}/synthetic.jsonl"))
            records = [InstructionRecord.model_validate({k: v for k, v in r.items() if k != "provenance"}) for r in rows]
            decisions, kept = self.refine_client(ctx, client_id, model, tokenizer, device, rows, records, good, shots, tuned is not None)
            ctx.write_jsonl(f"clients/{client_id}/decisions.jsonl", decisions, records=False)
            ctx.write_jsonl(f"clients/{client_id}/refined.jsonl", kept)
            summary[client_id] = self.client_summary(decisions, kept)
            console.print(f"refine {client_id}: kept {len(kept)} of {len(rows)}; {summary[client_id]['dropped_by_reason']}")
            if p.labels:
                before.update(label_named(r.response, p.labels) for r in records)
                after.update(label_named(r["response"], p.labels) for r in kept)
        for warning in label_shift_warnings(before, after, p.labels or [], p.label_source):
            ctx.warn(warning)
        ctx.write_json("summary.json", {"professional_model": models["professional"]["name"], "tuned_by": "tune_professional (public data)" if tuned else None,
                                        "method": "judge p(yes) by log-probability", "label_source": p.label_source if p.labels else None, "precision": dtype,
                                        **({"labels": {"synthetic": label_counts(before, p.labels), "kept": label_counts(after, p.labels)}} if p.labels else {}),
                                        "clients": summary})

    def refine_client(self, ctx: StageContext, client_id: str, model, tokenizer, device: str, rows: list[dict], records: list[InstructionRecord],
                      good: list[str], shots: list[InstructionRecord], tuned: bool) -> tuple[list[dict], list[dict]]:
        p: RefineParams = self.params
        if not records:
            return [], []
        texts = [candidate_text(r) for r in records]
        with model.disable_adapter() if tuned else nullcontext():
            p_yes, fluency = self.judge(client_id, model, tokenizer, device, texts, good)
        seeds = [seed_key(row) for row in rows]
        judged, fluent = (centre_probabilities(p_yes, seeds), centre_by_group(fluency, seeds)) if p.centre_by_seed else (p_yes, fluency)
        verdicts = decide(judged, p.threshold, p.keep_top_fraction, fluent, p.min_fluency)
        if p.centre_by_seed:
            verdicts = [replace(v, reason=f"scores centred by seed: {v.reason}") for v in verdicts]
        chosen = [i for i, v in enumerate(verdicts) if v.kept]
        responses = self.distil(ctx, client_id, model, tokenizer, device, [records[i] for i in chosen], shots, tuned)
        decisions, kept = [], []
        for i, record in enumerate(records):
            verdict = verdicts[i]
            decision = {"id": record.id, "kept": verdict.kept, "reason": verdict.reason, "dropped_by": verdict.dropped_by,
                        "judge_p_yes": round(p_yes[i], 6), "fluency_mean_logprob": round(fluency[i], 6), "synthetic_response": record.response}
            if p.centre_by_seed:  # the scores the thresholds saw (the reason quotes them)
                decision.update(seed=seeds[i], judge_p_yes_centred=round(judged[i], 6), fluency_centred=round(fluent[i], 6))
            if verdict.kept:
                new = responses[chosen.index(i)]
                if new["response"] is None:
                    decision.update(kept=False, reason=f"{verdict.reason}; professional answer empty", dropped_by="empty answer")
                elif new.get("labels_disagree"):
                    decision.update({k: v for k, v in new.items() if k != "response"})
                    decision.update(kept=False, reason=f"{verdict.reason}; the professional labels it {new['professional_label']}, the DP model {record.response.strip()}",
                                    dropped_by="labels disagree")
                else:
                    decision.update({k: v for k, v in new.items() if k != "response"}, refined_response=new["response"])
                    provenance = dict(rows[i].get("provenance") or {})
                    provenance["refine"] = {k: v for k, v in decision.items() if k not in ("id", "kept", "dropped_by")}
                    kept.append({**record.model_dump(), "id": record.id.replace("synthetic/", "refined/", 1), "response": new["response"], "provenance": provenance})
            decisions.append(decision)
        return decisions, kept

    def judge(self, client_id: str, model, tokenizer, device: str, texts: list[str], good: list[str]) -> tuple[list[float], list[float]]:
        """Each candidate's judge p(yes) and fluency (mean token log-probability)."""
        p: RefineParams = self.params
        judged = choice_logprobs(model, tokenizer, [judge_prompt(p.task, good, p.bad_examples, t) for t in texts], [" Yes", " No"], p.batch_size, device, f"refine {client_id}: judging")
        return normalized_choice_probs(judged)[:, 0].tolist(), fluency_scores(model, tokenizer, texts, p.batch_size, device)

    def distil(self, ctx: StageContext, client_id: str, model, tokenizer, device: str, records: list[InstructionRecord], shots: list[InstructionRecord],
               tuned: bool) -> list[dict]:
        """The professional model's response to each kept record: a label, or a written answer.
        A professional tuned by `tune_professional` labels in the format it learned, without shots."""
        p: RefineParams = self.params
        if not records:
            return []
        if p.labels:
            if tuned:
                contexts = [context_ids(tokenizer, user_message(r)) for r in records]
                table = choice_logprobs_of_ids(model, tokenizer, contexts, [choice_ids(tokenizer, label) for label in p.labels], p.batch_size, device, f"refine {client_id}: labelling")
            else:
                table = choice_logprobs(model, tokenizer, [label_prompt(shots, r, p.example_words) for r in records], [" " + label for label in p.labels], p.batch_size, device,
                                        f"refine {client_id}: labelling")
            return [self.labelled(r, row) for r, row in zip(records, normalized_choice_probs(table))]
        generator = Generator(model, tokenizer, p.batch_size, device, stop_at_newline=True)
        prompts = [encode_context(tokenizer, answer_prompt(shots, r, p.example_words)) for r in records]
        answers = generator.generate(prompts, p.sampling, ctx.derive_seed(client_id, "answers"), f"refine {client_id}: answers")
        return [{"response": a.text.strip() or None} for a in answers]

    def labelled(self, record: InstructionRecord, probs) -> dict:
        """The answer `label_source` picks from the professional's label probabilities and the DP
        model's own label (the synthetic response)."""
        p: RefineParams = self.params
        professional = p.labels[int(probs.argmax())]
        own = label_named(record.response, p.labels)
        confident = float(probs.max()) >= p.min_label_confidence
        keep_own = p.label_source == "dp" or (p.label_source == "confident" and not confident)
        response = own if keep_own and own is not None else professional
        return {"response": response, "professional_label": professional, "label_probs": {label: round(float(x), 6) for label, x in zip(p.labels, probs)},
                "label_changed": response.lower() != record.response.strip().lower(),
                "labels_disagree": p.label_source == "agreement" and professional != own}

    @staticmethod
    def client_summary(decisions: list[dict], kept: list[dict]) -> dict:
        dropped = Counter(d["dropped_by"] for d in decisions if not d["kept"])
        changed = sum(1 for d in decisions if d.get("label_changed"))
        return {"candidates": len(decisions), "kept": len(kept), "dropped_by_reason": dict(dropped),
                "labels_changed": changed, "mean_p_yes": round(sum(d["judge_p_yes"] for d in decisions) / max(1, len(decisions)), 4)}

