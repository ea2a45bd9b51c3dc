"""Stored latent arrays (numpy, as the codes file holds them) and model tensors, one into the other."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def as_tensor(array: np.ndarray) -> Tensor:
    """A stored latent array as model input: integers as int64 (what embeddings and cross-entropy take), the rest
    as float32."""
    if array.dtype.kind in "iub":
        return torch.from_numpy(array.astype(np.int64))
    return torch.from_numpy(array.astype(np.float32, copy=False))


def float32_if_floating(tensor: Tensor) -> Tensor:
    """A latent tensor in its stored form: floating point as float32, integers as they are."""
    return tensor.float() if tensor.is_floating_point() else tensor
