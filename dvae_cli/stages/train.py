"""`dvae train`: a model family on the dataset's images, through the shared loop (`dvae_cli.trainer`).

The uint8 train split is held where the runtime keeps data and turned into float input batch by batch. Every
`train.eval_every` steps a fixed sample of the validation split is scored with `dvae evaluate`'s code (MIG,
FactorVAE score, accuracies, reconstruction) and logged as `eval/...` curves; the scoring draws nothing from
torch's generator, so it changes no training byte.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dvae_cli import __version__
from dvae_cli.core import layout
from dvae_cli.core.errors import warn
from dvae_cli.core.files import sha256_file
from dvae_cli.core.runtime import Runtime
from dvae_cli.core.schema import flatten
from dvae_cli.core.splits import TRAIN, VAL
from dvae_cli.core.tensors import float32_if_floating
from dvae_cli.formats.artifact import TRAIN_MAKER
from dvae_cli.formats.dataset import ROW_ARRAYS, DatasetFile, DatasetInfo
from dvae_cli.formats.model_folder import save_model
from dvae_cli.models import get_family
from dvae_cli.models.base import DataShape, DiscreteVAE, Trainable
from dvae_cli.params import Params
from dvae_cli.scoring.evaluation import (
    ArraysInMemory,
    Evaluation,
    evaluation_sections,
    reconstruction_totals,
)
from dvae_cli.scoring.metrics import pixel_histogram, pixel_variance
from dvae_cli.trainer import RunFolders, TrainResult, fit, training_run

VAL_IMAGES = 2048
"""Validation loss is measured on (at most) the first this many val images, at every epoch's end."""
EVAL_IMAGES = 1000
"""Validation images in the fixed seeded sample scored every train.eval_every steps."""
EVAL_BATCH = 500


@dataclass(frozen=True)
class TrainPaths:
    dataset: Path
    model_dir: Path
    live_dir: Path

    @classmethod
    def of(cls, family: str, **given: Path | None) -> TrainPaths:
        return layout.fill(cls, given, dataset=layout.DATASET, model_dir=layout.model_dir(family),
                           live_dir=layout.live_dir(family))

    @property
    def checkpoint(self) -> Path:
        return self.folders.checkpoint

    @property
    def folders(self) -> RunFolders:
        return RunFolders(self.model_dir, self.live_dir, inputs=(self.dataset,), maker=TRAIN_MAKER)


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
    num_classes: int
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


def load_training_data(path: Path, runtime: Runtime, eval_seed: int | None) -> TrainingData:
    """The training data; with `eval_seed`, the validation sample scored during training too."""
    with DatasetFile(path) as dataset:
        train_rows, val_rows = dataset.indices(TRAIN), dataset.indices(VAL)[:VAL_IMAGES]
        train_images = dataset.read_images(train_rows)
        val_images = dataset.read_images(val_rows)
        shape = DataShape(dataset.info.channels, dataset.info.image_size, pixel_variance(pixel_histogram(train_images)))
        num_classes = dataset.info.num_classes
        eval_sample = None if eval_seed is None else read_eval_sample(dataset, eval_seed)
    return TrainingData(train=runtime.place(torch.from_numpy(train_images)),
                        val=runtime.place(torch.from_numpy(val_images)), shape=shape,
                        num_classes=num_classes, sha256=sha256_file(path),
                        eval_sample=eval_sample)


def run_fingerprint(params: Params, family: str, dataset_sha256: str) -> dict[str, Any]:
    """What must be unchanged for a checkpoint to resume: everything but the number of epochs and the runtime."""
    model = dataclasses.asdict(params.model_config(family))
    model.pop("epochs")
    return {"family": family, "seed": params.seed, "dataset_sha256": dataset_sha256, family: model}


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
                     source=ArraysInMemory(np.full(len(rows), VAL), {**latent, **sample.rows}),
                     factor_names=sample.info.factor_names, num_classes=sample.info.num_classes,
                     split=VAL, rows=rows, arrays=dict(latent), reconstruction=totals, notes=[], seconds={})
    sections = evaluation_sections(run, get_family(family).metrics)
    model.train()
    curves = {name: section for name, section in sections.items() if name not in ("evaluation", "sample")}
    return {f"eval/{name}": float(value) for name, value in flatten(curves, "/").items()}


class ImageTraining:
    """What `fit` trains for `dvae train`: a family's model on the dataset's images, saved as a model folder."""

    def __init__(self, params: Params, family: str, model_dir: Path, data: TrainingData, runtime: Runtime,
                 is_main: bool) -> None:
        self.params, self.family, self.model_dir, self.data = params, family, model_dir, data
        self.runtime, self.is_main = runtime, is_main
        self.name = self.section = family
        self.config = params.model_config(family)
        self.fingerprint = run_fingerprint(params, family, data.sha256)
        self.train, self.val, self.pixel_variance = data.train, data.val, data.shape.pixel_variance

    def as_input(self, rows: Tensor) -> Tensor:
        return self.runtime.images(rows)

    def build(self) -> Trainable:
        model = get_family(self.family).model(self.config, self.data.shape)
        for message in model.class_warnings(self.data.num_classes) if self.is_main else []:
            warn(message)
        return model

    def score(self, model: Trainable) -> dict[str, float] | None:
        sample = self.data.eval_sample
        if sample is None:
            return None
        return score_sample(model, self.family, self.config, sample, self.params, self.runtime)

    def save(self, model: Trainable, steps: int, metrics: dict[str, float]) -> None:
        save_model(self.model_dir, self.family, model, self.config, self.data.shape, {
            "dataset_sha256": self.data.sha256, "seed": self.params.seed, "steps": steps, "dvae_version": __version__,
            "final_metrics": metrics})


def run(params: Params, family: str, paths: TrainPaths, restart: bool = False, restart_on_mismatch: bool = False,
        show_progress: bool = True, force: bool = False) -> TrainResult:
    """Train `family` on the dataset, from its checkpoint when one fits, into the model folder (`force`: replacing
    another dvae artifact there)."""
    with training_run(params, paths.folders, force) as (runtime, cluster):
        eval_seed = params.seed if params.train.eval_every and cluster.is_main else None
        data = load_training_data(paths.dataset, runtime, eval_seed)
        job = ImageTraining(params, family, paths.model_dir, data, runtime, cluster.is_main)
        return fit(params, paths.folders, job, runtime, cluster, restart, restart_on_mismatch, show_progress)
