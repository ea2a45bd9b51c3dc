"""What a family's metrics read (the `Evaluation` of one model on one split) and the sections families share.

`dvae evaluate` builds an `Evaluation` over a codes file; the trainer builds one over latents it holds in memory
(`train.eval_every`), so the curves and metrics/M.json come from the same code. Each family's `metrics` turns it
into sections of numbers. Reconstruction figures, factor metrics (MIG, FactorVAE, DCI) and clustering against
labels work on any representation, so they live here.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from dvae_cli.core.progress import Advance
from dvae_cli.core.splits import SPLIT_NAMES
from dvae_cli.core.tensors import as_tensor
from dvae_cli.scoring.config import EvaluateConfig
from dvae_cli.scoring.metrics import (
    clustering_scores,
    dci,
    factorvae_score,
    majority_accuracy,
    mutual_information_gap,
    normalized_mse,
    pixel_histogram,
    pixel_variance,
    psnr,
    varying_factor_mask,
)

PROBABILITY_FLOOR = 1e-6
"""Decoder probabilities are clamped to [floor, 1 − floor] before the Bernoulli log-likelihood."""
DCI_MAX_POINTS = 2000
"""DCI fits gradient-boosted trees per factor and class (about a minute on 2,000 dSprites points on 2 CPU cores),
so it uses a subsample of the factor sample."""


class Decoder(Protocol):
    """What the reconstruction figures need of a model: images in [0, 1] from its stored latents."""

    def decode(self, latent: dict[str, torch.Tensor]) -> torch.Tensor: ...


Sections = dict[str, Any]
"""Nested sections of numbers: {"reconstruction": {"mse": ...}, "labels": {"discrete_0": {...}}, ...}."""


@dataclass(frozen=True)
class ReconstructionTotals:
    """Sums over the evaluation split of the decoded images against the originals on [0, 1]."""

    images: int
    pixels_per_image: int
    squared_error: float
    bernoulli_nll: float
    """Σ −[x log p + (1 − x) log(1 − p)] with p the decoded pixel clamped by PROBABILITY_FLOOR, in nats."""
    pixel_variance: float
    binary: bool
    """Every pixel of the split is 0 or 255."""

    @property
    def mse(self) -> float:
        return self.squared_error / (self.images * self.pixels_per_image)


class RowArrays(Protocol):
    """Per-row arrays by name (latents, labels, factors) and every row's split: a codes file, or `ArraysInMemory`."""

    split: np.ndarray

    def read_at(self, name: str, rows: np.ndarray) -> np.ndarray | None:
        """Array `name` at sorted `rows`; None when there is no such array."""


@dataclass(frozen=True)
class ArraysInMemory:
    split: np.ndarray
    arrays: dict[str, np.ndarray]

    def read_at(self, name: str, rows: np.ndarray) -> np.ndarray | None:
        return self.arrays[name][rows] if name in self.arrays else None


@dataclass
class Evaluation:
    """What the per-family metrics read, and where they leave notes and timings."""

    config: Any
    """The model's config (its family's params section)."""
    seed: int
    settings: EvaluateConfig
    source: RowArrays
    factor_names: tuple[str, ...]
    """The dataset's ground-truth factors, in the order of its `factor_classes` columns."""
    num_classes: int
    """The dataset's label classes (0: no labels)."""
    split: int
    rows: np.ndarray
    """Sorted rows of `source` in the evaluation split."""
    arrays: dict[str, np.ndarray]
    """Arrays already read at `rows`, by name."""
    reconstruction: ReconstructionTotals
    notes: list[str]
    seconds: dict[str, float]

    def read(self, name: str, rows: np.ndarray | None = None) -> np.ndarray | None:
        """Array `name` at sorted `rows` (default: the evaluation split); None when the source lacks it."""
        if rows is not None:
            return self.source.read_at(name, rows)
        if name not in self.arrays:
            found = self.source.read_at(name, self.rows)
            if found is None:
                return None
            self.arrays[name] = found
        return self.arrays[name]

    def timed(self, name: str) -> contextlib.AbstractContextManager[None]:
        return timed(self.seconds, name)


@contextmanager
def timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time of the block to seconds[name]."""
    started = time.perf_counter()
    yield
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started


def seeded_generators(seed: int, count: int) -> list[np.random.Generator]:
    """Independent generators for the sample, the FactorVAE votes and the DCI subsample, all from `seed`."""
    return [np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(count)]


def factor_metrics(run: Evaluation, representation: np.ndarray, factor_classes: np.ndarray) -> Sections:
    """MIG, FactorVAE score and (when evaluate.dci) DCI on a seeded sample of evaluate.num_samples points.

    Returns the "factors" and "sample" sections; factors constant over the split, or a representation too small
    for a metric, leave that metric out with a note.
    """
    settings = run.settings
    sample_rng, factorvae_rng, dci_rng = seeded_generators(run.seed, 3)
    available = len(representation)
    size = min(settings.num_samples, available)
    if size < available:
        chosen = np.sort(sample_rng.choice(available, size=size, replace=False))
        representation, factor_classes = representation[chosen], factor_classes[chosen]
    elif settings.num_samples > available:
        run.notes.append(f"evaluate.num_samples is {settings.num_samples} but the {SPLIT_NAMES[run.split]} "
                         f"split has {available} images; the factor metrics use all {available}")
    sample = {"seed": run.seed, "size": size, "requested": settings.num_samples}
    if size < 2 or not varying_factor_mask(factor_classes).any():
        run.notes.append("factor metrics skipped: every ground-truth factor is constant in the sample")
        return {"sample": sample}
    factors: Sections = {}
    if representation.shape[1] >= 2:
        with run.timed("mig"):
            mig = mutual_information_gap(representation, factor_classes)
        factors["mig"] = mig.mig
        factors["mig_per_factor"] = {name: gap for name, gap in zip(run.factor_names, mig.per_factor)
                                     if gap is not None}
    else:
        run.notes.append("MIG skipped: it needs a representation of at least 2 dimensions")
    with run.timed("factorvae"):
        factorvae = factorvae_score(representation, factor_classes, factorvae_rng)
    factors["factorvae_score"] = factorvae.eval_accuracy
    factors["factorvae_train_accuracy"] = factorvae.train_accuracy
    factors["factorvae_active_dims"] = factorvae.num_active_dims
    if settings.dci:
        subsample = np.sort(dci_rng.choice(size, size=min(size, DCI_MAX_POINTS), replace=False))
        with run.timed("dci"):
            scores = dci(representation[subsample], factor_classes[subsample], dci_rng)
        factors["dci"] = {"disentanglement": scores.disentanglement, "completeness": scores.completeness,
                          "informativeness_train": scores.informativeness_train,
                          "informativeness_test": scores.informativeness_test, "sample_size": len(subsample)}
    return {"factors": factors, "sample": sample}


def cluster_section(assigned: np.ndarray, labels: np.ndarray, num_categories: int, num_classes: int) -> Sections:
    """Hungarian accuracy, NMI, ARI; the many-to-one majority accuracy too when the variable has k ≠ classes.

    Decided by the variable's k and the dataset's class count, not by the values seen, so the keys stay the same
    from run to run (a collapsed variable does not make a key appear).
    """
    scores = clustering_scores(assigned, labels)
    section: Sections = {"hungarian_accuracy": scores.hungarian_accuracy}
    if num_categories != num_classes:
        section["majority_accuracy"] = majority_accuracy(assigned, labels)
    section.update(nmi=scores.nmi, ari=scores.ari)
    return section


@torch.inference_mode()
def reconstruction_totals(model: Decoder, latent: dict[str, np.ndarray], images: np.ndarray,
                          batch_size: int, device: torch.device, advance: Advance) -> ReconstructionTotals:
    """Decode `latent` (codes-file arrays of the evaluation rows) batch by batch and sum the errors against `images`."""
    counts = pixel_histogram(images)
    squared_error = torch.zeros((), dtype=torch.float64, device=device)
    bernoulli_nll = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        x = torch.from_numpy(images[start:stop]).to(device).float().div_(255)
        batch = {name: as_tensor(array[start:stop]).to(device) for name, array in latent.items()}
        decoded = model.decode(batch).float()
        squared_error += (decoded - x).pow(2).sum(dtype=torch.float64)
        probabilities = decoded.clamp(PROBABILITY_FLOOR, 1.0 - PROBABILITY_FLOOR)
        bernoulli_nll += F.binary_cross_entropy(probabilities, x, reduction="sum").double()
        advance(stop - start)
    return ReconstructionTotals(
        images=len(images),
        pixels_per_image=int(np.prod(images.shape[1:])),
        squared_error=squared_error.item(),
        bernoulli_nll=bernoulli_nll.item(),
        pixel_variance=pixel_variance(counts),
        binary=not counts[1:255].any(),
    )


def reconstruction_metrics(totals: ReconstructionTotals) -> Sections:
    """MSE per pixel on [0, 1], PSNR (dB), MSE / pixel variance; Bernoulli NLL (nats/image) when the data is binary."""
    section: Sections = {"mse": totals.mse, "psnr": psnr(totals.mse)}
    if totals.pixel_variance > 0:
        section["normalized_mse"] = normalized_mse(totals.mse, totals.pixel_variance)
    if totals.binary:
        section["bernoulli_nll"] = totals.bernoulli_nll / totals.images
    return section


def finite_only(sections: Sections) -> Sections:
    """The sections without non-finite numbers (and without sections left empty)."""
    kept: Sections = {}
    for key, value in sections.items():
        if isinstance(value, dict):
            value = finite_only(value)
            if value:
                kept[key] = value
        elif math.isfinite(value):
            kept[key] = value
    return kept


def evaluation_sections(run: Evaluation, family_metrics: Callable[[Evaluation], Sections]) -> Sections:
    """What metrics/M.json holds: the split, reconstruction figures, the family's sections; finite numbers only."""
    return finite_only({"evaluation": {"split": run.split, "images": len(run.rows)},
                        "reconstruction": reconstruction_metrics(run.reconstruction), **family_metrics(run)})
