"""What an existing output path holds, when it is a dvae artifact, and the one rule for replacing it: a command
replaces what it wrote itself before (same kind, same command: so `dvc repro` reruns), and another dvae artifact (a
dataset, a codes file written by `encode`, a model folder) only with --force."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py

from dvae_cli.core.errors import UserError
from dvae_cli.formats import codes, dataset
from dvae_cli.formats.model_folder import CONFIG
from dvae_cli.models.prior import PRIOR

TRAIN_MAKER, PRIOR_MAKER = "dvae train", "dvae prior"
REFERENCE_MAKER, DECODE_MAKER = "dvae import-reference", "dvae decode"
"""The commands that write model folders, prior folders and dataset-format files besides prepare-data."""


@dataclass(frozen=True)
class Artifact:
    kind: str
    """dataset file | codes file | model folder | prior folder."""
    maker: str
    """The command that wrote it: `dvae prepare-data`, `dvae encode`, ..."""


def identify(path: Path) -> Artifact | None:
    """The dvae artifact at `path`; None for anything else (a damaged file included: nothing of it is worth
    keeping)."""
    try:
        if path.is_dir() and (path / CONFIG).is_file():
            record = json.loads((path / CONFIG).read_text())
            if record.get("family") == PRIOR.name:
                return Artifact("prior folder", PRIOR_MAKER)
            return Artifact("model folder", REFERENCE_MAKER if "reference" in record else TRAIN_MAKER)
        if path.is_file() and h5py.is_hdf5(path) and dataset.headers_end(path):
            with h5py.File(path, "r") as file:
                found = file.attrs.get("format")
                if found == dataset.FORMAT:
                    made = json.loads(file.attrs.get("params", "{}"))
                    return Artifact("dataset file", DECODE_MAKER if "decoded_from" in made else dataset.DATASET_MAKER)
                if found == codes.FORMAT:
                    return Artifact("codes file", str(file.attrs.get(codes.WRITTEN_BY, codes.CODES_MAKER)))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return None


def check_replaceable(out: Path, maker: str, option: str, force: bool) -> None:
    """Refuse, before any work, to replace a dvae artifact that `maker` did not write, unless `force`."""
    found = identify(out)
    if found is None or found.maker == maker or force:
        return
    raise UserError(f"{option} {out} is a {found.kind} written by `{found.maker}`, which `{maker}` would replace; "
                    "choose another path, or pass --force to replace it")
