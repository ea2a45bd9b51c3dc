"""Shared fixtures: params files, tiny image folders and a fake MNIST, all generated in tmp_path."""

from __future__ import annotations

import importlib.util
import struct
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

IDX_UBYTE_IMAGES = 0x0803
IDX_UBYTE_LABELS = 0x0801


def save_png(path: Path, pixels: np.ndarray) -> Path:
    """uint8 [H, W] (grayscale) or [H, W, 3] (RGB) → a PNG at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def write_params(tmp_path: Path) -> Callable[..., Path]:
    """write_params(**sections) writes tmp_path/params.yaml from the given top-level sections and returns its path."""

    def write(**sections: Any) -> Path:
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(sections, sort_keys=False))
        return path

    return write


@pytest.fixture
def png_writer() -> Callable[[Path, np.ndarray], Path]:
    return save_png


@pytest.fixture
def load_with_datasets(tmp_path: Path) -> Callable[[Path], Any]:
    """HF `datasets.load_dataset("hdf5", data_files=...)` of one file: its rows as the one split, train."""
    import datasets

    datasets.disable_progress_bars()

    def load(path: Path) -> Any:
        loaded = datasets.load_dataset("hdf5", data_files=str(path), cache_dir=str(tmp_path / "hf-cache"))
        assert list(loaded) == ["train"]
        return loaded["train"]

    return load


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Two class folders of solid-gray 12×10 PNGs: cat/ 3 images (gray 10, 20, 30), dog/ 2 images (gray 200, 210)."""
    root = tmp_path / "images"
    for name, grays in (("cat", (10, 20, 30)), ("dog", (200, 210))):
        for i, gray in enumerate(grays):
            save_png(root / name / f"{i}.png", np.full((10, 12), gray, dtype=np.uint8))
    return root


@pytest.fixture
def flat_image_folder(tmp_path: Path) -> Path:
    """Four solid RGB 8×8 PNGs side by side, no class folders."""
    root = tmp_path / "flat"
    for i in range(4):
        save_png(root / f"img{i}.png", np.full((8, 8, 3), 40 * i, dtype=np.uint8))
    return root


@dataclass(frozen=True)
class FakeMNIST:
    root: Path
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def _write_idx_images(path: Path, images: np.ndarray) -> None:
    path.write_bytes(struct.pack(">IIII", IDX_UBYTE_IMAGES, *images.shape) + images.tobytes())


def _write_idx_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">II", IDX_UBYTE_LABELS, len(labels)) + labels.astype(np.uint8).tobytes())


@pytest.fixture
def fake_mnist(tmp_path: Path) -> FakeMNIST:
    """40 train + 10 test random 28×28 digits in torchvision's raw layout (root/MNIST/raw/*-idx?-ubyte)."""
    rng = np.random.default_rng(7)
    raw = tmp_path / "mnist-root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    data = FakeMNIST(root=tmp_path / "mnist-root",
                     train_images=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
                     train_labels=np.arange(40) % 10,
                     test_images=rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
                     test_labels=(np.arange(10) * 3) % 10)
    _write_idx_images(raw / "train-images-idx3-ubyte", data.train_images)
    _write_idx_labels(raw / "train-labels-idx1-ubyte", data.train_labels)
    _write_idx_images(raw / "t10k-images-idx3-ubyte", data.test_images)
    _write_idx_labels(raw / "t10k-labels-idx1-ubyte", data.test_labels)
    return data


TINY_PARAMS: dict[str, Any] = {
    "seed": 0,
    "data": {"dataset": "dsprites", "image_size": 32, "subset": 600},
    "train": {"checkpoint_every": 10, "log_every": 5},
    "jointvae": {"continuous": 4, "discrete": [3], "batch_size": 32, "epochs": 2,
                 "cont_capacity": {"max": 5.0, "steps": 100, "gamma": 30.0},
                 "disc_capacity": {"max": 1.0, "steps": 100, "gamma": 30.0}},
    "vqvae": {"hidden": 16, "res_blocks": 1, "downsample": 4, "num_codes": 16, "code_dim": 8,
              "batch_size": 32, "epochs": 2, "ema_decay": 0.9},
    "encode": {"batch_size": 128},
    "evaluate": {"num_samples": 200, "batch_size": 128, "prior_samples": 16},
    "render": {"steps": 4},
}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dataset file of TINY_PARAMS (600 dSprites images at 32×32), shared read-only by the session."""
    from dvae_cli.params import build_params
    from dvae_cli.stages import prepare

    dataset = tmp_path_factory.mktemp("tiny_dataset") / "dataset.h5"
    prepare.run(build_params(TINY_PARAMS), prepare.PreparePaths(dataset), show_progress=False)
    return dataset


@dataclass(frozen=True)
class TrainedProject:
    """A project folder with a tiny dSprites dataset (600 images, 32×32) and both models trained (30 steps each)."""

    root: Path
    params_path: Path
    dataset: Path

    def model_dir(self, family: str) -> Path:
        return self.root / "models" / family


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory: pytest.TempPathFactory) -> TrainedProject:
    """Session-wide and read-only: tests that write must write elsewhere (or copy the folder)."""
    from dvae_cli.params import load_params
    from dvae_cli.stages import prepare, train
    from dvae_cli.stages.train import TrainPaths

    root = tmp_path_factory.mktemp("trained_project")
    params_path = root / "params.yaml"
    params_path.write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    params = load_params(params_path)
    dataset = root / "data" / "prepared" / "dataset.h5"
    prepare.run(params, prepare.PreparePaths(dataset), show_progress=False)
    for family in ("jointvae", "vqvae"):
        train.run(params, family, TrainPaths(dataset, root / "models" / family, root / "dvclive" / family),
                  show_progress=False)
    return TrainedProject(root=root, params_path=params_path, dataset=dataset)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextmanager
def benchmark_module(name: str) -> Iterator[ModuleType]:
    """benchmarks/NAME.py imported as a module, its peers importable by name as when it runs as a script."""
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]
        sys.path.remove(str(BENCHMARKS))
