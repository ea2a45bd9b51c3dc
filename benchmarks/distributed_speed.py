"""Training images/s of 1 process against N data-parallel processes (torchrun, gloo on CPU, NCCL on GPUs).

Usage: python benchmarks/distributed_speed.py [--model jointvae|vqvae] [--nproc 2] [--steps 120] [--smoke]

Both runs train the same params (the shipped quick config of the model, global batch unchanged) on the same
dSprites subset through `dvae train`, and the figure is the images/s DVCLive logged over the second half of the
steps. On CPU each process gets cores / N threads, so the comparison is the same machine split two ways.
--smoke: the same on 512 images at 32×32 and 4 steps, in seconds; a check that the benchmark still runs, its
figures meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def images_per_second(folder: Path, model: str, nproc: int, steps: int, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "dvae_cli", "train", "--model", model, "--restart", "--max-steps", str(steps),
               "--set", f"train.log_every={steps // 2}", "--set", "train.checkpoint_every=1000000",
               "--out", str(folder / f"models{nproc}"), "--live", str(folder / f"live{nproc}")]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    subprocess.run(command, cwd=folder, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = json.loads((folder / f"live{nproc}" / "plots" / "train.json").read_text())
    return float(rows[-1]["train/images_per_second"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("jointvae", "vqvae"), default="jointvae")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: check that the benchmark runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps = 4
    cores = os.cpu_count() or 1
    project_params = yaml.safe_load(Path("params.yaml").read_text())
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        project_params["data"].update({"subset": 512, "image_size": 32} if args.smoke else {"subset": 8192})
        (folder / "params.yaml").write_text(yaml.safe_dump(project_params))
        subprocess.run([sys.executable, "-m", "dvae_cli", "prepare-data"], cwd=folder, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        single = images_per_second(folder, args.model, 1, args.steps, cores)
        parallel = images_per_second(folder, args.model, args.nproc, args.steps, max(1, cores // args.nproc))
    print(f"{args.model}, global batch {project_params[args.model]['batch_size']}, {cores} cores")
    print(f"  1 process ({cores} threads):            {single:8.1f} images/s")
    print(f"  {args.nproc} processes ({max(1, cores // args.nproc)} thread(s) each): {parallel:8.1f} images/s")
    print(f"  scaling {parallel / single:.2f}×")


if __name__ == "__main__":
    main()
