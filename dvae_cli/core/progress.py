"""Progress and tables on stderr (stdout stays clean for piping): a rich bar on a terminal, plain lines in a log."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

Advance = Callable[..., None]
"""advance(n, **fields): n more items done; fields update the bar's extra text."""

LINE_INTERVAL_SECONDS = 30.0


def console() -> Console:
    return Console(stderr=True)


def _duration(seconds: float) -> str:
    """1m52s style: 45s, 1m52s, 2h03m."""
    minutes, secs = divmod(round(seconds), 60)
    if not minutes:
        return f"{secs}s"
    hours, minutes = divmod(minutes, 60)
    return f"{minutes}m{secs:02d}s" if not hours else f"{hours}h{minutes:02d}m"


class LogProgress:
    """Plain progress lines for a log (DVC, CI, a redirected stderr), where a live bar would draw nothing.

    One line at each 10 % of `total` and at any advance `interval` seconds after the last line, and on `finish()`
    a final one unless the last line already said it. It only reads `clock` and writes `stream`.
    """

    def __init__(self, description: str, total: int, unit: str, stream: TextIO, completed: int = 0,
                 clock: Callable[[], float] = time.monotonic, interval: float = LINE_INTERVAL_SECONDS) -> None:
        self.description, self.total, self.unit, self.stream = description, total, unit, stream
        self.clock, self.interval = clock, interval
        self.done = self.first = completed
        self.started = self.last_time = clock()
        self.last_tenth = self._tenth()
        self.last_line_done: int | None = None

    def _tenth(self) -> int:
        return 10 if self.total <= 0 else min(10, self.done * 10 // self.total)

    def advance(self, n: int = 1, **fields: object) -> None:
        self.done += n
        now = self.clock()
        if self._tenth() > self.last_tenth or now - self.last_time >= self.interval:
            self._line(now)

    def finish(self) -> None:
        if self.last_line_done != self.done:
            self._line(self.clock())

    def _line(self, now: float) -> None:
        percent = 100 if self.total <= 0 else self.done * 100 // self.total
        parts = [f"{self.description}: {self.unit} {self.done:,}/{self.total:,} ({percent} %)"]
        elapsed = now - self.started
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        if rate > 0:
            parts.append(f"{rate:,.0f} {self.unit}s/s" if rate >= 100 else f"{rate:.3g} {self.unit}s/s")
        if self.done >= self.total:
            parts.append(f"done in {_duration(elapsed)}")
        elif rate > 0:
            parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        self.stream.write(", ".join(parts) + "\n")
        self.stream.flush()
        self.last_time, self.last_tenth, self.last_line_done = now, self._tenth(), self.done


@contextmanager
def progress_bar(description: str, total: int, extra: str = "", enabled: bool = True, unit: str = "row",
                 completed: int = 0) -> Iterator[Advance]:
    """A bar of `total` items of `unit`, `completed` of them done before this run (a resumed training).

    `extra` is a format string over fields passed to advance (e.g. "{rate}"), shown on the rich bar only.
    """
    if not enabled:
        yield lambda n=1, **fields: None
        return
    out = console()
    if not out.is_interactive:
        log = LogProgress(description, total, unit, out.file, completed)
        yield log.advance
        log.finish()
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn()]
    if extra:
        columns.append(TextColumn(extra))
    with Progress(*columns, console=out, transient=True) as progress:
        task = progress.add_task(description, total=total, completed=completed, info="")

        def advance(n: int = 1, **fields: object) -> None:
            progress.update(task, advance=n, **fields)

        yield advance
