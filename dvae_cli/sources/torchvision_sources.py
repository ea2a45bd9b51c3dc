"""MNIST, Fashion-MNIST, CIFAR-10 and CelebA through torchvision, official test splits kept.

With `data.root` holding torchvision's usual folder nothing is downloaded; `data.download: true` downloads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

from dvae_cli.core.errors import UserError
from dvae_cli.core.splits import TEST, TRAIN
from dvae_cli.formats.dataset import DatasetChunk, DatasetInfo
from dvae_cli.sources import DataConfig
from dvae_cli.sources.transform import fit_images, fit_pil_image


@dataclass(frozen=True)
class TorchvisionSpec:
    dataset_class: Any
    layout: str
    """The files torchvision expects under data.root, for the error message."""


SPECS = {
    "mnist": TorchvisionSpec(torchvision.datasets.MNIST, "MNIST/raw/train-images-idx3-ubyte (and the other 3 idx files)"),
    "fashion-mnist": TorchvisionSpec(torchvision.datasets.FashionMNIST,
                                     "FashionMNIST/raw/train-images-idx3-ubyte (and the other 3 idx files)"),
    "cifar10": TorchvisionSpec(torchvision.datasets.CIFAR10, "cifar-10-batches-py/data_batch_1..5 and test_batch"),
    "celeba": TorchvisionSpec(torchvision.datasets.CelebA,
                              "celeba/img_align_celeba/*.jpg and celeba/list_eval_partition.txt"),
}


def _load(spec: TorchvisionSpec, config: DataConfig, **split: Any) -> Any:
    root = Path(config.root)
    try:
        if spec.dataset_class is torchvision.datasets.CelebA:
            return spec.dataset_class(str(root), target_type=[], download=config.download, **split)
        return spec.dataset_class(str(root), download=config.download, **split)
    except (RuntimeError, OSError, ValueError) as error:
        action = "the download failed (is there a network?)" if config.download else "nothing is downloaded"
        raise UserError(f"{config.dataset} not found under {root} ({action}: {str(error).splitlines()[0][:80]}); "
                        f"expected {root}/{spec.layout}, or set data.download: true") from None


def _as_uint8_nchw(data: Any) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(data))
    return tensor[:, None] if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)


class TorchvisionSource:
    def __init__(self, config: DataConfig) -> None:
        spec = SPECS[config.dataset]
        self.config = config
        if spec.dataset_class is torchvision.datasets.CelebA:
            parts = [_load(spec, config, split=name) for name in ("train", "valid", "test")]
            self.items: list[Any] = [(part, i) for part in parts for i in range(len(part))]
            self.split = np.concatenate([np.full(len(p), s, np.uint8) for p, s in zip(parts, (TRAIN, 1, TEST))])
            self.images = None
            self.labels = None
            class_names: tuple[str, ...] = ()
        else:
            train, test = _load(spec, config, train=True), _load(spec, config, train=False)
            self.images = torch.cat([_as_uint8_nchw(train.data), _as_uint8_nchw(test.data)])
            self.labels = np.concatenate([np.asarray(train.targets), np.asarray(test.targets)]).astype(np.int64)
            self.split = np.concatenate([np.full(len(train.data), TRAIN, np.uint8),
                                         np.full(len(test.data), TEST, np.uint8)])
            class_names = tuple(train.classes)
        self.info = DatasetInfo(source=config.dataset, image_size=config.image_size, channels=config.channels,
                                num_classes=len(class_names), class_names=class_names)
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.split)

    def official_split(self) -> np.ndarray | None:
        return self.split

    def read(self, indices: np.ndarray) -> DatasetChunk:
        size, channels = self.info.image_size, self.info.channels
        if self.images is None:
            images = [fit_pil_image(part[row][0], channels, size) for part, row in (self.items[i] for i in indices)]
            return DatasetChunk(images=np.concatenate(images))
        images = fit_images(self.images[torch.as_tensor(indices)], channels, size)
        return DatasetChunk(images=images, labels=self.labels[indices])
