"""What a family's metrics read (the `Evaluation` of one model on one split) and the sections families share.

`dvae evaluate` builds the `Evaluation`; each family's `metrics` turns it into sections of numbers. Factor metrics
(MIG, FactorVAE, DCI) and clustering against labels work on any representation, so they live here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dvae_cli.core.metrics import clustering_scores, dci, factorvae_score, majority_accuracy, mutual_information_gap
from dvae_cli.formats.dataset import SPLIT_NAMES, DatasetInfo, read_rows

if TYPE_CHECKING:
    from dvae_cli.formats.codes import CodesFile
    from dvae_cli.formats.model_folder import LoadedModel
    from dvae_cli.params import Params

DCI_MAX_POINTS = 2000
"""DCI fits gradient-boosted trees per factor and class (about a minute on 2,000 dSprites points on 2 CPU cores),
so it uses a subsample of the factor sample."""


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


@dataclass
class Evaluation:
    """What the per-family metrics read, and where they leave notes and timings."""

    params: Params
    loaded: LoadedModel
    codes: CodesFile
    info: DatasetInfo
    split: int
    rows: np.ndarray
    """Sorted dataset rows of the evaluation split."""
    arrays: dict[str, np.ndarray]
    """Codes-file arrays already read at `rows`, by name."""
    reconstruction: ReconstructionTotals
    notes: list[str]
    seconds: dict[str, float]

    def read(self, name: str, rows: np.ndarray | None = None) -> np.ndarray | None:
        """Codes-file array `name` at sorted `rows` (default: the evaluation split); None when the file lacks it."""
        if name not in self.codes.file:
            return None
        if rows is None:
            if name not in self.arrays:
                self.arrays[name] = read_rows(self.codes.file[name], self.rows)
            return self.arrays[name]
        return read_rows(self.codes.file[name], rows)

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
    settings = run.params.evaluate
    sample_rng, factorvae_rng, dci_rng = seeded_generators(run.params.seed, 3)
    available = len(representation)
    size = min(settings.num_samples, available)
    if size < available:
        chosen = np.sort(sample_rng.choice(available, size=size, replace=False))
        representation, factor_classes = representation[chosen], factor_classes[chosen]
    elif settings.num_samples > available:
        run.notes.append(f"evaluate.num_samples is {settings.num_samples} but the {SPLIT_NAMES[run.split]} "
                         f"split has {available} images; the factor metrics use all {available}")
    sample = {"seed": run.params.seed, "size": size, "requested": settings.num_samples}
    if size < 2 or not (factor_classes != factor_classes[:1]).any():
        run.notes.append("factor metrics skipped: every ground-truth factor is constant in the sample")
        return {"sample": sample}
    factors: Sections = {}
    if representation.shape[1] >= 2:
        with run.timed("mig"):
            mig = mutual_information_gap(representation, factor_classes)
        factors["mig"] = mig.mig
        factors["mig_per_factor"] = {name: gap for name, gap in zip(run.info.factor_names, mig.per_factor)
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
