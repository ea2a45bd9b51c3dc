"""The model registry: the one place that maps a family name to its class."""

from __future__ import annotations

from dvae_cli.config import JointVAEConfig, VQVAEConfig
from dvae_cli.models.base import DataShape, DiscreteVAE, LossOutput
from dvae_cli.models.jointvae import JointVAE
from dvae_cli.models.vqvae import VQVAE

REGISTRY: dict[str, type[DiscreteVAE]] = {"jointvae": JointVAE, "vqvae": VQVAE}


def build_model(family: str, config: JointVAEConfig | VQVAEConfig, data: DataShape) -> DiscreteVAE:
    return REGISTRY[family](config, data)  # type: ignore[call-arg]


__all__ = ["REGISTRY", "DataShape", "DiscreteVAE", "LossOutput", "build_model"]
