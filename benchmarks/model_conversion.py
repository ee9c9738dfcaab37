"""Converting the packaged GGUF models to safetensors (prepare_models from an empty model cache):
transformers parsing each GGUF file three times (config, tokenizer, weights) against once
(`models.gguf_files_read_once`), alternately in one process, and whether both give the same
weights and tokenizer.

Usage:  .venv/bin/python benchmarks/model_conversion.py [--repeats 1]

Each conversion writes into a fresh temporary directory (the model cache is not touched).
Writes benchmarks/results/model_conversion.md.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from knowledgesg import models  # noqa: E402

VARIANTS = {"three parses": contextlib.nullcontext, "one parse": models.gguf_files_read_once}


def convert(name: str, variant: str, out: Path) -> float:
    models.gguf_files_read_once = VARIANTS[variant]  # what _convert_gguf enters
    start = time.perf_counter()
    models._convert_gguf(models.REGISTRY[name], out)
    return time.perf_counter() - start


def same_output(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    weights = [load_file(next(d.glob("*.safetensors"))) for d in (a, b)]
    return (weights[0].keys() == weights[1].keys() and all(bool((weights[0][k] == weights[1][k]).all()) for k in weights[0])
            and (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=1, help="A B pairs per model")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # untimed: the first conversion in a process also pays for transformers' lazy imports
        convert("smollm2-135m-instruct", "one parse", Path(tempfile.mkdtemp(dir=tmp)))
        for name in ("smollm2-135m-instruct", "gemma-3-270m"):
            seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
            outs: dict[str, Path] = {}
            for repeat in range(args.repeats):
                for variant in (list(VARIANTS) if repeat % 2 == 0 else list(VARIANTS)[::-1]):  # alternately first
                    outs[variant] = Path(tmp) / f"{name}-{variant.replace(' ', '-')}-{repeat}"
                    outs[variant].mkdir()
                    seconds[variant].append(convert(name, variant, outs[variant]))
            slow, fast = (statistics.median(seconds[v]) for v in VARIANTS)
            rows.append(f"| {name} | {slow:.1f} | {fast:.1f} | {slow / fast:.2f}x | {'yes' if same_output(*outs.values()) else 'NO'} |")
    write_result("model_conversion", [
        "# Converting the packaged GGUF models: one parse of the file against three", "",
        f"Command: `{command()}`", f"Machine: {machine()}",
        f"Each model converted with each variant ({args.repeats} pair(s), the first of each pair alternating, medians), in one process after an untimed "
        "conversion that takes transformers' first-use costs; the model cache is not used.", "",
        "| model | three parses, s | one parse, s | ratio | same weights and tokenizer |", "|---|---:|---:|---:|---|", *rows, "",
        "transformers reads a GGUF file for the config, again for the tokenizer and again for the weights, each time parsing every "
        "field, the vocabulary's strings one memmap slice at a time in Python (Gemma 3: 262k tokens). `gguf_files_read_once` hands "
        "the three reads one parsed reader.",
    ])


if __name__ == "__main__":
    main()
