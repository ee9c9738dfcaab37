"""One `tune_professional` step on Gemma 3 270M: the model's own loss (logits over its 262k-token
vocabulary at every position) against the head on labelled positions only (`sft.batch_token_loss`).

Usage:  .venv/bin/python benchmarks/professional_step.py [--steps 4] [--batch-size 8]

The stage's own work: LoRA r=8 on q, v over the float32 base, batches of 8 of FiQA's public
training records in the prompt format `tune_professional` trains (`answer_example`, max length
128), forward and backward. The two variants alternate on the same batches in one process, so
machine noise falls on both; each step's two losses are compared as well.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from knowledgesg.builtin_data import load_builtin  # noqa: E402
from knowledgesg.models import load_causal_lm, resolve_model  # noqa: E402
from knowledgesg.records import InstructionRecord  # noqa: E402
from knowledgesg.sft import batch_token_loss, collate  # noqa: E402
from pipelines.tune_professional import answer_example  # noqa: E402


def timed_step(model, loss_fn) -> tuple[float, float]:
    start = time.perf_counter()
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return time.perf_counter() - start, float(loss)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant (after one untimed each)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--note", default="", help="what else ran on the machine")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(resolve_model("gemma-3-270m"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.train()
    records = [r for r in load_builtin("fiqa_train", "fiqa") if isinstance(r, InstructionRecord)]
    examples = [answer_example(tokenizer, r, 128) for r in records[: args.batch_size * (args.steps + 1)]]
    batches = [collate(examples[i : i + args.batch_size], tokenizer.pad_token_id) for i in range(0, len(examples), args.batch_size)]
    variants = {"model's own loss (full logits)": lambda b: model(**b).loss, "head on labelled positions": lambda b: batch_token_loss(model, b, "cpu")}
    times: dict[str, list[float]] = {name: [] for name in variants}
    differences = []
    for k, batch in enumerate(batches):
        losses = []
        for name, loss_fn in variants.items():
            seconds, loss = timed_step(model, lambda: loss_fn(batch))
            losses.append(loss)
            if k:  # the first batch warms both up
                times[name].append(seconds)
        differences.append(abs(losses[0] - losses[1]))
    tokens = statistics.mean(int(b["attention_mask"].sum()) for b in batches)
    labelled = statistics.mean(int((b["labels"][:, 1:] != -100).sum()) for b in batches) / args.batch_size
    medians = {name: statistics.median(t) for name, t in times.items()}
    full, gathered = medians.values()
    lines = [
        "# One tune_professional step on Gemma 3 270M: full logits against the head on labelled positions", "",
        f"Command: `{command()}`", f"Machine: {machine()}" + (f"; {args.note}" if args.note else ""), "",
        f"LoRA r=8 on q, v, float32 base; batches of {args.batch_size} FiQA training records as tune_professional trains them "
        f"({tokens:.0f} non-pad tokens per batch on average, {labelled:.1f} labelled tokens per record); forward and backward; median of {args.steps} steps per variant, alternating.", "",
        "| variant | s / step |", "|---|---:|",
        *(f"| {name} | {seconds:.2f} |" for name, seconds in medians.items()), "",
        f"Speed-up: **{full / gathered:.2f}x**. Largest difference between the two losses on a batch: {max(differences):.2e}.",
    ]
    write_result("professional_step", lines)


if __name__ == "__main__":
    main()
