"""Numeric metrics for `dvae evaluate`: reconstruction, code usage, clustering, disentanglement, probes.

Shapes follow the codes file: one row per data point. `representation` is [N, d] floats,
`factor_classes` is [N, F] integer classes of the ground-truth factors, `categories` and `labels`
are [N] integers. All functions are pure; randomness comes only from the `rng` or `seed` passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.stats import entropy as scipy_entropy
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    adjusted_rand_score,
    mutual_info_score,
    normalized_mutual_info_score,
)

COLLAPSED_STD_THRESHOLD = 0.05
"""Dimensions whose global standard deviation is below this are ignored by the FactorVAE score."""

_MAX_SEED = 2**31 - 1


@dataclass(frozen=True)
class CodeUsage:
    perplexity: float
    fraction_used: float
    unused: int


@dataclass(frozen=True)
class ClusterScores:
    hungarian_accuracy: float
    majority_accuracy: float | None
    """None when there are as many categories as classes: then the one-to-one matching is the measure."""
    nmi: float
    ari: float


@dataclass(frozen=True)
class MIGResult:
    mig: float
    per_factor: tuple[float | None, ...]
    """Normalised gap of each factor, in factor order; None for a factor with a single value."""


@dataclass(frozen=True)
class FactorVAEResult:
    train_accuracy: float
    eval_accuracy: float
    num_active_dims: int


@dataclass(frozen=True)
class DCIResult:
    disentanglement: float
    completeness: float
    informativeness_train: float
    informativeness_test: float


def psnr(mse: float, max_value: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB: 10 log10(max² / MSE); inf for a perfect reconstruction."""
    if mse < 0:
        raise ValueError(f"MSE must be non-negative, got {mse}")
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(max_value**2 / mse)


def normalized_mse(mse: float, variance: float) -> float:
    """MSE divided by the pixel variance of the test images (1.0 = predicting the mean image)."""
    if variance <= 0:
        raise ValueError(f"variance must be positive, got {variance}")
    return mse / variance


def perplexity(counts: np.ndarray) -> float:
    """exp of the entropy (nats) of the code distribution counts / sum(counts)."""
    counts = np.asarray(counts, dtype=np.float64).ravel()
    if (counts < 0).any():
        raise ValueError("counts must be non-negative")
    total = counts.sum()
    if total == 0:
        raise ValueError("counts are all zero")
    probabilities = counts[counts > 0] / total
    return float(np.exp(-np.sum(probabilities * np.log(probabilities))))


def code_counts(codes: np.ndarray, num_codes: int) -> np.ndarray:
    """int64 [num_codes]: how many entries of `codes` (code maps of any shape) hold each code."""
    return np.bincount(np.asarray(codes).reshape(-1).astype(np.int64), minlength=num_codes)


def code_usage(counts: np.ndarray) -> CodeUsage:
    """Perplexity, fraction of codes used at least once, and the number of codes never used."""
    counts = np.asarray(counts).ravel()
    unused = int(np.count_nonzero(counts == 0))
    return CodeUsage(
        perplexity=perplexity(counts),
        fraction_used=1.0 - unused / counts.size,
        unused=unused,
    )


def _contingency_table(categories: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[distinct categories, distinct labels] co-occurrence counts."""
    categories = np.asarray(categories)
    labels = np.asarray(labels)
    if categories.ndim != 1 or categories.shape != labels.shape:
        raise ValueError(f"categories {categories.shape} and labels {labels.shape} must be 1-D of one length")
    if categories.size == 0:
        raise ValueError("no points to score")
    _, category_index = np.unique(categories, return_inverse=True)
    _, label_index = np.unique(labels, return_inverse=True)
    num_labels = int(label_index.max()) + 1
    flat = np.bincount(category_index * num_labels + label_index,
                       minlength=(int(category_index.max()) + 1) * num_labels)
    return flat.reshape(-1, num_labels)


def _matched_fraction(table: np.ndarray) -> float:
    rows, columns = linear_sum_assignment(table, maximize=True)
    return float(table[rows, columns].sum() / table.sum())


def _majority_fraction(table: np.ndarray) -> float:
    return float(table.max(axis=1).sum() / table.sum())


def hungarian_accuracy(categories: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy under the best one-to-one map from categories to labels (Hungarian matching)."""
    return _matched_fraction(_contingency_table(categories, labels))


def majority_accuracy(categories: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy when each category predicts its most frequent label (many-to-one)."""
    return _majority_fraction(_contingency_table(categories, labels))


def clustering_scores(categories: np.ndarray, labels: np.ndarray) -> ClusterScores:
    """How well discrete codes recover class labels: matching accuracies, NMI and ARI."""
    table = _contingency_table(categories, labels)
    num_categories, num_classes = table.shape
    return ClusterScores(
        hungarian_accuracy=_matched_fraction(table),
        majority_accuracy=None if num_categories == num_classes else _majority_fraction(table),
        nmi=float(normalized_mutual_info_score(labels, categories)),
        ari=float(adjusted_rand_score(labels, categories)),
    )


def factor_nmi(categories: np.ndarray, factor_classes: np.ndarray) -> tuple[float | None, ...]:
    """NMI of one discrete variable with each ground-truth factor, in factor order; None for a single-valued factor.

    What a variable with more or fewer categories than the classes captures: a split by scale shows as NMI with
    scale, a merge of shapes as a lower NMI with shape.
    """
    categories = np.asarray(categories)
    if categories.ndim != 1 or factor_classes.ndim != 2 or len(categories) != len(factor_classes):
        raise ValueError(f"categories {categories.shape} and factor_classes {factor_classes.shape} must be [N] and "
                         f"[N, F]")
    return tuple(float(normalized_mutual_info_score(column, categories)) if varying else None
                 for column, varying in zip(factor_classes.T, varying_factor_mask(factor_classes)))


def _check_factor_inputs(representation: np.ndarray, factor_classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    representation = np.asarray(representation, dtype=np.float64)
    factor_classes = np.asarray(factor_classes)
    if representation.ndim != 2 or factor_classes.ndim != 2:
        raise ValueError("representation and factor_classes must be 2-D: [N, d] and [N, F]")
    if representation.shape[0] != factor_classes.shape[0]:
        raise ValueError(f"representation has {representation.shape[0]} rows, "
                         f"factor_classes {factor_classes.shape[0]}")
    return representation, factor_classes


def varying_factor_mask(factor_classes: np.ndarray) -> np.ndarray:
    """[F] booleans: which factors take more than one value in the sample."""
    return (factor_classes != factor_classes[:1]).any(axis=0)


def _varying_factors(factor_classes: np.ndarray) -> np.ndarray:
    """Indices of the factors that take more than one value in the sample."""
    varying = np.flatnonzero(varying_factor_mask(factor_classes))
    if varying.size == 0:
        raise ValueError("every factor has a single value in the sample; nothing to score")
    return varying


def _histogram_discretize(representation: np.ndarray, num_bins: int) -> np.ndarray:
    """Equal-width bins per dimension, as disentanglement_lib's _histogram_discretize."""
    discretized = np.empty(representation.shape, dtype=np.int64)
    for dim in range(representation.shape[1]):
        bin_edges = np.histogram(representation[:, dim], num_bins)[1]
        discretized[:, dim] = np.digitize(representation[:, dim], bin_edges[:-1])
    return discretized


def mutual_information_gap(representation: np.ndarray, factor_classes: np.ndarray,
                           num_bins: int = 20) -> MIGResult:
    """MIG (Chen et al. 2018, eq. 6): mean over factors of the gap between the two most informative dims / H(factor)."""
    representation, factor_classes = _check_factor_inputs(representation, factor_classes)
    if representation.shape[1] < 2:
        raise ValueError("MIG needs a representation with at least 2 dimensions")
    discretized = _histogram_discretize(representation, num_bins)
    varying = set(_varying_factors(factor_classes).tolist())
    per_factor: list[float | None] = []
    for factor in range(factor_classes.shape[1]):
        if factor not in varying:
            per_factor.append(None)
            continue
        classes = factor_classes[:, factor]
        mutual_info = np.array([mutual_info_score(classes, discretized[:, dim])
                                for dim in range(discretized.shape[1])])
        top_two = np.sort(mutual_info)[-2:]
        factor_entropy = mutual_info_score(classes, classes)
        per_factor.append(float((top_two[1] - top_two[0]) / factor_entropy))
    gaps = [gap for gap in per_factor if gap is not None]
    return MIGResult(mig=float(np.mean(gaps)), per_factor=tuple(per_factor))


def _sample_fixed_factor_batches(factor_classes: np.ndarray, factors: np.ndarray, rng: np.random.Generator,
                                 num_votes: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per vote: a factor from `factors` and `batch_size` row indices (with replacement) sharing one value of it."""
    num_points = factor_classes.shape[0]
    # Rows sorted by class, per factor, so that the rows sharing a class form one contiguous run.
    order = np.argsort(factor_classes, axis=0, kind="stable").T  # [F, N]
    sorted_classes = np.take_along_axis(factor_classes.T, order, axis=1)
    fixed_factor = factors[rng.integers(factors.size, size=num_votes)]
    anchor = rng.integers(num_points, size=num_votes)
    anchor_class = factor_classes[anchor, fixed_factor]
    run_start = np.empty(num_votes, dtype=np.int64)
    run_length = np.empty(num_votes, dtype=np.int64)
    for factor in np.unique(fixed_factor):
        votes = fixed_factor == factor
        left = np.searchsorted(sorted_classes[factor], anchor_class[votes], side="left")
        right = np.searchsorted(sorted_classes[factor], anchor_class[votes], side="right")
        run_start[votes] = left
        run_length[votes] = right - left
    offsets = np.floor(rng.random((num_votes, batch_size)) * run_length[:, None]).astype(np.int64)
    rows = order[fixed_factor[:, None], run_start[:, None] + offsets]
    return fixed_factor, rows


def _factor_vae_votes(scaled: np.ndarray, factor_classes: np.ndarray, factors: np.ndarray,
                      rng: np.random.Generator, num_votes: int, batch_size: int) -> np.ndarray:
    """[F, d] counts of (fixed factor, dimension with the least normalised variance)."""
    fixed_factor, rows = _sample_fixed_factor_batches(factor_classes, factors, rng, num_votes, batch_size)
    local_variance = scaled[rows].var(axis=1, ddof=1)  # [votes, d]
    lowest_variance_dim = np.argmin(local_variance, axis=1)
    votes = np.zeros((factor_classes.shape[1], scaled.shape[1]), dtype=np.int64)
    np.add.at(votes, (fixed_factor, lowest_variance_dim), 1)
    return votes


def factorvae_score(representation: np.ndarray, factor_classes: np.ndarray, rng: np.random.Generator,
                    batch_size: int = 64, num_train_votes: int = 800,
                    num_eval_votes: int = 400) -> FactorVAEResult:
    """FactorVAE metric (Kim & Mnih 2018, sec. 4): majority-vote classifier from least-variance dim to fixed factor.

    Works on a precomputed sample: the fixed-factor batches are drawn from its rows.
    """
    representation, factor_classes = _check_factor_inputs(representation, factor_classes)
    if batch_size < 2:
        raise ValueError("batch_size must be at least 2 to estimate a variance")
    factors = _varying_factors(factor_classes)
    global_std = representation.std(axis=0, ddof=1)
    active_dims = global_std >= COLLAPSED_STD_THRESHOLD
    num_active_dims = int(active_dims.sum())
    if num_active_dims == 0:
        return FactorVAEResult(train_accuracy=0.0, eval_accuracy=0.0, num_active_dims=0)
    scaled = representation[:, active_dims] / global_std[active_dims]
    train_votes = _factor_vae_votes(scaled, factor_classes, factors, rng, num_train_votes, batch_size)
    factor_of_dim = np.argmax(train_votes, axis=0)
    eval_votes = _factor_vae_votes(scaled, factor_classes, factors, rng, num_eval_votes, batch_size)
    dims = np.arange(num_active_dims)
    return FactorVAEResult(
        train_accuracy=float(train_votes[factor_of_dim, dims].sum() / train_votes.sum()),
        eval_accuracy=float(eval_votes[factor_of_dim, dims].sum() / eval_votes.sum()),
        num_active_dims=num_active_dims,
    )


def _one_minus_normalized_entropy(weights: np.ndarray) -> np.ndarray:
    """1 - entropy of each column of `weights` (normalised) with base = number of rows; 1 when there is one row."""
    if weights.shape[0] == 1:
        return np.ones(weights.shape[1])
    return 1.0 - scipy_entropy(weights + 1e-11, base=weights.shape[0], axis=0)


def _importance_weighted_mean(per_item: np.ndarray, item_importance: np.ndarray) -> float:
    total = item_importance.sum()
    weights = item_importance / total if total > 0 else np.full(item_importance.shape, 1.0 / item_importance.size)
    return float(np.sum(per_item * weights))


def dci(representation: np.ndarray, factor_classes: np.ndarray, rng: np.random.Generator,
        train_fraction: float = 0.8) -> DCIResult:
    """DCI (Eastwood & Williams 2018): gradient-boosted-tree importances as in disentanglement_lib."""
    representation, factor_classes = _check_factor_inputs(representation, factor_classes)
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    factors = _varying_factors(factor_classes)
    permutation = rng.permutation(representation.shape[0])
    num_train = int(round(train_fraction * permutation.size))
    train_rows, test_rows = permutation[:num_train], permutation[num_train:]
    importance = np.zeros((representation.shape[1], factors.size))  # [d, F]
    train_accuracy, test_accuracy = [], []
    for column, factor in enumerate(factors):
        model = GradientBoostingClassifier(random_state=int(rng.integers(_MAX_SEED)))
        model.fit(representation[train_rows], factor_classes[train_rows, factor])
        importance[:, column] = np.abs(model.feature_importances_)
        train_accuracy.append(model.score(representation[train_rows], factor_classes[train_rows, factor]))
        test_accuracy.append(model.score(representation[test_rows], factor_classes[test_rows, factor]))
    return DCIResult(
        disentanglement=_importance_weighted_mean(_one_minus_normalized_entropy(importance.T),
                                                  importance.sum(axis=1)),
        completeness=_importance_weighted_mean(_one_minus_normalized_entropy(importance),
                                               importance.sum(axis=0)),
        informativeness_train=float(np.mean(train_accuracy)),
        informativeness_test=float(np.mean(test_accuracy)),
    )


def linear_probe_accuracy(train_features: np.ndarray, train_labels: np.ndarray,
                          test_features: np.ndarray, test_labels: np.ndarray, seed: int) -> float:
    """Test accuracy of a logistic-regression probe trained on the features."""
    probe = LogisticRegression(max_iter=1000, random_state=seed)
    probe.fit(train_features, train_labels)
    return float(probe.score(test_features, test_labels))


def bag_of_codes(codes: np.ndarray, num_codes: int) -> np.ndarray:
    """[N, ...] integer code maps -> [N, num_codes] float32 histograms, each summing to 1."""
    codes = np.asarray(codes)
    if codes.ndim < 2 or codes.shape[0] == 0 or codes[0].size == 0:
        raise ValueError(f"codes must be [N, h, w] with N, h, w > 0, got shape {codes.shape}")
    flat = codes.reshape(codes.shape[0], -1).astype(np.int64)
    if flat.min() < 0 or flat.max() >= num_codes:
        raise ValueError(f"codes must lie in [0, {num_codes}), found [{flat.min()}, {flat.max()}]")
    row_offsets = np.arange(flat.shape[0])[:, None] * num_codes
    counts = np.bincount((row_offsets + flat).ravel(), minlength=flat.shape[0] * num_codes)
    return (counts.reshape(flat.shape[0], num_codes) / flat.shape[1]).astype(np.float32)


def pixel_histogram(images: np.ndarray) -> np.ndarray:
    """Counts [256] of each uint8 value over all pixels."""
    return np.bincount(images.reshape(-1), minlength=256)


def pixel_variance(histogram: np.ndarray) -> float:
    """Variance of all pixels on [0, 1], exact, from their 256-bin histogram."""
    counts = histogram.astype(np.float64)
    values = np.arange(256) / 255.0
    mean = (counts * values).sum() / counts.sum()
    return float((counts * (values - mean) ** 2).sum() / counts.sum())


def sample_truth_scores(iou: np.ndarray, nearest_classes: np.ndarray, factor_names: tuple[str, ...],
                        factor_sizes: tuple[int, ...], threshold: float,
                        asked: np.ndarray | None = None) -> dict[str, object]:
    """Samples against the true images nearest them (`iou` and the factor classes [N, F] of each's nearest image).

    `sprites`: the share within IoU `threshold` of a true image. `asked_class`: of samples drawn for a class (factor
    0's value), the share whose nearest image has it (a blank sample, IoU 0, has none). `coverage`: per factor, the
    share of its values that the samples counted as sprites reach, beside `uniform`, what a uniform draw of as many
    images reaches on average: 1 − (1 − 1/K)^n.
    """
    count = len(iou)
    sprites = iou >= threshold
    scores: dict[str, object] = {"samples": count, "sprites": float(np.mean(sprites)) if count else 0.0,
                                 "mean_iou": float(np.mean(iou)) if count else 0.0}
    if asked is not None:
        scores["asked_class"] = float(np.mean((iou > 0) & (nearest_classes[:, 0] == asked))) if count else 0.0
    reached = nearest_classes[sprites]
    scores["coverage"] = {name: len(np.unique(reached[:, column])) / size
                          for column, (name, size) in enumerate(zip(factor_names, factor_sizes))}
    scores["uniform"] = {name: 1 - (1 - 1 / size) ** len(reached) for name, size in zip(factor_names, factor_sizes)}
    return scores
