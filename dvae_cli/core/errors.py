"""The two kinds of failure dvae distinguishes: user mistakes (exit 2) and bugs (exit 1)."""

from __future__ import annotations

import sys


class UserError(Exception):
    """A mistake the user can fix: bad params, missing or foreign files, mismatched model and data.

    The message is one line that says what is wrong and what to do; the CLI prints it and exits with 2.
    """


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def warn(message: str) -> None:
    """One line on stderr about something questionable that leaves the result valid; the command goes on."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
