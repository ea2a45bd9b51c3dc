"""Finite scalar quantization (Mentzer et al., 2023): each of the d channels of the encoder output is bounded and
rounded to one of L_i levels, so the codes are the points of a fixed grid, K = Π L_i of them, numbered in mixed radix.
No codebook is learned, so none can collapse, and there is no commitment or codebook loss: the gradient passes the
rounding straight through (eq. 1 of the paper: ẑ = round(f(z)), f(z) = ⌊L/2⌋ tanh(z)).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dvae_cli.models.vqvae.quantizer import QuantizerOutput

_EPSILON = 1e-3
"""Widens the bound slightly so that tanh's open interval still reaches the outermost levels."""


class FiniteScalarQuantizer(nn.Module):
    """Bound, round, and number the grid point of every position of z_e [N, d, *spatial], d = len(levels)."""

    dead_code_threshold = 0.0
    """No code is ever re-seeded (the trainer's codebook-health log reads it)."""
    restart_count = 0

    def __init__(self, levels: list[int]) -> None:
        super().__init__()
        self.levels = tuple(levels)
        self.num_codes = math.prod(self.levels)
        self.code_dim = len(self.levels)
        level_counts = torch.tensor(self.levels, dtype=torch.float32)
        # Mixed radix: code = Σ_i digit_i · Π_{j<i} L_j, digit_i ∈ {0, …, L_i − 1}.
        basis = torch.cumprod(torch.tensor((1, *self.levels[:-1]), dtype=torch.int64), dim=0)
        self.register_buffer("level_counts", level_counts, persistent=False)
        self.register_buffer("half_width", torch.div(level_counts, 2, rounding_mode="floor"), persistent=False)
        self.register_buffer("basis", basis, persistent=False)

    def extra_repr(self) -> str:
        return f"levels={list(self.levels)}, num_codes={self.num_codes}"

    def bound(self, z: Tensor) -> Tensor:
        """Each channel squashed into an interval that rounds to exactly L_i integers: {−⌊L/2⌋, …, ⌈L/2⌉ − 1}
        (an even L is shifted by half a level, as the paper's reference code does)."""
        shape = (1, -1, *([1] * (z.dim() - 2)))
        levels = self.level_counts.view(shape)
        half_range = (levels - 1) * (1 + _EPSILON) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_range)
        return torch.tanh(z + shift) * half_range - offset

    def quantized_digits(self, z: Tensor) -> Tensor:
        """round(bound(z)) with the straight-through gradient: integers {−⌊L/2⌋, …} in float."""
        bounded = self.bound(z)
        return bounded + (torch.round(bounded) - bounded).detach()

    def forward(self, z_e: Tensor) -> QuantizerOutput:
        self._check_input(z_e)
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            digits = self.quantized_digits(z_e.float())
            indices = self._indices(digits.detach())
        usage = torch.bincount(indices.reshape(-1), minlength=self.num_codes)
        perplexity = torch.exp(torch.special.entr(usage.float() / indices.numel()).sum())
        zero = z_e.new_zeros((), dtype=torch.float32)
        return QuantizerOutput(quantized=self._scaled(digits).to(z_e.dtype), indices=indices, commitment_loss=zero,
                               codebook_loss=zero, perplexity=perplexity, usage=usage)

    @torch.no_grad()
    def codes(self, z_e: Tensor) -> Tensor:
        """The grid point of every position of z_e [N, d, *spatial] → int64 [N, *spatial]."""
        self._check_input(z_e)
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            return self._indices(self.quantized_digits(z_e.float()))

    def lookup(self, indices: Tensor) -> Tensor:
        """The code vectors of indices [N, *spatial] → [N, d, *spatial], each channel in [−1, 1]."""
        dims = indices.dim() + 1
        digits = torch.div(indices.long().unsqueeze(1), self._per_channel(self.basis, dims),
                           rounding_mode="floor") % self._per_channel(self.level_counts.long(), dims)
        return self._scaled(digits.float() - self._per_channel(self.half_width, dims))

    @property
    def codebook(self) -> Tensor:
        """The implicit codebook [K, d]: every grid point's code vector, in index order."""
        return self.lookup(torch.arange(self.num_codes, device=self.basis.device)[:, None]).squeeze(-1)

    def _scaled(self, digits: Tensor) -> Tensor:
        """Integer digits → the code vector in [−1, 1] the decoder takes."""
        return digits / self._per_channel(self.half_width, digits.dim())

    def _indices(self, digits: Tensor) -> Tensor:
        shifted = (digits + self._per_channel(self.half_width, digits.dim())).round().long()
        return (shifted * self._per_channel(self.basis, digits.dim())).sum(1)

    @staticmethod
    def _per_channel(values: Tensor, dims: int) -> Tensor:
        return values.view(1, -1, *([1] * (dims - 2)))

    def _check_input(self, z_e: Tensor) -> None:
        if z_e.dim() < 2 or z_e.shape[1] != self.code_dim:
            raise ValueError(f"expected encoder output [N, {self.code_dim}, ...], got shape {tuple(z_e.shape)}")
