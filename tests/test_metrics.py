import math

import numpy as np
import pytest
from sklearn.metrics import mutual_info_score

from dvae_cli.scoring.metrics import (
    CodeUsage,
    bag_of_codes,
    clustering_scores,
    code_usage,
    dci,
    factor_nmi,
    factorvae_score,
    hungarian_accuracy,
    linear_probe_accuracy,
    majority_accuracy,
    mutual_information_gap,
    normalized_mse,
    perplexity,
    psnr,
    sample_truth_scores,
)


def sample_factor_classes(num_points: int, num_values: list[int], seed: int) -> np.ndarray:
    """Independent uniform factors, one column per factor."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(values, size=num_points) for values in num_values], axis=1)


# Reconstruction


def test_psnr_of_known_mse():
    assert psnr(0.01) == pytest.approx(20.0)
    assert psnr(0.01 * 255.0**2, max_value=255.0) == pytest.approx(20.0)
    assert psnr(0.0) == math.inf
    with pytest.raises(ValueError):
        psnr(-1.0)


def test_normalized_mse_divides_by_variance():
    assert normalized_mse(0.02, 0.08) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        normalized_mse(0.02, 0.0)


# Code usage


def test_perplexity_of_uniform_histogram_is_number_of_codes():
    assert perplexity(np.full(16, 7)) == pytest.approx(16.0)


def test_perplexity_of_single_code_is_one():
    assert perplexity(np.array([0, 0, 42, 0])) == pytest.approx(1.0)


def test_perplexity_matches_hand_computation():
    # p = (1/2, 1/4, 1/4): H = 1.5 ln 2, exp(H) = 2^1.5
    assert perplexity(np.array([2, 1, 1])) == pytest.approx(2.0**1.5)


def test_code_usage_counts_unused_codes():
    usage = code_usage(np.array([5, 0, 5, 0, 0, 5, 5, 0]))
    assert usage == CodeUsage(perplexity=pytest.approx(4.0), fraction_used=0.5, unused=4)


# Clustering


def test_hungarian_accuracy_of_permuted_labelling_is_one():
    labels = np.repeat(np.arange(5), 20)
    permutation = np.array([3, 0, 4, 1, 2])
    assert hungarian_accuracy(permutation[labels], labels) == 1.0


def test_hungarian_accuracy_of_hand_example():
    # Best one-to-one map: 0->a, 1->b (3 + 2 of 6 right); category 2 must take label c (0 right).
    categories = np.array([0, 0, 0, 1, 1, 2])
    labels = np.array(["a", "a", "a", "b", "b", "a"])
    assert hungarian_accuracy(categories, labels) == pytest.approx(5 / 6)


def test_hungarian_accuracy_of_random_labels_is_chance():
    rng = np.random.default_rng(0)
    num_classes = 4
    labels = rng.integers(num_classes, size=4000)
    categories = rng.integers(num_classes, size=4000)
    assert hungarian_accuracy(categories, labels) == pytest.approx(1 / num_classes, abs=0.03)


def test_majority_accuracy_with_more_categories_than_classes():
    # Categories 0, 1 -> label 0; category 2 -> label 1 (one point of it is wrong).
    categories = np.array([0, 0, 1, 1, 2, 2, 2])
    labels = np.array([0, 0, 0, 0, 1, 1, 0])
    assert majority_accuracy(categories, labels) == pytest.approx(6 / 7)
    assert hungarian_accuracy(categories, labels) == pytest.approx(4 / 7)


def test_clustering_scores_of_permutation_are_perfect():
    labels = np.repeat(np.arange(3), 10)
    scores = clustering_scores((labels + 1) % 3, labels)
    assert scores.hungarian_accuracy == 1.0
    assert scores.majority_accuracy is None
    assert scores.nmi == pytest.approx(1.0)
    assert scores.ari == pytest.approx(1.0)


def test_clustering_scores_report_majority_when_categories_outnumber_classes():
    labels = np.repeat(np.arange(2), 10)
    categories = labels * 2 + np.tile([0, 1], 10)  # each class split into two categories
    scores = clustering_scores(categories, labels)
    assert scores.majority_accuracy == 1.0
    assert scores.hungarian_accuracy == pytest.approx(0.5)


def test_factor_nmi_of_a_split_by_a_second_factor():
    # Four categories = 2·shape + scale: each is one (shape, scale) pair, so I(c; shape) = I(c; scale) = ln 2 and
    # H(c) = ln 4, giving NMI = ln 2 / ((ln 2 + ln 4) / 2) = 2/3 with each; the constant factor has none.
    shape, scale = np.repeat([0, 1], 20), np.tile(np.repeat([0, 1], 10), 2)
    factor_classes = np.stack([shape, scale, np.zeros(40, dtype=int)], axis=1)
    nmi = factor_nmi(2 * shape + scale, factor_classes)
    assert nmi[0] == pytest.approx(2 / 3) and nmi[1] == pytest.approx(2 / 3) and nmi[2] is None
    assert factor_nmi(1 - shape, factor_classes)[:2] == pytest.approx((1.0, 0.0), abs=1e-12)


# Disentanglement: the known cases of disentanglement_lib's unit tests


def test_mig_of_ground_truth_factors_is_high():
    factors = sample_factor_classes(3000, [4, 7, 10], seed=0)
    result = mutual_information_gap(factors.astype(np.float64), factors)
    assert 0.9 <= result.mig <= 1.0
    assert len(result.per_factor) == 3


def test_mig_of_constant_representation_is_low():
    factors = sample_factor_classes(3000, [4, 7, 10], seed=1)
    result = mutual_information_gap(np.zeros((3000, 3)), factors)
    assert 0.0 <= result.mig <= 0.2


def test_mig_of_duplicated_latent_space_is_low():
    factors = sample_factor_classes(3000, [4, 7, 10], seed=2)
    duplicated = np.hstack([factors, factors]).astype(np.float64)
    assert 0.0 <= mutual_information_gap(duplicated, factors).mig <= 0.1


def test_mig_matches_hand_computation_and_skips_constant_factor():
    factors = sample_factor_classes(2000, [5, 3], seed=3)
    factors = np.hstack([factors, np.zeros((2000, 1), dtype=np.int64)])
    merged = factors[:, 0] >= 3
    # Dim 0 is factor 0; dim 1 merges its values into two groups. Both bin one value per bin.
    representation = np.stack([factors[:, 0], merged], axis=1).astype(np.float64)
    result = mutual_information_gap(representation, factors, num_bins=5)

    def normalized_gap(factor: np.ndarray) -> float:
        top, second = sorted([mutual_info_score(factor, factors[:, 0]), mutual_info_score(factor, merged)],
                             reverse=True)
        return (top - second) / mutual_info_score(factor, factor)

    assert result.per_factor[0] == pytest.approx(normalized_gap(factors[:, 0]))
    assert result.per_factor[1] == pytest.approx(normalized_gap(factors[:, 1]))
    assert result.per_factor[2] is None
    assert result.mig == pytest.approx((result.per_factor[0] + result.per_factor[1]) / 2)


def test_factorvae_score_of_ground_truth_factors_is_one():
    factors = sample_factor_classes(5000, [4, 7, 10], seed=4)
    result = factorvae_score(factors.astype(np.float64), factors, np.random.default_rng(0))
    assert result.train_accuracy == 1.0
    assert result.eval_accuracy == 1.0
    assert result.num_active_dims == 3


def test_factorvae_score_ignores_collapsed_dims_and_constant_factors():
    factors = sample_factor_classes(5000, [4, 7], seed=5)
    factors = np.hstack([factors, np.full((5000, 1), 2)])
    noise = np.random.default_rng(6).normal(scale=0.001, size=(5000, 1))
    representation = np.hstack([noise, factors[:, :2].astype(np.float64)])
    result = factorvae_score(representation, factors, np.random.default_rng(0))
    assert result.num_active_dims == 2
    assert result.eval_accuracy == 1.0


def test_factorvae_score_of_collapsed_representation_is_zero():
    factors = sample_factor_classes(1000, [4, 7], seed=7)
    result = factorvae_score(np.zeros((1000, 3)), factors, np.random.default_rng(0))
    assert (result.train_accuracy, result.eval_accuracy, result.num_active_dims) == (0.0, 0.0, 0)


def test_factorvae_score_is_seeded():
    factors = sample_factor_classes(2000, [4, 7], seed=8)
    representation = factors + np.random.default_rng(9).normal(scale=2.0, size=factors.shape)
    first = factorvae_score(representation, factors, np.random.default_rng(1))
    second = factorvae_score(representation, factors, np.random.default_rng(1))
    assert first == second


def test_dci_of_ground_truth_factors_is_high():
    factors = sample_factor_classes(300, [3, 4, 3], seed=10)
    result = dci(factors.astype(np.float64), factors, np.random.default_rng(0))
    assert result.disentanglement > 0.9
    assert result.completeness > 0.9
    assert result.informativeness_train == 1.0
    assert result.informativeness_test == 1.0


# Probes


def test_linear_probe_separates_linearly_separable_histograms():
    rng = np.random.default_rng(11)
    num_codes = 8
    labels = rng.integers(2, size=200)
    # Class 0 uses codes 0-3, class 1 uses codes 4-7.
    codes = rng.integers(4, size=(200, 4, 4)) + 4 * labels[:, None, None]
    histograms = bag_of_codes(codes, num_codes)
    accuracy = linear_probe_accuracy(histograms[:150], labels[:150], histograms[150:], labels[150:], seed=0)
    assert accuracy == 1.0


def test_bag_of_codes_matches_hand_count():
    codes = np.array([[[0, 1], [1, 3]],
                      [[2, 2], [2, 2]]])
    histograms = bag_of_codes(codes, num_codes=4)
    assert histograms.dtype == np.float32
    np.testing.assert_array_equal(histograms, [[0.25, 0.5, 0.0, 0.25], [0.0, 0.0, 1.0, 0.0]])
    np.testing.assert_allclose(histograms.sum(axis=1), 1.0)


def test_bag_of_codes_rejects_codes_out_of_range():
    with pytest.raises(ValueError):
        bag_of_codes(np.array([[[0, 4]]]), num_codes=4)


# Samples against the true images

def test_sample_truth_scores_by_hand():
    """4 samples: two sprites (IoU ≥ 0.9), one blob, one blank; drawn for shapes 0, 1, 1, 2."""
    iou = np.array([1.0, 0.95, 0.5, 0.0])
    nearest = np.array([[0, 2, 7], [1, 2, 8], [1, 0, 0], [0, 0, 0]])
    scores = sample_truth_scores(iou, nearest, ("shape", "scale", "pos"), (3, 4, 10), 0.9,
                                 asked=np.array([0, 1, 1, 2]))
    assert scores["sprites"] == 0.5 and scores["mean_iou"] == pytest.approx(0.6125)
    assert scores["asked_class"] == 0.75  # the blob's nearest has its shape; the blank has none
    assert scores["coverage"] == {"shape": 2 / 3, "scale": 1 / 4, "pos": 2 / 10}  # of the two sprites
    assert scores["uniform"]["shape"] == pytest.approx(1 - (2 / 3) ** 2)
    assert scores["uniform"]["pos"] == pytest.approx(1 - 0.9 ** 2)
    assert "asked_class" not in sample_truth_scores(iou, nearest, ("shape", "scale", "pos"), (3, 4, 10), 0.9)

