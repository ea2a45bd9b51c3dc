"""Render the full 737,280-image dSprites set into a dataset file; print images/s, seconds, size, peak memory.

Usage: python benchmarks/prepare_dsprites.py [--out PATH] [--smoke]
Targets (2-core CPU): the whole set in at most 60 s, peak memory at most 1.5 GB. For reference the same run
times rendering alone (no HDF5), so the share of the time spent compressing and writing is visible.
--smoke: the same for 8,192 images, in seconds; a check that the benchmark still runs, its figures meaningless.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from dvae_cli.params import load_params
from dvae_cli.sources.dsprites import NUM_IMAGES, DSpritesRenderer
from dvae_cli.stages import prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="dataset file (default: a temporary folder)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: check that the benchmark runs")
    args = parser.parse_args()
    images = 8192 if args.smoke else NUM_IMAGES
    with tempfile.TemporaryDirectory() as folder:
        out = args.out or Path(folder) / "dataset.h5"
        params = load_params(Path("params.yaml"), {"data.dataset": "dsprites",
                                                   "data.subset": images if args.smoke else None,
                                                   "data.image_size": 64, "data.channels": 1}, missing_ok=True)
        summary = prepare.run(params, prepare.PreparePaths(out), show_progress=False)
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6

        renderer = DSpritesRenderer()
        started = time.perf_counter()
        for start in range(0, images, 8192):
            renderer.render_range(start, min(start + 8192, images))
        render_seconds = time.perf_counter() - started

    print(f"images            {images:,}")
    print(f"prepare-data      {summary.seconds:.1f} s  ({images / summary.seconds:,.0f} images/s)")
    print(f"render only       {render_seconds:.1f} s  ({images / render_seconds:,.0f} images/s)")
    print(f"file size         {summary.file_bytes / 1e6:.1f} MB")
    print(f"peak memory (RSS) {peak_gb:.2f} GB")
    print(f"targets           ≤ 60 s: {'met' if summary.seconds <= 60 else 'MISSED'}, "
          f"≤ 1.5 GB: {'met' if peak_gb <= 1.5 else 'MISSED'}")


if __name__ == "__main__":
    main()
