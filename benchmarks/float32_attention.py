"""bfloat16 weights on a CPU: attention in bfloat16 (PyTorch's SDPA) against attention on float32
copies of the queries, keys and values (`models.FLOAT32_SDPA`, what `load_causal_lm(training=True)`
now uses for bfloat16 on a CPU), alternately in one process; float32 weights beside them.

Usage:  .venv/bin/python benchmarks/float32_attention.py [--repeats 4] [--batch 16] [--length 128]

Workloads: one DP-SGD step (LoRA r=8 on q, v; per-sample clipping; real FPB rows, right-padded to
their batch's longest) and one scoring forward pass without gradients, on SmolLM2-135M-Instruct.
Agreement: the largest difference of the scoring pass's log-probabilities from float32 weights'.
Writes benchmarks/results/float32_attention.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, sequence_losses, write_result  # noqa: E402


def main() -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from knowledgesg.builtin_data import load_builtin
    from knowledgesg.models import FLOAT32_SDPA, attend_in_float32, load_causal_lm, resolve_model
    from knowledgesg.sft import collate, tokenize_example
    from privacy.dp_sgd import DPSGD, DPSGDSettings
    from privacy.noise import SecureRandom

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()

    torch.manual_seed(0)
    name = "smollm2-135m-instruct"
    models = {dtype: load_causal_lm(resolve_model(name), "cpu", dtype) for dtype in ("bfloat16", "float32")}
    tokenizer = models["float32"][1]
    rows = [tokenize_example(tokenizer, r, args.length, "all") for r in load_builtin("fpb_train", "fpb")[: args.batch]]
    inputs = collate(rows, tokenizer.pad_token_id)
    real_tokens = int(inputs["attention_mask"].sum())

    def log_probs(model) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float().log_softmax(-1)

    reference = log_probs(models["float32"][0])
    mask = inputs["attention_mask"].bool()

    def attend(model, attention: str) -> None:
        if attention == FLOAT32_SDPA:
            attend_in_float32(model)
        else:
            model.set_attn_implementation(attention)

    agreement = {}
    for attention in ("sdpa", FLOAT32_SDPA):  # the float32 weights rounded, before any step moved an adapter
        attend(models["bfloat16"][0], attention)
        agreement[attention] = float((log_probs(models["bfloat16"][0]) - reference)[mask].abs().max())
    trainers = {}
    for dtype, (model, _) in models.items():
        lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
        lora.train()
        trainers[dtype] = (lora, DPSGD(lora, lambda ps: torch.optim.Adam(ps, lr=1e-3), DPSGDSettings(1.0, 1.0, args.batch / 1000, args.batch),
                                       SecureRandom.from_os_entropy()))

    variants = {"bfloat16, attention in bfloat16 (sdpa)": ("bfloat16", "sdpa"), f"bfloat16, attention in float32 ({FLOAT32_SDPA})": ("bfloat16", FLOAT32_SDPA),
                "float32 (sdpa)": ("float32", "sdpa")}
    seconds: dict[str, dict[str, list[float]]] = {v: {"step": [], "score": []} for v in variants}
    for repeat in range(args.repeats + 1):  # the first round warms each variant up and is not counted
        for variant, (dtype, attention) in variants.items():
            lora, dp = trainers[dtype]
            attend(lora, attention)
            start = time.perf_counter()
            dp.step([(inputs, torch.arange(args.batch), args.batch)], sequence_losses)
            step_s = time.perf_counter() - start
            lora.eval()
            start = time.perf_counter()
            log_probs(lora)
            score_s = time.perf_counter() - start
            lora.train()
            if repeat:
                seconds[variant]["step"].append(step_s)
                seconds[variant]["score"].append(score_s)
    base = next(iter(variants))
    lines = ["# bfloat16 weights on a CPU: attention in bfloat16 against attention in float32", "",
             f"Command: `{command()}`", f"Machine: {machine()}", "",
             f"{name}, LoRA r=8 on q_proj, v_proj, one DP-SGD step (clip 1.0, Adam) and one scoring pass over {args.batch} FPB rows "
             f"({real_tokens} real tokens, padded to {inputs['input_ids'].shape[1]}); each variant in turn, {args.repeats} rounds after a warm-up; medians. "
             "The two bfloat16 variants train one adapter between them (the same weights' cost either way).", "",
             "| variant | DP-SGD step, s | scoring pass, s | step speed-up over bfloat16 attention | scoring speed-up | largest log-prob difference from float32 weights |",
             "|---|---:|---:|---:|---:|---:|"]
    for variant in variants:
        step, score = statistics.median(seconds[variant]["step"]), statistics.median(seconds[variant]["score"])
        base_step, base_score = statistics.median(seconds[base]["step"]), statistics.median(seconds[base]["score"])
        diff = f"{agreement[variants[variant][1]]:.3f}" if variants[variant][0] == "bfloat16" else "(reference)"
        lines.append(f"| {variant} | {step:.2f} | {score:.2f} | {base_step / step:.2f}x | {base_score / score:.2f}x | {diff} |")
    write_result("float32_attention", lines)


if __name__ == "__main__":
    main()
