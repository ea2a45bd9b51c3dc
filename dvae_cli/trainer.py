"""The training loop every trained model shares: `dvae train`'s image families and `dvae prior`'s code prior.

Rows held in memory and batched by index, Adam, checkpoints that resume bit for bit (`formats.checkpoint.TrainState`),
DVCLive curves, and DistributedDataParallel under torchrun. Data order and sampling noise are functions of
(seed, step) drawn for the global batch, so a resumed run and a data-parallel run see exactly what an
uninterrupted single-process run sees. A stage opens a `training_run` (the runtime, the cluster, the model folder's
lock), reads its data, describes what it trains as a `Job` and hands it to `fit`, the loop.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from dvae_cli.core.distributed import (
    Cluster,
    all_reduce_sum,
    join_cluster,
    leave_cluster,
)
from dvae_cli.core.errors import TrainingDiverged, UserError
from dvae_cli.core.files import (
    check_output,
    exclusive_lock,
    outermost_missing,
    remove_tree,
    write_bytes_atomic,
)
from dvae_cli.core.progress import progress_bar
from dvae_cli.core.runtime import Runtime, keep_freed_host_memory, resolve_runtime
from dvae_cli.formats.artifact import check_replaceable
from dvae_cli.formats.checkpoint import CHECKPOINT, TrainState, resume, save_checkpoint
from dvae_cli.models.base import LossOutput, Trainable
from dvae_cli.params import Params

CURVES = ("train", "epoch", "eval")
"""The kinds of logged rows, each a file `dvclive/M/plots/KIND.json`: the interval means every train.log_every
steps, the figures at each epoch's end (validation loss among them), the periodic evaluation."""
TIMINGS = ("train/images_per_second",)
"""Wall-clock figures: logged to DVCLive, never written to the model folder (equal weights give equal files)."""
LOCK = "train.lock"
"""In the model folder while a training writes to it (the holder's pid inside)."""


@dataclass(frozen=True)
class RunFolders:
    """Where a training writes (the model folder, its checkpoint, the DVCLive folder) and what it reads."""

    model_dir: Path
    live_dir: Path
    inputs: tuple[Path, ...]
    maker: str
    """The command that writes the model folder (`formats.artifact`: it replaces only its own)."""

    @property
    def checkpoint(self) -> Path:
        return self.model_dir / CHECKPOINT

    def check(self, force: bool) -> None:
        check_output(self.model_dir, list(self.inputs), "--out", folder=True)
        check_replaceable(self.model_dir, self.maker, "--out", force)
        check_output(self.live_dir, list(self.inputs), "--live", folder=True)


@contextmanager
def one_writer(folders: RunFolders, enabled: bool) -> Iterator[None]:
    """Hold the model folder's lock (when `enabled`: the main process); a failure before the first checkpoint
    removes the model and DVCLive folders this run created, so nothing that looks like a run is left."""
    if not enabled:
        yield
        return
    made = [outermost_missing(folder) for folder in (folders.model_dir, folders.live_dir)]
    try:
        with exclusive_lock(folders.model_dir / LOCK, f"model folder {folders.model_dir}"):
            yield
    except BaseException:
        if not folders.checkpoint.exists():
            for folder in made:
                if folder is not None:
                    remove_tree(folder)
        raise


class Job(Protocol):
    """What a stage trains: its rows, its model and how its result is saved."""

    name: str
    """What is trained (a family, or `vqvae-prior`): the checkpoint's owner and the name in messages."""
    section: str
    """The params section of `config`, as messages name its keys."""
    config: Any
    """That section: lr, batch_size and epochs at least."""
    fingerprint: dict[str, Any]
    """What must be unchanged for a checkpoint to resume."""
    train: Tensor
    """The train rows (uint8 images, token rows, ...), where the runtime keeps data."""
    val: Tensor
    """The validation rows whose loss is logged at every epoch's end."""
    pixel_variance: float | None
    """For the normalized MSE of models that reconstruct images (None: the rows are no images)."""

    def as_input(self, rows: Tensor) -> Tensor:
        """A batch of rows as the model's input (on the device)."""

    def build(self) -> Trainable:
        """The untrained model; called right after seeding torch."""

    def score(self, model: Trainable) -> dict[str, float] | None:
        """The periodic evaluation (every train.eval_every steps, on the main process; None: the job has none). It
        must draw nothing from torch's generator, so that it changes no training byte."""

    def save(self, model: Trainable, steps: int, metrics: dict[str, float]) -> None:
        """Write the result (`metrics`: the final figures without timings)."""


@dataclass
class TrainResult:
    model: Trainable
    steps: int
    resumed_from: int
    metrics: dict[str, float]
    seconds: float


@functools.lru_cache(maxsize=1)
def epoch_permutation(seed: int, epoch: int, num_rows: int) -> Tensor:
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    return torch.randperm(num_rows, generator=generator)


@torch.no_grad()
def validation_loss(model: Trainable, job: Job, step: int, batch_size: int, runtime: Runtime) -> float:
    if not len(job.val):
        return float("nan")
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(job.val), batch_size):
        x = job.as_input(job.val[start:min(start + batch_size, len(job.val))])
        with runtime.autocast():
            total += model.loss(x, step).loss.float().item() * len(x)
        count += len(x)
    model.train()
    return total / max(count, 1)


def add_batch_counts(counts: dict[str, Tensor], output: LossOutput, x: Tensor) -> None:
    """Add one batch's counts, summed over every rank, to the epoch's `counts` (on the CPU)."""
    batch = dict(output.counts)
    if output.reconstruction is not None:
        batch["squared_error"] = ((output.reconstruction.detach().float() - x.float()) ** 2).sum()
        batch["pixels"] = torch.tensor(float(x.numel()), device=x.device)
    for name, value in batch.items():
        counts[name] = counts.get(name, 0) + all_reduce_sum(value.detach().clone()).cpu()


def epoch_figures(model: Trainable, counts: dict[str, Tensor], job: Job, step: int, steps_per_epoch: int,
                  rank_batch: int, runtime: Runtime) -> dict[str, float]:
    """What is logged at an epoch's end: the model's epoch logs, train MSE (plain and normalized) of models that
    reconstruct, validation loss."""
    figures = {f"epoch/{name}": value for name, value in model.epoch_logs(counts).items()}
    if "pixels" in counts:
        mse = (counts["squared_error"] / counts["pixels"]).item()
        figures["epoch/mse"] = mse
        figures["epoch/normalized_mse"] = mse / (job.pixel_variance or 1.0)
    figures["val/loss"] = validation_loss(model, job, step, rank_batch, runtime)
    figures["epoch/epoch"] = step / steps_per_epoch
    return figures


class Meter:
    """Running sums of the loss terms between logged points, and the rows per second over the interval."""

    def __init__(self, device: torch.device, step: int) -> None:
        self.sums: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), device=device))
        self.last_step, self.started = step, time.perf_counter()

    def add(self, output: LossOutput, loss: Tensor) -> None:
        for name, value in output.terms.items():
            self.sums[name] += value.detach().float()
        self.sums["loss"] += loss.detach()

    def flush(self, step: int, batch_size: int, lr: float) -> dict[str, float]:
        """The interval's mean of each term (as `train/NAME`), the learning rate and images/s; starts a new interval."""
        count, seconds = step - self.last_step, time.perf_counter() - self.started
        figures = {f"train/{name}": (value / count).item() for name, value in self.sums.items()}
        figures["train/lr"] = lr
        figures["train/images_per_second"] = count * batch_size / max(seconds, 1e-9)
        self.sums.clear()
        self.last_step, self.started = step, time.perf_counter()
        return figures


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


class Logger:
    """Appends each logged row to the run's history (`TrainState.history`, kept in the checkpoint) and, on rank 0,
    gives it to DVCLive, whose summary `metrics.json` follows every row; the curves, `plots/KIND.json` (a JSON list of
    rows), are written from the history at each checkpoint and at the end. The folder is started over from the
    history, so a resumed run has each step once and the folder can be a fresh DVC output (DVC deletes a stage's
    outputs before running it). dvc.yaml is declared by hand, so DVCLive must not write one."""

    def __init__(self, live_dir: Path, history: list[list[Any]], enabled: bool) -> None:
        self.live, self.plots, self.history = None, live_dir / "plots", history
        if enabled:
            from dvclive import Live
            self.live = Live(str(live_dir), resume=False, dvcyaml=None, save_dvc_exp=False, report=None)
            for step, _, values in history:
                self.summarize(step, values)
            if history:
                self.live.make_summary()
            self.write_curves()

    def summarize(self, step: int, values: dict[str, float]) -> None:
        """Into DVCLive's summary, as `make_summary` would (so a replayed history gives the same file's bytes)."""
        self.live.step = step
        for name, value in values.items():
            self.live.log_metric(name, value, plot=False)
        self.live.summary["step"] = step

    def log(self, step: int, kind: str, values: dict[str, float]) -> None:
        self.history.append([step, kind, values])
        if self.live is not None:
            self.summarize(step, values)
            self.live.make_summary()

    def write_curves(self) -> None:
        if self.live is None:
            return
        for kind in CURVES:
            path = self.plots / f"{kind}.json"
            rows = [{"step": step, **{name: finite_or_none(value) for name, value in values.items()}}
                    for step, row_kind, values in self.history if row_kind == kind]
            if rows:  # one row a line: readable, and a longer run's file only grows in a diff
                write_bytes_atomic(path, ("[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]\n").encode())
            else:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        if self.live is not None:
            self.write_curves()
            self.live.end()


def final_metrics(history: list[list[Any]]) -> dict[str, float]:
    """The last train and epoch figures (the final epoch ends at the last step), the finite ones."""
    last: dict[str, float] = {}
    for _, kind, values in history:
        if kind != "eval":
            last.update(values)
    return {name: value for name, value in last.items() if math.isfinite(value)}


@contextmanager
def training_run(params: Params, folders: RunFolders, force: bool = False) -> Iterator[tuple[Runtime, Cluster]]:
    """Check the output folders (`force`: replace another dvae artifact there), pick the runtime, join the cluster
    (under torchrun) and hold the model folder while the stage reads its data and `fit` trains."""
    folders.check(force)
    runtime = resolve_runtime(params.runtime)
    if runtime.device.type == "cpu":
        keep_freed_host_memory()
    cluster = join_cluster(runtime.device)
    with one_writer(folders, enabled=cluster.is_main):
        yield runtime, cluster


def fit(params: Params, folders: RunFolders, job: Job, runtime: Runtime, cluster: Cluster, restart: bool = False,
        restart_on_mismatch: bool = False, show_progress: bool = True) -> TrainResult:
    """Train `job` inside its `training_run`, from its checkpoint when one fits, and save it."""
    started = time.perf_counter()
    config = job.config
    if config.batch_size % cluster.world_size:
        raise UserError(f"{job.section}.batch_size {config.batch_size} is not divisible by the world size "
                        f"{cluster.world_size}; choose a batch size that is a multiple of it")
    batch_size, rank_batch = config.batch_size, config.batch_size // cluster.world_size
    if len(job.train) < batch_size:
        raise UserError(f"the train split of {folders.inputs[0]} has {len(job.train)} rows, fewer than "
                        f"{job.section}.batch_size {batch_size}; lower the batch size or prepare more data")
    eval_every = params.train.eval_every if cluster.is_main else None

    torch.manual_seed(params.seed)
    model = runtime.prepare(job.build())
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.needs_grad_scaler)
    state = TrainState(job.name, job.fingerprint, model, optimizer, scaler, runtime.device)
    steps_per_epoch = len(job.train) // batch_size
    total_steps = min(config.epochs * steps_per_epoch, params.train.max_steps or config.epochs * steps_per_epoch)
    if folders.checkpoint.exists() and not restart:
        resume(state, folders.checkpoint, total_steps, restart_on_mismatch)
    resumed_from = state.step
    model.train()
    model.set_rank_rows(cluster.rank * rank_batch, batch_size)
    network = DistributedDataParallel(model, broadcast_buffers=False) if cluster.distributed else model
    if params.runtime.compile:
        network = torch.compile(network)
    logger = Logger(folders.live_dir, state.history, enabled=cluster.is_main)
    meter = Meter(runtime.device, state.step)

    try:
        with progress_bar(f"train {job.name}", total_steps, extra="{task.fields[info]}", unit="step",
                          completed=state.step, enabled=show_progress and cluster.is_main) as advance:
            while state.step < total_steps:
                epoch, position = divmod(state.step, steps_per_epoch)
                permutation = epoch_permutation(params.seed, epoch, len(job.train))
                rows = permutation[position * batch_size:(position + 1) * batch_size]
                rank_rows = rows[cluster.rank * rank_batch:(cluster.rank + 1) * rank_batch]
                x = job.as_input(job.train[rank_rows.to(job.train.device)])
                with runtime.autocast():
                    output = network(x, state.step)
                loss = output.loss.float()
                if all_reduce_sum((~torch.isfinite(loss.detach())).float()).item() > 0:
                    if cluster.is_main:
                        save_checkpoint(folders.checkpoint, state)
                    raise TrainingDiverged(
                        f"training diverged: the {job.name} loss became {loss.item()} at step {state.step}; the "
                        f"last good state is in {folders.checkpoint}; lower {job.section}.lr or set "
                        "runtime.precision: fp32, then rerun to resume (or --restart)")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                state.step += 1
                meter.add(output, loss)
                add_batch_counts(state.epoch_counts, output, x)

                if state.step % params.train.log_every == 0 or state.step == total_steps:
                    figures = meter.flush(state.step, batch_size, optimizer.param_groups[0]["lr"])
                    logger.log(state.step, "train", figures)
                    advance(0, info=f"epoch {epoch + 1}/{config.epochs} loss {figures['train/loss']:.4g} "
                                    f"{figures['train/images_per_second']:.0f} img/s")
                if state.step % steps_per_epoch == 0 or state.step == total_steps:
                    logger.log(state.step, "epoch", epoch_figures(model, state.epoch_counts, job, state.step,
                                                                  steps_per_epoch, rank_batch, runtime))
                    state.epoch_counts = {}
                if eval_every and (state.step % eval_every == 0 or state.step == total_steps):
                    scores = job.score(model)
                    if scores is not None:
                        logger.log(state.step, "eval", scores)
                at_checkpoint = state.step % params.train.checkpoint_every == 0 or state.step == total_steps
                if cluster.is_main and at_checkpoint:
                    save_checkpoint(folders.checkpoint, state)
                    logger.write_curves()
                advance(1)
    finally:
        failing = sys.exc_info()[1] is not None
        try:
            logger.close()
        except Exception:
            # The first failure is the one to report: on a full disk DVCLive's summary fails after the checkpoint did.
            if not failing:
                raise
        finally:
            leave_cluster()

    metrics = final_metrics(state.history) if cluster.is_main else {}
    if cluster.is_main:
        job.save(model, state.step, {name: value for name, value in metrics.items() if name not in TIMINGS})
    return TrainResult(model=model, steps=state.step, resumed_from=resumed_from, metrics=metrics,
                       seconds=time.perf_counter() - started)
