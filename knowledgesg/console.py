"""The program's two consoles and its progress bars.

`console` (stderr) carries progress, warnings and notes on what was written; `output` (stdout)
carries what a command was asked to show (a status table, a privacy report, scores), so that it can
be piped or saved without the rest."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")
# Off a terminal (CI logs, pipes) rich assumes 80 columns and truncates tables; logs can be wider.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
output = Console(width=None if sys.stdout.isatty() else 160)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        # off a terminal a bar cannot redraw in place: it would only leave a blank line in the log
        # (before a one-line error, say)
        disable=not console.is_terminal,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar that disappears when done."""
    with progress_bar() as bar:
        yield from bar.track(items, total=total, description=description)


# The libraries whose warnings and progress bars a normal run does not show (`ksg -v` does).
DEPENDENCIES = r"(transformers|peft|opacus|torch|flwr|ray|datasets|sentence_transformers|huggingface_hub|accelerate|safetensors|spacy|presidio_analyzer|sklearn|scipy|numpy|dp_accounting|faiss|nltk|pydantic)(\.|$)"


def quiet_dependencies() -> None:
    """No dependency warnings, log chatter or per-load progress bars: our own lines and bars only.
    Environment variables first: the libraries read them when they are imported."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow this too
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # bars on plain tqdm, outside the switches above (transformers' GGUF conversion)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", module=DEPENDENCIES)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("absl", "flwr", "ray", "datasets", "sentence_transformers", "presidio-analyzer", "opacus"):
        logging.getLogger(name).setLevel(logging.ERROR)
