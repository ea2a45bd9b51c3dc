"""Bring images of any size and channel count to the dataset's square size and channels."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R 601-2 luma, the weights of PIL's convert("L"), so that tensor and PIL sources agree."""


def _to_grayscale(images: torch.Tensor) -> torch.Tensor:
    # Rounded, unlike torchvision's rgb_to_grayscale, which truncates (a gray 100 would become 99).
    weights = torch.tensor(LUMA_WEIGHTS, device=images.device).view(1, 3, 1, 1)
    return (images.float() * weights).sum(dim=1, keepdim=True).round().to(torch.uint8)


def fit_images(images: torch.Tensor, channels: int, size: int) -> np.ndarray:
    """uint8 [n, c, h, w] → uint8 [n, channels, size, size]: resize the shorter side, then center-crop."""
    if images.shape[1] != channels:
        images = _to_grayscale(images) if channels == 1 else images.expand(-1, 3, -1, -1)
    height, width = images.shape[-2:]
    if min(height, width) != size:
        images = F.resize(images, [size], antialias=True)
    if images.shape[-2:] != (size, size):
        images = F.center_crop(images, [size, size])
    return np.ascontiguousarray(images.numpy())


def fit_pil_image(image: Image.Image, channels: int, size: int) -> np.ndarray:
    """A PIL image → uint8 [1, channels, size, size]."""
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    tensor = torch.from_numpy(array.reshape(*array.shape[:2], -1).copy()).permute(2, 0, 1)[None]
    return fit_images(tensor, channels, size)
