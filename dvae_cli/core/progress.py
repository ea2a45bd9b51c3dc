"""Rich progress bars and tables, on stderr so that stdout stays clean for piping."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

Advance = Callable[..., None]
"""advance(n, **fields): n more items done; fields update the bar's extra text."""


def console() -> Console:
    return Console(stderr=True)


@contextmanager
def progress_bar(description: str, total: int, extra: str = "", enabled: bool = True) -> Iterator[Advance]:
    """A bar of `total` items; `extra` is a format string over fields passed to advance (e.g. "{rate}")."""
    if not enabled:
        yield lambda n=1, **fields: None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn()]
    if extra:
        columns.append(TextColumn(extra))
    with Progress(*columns, console=console(), transient=True) as progress:
        task = progress.add_task(description, total=total, **{"info": ""})

        def advance(n: int = 1, **fields: object) -> None:
            progress.update(task, advance=n, **fields)

        yield advance
