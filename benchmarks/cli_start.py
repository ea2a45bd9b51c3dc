"""How fast `dvae` answers what needs no model: every --help, TAB completion, argument and params errors, each timed
against `python -c pass` in the same rounds (the interpreter's own start), with its peak memory and whether torch
was imported.

Usage: python benchmarks/cli_start.py [--rounds 7] [--results FILE] [--smoke]
Target: each case at most 0.5 s over Python's start (errors: at most 1 s and a few hundred MB), torch never imported.
Runs the `dvae` console script beside this interpreter (as a user types it), `python -m dvae_cli` when there is none.
--smoke: one round of four cases (the top-level help, a command's help, completion, a params error).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "dvae"
DVAE = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "dvae_cli"]
SUBCOMMANDS = ("prepare-data", "train", "encode", "decode", "evaluate", "render", "prior", "sample", "compare",
               "import-reference")
COMPLETION = {"_DVAE_COMPLETE": "complete_bash", "COMP_WORDS": "dvae train --model ", "COMP_CWORD": "3"}
HELP_TARGET_SECONDS = 0.5
ERROR_TARGET_SECONDS = 1.0


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]
    exit_code: int
    env: tuple[tuple[str, str], ...] = ()
    error: bool = False


CASES = (
    Case("dvae --help", ("--help",), 0),
    *(Case(f"dvae {name} --help", (name, "--help"), 0) for name in SUBCOMMANDS),
    Case("dvae train -h", ("train", "-h"), 0),
    Case("completion of train --model", (), 0, tuple(COMPLETION.items())),
    Case("error: unknown --model", ("train", "--model", "jointvea"), 2, error=True),
    Case("error: a param out of range", ("train", "--model", "jointvae", "-S", "jointvae.lr=-1"), 2, error=True),
    Case("error: an unknown param", ("encode", "--model", "vqvae", "-S", "vqvae.num_code=8"), 2, error=True),
    Case("error: an unknown preset", ("train", "--model", "jointvae", "--preset", "nosuch"), 2, error=True),
    Case("error: a flag of the wrong type", ("train", "--model", "jointvae", "--epochs", "many"), 2, error=True),
    Case("error: a prior of a family without code maps", ("prior", "--model", "jointvae"), 2, error=True),
)


def run(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, int, str]:
    """Wall seconds, peak RSS in MB, exit code and stderr of one run."""
    with tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        return seconds, usage.ru_maxrss / 1024, process.returncode, stderr.read().decode(errors="replace")


@dataclass(frozen=True)
class Figure:
    name: str
    seconds: float
    over_python: float
    peak_mb: float
    imports_torch: bool
    target_seconds: float

    @property
    def met(self) -> bool:
        return self.over_python <= self.target_seconds and not self.imports_torch


SMOKE_CASES = ("dvae --help", "dvae train --help", "completion of train --model", "error: a param out of range")


def measure(cases: tuple[Case, ...], rounds: int, cwd: Path) -> tuple[float, list[Figure]]:
    """Median seconds of each case and of `python -c pass`, measured in alternation, round by round."""
    base_env = {**os.environ, "COLUMNS": "120"}
    baseline: list[float] = []
    times: dict[str, list[float]] = {case.name: [] for case in cases}
    peaks: dict[str, float] = {}
    for _ in range(rounds):
        for case in cases:
            baseline.append(run([sys.executable, "-c", "pass"], base_env, cwd)[0])
            seconds, peak, code, stderr = run([*DVAE, *case.args], {**base_env, **dict(case.env)}, cwd)
            if code != case.exit_code:
                raise SystemExit(f"{case.name}: exit {code}, expected {case.exit_code}: {stderr.strip()[-300:]}")
            times[case.name].append(seconds)
            peaks[case.name] = max(peaks.get(case.name, 0.0), peak)
    python = statistics.median(baseline)
    figures = []
    for case in cases:
        # One more run with Python's import log on stderr: did anything import torch?
        env = {**base_env, **dict(case.env), "PYTHONPROFILEIMPORTTIME": "1"}
        stderr = run([*DVAE, *case.args], env, cwd)[3]
        imports_torch = any(line.rsplit("|", 1)[-1].strip() == "torch" for line in stderr.splitlines())
        median = statistics.median(times[case.name])
        figures.append(Figure(case.name, median, median - python, peaks[case.name], imports_torch,
                              ERROR_TARGET_SECONDS if case.error else HELP_TARGET_SECONDS))
    return python, figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--results", type=Path, help="write the figures here as JSON")
    parser.add_argument("--smoke", action="store_true", help="one round")
    args = parser.parse_args()
    rounds = 1 if args.smoke else args.rounds
    cases = tuple(case for case in CASES if case.name in SMOKE_CASES) if args.smoke else CASES
    # Run in the project, as a user does: presets/ and params.yaml are where the commands look.
    python, figures = measure(cases, rounds, ROOT)
    print(f"`python -c pass`: {python:.3f} s (median of {rounds * len(cases)}); each case the median of {rounds}")
    print(f"{'case':<48} {'seconds':>8} {'over python':>12} {'peak MB':>8} {'torch':>6} {'target':>7}")
    for figure in figures:
        print(f"{figure.name:<48} {figure.seconds:8.3f} {figure.over_python:12.3f} {figure.peak_mb:8.0f} "
              f"{'yes' if figure.imports_torch else 'no':>6} {'met' if figure.met else 'MISSED':>7}")
    worst = max(figures, key=lambda figure: figure.over_python)
    print(f"slowest: {worst.name}, {worst.over_python:.3f} s over Python's start; "
          f"{sum(f.met for f in figures)} of {len(figures)} cases within target")
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({
            "rounds": rounds, "python_seconds": round(python, 4), "command": DVAE[-1],
            "cases": [{**{k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(f).items()}, "met": f.met}
                      for f in figures]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
