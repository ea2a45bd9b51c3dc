"""The models, registered once: the image model families (`FAMILIES`: train, encode, evaluate, render) and the
priors over their code maps (`PRIORS`: prior, sample, compare). Nothing else in dvae lists them or branches on
them; params composes one section per registered model (`SECTIONS`). Importing the registry loads no torch: each
model's implementation is imported when first used (`registry.Lazy`)."""

from __future__ import annotations

from dvae_cli.core.errors import UserError
from dvae_cli.models import jointvae, prior, vqvae
from dvae_cli.models.registry import Family, PriorKind

FAMILIES: dict[str, Family] = {family.name: family for family in (jointvae.FAMILY, vqvae.FAMILY)}
PRIORS: dict[str, PriorKind] = {kind.name: kind for kind in (prior.PRIOR,)}
SECTIONS: dict[str, type] = {name: entry.config for name, entry in {**FAMILIES, **PRIORS}.items()}
"""Params section name → its config class, for every registered model."""


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


__all__ = ["FAMILIES", "PRIORS", "SECTIONS", "Family", "PriorKind", "code_map_name", "get_family"]
