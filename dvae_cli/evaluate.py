"""`dvae evaluate`: the figures that say whether a discrete representation is good, as `metrics/M.json`.

Everything is computed on the evaluation split (test, or val when there is no test split). Reconstructions are
decoded from the codes file's latents: the codes file is checked to come from this model and this dataset, and
decoding a row's latent is the model's evaluation-mode reconstruction of that row. Code usage, labels and
factors are read from the codes file too, so the encoder never runs again.

The JSON holds nested sections of numbers only; a figure that is not finite (the PSNR of a perfect
reconstruction) is left out rather than written as inf or NaN, which JSON and `dvc metrics` cannot compare.
Sections: `evaluation` (split: 2 test, 1 val; images), `reconstruction`; JointVAE `latent`, `elbo`, `labels`
(per discrete variable), `factors` and `sample` (seed and size of the factor metrics' sample); VQ-VAE `codes`,
`labels`. `labels` and `factors` exist only when the dataset has labels or ground-truth factors.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dvae_cli.config import JointVAEConfig, Params, VQVAEConfig
from dvae_cli.dataset import SPLIT_NAMES, TRAIN, DatasetFile, DatasetInfo, pixel_histogram, pixel_variance, read_rows
from dvae_cli.encode import CodesFile, as_tensor
from dvae_cli.errors import UserError
from dvae_cli.files import sha256_file, write_json_atomic
from dvae_cli.metrics import (
    bag_of_codes,
    clustering_scores,
    code_usage,
    dci,
    factorvae_score,
    linear_probe_accuracy,
    majority_accuracy,
    mutual_information_gap,
    normalized_mse,
    psnr,
)
from dvae_cli.models.jointvae import kl_categorical, kl_normal
from dvae_cli.modelstore import LoadedModel, load_model
from dvae_cli.progress import progress_bar
from dvae_cli.runtime import resolve_runtime

ACTIVE_KL_THRESHOLD = 0.01
"""A continuous dimension whose KL (nats, averaged over images) exceeds this counts as active."""

PROBABILITY_FLOOR = 1e-6
"""Decoder probabilities are clamped to [floor, 1 − floor] before the Bernoulli log-likelihood."""

DCI_MAX_POINTS = 2000
"""DCI fits gradient-boosted trees per factor and class (about a minute on 2,000 dSprites points on 2 CPU cores),
so it uses a subsample of the factor sample."""

PROBE_MAX_TRAIN_ROWS = 10000
"""The VQ-VAE linear probe is fit on a seeded sample of at most this many train-split code maps."""

Sections = dict[str, Any]
"""Nested sections of numbers: {"reconstruction": {"mse": ...}, "labels": {"discrete_0": {...}}, ...}."""


@dataclass(frozen=True)
class EvaluatePaths:
    model_dir: Path
    dataset: Path
    codes: Path
    metrics: Path


@dataclass
class EvaluateResult:
    family: str
    metrics: Sections
    """What `metrics` holds, as written."""
    split_name: str
    num_images: int
    notes: list[str]
    """Things the user should know that are not errors (e.g. a sample capped at the split size)."""
    seconds: dict[str, float]
    """Wall time of each group of metrics, in the order computed."""
    path: Path


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


@torch.inference_mode()
def reconstruction_totals(loaded: LoadedModel, latent: dict[str, np.ndarray], images: np.ndarray,
                          batch_size: int, device: torch.device, show_progress: bool) -> ReconstructionTotals:
    """Decode `latent` (codes-file arrays of the evaluation rows) batch by batch and sum the errors against `images`."""
    counts = pixel_histogram(images)
    squared_error = torch.zeros((), dtype=torch.float64, device=device)
    bernoulli_nll = torch.zeros((), dtype=torch.float64, device=device)
    with progress_bar(f"evaluate {loaded.family}", len(images), enabled=show_progress) as advance:
        for start in range(0, len(images), batch_size):
            stop = min(start + batch_size, len(images))
            x = torch.from_numpy(images[start:stop]).to(device).float().div_(255)
            decoded = loaded.model.decode({name: as_tensor(array[start:stop]).to(device)
                                           for name, array in latent.items()}).float()
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


def gaussian_nll_per_image(totals: ReconstructionTotals) -> float:
    """−log N(x; x̂, ½ I) per image in nats: the SSE JointVAE's gaussian likelihood trains on, plus (D/2) log π."""
    return totals.squared_error / totals.images + 0.5 * totals.pixels_per_image * math.log(math.pi)


def factor_representation(continuous_mean: np.ndarray, discrete: np.ndarray) -> np.ndarray:
    """JointVAE's representation for factor metrics: [N, d] continuous means, then one column per discrete argmax."""
    return np.hstack([continuous_mean.astype(np.float64), discrete.astype(np.float64)])


def _seeded_generators(seed: int, count: int) -> list[np.random.Generator]:
    """Independent generators for the sample, the FactorVAE votes and the DCI subsample, all from `seed`."""
    return [np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(count)]


def factor_metrics(run: Evaluation, representation: np.ndarray, factor_classes: np.ndarray) -> Sections:
    """MIG, FactorVAE score and (when evaluate.dci) DCI on a seeded sample of evaluate.num_samples points.

    Returns the "factors" and "sample" sections; factors constant over the split, or a representation too small
    for a metric, leave that metric out with a note.
    """
    settings = run.params.evaluate
    sample_rng, factorvae_rng, dci_rng = _seeded_generators(run.params.seed, 3)
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


def jointvae_metrics(run: Evaluation) -> Sections:
    """KL terms, negative ELBO, clustering of each discrete variable against the labels, factor metrics.

    The negative ELBO is evaluated at the posterior mean and the most likely categories (the evaluation-mode
    reconstruction), under the model's likelihood: Bernoulli NLL of the clamped decoder probabilities, or
    `gaussian_nll_per_image`; KL_z + KL_c are exact. Nats per image; bits per dimension = nats / (C·H·W·ln 2).
    """
    config = run.loaded.config
    assert isinstance(config, JointVAEConfig)
    totals = run.reconstruction
    mean, logvar = run.read("continuous_mean"), run.read("continuous_logvar")
    probs, discrete = run.read("discrete_probs"), run.read("discrete")
    if mean is None or logvar is None:
        mean = logvar = np.zeros((totals.images, 0), dtype=np.float32)
    if probs is None or discrete is None:
        probs, discrete = np.zeros((totals.images, 0), dtype=np.float32), np.zeros((totals.images, 0), dtype=np.int64)

    with run.timed("kl"):
        kl_per_dim = kl_normal(torch.from_numpy(mean).double(), torch.from_numpy(logvar).double()).numpy()
        split_probs = np.split(probs, np.cumsum(config.discrete)[:-1], axis=1) if config.discrete else []
        kl_per_variable = [kl_categorical(torch.from_numpy(p).double()).item() for p in split_probs]
    kl_z, kl_c = float(kl_per_dim.sum()), float(sum(kl_per_variable))
    recon_nll = (totals.bernoulli_nll / totals.images if config.likelihood == "bernoulli"
                 else gaussian_nll_per_image(totals))
    negative_elbo = recon_nll + kl_z + kl_c
    sections: Sections = {
        "latent": {"kl_z": kl_z, "kl_c": kl_c,
                   "kl_z_per_dim": {str(i): float(kl) for i, kl in enumerate(kl_per_dim)},
                   "kl_c_per_variable": {str(j): kl for j, kl in enumerate(kl_per_variable)},
                   "active_dims": int((kl_per_dim > ACTIVE_KL_THRESHOLD).sum())},
        "elbo": {"negative_elbo": negative_elbo, "reconstruction_nll": recon_nll,
                 "bits_per_dim": negative_elbo / (totals.pixels_per_image * math.log(2))},
    }
    labels = run.read("labels")
    if labels is not None and discrete.shape[1]:
        with run.timed("labels"):
            sections["labels"] = {f"discrete_{j}": _cluster_section(discrete[:, j], labels, categories,
                                                                    run.info.num_classes)
                                  for j, categories in enumerate(config.discrete)}
    factor_classes = run.read("factor_classes")
    if factor_classes is not None:
        sections.update(factor_metrics(run, factor_representation(mean, discrete), factor_classes))
    return sections


def _cluster_section(assigned: np.ndarray, labels: np.ndarray, num_categories: int, num_classes: int) -> Sections:
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


def vqvae_metrics(run: Evaluation) -> Sections:
    """Code usage over the split, bits per code map under a uniform prior, and a bag-of-codes linear probe."""
    config = run.loaded.config
    assert isinstance(config, VQVAEConfig)
    codes = run.read("codes")
    assert codes is not None
    with run.timed("code usage"):
        usage = code_usage(np.bincount(codes.reshape(-1).astype(np.int64), minlength=config.num_codes))
    sections: Sections = {"codes": {
        "perplexity": usage.perplexity, "fraction_used": usage.fraction_used, "unused": usage.unused,
        "bits_per_image": codes[0].size * math.log2(config.num_codes)}}
    labels = run.read("labels")
    if labels is not None:
        with run.timed("linear probe"):
            probe = _linear_probe(run, codes, labels, config.num_codes)
        if probe:
            sections["labels"] = probe
    return sections


def _linear_probe(run: Evaluation, codes: np.ndarray, labels: np.ndarray, num_codes: int) -> Sections:
    """Logistic regression on bag-of-codes histograms: fit on sampled train-split rows, scored on the split."""
    train_rows = np.flatnonzero(run.codes.split == TRAIN)
    rng = _seeded_generators(run.params.seed, 1)[0]
    if len(train_rows) > PROBE_MAX_TRAIN_ROWS:
        train_rows = np.sort(rng.choice(train_rows, size=PROBE_MAX_TRAIN_ROWS, replace=False))
    train_labels = run.read("labels", train_rows)
    train_codes = run.read("codes", train_rows)
    assert train_labels is not None and train_codes is not None
    if len(np.unique(train_labels)) < 2:
        run.notes.append("linear probe skipped: the train split has fewer than 2 classes")
        return {}
    accuracy = linear_probe_accuracy(bag_of_codes(train_codes, num_codes), train_labels,
                                     bag_of_codes(codes, num_codes), labels, seed=run.params.seed)
    return {"linear_probe_accuracy": accuracy, "probe_train_images": len(train_rows)}


FAMILY_METRICS: dict[str, Callable[[Evaluation], Sections]] = {"jointvae": jointvae_metrics, "vqvae": vqvae_metrics}


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


def _open_codes(paths: EvaluatePaths, family: str, loaded: LoadedModel, dataset: DatasetFile) -> CodesFile:
    """The codes file, checked to be this family's, made by these weights from this dataset."""
    rerun = f"re-run `dvae encode --model {family}`"
    if not paths.codes.exists():
        raise UserError(f"codes file {paths.codes} not found; make it with `dvae encode --model {family}`")
    codes = CodesFile(paths.codes, family)
    try:
        if codes.attrs["weights_sha256"] != loaded.weights_sha256:
            raise UserError(f"{paths.codes} was made by another model than {paths.model_dir} "
                            f"(weights fingerprints differ); {rerun}")
        if codes.attrs["dataset_sha256"] != sha256_file(paths.dataset) or len(codes) != dataset.num_images:
            raise UserError(f"{paths.codes} was made from another dataset than {paths.dataset} "
                            f"(dataset fingerprints differ); {rerun}")
    except BaseException:
        codes.close()
        raise
    return codes


def evaluate(params: Params, family: str, paths: EvaluatePaths, show_progress: bool = True) -> EvaluateResult:
    """Compute every metric of `family`'s model on the evaluation split and write them atomically to paths.metrics."""
    started = time.perf_counter()
    # The runtime's device and memory format, but fp32 whatever train.precision: these are the reported figures.
    runtime = resolve_runtime(params.train)
    device = runtime.device
    loaded = load_model(paths.model_dir, family, device)
    loaded.model = runtime.prepare(loaded.model)
    with DatasetFile(paths.dataset) as dataset, _open_codes(paths, family, loaded, dataset) as codes:
        split = dataset.evaluation_split()
        rows = dataset.indices(split)
        latent = {name: read_rows(codes.file[name], rows) for name in codes.latent_names}
        seconds: dict[str, float] = {}
        with timed(seconds, "reconstruction"):
            images = dataset.read_images(rows)
            totals = reconstruction_totals(loaded, latent, images, params.evaluate.batch_size, device, show_progress)
        run = Evaluation(params=params, loaded=loaded, codes=codes, info=dataset.info, split=split, rows=rows,
                         arrays=latent, reconstruction=totals, notes=[], seconds=seconds)
        sections: Sections = {"evaluation": {"split": split, "images": len(rows)},
                              "reconstruction": reconstruction_metrics(totals),
                              **FAMILY_METRICS[family](run)}
    metrics = finite_only(sections)
    write_json_atomic(paths.metrics, metrics)
    seconds["total"] = time.perf_counter() - started
    return EvaluateResult(family=family, metrics=metrics, split_name=SPLIT_NAMES[split], num_images=len(rows),
                          notes=run.notes, seconds=seconds, path=paths.metrics)
