"""The `vqvae` params section (no torch: params are checked before any tensor library loads)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from dvae_cli.core.errors import UserError
from dvae_cli.core.schema import KeyName, param

MAX_CODES = 1 << 16
MAX_FSQ_CHANNELS, MAX_FSQ_LEVELS = 16, 256
MAX_RVQ_DEPTH = 64


@dataclass(frozen=True)
class VQVAEConfig:
    """The `vqvae` params section. Defaults are the quick CPU configuration; presets/ hold the paper's."""

    hidden: int = param(32, help="channels of the convolutional trunk", ge=1, le=4096)
    res_blocks: int = param(1, help="residual blocks in encoder and decoder", ge=0, le=64)
    downsample: int = param(4, help="image side / code map side: 2, 4, 8, ... (a power of two)", ge=2, le=256)
    quantizer: Literal["vq", "fsq", "rvq"] = param(
        "vq", help="vq (a learned codebook of num_codes vectors of code_dim), fsq (finite scalar quantization on the "
                   "grid fsq_levels) or rvq (residual VQ: rvq_depth such codebooks in sequence)")
    num_codes: int = param(64, help="codebook size K (vq; rvq: of each stage)", ge=2, le=MAX_CODES)
    code_dim: int = param(16, help="code vector dimension D (vq, rvq)", ge=1, le=4096)
    fsq_levels: list[int] = param(factory=lambda: [8, 5, 5, 5], help="levels of each channel (fsq): K = their "
                                  "product, D = their count; the FSQ paper's [8, 5, 5, 5] makes K = 1,000")
    rvq_depth: int = param(4, help="stages of residual VQ (rvq): each codes what the stages before it left, so a "
                                   "code map holds rvq_depth codes a position and its first d stages are a coarser "
                                   "code", ge=1, le=MAX_RVQ_DEPTH)
    beta: float = param(0.25, help="commitment weight β", ge=0)
    codebook_update: Literal["ema", "loss"] = param("ema", help="ema (online k-means) or loss (codebook term)")
    ema_decay: float = param(0.99, help="EMA decay γ, in (0, 1)", gt=0, lt=1)
    init: Literal["kmeans", "random"] = param("kmeans", help="codebook initialisation")
    dead_code_threshold: float = param(1.0, help="EMA usage below which a code is re-seeded; 0 turns it off", ge=0)
    likelihood: Literal["bernoulli", "gaussian"] = param("gaussian", help="gaussian (MSE) or bernoulli (BCE)")
    lr: float = param(1.0e-3, help="Adam learning rate", gt=0)
    batch_size: int = param(64, help="global batch size", ge=1, le=1 << 16)
    epochs: int = param(3, help="passes over the train split", ge=1)

    @property
    def codebook_size(self) -> int:
        """K, the values a code takes (an rvq stage's codebook size)."""
        return math.prod(self.fsq_levels) if self.quantizer == "fsq" else self.num_codes

    @property
    def vector_dim(self) -> int:
        """The channels of the encoder output that the quantizer takes (D)."""
        return len(self.fsq_levels) if self.quantizer == "fsq" else self.code_dim

    def validate(self, key: KeyName) -> None:
        if self.quantizer == "fsq":
            if not 1 <= len(self.fsq_levels) <= MAX_FSQ_CHANNELS:
                raise UserError(f"params: `{key('fsq_levels')}` lists {len(self.fsq_levels)} levels; FSQ needs 1 to "
                                f"{MAX_FSQ_CHANNELS} channels")
            for i, levels in enumerate(self.fsq_levels):
                if not 2 <= levels <= MAX_FSQ_LEVELS:
                    raise UserError(f"params: `{key('fsq_levels')}[{i}]` is {levels}; each channel needs 2 to "
                                    f"{MAX_FSQ_LEVELS} levels")
            if math.prod(self.fsq_levels) > MAX_CODES:
                raise UserError(f"params: `{key('fsq_levels')}` {self.fsq_levels} makes {math.prod(self.fsq_levels):,} "
                                f"codes, more than the {MAX_CODES:,} a codes file holds; use fewer or smaller levels")
        if self.downsample & (self.downsample - 1):
            raise UserError(f"params: `{key('downsample')}` is {self.downsample}; it must be a power of two "
                            "(2, 4, 8, ...)")
