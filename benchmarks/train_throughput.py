"""DP-SGD training throughput against the machine's matmul roof, before and after the batching work.

Usage:  .venv/bin/python benchmarks/train_throughput.py [--model smollm2-135m-instruct] [--steps 6]
            [--batch 16] [--max-rows 8] [--loss-on response] [--bfloat16]

Roofs: the best of several float32 matmuls, (a) square 2048 x 2048, and (b) at the model's own
shapes: one decoder layer's projections on [tokens, hidden] inputs (q, k, v, o, gate, up, down)
and the vocabulary head, weighted by their flops, with as many rows as one micro-batch holds.

Training: one logical DP-SGD batch of `--batch` real FPB training examples (chat template, real
lengths, no padding to a fixed width), split into physical batches of at most `--max-rows` rows,
LoRA r=8 on q, v, SGD at learning rate 0 (each step from the same adapter), Opacus per-sample clipping and noise, run two ways on the same model and
the same units, alternating step by step so that machine noise hits both:
- before: full logits at every position, micro-batches cut in the sampled order;
- after:  the vocabulary head applied only to labelled positions, units grouped by length into
          the micro-batches of least padded cost (`privacy.dp_sgd.micro_batches`);
- with `--bfloat16`, also "after, bfloat16 base": the same on a second copy of the model whose
  frozen weights are bfloat16 (dp_train's `precision: bfloat16`; the adapter and its clipped
  gradients stay float32), with the cosine between its clipped gradient sum and float32's.
Throughput counts non-pad tokens only. Useful work per token is 4 N (2N forward, 2N for the
activation gradients; frozen weights need no weight gradients): the issue's measure. "Needed"
work counts the head (vocab x hidden) only at the labelled positions that have a loss, which is
all the training objective needs. Writes benchmarks/results/train_throughput.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402


def _best_time(fn, repeats: int) -> float:
    fn()  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def square_peak(size: int = 2048, repeats: int = 8) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / _best_time(lambda: torch.matmul(a, b), repeats) / 1e9


def matmul_shapes(config) -> list[tuple[str, int, int, int]]:
    """(name, fan-in, fan-out, count in one forward pass) of the model's matmuls."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    layers = config.num_hidden_layers
    return [("q, o", h, h, 2 * layers), ("k, v", h, kv, 2 * layers), ("gate, up", h, i, 2 * layers), ("down", i, h, layers), ("head", h, config.vocab_size, 1)]


def model_shape_roof(config, rows: int, repeats: int = 5, dtype: str = "float32") -> tuple[float, list[tuple[str, float]]]:
    """GFLOP/s of the model's own matmuls on `rows` token rows in `dtype`, flop-weighted over one forward pass."""
    import torch

    total_flops = total_time = 0.0
    each = []
    for name, fan_in, fan_out, count in matmul_shapes(config):
        x, w = torch.randn(rows, fan_in, dtype=getattr(torch, dtype)), torch.randn(fan_in, fan_out, dtype=getattr(torch, dtype))
        seconds = _best_time(lambda: torch.matmul(x, w), repeats)
        flops = 2 * rows * fan_in * fan_out
        each.append((f"{name}: [{rows}, {fan_in}] x [{fan_in}, {fan_out}]", flops / seconds / 1e9))
        total_flops += flops * count
        total_time += seconds * count
    return total_flops / total_time / 1e9, each


def in_sampled_order(units: list[int], rows_per_unit: list[int], widths: list[int], max_rows: int) -> list[list[int]]:
    """The previous micro-batching: whole units, in the order they were sampled, cut at max_rows."""
    batches, current, size = [], [], 0
    for unit in units:
        if current and size + rows_per_unit[unit] > max_rows:
            batches.append(current)
            current, size = [], 0
        current.append(unit)
        size += rows_per_unit[unit]
    return batches + ([current] if current else [])


def keep_clipped_sums(dp) -> None:
    """Keep each step's sum of clipped gradients, before the noise, as `dp.last_clipped_sum`."""
    import torch

    add_noise = dp.optimizer.add_noise

    def recording() -> None:
        dp.last_clipped_sum = torch.cat([p.summed_grad.detach().flatten() for p in dp.optimizer.params])
        add_noise()

    dp.optimizer.add_noise = recording


def full_logits_loss(module, inputs, row_unit, n_units):
    from knowledgesg.sft import per_sequence_loss
    from privacy.dp_sgd import unit_means

    logits = module(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    return unit_means(per_sequence_loss(logits, inputs["labels"]), row_unit, n_units)


def main() -> None:
    import random

    import torch
    from peft import LoraConfig, get_peft_model

    from knowledgesg.builtin_data import load_builtin
    from knowledgesg.models import load_causal_lm, resolve_model
    from knowledgesg.sft import IGNORE, tokenize_example, unit_batch, unit_loss_on, unit_widths
    from privacy.dp_sgd import DPSGD, DPSGDSettings, micro_batches
    from privacy.noise import SecureRandom

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16, help="units in the logical batch")
    parser.add_argument("--max-rows", type=int, default=8)
    parser.add_argument("--loss-on", choices=["response", "all"], default="response")
    parser.add_argument("--bfloat16", action="store_true", help="add the variant with bfloat16 base weights")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(resolve_model(args.model))
    config = model.config
    parameters = sum(p.numel() for p in model.parameters())
    head_parameters = config.vocab_size * config.hidden_size
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    low = get_peft_model(copy.deepcopy(model).to(torch.bfloat16), lora).train() if args.bfloat16 else None
    model = get_peft_model(model, lora)
    model.train()
    for name, weight in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, and at learning rate 0 would keep A's gradients at zero
            torch.nn.init.normal_(weight, std=0.02)
    if low is not None:  # the same adapter on both copies
        low.load_state_dict(model.state_dict(), strict=False)
    records = load_builtin("fpb_train", "fpb")
    examples = [tokenize_example(tokenizer, r, 128, args.loss_on) for r in records[:2000]]
    units = [[i] for i in range(len(examples))]
    rows_per_unit, widths = [1] * len(units), unit_widths(examples, units)
    settings = DPSGDSettings(1.0, 1.0, args.batch / len(units), args.batch)
    # learning rate 0: every step starts from the same adapter, so the variants' gradients compare
    engine = DPSGD(model, lambda ps: torch.optim.SGD(ps, lr=0.0), settings, SecureRandom.from_os_entropy())
    variants = {"before": (in_sampled_order, full_logits_loss, engine), "after": (micro_batches, unit_loss_on("cpu"), engine)}
    if low is not None:
        variants["after, bfloat16 base"] = (micro_batches, unit_loss_on("cpu"), DPSGD(low, lambda ps: torch.optim.SGD(ps, lr=0.0), settings, SecureRandom.from_os_entropy()))
    cosines: list[float] = []
    rng = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in variants}
    counts = {"tokens": [], "labelled": [], **{f"padded_{name}": [] for name in variants}}
    for _, _, dp in variants.values():
        keep_clipped_sums(dp)
    for step in range(args.steps + 1):
        chosen = rng.sample(range(len(units)), args.batch)  # the same units for both variants
        tokens = sum(len(examples[u].input_ids) for u in chosen)
        labelled = sum(sum(t != IGNORE for t in examples[u].labels[1:]) for u in chosen)
        clipped_sums = {}
        for name, (split, loss, dp) in (variants.items() if step % 2 == 0 else reversed(variants.items())):
            batches = [unit_batch(examples, units, mb, tokenizer.pad_token_id) for mb in split(chosen, rows_per_unit, widths, args.max_rows)]
            start = time.perf_counter()
            dp.step(batches, loss)
            if step:  # the first step warms up
                times[name].append(time.perf_counter() - start)
                counts[f"padded_{name}"].append(sum(b[0]["input_ids"].numel() for b in batches))
            clipped_sums[name] = dp.last_clipped_sum
        if low is not None:
            cosines.append(float(torch.nn.functional.cosine_similarity(clipped_sums["after"], clipped_sums["after, bfloat16 base"], dim=0)))
        if step:
            counts["tokens"].append(tokens)
            counts["labelled"].append(labelled)

    peak = square_peak()
    roof, shapes = model_shape_roof(config, rows=args.max_rows * 96)
    tokens = statistics.mean(counts["tokens"])
    labelled = statistics.mean(counts["labelled"])
    rows = []
    for name in variants:
        seconds = statistics.median(times[name])
        rate = tokens / seconds
        useful = 4 * parameters * tokens / seconds / 1e9
        needed = (4 * (parameters - head_parameters) * tokens + 4 * head_parameters * labelled) / seconds / 1e9
        padded = statistics.mean(counts[f"padded_{name}"])
        rows.append(f"| {name} | {seconds:.2f} | {padded:.0f} | {rate:.0f} | {useful / peak:.1%} | {useful / roof:.1%} | {needed / roof:.1%} |")
    speedup = statistics.median(times["before"]) / statistics.median(times["after"])
    write_result("train_throughput", [
        "# DP-SGD training throughput against the matmul roof", "",
        f"Command: `{command()}`", f"Machine: {machine()}",
        f"Model: {args.model} ({parameters / 1e6:.0f} M parameters, head {head_parameters / 1e6:.1f} M); LoRA r=8 on q, v (B drawn at std 0.02); SGD at learning rate 0, so every step starts from the same adapter; DP-SGD (Opacus).",
        f"One logical batch of {args.batch} real FPB training examples (chat template, loss on {args.loss_on}), at most {args.max_rows} rows per pass; "
        f"{tokens:.0f} non-pad tokens and {labelled:.0f} labelled tokens per step on average; median of {args.steps} steps per variant, alternating.", "",
        f"Roofs: float32 matmul 2048 x 2048 **{peak:.1f} GFLOP/s**; at the model's own shapes ({args.max_rows * 96} rows, flop-weighted) **{roof:.1f} GFLOP/s**.", "",
        "| variant | s / step | tokens computed (padding included) | non-pad tokens/s | 4N/token vs square peak | 4N/token vs model-shape roof | needed flops vs model-shape roof |",
        "|---|---:|---:|---:|---:|---:|---:|", *rows, "",
        f"Speed-up after / before: **{speedup:.2f}x** (same units, same model, same process).", "",
        *([f"Speed-up of bfloat16 base weights over float32 (both 'after'): **{statistics.median(times['after']) / statistics.median(times['after, bfloat16 base']):.2f}x**; "
           f"cosine between their clipped gradient sums (before noise), per step: min {min(cosines):.4f}, median {statistics.median(cosines):.4f}.", ""] if low is not None else []),
        "Matmul throughput at the model's shapes:", "", *[f"- {name}: {rate:.1f} GFLOP/s" for name, rate in shapes],
    ])


if __name__ == "__main__":
    main()
