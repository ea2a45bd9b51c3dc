"""Where the pipeline keeps its files (dvc.yaml's paths): every stage's default paths come from here."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

DATASET = Path("data/prepared/dataset.h5")

T = TypeVar("T")


def model_dir(name: str) -> Path:
    return Path("models") / name


def live_dir(name: str) -> Path:
    return Path("dvclive") / name


def codes(name: str) -> Path:
    return Path("data/codes") / f"{name}.h5"


def metrics(name: str) -> Path:
    return Path("metrics") / f"{name}.json"


def renders(name: str) -> Path:
    return Path("renders") / name


def prior_name(family: str) -> str:
    """What the prior over `family`'s codes is called: its folders, curves and metrics file."""
    return f"{family}-prior"


def fill(paths: type[T], given: dict[str, Path | None], **defaults: Path) -> T:
    """A stage's paths record: each path given (not None), the default for the rest."""
    return paths(**{name: given.get(name) or default for name, default in defaults.items()})
