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


def code_map_name(name: str) -> str:
    """The `encode` array of family `name` that holds a code map a prior can model."""
    code_map = get_family(name).code_map
    if code_map is None:
        having = [family for family, entry in FAMILIES.items() if entry.code_map is not None]
        raise UserError(f"--model {name}: {name} codes hold no code map for a prior to model; priors model the "
                        f"code maps of {' | '.join(having)}")
    return code_map


__all__ = ["FAMILIES", "DataShape", "DiscreteVAE", "Family", "LossOutput", "code_map_name", "get_family"]
