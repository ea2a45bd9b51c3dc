"""The prior over VQ-VAE codes: training tokens/s of dvae's loop against a plain eager loop, and sampling with a
key/value cache against sampling without.

Usage: python benchmarks/prior_speed.py [--steps N] [--rounds R] [--samples S] [--smoke]

Setup (once): the quick default's dSprites subset at 64×64 (4,000 images), the shipped VQ-VAE trained 40 steps and
its codes: 16×16 code maps of K = 64 codes, so 256 tokens a map, conditioned on the shape. The prior is the shipped
`prior:` section.
Training, alternating for R rounds, each in a fresh interpreter (nothing process-wide that dvae sets reaches the
baseline): dvae is `dvae prior` itself (`stages.prior.run` through the shared trainer), timed over its second
half of steps from its logged rows/s; the baseline feeds the same model and rows through
`torch.utils.data.DataLoader(TensorDataset(rows), shuffle=True)` with torch's default Adam, eager fp32, timed over
its second half. Printed: median tokens/s of each and the median of the per-round ratios.
Ceiling: the prior's forward+backward FLOPs per token against the fp32 matmul peak measured here.
Sampling: S maps drawn by `CodePrior.sample` with and without the cache (same uniforms, so the same codes, checked);
medians over R rounds and their ratio.
--smoke: the same at 400 images, the VQ-VAE trained 4 steps, 4 prior steps, 1 round and 2 samples, in seconds; a
check that the benchmark still runs, its figures meaningless.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from dvae_cli.core.splits import TRAIN
from dvae_cli.models.prior.model import CodePrior, start_tokens
from dvae_cli.params import build_params
from dvae_cli.stages import encode, prepare, prior, train
from dvae_cli.stages.encode import EncodePaths
from dvae_cli.stages.prior import PriorPaths, read_code_maps
from dvae_cli.stages.train import TrainPaths

RAW = {"data": {"dataset": "dsprites", "image_size": 64, "subset": 4000}, "train": {"eval_every": None}}


def make_codes(root: Path, images: int, steps: int) -> None:
    params = build_params({**RAW, "data": {**RAW["data"], "subset": images},
                           "train": {"max_steps": steps, "eval_every": None}})
    dataset = root / "dataset.h5"
    prepare.run(params, prepare.PreparePaths(dataset), show_progress=False)
    train.run(params, "vqvae", TrainPaths(dataset, root / "vqvae", root / "live-vqvae"), show_progress=False)
    encode.run(params, "vqvae", EncodePaths(dataset, root / "vqvae", root / "codes.h5"), show_progress=False)


def time_dvae(root: str, steps: int, round_: int) -> float:
    """Tokens/s of `dvae prior` over its second half of steps."""
    half = steps // 2
    params = build_params({**RAW, "train": {"max_steps": steps, "log_every": half, "checkpoint_every": steps,
                                            "eval_every": None}})
    folder = Path(root) / f"dvae-{round_}"
    paths = PriorPaths(codes=Path(root) / "codes.h5", model_dir=Path(root) / "vqvae", out=folder / "prior",
                       live_dir=folder / "live", metrics=folder / "metrics.json")
    prior.run(params, "vqvae", paths, show_progress=False)
    rows = json.loads((folder / "live" / "plots" / "train.json").read_text())
    maps = json.loads((folder / "prior" / "config.json").read_text())["maps"]
    return rows[-1]["train/images_per_second"] * maps["height"] * maps["width"]


def time_baseline(root: str, steps: int) -> float:
    """Tokens/s of a plain loop: DataLoader over the same rows, the same model, Adam, eager fp32."""
    params = build_params(RAW)
    data = read_code_maps(Path(root) / "codes.h5", Path(root) / "vqvae", "vqvae", params.model_config("prior").conditional)
    torch.manual_seed(0)
    model = CodePrior(params.model_config("prior"), data.maps)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.model_config("prior").lr)
    loader = DataLoader(TensorDataset(data.rows[TRAIN]), batch_size=params.model_config("prior").batch_size, shuffle=True,
                        drop_last=True)
    batches = iter(loader)
    started = 0.0
    for step in range(steps):
        if step == steps // 2:
            started = time.perf_counter()
        try:
            (rows,) = next(batches)
        except StopIteration:
            batches = iter(loader)
            (rows,) = next(batches)
        loss = model.loss(rows, step).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    return (steps - steps // 2) * params.model_config("prior").batch_size * data.maps.length / seconds


def time_sampling(root: str, samples: int, rounds: int) -> tuple[float, float]:
    params = build_params(RAW)
    data = read_code_maps(Path(root) / "codes.h5", Path(root) / "vqvae", "vqvae", params.model_config("prior").conditional)
    torch.manual_seed(0)
    model = CodePrior(params.model_config("prior"), data.maps).eval()
    labels = torch.arange(samples) * data.maps.num_classes // samples
    starts = start_tokens(data.maps, labels, samples)
    uniforms = torch.rand(samples, data.maps.length, generator=torch.Generator().manual_seed(0))
    cached, uncached = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        with_cache = model.sample(starts, uniforms, cache=True)
        cached.append(time.perf_counter() - started)
        started = time.perf_counter()
        without = model.sample(starts, uniforms, cache=False)
        uncached.append(time.perf_counter() - started)
        assert torch.equal(with_cache, without), "cached and uncached samplers disagree"
    return statistics.median(cached), statistics.median(uncached)


def ceiling(root: str) -> tuple[float, float]:
    """Forward+backward FLOPs per token of the prior (torch's FlopCounterMode) and the fp32 matmul peak (FLOP/s) of
    a 1024² product here: tokens/s can go no higher than their ratio."""
    params = build_params(RAW)
    data = read_code_maps(Path(root) / "codes.h5", Path(root) / "vqvae", "vqvae", params.model_config("prior").conditional)
    model = CodePrior(params.model_config("prior"), data.maps)
    rows = data.rows[TRAIN][:params.model_config("prior").batch_size]
    with FlopCounterMode(display=False) as counter:
        model.loss(rows, 0).loss.backward()
    per_token = counter.get_total_flops() / rows[:, 1:].numel()
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    started = time.perf_counter()
    for _ in range(20):
        a @ b
    return per_token, 20 * 2 * 1024**3 / (time.perf_counter() - started)


def fresh_interpreter(smoke: bool) -> Executor:
    """Where one measurement runs: a fresh interpreter, so that nothing process-wide one sets reaches the next; a smoke
    run saves the start and runs it in a thread of this one."""
    return ThreadPoolExecutor(1) if smoke else ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: check that the benchmark runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.rounds, args.samples = 4, 1, 2
    with tempfile.TemporaryDirectory() as folder:
        make_codes(Path(folder), 400 if args.smoke else RAW["data"]["subset"], 4 if args.smoke else 40)
        ours, theirs, ratios = [], [], []
        for round_ in range(args.rounds):
            with fresh_interpreter(args.smoke) as pool:
                ours.append(pool.submit(time_dvae, folder, args.steps, round_).result())
            with fresh_interpreter(args.smoke) as pool:
                theirs.append(pool.submit(time_baseline, folder, args.steps).result())
            ratios.append(ours[-1] / theirs[-1])
            print(f"round {round_ + 1}: dvae prior {ours[-1]:,.0f} tokens/s, DataLoader loop {theirs[-1]:,.0f} "
                  f"tokens/s ({ratios[-1]:.2f}×)", flush=True)
        print(f"training: dvae prior {statistics.median(ours):,.0f} tokens/s, plain DataLoader loop "
              f"{statistics.median(theirs):,.0f} tokens/s, median ratio {statistics.median(ratios):.2f}×")
        with fresh_interpreter(args.smoke) as pool:
            per_token, peak = pool.submit(ceiling, folder).result()
        print(f"ceiling: {per_token / 1e6:.2f} MFLOP per token (forward+backward), fp32 matmul peak "
              f"{peak / 1e9:.0f} GFLOP/s → at most {peak / per_token:,.0f} tokens/s; dvae reaches "
              f"{statistics.median(ours) * per_token / peak:.0%} of it, the DataLoader loop "
              f"{statistics.median(theirs) * per_token / peak:.0%}")
        with fresh_interpreter(args.smoke) as pool:
            cached, uncached = pool.submit(time_sampling, folder, args.samples, args.rounds).result()
        print(f"sampling {args.samples} maps of 256 codes: with the key/value cache {cached:.2f} s, without "
              f"{uncached:.2f} s ({uncached / cached:.1f}×), same codes")


if __name__ == "__main__":
    main()
