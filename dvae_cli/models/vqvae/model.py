"""VQ-VAE (van den Oord et al., 2017): the paper's CIFAR-10 model, generalised to any power-of-two downsampling.

Layer layout and loss normalisation follow DeepMind sonnet's VQ-VAE example, so normalised MSE figures
compare with the reference: the Gaussian reconstruction term is the pixel MSE divided by the variance of
the train split's pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvae_cli.core.errors import UserError
from dvae_cli.models.base import DataShape, DiscreteVAE, LossOutput
from dvae_cli.models.vqvae.config import VQVAEConfig
from dvae_cli.models.vqvae.fsq import FiniteScalarQuantizer
from dvae_cli.models.vqvae.quantizer import VectorQuantizer
from dvae_cli.models.vqvae.rvq import ResidualVectorQuantizer

# Both the training path and `decode_codes` hand the decoder this layout, so convolutions pick the same
# kernels and evaluation-mode reconstructions match decode_codes(codes(x)) bit for bit.
DECODER_INPUT_FORMAT = torch.channels_last


class ResidualBlock(nn.Module):
    """x + Conv1x1(ReLU(Conv3x3(ReLU(x)))), as in the paper's residual stack."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv3x3 = nn.Conv2d(width, width, kernel_size=3, padding=1)
        self.conv1x1 = nn.Conv2d(width, width, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv1x1(F.relu(self.conv3x3(F.relu(x))))


def _residual_stack(width: int, blocks: int) -> list[nn.Module]:
    return [*(ResidualBlock(width) for _ in range(blocks)), nn.ReLU()]


def _stage_widths(channels: int, hidden: int, stages: int) -> list[int]:
    """Channels from image to trunk: the first strided stage goes to hidden // 2 when there are several."""
    widths = [hidden] * stages
    if stages > 1:
        widths[0] = max(1, hidden // 2)
    return [channels, *widths]


def build_encoder(channels: int, config: VQVAEConfig) -> nn.Sequential:
    stages = config.downsample.bit_length() - 1
    widths = _stage_widths(channels, config.hidden, stages)
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Conv2d(width_in, width_out, kernel_size=4, stride=2, padding=1), nn.ReLU()]
    layers.append(nn.Conv2d(config.hidden, config.hidden, kernel_size=3, padding=1))
    layers += _residual_stack(config.hidden, config.res_blocks)
    layers.append(nn.Conv2d(config.hidden, config.vector_dim, kernel_size=1))
    return nn.Sequential(*layers)


def build_decoder(channels: int, config: VQVAEConfig) -> nn.Sequential:
    """The encoder mirrored; the last transposed convolution outputs raw pixels or logits."""
    stages = config.downsample.bit_length() - 1
    widths = _stage_widths(channels, config.hidden, stages)[::-1]
    layers: list[nn.Module] = [nn.Conv2d(config.vector_dim, config.hidden, kernel_size=3, padding=1)]
    layers += _residual_stack(config.hidden, config.res_blocks)
    for stage, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
        if stage > 0:
            layers.append(nn.ReLU())
        layers.append(nn.ConvTranspose2d(width_in, width_out, kernel_size=4, stride=2, padding=1))
    return nn.Sequential(*layers)


def _check_shapes(config: VQVAEConfig, data: DataShape) -> None:
    size, factor = data.image_size, config.downsample
    if size // factor < 1 or size % factor:
        raise UserError(
            f"vqvae.downsample is {factor} but images are {size}×{size} pixels; the image side must be a multiple "
            f"of downsample (code map at least 1×1): lower vqvae.downsample or change data.image_size"
        )
    if config.likelihood == "gaussian" and not data.pixel_variance > 0:
        raise UserError(
            f"the train split's pixel variance is {data.pixel_variance}, so the gaussian loss (MSE / variance) "
            f"is undefined; use vqvae.likelihood: bernoulli or data whose pixels vary"
        )


def build_quantizer(config: VQVAEConfig) -> VectorQuantizer | FiniteScalarQuantizer | ResidualVectorQuantizer:
    if config.quantizer == "fsq":
        return FiniteScalarQuantizer(config.fsq_levels)
    options = dict(beta=config.beta, update=config.codebook_update, ema_decay=config.ema_decay, init=config.init,
                   dead_code_threshold=config.dead_code_threshold)
    if config.quantizer == "rvq":
        return ResidualVectorQuantizer(config.rvq_depth, config.num_codes, config.code_dim, **options)
    return VectorQuantizer(config.num_codes, config.code_dim, **options)


class VQVAE(DiscreteVAE):
    pixel_variance: Tensor  # float32 scalar: variance of the train split's pixels, the MSE's normaliser

    def __init__(self, config: VQVAEConfig, data: DataShape) -> None:
        super().__init__()
        _check_shapes(config, data)
        self.config = config
        self.data = data
        self.encoder = build_encoder(data.channels, config)
        self.quantizer = build_quantizer(config)
        self.decoder = build_decoder(data.channels, config)
        self.register_buffer("pixel_variance", torch.tensor(data.pixel_variance, dtype=torch.float32))

    def loss(self, x: Tensor, step: int) -> LossOutput:
        """Paper eq. 3: reconstruction + ‖sg[z_e] − e‖² + β‖z_e − sg[e]‖² (the codebook term is 0 under EMA)."""
        quantized = self.quantizer(self.encoder(x))
        output = self.decoder(quantized.quantized.contiguous(memory_format=DECODER_INPUT_FORMAT)).float()
        target = x.float()
        if self.config.likelihood == "gaussian":
            recon = (output - target).pow(2).mean() / self.pixel_variance
        else:
            recon = F.binary_cross_entropy_with_logits(output, target)
        total = recon + quantized.codebook_loss + quantized.commitment_loss
        terms = {
            "recon": recon,
            "codebook": quantized.codebook_loss,
            "commitment": quantized.commitment_loss,
            "perplexity": quantized.perplexity,
        }
        return LossOutput(
            loss=total,
            terms={name: term.detach() for name, term in terms.items()},
            reconstruction=self._to_image(output),
            counts={"code_usage": quantized.usage},
        )

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        """Nearest-code index of every code-map position: images [N, C, H, W] -> int64 [N, h, w] (rvq: [N, depth, h, w],
        each stage's code)."""
        return self.quantizer.codes(self.encoder(x))

    @torch.no_grad()
    def decode_codes(self, indices: Tensor) -> Tensor:
        """Images in [0, 1] from code maps [N, h, w] (any integer dtype; rvq: [N, d, h, w], the first d ≤ depth
        stages)."""
        code_vectors = self.quantizer.lookup(indices.to(self.quantizer.codebook.device))
        output = self.decoder(code_vectors.contiguous(memory_format=DECODER_INPUT_FORMAT))
        return self._to_image(output.float())

    def codebook(self) -> Tensor:
        """A float32 copy of the codebook [K, D] (rvq: [depth, K, D])."""
        return self.quantizer.codebook.detach().to(torch.float32, copy=True)

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        return {"codes": self.codes(x)}

    def decode(self, latent: dict[str, Tensor]) -> Tensor:
        return self.decode_codes(latent["codes"])

    def decode_inputs(self) -> tuple[str, ...]:
        return ("codes",)

    def epoch_logs(self, counts: dict[str, Tensor]) -> dict[str, float]:
        """Codebook health: share of codes used this epoch, codes currently dead, restarts so far.

        With restarts off (threshold 0) no EMA usage is below the threshold, so codes unused this epoch
        count as dead instead.
        """
        usage = counts["code_usage"]
        threshold = self.quantizer.dead_code_threshold
        if threshold > 0:
            dead = int((self.quantizer.cluster_size < threshold).sum())
        else:
            dead = int((usage == 0).sum())
        return {
            "codes_used_fraction": float((usage > 0).float().mean()),
            "dead_codes": float(dead),
            "restarts": float(self.quantizer.restart_count),
        }

    def latent_attributes(self) -> dict[str, object]:
        side = self.data.image_size // self.config.downsample
        depth = [self.config.rvq_depth] if self.config.quantizer == "rvq" else []
        attributes = {"latent_shape": [*depth, side, side], "num_codes": self.config.codebook_size,
                      "code_dim": self.config.vector_dim}
        # VQ codes files keep the attributes they have always had.
        if self.config.quantizer == "fsq":
            attributes |= {"quantizer": "fsq", "fsq_levels": list(self.config.fsq_levels)}
        if self.config.quantizer == "rvq":
            attributes |= {"quantizer": "rvq", "rvq_depth": self.config.rvq_depth}
        return attributes

    def code_value_counts(self) -> dict[str, int | tuple[int, ...]]:
        return {"codes": self.config.codebook_size}

    def extra_arrays(self) -> dict[str, Tensor]:
        return {"codebook": self.codebook()}

    def _to_image(self, output: Tensor) -> Tensor:
        if self.config.likelihood == "gaussian":
            return output.clamp(0.0, 1.0)
        return torch.sigmoid(output)
