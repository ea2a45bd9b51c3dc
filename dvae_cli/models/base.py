"""The interface every model family shares, so no stage branches on the family."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from dvae_cli.core.schema import param


@dataclass(frozen=True)
class DataShape:
    """What a model needs to know about its data: image shape and the pixel variance of the train split."""

    channels: Literal[1, 3] = param(help="1 (grayscale) or 3 (RGB)")
    image_size: int = param(help="square image side in pixels", ge=4, le=1024)
    pixel_variance: float = param(1.0, help="pixel variance of the train split, on [0, 1]", ge=0)


@dataclass
class LossOutput:
    loss: Tensor
    """The scalar to minimise."""
    terms: dict[str, Tensor]
    """Named scalar terms for logging (recon, kl_z, commitment, ...)."""
    reconstruction: Tensor | None = None
    """The reconstruction in [0, 1] of a model of images (for the MSE the trainer logs)."""
    counts: dict[str, Tensor] = field(default_factory=dict)
    """Per-batch counts the trainer sums over an epoch and hands to `epoch_logs` (e.g. code usage)."""


class Trainable(nn.Module):
    """What the shared training loop (`dvae_cli.trainer`) trains: a loss of a batch at a step."""

    def __init__(self) -> None:
        super().__init__()
        self.rank_rows: tuple[int, int] | None = None

    def set_rank_rows(self, offset: int, global_batch: int) -> None:
        """This process's rows are [offset, offset + local batch) of a global batch of `global_batch` rows."""
        self.rank_rows = (offset, global_batch)

    def batch_noise(self, like: Tensor, uniform: bool = False) -> Tensor:
        """N(0, 1) (or U[0, 1)) noise shaped like `like` [local batch, ...].

        Drawn for the whole global batch and sliced to this process's rows, so data-parallel training
        samples exactly what one process with the global batch samples.
        """
        offset, size = self.rank_rows if self.rank_rows is not None else (0, like.shape[0])
        draw = torch.rand if uniform else torch.randn
        noise = draw((size, *like.shape[1:]), device=like.device, dtype=like.dtype)
        return noise[offset:offset + like.shape[0]]

    def forward(self, x: Tensor, step: int) -> LossOutput:
        """The loss, as forward so that DistributedDataParallel synchronises its gradients."""
        return self.loss(x, step)

    def loss(self, x: Tensor, step: int) -> LossOutput:
        """The training objective at optimisation step `step` (training mode samples, eval mode is deterministic)."""
        raise NotImplementedError

    def epoch_logs(self, counts: dict[str, Tensor]) -> dict[str, float]:
        """Figures logged once per epoch from the summed per-batch `counts`."""
        return {}


class DiscreteVAE(Trainable):
    """Base class of the model families. Images are float [N, C, H, W] in [0, 1]."""

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        """Evaluation-mode representation: the arrays the codes file stores, by name."""
        raise NotImplementedError

    def decode(self, latent: dict[str, Tensor]) -> Tensor:
        """Images in [0, 1] from a representation as `encode` returns it (or as the codes file holds it)."""
        raise NotImplementedError

    def decode_inputs(self) -> tuple[str, ...]:
        """The arrays of `encode` that `decode` reads (an exported decoder takes these, in this order)."""
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Evaluation-mode reconstruction in [0, 1]: decode(encode(x))."""
        return self.decode(self.encode(x))

    def sample_images(self, count: int, generator: torch.Generator) -> Tensor | None:
        """`count` images in [0, 1] decoded from draws of the model's own prior (None: it has none, as the VQ-VAE,
        whose prior is a separate model)."""
        return None

    def latent_attributes(self) -> dict[str, object]:
        """What the codes file records about the latent (shape, K and D, or the latent spec)."""
        raise NotImplementedError

    def code_value_counts(self) -> dict[str, int | tuple[int, ...]]:
        """How many values (0 … count − 1) each integer array of `encode` takes: one count, or one per position of
        the array's last axis. The codes file picks its dtype from them; `invalid_latent` checks stored codes."""
        return {}

    def class_warnings(self, num_classes: int) -> list[str]:
        """What is questionable, though valid, in training this model on data of `num_classes` labelled classes."""
        return []

    def extra_arrays(self) -> dict[str, Tensor]:
        """Arrays the codes file stores once beside the per-row ones (VQ-VAE: the codebook)."""
        return {}


def invalid_latent(model: DiscreteVAE, latent: Mapping[str, np.ndarray | Tensor]) -> str | None:
    """The first array of `latent` the model cannot decode, described: integer codes that are no integers or lie
    outside the values the model has, floating values that are not finite; None when all fit."""
    counts = model.code_value_counts()
    for name, values in latent.items():
        values = values.cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
        if not len(values):
            continue
        if name in counts and values.dtype.kind not in "iu":
            return f"`{name}` are {values.dtype}, not integer codes"
        if name in counts:
            limits = np.broadcast_to(np.asarray(counts[name]), values.shape)
            wrong = (values < 0) | (values >= limits)
            if wrong.any():
                where = np.argwhere(wrong)[0]
                return (f"`{name}` holds {values[tuple(where)]} at row {where[0]}, outside the model's "
                        f"0…{limits[tuple(where)] - 1}")
        elif values.dtype.kind == "f" and not np.isfinite(values).all():
            where = np.argwhere(~np.isfinite(values))[0]
            return f"`{name}` holds {values[tuple(where)]} at row {where[0]}, not a finite number"
    return None
