"""`dvae prepare-data`: a source → subset → split → the dataset file, streamed and atomic."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dvae_cli.core import layout
from dvae_cli.core.errors import UserError
from dvae_cli.core.files import atomic_path, check_output
from dvae_cli.core.progress import progress_bar
from dvae_cli.core.splits import SPLIT_NAMES, TEST, TRAIN, VAL
from dvae_cli.formats.artifact import check_replaceable
from dvae_cli.formats.dataset import DATASET_MAKER, DatasetInfo, DatasetWriter
from dvae_cli.params import Params
from dvae_cli.sources import open_source

ROWS_PER_READ = 8192
SKIPPED_SHOWN = 5
"""Skipped files named in the summary and in errors; the rest are counted."""
UNBALANCED_RATIO = 2.0
"""Classes whose sizes differ by more than this factor are named in a warning."""


@dataclass(frozen=True)
class PrepareSummary:
    path: Path
    info: DatasetInfo
    split_counts: dict[str, int]
    skipped: list[str]
    """The unreadable files left out, relative to data.root."""
    warnings: list[str]
    """What makes the dataset questionable without making it wrong (`check_classes`)."""
    file_bytes: int
    seconds: float


def describe_skipped(names: list[str]) -> str:
    """`3: a.png, b.png, c.png`: how many files were skipped and the first SKIPPED_SHOWN of them."""
    shown = ", ".join(names[:SKIPPED_SHOWN]) + (", …" if len(names) > SKIPPED_SHOWN else "")
    return f"{len(names):,}: {shown}"


def select_subset(num_rows: int, subset: int | float | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices of a seeded random subset: all rows, a count, or a fraction in (0, 1]."""
    if subset is None:
        return np.arange(num_rows)
    count = subset if isinstance(subset, int) else max(1, round(subset * num_rows))
    if count >= num_rows:
        return np.arange(num_rows)
    return np.sort(rng.choice(num_rows, size=count, replace=False))


def assign_split(num_rows: int, fractions: list[float], rng: np.random.Generator,
                 official: np.ndarray | None) -> np.ndarray:
    """uint8 [num_rows] of 0/1/2 (train/val/test).

    Without an official split the rows are shuffled and cut by `fractions`; with one, its test rows stay
    test and val is carved from its train rows in the ratio fractions[1] : fractions[0].
    """
    if official is None:
        split = np.full(num_rows, TEST, dtype=np.uint8)
        order = rng.permutation(num_rows)
        num_train = round(fractions[0] * num_rows)
        num_val = round(fractions[1] * num_rows)
        split[order[:num_train]] = TRAIN
        split[order[num_train:num_train + num_val]] = VAL
        return split
    split = official.astype(np.uint8).copy()
    train_rows = np.flatnonzero(split == TRAIN)
    num_val = round(fractions[1] / (fractions[0] + fractions[1]) * len(train_rows))
    split[rng.permutation(train_rows)[:num_val]] = VAL
    return split


def check_classes(labels: np.ndarray, split: np.ndarray, class_names: tuple[str, ...]) -> list[str]:
    """Warnings about the classes: one missing from a non-empty test split, classes of very different sizes."""
    counts = np.bincount(labels, minlength=len(class_names))
    names = class_names or tuple(str(label) for label in range(len(counts)))
    test_counts = np.bincount(labels[split == TEST], minlength=len(counts))
    warnings = []
    if test_counts.sum() and not test_counts.all():
        missing = ", ".join(repr(names[i]) for i in np.flatnonzero(test_counts == 0))
        warnings.append(f"the test split has no images of class {missing}; its scores leave that class out")
    if counts.min() * UNBALANCED_RATIO < counts.max():
        warnings.append(f"classes are unbalanced: {names[counts.argmin()]!r} has {counts.min():,} images, "
                        f"{names[counts.argmax()]!r} {counts.max():,}; clustering scores favour the large classes")
    return warnings


@dataclass(frozen=True)
class PreparePaths:
    out: Path
    """The dataset file to write (the source's folder is `data.root`, a param)."""

    @classmethod
    def of(cls, **given: Path | None) -> PreparePaths:
        return layout.fill(cls, given, out=layout.DATASET)


def run(params: Params, paths: PreparePaths, show_progress: bool = True, force: bool = False) -> PrepareSummary:
    """Read the source's rows (subset, split) into the dataset file, atomically (`force`: replacing another dvae
    artifact there)."""
    started = time.perf_counter()
    out = paths.out
    check_output(out, [Path(params.data.root)] if params.data.root else [])
    check_replaceable(out, DATASET_MAKER, "--out", force)
    source = open_source(params.data)
    subset_rng, split_rng = (np.random.default_rng(seed) for seed in np.random.SeedSequence(params.seed).spawn(2))
    rows = select_subset(len(source), params.data.subset, subset_rng)
    produced_by = {"seed": params.seed, "data": asdict(params.data)}
    read_rows, labels, warnings = [], [], []
    with atomic_path(out) as tmp:
        writer = DatasetWriter(tmp, source.info, produced_by)
        try:
            with progress_bar(f"prepare {params.data.dataset}", len(rows), enabled=show_progress) as advance:
                for start in range(0, len(rows), ROWS_PER_READ):
                    batch = rows[start:start + ROWS_PER_READ]
                    chunk = source.read(batch)
                    writer.append(chunk)
                    read_rows.append(batch if chunk.source_rows is None else chunk.source_rows)
                    if chunk.labels is not None:
                        labels.append(chunk.labels)
                    advance(len(batch))
            if writer.num_rows == 0:
                raise UserError(f"none of the {len(rows)} images of {params.data.root} could be read "
                                f"({describe_skipped(source.skipped)}); check that data.root holds image files")
            official = source.official_split()
            split = assign_split(writer.num_rows, params.data.split, split_rng,
                                 None if official is None else official[np.concatenate(read_rows)])
            if labels:
                warnings = check_classes(np.concatenate(labels), split, source.info.class_names)
            writer.finish(split)
        finally:
            writer.close()
    counts = {name: int((split == i).sum()) for i, name in enumerate(SPLIT_NAMES)}
    return PrepareSummary(path=out, info=source.info, split_counts=counts, skipped=source.skipped, warnings=warnings,
                          file_bytes=out.stat().st_size, seconds=time.perf_counter() - started)
