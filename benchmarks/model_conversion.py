"""Converting the packaged GGUF models to safetensors (prepare_models from an empty model cache),
three ways alternately in one process, and whether all give the same weights and tokenizer:
transformers' own way (it parses each GGUF file three times, for config, tokenizer and weights, and
the plain model is randomly initialised before the quantised weights overwrite it); one parse over
the file's memmap (the code until stop 51); and the code now (`models.gguf_files_read_once`: one
parse over a plain array, gguf's tensor-name map built once; `models.plain_copy`: no random init).

Usage:  .venv/bin/python benchmarks/model_conversion.py [--repeats 1]

Each conversion writes into a fresh temporary directory (the model cache is not touched).
Writes benchmarks/results/model_conversion.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from knowledgesg import models  # noqa: E402


@contextlib.contextmanager
def read_once_over_memmap():
    """gguf_files_read_once as it was until stop 51: one parse, slicing np.memmap."""
    import gguf

    real, readers = gguf.GGUFReader, {}

    def read_once(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    gguf.GGUFReader = read_once
    try:
        yield
    finally:
        gguf.GGUFReader = real


def initialised_copy(quantised):
    """The plain model as built until stop 51: randomly initialised, then overwritten."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_config(quantised.config, dtype=quantised.dtype)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    return plain


READ_ONCE, PLAIN_COPY = models.gguf_files_read_once, models.plain_copy
VARIANTS = {"transformers' way": (contextlib.nullcontext, initialised_copy),
            "one parse over the memmap": (read_once_over_memmap, initialised_copy),
            "now": (READ_ONCE, PLAIN_COPY)}


def convert(name: str, variant: str, out: Path) -> float:
    models.gguf_files_read_once, models.plain_copy = VARIANTS[variant]  # what _convert_gguf calls
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
        convert("smollm2-135m-instruct", "now", Path(tempfile.mkdtemp(dir=tmp)))
        for name in ("smollm2-135m-instruct", "gemma-3-270m"):
            seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
            outs: dict[str, Path] = {}
            for repeat in range(args.repeats):
                for variant in (list(VARIANTS) if repeat % 2 == 0 else list(VARIANTS)[::-1]):  # the order reversed each repeat
                    outs[variant] = Path(tmp) / f"{name}-{variant.replace(' ', '-')}-{repeat}"
                    outs[variant].mkdir()
                    seconds[variant].append(convert(name, variant, outs[variant]))
            own, memmap, now = (statistics.median(seconds[v]) for v in VARIANTS)
            same = all(same_output(outs["now"], outs[v]) for v in VARIANTS if v != "now")
            rows.append(f"| {name} | {own:.1f} | {memmap:.1f} | {now:.1f} | {own / now:.2f}x | {memmap / now:.2f}x | {'yes' if same else 'NO'} |")
    write_result("model_conversion", [
        "# Converting the packaged GGUF models: transformers' way, one parse over the memmap, and now", "",
        f"Command: `{command()}`", f"Machine: {machine()}",
        f"Each model converted with each variant ({args.repeats} round(s), the order reversed each round, medians), in one process after an untimed "
        "conversion that takes transformers' first-use costs; the model cache is not used.", "",
        "| model | transformers' way, s | one parse over the memmap, s | now, s | transformers' / now | memmap / now | same weights and tokenizer |",
        "|---|---:|---:|---:|---:|---:|---|", *rows, "",
        "transformers reads a GGUF file for the config, again for the tokenizer and again for the weights, each time parsing every "
        "field, the vocabulary's strings one slice at a time in Python (Gemma 3: 262k tokens). `gguf_files_read_once` hands "
        "the three reads one parsed reader, which slices a plain ndarray view of the file's memmap (np.memmap runs Python hooks on "
        "each slice), and builds gguf's tensor-name map once per architecture (transformers builds it for each submodule); "
        "`plain_copy` builds the plain model without the random init its strict load overwrites.",
    ])


if __name__ == "__main__":
    main()
