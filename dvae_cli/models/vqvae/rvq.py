"""Residual vector quantization (Zeghidour et al., SoundStream, 2021, Algorithm 1): D vector quantizers in sequence,
each quantizing what the stages before it left, z_q = Σ_s e_s with e_s = Q_s(z_e − Σ_{t<s} e_t). A code-map position
holds D codes, and its first d stages alone are a coarser code at d/D of the bits: one model, D rates.

Each stage is a `VectorQuantizer` with its own codebook, EMA update, k-means initialisation (on its own residuals)
and dead-code restarts, so everything that keeps one codebook alive, and equal under torch.distributed, holds per
stage.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dvae_cli.models.vqvae.quantizer import QuantizerOutput, VectorQuantizer


class ResidualVectorQuantizer(nn.Module):
    """`depth` VectorQuantizers of `num_codes` × `code_dim` on the residuals; codes [N, depth, *spatial]."""

    def __init__(self, depth: int, num_codes: int, code_dim: int, **stage_options) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth, self.num_codes, self.code_dim = depth, num_codes, code_dim
        self.stages = nn.ModuleList(VectorQuantizer(num_codes, code_dim, **stage_options) for _ in range(depth))
        self.dead_code_threshold = self.stages[0].dead_code_threshold

    @property
    def codebook(self) -> Tensor:
        """Every stage's codebook [depth, K, D]."""
        return torch.stack([stage.codebook for stage in self.stages])

    @property
    def cluster_size(self) -> Tensor:
        """Every stage's EMA usage, stage after stage [depth · K] (the trainer's codebook-health log reads it)."""
        return torch.cat([stage.cluster_size for stage in self.stages])

    @property
    def restart_count(self) -> Tensor:
        return sum((stage.restart_count for stage in self.stages), torch.zeros((), dtype=torch.int64))

    def forward(self, z_e: Tensor) -> QuantizerOutput:
        """Quantize z_e [N, D, *spatial] stage by stage; each stage's commitment term pulls z_e towards its own
        residual's code, and the sum of the code vectors passes the gradient straight through to z_e."""
        residual = z_e.float()
        outputs = []
        for stage in self.stages:
            output = stage(residual)
            outputs.append(output)
            residual = residual - output.quantized.detach()
        code_vectors = self._summed([output.quantized.detach() for output in outputs])
        return QuantizerOutput(
            quantized=code_vectors.to(z_e.dtype) + (z_e - z_e.detach()),
            indices=torch.stack([output.indices for output in outputs], dim=1),
            commitment_loss=sum(output.commitment_loss for output in outputs),
            codebook_loss=sum(output.codebook_loss for output in outputs),
            perplexity=torch.stack([output.perplexity for output in outputs]).mean(),
            usage=torch.cat([output.usage for output in outputs]),
        )

    @torch.no_grad()
    def codes(self, z_e: Tensor) -> Tensor:
        """Each stage's nearest code of every position of z_e [N, D, *spatial] → int64 [N, depth, *spatial]."""
        residual = z_e.float()
        indices = []
        for stage in self.stages:
            indices.append(stage.codes(residual))
            residual = residual - stage.lookup(indices[-1])
        return torch.stack(indices, dim=1)

    def lookup(self, indices: Tensor) -> Tensor:
        """The summed code vectors of the first d ≤ depth stages, indices [N, d, *spatial] → [N, D, *spatial]."""
        if indices.dim() < 2 or not 1 <= indices.shape[1] <= self.depth:
            raise ValueError(f"expected codes [N, 1…{self.depth}, ...], got shape {tuple(indices.shape)}")
        return self._summed([stage.lookup(indices[:, s]) for s, stage in enumerate(self.stages[:indices.shape[1]])])

    @staticmethod
    def _summed(code_vectors: list[Tensor]) -> Tensor:
        """Σ_s e_s in stage order (the one sum both the training path and `lookup` take, so they agree bit for bit)."""
        return sum(code_vectors[1:], code_vectors[0])
