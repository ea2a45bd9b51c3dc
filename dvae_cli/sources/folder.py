"""Any folder of images: one level of class subfolders gives labels (ImageFolder convention), flat gives none.

Each row keeps its file's path relative to the root (`source_paths`), so codes can be joined back to the files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS

from dvae_cli.core.errors import UserError
from dvae_cli.formats.dataset import DatasetChunk, DatasetInfo
from dvae_cli.params import DataConfig
from dvae_cli.sources.transform import fit_pil_image


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS))


def _relative_name(path: Path, root: Path) -> str:
    """`path` relative to `root` with / separators, as UTF-8 text (the dataset file's strings are UTF-8)."""
    name = path.relative_to(root).as_posix()
    # A name that is not valid UTF-8 (os.listdir keeps its bytes as surrogates) is kept readable, escaped.
    return os.fsencode(name).decode("utf-8", "backslashreplace")


class FolderSource:
    def __init__(self, config: DataConfig) -> None:
        root = Path(config.root)
        if not root.is_dir():
            raise UserError(f"image folder {root} not found; set data.root to a folder of images "
                            "(or of class subfolders of images)")
        class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and _image_files(d))
        if class_dirs:
            class_names = tuple(d.name for d in class_dirs)
            entries = [(path, label) for label, d in enumerate(class_dirs) for path in _image_files(d)]
        else:
            class_names = ()
            entries = [(path, -1) for path in _image_files(root)]
        if not entries:
            raise UserError(f"image folder {root} holds no images ({', '.join(IMG_EXTENSIONS[:4])}, ...); "
                            "point data.root at a folder with images")
        self.files = [path for path, _ in entries]
        self.names = [_relative_name(path, root) for path in self.files]
        self.labels = np.array([label for _, label in entries], dtype=np.int64)
        self.info = DatasetInfo(source="folder", image_size=config.image_size, channels=config.channels,
                                num_classes=len(class_names), class_names=class_names)
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.files)

    def official_split(self) -> np.ndarray | None:
        return None

    def read(self, indices: np.ndarray) -> DatasetChunk:
        images, kept = [], []
        for index in indices:
            try:
                with Image.open(self.files[index]) as image:
                    images.append(fit_pil_image(image, self.info.channels, self.info.image_size))
            except (UnidentifiedImageError, OSError, ValueError):
                self.skipped.append(self.names[index])
                continue
            kept.append(index)
        size, channels = self.info.image_size, self.info.channels
        stacked = np.concatenate(images) if images else np.empty((0, channels, size, size), dtype=np.uint8)
        labels = self.labels[np.array(kept, dtype=np.int64)] if self.info.has_labels else None
        return DatasetChunk(images=stacked, labels=labels, source_paths=[self.names[index] for index in kept])
