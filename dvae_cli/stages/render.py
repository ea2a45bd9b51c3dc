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

from dvae_cli.core.errors import UserError
from dvae_cli.core.files import atomic_path, check_output
from dvae_cli.core.images import save_png
from dvae_cli.core.progress import progress_bar
from dvae_cli.core.runtime import resolve_device
from dvae_cli.families import get_family
from dvae_cli.families.pictures import MEASURED_IMAGES, SHOWN_IMAGES, RenderInputs
from dvae_cli.formats.dataset import SPLIT_NAMES, DatasetFile
from dvae_cli.formats.model_folder import load_model, model_files
from dvae_cli.params import Params


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


def render(params: Params, family: str, model_dir: Path, dataset_path: Path, out: Path,
           show_progress: bool = True, force: bool = False) -> RenderResult:
    """Draw the family's pictures for the model in `model_dir` from the dataset's evaluation split into `out`."""
    started = time.perf_counter()
    check_output(out, [*model_files(model_dir), dataset_path], folder=True)
    settings = params.render
    spec = get_family(family)
    device = resolve_device(params.runtime.device)
    loaded = load_model(model_dir, family, device, force=force)
    _check_out_folder(out, spec.picture_files)
    with DatasetFile(dataset_path) as dataset:
        shape = (dataset.info.channels, dataset.info.image_size)
        if shape != (loaded.data.channels, loaded.data.image_size):
            trained = (loaded.data.channels, loaded.data.image_size)
            raise UserError(f"{dataset_path} holds {shape[0]}-channel {shape[1]}×{shape[1]} images but the model in "
                            f"{model_dir} was trained on {trained[0]}-channel {trained[1]}×{trained[1]} ones; "
                            "pass the dataset it was trained on")
        split = dataset.evaluation_split()
        rows = dataset.indices(split)
        if settings.base_index >= len(rows):
            raise UserError(f"render.base_index (--base) is {settings.base_index} but the {SPLIT_NAMES[split]} split "
                            f"of {dataset_path} has {len(rows)} images; choose 0 to {len(rows) - 1}")
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
