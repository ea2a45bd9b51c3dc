"""Vector quantizer of VQ-VAE (van den Oord et al., 2017) that keeps its codebook from collapsing.

Each encoder output vector is replaced by its nearest codebook vector, with the gradient copied
straight through. The codebook is learned either by the codebook loss or by exponential moving
averages (online k-means, as in DeepMind sonnet's VectorQuantizerEMA). Against collapse: k-means++ /
Lloyd initialisation from the first training batch, and re-seeding of codes whose EMA usage falls
below a threshold.

Everything that decides codes (distances, argmin, EMA statistics, k-means) runs in float32 with
autocast disabled. Under torch.distributed the batch statistics are summed over ranks and every random
choice is made over the global batch and taken from rank 0, so all ranks hold the same codebook, the one
a single process with the global batch would hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvae_cli.core.distributed import (
    all_gather_rows,
    all_reduce_sum,
    broadcast_from_rank0,
    select_global_rows,
    world,
)

CODEBOOK_UPDATES = ("ema", "loss")
CODEBOOK_INITS = ("kmeans", "random")


@dataclass
class QuantizerOutput:
    quantized: Tensor  # z_q with straight-through gradient to z_e; z_e's shape and dtype
    indices: Tensor  # int64 [N, *spatial]
    commitment_loss: Tensor  # beta * mean((z_e - sg[e])^2)
    codebook_loss: Tensor  # mean((sg[z_e] - e)^2) for update "loss"; zero for "ema"
    perplexity: Tensor  # exp(entropy of this batch's code histogram)
    usage: Tensor  # int64 [K]: how often each code was chosen in this batch (this rank)


def _squared_distances(vectors: Tensor, codebook: Tensor) -> Tensor:
    """‖z‖² − 2 z·eᵀ + ‖e‖² for every (vector, code) pair: [M, D] x [K, D] -> [M, K]."""
    norms = vectors.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)
    return torch.addmm(norms, vectors, codebook.t(), alpha=-2.0)


def _nearest(vectors: Tensor, codebook: Tensor) -> Tensor:
    return _squared_distances(vectors, codebook).argmin(1)


def _random_rows(num_rows: int, count: int, device: torch.device) -> Tensor:
    """`count` row indices out of `num_rows`: distinct while they last, then drawn with replacement."""
    distinct = torch.randperm(num_rows, device=device)[:count]
    extra = torch.randint(num_rows, (count - distinct.numel(),), device=device)
    return torch.cat([distinct, extra])


class VectorQuantizer(nn.Module):
    codebook: Tensor  # [K, D]; an nn.Parameter for update "loss", a buffer for "ema"
    cluster_size: Tensor  # [K] EMA of how many vectors each code receives per batch (N_k)
    embed_sum: Tensor  # [K, D] EMA of the sum of those vectors (m_k); update "ema" only
    initialized: Tensor  # bool scalar: codebook initialised (k-means already ran)
    restart_count: Tensor  # int64 scalar: codes re-seeded by dead-code restarts so far

    def __init__(
        self,
        num_codes: int,
        code_dim: int,
        beta: float = 0.25,
        update: str = "ema",
        ema_decay: float = 0.99,
        init: str = "kmeans",
        dead_code_threshold: float = 1.0,
        kmeans_iters: int = 10,
        epsilon: float = 1e-5,
    ) -> None:
        super().__init__()
        if num_codes < 1 or code_dim < 1:
            raise ValueError(f"num_codes and code_dim must be >= 1, got {num_codes} and {code_dim}")
        if update not in CODEBOOK_UPDATES:
            raise ValueError(f"update must be one of {CODEBOOK_UPDATES}, got {update!r}")
        if init not in CODEBOOK_INITS:
            raise ValueError(f"init must be one of {CODEBOOK_INITS}, got {init!r}")
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        if beta < 0.0 or dead_code_threshold < 0.0 or epsilon < 0.0 or kmeans_iters < 0:
            raise ValueError("beta, dead_code_threshold, epsilon and kmeans_iters must be >= 0")
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.beta = beta
        self.update = update
        self.ema_decay = ema_decay
        self.init = init
        self.dead_code_threshold = dead_code_threshold
        self.kmeans_iters = kmeans_iters
        self.epsilon = epsilon

        if init == "random":
            # Uniform ±1/K as in the reference implementation; the EMA state starts as if each code
            # had received one vector equal to itself (N_k = 1, m_k = e_k).
            codebook = torch.empty(num_codes, code_dim).uniform_(-1.0 / num_codes, 1.0 / num_codes)
            cluster_size = torch.ones(num_codes)
        else:
            codebook = torch.zeros(num_codes, code_dim)
            cluster_size = torch.zeros(num_codes)
        if update == "loss":
            self.codebook = nn.Parameter(codebook)
        else:
            self.register_buffer("codebook", codebook)
            self.register_buffer("embed_sum", codebook * cluster_size.unsqueeze(1))
        self.register_buffer("cluster_size", cluster_size)
        self.register_buffer("initialized", torch.tensor(init == "random"))
        self.register_buffer("restart_count", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        return (
            f"num_codes={self.num_codes}, code_dim={self.code_dim}, beta={self.beta}, "
            f"update={self.update!r}, init={self.init!r}, ema_decay={self.ema_decay}, "
            f"dead_code_threshold={self.dead_code_threshold}"
        )

    def forward(self, z_e: Tensor) -> QuantizerOutput:
        """Quantize z_e [N, D, *spatial]; in training mode also initialise, update and restart codes."""
        self._check_input(z_e)
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            vectors = z_e.movedim(1, -1).reshape(-1, self.code_dim).float()
            if self.training and not bool(self.initialized):
                with torch.no_grad():
                    self._initialize_from(vectors.detach())
            indices = _nearest(vectors.detach(), self.codebook.detach())
            chosen = F.embedding(indices, self.codebook)
            # Paper eq. 3: commitment β‖z_e − sg[e]‖² and codebook ‖sg[z_e] − e‖², as element means.
            commitment_loss = self.beta * F.mse_loss(vectors, chosen.detach())
            if self.update == "loss":
                codebook_loss = F.mse_loss(chosen, vectors.detach())
            else:
                codebook_loss = vectors.new_zeros(())
            usage = torch.bincount(indices, minlength=self.num_codes)
            perplexity = torch.exp(torch.special.entr(usage.float() / indices.numel()).sum())
            if self.training:
                with torch.no_grad():
                    self._update_codebook(vectors.detach(), indices, usage)
                    if self.dead_code_threshold > 0:
                        self._restart_dead_codes(vectors.detach())

        spatial_shape = (z_e.shape[0], *z_e.shape[2:])
        code_vectors = chosen.detach().to(z_e.dtype).reshape(*spatial_shape, self.code_dim)
        # Straight-through estimator: the value is exactly e_k, the gradient reaches z_e unchanged.
        quantized = code_vectors.movedim(-1, 1) + (z_e - z_e.detach())
        return QuantizerOutput(
            quantized=quantized,
            indices=indices.reshape(spatial_shape),
            commitment_loss=commitment_loss,
            codebook_loss=codebook_loss,
            perplexity=perplexity,
            usage=usage,
        )

    @torch.no_grad()
    def codes(self, z_e: Tensor) -> Tensor:
        """Nearest code index for every position of z_e [N, D, *spatial] -> int64 [N, *spatial]."""
        self._check_input(z_e)
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            vectors = z_e.movedim(1, -1).reshape(-1, self.code_dim).float()
            indices = _nearest(vectors, self.codebook)
        return indices.reshape(z_e.shape[0], *z_e.shape[2:])

    def lookup(self, indices: Tensor) -> Tensor:
        """Codebook vectors of indices [N, *spatial] -> [N, D, *spatial]."""
        return F.embedding(indices.long(), self.codebook).movedim(-1, 1)

    def _check_input(self, z_e: Tensor) -> None:
        if z_e.dim() < 2 or z_e.shape[1] != self.code_dim:
            raise ValueError(
                f"expected encoder output [N, {self.code_dim}, ...], got shape {tuple(z_e.shape)}"
            )

    def _cluster_statistics(self, vectors: Tensor, assignment: Tensor, across_ranks: bool = True) -> tuple[Tensor, Tensor]:
        """Per-code vector counts [K] and sums [K, D] (summed over all ranks unless `across_ranks` is False)."""
        counts = torch.bincount(assignment, minlength=self.num_codes).to(vectors.dtype)
        sums = vectors.new_zeros(self.num_codes, self.code_dim).index_add_(0, assignment, vectors)
        statistics = torch.cat([counts.unsqueeze(1), sums], dim=1)
        if across_ranks:
            all_reduce_sum(statistics)
        return statistics[:, 0], statistics[:, 1:]

    def _kmeans_plus_plus(self, vectors: Tensor) -> Tensor:
        """k-means++ seeding (Arthur & Vassilvitskii, 2007): next seed drawn with probability ∝ D(z)²."""
        seeds = vectors.new_empty(self.num_codes, self.code_dim)
        first = torch.randint(vectors.shape[0], (1,), device=vectors.device)
        seeds[0] = vectors[first[0]]
        min_sq_distance = (vectors - seeds[0]).pow(2).sum(1)
        for k in range(1, self.num_codes):
            # Once every distinct vector is a seed all distances are 0: draw uniformly (with replacement).
            weights = torch.where(
                min_sq_distance.sum() > 0, min_sq_distance, torch.ones_like(min_sq_distance)
            )
            seeds[k] = vectors[torch.multinomial(weights, 1)[0]]
            min_sq_distance = torch.minimum(min_sq_distance, (vectors - seeds[k]).pow(2).sum(1))
        return seeds

    def _initialize_from(self, vectors: Tensor) -> None:
        """k-means (k-means++ seeds, then Lloyd iterations) on the first global batch.

        Under torch.distributed every rank gathers the whole batch and runs the same k-means as one
        process would; rank 0's result is broadcast so the ranks agree bit for bit.
        """
        vectors = all_gather_rows(vectors)
        centroids = self._kmeans_plus_plus(vectors)
        for _ in range(self.kmeans_iters):
            counts, sums = self._cluster_statistics(vectors, _nearest(vectors, centroids), across_ranks=False)
            centroids = torch.where(
                counts.unsqueeze(1) > 0, sums / counts.clamp(min=1).unsqueeze(1), centroids
            )
        centroids = broadcast_from_rank0(centroids)
        counts, _ = self._cluster_statistics(vectors, _nearest(vectors, centroids), across_ranks=False)
        # A cluster left empty counts as holding its own centroid, like a random init code, so its
        # vector is kept (m_k = 0 would pull e_k to the origin at the next EMA step).
        sizes = counts.clamp(min=1)
        self.codebook.copy_(centroids)
        self.cluster_size.copy_(sizes)
        if self.update == "ema":
            self.embed_sum.copy_(centroids * sizes.unsqueeze(1))
        self.initialized.fill_(True)

    def _update_codebook(self, vectors: Tensor, indices: Tensor, usage: Tensor) -> None:
        """EMA step (sonnet VectorQuantizerEMA): N_k, m_k decay by γ, e_k = m_k / Laplace-smoothed N_k.

        For update "loss" only N_k is tracked, for the dead-code decision.
        """
        decay = self.ema_decay
        if self.update == "loss":
            counts = all_reduce_sum(usage.float())
            self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
            return
        counts, sums = self._cluster_statistics(vectors, indices)
        self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (total + self.num_codes * self.epsilon) * total
        self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(1))

    def _restart_dead_codes(self, vectors: Tensor) -> None:
        """Re-seed codes with N_k < threshold from random vectors of the global batch (rows chosen on rank 0).

        A restarted code gets N_k = max(threshold, mean N) and m_k = e_k·N_k: an average share of usage,
        which gives it time to attract vectors before it can count as dead again. Written without
        data-dependent branches (no host sync): every step draws and broadcasts K candidates, which
        also keeps the RNG stream independent of how many codes died.
        """
        dead = self.cluster_size < self.dead_code_threshold
        _, world_size = world()
        rows = _random_rows(vectors.shape[0] * world_size, self.num_codes, vectors.device)
        candidates = select_global_rows(vectors, rows)
        # The i-th dead code takes the i-th candidate, so dead codes get distinct rows where possible.
        replacements = candidates[(dead.long().cumsum(0) - 1).clamp(min=0)]
        reset_size = self.cluster_size.mean().clamp(min=self.dead_code_threshold)
        self.codebook.copy_(torch.where(dead.unsqueeze(1), replacements, self.codebook))
        self.cluster_size.copy_(torch.where(dead, reset_size, self.cluster_size))
        if self.update == "ema":
            self.embed_sum.copy_(
                torch.where(dead.unsqueeze(1), replacements * reset_size, self.embed_sum)
            )
        self.restart_count.add_(dead.sum())
