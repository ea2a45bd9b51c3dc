"""The registry: every family is registered once, and no code outside its own folder names it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dvae_cli.core.errors import UserError
from dvae_cli.models import FAMILIES, get_family
from dvae_cli.models.base import DataShape, DiscreteVAE

PACKAGE = Path(__file__).resolve().parents[1] / "dvae_cli"


def test_every_family_record_is_complete():
    for name, family in FAMILIES.items():
        assert family.name == name
        assert dataclasses.is_dataclass(family.config)
        model = family.model(family.config(), DataShape(channels=1, image_size=32, pixel_variance=0.1))
        assert isinstance(model, DiscreteVAE)
        assert callable(family.metrics) and callable(family.pictures) and family.picture_files


def test_unknown_family_is_a_user_error():
    with pytest.raises(UserError, match="choose one of jointvae, vqvae"):
        get_family("vae")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_no_code_outside_the_family_folder_names_it(name):
    quoted = (f'"{name}"', f"'{name}'")
    offenders = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                 if not path.is_relative_to(PACKAGE / "models" / name)
                 and any(text in path.read_text() for text in quoted)]
    assert offenders == []
