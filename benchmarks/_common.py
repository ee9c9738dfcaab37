"""What every benchmark prints beside its figures: the command that made them and the machine."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def command() -> str:
    return " ".join([".venv/bin/python", os.path.relpath(sys.argv[0]), *sys.argv[1:]])


def machine() -> str:
    import torch

    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"


def write_result(name: str, lines: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_batch(model_name: str, batch: int, length: int, r: int = 8, targets: list[str] | None = None):
    """(model with LoRA (r=8 on q, v unless told) in train mode, one batch of real FPB examples each padded to
    exactly `length` tokens, the base model's parameter count): the same work in every mode."""
    import torch
    from peft import LoraConfig, get_peft_model

    from knowledgesg.builtin_data import load_builtin
    from knowledgesg.models import load_causal_lm, resolve_model
    from knowledgesg.sft import Example, collate, tokenize_example

    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(resolve_model(model_name))
    parameters = sum(p.numel() for p in model.parameters())
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets or ["q_proj", "v_proj"], lora_dropout=0.0))
    model.train()
    examples = [tokenize_example(tokenizer, r, length) for r in load_builtin("fpb_train", "fpb")[:batch]]
    examples = [Example([tokenizer.pad_token_id] * (length - len(e.input_ids)) + e.input_ids, [-100] * (length - len(e.labels)) + e.labels) for e in examples]
    return model, collate(examples, tokenizer.pad_token_id), parameters


def sequence_losses(module, inputs, row_unit, n_units):
    """Per-sequence losses, as DPSGD.step calls a unit loss (one sequence per unit here): the
    training code's own loss (head on labelled positions only), the same in every mode."""
    from knowledgesg.sft import sequence_losses as training_losses

    return training_losses(module, inputs, "cpu")
