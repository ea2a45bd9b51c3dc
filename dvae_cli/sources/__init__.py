"""Data sources: where prepare-data reads images from. Each delivers rows by index as uint8 [n, C, H, W]."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from dvae_cli.formats.dataset import DatasetChunk, DatasetInfo
from dvae_cli.params import DataConfig


class Source(Protocol):
    info: DatasetInfo
    skipped: list[str]
    """The files that could not be read and were left out (relative to data.root), in row order."""

    def __len__(self) -> int: ...

    def official_split(self) -> np.ndarray | None:
        """uint8 [len] of 0 (train) / 2 (test) for sources with an official test split, else None."""

    def read(self, indices: np.ndarray) -> DatasetChunk:
        """The rows at sorted `indices`, in order; unreadable rows are dropped and named in `skipped`."""


def open_source(config: DataConfig) -> Source:
    if config.dataset == "dsprites":
        from dvae_cli.sources.dsprites import DSpritesSource
        return DSpritesSource(config)
    if config.dataset == "folder":
        from dvae_cli.sources.folder import FolderSource
        return FolderSource(config)
    from dvae_cli.sources.torchvision_sources import TorchvisionSource
    return TorchvisionSource(config)
