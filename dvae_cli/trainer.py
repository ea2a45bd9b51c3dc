"""The training loop every model family shares: in-memory uint8 data batched by index, Adam, checkpoints
that resume bit for bit, DVCLive curves, and DistributedDataParallel under torchrun.

Data order and sampling noise are functions of (seed, step) drawn for the global batch, so a resumed run
and a data-parallel run see exactly what an uninterrupted single-process run sees.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from dvae_cli import __version__
from dvae_cli.checkpoint import load_checkpoint, save_checkpoint
from dvae_cli.config import Params
from dvae_cli.dataset import TRAIN, VAL, DatasetFile, pixel_histogram, pixel_variance
from dvae_cli.distributed import all_reduce_sum, join_cluster, leave_cluster
from dvae_cli.errors import TrainingDiverged, UserError
from dvae_cli.files import sha256_file
from dvae_cli.models import DataShape, DiscreteVAE, build_model
from dvae_cli.modelstore import CHECKPOINT, save_model
from dvae_cli.progress import progress_bar
from dvae_cli.runtime import Runtime, keep_freed_host_memory, resolve_runtime

VAL_IMAGES = 2048
"""Validation loss is measured on (at most) the first this many val images, at every epoch's end."""


@dataclass(frozen=True)
class TrainPaths:
    dataset: Path
    model_dir: Path
    live_dir: Path

    @property
    def checkpoint(self) -> Path:
        return self.model_dir / CHECKPOINT


@dataclass
class TrainResult:
    model: DiscreteVAE
    steps: int
    resumed_from: int
    metrics: dict[str, float]
    seconds: float


def epoch_permutation(seed: int, epoch: int, num_rows: int) -> Tensor:
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    return torch.randperm(num_rows, generator=generator)


def run_fingerprint(params: Params, family: str, dataset_sha256: str) -> dict[str, Any]:
    """What must be unchanged for a checkpoint to resume: everything but the number of epochs and the runtime."""
    model = dataclasses.asdict(params.model_config(family))
    model.pop("epochs")
    return {"family": family, "seed": params.seed, "dataset_sha256": dataset_sha256, family: model}


def _first_difference(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}: {a} → {b}"
    return ""


def _batch(data: Tensor, rows: Tensor, runtime: Runtime) -> Tensor:
    return runtime.images(data[rows.to(data.device)])


@torch.no_grad()
def validation_loss(model: DiscreteVAE, data: Tensor, step: int, batch_size: int, runtime: Runtime) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        x = _batch(data, torch.arange(start, min(start + batch_size, len(data))), runtime)
        with runtime.autocast():
            total += model.loss(x, step).loss.float().item() * len(x)
        count += len(x)
    model.train()
    return total / max(count, 1)


class Logger:
    """DVCLive on rank 0 (dvc.yaml is declared by hand, so DVCLive must not write one)."""

    def __init__(self, live_dir: Path, resume: bool, enabled: bool) -> None:
        self.live = None
        if enabled:
            from dvclive import Live
            self.live = Live(str(live_dir), resume=resume, dvcyaml=None, save_dvc_exp=False, report=None)

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.live is None:
            return
        self.live.step = step
        for name, value in values.items():
            self.live.log_metric(name, value)
        self.live.sync()

    def close(self) -> None:
        if self.live is not None:
            self.live.end()


def train(params: Params, family: str, paths: TrainPaths, restart: bool = False,
          restart_on_mismatch: bool = False, show_progress: bool = True) -> TrainResult:
    started = time.perf_counter()
    config = params.model_config(family)
    runtime = resolve_runtime(params.train)
    if runtime.device.type == "cpu":
        keep_freed_host_memory()
    cluster = join_cluster(runtime.device)
    if config.batch_size % cluster.world_size:
        raise UserError(f"{family}.batch_size {config.batch_size} is not divisible by the world size "
                        f"{cluster.world_size}; choose a batch size that is a multiple of it")
    rank_batch = config.batch_size // cluster.world_size

    with DatasetFile(paths.dataset) as dataset:
        train_rows, val_rows = dataset.indices(TRAIN), dataset.indices(VAL)[:VAL_IMAGES]
        if len(train_rows) < config.batch_size:
            raise UserError(f"the train split of {paths.dataset} has {len(train_rows)} images, fewer than "
                            f"{family}.batch_size {config.batch_size}; lower the batch size or prepare more data")
        train_images = dataset.read_images(train_rows)
        val_images = dataset.read_images(val_rows)
        data_shape = DataShape(dataset.info.channels, dataset.info.image_size, pixel_variance(pixel_histogram(train_images)))
    dataset_sha256 = sha256_file(paths.dataset)
    fingerprint = run_fingerprint(params, family, dataset_sha256)

    torch.manual_seed(params.seed)
    model = runtime.prepare(build_model(family, config, data_shape))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.needs_grad_scaler)
    step, epoch_counts, logged = 0, {}, {}

    if paths.checkpoint.exists() and not restart:
        state = load_checkpoint(paths.checkpoint, family)
        difference = _first_difference(state["fingerprint"], fingerprint)
        if difference and not restart_on_mismatch:
            raise UserError(f"checkpoint {paths.checkpoint} was made with other settings ({difference}); "
                            "pass --restart to start over")
        if not difference:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            step, epoch_counts, logged = state["step"], state["epoch_counts"], state["logged"]
            torch.set_rng_state(state["rng"]["torch"])
            if runtime.device.type == "cuda" and state["rng"]["cuda"]:
                torch.cuda.set_rng_state(state["rng"]["cuda"], runtime.device)
    resumed_from = step

    data = runtime.place(torch.from_numpy(train_images))
    val_data = runtime.place(torch.from_numpy(val_images))
    steps_per_epoch = len(train_rows) // config.batch_size
    total_steps = config.epochs * steps_per_epoch
    if params.train.max_steps is not None:
        total_steps = min(total_steps, params.train.max_steps)
    model.train()
    model.set_rank_rows(cluster.rank * rank_batch, config.batch_size)
    network = DistributedDataParallel(model, broadcast_buffers=False) if cluster.distributed else model
    if params.train.compile:
        network = torch.compile(network)

    def checkpoint_state() -> dict[str, Any]:
        return {"family": family, "fingerprint": fingerprint, "step": step,
                "model": {k: v.contiguous() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "epoch_counts": epoch_counts, "logged": logged,
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(runtime.device) if runtime.device.type == "cuda" else None}}

    logger = Logger(paths.live_dir, resume=resumed_from > 0, enabled=cluster.is_main)
    running: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), device=runtime.device))
    last_logged, interval_start = step, time.perf_counter()
    permutation, permutation_epoch = None, -1
    try:
        with progress_bar(f"train {family}", total_steps, extra="{task.fields[info]}",
                          enabled=show_progress and cluster.is_main) as advance:
            advance(step)
            while step < total_steps:
                epoch, position = divmod(step, steps_per_epoch)
                if epoch != permutation_epoch:
                    permutation, permutation_epoch = epoch_permutation(params.seed, epoch, len(train_rows)), epoch
                global_rows = permutation[position * config.batch_size:(position + 1) * config.batch_size]
                x = _batch(data, global_rows[cluster.rank * rank_batch:(cluster.rank + 1) * rank_batch], runtime)

                with runtime.autocast():
                    output = network(x, step)
                loss = output.loss.float()
                if all_reduce_sum((~torch.isfinite(loss.detach())).float()).item() > 0:
                    if cluster.is_main:
                        save_checkpoint(paths.checkpoint, checkpoint_state())
                    raise TrainingDiverged(
                        f"training diverged: the {family} loss became {loss.item()} at step {step}; the last good "
                        f"state is in {paths.checkpoint}; lower {family}.lr or set train.precision: fp32, then rerun "
                        "to resume (or --restart)")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                step += 1

                for name, value in output.terms.items():
                    running[name] += value.detach().float()
                running["loss"] += loss.detach()
                batch_counts = {**output.counts,
                                "squared_error": ((output.reconstruction.detach().float() - x.float()) ** 2).sum(),
                                "pixels": torch.tensor(float(x.numel()), device=runtime.device)}
                for name, value in batch_counts.items():
                    epoch_counts[name] = epoch_counts.get(name, 0) + all_reduce_sum(value.detach().clone()).cpu()

                if step % params.train.log_every == 0 or step == total_steps:
                    count = step - last_logged
                    seconds = time.perf_counter() - interval_start
                    logged = {f"train/{name}": (value / count).item() for name, value in running.items()}
                    logged["train/lr"] = optimizer.param_groups[0]["lr"]
                    logged["train/images_per_second"] = count * config.batch_size / max(seconds, 1e-9)
                    logger.log(step, logged)
                    running.clear()
                    last_logged, interval_start = step, time.perf_counter()
                    advance(0, info=f"epoch {epoch + 1}/{config.epochs} loss {logged['train/loss']:.4g} "
                                    f"{logged['train/images_per_second']:.0f} img/s")
                if step % steps_per_epoch == 0 or step == total_steps:
                    epoch_logs = {f"epoch/{k}": v for k, v in model.epoch_logs(epoch_counts).items()}
                    epoch_mse = (epoch_counts["squared_error"] / epoch_counts["pixels"]).item()
                    epoch_logs["epoch/mse"] = epoch_mse
                    epoch_logs["epoch/normalized_mse"] = epoch_mse / data_shape.pixel_variance
                    epoch_logs["val/loss"] = validation_loss(model, val_data, step, rank_batch, runtime) \
                        if len(val_data) else float("nan")
                    epoch_logs["epoch/epoch"] = step / steps_per_epoch
                    logger.log(step, epoch_logs)
                    logged.update(epoch_logs)
                    epoch_counts = {}
                if cluster.is_main and (step % params.train.checkpoint_every == 0 or step == total_steps):
                    save_checkpoint(paths.checkpoint, checkpoint_state())
                advance(1)
    finally:
        logger.close()
        leave_cluster()

    metrics = {name: value for name, value in logged.items() if np.isfinite(value)} if cluster.is_main else {}
    if cluster.is_main:
        save_model(paths.model_dir, model, config, data_shape, {
            "dataset_sha256": dataset_sha256, "seed": params.seed, "steps": step, "dvae_version": __version__,
            "final_metrics": metrics})
    return TrainResult(model=model, steps=step, resumed_from=resumed_from, metrics=metrics, seconds=time.perf_counter() - started)
