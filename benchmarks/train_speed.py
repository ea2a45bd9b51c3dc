"""Training images/s of dvae's trainer beside the way reference implementations feed the same model.

Usage: python benchmarks/train_speed.py [--model jointvae|vqvae] [--steps N] [--rounds R] [--device auto|cpu|cuda]
                                        [--smoke]

dvae: `dvae_cli.stages.train.run` itself (uint8 data in memory, batched by index, channels_last, autocast where
the runtime picks it, glibc keeping freed memory on CPU), timed over its second half of steps (the first half
warms up).
baseline, measured in the same run: the same model fed by a per-item `Dataset` with
`transforms.ToTensor()` through `torch.utils.data.DataLoader` (shuffle, default workers), NCHW, eager fp32.
Every measurement runs in a fresh interpreter, so nothing process-wide that dvae sets reaches the baseline;
the two alternate for R rounds and the medians are printed, with the median of the per-round ratios (these
shared machines drift by tens of percent within minutes; a ratio of neighbouring runs holds).
Also printed: forward+backward FLOPs per image (torch's FlopCounterMode), and the fraction of the resulting
ceiling each reaches at the fp32 matmul peak measured in the same interpreter right after it (median of rounds).
--smoke: the same runs at batch 8, 4 steps, 1 round and a 256² matmul peak, in seconds; a check that the benchmark
still runs, its figures meaningless.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

from dvae_cli.core.runtime import resolve_runtime
from dvae_cli.formats.dataset import DatasetChunk, DatasetInfo, DatasetWriter
from dvae_cli.models import get_family
from dvae_cli.models.base import DataShape
from dvae_cli.params import build_params, load_params
from dvae_cli.sources.dsprites import DSpritesRenderer
from dvae_cli.stages import train
from dvae_cli.stages.train import TrainPaths

SMOKE_BATCH = 8


@dataclass(frozen=True)
class Setup:
    name: str
    family: str
    model: dict
    channels: int
    image_size: int
    batch_size: int


def setups(family: str) -> list[Setup]:
    if family == "jointvae":
        return [Setup("jointvae dSprites 64×64 (reference architecture), batch 64", "jointvae",
                      {"continuous": 6, "discrete": [3], "batch_size": 64}, 1, 64, 64)]
    shipped = load_params(Path("params.yaml"), missing_ok=True).model_config("vqvae")
    quick = {key: getattr(shipped, key) for key in ("hidden", "res_blocks", "downsample", "num_codes", "code_dim",
                                                    "batch_size")}
    cifar = {"hidden": 256, "res_blocks": 2, "downsample": 4, "num_codes": 512, "code_dim": 64, "batch_size": 128}
    return [Setup("vqvae quick config (params.yaml), dSprites 64×64, batch 64", "vqvae", quick, 1, 64, 64),
            Setup("vqvae CIFAR-10 architecture (paper), 3×32×32, batch 128", "vqvae", cifar, 3, 32, 128)]


def make_images(setup: Setup, count: int) -> np.ndarray:
    if setup.channels == 1 and setup.image_size == 64:
        rows = np.random.default_rng(0).choice(737_280, size=count, replace=False)
        return DSpritesRenderer().render(np.sort(rows))
    return np.random.default_rng(0).integers(0, 256, (count, setup.channels, setup.image_size, setup.image_size),
                                             dtype=np.uint8)


def write_dataset(path: Path, images: np.ndarray) -> None:
    info = DatasetInfo(source="benchmark", image_size=images.shape[-1], channels=images.shape[1])
    writer = DatasetWriter(path, info, {})
    writer.append(DatasetChunk(images=images))
    writer.finish(np.zeros(len(images), dtype=np.uint8))


def dvae_images_per_second(setup: Setup, dataset: Path, steps: int, device: str, folder: Path) -> float:
    params = build_params({setup.family: {**setup.model, "epochs": 1000},
                           "train": {"max_steps": steps, "log_every": steps // 2, "checkpoint_every": 10**9},
                           "runtime": {"device": device}})
    paths = TrainPaths(dataset, folder / "models" / setup.family, folder / "dvclive" / setup.family)
    train.run(params, setup.family, paths, restart=True, show_progress=False)
    rows = json.loads((paths.live_dir / "plots" / "train.json").read_text())
    return float(rows[-1]["train/images_per_second"])


class PerItemImages(Dataset):
    """How reference implementations feed data: one HWC uint8 array per item through ToTensor."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
        self.to_tensor = transforms.ToTensor()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.to_tensor(self.images[index])


def baseline_images_per_second(setup: Setup, images: np.ndarray, steps: int, device: torch.device) -> float:
    params = build_params({setup.family: setup.model})
    torch.manual_seed(0)
    model = get_family(setup.family).model(params.model_config(setup.family),
                        DataShape(setup.channels, setup.image_size, 0.05)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loader = DataLoader(PerItemImages(images), batch_size=setup.batch_size, shuffle=True, drop_last=True)
    done, timed_images, started = 0, 0, 0.0
    while done < steps:
        for x in loader:
            if done == steps // 2:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started, timed_images = time.perf_counter(), 0
            loss = model.loss(x.to(device), done).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            timed_images += len(x)
            if done == steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return timed_images / (time.perf_counter() - started)


def flops_per_image(setup: Setup) -> float:
    params = build_params({setup.family: setup.model})
    model = get_family(setup.family).model(params.model_config(setup.family), DataShape(setup.channels, setup.image_size))
    x = torch.rand(8, setup.channels, setup.image_size, setup.image_size)
    model.loss(x, 0)  # the quantizer initialises on its first training batch; count a steady step
    with FlopCounterMode(display=False) as counter:
        model.loss(x, 1).loss.backward()
    return counter.get_total_flops() / len(x)


def matmul_peak_gflops(device: torch.device, size: int) -> float:
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def measure(kind: str, setup: Setup, steps: int, device: str, folder: Path, matmul_size: int) -> tuple[float, float]:
    """One measurement, run in its own interpreter by `main`: images/s, then the matmul peak measured right after."""
    torch_device = resolve_runtime(build_params({"runtime": {"device": device}}).runtime).device
    if kind == "dvae":
        speed = dvae_images_per_second(setup, folder / f"{setup.family}.h5", steps, device, folder)
    else:
        speed = baseline_images_per_second(setup, np.load(folder / f"{setup.family}.npy"), steps, torch_device)
    return speed, matmul_peak_gflops(torch_device, matmul_size)


def fresh_interpreter(smoke: bool) -> Executor:
    """Where one measurement runs: a fresh interpreter, so that nothing process-wide one sets reaches the next; a smoke
    run saves the start and runs it in a thread of this one."""
    return ThreadPoolExecutor(1) if smoke else ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("jointvae", "vqvae"), default="jointvae")
    parser.add_argument("--steps", type=int, default=60, help="training steps per measurement (timed: the second half)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating dvae/baseline measurements per setup")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: check that the benchmark runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.rounds = 4, 1
    matmul_size = 256 if args.smoke else 2048
    device = resolve_runtime(build_params({"runtime": {"device": args.device}}).runtime).device
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = []
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        for setup in setups(args.model):
            if args.smoke:
                setup = replace(setup, name=f"{setup.name} (smoke: batch {SMOKE_BATCH})", batch_size=SMOKE_BATCH,
                                model={**setup.model, "batch_size": SMOKE_BATCH})
            steps = args.steps if setup.model.get("hidden", 0) < 256 else max(10, args.steps // 3)
            images = make_images(setup, max(4096, setup.batch_size * (steps + 1)))
            np.save(folder / f"{setup.family}.npy", images)
            write_dataset(folder / f"{setup.family}.h5", images)
            flops = flops_per_image(setup)
            speeds: dict[str, list[float]] = {"dvae": [], "baseline": []}
            shares: dict[str, list[float]] = {"dvae": [], "baseline": []}
            peaks = []
            for round_index in range(args.rounds):
                order = ("dvae", "baseline") if round_index % 2 == 0 else ("baseline", "dvae")
                for kind in order:
                    with fresh_interpreter(args.smoke) as pool:
                        speed, peak = pool.submit(measure, kind, setup, steps, args.device, folder,
                                                  matmul_size).result()
                    speeds[kind].append(speed)
                    shares[kind].append(speed * flops / (peak * 1e9))
                    peaks.append(peak)
                print(f"  round {round_index + 1}: dvae {speeds['dvae'][-1]:.1f}, baseline "
                      f"{speeds['baseline'][-1]:.1f} images/s", flush=True)
            ours, baseline = statistics.median(speeds["dvae"]), statistics.median(speeds["baseline"])
            ratios = [a / b for a, b in zip(speeds["dvae"], speeds["baseline"])]
            speedup = statistics.median(ratios)
            our_share, baseline_share = statistics.median(shares["dvae"]), statistics.median(shares["baseline"])
            results.append({"setup": setup.name, "rounds": args.rounds, "dvae_images_per_s": round(ours, 1),
                            "baseline_images_per_s": round(baseline, 1), "speedup": round(speedup, 2),
                            "speedup_min": round(min(ratios), 2), "speedup_max": round(max(ratios), 2),
                            "gflop_per_image": round(flops / 1e9, 4),
                            "matmul_peak_gflops": [round(min(peaks)), round(max(peaks))],
                            "dvae_fraction_of_ceiling": round(our_share, 3),
                            "baseline_fraction_of_ceiling": round(baseline_share, 3)})
            print(f"{setup.name}\n  dvae {ours:8.1f} images/s   baseline {baseline:8.1f} images/s   (medians of "
                  f"{args.rounds} rounds)\n  speedup {speedup:.2f}× (median of the rounds' ratios; "
                  f"{min(ratios):.2f}–{max(ratios):.2f})\n  {flops / 1e9:.4f} GFLOP/image fwd+bwd; share of the "
                  f"ceiling (matmul peak {min(peaks):.0f}–{max(peaks):.0f} GFLOP/s): dvae {our_share:.0%}, "
                  f"baseline {baseline_share:.0%}", flush=True)
    print(json.dumps(results))

if __name__ == "__main__":
    main()
