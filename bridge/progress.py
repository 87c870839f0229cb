"""Progress bars for long work, quiet when output is not a terminal (cron, CI, pipes)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Bar:
    """A thin handle so the engine does not depend on rich's API directly."""

    def __init__(self, progress: Progress | None) -> None:
        self._p = progress
        self._points: dict[Any, int] = {}

    def add(self, label: str, total: int | None) -> Any:
        if self._p is None:
            return None
        task = self._p.add_task(label, total=total, points=0)
        self._points[task] = 0
        return task

    def advance(self, task: Any, n: int = 1, points: int = 0) -> None:
        if self._p is not None and task is not None:
            self._points[task] += points
            self._p.update(task, advance=n, points=self._points[task])


@contextmanager
def progress(enabled: bool | None = None) -> Iterator[Bar]:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield Bar(None)
        return
    p = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[points]:,} points"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    with p:
        yield Bar(p)
