"""What a model family's pictures start from (`RenderInputs`), what they return (`Rendered`), and the pieces they share."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from PIL import Image
from torch import Tensor

from dvae_cli.core.images import as_tiles, labelled_grid

SHOWN_IMAGES = 8
"""Evaluation images in reconstructions.png and code_maps.png."""
MEASURED_IMAGES = 1000
"""Evaluation images (a seeded sample) over which KL per dimension and code usage are measured."""
ENCODE_BATCH = 256


@dataclass(frozen=True)
class RenderInputs:
    """Evaluation images the pictures start from, uint8 [n, C, H, W] on the model's device."""

    base: Tensor
    """The one image traversals start from (render.base_index of the evaluation split)."""
    shown: Tensor
    """A fixed seeded set of up to SHOWN_IMAGES images for reconstructions and code maps."""
    measured: Tensor
    """A fixed seeded sample of up to MEASURED_IMAGES images for KL and code usage."""
    steps: int
    seed: int


@dataclass
class Rendered:
    pictures: dict[str, Image.Image] = field(default_factory=dict)
    tables: dict[str, str] = field(default_factory=dict)
    """CSV text by file name."""
    notes: list[str] = field(default_factory=list)
    """Pictures skipped and why."""


def to_float(images: Tensor) -> Tensor:
    return images.float().div_(255)


def batches(images: Tensor) -> Iterator[Tensor]:
    for start in range(0, images.shape[0], ENCODE_BATCH):
        yield to_float(images[start:start + ENCODE_BATCH])


class Reconstructs(Protocol):
    def reconstruct(self, x: Tensor) -> Tensor:
        """Evaluation-mode reconstruction in [0, 1]."""


def reconstructions_picture(model: Reconstructs, images: Tensor) -> Image.Image:
    """The images (top row) above their evaluation-mode reconstructions (bottom row)."""
    originals = to_float(images)
    tiles = as_tiles(torch.cat([originals, model.reconstruct(originals)]))
    return labelled_grid(tiles, images.shape[0], [["input"], ["reconstruction"]])
