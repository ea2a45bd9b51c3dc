"""Training images/s of `dvae train` under fp32 and under bf16 autocast, alternating, on this machine's device.

Usage: python benchmarks/precision_speed.py [--model jointvae|vqvae] [--dataset FILE] [--steps N] [--rounds R]
                                            [--device auto|cpu|cuda] [--results FILE] [--smoke]

Each measurement is `dvae train` itself in a fresh process (the same dataset, params.yaml's model, no periodic
evaluation), timed over its second half of steps from the logged images/s; fp32 and bf16 alternate for R rounds and
the medians are printed with the median of the per-round ratios (a ratio of neighbouring runs holds on a shared
machine, an absolute figure does not). The CPU's bf16 support is printed beside them: AVX-512 BF16 and AMX-BF16
run bf16 matrix products natively, other CPUs emulate them (slower than fp32). Default data: the pipeline's dataset
file (run `dvae prepare-data` first).
--smoke: the same on a 400-image 32×32 dataset it prepares, batch 16, 4 steps and 1 round, in seconds; a check that
the benchmark still runs, its figures meaningless.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def cpu_bf16_flags() -> list[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted(flag for flag in flags.split() if flag in ("avx512_bf16", "amx_bf16", "amx_tile"))


def images_per_second(model: str, dataset: Path, precision: str, steps: int, device: str, folder: Path,
                      options: list[str]) -> float:
    live = folder / f"live-{precision}"
    subprocess.run([sys.executable, "-m", "dvae_cli", "train", "--model", model, "--dataset", str(dataset),
                    "--out", str(folder / f"model-{precision}"), "--live", str(live), "--max-steps", str(steps),
                    "--precision", precision, "--device", device, "--restart", "--set", f"train.log_every={steps // 2}",
                    "--set", "train.eval_every=null", *options], check=True, capture_output=True)
    rows = json.loads((live / "plots" / "train.json").read_text())
    return float(rows[-1]["train/images_per_second"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("jointvae", "vqvae"), default="jointvae")
    parser.add_argument("--dataset", type=Path, default=Path("data/prepared/dataset.h5"))
    parser.add_argument("--steps", type=int, default=120, help="training steps per measurement (timed: the second half)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", type=Path, help="write the figures here as JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: check that the benchmark runs")
    args = parser.parse_args()
    options: list[str] = []
    if args.smoke:
        args.steps, args.rounds, options = 4, 1, ["--batch-size", "16"]
    speeds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    with tempfile.TemporaryDirectory() as folder:
        if args.smoke:
            args.dataset = Path(folder) / "dataset.h5"
            subprocess.run([sys.executable, "-m", "dvae_cli", "prepare-data", "--out", str(args.dataset), "--subset",
                            "400", "--image-size", "32"], check=True, capture_output=True)
        for round_ in range(args.rounds):
            for precision in speeds:
                speeds[precision].append(images_per_second(args.model, args.dataset, precision, args.steps,
                                                           args.device, Path(folder), options))
            print(f"round {round_ + 1}: fp32 {speeds['fp32'][-1]:.0f}, bf16 {speeds['bf16'][-1]:.0f} images/s",
                  flush=True)
    ratios = [bf16 / fp32 for bf16, fp32 in zip(speeds["bf16"], speeds["fp32"])]
    flags = cpu_bf16_flags()
    print(f"{args.model}, {args.device}: fp32 {statistics.median(speeds['fp32']):.0f}, bf16 "
          f"{statistics.median(speeds['bf16']):.0f} images/s (medians of {args.rounds} rounds); bf16 / fp32 "
          f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f}); CPU bf16 flags: "
          f"{', '.join(flags) or 'none'}")
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({
            "model": args.model, "device": args.device, "steps": args.steps, "rounds": args.rounds,
            "cpu_bf16_flags": flags, "images_per_second": {p: [round(s, 1) for s in v] for p, v in speeds.items()},
            "bf16_over_fp32": round(statistics.median(ratios), 3)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
