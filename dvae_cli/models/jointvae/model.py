"""JointVAE (Dupont, NeurIPS 2018): a Gaussian latent z and categorical latents c, trained with capacities.

The layers are the reference implementation's (same names and shapes for 32×32 and 64×64 images, so its
saved weights load through `load_reference_state_dict`), generalised to any power-of-two image side ≥ 16.
The decoder outputs logits rather than the reference's probabilities; images are their sigmoid.

Both likelihoods decode through that sigmoid, so images always lie in [0, 1]: bernoulli is the binary
cross-entropy of the logits, gaussian the squared error of sigmoid(logits); each summed over pixels and
averaged over the batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvae_cli.core.errors import UserError
from dvae_cli.models.base import DataShape, DiscreteVAE, LossOutput
from dvae_cli.models.jointvae.config import CapacitySchedule, JointVAEConfig

EPS = 1e-12
"""Keeps logarithms of probabilities and of uniform noise finite."""

HIDDEN_UNITS = 256
FEATURE_CHANNELS = 64
FEATURE_SIDE = 4
"""The encoder halves the image down to a FEATURE_CHANNELS × 4 × 4 map; the decoder doubles back up from it."""
def gumbel_softmax_sample(logits: Tensor, temperature: float, uniform: Tensor | None = None) -> Tensor:
    """Relaxed one-hot samples softmax((log α + g) / τ), g ~ Gumbel(0, 1), over the last dimension.

    `logits` are log α up to a per-row constant, which the softmax ignores. `uniform` is U[0, 1) noise shaped
    like `logits` (drawn from torch's global RNG when not given).
    """
    if uniform is None:
        uniform = torch.rand_like(logits)
    gumbel = -torch.log(-torch.log(uniform + EPS) + EPS)
    return F.softmax((logits + gumbel) / temperature, dim=-1)


def kl_normal(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) = ½(μ² + σ² − 1 − log σ²) per dimension, batch mean: [N, d] -> [d]."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean(0)


def kl_categorical(probs: Tensor) -> Tensor:
    """KL(q ‖ uniform) = log k − H(q) of one discrete variable, averaged over the batch: [N, k] -> scalar."""
    negative_entropy = (probs * torch.log(probs + EPS)).sum(1)
    return math.log(probs.shape[1]) + negative_entropy.mean()


def categorical_decomposition(probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """E_x KL(q(c|x) ‖ u) = I(x; c) + KL(q(c) ‖ u) over a batch [N, k], q(c) the batch mean of q(c|x).

    Returns (KL_c, I(x; c), KL(q(c) ‖ u)), each a scalar; the identity holds exactly for these batch estimates.
    """
    kl = kl_categorical(probs)
    marginal_kl = kl_categorical(probs.mean(0, keepdim=True))
    return kl, kl - marginal_kl, marginal_kl


def gaussian_log_density(z: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """log N(z_id; μ_jd, σ²_jd) for every pair of rows (i, j) of a batch: [M, d] -> [M, M, d]."""
    return -0.5 * (math.log(2 * math.pi) + logvar.unsqueeze(0)
                   + (z.unsqueeze(1) - mean.unsqueeze(0)).pow(2) / logvar.exp().unsqueeze(0))


def categorical_log_density(category: Tensor, logits: Tensor) -> Tensor:
    """Σ_k c_ik log q(k|x_j) for every pair (i, j), c_i one-hot or relaxed: [M, k] -> [M, M, 1]."""
    return (category @ F.log_softmax(logits, dim=1).T).unsqueeze(2)


def continuous_decomposition(z: Tensor, mean: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """E_x KL(q(z|x) ‖ p(z)) = I(x; z) + KL(q(z) ‖ p(z)) over a batch [M, d], q(z) = 1/M Σ_j q(z|x_j) the batch
    mixture, estimated at one sample z_i of each q(z|x_i) (`z`).

    Returns (KL_z, I(x; z), KL(q(z) ‖ p(z))), each a scalar; the estimate of I(x; z) is at most log M.
    """
    log_density = gaussian_log_density(z, mean, logvar).sum(2)
    log_mixture = torch.logsumexp(log_density, dim=1) - math.log(z.shape[0])
    information = (log_density.diagonal() - log_mixture).mean()
    kl = kl_normal(mean, logvar).sum()
    return kl, information, kl - information


def total_correlation(log_density: Tensor) -> Tensor:
    """TC = E_q [log q(l) − Σ_d log q(l_d)] (β-TCVAE, Chen et al. 2018, eq. 2), q(l) = 1/M Σ_j q(l|x_j) the batch.

    `log_density[i, j, d]` is log q(l_id | x_j) of one sample l_i of each q(l|x_i) and each latent dimension d
    (`gaussian_log_density`, `categorical_log_density`); q(l_i) and each q(l_id) are the batch mixtures at that
    sample (the minibatch estimate of the β-TCVAE paper with the batch as the data set). A scalar; 0 for M = 1 or
    one dimension.
    """
    log_batch = math.log(log_density.shape[0])
    log_joint = torch.logsumexp(log_density.sum(2), dim=1) - log_batch
    log_marginals = (torch.logsumexp(log_density, dim=1) - log_batch).sum(1)
    return (log_joint - log_marginals).mean()


def capacity(schedule: CapacitySchedule, step: int, ceiling: float = math.inf) -> float:
    """C at `step`: 0 until schedule.start, then rises linearly to schedule.max over schedule.steps and stays there;
    never above `ceiling`."""
    return min(schedule.max * max(step - schedule.start, 0) / schedule.steps, schedule.max, ceiling)


def _convolution_count(image_size: int) -> int:
    """Stride-2 layers between an image of this side and the 4×4 feature map: log2(size) − 2."""
    if image_size < 16 or image_size & (image_size - 1):
        raise UserError(f"jointvae needs square images whose side is a power of two ≥ 16 (16, 32, 64, 128, ...), "
                        f"got {image_size}×{image_size}; change data.image_size")
    return image_size.bit_length() - 3


def _encoder_widths(channels: int, convolutions: int) -> list[int]:
    """Channels from image to feature map; 64×64: C, 32, 32, 64, 64 as in the reference."""
    return [channels, *[32] * (convolutions - 2), 64, FEATURE_CHANNELS]


def _decoder_widths(channels: int, convolutions: int) -> list[int]:
    """Channels from feature map to image; 64×64: 64, 64, 32, 32, C and 32×32: 64, 32, 32, C as in the reference."""
    if convolutions == 2:
        return [FEATURE_CHANNELS, 32, channels]
    return [FEATURE_CHANNELS, *[64] * (convolutions - 3), 32, 32, channels]


def _build_img_to_features(channels: int, convolutions: int) -> nn.Sequential:
    widths = _encoder_widths(channels, convolutions)
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Conv2d(width_in, width_out, kernel_size=4, stride=2, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


def _build_features_to_img(channels: int, convolutions: int) -> nn.Sequential:
    widths = _decoder_widths(channels, convolutions)
    layers: list[nn.Module] = []
    for layer, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
        if layer > 0:
            layers.append(nn.ReLU())
        layers.append(nn.ConvTranspose2d(width_in, width_out, kernel_size=4, stride=2, padding=1))
    return nn.Sequential(*layers)


@dataclass
class Posterior:
    """The encoder's output in float32: q(z|x) = N(mean, exp(logvar)) and the logits of each q(c_j|x)."""

    mean: Tensor  # [N, d]; [N, 0] without continuous dimensions
    logvar: Tensor  # [N, d]
    logits: list[Tensor]  # one [N, k_j] per discrete variable


class JointVAE(DiscreteVAE):
    def __init__(self, config: JointVAEConfig, data: DataShape) -> None:
        super().__init__()
        convolutions = _convolution_count(data.image_size)
        self.config = config
        self.data = data
        self.continuous = config.continuous
        self.discrete = list(config.discrete)
        # Attribute order is the reference's state_dict order.
        self.img_to_features = _build_img_to_features(data.channels, convolutions)
        self.features_to_hidden = nn.Sequential(
            nn.Linear(FEATURE_CHANNELS * FEATURE_SIDE * FEATURE_SIDE, HIDDEN_UNITS), nn.ReLU())
        self.fc_mean = nn.Linear(HIDDEN_UNITS, self.continuous) if self.continuous else None
        self.fc_log_var = nn.Linear(HIDDEN_UNITS, self.continuous) if self.continuous else None
        self.fc_alphas = nn.ModuleList(nn.Linear(HIDDEN_UNITS, categories) for categories in self.discrete)
        self.latent_to_features = nn.Sequential(
            nn.Linear(self.continuous + sum(self.discrete), HIDDEN_UNITS), nn.ReLU(),
            nn.Linear(HIDDEN_UNITS, FEATURE_CHANNELS * FEATURE_SIDE * FEATURE_SIDE), nn.ReLU())
        self.features_to_img = _build_features_to_img(data.channels, convolutions)

    def loss(self, x: Tensor, step: int) -> LossOutput:
        """Paper eq. 5: −E[log p(x|z,c)] + γ_z |KL(q(z|x) ‖ p(z)) − C_z| + γ_c |KL(q(c|x) ‖ p(c)) − C_c|.

        With `disc_capacity_of: mutual_information` the last term is γ_c |I(x; c) − C_c|; `marginal_gamma` λ adds
        λ KL(q(c) ‖ p(c)). Both are batch estimates (`categorical_decomposition`), summed over discrete variables.
        `tc_beta` β adds β TC(z) (`total_correlation`, the β-TCVAE penalty on the continuous part), or with
        `tc_of: z_and_c` β TC(z, c), each discrete variable one more dimension beside the continuous ones.
        """
        posterior = self._posterior(x)
        if self.training:
            z = posterior.mean + torch.exp(0.5 * posterior.logvar) * self.batch_noise(posterior.mean)
            categories = [gumbel_softmax_sample(logits, self.config.temperature, self.batch_noise(logits, uniform=True))
                          for logits in posterior.logits]
        else:
            z = posterior.mean
            categories = [F.one_hot(logits.argmax(1), logits.shape[1]).float() for logits in posterior.logits]
        image_logits = self._decode_logits(torch.cat([z, *categories], dim=1)).float()
        target = x.float()
        reconstruction = torch.sigmoid(image_logits)
        if self.config.likelihood == "bernoulli":
            recon = F.binary_cross_entropy_with_logits(image_logits, target, reduction="sum") / x.shape[0]
        else:
            recon = (reconstruction - target).pow(2).sum() / x.shape[0]

        kl_z_per_dimension = kl_normal(posterior.mean, posterior.logvar)
        decompositions = [categorical_decomposition(F.softmax(logits, dim=1)) for logits in posterior.logits]
        zero = torch.zeros((), device=x.device)
        kl_c_per_variable = [kl for kl, _, _ in decompositions]
        kl_z = kl_z_per_dimension.sum()
        kl_c = sum(kl_c_per_variable, zero)
        mutual_information_c = sum((information for _, information, _ in decompositions), zero)
        marginal_kl_c = sum((marginal for _, _, marginal in decompositions), zero)
        # A missing part has capacity 0, so it adds nothing to the loss.
        capacity_z = capacity(self.config.cont_capacity, step, math.inf if self.continuous else 0.0)
        capacity_c = capacity(self.config.disc_capacity, step, sum(math.log(k) for k in self.discrete))
        controlled_c = kl_c if self.config.disc_capacity_of == "kl" else mutual_information_c
        total = (recon + self.config.cont_capacity.gamma * (kl_z - capacity_z).abs()
                 + self.config.disc_capacity.gamma * (controlled_c - capacity_c).abs())
        if self.config.marginal_gamma:
            total = total + self.config.marginal_gamma * marginal_kl_c
        tc_terms = {}
        if self.config.tc_beta:
            log_density = [gaussian_log_density(z, posterior.mean, posterior.logvar)]
            if self.config.tc_of == "z_and_c":
                log_density += [categorical_log_density(category, logits)
                                for category, logits in zip(categories, posterior.logits)]
            tc_name = "total_correlation_z" if self.config.tc_of == "z" else "total_correlation_zc"
            tc_terms[tc_name] = total_correlation(torch.cat(log_density, dim=2))
            total = total + self.config.tc_beta * tc_terms[tc_name]

        terms = {
            "recon": recon,
            "kl_z": kl_z,
            "kl_c": kl_c,
            "capacity_z": torch.tensor(capacity_z, device=x.device),
            "capacity_c": torch.tensor(capacity_c, device=x.device),
            **{f"kl_z_{i}": kl for i, kl in enumerate(kl_z_per_dimension)},
            **{f"kl_c_{j}": kl for j, kl in enumerate(kl_c_per_variable)},
            **({"mutual_information_c": mutual_information_c, "marginal_kl_c": marginal_kl_c} if self.discrete else {}),
            **{f"mutual_information_c_{j}": information for j, (_, information, _) in enumerate(decompositions)},
            **{f"marginal_kl_c_{j}": marginal for j, (_, _, marginal) in enumerate(decompositions)},
            **tc_terms,
        }
        return LossOutput(loss=total, terms={name: term.detach() for name, term in terms.items()},
                          reconstruction=reconstruction.detach())

    @torch.no_grad()
    def encode(self, x: Tensor) -> dict[str, Tensor]:
        """Posterior means and log-variances, per-variable category probabilities and their argmax (int64)."""
        posterior = self._posterior(x)
        latent: dict[str, Tensor] = {}
        if self.continuous:
            latent["continuous_mean"] = posterior.mean
            latent["continuous_logvar"] = posterior.logvar
        if self.discrete:
            latent["discrete_probs"] = torch.cat([F.softmax(logits, dim=1) for logits in posterior.logits], dim=1)
            latent["discrete"] = torch.stack([logits.argmax(1) for logits in posterior.logits], dim=1)
        return latent

    def decode(self, latent: dict[str, Tensor]) -> Tensor:
        """Images from the continuous means and the discrete categories (the logvars and probabilities are unused)."""
        for name, needed in (("continuous_mean", self.continuous), ("discrete", self.discrete)):
            if needed and name not in latent:
                raise UserError(f"the latent to decode lacks `{name}`, which this JointVAE needs; "
                                "decode codes written by the same model")
        rows = (latent["continuous_mean"] if self.continuous else latent["discrete"]).shape[0]
        z = latent["continuous_mean"] if self.continuous else torch.zeros(rows, 0)
        categories = latent["discrete"] if self.discrete else torch.zeros(rows, 0, dtype=torch.long)
        return self.decode_latent(z, categories)

    def decode_inputs(self) -> tuple[str, ...]:
        return (("continuous_mean",) if self.continuous else ()) + (("discrete",) if self.discrete else ())

    @torch.no_grad()
    def decode_latent(self, z: Tensor, categories: Tensor) -> Tensor:
        """Images in [0, 1] from continuous values z [N, d] and category indices [N, n_discrete] (any integer dtype).

        Both move to the model's device first.
        """
        device = self._device()
        categories = categories.to(device=device, dtype=torch.long)
        one_hots = [F.one_hot(categories[:, j], k).float() for j, k in enumerate(self.discrete)]
        return torch.sigmoid(self._decode_logits(torch.cat([z.to(device).float(), *one_hots], dim=1)).float())

    @torch.no_grad()
    def sample_prior(self, n: int) -> Tensor:
        """n images decoded from the prior: z ~ N(0, I), categories uniform (torch's global RNG)."""
        device = self._device()
        z = torch.randn(n, self.continuous, device=device)
        columns = [torch.randint(k, (n,), device=device) for k in self.discrete]
        categories = torch.stack(columns, dim=1) if columns else torch.zeros(n, 0, dtype=torch.long, device=device)
        return self.decode_latent(z, categories)

    @torch.no_grad()
    def sample_images(self, count: int, generator: torch.Generator) -> Tensor:
        """Decoded draws of p(z) p(c): z ~ N(0, I), categories uniform, drawn on the CPU from `generator`."""
        z = torch.randn(count, self.continuous, generator=generator)
        columns = [torch.randint(k, (count,), generator=generator) for k in self.discrete]
        categories = torch.stack(columns, dim=1) if columns else torch.zeros(count, 0, dtype=torch.long)
        return self.decode_latent(z, categories)

    def latent_attributes(self) -> dict[str, object]:
        return {"continuous": self.continuous, "discrete": list(self.discrete)}

    def code_value_counts(self) -> dict[str, int | tuple[int, ...]]:
        return {"discrete": tuple(self.discrete)} if self.discrete else {}

    def class_warnings(self, num_classes: int) -> list[str]:
        return [f"jointvae.discrete[{j}] has {categories} categories for {num_classes} classes: the extra categories "
                "split classes, and the Hungarian accuracy counts one category per class"
                for j, categories in enumerate(self.discrete) if num_classes and categories > num_classes]

    def _device(self) -> torch.device:
        return self.features_to_hidden[0].weight.device

    def _posterior(self, x: Tensor) -> Posterior:
        hidden = self.features_to_hidden(self.img_to_features(x).flatten(1))
        if self.fc_mean is not None and self.fc_log_var is not None:
            mean, logvar = self.fc_mean(hidden).float(), self.fc_log_var(hidden).float()
        else:
            mean = logvar = torch.zeros(x.shape[0], 0, device=x.device)
        return Posterior(mean, logvar, [head(hidden).float() for head in self.fc_alphas])

    def _decode_logits(self, latent_sample: Tensor) -> Tensor:
        """Pixel logits from the decoder input: z followed by each discrete variable's (relaxed) one-hot."""
        features = self.latent_to_features(latent_sample).view(-1, FEATURE_CHANNELS, FEATURE_SIDE, FEATURE_SIDE)
        return self.features_to_img(features)


def load_reference_state_dict(model: JointVAE, state_dict: Mapping[str, Tensor]) -> None:
    """Load weights saved by the reference implementation into `model`.

    The parameter names are the reference's, so the mapping is the identity; every name must be present with
    the model's shape. The reference decoder's final sigmoid has no parameters, so its weights carry over as is.
    """
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in state_dict:
            raise UserError(f"reference state dict lacks `{name}`; it was saved for another latent spec or image size")
        if tuple(state_dict[name].shape) != tuple(tensor.shape):
            raise UserError(f"reference state dict `{name}` has shape {tuple(state_dict[name].shape)}, this model "
                            f"needs {tuple(tensor.shape)}; it was saved for another latent spec or image size")
    unexpected = [name for name in state_dict if name not in expected]
    if unexpected:
        raise UserError(f"reference state dict has `{unexpected[0]}`, which this JointVAE does not; "
                        "it was saved for another latent spec or image size")
    model.load_state_dict(dict(state_dict))
