"""`dvae train`: the training loop every model family shares.

In-memory uint8 data batched by index, Adam, checkpoints that resume bit for bit (`formats.checkpoint.TrainState`),
DVCLive curves, and DistributedDataParallel under torchrun. Data order and sampling noise are functions of
(seed, step) drawn for the global batch, so a resumed run and a data-parallel run see exactly what an
uninterrupted single-process run sees. Every `train.eval_every` steps a fixed sample of the validation split is
scored with `dvae evaluate`'s code (MIG, FactorVAE score, accuracies, reconstruction) and logged as `eval/...`
curves; the scoring draws nothing from torch's generator, so it changes no training byte.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from dvae_cli import __version__
from dvae_cli.core.distributed import all_reduce_sum, join_cluster, leave_cluster
from dvae_cli.core.errors import TrainingDiverged, UserError
from dvae_cli.core.files import (
    check_output,
    exclusive_lock,
    outermost_missing,
    remove_tree,
    sha256_file,
    write_bytes_atomic,
)
from dvae_cli.core.progress import progress_bar
from dvae_cli.core.runtime import Runtime, keep_freed_host_memory, resolve_runtime
from dvae_cli.families import DataShape, DiscreteVAE, LossOutput, get_family
from dvae_cli.families.base import float32_if_floating
from dvae_cli.families.evaluation import (
    ArraysInMemory,
    Evaluation,
    evaluation_sections,
    flatten,
    reconstruction_totals,
)
from dvae_cli.formats.checkpoint import TrainState, resume, save_checkpoint
from dvae_cli.formats.dataset import ROW_ARRAYS, TRAIN, VAL, DatasetFile, DatasetInfo, pixel_histogram, pixel_variance
from dvae_cli.formats.model_folder import CHECKPOINT, save_model
from dvae_cli.params import Params

VAL_IMAGES = 2048
"""Validation loss is measured on (at most) the first this many val images, at every epoch's end."""
EVAL_IMAGES = 1000
"""Validation images in the fixed seeded sample scored every train.eval_every steps."""
EVAL_BATCH = 500
CURVES = ("train", "epoch", "eval")
"""The kinds of logged rows, each a file `dvclive/M/plots/KIND.json`: the interval means every train.log_every
steps, the figures at each epoch's end (validation loss among them), the periodic evaluation."""
TIMINGS = ("train/images_per_second",)
"""Wall-clock figures: logged to DVCLive, never written to the model folder (equal weights give equal files)."""
LOCK = "train.lock"
"""In the model folder while a training writes to it (the holder's pid inside)."""


@dataclass(frozen=True)
class TrainPaths:
    dataset: Path
    model_dir: Path
    live_dir: Path

    @property
    def checkpoint(self) -> Path:
        return self.model_dir / CHECKPOINT

    def check(self) -> None:
        check_output(self.model_dir, [self.dataset], "--out", folder=True)
        check_output(self.live_dir, [self.dataset], "--live", folder=True)


@contextmanager
def one_writer(paths: TrainPaths, enabled: bool) -> Iterator[None]:
    """Hold the model folder's lock (when `enabled`: the main process); a failure before the first checkpoint
    removes the model and DVCLive folders this run created, so nothing that looks like a run is left."""
    if not enabled:
        yield
        return
    made = [outermost_missing(folder) for folder in (paths.model_dir, paths.live_dir)]
    try:
        with exclusive_lock(paths.model_dir / LOCK, f"model folder {paths.model_dir}"):
            yield
    except BaseException:
        if not paths.checkpoint.exists():
            for folder in made:
                if folder is not None:
                    remove_tree(folder)
        raise


@dataclass
class TrainResult:
    model: DiscreteVAE
    steps: int
    resumed_from: int
    metrics: dict[str, float]
    seconds: float


@dataclass(frozen=True)
class EvalSample:
    """A fixed seeded sample of the validation split: its images (uint8 [n, C, H, W]) and per-row arrays."""

    images: np.ndarray
    rows: dict[str, np.ndarray]
    """labels, factors, factor_classes of the sample, where the dataset has them."""
    info: DatasetInfo


@dataclass(frozen=True)
class TrainingData:
    """The train split and the first VAL_IMAGES val images as uint8 [n, C, H, W], placed where the runtime keeps
    data; what the model needs to know of them; the dataset file's sha256; the sample scored during training."""

    train: Tensor
    val: Tensor
    shape: DataShape
    sha256: str
    eval_sample: EvalSample | None


def read_eval_sample(dataset: DatasetFile, seed: int) -> EvalSample | None:
    val_rows = dataset.indices(VAL)
    if not len(val_rows):
        return None
    rows = np.sort(np.random.default_rng((seed, 1)).choice(val_rows, size=min(EVAL_IMAGES, len(val_rows)),
                                                            replace=False))
    arrays = {name: getattr(dataset, name)[rows] for name in ROW_ARRAYS if getattr(dataset, name) is not None}
    return EvalSample(images=dataset.read_images(rows), rows=arrays, info=dataset.info)


def load_training_data(path: Path, batch_size: int, family: str, runtime: Runtime, eval_seed: int | None
                       ) -> TrainingData:
    """The training data; with `eval_seed`, the validation sample scored during training too."""
    with DatasetFile(path) as dataset:
        train_rows, val_rows = dataset.indices(TRAIN), dataset.indices(VAL)[:VAL_IMAGES]
        if len(train_rows) < batch_size:
            raise UserError(f"the train split of {path} has {len(train_rows)} images, fewer than "
                            f"{family}.batch_size {batch_size}; lower the batch size or prepare more data")
        train_images = dataset.read_images(train_rows)
        val_images = dataset.read_images(val_rows)
        shape = DataShape(dataset.info.channels, dataset.info.image_size, pixel_variance(pixel_histogram(train_images)))
        eval_sample = None if eval_seed is None else read_eval_sample(dataset, eval_seed)
    return TrainingData(train=runtime.place(torch.from_numpy(train_images)),
                        val=runtime.place(torch.from_numpy(val_images)), shape=shape, sha256=sha256_file(path),
                        eval_sample=eval_sample)


@functools.lru_cache(maxsize=1)
def epoch_permutation(seed: int, epoch: int, num_rows: int) -> Tensor:
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    return torch.randperm(num_rows, generator=generator)


def run_fingerprint(params: Params, family: str, dataset_sha256: str) -> dict[str, Any]:
    """What must be unchanged for a checkpoint to resume: everything but the number of epochs and the runtime."""
    model = dataclasses.asdict(params.model_config(family))
    model.pop("epochs")
    return {"family": family, "seed": params.seed, "dataset_sha256": dataset_sha256, family: model}


@torch.no_grad()
def validation_loss(model: DiscreteVAE, data: Tensor, step: int, batch_size: int, runtime: Runtime) -> float:
    if not len(data):
        return float("nan")
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        x = runtime.images(data[start:min(start + batch_size, len(data))])
        with runtime.autocast():
            total += model.loss(x, step).loss.float().item() * len(x)
        count += len(x)
    model.train()
    return total / max(count, 1)


def add_batch_counts(counts: dict[str, Tensor], output: LossOutput, x: Tensor) -> None:
    """Add one batch's counts, summed over every rank, to the epoch's `counts` (on the CPU)."""
    batch = {**output.counts, "squared_error": ((output.reconstruction.detach().float() - x.float()) ** 2).sum(),
             "pixels": torch.tensor(float(x.numel()), device=x.device)}
    for name, value in batch.items():
        counts[name] = counts.get(name, 0) + all_reduce_sum(value.detach().clone()).cpu()


def epoch_figures(model: DiscreteVAE, counts: dict[str, Tensor], data: TrainingData, step: int, steps_per_epoch: int,
                  rank_batch: int, runtime: Runtime) -> dict[str, float]:
    """What is logged at an epoch's end: the model's epoch logs, train MSE (plain and normalized), validation loss."""
    figures = {f"epoch/{name}": value for name, value in model.epoch_logs(counts).items()}
    mse = (counts["squared_error"] / counts["pixels"]).item()
    figures["epoch/mse"] = mse
    figures["epoch/normalized_mse"] = mse / data.shape.pixel_variance
    figures["val/loss"] = validation_loss(model, data.val, step, rank_batch, runtime)
    figures["epoch/epoch"] = step / steps_per_epoch
    return figures


@torch.no_grad()
def score_sample(model: DiscreteVAE, family: str, config: Any, sample: EvalSample, params: Params,
                 runtime: Runtime) -> dict[str, float]:
    """`dvae evaluate`'s sections (without DCI) for the model's evaluation-mode latents of the sample, as `eval/...`
    figures. fp32, and no draw from torch's generator: training goes on exactly as without it."""
    model.eval()
    parts = [model.encode(runtime.images(torch.from_numpy(sample.images[start:start + EVAL_BATCH])))
             for start in range(0, len(sample.images), EVAL_BATCH)]
    latent = {name: float32_if_floating(torch.cat([part[name] for part in parts])).cpu().numpy() for name in parts[0]}
    totals = reconstruction_totals(model, latent, sample.images, EVAL_BATCH, runtime.device,
                                   advance=lambda n=1, **fields: None)
    rows = np.arange(len(sample.images))
    run = Evaluation(config=config, seed=params.seed, settings=dataclasses.replace(params.evaluate, dci=False),
                     source=ArraysInMemory(np.full(len(rows), VAL), {**latent, **sample.rows}), info=sample.info,
                     split=VAL, rows=rows, arrays=dict(latent), reconstruction=totals, notes=[], seconds={})
    sections = evaluation_sections(run, get_family(family).metrics)
    model.train()
    curves = {name: section for name, section in sections.items() if name not in ("evaluation", "sample")}
    return {f"eval/{name}": float(value) for name, value in flatten(curves, "/").items()}


class Meter:
    """Running sums of the loss terms between logged points, and the images per second over the interval."""

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


def train(params: Params, family: str, paths: TrainPaths, restart: bool = False,
          restart_on_mismatch: bool = False, show_progress: bool = True) -> TrainResult:
    started = time.perf_counter()
    paths.check()
    config = params.model_config(family)
    runtime = resolve_runtime(params.runtime)
    if runtime.device.type == "cpu":
        keep_freed_host_memory()
    cluster = join_cluster(runtime.device)
    with one_writer(paths, enabled=cluster.is_main):
        if config.batch_size % cluster.world_size:
            raise UserError(f"{family}.batch_size {config.batch_size} is not divisible by the world size "
                            f"{cluster.world_size}; choose a batch size that is a multiple of it")
        batch_size, rank_batch = config.batch_size, config.batch_size // cluster.world_size
        eval_every = params.train.eval_every if cluster.is_main else None
        data = load_training_data(paths.dataset, batch_size, family, runtime, params.seed if eval_every else None)

        torch.manual_seed(params.seed)
        model = runtime.prepare(get_family(family).model(config, data.shape))
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.needs_grad_scaler)
        state = TrainState(family, run_fingerprint(params, family, data.sha256), model, optimizer, scaler,
                           runtime.device)
        steps_per_epoch = len(data.train) // batch_size
        total_steps = min(config.epochs * steps_per_epoch, params.train.max_steps or config.epochs * steps_per_epoch)
        if paths.checkpoint.exists() and not restart:
            resume(state, paths.checkpoint, total_steps, restart_on_mismatch)
        resumed_from = state.step
        model.train()
        model.set_rank_rows(cluster.rank * rank_batch, batch_size)
        network = DistributedDataParallel(model, broadcast_buffers=False) if cluster.distributed else model
        if params.runtime.compile:
            network = torch.compile(network)
        logger = Logger(paths.live_dir, state.history, enabled=cluster.is_main)
        meter = Meter(runtime.device, state.step)

        try:
            with progress_bar(f"train {family}", total_steps, extra="{task.fields[info]}", unit="step",
                              completed=state.step, enabled=show_progress and cluster.is_main) as advance:
                while state.step < total_steps:
                    epoch, position = divmod(state.step, steps_per_epoch)
                    permutation = epoch_permutation(params.seed, epoch, len(data.train))
                    rows = permutation[position * batch_size:(position + 1) * batch_size]
                    rank_rows = rows[cluster.rank * rank_batch:(cluster.rank + 1) * rank_batch]
                    x = runtime.images(data.train[rank_rows.to(data.train.device)])
                    with runtime.autocast():
                        output = network(x, state.step)
                    loss = output.loss.float()
                    if all_reduce_sum((~torch.isfinite(loss.detach())).float()).item() > 0:
                        if cluster.is_main:
                            save_checkpoint(paths.checkpoint, state)
                        raise TrainingDiverged(
                            f"training diverged: the {family} loss became {loss.item()} at step {state.step}; the last "
                            f"good state is in {paths.checkpoint}; lower {family}.lr or set runtime.precision: fp32, "
                            "then rerun to resume (or --restart)")
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
                        logger.log(state.step, "epoch", epoch_figures(model, state.epoch_counts, data, state.step,
                                                                      steps_per_epoch, rank_batch, runtime))
                        state.epoch_counts = {}
                    if data.eval_sample and (state.step % eval_every == 0 or state.step == total_steps):
                        logger.log(state.step, "eval", score_sample(model, family, config, data.eval_sample, params,
                                                                    runtime))
                    at_checkpoint = state.step % params.train.checkpoint_every == 0 or state.step == total_steps
                    if cluster.is_main and at_checkpoint:
                        save_checkpoint(paths.checkpoint, state)
                        logger.write_curves()
                    advance(1)
        finally:
            logger.close()
            leave_cluster()

        metrics = final_metrics(state.history) if cluster.is_main else {}
        if cluster.is_main:
            save_model(paths.model_dir, family, model, config, data.shape, {
                "dataset_sha256": data.sha256, "seed": params.seed, "steps": state.step, "dvae_version": __version__,
                "final_metrics": {name: value for name, value in metrics.items() if name not in TIMINGS}})
        return TrainResult(model=model, steps=state.step, resumed_from=resumed_from, metrics=metrics,
                           seconds=time.perf_counter() - started)
