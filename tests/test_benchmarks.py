"""Every script under benchmarks/ runs in its --smoke mode (tiny sizes, seconds): it still works, prints the figures
README quotes, and writes nothing into the repository."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))
LABELS = {
    "cli_start": ["`python -c pass`", "within target"],
    "digits": ["held-out accuracy", "k-means on pixels", "mean ± sd"],
    "discrete_study": ["dvc exp run --queue -n disc-2", "jointvae.discrete=[2]"],
    "disentangle_cpu": ["MIG", "FactorVAE", "shape accuracy"],
    "distributed_speed": ["1 process", "2 processes", "scaling"],
    "encode_speed": ["pure forward", "dvae encode", "peak RSS"],
    "eval_cost": ["without evaluation", "overhead"],
    "evaluate_speed": ["evaluate total", "linear probe"],
    "fuzz_readers": ["cases/s", "internal errors"],
    "precision_speed": ["bf16 / fp32"],
    "prepare_dsprites": ["prepare-data", "peak memory"],
    "prior_speed": ["tokens/s", "key/value cache"],
    "tokenizers": ["bits", "patch k-means", "margin", "classic methods"],
    "train_speed": ["speedup", "share of the ceiling"],
}
"""What README quotes of each script's output. A new script fails until it has a --smoke mode and its labels here."""
CACHES = {"__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}
SCRATCH = ".dvc/tmp/"
"""DVC's own scratch folder: DVCLive touches it (btime) when a run starts inside a DVC project."""


def repository_files() -> dict[str, tuple[int, int]]:
    """Size and mtime of every file in the checkout, tracked, untracked or ignored, but the tools' caches."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split("\0")
    files = {}
    for name in filter(None, listed):
        path = ROOT / name
        if path.is_file() and not CACHES.intersection(Path(name).parts) and not name.startswith(SCRATCH):
            files[name] = (path.stat().st_size, path.stat().st_mtime_ns)
    return files


def smoke_run(script: Path) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """The script's smoke run from the repository's root, and the files of the checkout that changed meanwhile."""
    # This checkout's dvae_cli, whatever is installed; one thread, as smoke sizes gain nothing from more.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    before = repository_files()
    result = subprocess.run([sys.executable, str(script), "--smoke"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    after = repository_files()
    return result, sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))


@pytest.fixture(scope="module")
def smoke_runs(request: pytest.FixtureRequest) -> Iterator[dict[str, Future]]:
    """The smoke runs of the scripts selected, started at once and run two at a time: most spend their seconds
    starting Python and importing torch on one core."""
    selected = [item.callspec.params["script"] for item in request.session.items if item.module is request.module]
    pool = ThreadPoolExecutor(2)
    yield {script.stem: pool.submit(smoke_run, script) for script in selected}
    pool.shutdown(cancel_futures=True)  # those not started yet when the session stops early


@pytest.mark.parametrize("script", SCRIPTS, ids=[script.stem for script in SCRIPTS])
def test_a_benchmark_runs_in_its_smoke_mode(script: Path, smoke_runs: dict[str, Future]) -> None:
    assert script.stem in LABELS, f"benchmarks/{script.name}: add what README quotes of its output to LABELS"
    result, changed = smoke_runs[script.stem].result()
    assert result.returncode == 0, result.stderr
    for label in LABELS[script.stem]:
        assert label in result.stdout, f"{label!r} not in the output:\n{result.stdout}"
    assert not changed, f"files changed while benchmarks/{script.name} --smoke ran (beside one other): {changed}"
