"""The three splits every dataset and codes file marks its rows with, and which one the scores use."""

from __future__ import annotations

import numpy as np

SPLIT_NAMES = ("train", "val", "test")
TRAIN, VAL, TEST = 0, 1, 2


def evaluation_split(split: np.ndarray) -> int | None:
    """The split scores are computed on: test, or val when no row is test; None when neither has a row."""
    for candidate in (TEST, VAL):
        if (split == candidate).any():
            return candidate
    return None
