"""Domain benchmarks: financial sentiment (FPB, FiQA, TFNS) and medical QA (PubMedQA, MedQA).

Two ways to read a model's answer, both reported:
- `logprob`: the choice with the highest log-probability as the answer (summed over its tokens),
  after the prompt. For a chat model the prompt is the chat template with the FinGPT user turn and
  the choice is the assistant's reply; for a base model the prompt ends with "Answer:".
- `generation`: greedy decoding, then the first choice the text names (unnamed: wrong, counted).
Accuracy and macro-F1 over the choices (scikit-learn).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from knowledgesg.builtin_data import VENDOR, load_builtin
from knowledgesg.errors import InputError
from knowledgesg.sft import user_message

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


def load_task(name: str, limit: int | None = None, seed: int = 0) -> list[Item]:
    """A task's items; `limit` draws a seeded random subset (the same for every model)."""
    if name not in TASKS:
        raise InputError(f"unknown benchmark '{name}' (known: {', '.join(TASKS)})")
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
    from knowledgesg.generation import chat_prompt_ids
    from knowledgesg.scoring import encode_context

    return chat_prompt_ids(tokenizer, prompt) if has_chat_template(tokenizer) else encode_context(tokenizer, f"{prompt}\nAnswer:")


def choice_ids(tokenizer, choice: str) -> list[int]:
    from knowledgesg.scoring import encode_continuation

    # the assistant turn starts a new line in a chat template; after "Answer:" a space leads
    return encode_continuation(tokenizer, choice if has_chat_template(tokenizer) else f" {choice}")


def predict_logprob(model, tokenizer, items: list[Item], batch_size: int, device: str) -> list[int]:
    from knowledgesg.scoring import continuation_logprobs, pad_id

    contexts, continuations, owners = [], [], []
    for n, item in enumerate(items):
        ids = context_ids(tokenizer, item.prompt)
        for choice in item.choices:
            contexts.append(ids)
            continuations.append(choice_ids(tokenizer, choice))
            owners.append(n)
    scores = continuation_logprobs(model, contexts, continuations, pad_id(tokenizer), batch_size, device)
    predictions: list[int] = []
    position = 0
    for item in items:
        sums = [float(scores[position + j].sum()) for j in range(len(item.choices))]
        predictions.append(max(range(len(sums)), key=sums.__getitem__))
        position += len(item.choices)
    return predictions


def predict_generation(model, tokenizer, items: list[Item], batch_size: int, device: str, max_new_tokens: int = 12) -> list[int | None]:
    from knowledgesg.generation import Generator, SamplingParams

    generator = Generator(model, tokenizer, batch_size, device, stop_at_newline=not has_chat_template(tokenizer))
    completions = generator.generate([context_ids(tokenizer, item.prompt) for item in items], SamplingParams(do_sample=False, max_new_tokens=max_new_tokens), seed=0, progress="eval: generating")
    return [parse_choice(c.text, item.choices) for c, item in zip(completions, items)]


@dataclass
class Score:
    accuracy: float
    macro_f1: float
    n: int
    unparsed: int = 0


def score(items: list[Item], predictions: list[int | None]) -> Score:
    from sklearn.metrics import f1_score

    truth = [item.answer for item in items]
    k = len(items[0].choices)
    filled = [p if p is not None else -1 for p in predictions]  # unparsed: wrong for every class
    accuracy = sum(p == t for p, t in zip(filled, truth)) / len(items)
    macro_f1 = float(f1_score(truth, filled, labels=list(range(k)), average="macro", zero_division=0))
    return Score(round(accuracy, 4), round(macro_f1, 4), len(items), sum(p is None for p in predictions))


def evaluate_model(model, tokenizer, tasks: list[str], modes: list[str], limit: int | None, seed: int, batch_size: int = 8, device: str = "cpu") -> dict:
    results = {}
    for task in tasks:
        items = load_task(task, limit, seed)
        entry = {}
        if "logprob" in modes:
            entry["logprob"] = score(items, predict_logprob(model, tokenizer, items, batch_size, device)).__dict__
        if "generation" in modes:
            entry["generation"] = score(items, predict_generation(model, tokenizer, items, batch_size, device)).__dict__
        results[task] = entry
    return results

