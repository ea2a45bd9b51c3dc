"""The `vqvae` params section (no torch: params are checked before any tensor library loads)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dvae_cli.core.errors import UserError
from dvae_cli.core.schema import KeyName, param


@dataclass(frozen=True)
class VQVAEConfig:
    """The `vqvae` params section. Defaults are the quick CPU configuration; presets/ hold the paper's."""

    hidden: int = param(32, help="channels of the convolutional trunk", ge=1, le=4096)
    res_blocks: int = param(1, help="residual blocks in encoder and decoder", ge=0, le=64)
    downsample: int = param(4, help="image side / code map side: 2, 4, 8, ... (a power of two)", ge=2, le=256)
    num_codes: int = param(64, help="codebook size K", ge=2, le=1 << 16)
    code_dim: int = param(16, help="code vector dimension D", ge=1, le=4096)
    beta: float = param(0.25, help="commitment weight β", ge=0)
    codebook_update: Literal["ema", "loss"] = param("ema", help="ema (online k-means) or loss (codebook term)")
    ema_decay: float = param(0.99, help="EMA decay γ, in (0, 1)", gt=0, lt=1)
    init: Literal["kmeans", "random"] = param("kmeans", help="codebook initialisation")
    dead_code_threshold: float = param(1.0, help="EMA usage below which a code is re-seeded; 0 turns it off", ge=0)
    likelihood: Literal["bernoulli", "gaussian"] = param("gaussian", help="gaussian (MSE) or bernoulli (BCE)")
    lr: float = param(1.0e-3, help="Adam learning rate", gt=0)
    batch_size: int = param(64, help="global batch size", ge=1, le=1 << 16)
    epochs: int = param(3, help="passes over the train split", ge=1)

    def validate(self, key: KeyName) -> None:
        if self.downsample & (self.downsample - 1):
            raise UserError(f"params: `{key('downsample')}` is {self.downsample}; it must be a power of two "
                            "(2, 4, 8, ...)")
