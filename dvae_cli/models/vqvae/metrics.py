"""VQ-VAE's evaluation sections: code usage, bits per code map, a bag-of-codes linear probe against labels."""

from __future__ import annotations

import math

import numpy as np

from dvae_cli.core.splits import TRAIN
from dvae_cli.models.vqvae.config import VQVAEConfig
from dvae_cli.scoring.evaluation import Evaluation, Sections, seeded_generators
from dvae_cli.scoring.metrics import (
    bag_of_codes,
    code_counts,
    code_usage,
    linear_probe_accuracy,
)

PROBE_MAX_TRAIN_ROWS = 10000
"""The VQ-VAE linear probe is fit on a seeded sample of at most this many train-split code maps."""


def vqvae_metrics(run: Evaluation) -> Sections:
    """Code usage over the split, bits per code map under a uniform prior, and a bag-of-codes linear probe."""
    config: VQVAEConfig = run.config
    codes = run.read("codes")
    assert codes is not None
    with run.timed("code usage"):
        usage = code_usage(code_counts(codes, config.codebook_size))
    sections: Sections = {"codes": {
        "perplexity": usage.perplexity, "fraction_used": usage.fraction_used, "unused": usage.unused,
        "bits_per_image": codes[0].size * math.log2(config.codebook_size)}}
    labels = run.read("labels")
    if labels is not None:
        with run.timed("linear probe"):
            probe = _linear_probe(run, codes, labels, config.codebook_size)
        if probe:
            sections["labels"] = probe
    return sections


def _linear_probe(run: Evaluation, codes: np.ndarray, labels: np.ndarray, num_codes: int) -> Sections:
    """Logistic regression on bag-of-codes histograms: fit on sampled train-split rows, scored on the split."""
    train_rows = np.flatnonzero(run.source.split == TRAIN)
    rng = seeded_generators(run.seed, 1)[0]
    if len(train_rows) > PROBE_MAX_TRAIN_ROWS:
        train_rows = np.sort(rng.choice(train_rows, size=PROBE_MAX_TRAIN_ROWS, replace=False))
    train_labels = run.read("labels", train_rows)
    train_codes = run.read("codes", train_rows)
    assert train_labels is not None and train_codes is not None
    if len(np.unique(train_labels)) < 2:
        run.notes.append("linear probe skipped: the train split has fewer than 2 classes")
        return {}
    accuracy = linear_probe_accuracy(bag_of_codes(train_codes, num_codes), train_labels,
                                     bag_of_codes(codes, num_codes), labels, seed=run.seed)
    return {"linear_probe_accuracy": accuracy, "probe_train_images": len(train_rows)}
