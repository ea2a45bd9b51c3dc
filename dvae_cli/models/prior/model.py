"""An autoregressive prior over code maps: the VQ-VAE paper's p(z), fitted after the autoencoder (van den Oord, 2017,
§3.2 and §4.1, with PixelCNN) as a small causal transformer over the raster-ordered map (learned position
embeddings), conditioned on the class by its start token when the data has labels.

A training row is int64 [1 + h·w]: the start token (K + class, or K unconditioned), then the codes in raster order.
Residual codes [depth, h, w] are one sequence, stage after stage (coarsest first), so the NLL of a row's first
d·h·w codes is the bits of the first d stages alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvae_cli.models.base import LossOutput, Trainable
from dvae_cli.models.prior.config import CodeMaps, PriorConfig


def start_tokens(maps: CodeMaps, labels: Tensor | None, count: int) -> Tensor:
    """The start token of each row: K + class when conditioned, else K (int64 [count])."""
    if maps.num_classes:
        return maps.num_codes + labels.long()
    return torch.full((count,), maps.num_codes, dtype=torch.long)


def training_rows(maps: CodeMaps, codes: Tensor, labels: Tensor | None) -> Tensor:
    """Code maps [n, h, w] or [n, depth, h, w] (and their labels) as training rows int64 [n, 1 + length]."""
    start = start_tokens(maps, labels, len(codes))
    return torch.cat([start[:, None], codes.reshape(len(codes), -1).long()], dim=1)


class KeyValueCache:
    """One block's keys and values [n, heads, L, d] of the positions run so far (allocated at the first store, in the
    dtype autocast gives them)."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.keys: Tensor | None = None
        self.values: Tensor | None = None

    def store(self, k: Tensor, v: Tensor, position: int) -> tuple[Tensor, Tensor]:
        """Store the keys and values [n, heads, 1, d] of `position`; every position's up to it."""
        if self.keys is None:
            self.keys = k.new_empty(*k.shape[:2], self.length, k.shape[3])
            self.values = v.new_empty(*v.shape[:2], self.length, v.shape[3])
        self.keys[:, :, position:position + 1], self.values[:, :, position:position + 1] = k, v
        return self.keys[:, :, :position + 1], self.values[:, :, :position + 1]


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention, then a 4× MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def attend(self, x: Tensor, cache: KeyValueCache | None, position: int) -> Tensor:
        """Causal attention over x [n, s, width]; with a cache, x is the single token at `position`, its key and value
        are stored there, and it attends to every position up to it."""
        n, s, width = x.shape
        q, k, v = self.qkv(x).view(n, s, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, *cache.store(k, v, position))
        return self.proj(y.transpose(1, 2).reshape(n, s, width))

    def forward(self, x: Tensor, cache: KeyValueCache | None = None, position: int = 0) -> Tensor:
        x = x + self.attend(self.norm1(x), cache, position)
        return x + self.mlp(self.norm2(x))


class CodePrior(Trainable):
    """p(z) = Π_i p(z_i | z_<i, class) over the raster-ordered code map."""

    def __init__(self, config: PriorConfig, maps: CodeMaps) -> None:
        super().__init__()
        self.config, self.maps = config, maps
        self.tokens = nn.Embedding(maps.num_codes + max(maps.num_classes, 1), config.width)
        self.positions = nn.Parameter(torch.zeros(maps.length, config.width))
        self.blocks = nn.ModuleList(Block(config.width, config.heads) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, maps.num_codes)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.positions, std=0.02)

    def logits(self, inputs: Tensor) -> Tensor:
        """Next-code logits [n, s, K] for input tokens [n, s] (start token, then the first s − 1 codes)."""
        h = self.tokens(inputs) + self.positions[:inputs.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))

    def code_nll(self, rows: Tensor) -> Tensor:
        """−log p(z_i | z_<i, class) in nats, per code [n, length]."""
        logits = self.logits(rows[:, :-1])
        return F.cross_entropy(logits.float().transpose(1, 2), rows[:, 1:], reduction="none")

    @torch.no_grad()
    def map_nll(self, rows: Tensor, batch_size: int = 256, prefixes: tuple[int, ...] | None = None) -> Tensor:
        """−log p(map) in nats for each row (float64 [n], on the CPU), `batch_size` rows at a time on the model's
        device; with `prefixes`, of each row's first p codes for each p (float64 [n, len(prefixes)])."""
        device = self.head.weight.device

        def summed(code_nll: Tensor) -> Tensor:
            if prefixes is None:
                return code_nll.sum(dim=1)
            return torch.stack([code_nll[:, :prefix].sum(dim=1) for prefix in prefixes], dim=1)

        totals = [summed(self.code_nll(rows[start:start + batch_size].to(device)).double()).cpu()
                  for start in range(0, len(rows), batch_size)]
        if totals:
            return torch.cat(totals)
        return torch.zeros(0, *([] if prefixes is None else [len(prefixes)]), dtype=torch.float64)

    def loss(self, x: Tensor, step: int) -> LossOutput:
        """The prior's objective: the mean over codes of −log p(z_i | z_<i, class) (nats)."""
        nll = self.code_nll(x).mean()
        return LossOutput(loss=nll, terms={"nll": nll, "bits_per_code": nll.detach() / math.log(2)})

    def _next_codes(self, logits: Tensor, uniforms: Tensor, temperature: float, top_k: int | None) -> Tensor:
        """A code per row from `logits` [n, K] by inverse CDF at `uniforms` [n] (so the draw is a function of them)."""
        logits = logits.float() / temperature
        if top_k is not None and top_k < logits.shape[1]:
            kth = torch.topk(logits, top_k, dim=1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        cdf = torch.softmax(logits, dim=1).cumsum(dim=1)
        codes = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(1).contiguous())
        return codes.squeeze(1).clamp_(max=logits.shape[1] - 1)

    @torch.no_grad()
    def sample(self, starts: Tensor, uniforms: Tensor, temperature: float = 1.0, top_k: int | None = None,
               cache: bool = True) -> Tensor:
        """Code maps [n, *maps.shape] drawn one code at a time from the start tokens [n], with `uniforms` [n, length]
        in [0, 1) as the randomness. With `cache` each step runs the new token only, against the stored keys and values;
        without, each step runs the whole prefix again (same codes, quadratic cost)."""
        n, length = len(starts), self.maps.length
        tokens = torch.empty(n, length + 1, dtype=torch.long, device=starts.device)
        tokens[:, 0] = starts
        caches = [KeyValueCache(length) for _ in self.blocks] if cache else None
        for position in range(length):
            if caches is None:
                logits = self.logits(tokens[:, :position + 1])[:, -1]
            else:
                h = self.tokens(tokens[:, position:position + 1]) + self.positions[position]
                for block, block_cache in zip(self.blocks, caches, strict=True):
                    h = block(h, block_cache, position)
                logits = self.head(self.norm(h))[:, 0]
            tokens[:, position + 1] = self._next_codes(logits, uniforms[:, position], temperature, top_k)
        return tokens[:, 1:].reshape(n, *self.maps.shape)
