"""`dvae render`: the pictures a person reads at a glance, written to `renders/M/`.

Each family draws its own (its registered `pictures`) from the same inputs: one base image, a fixed seeded set of
shown images and a larger seeded sample to measure on, all from the evaluation split. The folder is replaced
atomically; the same model, data and params give the same bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dvae_cli.core import layout
from dvae_cli.core.errors import UserError
from dvae_cli.core.files import atomic_path, check_output
from dvae_cli.core.images import save_png
from dvae_cli.core.progress import progress_bar
from dvae_cli.core.runtime import resolve_device
from dvae_cli.core.splits import SPLIT_NAMES
from dvae_cli.formats.dataset import DatasetFile
from dvae_cli.formats.model_folder import load_model, model_files
from dvae_cli.models import get_family
from dvae_cli.params import Params
from dvae_cli.scoring.pictures import MEASURED_IMAGES, SHOWN_IMAGES, RenderInputs


@dataclass(frozen=True)
class RenderResult:
    folder: Path
    files: dict[str, tuple[int, int] | None]
    """Each file written: its (width, height) in pixels, None for a data file."""
    notes: list[str]
    seconds: float


def _seeded_rows(rows: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sorted `count` rows drawn without replacement (all of them when there are no more)."""
    if len(rows) <= count:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, size=count, replace=False))


def _check_out_folder(out: Path, files: tuple[str, ...]) -> None:
    """Refuse to replace a folder that holds anything render did not write: the whole folder is replaced."""
    if not out.is_dir():
        return
    foreign = sorted(path.name for path in out.iterdir() if path.name not in files)
    if foreign:
        raise UserError(f"--out {out} holds {foreign[0]!r}, which dvae render did not write, and render replaces "
                        "the whole folder; pass an empty or new folder")


@dataclass(frozen=True)
class RenderPaths:
    model_dir: Path
    dataset: Path
    out: Path
    """The folder of the pictures, replaced as a whole."""

    @classmethod
    def of(cls, family: str, **given: Path | None) -> RenderPaths:
        return layout.fill(cls, given, model_dir=layout.model_dir(family), dataset=layout.DATASET,
                           out=layout.renders(family))


def run(params: Params, family: str, paths: RenderPaths, show_progress: bool = True,
        force: bool = False) -> RenderResult:
    """Draw the family's pictures for the model in `paths.model_dir` from the dataset's evaluation split."""
    started = time.perf_counter()
    model_dir, out = paths.model_dir, paths.out
    check_output(out, [*model_files(model_dir), paths.dataset], folder=True)
    settings = params.render
    spec = get_family(family)
    device = resolve_device(params.runtime.device)
    loaded = load_model(model_dir, family, device, force=force)
    _check_out_folder(out, spec.picture_files)
    with DatasetFile(paths.dataset) as dataset:
        loaded.check_image_shape(dataset.info.channels, dataset.info.image_size, paths.dataset,
                                 "pass the dataset it was trained on")
        split = dataset.evaluation_split()
        rows = dataset.indices(split)
        if settings.base_index >= len(rows):
            raise UserError(f"render.base_index (--base) is {settings.base_index} but the {SPLIT_NAMES[split]} split "
                            f"of {paths.dataset} has {len(rows)} images; choose 0 to {len(rows) - 1}")
        shown = _seeded_rows(rows, SHOWN_IMAGES, settings.seed)
        measured = _seeded_rows(rows, MEASURED_IMAGES, settings.seed)
        inputs = RenderInputs(
            base=torch.from_numpy(dataset.read_images(rows[settings.base_index:settings.base_index + 1])).to(device),
            shown=torch.from_numpy(dataset.read_images(shown)).to(device),
            measured=torch.from_numpy(dataset.read_images(measured)).to(device),
            steps=settings.steps, seed=settings.seed)

    with torch.inference_mode(), progress_bar(f"render {family}", len(spec.picture_files), unit="picture",
                                                enabled=show_progress) as advance:
        rendered = spec.pictures(loaded.model, inputs, advance)

    files: dict[str, tuple[int, int] | None] = {}
    with atomic_path(out) as folder:
        folder.mkdir()
        for name, picture in rendered.pictures.items():
            save_png(picture, folder / name)
            files[name] = picture.size
        for name, text in rendered.tables.items():
            (folder / name).write_text(text)
            files[name] = None
    return RenderResult(folder=out, files=files, notes=rendered.notes, seconds=time.perf_counter() - started)
