"""Data sources: where prepare-data reads images from, registered once in `SOURCES`. Each delivers rows by index as
uint8 [n, C, H, W]; its module is imported only when it is opened (torchvision is slow to import)."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from dvae_cli.core.errors import UserError
from dvae_cli.core.schema import KeyName, param

if TYPE_CHECKING:
    import numpy as np

    from dvae_cli.formats.dataset import DatasetChunk, DatasetInfo


class Source(Protocol):
    info: DatasetInfo
    skipped: list[str]
    """The files that could not be read and were left out (relative to data.root), in row order."""

    def __len__(self) -> int: ...

    def official_split(self) -> np.ndarray | None:
        """uint8 [len] of 0 (train) / 2 (test) for sources with an official test split, else None."""

    def read(self, indices: np.ndarray) -> DatasetChunk:
        """The rows at sorted `indices`, in order; unreadable rows are dropped and named in `skipped`."""


@dataclass(frozen=True)
class SourceKind:
    """A registered source: `data.dataset`'s value, and the class that reads it (`module:Class`, built from the
    `DataConfig`)."""

    name: str
    reader: str


SOURCES: dict[str, SourceKind] = {kind.name: kind for kind in (
    SourceKind("dsprites", "dvae_cli.sources.dsprites:DSpritesSource"),
    SourceKind("mnist", "dvae_cli.sources.torchvision_sources:TorchvisionSource"),
    SourceKind("fashion-mnist", "dvae_cli.sources.torchvision_sources:TorchvisionSource"),
    SourceKind("cifar10", "dvae_cli.sources.torchvision_sources:TorchvisionSource"),
    SourceKind("celeba", "dvae_cli.sources.torchvision_sources:TorchvisionSource"),
    SourceKind("folder", "dvae_cli.sources.folder:FolderSource"),
)}


@dataclass(frozen=True)
class DataConfig:
    """The `data:` params section: which source, and how its images become the dataset file."""

    dataset: str = param("dsprites", help="data source: a name in `SOURCES`")
    root: str = param("data/raw", help="where torchvision and folder sources read")
    download: bool = param(False, help="let torchvision sources download")
    image_size: int = param(64, help="square image side in pixels", ge=4, le=1024)
    channels: Literal[1, 3] = param(1, help="1 (grayscale) or 3 (RGB)")
    subset: int | float | None = param(20000, help="null, an int count, or a fraction in (0, 1]", gt=0)
    split: list[float] = param(factory=lambda: [0.8, 0.1, 0.1],
                               help="train/val/test fractions for sources without an official split")

    def validate(self, key: KeyName) -> None:
        if self.dataset not in SOURCES:
            raise UserError(f"params: `{key('dataset')}` is {self.dataset!r}; allowed: "
                            f"{' | '.join(map(repr, SOURCES))}")
        if len(self.split) != 3 or any(f < 0 for f in self.split) or not math.isclose(sum(self.split), 1.0, abs_tol=1e-6):
            raise UserError(f"params: `{key('split')}` is {self.split}; it must be three non-negative fractions "
                            "train/val/test that sum to 1")
        if self.split[0] == 0:
            raise UserError(f"params: `{key('split')}` gives the train split no images; make its first fraction > 0")
        if isinstance(self.subset, float) and self.subset > 1:
            raise UserError(f"params: `{key('subset')}` is {self.subset}; a fraction must be in (0, 1], "
                            "or give an integer count")


def open_source(config: DataConfig) -> Source:
    module, name = SOURCES[config.dataset].reader.split(":")
    return getattr(importlib.import_module(module), name)(config)
