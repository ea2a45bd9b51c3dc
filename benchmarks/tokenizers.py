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
--smoke: the FSQ and residual variants (unless --variant) on 600 images at 32×32, a few steps each, into a temporary
folder (unless --out), in seconds; a check that the benchmark still runs, its figures meaningless.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from dvae_cli.params import Params, load_params, parse_set_options
from dvae_cli.scoring.rate_distortion import RatePoint
from dvae_cli.stages import compare, encode, prepare, prior, train
from dvae_cli.stages.compare import best_at_most
from dvae_cli.stages.encode import EncodePaths
from dvae_cli.stages.train import TrainPaths

FAMILY = "vqvae"
VARIANTS = {
    "vq-K64": [],  # the default: 16×16 codes of K = 64, 1,536 bits
    "fsq-8x8": ["vqvae.quantizer=fsq", "vqvae.fsq_levels=[8, 8]"],  # FSQ at the default's rate: K = 64
    "fsq-8x5x5x5-down8": ["vqvae.quantizer=fsq", "vqvae.downsample=8"],  # 8×8 codes of K = 1,000: 638 bits
    "rvq-K64-down8": ["vqvae.quantizer=rvq", "vqvae.downsample=8", "vqvae.rvq_depth=5"],  # 384 bits a stage
}
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
    print("classic methods (the last variant's compare):")
    for point in classic:
        print(f"  {point['method']:<16} {point['setting']:<10} {point['bits_per_image']:9.1f} bits "
              f"{point['psnr']:6.2f} dB")
    print(f"target: the best tokenizer's plain codes ≥ {TARGET_MARGIN_DB} dB above patch k-means at every rate from "
          f"{RATE_RANGE[0]} to {RATE_RANGE[1]} bits per image")
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({"variants": variants, "classic": classic,
                                            "target": {"rate_range": RATE_RANGE, "margin_db": TARGET_MARGIN_DB}},
                                           indent=2) + "\n")


if __name__ == "__main__":
    main()
