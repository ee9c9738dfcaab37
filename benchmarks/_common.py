"""What every benchmark prints beside its figures: the command that made them and the machine."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from knowledgesg.fileio import write_text

RESULTS = Path(__file__).resolve().parent / "results"


def command() -> str:
    return shlex.join([".venv/bin/python", os.path.relpath(sys.argv[0]), *sys.argv[1:]])


def machine() -> str:
    """The architecture and CPU model (the same cores have given half or twice the matmul
    throughput of another session's: the figures are only comparable with their CPU named),
    cores, Python and torch."""
    import torch

    return f"{platform.machine()} ({cpu_model()}{cpu_features()}), {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"


def cpu_features() -> str:
    """The instruction sets that change what runs fastest here, as ", AVX512-BF16" (or ", AVX2"):
    CPUs sold under one model name ("AMD EPYC") have differed between sessions, and with native
    bfloat16 `--precision auto` runs bfloat16, without it float32. Native bfloat16 is decided by
    the function `auto` itself asks (every CPU with AMX also has AVX512-BF16)."""
    from knowledgesg.models import native_bfloat16

    if native_bfloat16("cpu"):
        return ", AVX512-BF16"
    cpuinfo = Path("/proc/cpuinfo")
    return ", AVX2" if cpuinfo.is_file() and "avx2" in cpuinfo.read_text().split() else ""


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown CPU" where it has none)."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")] if cpuinfo.is_file() else []
    return names[0] if names else "unknown CPU"


def positive_ints(text: str) -> list[int]:
    """An argparse type: comma-separated integers, each at least 1 (e.g. engine batch sizes)."""
    import argparse

    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers, got '{text}'") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"every entry at least 1, got '{text}'")
    return values


def write_result(name: str, lines: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    write_text(RESULTS / f"{name}.md", text)  # temp file, then rename: an interrupted benchmark leaves the last whole table
    print(text)


def code_version() -> str:
    """The commit of the package code in the working directory (every `ksg` child imports it),
    and whether it has local changes: a run's caches are only reused by the same code."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "knowledgesg", "pipelines", "privacy", "eval"], capture_output=True, text=True).stdout.strip()
    return f"commit {head}" + (" with local changes" if dirty else "")


def spec_digest(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class RunStore:
    """What a long benchmark's finished runs measured, kept in the repository: a run directory
    lives in a work directory that the next session (often a fresh machine) may not have, and a
    run measured once is not measured again to finish a table. An entry belongs to the spec it
    ran (its digest): another spec is another run."""

    path: Path

    def runs(self) -> dict[str, dict]:
        return json.loads(self.path.read_text())["runs"] if self.path.is_file() else {}

    def entry(self, name: str, spec: dict) -> dict | None:
        entry = self.runs().get(name)
        return entry if entry and entry["digest"] == spec_digest(spec) else None

    def save(self, name: str, spec: dict, seconds: float, **fields) -> None:
        """Keep a finished run with the code and machine it ran on (temp file, then rename). A run
        measured again keeps its earlier measurements under "earlier", newest last: a DP run draws
        new noise each time, so a repeat is a second sample, not a correction."""
        runs = self.runs()
        earlier = []
        if name in runs:
            previous = runs[name]
            earlier = [*previous.pop("earlier", []), previous]
        runs[name] = {"digest": spec_digest(spec), "code": code_version(), "machine": machine(), "seconds": round(seconds, 1),
                      "saved_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"), **fields}
        if earlier:
            runs[name]["earlier"] = earlier
        self._write(runs)

    def add(self, name: str, spec: dict, measured: dict, **fields) -> None:
        """Further figures of the measurement `measured` (the entry as read before they were made,
        e.g. its released models scored on more test items): they join that entry. Raises if the
        entry is another measurement by now (a newer save) or another spec."""
        runs = self.runs()
        if self.entry(name, spec) != measured:
            raise KeyError(f"{name}: the store no longer holds that measurement of this spec ({self.path.name})")
        runs[name].update(fields)
        self._write(runs)

    def _write(self, runs: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
        tmp.replace(self.path)


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


def generate_on_batches(model, tokenizer, prompts: list[list[int]], batches: list[list[int]], new_tokens: int, stop_ids) -> tuple[int, float]:
    """The engine's fair peer: greedy `model.generate` on the given batches of prompt indices,
    each left-padded as the engine pads it. (tokens generated up to and including each row's first
    stop token, seconds)."""
    import time

    import torch

    from knowledgesg.generation import pad_batch

    start, tokens = time.perf_counter(), 0
    for batch in batches:
        ids, mask = pad_batch([prompts[i] for i in batch], tokenizer.pad_token_id, left=True)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
        for row in out[:, ids.shape[1]:].tolist():
            tokens += next((k + 1 for k, t in enumerate(row) if t in stop_ids), len(row))
    return tokens, time.perf_counter() - start
