"""Data-parallel training on CPU with gloo and 2 processes: equal to one process, one codebook, no hangs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.multiprocessing as mp

from dvae_cli.params import load_params
from dvae_cli.stages import train
from dvae_cli.stages.train import TrainPaths
from tests.test_train import write_params

STEPS = 20


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ddp_changes(family: str, quantizer: str | None) -> dict:
    changes = {"train.max_steps": STEPS, "train.checkpoint_every": 7, f"{family}.lr": 2e-3}
    if family == "vqvae":
        changes["vqvae.quantizer"] = quantizer
        changes["vqvae.dead_code_threshold"] = 20.0  # high enough that restarts happen within 20 steps
    return changes


def _rank_worker(rank: int, world_size: int, port: int, folder: str, dataset: str, family: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    root = Path(folder)
    params = load_params(root / "params.yaml")
    result = train.run(params, family, TrainPaths(Path(dataset), root / "models" / family, root / "dvclive" / family),
                       show_progress=False)
    torch.save(result.model.state_dict(), root / f"rank{rank}.pt")


@pytest.mark.parametrize(("family", "quantizer"), [("jointvae", None), ("vqvae", "vq"), ("vqvae", "fsq"),
                                                   ("vqvae", "rvq")])
def test_two_processes_of_half_batches_equal_one_process(tmp_path: Path, tiny_dataset: Path, family: str,
                                                         quantizer: str | None) -> None:
    single_folder, ddp_folder = tmp_path / "single", tmp_path / "ddp"
    params = load_params(write_params(single_folder, **ddp_changes(family, quantizer)))
    write_params(ddp_folder, **ddp_changes(family, quantizer))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    single = train.run(params, family, TrainPaths(tiny_dataset, single_folder / "models" / family,
                                              single_folder / "dvclive" / family), show_progress=False).model
    torch.set_num_threads(threads)
    mp.spawn(_rank_worker, args=(2, free_port(), str(ddp_folder), str(tiny_dataset), family), nprocs=2, join=True)
    ranks = [torch.load(ddp_folder / f"rank{rank}.pt") for rank in range(2)]

    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), f"ranks disagree on {name}"
    for name, value in single.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(ranks[0][name], value, rtol=1e-3, atol=1e-4), name
        else:
            assert torch.equal(ranks[0][name], value), name
    if quantizer in ("vq", "rvq"):
        assert sum(value.item() for name, value in ranks[0].items() if name.endswith("restart_count")) > 0
    assert (ddp_folder / "models" / family / "model.safetensors").exists()


def dvae(*args: str, cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "dvae_cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_indivisible_batch_is_a_clear_error(tmp_path: Path, tiny_dataset: Path) -> None:
    params = write_params(tmp_path, **{"vqvae.batch_size": 33})
    process = dvae("train", "--model", "vqvae", "--nproc", "2", "--params", str(params), "--dataset", str(tiny_dataset),
                   cwd=tmp_path)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2
    assert "vqvae.batch_size 33 is not divisible by the world size 2" in stderr
    assert not (tmp_path / "models").exists()


def test_a_killed_rank_ends_the_run_within_the_timeout(tmp_path: Path, tiny_dataset: Path) -> None:
    params = write_params(tmp_path, **{"vqvae.epochs": 200})
    process = dvae("train", "--model", "vqvae", "--nproc", "2", "--params", str(params), "--dataset", str(tiny_dataset),
                   cwd=tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (tmp_path / "dvclive" / "vqvae" / "metrics.json").exists():
        time.sleep(0.2)
    workers = [p for p in psutil.Process(process.pid).children(recursive=True) if "dvae_cli" in " ".join(p.cmdline())]
    assert len(workers) == 2, "torchrun should run two dvae_cli workers"
    victim = max(workers, key=lambda p: p.pid)
    started = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    process.communicate(timeout=90)
    assert process.returncode != 0
    assert time.monotonic() - started < 90
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)
