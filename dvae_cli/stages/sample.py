"""`dvae sample`: code maps drawn from the prior (`dvae prior`), decoded by the model whose codes it learned: a PNG grid
(a row per class when conditional), the drawn codes as a codes file that `dvae decode` reads, and, on dSprites, how
many samples are true sprites (of the asked shape) and which factor values they reach, in a metrics file."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dvae_cli.core import layout
from dvae_cli.core.errors import UserError
from dvae_cli.core.files import atomic_path, check_output, write_json_atomic
from dvae_cli.core.images import as_tiles, grid_image, labelled_grid, save_png
from dvae_cli.core.runtime import resolve_runtime
from dvae_cli.core.splits import TEST
from dvae_cli.formats.artifact import check_replaceable
from dvae_cli.formats.codes import (
    PRECISION_NAMES,
    CodesHeader,
    create_codes_file,
    latent_specs,
    new_codes_file,
)
from dvae_cli.formats.dataset import DatasetInfo
from dvae_cli.formats.model_folder import load_model, load_prior, model_files
from dvae_cli.models.prior import PRIOR
from dvae_cli.models.prior.config import CodeMaps
from dvae_cli.models.prior.model import start_tokens
from dvae_cli.params import Params
from dvae_cli.scoring.metrics import sample_truth_scores
from dvae_cli.sources import dsprites

DECODE_BATCH = 256
SAMPLE_MAKER = "dvae sample"


@dataclass(frozen=True)
class SamplePaths:
    prior_dir: Path
    model_dir: Path
    picture: Path
    codes: Path
    metrics: Path
    """The samples' scores against the true images (JSON; no scores when the data is not dSprites)."""

    @classmethod
    def of(cls, family: str, **given: Path | None) -> SamplePaths:
        name = layout.prior_name(family)
        return layout.fill(cls, given, prior_dir=layout.model_dir(name), model_dir=layout.model_dir(family),
                           picture=layout.renders(name) / "prior_samples.png", codes=layout.codes(f"{family}-samples"),
                           metrics=layout.metrics(f"{family}-samples"))


@dataclass
class SampleResult:
    picture: Path
    codes: Path
    count: int
    classes: list[str]
    truth: dict[str, object] | None
    """`sample_truth_scores` of the samples (None: not dSprites data)."""
    seconds: float


def sample_labels(maps: CodeMaps, count: int) -> np.ndarray | None:
    """The class of each drawn map: the count split evenly over the classes, in class order (None: unconditioned)."""
    if not maps.num_classes:
        return None
    return np.arange(count, dtype=np.int64) * maps.num_classes // count


def check_memory(count: int, floats_per_sample: int) -> None:
    """Refuse, before any work, a count of samples whose images and codes (held in memory until written) would not
    fit in the memory the system has free."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    needed = count * floats_per_sample * 4
    if needed > free:
        raise UserError(f"prior.sample.count {count:,} would hold {needed / 1e9:.1f} GB of samples in memory, more "
                        f"than the {free / 1e9:.1f} GB free; draw fewer (--count)")


def run(params: Params, family: str, paths: SamplePaths, force: bool = False,
        truth: bool | None = None) -> SampleResult:
    """Draw code maps from the prior, decode them with the model, and write the picture, the codes file and the
    metrics file (`force`: replacing another dvae artifact there). `truth`: score the samples against the true
    dSprites images (None: when the prior's data is dSprites; True on other data is an error)."""
    started = time.perf_counter()
    settings = params.model_config(PRIOR.name).sample
    inputs = [*model_files(paths.prior_dir), *model_files(paths.model_dir)]
    check_output(paths.picture, inputs, "--out")
    check_output(paths.codes, inputs, "--codes-out")
    check_output(paths.metrics, inputs, "--metrics-out")
    check_replaceable(paths.codes, SAMPLE_MAKER, "--codes-out", force)
    runtime = resolve_runtime(params.runtime)
    prior = load_prior(paths.prior_dir, family, runtime.device)
    info = DatasetInfo.from_fields(prior.record["dataset_info"])
    if truth and not dsprites.is_dsprites(info):
        raise UserError(f"--truth scores samples against the true dSprites images, but the prior in {paths.prior_dir} "
                        f"learned codes of {info.source!r} data; leave --truth out")
    loaded = load_model(paths.model_dir, family, runtime.device)
    prior.check_model(loaded.model, paths.model_dir)
    maps = prior.maps
    # Per sample: the decoded image, its copies as a tile and in the grid, the uniforms and the drawn codes.
    check_memory(settings.count, 3 * loaded.data.channels * loaded.data.image_size ** 2 + 5 * maps.length)
    if settings.top_k is not None and settings.top_k > maps.num_codes:
        raise UserError(f"prior.sample.top_k (--top-k) is {settings.top_k} but the prior in {paths.prior_dir} models "
                        f"{maps.num_codes} codes; choose 1 to {maps.num_codes}, or null for all")
    labels = sample_labels(maps, settings.count)
    generator = torch.Generator().manual_seed(params.seed)
    uniforms = torch.rand(settings.count, maps.length, generator=generator, dtype=torch.float64).float()
    starts = start_tokens(maps, None if labels is None else torch.from_numpy(labels), settings.count)
    with runtime.autocast():
        codes = torch.cat([prior.model.sample(starts[i:i + DECODE_BATCH].to(runtime.device),
                                              uniforms[i:i + DECODE_BATCH].to(runtime.device),
                                              settings.temperature, settings.top_k).cpu()
                           for i in range(0, settings.count, DECODE_BATCH)])
        latent = {prior.record["code_map"]: codes}
        images = torch.cat([loaded.model.decode({name: values[i:i + DECODE_BATCH].to(runtime.device)
                                                 for name, values in latent.items()}).float().cpu()
                            for i in range(0, settings.count, DECODE_BATCH)])

    scores = None
    if truth is not False and dsprites.is_dsprites(info):
        nearest, iou = dsprites.nearest_images(images)
        scores = sample_truth_scores(iou, dsprites.factor_classes(nearest), dsprites.FACTOR_NAMES,
                                     dsprites.FACTOR_SIZES, dsprites.TRUE_SPRITE_IOU, asked=labels)
    class_names = list(info.class_names) if labels is not None else []
    with atomic_path(paths.picture) as tmp:
        save_png(picture(images, labels, class_names), tmp)
    header = CodesHeader(family=family, model_dir=paths.model_dir, weights_sha256=loaded.weights_sha256,
                         dataset=Path(prior.record["dataset"]), dataset_sha256=prior.record["dataset_sha256"],
                         dataset_info=info, precision=PRECISION_NAMES[runtime.autocast_dtype],
                         latent_attributes=loaded.model.latent_attributes(), written_by=SAMPLE_MAKER)
    copied = {"split": np.full(settings.count, TEST, dtype=np.uint8)}
    if labels is not None:
        copied["labels"] = labels
    specs = latent_specs(loaded.model, latent)
    with atomic_path(paths.codes) as tmp, new_codes_file(tmp) as file:
        datasets = create_codes_file(file, header, copied, loaded.model, specs, min(settings.count, 1024))
        for spec in specs:
            datasets[spec.name][:] = latent[spec.name].numpy().astype(spec.dtype)
    write_json_atomic(paths.metrics, {"samples": settings.count, "truth": scores})
    return SampleResult(picture=paths.picture, codes=paths.codes, count=settings.count, classes=class_names,
                        truth=scores, seconds=time.perf_counter() - started)


def picture(images: torch.Tensor, labels: np.ndarray | None, class_names: list[str]) -> Image.Image:
    """The drawn images as a grid: one labelled row per class when conditional (classes with equal counts)."""
    tiles = as_tiles(images)
    if labels is None:
        return grid_image(tiles, min(16, len(tiles)))
    counts = np.bincount(labels, minlength=len(class_names))
    columns = int(counts.max())
    rows = []
    for label in range(len(class_names)):
        chosen = tiles[torch.from_numpy(labels == label)]
        padding = torch.ones(columns - len(chosen), *tiles.shape[1:])
        rows.append(torch.cat([chosen, padding]))
    return labelled_grid(torch.cat(rows), columns, [[name] for name in class_names])
