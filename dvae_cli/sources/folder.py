"""Any folder of images: one level of class subfolders gives labels (ImageFolder convention), flat gives none;
a root of exactly `train/` and `test/`, each with the same class subfolders, keeps that split (val is carved from
train by data.split).

Each row keeps its file's path relative to the root (`source_paths`), so codes can be joined back to the files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS

from dvae_cli.core.errors import UserError
from dvae_cli.core.splits import TEST, TRAIN
from dvae_cli.formats.dataset import DatasetChunk, DatasetInfo
from dvae_cli.sources import DataConfig
from dvae_cli.sources.transform import fit_pil_image


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS))


SPLIT_FOLDERS = {"train": TRAIN, "test": TEST}


def _subfolders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _class_folders(folder: Path) -> list[Path]:
    """The class subfolders of `folder`: those with images; an empty one beside them is an error."""
    subfolders = _subfolders(folder)
    with_images = [d for d in subfolders if _image_files(d)]
    empty = [d for d in subfolders if d not in with_images]
    if with_images and empty:
        raise UserError(f"class folder {empty[0]} holds no images; add its images or remove the folder")
    return with_images


def _split_layout(root: Path) -> bool:
    """Whether `root` holds exactly train/ and test/, each of class subfolders (no images of its own)."""
    subfolders = _subfolders(root)
    return ({d.name for d in subfolders} == set(SPLIT_FOLDERS) and not _image_files(root)
            and all(_class_folders(d) and not _image_files(d) for d in subfolders))


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
        split_folders = [root / name for name in SPLIT_FOLDERS] if _split_layout(root) else [root]
        class_dirs = [_class_folders(folder) for folder in split_folders]
        class_names = tuple(sorted({d.name for dirs in class_dirs for d in dirs}))
        if len(split_folders) > 1:
            for folder, dirs in zip(split_folders, class_dirs):
                missing = sorted(set(class_names) - {d.name for d in dirs})
                if missing:
                    raise UserError(f"{folder} has no folder for class {', '.join(map(repr, missing))}; give every "
                                    f"class images under both {' and '.join(f.name + '/' for f in split_folders)}")
        label_of = {name: label for label, name in enumerate(class_names)}
        entries = [(path, label_of[d.name], SPLIT_FOLDERS.get(folder.name, TRAIN))
                   for folder, dirs in zip(split_folders, class_dirs) for d in dirs for path in _image_files(d)]
        if not class_names:
            entries = [(path, -1, TRAIN) for path in _image_files(root)]
        if not entries:
            raise UserError(f"image folder {root} holds no images ({', '.join(IMG_EXTENSIONS[:4])}, ...); "
                            "point data.root at a folder with images")
        self.split = np.array([split for _, _, split in entries], dtype=np.uint8) if len(split_folders) > 1 else None
        self.files = [path for path, _, _ in entries]
        self.names = [_relative_name(path, root) for path in self.files]
        self.labels = np.array([label for _, label, _ in entries], dtype=np.int64)
        self.info = DatasetInfo(source="folder", image_size=config.image_size, channels=config.channels,
                                num_classes=len(class_names), class_names=class_names)
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.files)

    def official_split(self) -> np.ndarray | None:
        return self.split

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
        return DatasetChunk(images=stacked, labels=labels, source_paths=[self.names[index] for index in kept],
                            source_rows=np.array(kept, dtype=np.int64))
