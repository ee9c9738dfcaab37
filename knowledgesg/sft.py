"""Supervised fine-tuning data: chat-formatted examples whose loss covers response tokens only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from knowledgesg.prompts import user_message
from knowledgesg.records import InstructionRecord
from privacy.dp_sgd import unit_means

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens


def tokenize_example(tokenizer, record: InstructionRecord, max_length: int, loss_on: str = "response") -> Example:
    """Prompt through the chat template, then the response and end-of-turn token.

    `loss_on="response"` trains p(response | prompt). `"all"` also trains the user turn, which a
    model must learn if it is to write new inputs (synthesis) from a public instruction alone.
    Too long: the prompt loses its oldest tokens first, so that at least half the budget stays
    for the response.
    """
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": user_message(record)}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    response = tokenizer(record.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    response = response[: max(max_length - len(prompt), max_length // 2)]
    prompt = prompt[len(prompt) - (max_length - len(response)) :] if len(prompt) + len(response) > max_length else prompt
    prompt_labels = prompt if loss_on == "all" else [IGNORE] * len(prompt)
    return Example(input_ids=prompt + response, labels=prompt_labels + response)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch (training: every sequence starts at position 0)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_optimizer(name: str, learning_rate: float):
    """`name` ("adam" or "sgd") as a factory over parameters: DP-SGD builds its optimizer late."""

    def build(params) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=learning_rate) if name == "adam" else torch.optim.SGD(params, lr=learning_rate)

    return build


def unit_batch(examples: list[Example], units: list[list[int]], batch_units: list[int], pad_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """One physical DP-SGD batch: the rows of the chosen privacy units, each row's unit index, and
    the number of units (what `privacy.dp_sgd.DPSGD.step` takes)."""
    rows = [r for u in batch_units for r in units[u]]
    row_unit = torch.tensor([i for i, u in enumerate(batch_units) for _ in units[u]])
    return collate([examples[r] for r in rows], pad_id), row_unit, len(batch_units)


def unit_widths(examples: list[Example], units: list[list[int]]) -> list[int]:
    """Each unit's longest row, in tokens: the width it pads a micro-batch to."""
    return [max(len(examples[r].input_ids) for r in unit) for unit in units]


def unit_loss_on(device: str):
    """The per-unit loss DP-SGD differentiates: each sequence's mean response loss, averaged over
    the rows of its privacy unit."""

    def unit_loss(module, inputs: dict[str, torch.Tensor], row_unit: torch.Tensor, n_units: int) -> torch.Tensor:
        return unit_means(sequence_losses(module, inputs, device), row_unit.to(device), n_units)

    return unit_loss


# Model families whose causal-LM head is a plain linear map of the decoder's last hidden state
# (no scaling after it; Gemma's logit soft-capping where its config sets none, as Gemma 3's does),
# so it may be applied to the labelled positions alone.
PLAIN_HEAD_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "gemma3_text"}


def decoder_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder, output head) of a causal LM seen through Opacus's and peft's wrappers, or None when
    the head cannot be split off: another family, or a trained head (its per-row gradients need
    batch-first inputs, which a gather of labelled positions does not keep)."""
    while hasattr(model, "_module"):  # opacus.GradSampleModule: hooks sit on the inner layers
        model = model._module
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "model_type", None) not in PLAIN_HEAD_FAMILIES or getattr(base.config, "final_logit_softcapping", None) is not None:
        return None
    head = base.get_output_embeddings()
    if head is None or any(p.requires_grad for p in head.parameters()):
        return None
    return base.get_decoder(), head


def labelled_token_losses(model, inputs: dict[str, torch.Tensor], device: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(cross-entropy of each labelled token, the row it is in), with the vocabulary projection
    (49k x 576 for SmolLM2, a fifth of the model's flops per token; 262k x 640 for Gemma 3, more
    than the rest of the model) applied only where a token is predicted that carries a label: not
    on padding, and with `loss_on="response"` not on the prompt. None when the head cannot be split off."""
    parts = decoder_and_head(model)
    if parts is None:
        return None
    decoder, head = parts
    ids, mask, labels = inputs["input_ids"].to(device), inputs["attention_mask"].to(device), inputs["labels"].to(device)
    hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    labelled = targets != IGNORE
    token_loss = torch.nn.functional.cross_entropy(head(hidden[:, :-1][labelled]).float(), targets[labelled], reduction="none")
    return token_loss, labelled.nonzero()[:, 0]


def sequence_losses(model, inputs: dict[str, torch.Tensor], device: str) -> torch.Tensor:
    """Each row's mean cross-entropy over its labelled tokens, shape [rows]: the same value as
    `per_sequence_loss` on the full logits, with the head on labelled positions only."""
    gathered = labelled_token_losses(model, inputs, device)
    if gathered is None:
        return per_sequence_loss(model(input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device)).logits.float(), inputs["labels"].to(device))
    token_loss, rows = gathered
    rows_n = len(inputs["input_ids"])
    sums = torch.zeros(rows_n, dtype=token_loss.dtype, device=token_loss.device).index_add_(0, rows, token_loss)
    return sums / torch.bincount(rows, minlength=rows_n).clamp(min=1)


def batch_token_loss(model, inputs: dict[str, torch.Tensor], device: str) -> torch.Tensor:
    """The mean cross-entropy over every labelled token of the batch, as a model's built-in loss
    computes it (fine without privacy, e.g. on public data), with the head on labelled positions only."""
    gathered = labelled_token_losses(model, inputs, device)
    if gathered is None:
        return model(**{k: v.to(device) for k, v in inputs.items()}).loss
    return gathered[0].mean()


def per_sequence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over each sequence's response tokens: shape [batch].

    Not the model's built-in loss, which averages over every token of the batch and so makes
    one example's gradient depend on the lengths of the others: that breaks DP-SGD's
    per-example sensitivity bound.
    """
    shift_logits, shift_labels = logits[:, :-1, :], labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE, reduction="none")
    counts = (shift_labels != IGNORE).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counts
