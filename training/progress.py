"""A rich progress bar whose ``advance(n)`` callable is handed to batch loops."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def bar(description: str, total: int):
    """Yield ``advance(n)``; draws count, elapsed and remaining time on stderr."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)
