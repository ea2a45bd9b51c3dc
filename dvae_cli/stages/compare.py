"""`dvae compare`: rate–distortion on the test split. PSNR against bits per image for the model's codes at log2 K bits
a code, the same codes coded with the prior's NLL (what an arithmetic coder driven by the prior reaches), and the
classic methods they stand in for: k-means palettes per image, k-means over 4×4 patches, JPEG and WebP."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dvae_cli.core import layout
from dvae_cli.core.errors import UserError
from dvae_cli.core.files import check_output, write_bytes_atomic, write_json_atomic
from dvae_cli.core.progress import progress_bar
from dvae_cli.core.runtime import resolve_runtime
from dvae_cli.core.splits import SPLIT_NAMES, TRAIN
from dvae_cli.formats.codes import CodesFile
from dvae_cli.formats.dataset import DatasetFile
from dvae_cli.formats.model_folder import load_model, load_prior, model_files
from dvae_cli.models import code_map_name
from dvae_cli.models.prior.model import training_rows
from dvae_cli.params import Params
from dvae_cli.scoring.rate_distortion import (
    RatePoint,
    csv_bytes,
    palette_kmeans,
    patch_kmeans,
    pillow_codec,
    plot_png,
    psnr_of,
)

BATCH = 256


@dataclass(frozen=True)
class ComparePaths:
    dataset: Path
    model_dir: Path
    codes: Path
    prior_dir: Path
    table: Path
    """The CSV of every point (a `dvc plots` file)."""
    picture: Path
    metrics: Path

    @classmethod
    def of(cls, family: str, **given: Path | None) -> ComparePaths:
        name = layout.prior_name(family)
        return layout.fill(cls, given, dataset=layout.DATASET, model_dir=layout.model_dir(family),
                           codes=layout.codes(family), prior_dir=layout.model_dir(name),
                           table=layout.renders(name) / "rate_distortion.csv",
                           picture=layout.renders(name) / "rate_distortion.png",
                           metrics=layout.metrics(f"{family}-rate-distortion"))


@dataclass
class CompareResult:
    points: list[RatePoint]
    summary: dict[str, Any]
    seconds: float


def best_at_most(points: list[RatePoint], method: str, bits: float) -> float | None:
    """The best PSNR `method` reaches with at most `bits` per image (None: it never gets that low)."""
    reached = [point.psnr for point in points if point.method == method and point.bits_per_image <= bits]
    return max(reached) if reached else None


def run(params: Params, family: str, paths: ComparePaths, show_progress: bool = True) -> CompareResult:
    """Every rate–distortion point on the evaluation split, into the table, the plot and the summary."""
    started = time.perf_counter()
    code_map = code_map_name(family)
    inputs = [paths.dataset, paths.codes, *model_files(paths.model_dir), *model_files(paths.prior_dir)]
    for path, option in ((paths.table, "--table"), (paths.picture, "--out"), (paths.metrics, "--metrics")):
        check_output(path, inputs, option)
    runtime = resolve_runtime(params.runtime)
    loaded = load_model(paths.model_dir, family, runtime.device)
    prior = load_prior(paths.prior_dir, family, runtime.device)
    with DatasetFile(paths.dataset) as dataset:
        split = dataset.evaluation_split()
        rows = dataset.indices(split)
        images = dataset.read_images(rows)
        train_images = dataset.read_images(dataset.indices(TRAIN))
    with CodesFile(paths.codes, family) as codes_file:
        codes_file.check_codebook(loaded.model, paths.model_dir)
        if len(codes_file) != len(dataset.split):
            raise UserError(f"{paths.codes} has {len(codes_file)} rows, {paths.dataset} {len(dataset.split)}: the "
                            f"codes of another dataset; re-run `dvae encode --model {family}`")
        codes = torch.from_numpy(codes_file.read_at(code_map, rows).astype(np.int64))
        labels = codes_file.read_at("labels", rows)
    if prior.maps.num_classes and labels is None:
        raise UserError(f"{paths.prior_dir} is conditioned on classes but {paths.codes} has no labels; pass the codes "
                        f"file the prior was trained on")
    prior.check_model(loaded.model, paths.model_dir)

    maps = prior.maps
    # Residual codes give a rate per depth d: their first d stages, and the prior's NLL of those codes alone
    # (depth 0: plain code maps, one rate).
    depths = list(range(1, maps.depth + 1)) or [0]
    lengths = tuple(maps.height * maps.width * max(depth, 1) for depth in depths)
    with progress_bar(f"compare {family}", 6, enabled=show_progress) as advance, torch.no_grad():
        prior_rows = training_rows(maps, codes, torch.from_numpy(labels.astype(np.int64)) if maps.num_classes else None)
        with runtime.autocast():
            nll = prior.model.map_nll(prior_rows, prefixes=lengths)
        prior_bits = [nll[:, i].contiguous().mean().item() / math.log(2) for i in range(len(lengths))]
        points = []
        for depth, length, depth_prior_bits in zip(depths, lengths, prior_bits, strict=True):
            kept = codes[:, :depth] if depth else codes
            decoded = torch.cat([loaded.model.decode({code_map: kept[i:i + BATCH].to(runtime.device)}).float().cpu()
                                 for i in range(0, len(codes), BATCH)])
            model_psnr = psnr_of(images, decoded.numpy())
            code_bits = length * math.log2(maps.num_codes)
            stages = f", depth {depth}" if depth else ""
            points += [RatePoint(family, f"K={maps.num_codes}{stages}", code_bits, model_psnr),
                       RatePoint(f"{family}+prior", f"prior NLL{stages}", depth_prior_bits, model_psnr)]
        prior_bits = prior_bits[-1]
        advance()
        points += palette_kmeans(images)
        advance()
        points += patch_kmeans(train_images, images, seed=params.seed)
        advance()
        points += pillow_codec(images, "jpeg")
        advance()
        points += pillow_codec(images, "webp")
        advance()
        title = f"{family} on {len(images):,} {SPLIT_NAMES[split]} images: rate–distortion"
        write_bytes_atomic(paths.table, csv_bytes(points))
        write_bytes_atomic(paths.picture, plot_png(points, title))
        baselines = sorted({point.method for point in points} - {family, f"{family}+prior"})
        summary = {family: {"bits_per_image": code_bits, "psnr": model_psnr},
                   f"{family}+prior": {"bits_per_image": prior_bits, "psnr": model_psnr},
                   "best_psnr_at_prior_bits": {method: best_at_most(points, method, prior_bits)
                                               for method in baselines},
                   "images": len(images)}
        write_json_atomic(paths.metrics, summary)
        advance()
    return CompareResult(points=points, summary=summary, seconds=time.perf_counter() - started)

