"""One console for the whole program (on stderr, so stdout stays clean for data) and progress bars."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")
# Off a terminal (CI logs, pipes) rich assumes 80 columns and truncates tables; logs can be wider.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar that disappears when done."""
    with progress_bar() as bar:
        yield from bar.track(items, total=total, description=description)
