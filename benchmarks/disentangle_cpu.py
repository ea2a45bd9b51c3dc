"""A disentangled JointVAE on a CPU: presets/jointvae-dsprites-cpu.yaml from data to metrics, per seed.

Usage: python benchmarks/disentangle_cpu.py --seed S [--seed S2 ...] [--preset NAME] [--out runs/disentangle-cpu]
                                            [--set KEY=VALUE ...] [--docs DIR] [--results FILE] [--smoke]
Targets (2-core CPU): at most 60 minutes of training; on the test split with evaluate.num_samples 10000,
MIG ≥ 0.40 and FactorVAE score ≥ 0.76; the discrete variable's shape accuracy is reported (aim ≥ 0.9).

Each seed runs the stages as `dvae` does, with `seed` set to S (the subset, the split and the training RNG): prepare
the preset's dSprites subset, train (timed: the wall time printed), encode, evaluate, render. Everything lands in
OUT/seed-S/ (dataset.h5, model/, dvclive/, codes.h5, metrics.json, renders/, curves.png); a finished seed is
trained again only with --restart. With several seeds, mean ± sd (sample sd) of each figure is printed, the way
the JointVAE paper reports its MNIST runs.
--docs DIR copies the first seed's traversals, discrete × continuous grid and curves (MIG, FactorVAE score and
shape accuracy on the 1,000-image validation sample of `train.eval_every` against step) into DIR.
Needs matplotlib for the curves (`pip install matplotlib`).
--smoke: the same for seed 0 (unless given) on 600 images at 32×32, 10 steps with an evaluation every 5, into a
temporary folder (unless --out), in seconds; a check that the benchmark still runs, its figures meaningless.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dvae_cli.params import Params, load_params, parse_set_options
from dvae_cli.stages import encode, evaluate, prepare, render, train
from dvae_cli.stages.encode import EncodePaths
from dvae_cli.stages.evaluate import EvaluatePaths
from dvae_cli.stages.train import TrainPaths

FAMILY = "jointvae"
TRAINING_MINUTES = 60
TARGETS = {"mig": 0.40, "factorvae": 0.76}
DOCS_FILES = {"traversals.png": "jointvae-cpu-traversals.png",
              "discrete_x_continuous.png": "jointvae-cpu-discrete-x-continuous.png",
              "curves.png": "jointvae-cpu-curves.png"}
CURVES = {"MIG": "eval/factors/mig", "FactorVAE score": "eval/factors/factorvae_score",
          "shape accuracy (c0)": "eval/labels/discrete_0/hungarian_accuracy"}
"""Series of dvclive/jointvae/plots/eval.json drawn against step; C_z comes from plots/train.json."""
SMOKE_SETTINGS = ["data.subset=600", "data.image_size=32", "train.max_steps=10", "train.eval_every=5",
                  "evaluate.num_samples=200", "render.steps=4"]


@dataclass(frozen=True)
class SeedResult:
    seed: int
    train_minutes: float
    total_minutes: float
    mig: float
    factorvae: float
    shape_accuracy: float

    @staticmethod
    def read(seed: int, folder: Path) -> SeedResult:
        metrics = json.loads((folder / "metrics.json").read_text())
        timing = json.loads((folder / "timing.json").read_text())
        return SeedResult(seed, timing["train_seconds"] / 60, timing["total_seconds"] / 60,
                          metrics["factors"]["mig"], metrics["factors"]["factorvae_score"],
                          metrics["labels"]["discrete_0"]["hungarian_accuracy"])


def run_seed(params: Params, folder: Path, restart: bool) -> None:
    """Data to metrics and pictures for one seed into `folder`; timing.json is written last, once all is done."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset, model = folder / "dataset.h5", folder / "model"
    started = time.perf_counter()
    prepare.run(params, prepare.PreparePaths(dataset), show_progress=False)
    train_started = time.perf_counter()
    train.run(params, FAMILY, TrainPaths(dataset, model, folder / "dvclive"), restart=restart, show_progress=False)
    train_seconds = time.perf_counter() - train_started
    encode.run(params, FAMILY, EncodePaths(dataset, model, folder / "codes.h5"), show_progress=False)
    evaluate.run(params, FAMILY, EvaluatePaths(model, dataset, folder / "codes.h5", folder / "metrics.json"),
                 show_progress=False)
    total_seconds = time.perf_counter() - started
    render.run(params, FAMILY, render.RenderPaths(model, dataset, folder / "renders"), show_progress=False)
    draw_curves(folder / "dvclive", folder / "curves.png")
    (folder / "timing.json").write_text(json.dumps({"train_seconds": train_seconds, "total_seconds": total_seconds}))


def read_series(path: Path, name: str) -> tuple[list[int], list[float]]:
    """Steps and values of one series of a curves file (a JSON list of rows, each with its step)."""
    if not path.exists():
        return [], []
    rows = [row for row in json.loads(path.read_text()) if row.get(name) is not None]
    return [row["step"] for row in rows], [row[name] for row in rows]


def draw_curves(live_dir: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    for label, name in CURVES.items():
        axes.plot(*read_series(live_dir / "plots" / "eval.json", name), label=label)
    axes.axhline(TARGETS["mig"], color="grey", linestyle=":", linewidth=1)
    axes.set(xlabel="step", ylabel="validation sample (1,000 images)", ylim=(0, 1))
    twin = axes.twinx()
    twin.plot(*read_series(live_dir / "plots" / "train.json", "train/capacity_z"), color="black", linestyle="--",
              linewidth=1, label="C_z (nats, right)")
    twin.set_ylabel("C_z (nats)")
    twin.legend(loc="lower right", frameon=False)
    axes.legend(loc="upper left", frameon=False)
    figure.tight_layout()
    # Fixed metadata so the same curves give the same bytes.
    figure.savefig(out, metadata={"Software": None})
    plt.close(figure)


def mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, action="append", help="repeatable; required but with --smoke")
    parser.add_argument("--preset", default="jointvae-dsprites-cpu")
    parser.add_argument("--out", type=Path, help="default: runs/disentangle-cpu, with --smoke a temporary folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, as dvae's -S (repeatable)")
    parser.add_argument("--docs", type=Path, help="copy the first seed's pictures here")
    parser.add_argument("--results", type=Path, help="write the per-seed figures here as JSON")
    parser.add_argument("--restart", action="store_true", help="train again even where a seed has finished")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: check that the benchmark runs")
    args = parser.parse_args()
    if args.smoke:
        args.seed, args.overrides = args.seed or [0], [*SMOKE_SETTINGS, *args.overrides]
    elif not args.seed:
        parser.error("the following arguments are required: --seed")
    with tempfile.TemporaryDirectory() as scratch:
        args.out = args.out or (Path(scratch) if args.smoke else Path("runs/disentangle-cpu"))
        run(args)


def run(args: argparse.Namespace) -> None:
    """The seeds of `args`, each into its folder under args.out, and their figures."""
    results = []
    for seed in args.seed:
        folder = args.out / f"seed-{seed}"
        if args.restart or not (folder / "timing.json").exists():
            (folder / "timing.json").unlink(missing_ok=True)
            overrides = {**parse_set_options(args.overrides), "seed": seed}
            run_seed(load_params("params.yaml", overrides, preset=args.preset), folder, args.restart)
        results.append(SeedResult.read(seed, folder))
        result = results[-1]
        print(f"seed {seed}: training {result.train_minutes:.1f} min (all stages {result.total_minutes:.1f} min), "
              f"MIG {result.mig:.3f}, FactorVAE {result.factorvae:.3f}, shape accuracy {result.shape_accuracy:.3f}",
              flush=True)
    if len(results) > 1:
        print(f"{len(results)} seeds, mean ± sd: training {mean_sd([r.train_minutes for r in results])} min, "
              f"MIG {mean_sd([r.mig for r in results])}, FactorVAE {mean_sd([r.factorvae for r in results])}, "
              f"shape accuracy {mean_sd([r.shape_accuracy for r in results])}")
    print(f"targets: training ≤ {TRAINING_MINUTES} min, MIG ≥ {TARGETS['mig']}, FactorVAE ≥ {TARGETS['factorvae']}")
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({"preset": args.preset, "overrides": args.overrides,
                                            "targets": {**TARGETS, "training_minutes": TRAINING_MINUTES},
                                            "seeds": [asdict(result) for result in results]}, indent=2) + "\n")
    if args.docs:
        first = args.out / f"seed-{args.seed[0]}"
        for name, target in DOCS_FILES.items():
            source = first / name if name == "curves.png" else first / "renders" / name
            shutil.copyfile(source, args.docs / target)


if __name__ == "__main__":
    main()
