"""Domain benchmarks: financial sentiment (FPB, FiQA, TFNS) and medical QA (PubMedQA, MedQA), and
the user's own test sets.

A task is a built-in name or a file of the user's items (JSONL, JSON, CSV, Parquet or a saved
`datasets` directory, read by the same loaders as private data):
- labelled items: instruction records (`instruction`, `input`, `response`, mapped with `fields`
  like private data); the choices are the distinct responses (2 to 20 of them);
- multiple-choice items: rows with `question`, `options` (a list, or a mapping letter -> text)
  and `answer` (the letter, the option's index from 0, or its text).

Two ways to read a model's answer, both reported:
- `logprob`: the choice with the highest log-probability as the answer (summed over its tokens),
  after the prompt. For a chat model the prompt is the chat template with the FinGPT user turn and
  the choice is the assistant's reply; for a base model the prompt ends with "Answer:".
- `generation`: greedy decoding, then the first choice the text names (unnamed: wrong, counted).
And for a model with a label prior (`LabelPrior`: the final adapter after the `calibrate` stage),
`logprob_calibrated`: the log-probabilities plus the prior's bias per label, then the argmax.
Accuracy and macro-F1 over the choices (scikit-learn).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.special import softmax

from knowledgesg.builtin_data import VENDOR, load_builtin
from knowledgesg.errors import InputError
from knowledgesg.generation import Generator, SamplingParams, chat_prompt_ids
from knowledgesg.loaders import READERS, SUFFIX_FORMATS, detect_format, load_source
from knowledgesg.prompts import user_message
from knowledgesg.records import InstructionRecord
from knowledgesg.scoring import continuation_logprobs, encode_context, encode_continuation, pad_id
from knowledgesg.spec import DataSource

MAX_LABELS = 20

SENTIMENT = ["negative", "neutral", "positive"]
LETTERS = ["A", "B", "C", "D"]


@dataclass(frozen=True)
class Item:
    prompt: str  # the user turn
    choices: list[str]  # as the answer is written
    answer: int


def _sentiment(builtin: str) -> Callable[[], list[Item]]:
    def load() -> list[Item]:
        return [Item(user_message(r), SENTIMENT, SENTIMENT.index(r.response.strip().lower())) for r in load_builtin(builtin, builtin)]

    return load


def pubmedqa() -> list[Item]:
    """The 500 PubMedQA test questions (PQA-L), with their abstract, answered yes, no or maybe."""
    labelled = json.loads((VENDOR / "pubmedqa" / "ori_pqal.json").read_text(encoding="utf-8"))
    test_ids = json.loads((VENDOR / "pubmedqa" / "test_ground_truth.json").read_text(encoding="utf-8"))
    choices = ["yes", "no", "maybe"]
    items = []
    for pmid in sorted(test_ids):
        entry = labelled[pmid]
        prompt = f"Answer the question about the abstract with yes, no or maybe.\nAbstract: {' '.join(entry['CONTEXTS'])}\nQuestion: {entry['QUESTION']}"
        items.append(Item(prompt, choices, choices.index(entry["final_decision"])))
    return items


def medqa() -> list[Item]:
    """The first 500 MedQA (USMLE) test questions, four options, answered by letter."""
    items = []
    for line in (VENDOR / "medqa" / "medqa_test_first500.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        options = "\n".join(f"{letter}. {row['options'][letter]}" for letter in LETTERS)
        items.append(Item(f"{row['question']}\n{options}\nAnswer with the letter of the correct option.", LETTERS, LETTERS.index(row["answer_idx"])))
    return items


TASKS: dict[str, Callable[[], list[Item]]] = {
    "fpb": _sentiment("fpb_test"), "fiqa": _sentiment("fiqa_test"), "tfns": _sentiment("tfns_test"),
    "pubmedqa": pubmedqa, "medqa": medqa,
}
FINANCE = ("fpb", "fiqa", "tfns")
MEDICINE = ("pubmedqa", "medqa")


Task = str | DataSource  # a built-in name, a test file's path, or a file with its field mapping


def is_task_file(task: Task) -> bool:
    return isinstance(task, DataSource) or Path(task).suffix.lower() in SUFFIX_FORMATS or Path(task).is_dir()


def task_source(task: Task) -> DataSource:
    return task if isinstance(task, DataSource) else DataSource(path=Path(task))


def task_name(task: Task) -> str:
    """How a task is named in results: a built-in's name, a file's `name` or stem."""
    if not is_task_file(task):
        return task
    source = task_source(task)
    return source.name or (source.path.stem if source.path else str(source.builtin))


def answer_index(key: str, letters: list[str], texts: list[str]) -> int | None:
    """The option an answer names: by letter, by index from 0, or by its text."""
    if key in letters:
        return letters.index(key)
    if key.isdigit() and int(key) < len(texts):
        return int(key)
    return texts.index(key) if key in texts else None


def multiple_choice_item(path: Path, number: int, row: dict) -> Item:
    question, options, answer = row.get("question"), row.get("options"), row.get("answer")
    if isinstance(options, str):
        try:
            options = json.loads(options)  # a CSV cell holding a JSON list or mapping
        except json.JSONDecodeError:
            raise InputError(f"{path}: record {number}: field 'options': a list or mapping of the options, got a string that is not JSON") from None
    if isinstance(options, dict):
        letters, texts = list(options), [str(v) for v in options.values()]
    elif isinstance(options, list) and len(options) <= 26:
        letters, texts = [chr(ord("A") + i) for i in range(len(options))], [str(v) for v in options]
    else:
        raise InputError(f"{path}: record {number}: field 'options': a list (at most 26) or a mapping letter -> text, got {type(options).__name__}")
    if not isinstance(question, str) or not question.strip() or len(texts) < 2:
        raise InputError(f"{path}: record {number}: field 'question': a non-empty question with at least 2 options is needed")
    index = answer_index(str(answer).strip(), letters, texts)
    if index is None:
        # the answer not quoted: a private test set's item reaches a console the server may keep
        raise InputError(f"{path}: record {number}: field 'answer': is neither an option letter, an index nor an option's text")
    listing = "\n".join(f"{letter}. {text}" for letter, text in zip(letters, texts))
    return Item(f"{question}\n{listing}\nAnswer with the letter of the correct option.", letters, index)


def labelled_items(records: list[InstructionRecord], path: Path) -> list[Item]:
    labels = sorted({r.response.strip().lower() for r in records})
    if not 2 <= len(labels) <= MAX_LABELS:
        raise InputError(f"{path}: a labelled test set needs 2 to {MAX_LABELS} distinct responses to choose between, found {len(labels)} "
                         "(for multiple choice give 'question', 'options' and 'answer')")
    return [Item(user_message(r), labels, labels.index(r.response.strip().lower())) for r in records]


def file_task(source: DataSource, base_dir: Path) -> list[Item]:
    """The user's own test items, through the same loaders (and field mapping) as private data."""
    path = source.path if source.path.is_absolute() else base_dir / source.path
    if not path.exists():
        raise InputError(f"{path}: test set not found")
    fmt = detect_format(path) if source.format == "auto" else source.format
    rows = list(READERS[fmt](path))
    if rows and "options" in rows[0][1] and not source.fields:
        return [multiple_choice_item(path, number, row) for number, row in rows]
    records = [r for r in load_source(source, base_dir, seed=0) if isinstance(r, InstructionRecord)]
    return labelled_items(records, path)


def load_task(task: Task, limit: int | None = None, seed: int = 0, base_dir: Path = Path(".")) -> list[Item]:
    """A task's items; `limit` draws a seeded random subset (the same for every model)."""
    name = task_name(task)
    if is_task_file(task):
        items = file_task(task_source(task), base_dir)
    elif name not in TASKS:
        raise InputError(f"unknown benchmark '{name}' (known: {', '.join(TASKS)}, or a test file: {', '.join(SUFFIX_FORMATS)})")
    else:
        items = TASKS[name]()
    if limit is not None and limit < len(items):
        items = random.Random(f"{seed}:{name}").sample(items, limit)
    return items


def parse_choice(text: str, choices: list[str]) -> int | None:
    """The choice a generated answer names first. Option letters must stand alone and in capitals
    (the article "a" is not option A); words match in any case."""
    letters = all(len(c) == 1 and c.isupper() for c in choices)
    haystack = text if letters else text.lower()
    found = [(m.start(), i) for i, c in enumerate(choices) for m in [re.search(rf"\b{re.escape(c if letters else c.lower())}\b", haystack)] if m]
    return min(found)[1] if found else None


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def context_ids(tokenizer, prompt: str) -> list[int]:
    return chat_prompt_ids(tokenizer, prompt) if has_chat_template(tokenizer) else encode_context(tokenizer, f"{prompt}\nAnswer:")


def choice_ids(tokenizer, choice: str) -> list[int]:
    # the assistant turn starts a new line in a chat template; after "Answer:" a space leads
    return encode_continuation(tokenizer, choice if has_chat_template(tokenizer) else f" {choice}")


def choice_logprobs(model, tokenizer, items: list[Item], batch_size: int, device: str) -> list[list[float]]:
    """Each item's choices' log-probabilities after its prompt (summed over each choice's tokens)."""
    contexts, continuations = [], []
    for item in items:
        ids = context_ids(tokenizer, item.prompt)
        for choice in item.choices:
            contexts.append(ids)
            continuations.append(choice_ids(tokenizer, choice))
    scores = continuation_logprobs(model, contexts, continuations, pad_id(tokenizer), batch_size, device, "eval: scoring choices")
    sums: list[list[float]] = []
    position = 0
    for item in items:
        sums.append([float(scores[position + j].sum()) for j in range(len(item.choices))])
        position += len(item.choices)
    return sums


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


class LabelPrior(BaseModel):
    """A model's label prior fitted to labelled data it is to answer like (the `calibrate` stage:
    the final model against the synthetic pairs its tuning read). `bias[k]` is added to label k's
    log-probability before the argmax: b = log(share) - log(mean p), the prior-shift correction of
    Saerens, Latinne and Decaestecker (2002), which moves the model's average answer on those
    inputs to their labels' shares."""

    model_config = ConfigDict(extra="forbid")

    labels: list[str] = Field(min_length=2)
    shares: list[float]  # the labelled data's share of each label
    model_mean: list[float]  # the model's mean probability of each label on the data's inputs
    bias: list[float]
    pairs: int = Field(ge=1, description="labelled items the prior was fitted on")
    # the weights it was fitted for: a prior left from an earlier final adapter (a rerun stopped
    # between fedtune and calibrate, or a calibrate whose rerun failed) is not applied to a new one
    adapter_sha256: str | None = Field(default=None, description="sha256 of the adapter weights it was fitted for (None: a file written before it was recorded)")

    @model_validator(mode="after")
    def _one_figure_per_label(self) -> LabelPrior:
        for name in ("shares", "model_mean", "bias"):
            if len(getattr(self, name)) != len(self.labels):
                raise ValueError(f"{name} has {len(getattr(self, name))} values for {len(self.labels)} labels")
        return self

    def bias_for(self, choices: list[str]) -> list[float] | None:
        """The bias in the order of a task's choices, or None where the task's choices are not
        these labels (another task: its scores are left as they are)."""
        position = {label.lower(): k for k, label in enumerate(self.labels)}
        if sorted(c.strip().lower() for c in choices) != sorted(position):
            return None
        return [self.bias[position[c.strip().lower()]] for c in choices]


def fit_label_prior(scores: list[list[float]], answers: list[int], labels: list[str]) -> LabelPrior:
    """The prior correction from a model's choice log-probabilities on labelled items (`scores`,
    in the order of `labels`) and their labels (`answers`, indices into `labels`)."""
    if not answers:
        raise ValueError("no labelled items to fit a label prior on")
    shares = np.bincount(answers, minlength=len(labels)) / len(answers)
    model_mean = softmax(np.asarray(scores, dtype=np.float64), axis=1).mean(axis=0)
    # a label the data never gives gets a large negative bias, not minus infinity (kept finite for JSON)
    bias = np.log(np.maximum(shares, 1e-6)) - np.log(np.maximum(model_mean, 1e-12))
    return LabelPrior(labels=list(labels), shares=shares.round(6).tolist(), model_mean=model_mean.round(6).tolist(), bias=bias.round(6).tolist(), pairs=len(answers))


def predict_generation(model, tokenizer, items: list[Item], batch_size: int, device: str, max_new_tokens: int = 12) -> list[int | None]:
    generator = Generator(model, tokenizer, batch_size, device, stop_at_newline=not has_chat_template(tokenizer))
    completions = generator.generate([context_ids(tokenizer, item.prompt) for item in items], SamplingParams(do_sample=False, max_new_tokens=max_new_tokens), seed=0, progress="eval: generating")
    return [parse_choice(c.text, item.choices) for c, item in zip(completions, items)]


@dataclass
class Score:
    accuracy: float
    macro_f1: float
    n: int
    unparsed: int = 0
    # how often each answer was predicted, and was right: a model that learned another label prior
    # (a uniform one, or the professional's) shows here where accuracy alone does not say why
    predicted: dict[str, int] = field(default_factory=dict)
    truth: dict[str, int] = field(default_factory=dict)


def score(items: list[Item], predictions: list[int | None]) -> Score:
    from sklearn.metrics import f1_score

    truth = [item.answer for item in items]
    filled = [p if p is not None else -1 for p in predictions]  # unparsed: wrong for every class
    accuracy = sum(p == t for p, t in zip(filled, truth)) / len(items)
    # the classes that occur, as truth or as an answer: one in neither (absent from a seeded subset)
    # is no class the model got wrong; unparsed answers (-1) are no class either
    classes = sorted(set(truth) | {p for p in filled if p >= 0})
    macro_f1 = float(f1_score(truth, filled, labels=classes, average="macro", zero_division=0))
    choices = max((item.choices for item in items), key=len)  # a test file whose items offer more options later
    return Score(round(accuracy, 4), round(macro_f1, 4), len(items), sum(p is None for p in predictions),
                 predicted={c: sum(p == k for p in filled) for k, c in enumerate(choices)}, truth={c: truth.count(k) for k, c in enumerate(choices)})


CALIBRATED = "logprob_calibrated"  # the logprob answer after a LabelPrior's bias, beside the raw one


def evaluate_model(model, tokenizer, tasks: list[Task], modes: list[str], limit: int | None, seed: int, batch_size: int = 8, device: str = "cpu",
                   base_dir: Path = Path("."), label_prior: LabelPrior | None = None) -> dict:
    """Scores per task name; a test file's relative path is resolved from `base_dir`. With a
    `label_prior`, every task is also scored after its bias (`CALIBRATED`): a task whose choices are
    not its labels keeps the raw answers there, so the mean over tasks compares with other models'."""
    results = {}
    for task in tasks:
        items = load_task(task, limit, seed, base_dir)
        entry = {}
        if "logprob" in modes:
            scores = choice_logprobs(model, tokenizer, items, batch_size, device)
            entry["logprob"] = score(items, [argmax(s) for s in scores]).__dict__
            if label_prior is not None:
                # a task whose choices are not the prior's labels: the prior does not apply, and the answer is the raw one
                bias = label_prior.bias_for(items[0].choices) or [0.0] * len(items[0].choices)
                entry[CALIBRATED] = score(items, [argmax([v + b for v, b in zip(s, bias)]) for s in scores]).__dict__
        if "generation" in modes:
            entry["generation"] = score(items, predict_generation(model, tokenizer, items, batch_size, device)).__dict__
        results[task_name(task)] = entry
    return results

