"""Tokenizers on one rate–distortion plane: VQ-VAEs with each quantizer (vq, fsq, rvq), plain and with their prior,
beside 4×4 patch k-means, on the default data.

Usage: python benchmarks/tokenizers.py [--variant NAME ...] [--out runs/tokenizers] [--results FILE] [--smoke]
Targets (issue 27, default data): the best tokenizer's plain codes at least 2 dB above 4×4 patch k-means at every
rate from 512 to 2,048 bits per image; with priors, a tokenizer point at fewer bits than WebP's lowest quality with
a higher PSNR.

Each variant runs the VQ-VAE chain as `dvc repro` does, with params.yaml and the variant's overrides: train, encode,
prior and compare (on the test split; the dataset is prepared once), into OUT/NAME/ (model/, codes.h5, prior/,
rate_distortion.csv, timing.json); a finished variant is run again only with --restart. A residual VQ-VAE gives a
point per depth. For every tokenizer point the script prints the best PSNR of 4×4 patch k-means at no more bits and
the margin, and the classic methods' points once.
So that "with a prior" is compared with "with a prior", the index maps of 4×4 patch k-means (K = 16, 64, 256, learned
as `dvae compare` learns them) are entropy-coded the same way: the same prior (params.yaml's `prior`: architecture,
epochs, class conditioning) trained by the same loop on the train split's index maps, its test NLL in bits per image
(OUT/patch-kmeans/K*/).
--smoke: the FSQ and residual variants (unless --variant) on 600 images at 32×32, a few steps each, into a temporary
folder (unless --out), in seconds; a check that the benchmark still runs, its figures meaningless.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from dvae_cli.core.splits import TRAIN, VAL
from dvae_cli.formats.dataset import DatasetFile
from dvae_cli.models.prior.config import CodeMaps
from dvae_cli.models.prior.model import training_rows
from dvae_cli.params import Params, load_params, parse_set_options
from dvae_cli.scoring.rate_distortion import PatchCodebook, RatePoint, patch_samples, psnr_of
from dvae_cli.stages import compare, encode, prepare, prior, train
from dvae_cli.stages.compare import best_at_most
from dvae_cli.stages.encode import EncodePaths
from dvae_cli.stages.train import TrainPaths
from dvae_cli.trainer import fit, training_run

FAMILY = "vqvae"
VARIANTS = {
    "vq-K64": [],  # the default: 16×16 codes of K = 64, 1,536 bits
    "fsq-8x8": ["vqvae.quantizer=fsq", "vqvae.fsq_levels=[8, 8]"],  # FSQ at the default's rate: K = 64
    "fsq-8x5x5x5-down8": ["vqvae.quantizer=fsq", "vqvae.downsample=8"],  # 8×8 codes of K = 1,000: 638 bits
    "rvq-K64-down8": ["vqvae.quantizer=rvq", "vqvae.downsample=8", "vqvae.rvq_depth=5"],  # 384 bits a stage
}
PATCH_SIZES = (16, 64, 256)
PATCH = 4
RATE_RANGE = (512, 2048)
TARGET_MARGIN_DB = 2.0
PATCH_KMEANS = "kmeans-patch4x4"
SMOKE_VARIANTS = ["fsq-8x8", "rvq-K64-down8"]
SMOKE_SETTINGS = ["data.subset=600", "data.image_size=32", "train.max_steps=6", "prior.width=16", "prior.layers=1",
                  "prior.heads=2"]


def run_variant(params: Params, dataset: Path, folder: Path, restart: bool) -> None:
    """The VQ-VAE chain for one variant into `folder`; timing.json is written last, once all is done."""
    folder.mkdir(parents=True, exist_ok=True)
    model, codes, prior_dir = folder / "model", folder / "codes.h5", folder / "prior"
    started = time.perf_counter()
    train.run(params, FAMILY, TrainPaths(dataset, model, folder / "dvclive"), restart=restart, show_progress=False)
    train_seconds = time.perf_counter() - started
    encode.run(params, FAMILY, EncodePaths(dataset, model, codes), show_progress=False)
    prior_started = time.perf_counter()
    prior.run(params, FAMILY, prior.PriorPaths.of(FAMILY, codes=codes, model_dir=model, out=prior_dir,
                                                  live_dir=folder / "dvclive-prior", metrics=folder / "prior.json"),
              restart=restart, show_progress=False, force=True)
    prior_seconds = time.perf_counter() - prior_started
    compare.run(params, FAMILY, compare.ComparePaths.of(
        FAMILY, dataset=dataset, model_dir=model, codes=codes, prior_dir=prior_dir,
        table=folder / "rate_distortion.csv", picture=folder / "rate_distortion.png",
        metrics=folder / "rate_distortion.json"), show_progress=False)
    (folder / "timing.json").write_text(json.dumps({"train_seconds": train_seconds, "prior_seconds": prior_seconds}))


def patch_kmeans_with_prior(params: Params, dataset: Path, folder: Path, size: int, restart: bool) -> dict:
    """4×4 patch k-means with K = `size` (as `dvae compare` learns it), its test index maps decoded (PSNR) and coded
    by a prior trained on the train split's maps with `params`' prior settings, into `folder`."""
    with DatasetFile(dataset) as data:
        images, split, labels, info = data.read_images(), data.split, data.labels, data.info
        evaluation = data.evaluation_split()
    started = time.perf_counter()
    codebook = PatchCodebook.fit(patch_samples(images[split == TRAIN], PATCH, params.seed).astype(np.float32), size,
                                 PATCH, params.seed)
    index_maps = codebook.codes(images)
    test = split == evaluation
    psnr = psnr_of(images[test], codebook.decode(index_maps[test], images.shape[1]))
    conditional = params.model_config("prior").conditional and labels is not None
    maps = CodeMaps(height=index_maps.shape[1], width=index_maps.shape[2], num_codes=size,
                    num_classes=info.num_classes if conditional else 0)
    every = training_rows(maps, torch.from_numpy(index_maps), torch.from_numpy(labels) if conditional else None)
    rows = {index: every[torch.from_numpy(split == index)] for index in (TRAIN, VAL, evaluation)}
    record = {"codes": f"4×4 patch k-means, K={size}", "codes_sha256": hashlib.sha256(index_maps.tobytes()).hexdigest(),
              "dataset": str(dataset)}
    paths = prior.PriorPaths.of(FAMILY, codes=dataset, model_dir=dataset, out=folder / "prior",
                                live_dir=folder / "dvclive", metrics=folder / "prior.json")
    with training_run(params, paths.folders, force=True) as (runtime, cluster):
        job = prior.PriorTraining(params, FAMILY, paths, prior.CodeMapRows(maps, rows, evaluation, record), runtime)
        fit(params, paths.folders, job, runtime, cluster, restart, show_progress=False)
    test_bits = json.loads(paths.metrics.read_text())["test"]["bits_per_image"]
    return {"K": size, "bits_per_image": maps.length * np.log2(size), "prior_bits_per_image": test_bits,
            "psnr": psnr, "minutes": (time.perf_counter() - started) / 60}


def read_points(folder: Path) -> list[RatePoint]:
    return [RatePoint(row["method"], row["setting"], float(row["bits_per_image"]), float(row["psnr"]))
            for row in csv.DictReader((folder / "rate_distortion.csv").open())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", choices=list(VARIANTS), help="repeatable (default: all)")
    parser.add_argument("--out", type=Path, help="default: runs/tokenizers, with --smoke a temporary folder")
    parser.add_argument("--results", type=Path, help="write every point and the margins here as JSON")
    parser.add_argument("--restart", action="store_true", help="run again even where a variant has finished")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: check that the benchmark runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        args.out = args.out or (Path(scratch) if args.smoke else Path("runs/tokenizers"))
        run(args)


def run(args: argparse.Namespace) -> None:
    overrides = SMOKE_SETTINGS if args.smoke else []
    dataset = args.out / "dataset.h5"
    if not dataset.exists():
        prepare.run(load_params("params.yaml", parse_set_options(overrides)), prepare.PreparePaths(dataset),
                    show_progress=False)
    variants, classic = {}, None
    for name in args.variant or (SMOKE_VARIANTS if args.smoke else VARIANTS):
        folder = args.out / name
        if args.restart or not (folder / "timing.json").exists():
            (folder / "timing.json").unlink(missing_ok=True)
            params = load_params("params.yaml", parse_set_options([*overrides, *VARIANTS[name]]))
            run_variant(params, dataset, folder, args.restart)
        points = read_points(folder)
        classic = [asdict(point) for point in points if not point.method.startswith(FAMILY)]
        timing = json.loads((folder / "timing.json").read_text())
        tokenizer = [{**asdict(point), "patch_kmeans_psnr": best_at_most(points, PATCH_KMEANS, point.bits_per_image)}
                     for point in points if point.method.startswith(FAMILY)]
        variants[name] = {"overrides": VARIANTS[name], "train_minutes": timing["train_seconds"] / 60,
                          "prior_minutes": timing["prior_seconds"] / 60, "points": tokenizer}
        print(f"{name} ({' '.join(VARIANTS[name]) or 'params.yaml'}): training {timing['train_seconds'] / 60:.1f} "
              f"min, prior {timing['prior_seconds'] / 60:.1f} min", flush=True)
        for point in tokenizer:
            baseline = point["patch_kmeans_psnr"]
            versus = ("no patch k-means point at so few bits" if baseline is None else
                      f"patch k-means {baseline:.2f} dB at ≤ as many bits, margin {point['psnr'] - baseline:+.2f} dB")
            print(f"  {point['method']:<12} {point['setting']:<22} {point['bits_per_image']:8.1f} bits "
                  f"{point['psnr']:6.2f} dB   {versus}")
    patch_with_prior = []
    for size in PATCH_SIZES[:1] if args.smoke else PATCH_SIZES:
        folder = args.out / "patch-kmeans" / f"K{size}"
        result_file = folder / "result.json"
        if args.restart or not result_file.exists():
            folder.mkdir(parents=True, exist_ok=True)
            params = load_params("params.yaml", parse_set_options(overrides))
            result_file.write_text(json.dumps(patch_kmeans_with_prior(params, dataset, folder, size, args.restart)))
        patch_with_prior.append(json.loads(result_file.read_text()))
        point = patch_with_prior[-1]
        print(f"4×4 patch k-means K={size} + prior: {point['prior_bits_per_image']:.1f} bits "
              f"(plain {point['bits_per_image']:.0f}), {point['psnr']:.2f} dB, {point['minutes']:.1f} min", flush=True)
    print("classic methods (the last variant's compare):")
    for point in classic:
        print(f"  {point['method']:<16} {point['setting']:<10} {point['bits_per_image']:9.1f} bits "
              f"{point['psnr']:6.2f} dB")
    print(f"target: the best tokenizer's plain codes ≥ {TARGET_MARGIN_DB} dB above patch k-means at every rate from "
          f"{RATE_RANGE[0]} to {RATE_RANGE[1]} bits per image")
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({"variants": variants, "classic": classic,
                                            "patch_kmeans_with_prior": patch_with_prior,
                                            "target": {"rate_range": RATE_RANGE, "margin_db": TARGET_MARGIN_DB}},
                                           indent=2) + "\n")


if __name__ == "__main__":
    main()
