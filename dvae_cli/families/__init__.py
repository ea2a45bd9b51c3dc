"""The model families, registered once: nothing else in dvae lists them or branches on them."""

from __future__ import annotations

from dvae_cli.core.errors import UserError
from dvae_cli.families import jointvae, vqvae
from dvae_cli.families.base import DataShape, DiscreteVAE, Family, LossOutput

FAMILIES: dict[str, Family] = {family.name: family for family in (jointvae.FAMILY, vqvae.FAMILY)}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise UserError(f"--model {name!r} is not a model family; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


__all__ = ["FAMILIES", "DataShape", "DiscreteVAE", "Family", "LossOutput", "get_family"]
