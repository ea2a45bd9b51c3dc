"""Throughput and peak memory of `dvae encode` on dSprites.

Usage: python benchmarks/encode_speed.py [--family vqvae] [--rows 10000 100000] [--image-size 64]
                                         [--params params.yaml] [--set key=value ...] [--keep DIR] [--smoke]

The model is an untrained one of the params' configuration (built-in defaults unless --params/--set say
otherwise): throughput does not depend on the weights. For each row count it prepares a dSprites dataset, then
prints
- on the first row count, the images/s of the encoding loop (read, encode, compress and write) against the
  model's pure forward throughput (`model.encode` on the same images held in memory, converted per batch the
  same way), same model, batch and device, in this process, best of ROUNDS alternating rounds;
- for every row count, the peak RSS of `dvae encode` in a subprocess.
Targets: encode at least 0.9 of the pure forward throughput; peak RSS that does not grow with the row count
beyond the dataset's per-row arrays (labels and factors, about 70 bytes a row for dSprites).
--smoke: the same at 200 rows of 32×32 images and 1 round, in seconds; a check that the benchmark still runs, its
figures meaningless.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dvae_cli.core.runtime import Runtime, resolve_runtime
from dvae_cli.formats.dataset import DatasetFile
from dvae_cli.formats.model_folder import load_model, save_model
from dvae_cli.models import get_family
from dvae_cli.models.base import DataShape
from dvae_cli.params import load_params, parse_set_options
from dvae_cli.stages import encode, prepare
from dvae_cli.stages.encode import EncodePaths

ROUNDS = 3


@torch.no_grad()
def forward_images_per_second(model: torch.nn.Module, images: torch.Tensor, batch_size: int,
                              runtime: Runtime) -> float:
    data = runtime.place(images)
    with runtime.autocast():
        model.encode(runtime.images(data[:batch_size]))  # warm-up: kernel selection, allocator
    synchronize(runtime)
    started = time.perf_counter()
    for start in range(0, len(data), batch_size):
        with runtime.autocast():
            model.encode(runtime.images(data[start:start + batch_size]))
    synchronize(runtime)
    return len(data) / (time.perf_counter() - started)


def synchronize(runtime: Runtime) -> None:
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)


def peak_rss_bytes(args: list[str]) -> int:
    """Peak resident memory of a subprocess (wait4's rusage is the child's own, in kilobytes on Linux)."""
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(args)} failed: {process.stderr.read().decode() if process.stderr else ''}")
    return usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="vqvae", choices=["vqvae", "jointvae"])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--set", dest="set_options", action="append", default=[], help="override a param: key=value")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: check that the benchmark runs")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.image_size = [200], 32
    rounds = 1 if args.smoke else ROUNDS

    overrides = {"data.dataset": "dsprites", "data.image_size": args.image_size, "data.channels": 1,
                 **parse_set_options(args.set_options)}
    params = load_params(args.params, overrides, missing_ok=args.params == Path("params.yaml"))
    runtime = resolve_runtime(params.runtime)
    batch_size = params.encode.batch_size
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.keep or Path(scratch)
        model_dir = folder / "models" / args.family
        data = DataShape(channels=1, image_size=args.image_size, pixel_variance=0.1)
        torch.manual_seed(params.seed)
        save_model(model_dir, args.family, get_family(args.family).model(params.model_config(args.family), data),
                   params.model_config(args.family), data, {})

        datasets = {}
        for rows in args.rows:
            datasets[rows] = folder / f"dsprites-{rows}.h5"
            if not datasets[rows].exists():
                prepare.run(load_params(args.params, {**overrides, "data.subset": rows},
                                        missing_ok=args.params == Path("params.yaml")),
                            prepare.PreparePaths(datasets[rows]), show_progress=False)

        first = args.rows[0]
        loaded = load_model(model_dir, args.family, runtime.device)
        model = runtime.prepare(loaded.model)
        with DatasetFile(datasets[first]) as dataset:
            images = torch.from_numpy(dataset.read_images())
        # Alternating rounds, best of each: the two figures see the same machine load.
        forward_rates, encode_rates = [], []
        for _ in range(rounds):
            forward_rates.append(forward_images_per_second(model, images, batch_size, runtime))
            encoded = encode.run(params, args.family, EncodePaths(datasets[first], model_dir,
                                                                      folder / "codes.h5"), show_progress=False)
            encode_rates.append(encoded.images_per_second)
        del images
        forward_rate, encode_rate = max(forward_rates), max(encode_rates)

        command = [sys.executable, "-m", "dvae_cli", "encode", "--model", args.family, "--params", str(args.params),
                   "--model-dir", str(model_dir), *(part for option in args.set_options for part in ("--set", option))]
        peaks = {rows: peak_rss_bytes([*command, "--dataset", str(path), "--out", str(folder / f"codes-{rows}.h5")])
                 for rows, path in datasets.items()}

    threads = torch.get_num_threads() if runtime.device.type == "cpu" else None
    print(f"model             untrained {args.family}, {args.image_size}×{args.image_size} dSprites, "
          f"batch {batch_size}, device {runtime.device}" + (f" ({threads} threads)" if threads else "")
          + f", precision {params.runtime.precision}")
    print(f"pure forward      {forward_rate:,.0f} images/s  ({first:,} rows in memory)")
    print(f"dvae encode       {encode_rate:,.0f} images/s  ({first:,} rows, HDF5 in and out)")
    ratio = encode_rate / forward_rate
    print(f"ratio             {ratio:.2f}  (target ≥ 0.9: {'met' if ratio >= 0.9 else 'MISSED'})")
    for rows, peak in peaks.items():
        print(f"peak RSS {rows:>9,} rows  {peak / 1e6:,.0f} MB")
    if len(peaks) > 1:
        (small, small_peak), (large, large_peak) = min(peaks.items()), max(peaks.items())
        print(f"RSS growth        {(large_peak - small_peak) / 1e6:,.1f} MB for {large - small:,} more rows "
              f"({(large_peak - small_peak) / (large - small):,.0f} bytes a row; one image is "
              f"{args.image_size ** 2:,} bytes)")


if __name__ == "__main__":
    main()
