"""Time `dvae evaluate` on 10,000 dSprites test images and print the seconds each group of metrics takes.

Usage: python benchmarks/evaluate_speed.py [--steps N] [--dci] [--families jointvae vqvae] [--smoke]
Target (2-core CPU): at most 60 s per model with metrics read from an existing codes file and DCI off.

Setup (not timed): a 20,000-image 64×64 dSprites subset split half train, half test; each model built from
the model settings of ./params.yaml (the shipped quick configuration, or the built-in defaults without one)
and trained briefly (--steps, 100 by default: enough for a k-means-seeded codebook and non-trivial latents,
not a converged model); then `dvae encode`. Only `evaluate` is timed. --dci adds DCI (2,000-point subsample).
--smoke: the same on 200 test images at 32×32 after 4 steps, in seconds; a check that the benchmark still runs, its
figures meaningless.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from dvae_cli.models import FAMILIES
from dvae_cli.params import load_params
from dvae_cli.stages import encode, evaluate, prepare, train
from dvae_cli.stages.encode import EncodePaths
from dvae_cli.stages.evaluate import EvaluatePaths
from dvae_cli.stages.train import TrainPaths

TEST_IMAGES = 10000
TARGET_SECONDS = 60.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps of each model before encoding")
    parser.add_argument("--dci", action="store_true", help="also compute DCI (slow)")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: check that the benchmark runs")
    args = parser.parse_args()
    test_images, image_size = (200, 32) if args.smoke else (TEST_IMAGES, 64)
    if args.smoke:
        args.steps = 4
    params = load_params(Path("params.yaml"), {
        "data.dataset": "dsprites", "data.subset": 2 * test_images, "data.image_size": image_size, "data.channels": 1,
        "data.split": [0.5, 0.0, 0.5], "train.max_steps": args.steps, "train.checkpoint_every": args.steps,
        "evaluate.num_samples": test_images, "evaluate.dci": args.dci}, missing_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        dataset = root / "dataset.h5"
        prepare.run(params, prepare.PreparePaths(dataset), show_progress=False)
        for family in args.families:
            model_dir, codes = root / "models" / family, root / "codes" / f"{family}.h5"
            train.run(params, family, TrainPaths(dataset, model_dir, root / "dvclive" / family), show_progress=False)
            encoded = encode.run(params, family, EncodePaths(dataset, model_dir, codes), show_progress=False)
            started = time.perf_counter()
            result = evaluate.run(params, family, EvaluatePaths(model_dir, dataset, codes, root / f"{family}.json"),
                                  show_progress=False)
            seconds = time.perf_counter() - started
            config = params.model_config(family)
            print(f"{family}: {result.num_images:,} {result.split_name} images, {config}")
            print(f"  (setup: trained {args.steps} steps; encode {encoded.num_rows:,} rows in {encoded.seconds:.1f} s)")
            for name, spent in result.seconds.items():
                if name != "total":
                    print(f"  {name:<16} {spent:6.2f} s")
            print(f"  {'evaluate total':<16} {seconds:6.2f} s  target ≤ {TARGET_SECONDS:.0f} s: "
                  f"{'met' if seconds <= TARGET_SECONDS else 'MISSED'}")
            print(f"  figures: {json.dumps(result.metrics)}")


if __name__ == "__main__":
    main()
