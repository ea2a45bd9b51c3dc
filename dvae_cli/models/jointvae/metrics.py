"""JointVAE's evaluation sections: KL terms, negative ELBO, discrete variables against labels and factors, factor
metrics."""

from __future__ import annotations

import math

import numpy as np
import torch

from dvae_cli.models.jointvae.model import (
    JointVAEConfig,
    categorical_decomposition,
    continuous_decomposition,
    gaussian_log_density,
    kl_normal,
    total_correlation,
)
from dvae_cli.scoring.evaluation import (
    Evaluation,
    ReconstructionTotals,
    Sections,
    cluster_section,
    factor_metrics,
    seeded_generators,
)
from dvae_cli.scoring.metrics import factor_nmi

ACTIVE_KL_THRESHOLD = 0.01
"""A continuous dimension whose KL (nats, averaged over images) exceeds this counts as active."""
Z_SAMPLE_ROWS = 1024
"""I(x; z), KL(q(z) ‖ p(z)) and TC(z) are estimated on a seeded sample of at most this many rows (an M × M product;
the I(x; z) estimate is at most log M = 6.9 nats)."""


def continuous_section(mean: np.ndarray, logvar: np.ndarray, seed: int) -> dict[str, float]:
    """KL_z of a seeded sample of rows split into I(x; z) + KL(q(z) ‖ p(z)), q(z) the sample's mixture, and its TC(z)
    (the β-TCVAE estimate), at one draw of each q(z|x)."""
    rng = seeded_generators(seed, 4)[3]  # children 0–2 draw the factor metrics' samples
    rows = np.sort(rng.choice(len(mean), size=min(len(mean), Z_SAMPLE_ROWS), replace=False))
    mean_t, logvar_t = torch.from_numpy(mean[rows]).double(), torch.from_numpy(logvar[rows]).double()
    z = mean_t + torch.exp(0.5 * logvar_t) * torch.from_numpy(rng.standard_normal(mean_t.shape))
    kl, information, marginal = continuous_decomposition(z, mean_t, logvar_t)
    return {"sample_rows": len(rows), "kl_z": kl.item(), "mutual_information_z": information.item(),
            "marginal_kl_z": marginal.item(),
            "total_correlation_z": total_correlation(gaussian_log_density(z, mean_t, logvar_t)).item()}


def gaussian_nll_per_image(totals: ReconstructionTotals) -> float:
    """−log N(x; x̂, ½ I) per image in nats: the SSE JointVAE's gaussian likelihood trains on, plus (D/2) log π."""
    return totals.squared_error / totals.images + 0.5 * totals.pixels_per_image * math.log(math.pi)


def factor_representation(continuous_mean: np.ndarray, discrete: np.ndarray) -> np.ndarray:
    """JointVAE's representation for factor metrics: [N, d] continuous means, then one column per discrete argmax."""
    return np.hstack([continuous_mean.astype(np.float64), discrete.astype(np.float64)])


def jointvae_metrics(run: Evaluation) -> Sections:
    """KL terms (KL_c also split into I(x; c) and KL(q(c) ‖ p(c)), KL_z of a sample into I(x; z) and KL(q(z) ‖ p(z))
    beside its TC(z): `continuous_section`), negative ELBO, clustering of each discrete
    variable against the labels, its NMI with each factor ("discrete_factors"), factor metrics.

    The negative ELBO is evaluated at the posterior mean and the most likely categories (the evaluation-mode
    reconstruction), under the model's likelihood: Bernoulli NLL of the clamped decoder probabilities, or
    `gaussian_nll_per_image`; KL_z + KL_c are exact. Nats per image; bits per dimension = nats / (C·H·W·ln 2).
    """
    config: JointVAEConfig = run.config
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
        decompositions = [[term.item() for term in categorical_decomposition(torch.from_numpy(p).double())]
                          for p in split_probs]
    kl_per_variable = [kl for kl, _, _ in decompositions]
    kl_z, kl_c = float(kl_per_dim.sum()), float(sum(kl_per_variable))
    recon_nll = (totals.bernoulli_nll / totals.images if config.likelihood == "bernoulli"
                 else gaussian_nll_per_image(totals))
    negative_elbo = recon_nll + kl_z + kl_c
    sections: Sections = {
        "latent": {"kl_z": kl_z, "kl_c": kl_c,
                   "kl_z_per_dim": {str(i): float(kl) for i, kl in enumerate(kl_per_dim)},
                   "kl_c_per_variable": {str(j): kl for j, kl in enumerate(kl_per_variable)},
                   # KL_c = I(x; c) + KL(q(c) ‖ p(c)), q(c) the split's mean of q(c|x): a KL_c of a code that
                   # carries nothing about x is all marginal.
                   "mutual_information_c": sum(information for _, information, _ in decompositions),
                   "marginal_kl_c": sum(marginal for _, _, marginal in decompositions),
                   "mutual_information_c_per_variable": {str(j): information
                                                         for j, (_, information, _) in enumerate(decompositions)},
                   "active_dims": int((kl_per_dim > ACTIVE_KL_THRESHOLD).sum()),
                   **({"z_sample": continuous_section(mean, logvar, run.seed)} if mean.shape[1] and len(mean) else {})},
        "elbo": {"negative_elbo": negative_elbo, "reconstruction_nll": recon_nll,
                 "bits_per_dim": negative_elbo / (totals.pixels_per_image * math.log(2))},
    }
    labels = run.read("labels")
    if labels is not None and discrete.shape[1]:
        with run.timed("labels"):
            sections["labels"] = {f"discrete_{j}": cluster_section(discrete[:, j], labels, categories,
                                                                    run.num_classes)
                                  for j, categories in enumerate(config.discrete)}
    factor_classes = run.read("factor_classes")
    if factor_classes is not None:
        with run.timed("labels"):
            sections["discrete_factors"] = {
                f"discrete_{j}": {name: nmi for name, nmi in zip(run.factor_names,
                                                                 factor_nmi(discrete[:, j], factor_classes))
                                  if nmi is not None}
                for j in range(discrete.shape[1])}
        sections.update(factor_metrics(run, factor_representation(mean, discrete), factor_classes))
    return sections
