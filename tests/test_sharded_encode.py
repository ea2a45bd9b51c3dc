"""`dvae encode` under torchrun (CPU, gloo, 2 processes): one codes file, byte for byte a single process's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dvae_cli.formats.codes import ROWS_PER_CHUNK
from dvae_cli.params import load_params
from dvae_cli.stages import encode
from dvae_cli.stages.encode import EncodePaths, batch_aligned_slices
from tests.test_encode import FAMILIES, write_tiled_dataset

NUM_ROWS = 2_500
"""Three chunks of codes; in batches of 128 rank 0 encodes rows 0:1280, rank 1 rows 1280:2500, so the slices are
uneven and rank 0's ends inside a chunk that rank 1's rows complete."""


@pytest.mark.parametrize(("num_rows", "batch_size", "world_size", "slices"), [
    (600, 128, 2, [range(0, 256), range(256, 600)]),
    (600, 128, 3, [range(0, 128), range(128, 384), range(384, 600)]),
    (512, 128, 2, [range(0, 256), range(256, 512)]),
    (100, 128, 2, [range(0, 0), range(0, 100)]),
    (600, 128, 1, [range(0, 600)]),
])
def test_slices_start_on_batch_boundaries_and_cover_every_row_once(num_rows, batch_size, world_size, slices):
    assert batch_aligned_slices(num_rows, batch_size, world_size) == slices


def torchrun_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "DVAE_DEBUG"}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def dataset(trained_project, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiled_dataset(trained_project.dataset, tmp_path_factory.mktemp("sharded") / "dataset.h5", NUM_ROWS)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_ranks_write_the_bytes_of_one_process(trained_project, dataset: Path, tmp_path: Path,
                                                  family: str) -> None:
    model_dir = trained_project.model_dir(family)
    params = load_params(trained_project.params_path)
    assert batch_aligned_slices(NUM_ROWS, params.encode.batch_size, 2)[0].stop % ROWS_PER_CHUNK != 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = encode.run(params, family, EncodePaths(dataset, model_dir,
                                                            tmp_path / "single.h5"), show_progress=False)
    finally:
        torch.set_num_threads(threads)

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "dvae_cli", "encode", "--model", family, "--params", str(trained_project.params_path),
               "--dataset", str(dataset), "--model-dir", str(model_dir), "--out", "sharded.h5"]
    run = subprocess.run(command, cwd=tmp_path, env=torchrun_env(), capture_output=True, text=True, timeout=120)

    assert run.returncode == 0, run.stderr
    assert run.stderr.count(f"sharded.h5: {NUM_ROWS:,} rows") == 1  # only rank 0 prints the summary
    assert (tmp_path / "sharded.h5").read_bytes() == single.path.read_bytes()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["sharded.h5", "single.h5"]  # no shards left
