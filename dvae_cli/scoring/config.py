"""The `evaluate` params section (no torch: params are checked before any tensor library loads)."""

from __future__ import annotations

from dataclasses import dataclass

from dvae_cli.core.schema import param


@dataclass(frozen=True)
class EvaluateConfig:
    """The `evaluate:` params section."""

    num_samples: int = param(10000, help="points sampled for MIG and the FactorVAE score", ge=1, le=1 << 24)
    dci: bool = param(False, help="also compute DCI (gradient-boosted trees; slow)")
    batch_size: int = param(512, help="images per evaluation batch", ge=1, le=1 << 16)
    prior_samples: int = param(256, help="images drawn from a model's own prior (JointVAE) and matched to the true "
                               "dSprites images, on dSprites data (0: none)", ge=0, le=1 << 16)
