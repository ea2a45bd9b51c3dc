"""Progress: plain lines when stderr is a log, the rich bar on a terminal, nothing when disabled, no side effects."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from rich.console import Console

from dvae_cli.core import progress
from dvae_cli.core.progress import LogProgress, progress_bar
from dvae_cli.params import Params
from dvae_cli.sources import DataConfig
from dvae_cli.stages import prepare


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def log_progress(total: int, unit: str = "step", completed: int = 0) -> tuple[LogProgress, Clock, io.StringIO]:
    clock, stream = Clock(), io.StringIO()
    return LogProgress("train jointvae", total, unit, stream, completed=completed, clock=clock), clock, stream


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def done_counts(stream: io.StringIO) -> list[str]:
    """The "done/total" of each line."""
    return [line.split(": ", 1)[1].split(" ")[1] for line in lines(stream)]


@pytest.fixture
def log_stderr(monkeypatch):
    """stderr (pytest's capture) is not a terminal, whatever the environment says."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)


def test_a_line_reads_description_count_percent_rate_and_eta():
    log, clock, stream = log_progress(3000)
    clock.now += 1200 / 16.1
    log.advance(1200)
    assert lines(stream) == ["train jointvae: step 1,200/3,000 (40 %), 16.1 steps/s, ETA 1m52s"]


def test_a_line_at_each_tenth_and_the_last_one_says_how_long_it_took():
    log, clock, stream = log_progress(100)
    for _ in range(100):
        clock.now += 0.1
        log.advance()
    log.finish()
    assert done_counts(stream) == [f"{done}/100" for done in range(10, 101, 10)]
    assert lines(stream)[0] == "train jointvae: step 10/100 (10 %), 10 steps/s, ETA 9s"
    assert lines(stream)[-1] == "train jointvae: step 100/100 (100 %), 10 steps/s, done in 10s"


def test_batches_that_cross_tenths_print_once_each():
    log, clock, stream = log_progress(65536, unit="row")
    for _ in range(8):
        clock.now += 2.0
        log.advance(8192)
    assert done_counts(stream) == [f"{8192 * i:,}/65,536" for i in range(1, 9)]
    assert lines(stream)[1] == "train jointvae: row 16,384/65,536 (25 %), 4,096 rows/s, ETA 12s"


def test_a_line_every_30_seconds_between_tenths():
    log, clock, stream = log_progress(1000)
    for _ in range(200):
        clock.now += 1.0
        log.advance()
    assert done_counts(stream) == [f"{done}/1,000" for done in (30, 60, 90, 100, 130, 160, 190, 200)]


def test_updates_without_progress_print_nothing_before_30_seconds():
    log, clock, stream = log_progress(1000)
    clock.now += 29.0
    log.advance(0, info="loss 1.0")
    assert lines(stream) == []
    clock.now += 1.0
    log.advance(0, info="loss 1.0")
    assert lines(stream) == ["train jointvae: step 0/1,000 (0 %)"]


def test_the_final_line_when_the_last_line_is_stale_and_only_then():
    log, clock, stream = log_progress(1000)
    clock.now += 5.0
    log.advance(50)
    log.finish()
    assert lines(stream) == ["train jointvae: step 50/1,000 (5 %), 10 steps/s, ETA 1m35s"]
    log.finish()
    assert len(lines(stream)) == 1


def test_work_that_was_already_done_gives_a_final_line():
    log, _, stream = log_progress(3000, completed=3000)
    log.finish()
    assert lines(stream) == ["train jointvae: step 3,000/3,000 (100 %), done in 0s"]


def test_a_resumed_run_counts_only_its_own_work_in_the_rate():
    log, clock, stream = log_progress(3000, completed=1000)
    clock.now += 10.0
    log.advance(150)
    assert lines(stream) == []
    clock.now += 10.0
    log.advance(50)
    assert lines(stream) == ["train jointvae: step 1,200/3,000 (40 %), 10 steps/s, ETA 3m00s"]


def test_long_etas_show_hours():
    log, clock, stream = log_progress(100_000)
    clock.now += 900.0
    log.advance(10_000)
    assert lines(stream) == ["train jointvae: step 10,000/100,000 (10 %), 11.1 steps/s, ETA 2h15m"]


def test_not_a_terminal_prints_lines_on_stderr_and_nothing_on_stdout(capsys, log_stderr):
    with progress_bar("encode vqvae", 10, extra="{task.fields[info]}") as advance:
        for _ in range(10):
            advance(1, info="1 images/s")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert [line.split(" (")[0] for line in captured.err.splitlines()] == \
        [f"encode vqvae: row {done}/10" for done in range(1, 11)]


def test_disabled_prints_nothing(capsys, log_stderr):
    with progress_bar("train jointvae", 10, unit="step", enabled=False) as advance:
        for _ in range(10):
            advance(1, info="x")
    assert capsys.readouterr() == ("", "")


def test_a_terminal_gets_the_rich_bar(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    screen = io.StringIO()
    monkeypatch.setattr(progress, "console",
                        lambda: Console(file=screen, force_terminal=True, force_interactive=True, width=100))
    with progress_bar("train jointvae", 10, unit="step", completed=4) as advance:
        advance(6)
    drawn = screen.getvalue()
    assert "train jointvae" in drawn and "10/10" in drawn and "━" in drawn
    assert ": step" not in drawn


def test_progress_touches_no_random_state(capsys, log_stderr):
    before = random.getstate(), np.random.get_state(), torch.get_rng_state()
    with progress_bar("train jointvae", 100, unit="step") as advance:
        for _ in range(100):
            advance()
    after = random.getstate(), np.random.get_state(), torch.get_rng_state()
    assert before[0] == after[0]
    assert all(np.array_equal(a, b) for a, b in zip(before[1], after[1], strict=True))
    assert torch.equal(before[2], after[2])


def test_a_stage_writes_the_same_bytes_with_lines_as_without(tmp_path, image_folder, capsys, log_stderr):
    params = Params(seed=4, data=DataConfig(dataset="folder", root=str(image_folder), image_size=8))
    prepare.run(params, prepare.PreparePaths(tmp_path / "quiet.h5"), show_progress=False)
    prepare.run(params, prepare.PreparePaths(tmp_path / "logged.h5"))
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("prepare folder: row 5/5 (100 %)")
    assert (tmp_path / "quiet.h5").read_bytes() == (tmp_path / "logged.h5").read_bytes()
