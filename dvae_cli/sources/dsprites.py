"""Procedural, offline, deterministic renderer of the dSprites ground-truth set.

Every (shape, scale, orientation) sprite is rasterised once into a 32×32 tile centred at (15.5, 15.5);
an image is that tile placed at pixel offset (posX class, posY class) in a zero 64×64 canvas, so every
sprite lies fully inside the frame and the image's outer rows and columns are always 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from dvae_cli.formats.dataset import DatasetChunk, DatasetInfo
from dvae_cli.sources import DataConfig
from dvae_cli.sources.transform import fit_images

FACTOR_NAMES: tuple[str, ...] = ("shape", "scale", "orientation", "posX", "posY")
FACTOR_SIZES: tuple[int, ...] = (3, 6, 40, 32, 32)
SHAPE_NAMES: tuple[str, ...] = ("square", "ellipse", "heart")
NUM_IMAGES = 737_280
IMAGE_SIZE = 64

TILE_SIZE = 32
NUM_TILES = FACTOR_SIZES[0] * FACTOR_SIZES[1] * FACTOR_SIZES[2]
_IMAGES_PER_TILE = FACTOR_SIZES[3] * FACTOR_SIZES[4]
_ON_VALUE = 255

_TILE_CENTRE = (TILE_SIZE - 1) / 2
_SUBSAMPLES = 4  # per pixel and axis; a pixel is on when at least half its subsamples are inside
# Area of every shape at scale 1, in pixels. With it the 2:1 ellipse, the least compact shape, reaches
# 13.1 px from the centre, so no orientation touches the tile's outer ring (15 px away).
_AREA_AT_SCALE_1 = 270.0
# The heart (x / w)² + (y - |x / w|^(2/3))² <= 1 is a unit disc sheared upwards by |x / w|^(2/3), which
# notches its top and points its bottom; its area is w π and its centroid height is
# (2 / π) B(5/6, 3/2) (shearing keeps the area; the centroid is the disc-weighted mean of the shear).
# w = 1.2 keeps it about as wide as high, so it still fits the tile at _AREA_AT_SCALE_1.
_HEART_WIDTH = 1.2
_HEART_CENTROID_Y = 2.0 / math.pi * math.gamma(5.0 / 6.0) * math.gamma(1.5) / math.gamma(5.0 / 6.0 + 1.5)

ShapeFunction = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _inside_square(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(x), np.abs(y)) <= 1.0


def _inside_ellipse(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return x * x + 4.0 * y * y <= 1.0


def _inside_heart(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The heart shifted so that its centroid, the point it rotates about, is the origin."""
    x_unsheared = x / _HEART_WIDTH
    x_squared = x_unsheared * x_unsheared
    y_unsheared = y + _HEART_CENTROID_Y - np.cbrt(x_squared)
    return x_squared + y_unsheared * y_unsheared <= 1.0


# Each shape in unit coordinates and the length (px) that one unit has at scale 1, chosen so that all
# three shapes cover _AREA_AT_SCALE_1: square 4 L², ellipse (semi-axes L, L/2) π L² / 2, heart w π L².
_SHAPES: tuple[tuple[ShapeFunction, float], ...] = (
    (_inside_square, math.sqrt(_AREA_AT_SCALE_1 / 4.0)),
    (_inside_ellipse, math.sqrt(2.0 * _AREA_AT_SCALE_1 / math.pi)),
    (_inside_heart, math.sqrt(_AREA_AT_SCALE_1 / (_HEART_WIDTH * math.pi))),
)


def factor_values() -> list[np.ndarray]:
    """The value grid of each factor, in FACTOR_NAMES order (shape values 1, 2, 3 as in dSprites)."""
    return [
        np.arange(1.0, FACTOR_SIZES[0] + 1.0),
        np.linspace(0.5, 1.0, FACTOR_SIZES[1]),
        np.linspace(0.0, 2.0 * np.pi, FACTOR_SIZES[2]),
        np.linspace(0.0, 1.0, FACTOR_SIZES[3]),
        np.linspace(0.0, 1.0, FACTOR_SIZES[4]),
    ]


def factor_classes(indices: np.ndarray) -> np.ndarray:
    """int64 [n, 5]: the class of each factor of each canonical image index (posY fastest)."""
    flat_indices = _checked_indices(indices)
    return np.stack(np.unravel_index(flat_indices, FACTOR_SIZES), axis=1).astype(np.int64)


def factors(indices: np.ndarray) -> np.ndarray:
    """float32 [n, 5]: the value of each factor of each canonical image index."""
    classes = factor_classes(indices)
    columns = [values[classes[:, column]] for column, values in enumerate(factor_values())]
    return np.stack(columns, axis=1).astype(np.float32)


def _checked_indices(indices: np.ndarray) -> np.ndarray:
    flat_indices = np.asarray(indices)
    if flat_indices.ndim != 1 or not np.issubdtype(flat_indices.dtype, np.integer):
        raise ValueError(
            f"indices must be a 1-D integer array, got {flat_indices.dtype} of shape {flat_indices.shape}"
        )
    if flat_indices.size and (flat_indices.min() < 0 or flat_indices.max() >= NUM_IMAGES):
        raise ValueError(
            f"indices must lie in [0, {NUM_IMAGES}), got [{flat_indices.min()}, {flat_indices.max()}]"
        )
    return flat_indices.astype(np.int64, copy=False)


def _subsample_grid() -> tuple[np.ndarray, np.ndarray]:
    """float32 coordinates of the subsamples about the tile centre, x rightwards and y upwards."""
    offsets = (np.arange(_SUBSAMPLES) + 0.5) / _SUBSAMPLES - 0.5
    pixel_centres = np.arange(TILE_SIZE) - _TILE_CENTRE
    along_axis = (pixel_centres[:, None] + offsets[None, :]).ravel().astype(np.float32)
    rightwards, downwards = np.meshgrid(along_axis, along_axis, indexing="xy")
    return rightwards, -downwards


def _rasterise_tiles() -> np.ndarray:
    """uint8 [720, 32, 32] in {0, 255}, one tile per (shape, scale, orientation) in canonical order."""
    scales, orientations = factor_values()[1:3]
    x, y = _subsample_grid()
    tiles = np.zeros((*FACTOR_SIZES[:3], TILE_SIZE, TILE_SIZE), dtype=np.uint8)
    minimum_count = _SUBSAMPLES * _SUBSAMPLES // 2
    for orientation_class, angle in enumerate(orientations):
        # Rotating the shape counter-clockwise by the angle = rotating the sample points clockwise.
        cosine, sine = math.cos(float(angle)), math.sin(float(angle))
        x_unrotated = x * cosine + y * sine
        y_unrotated = y * cosine - x * sine
        for shape_class, (inside, unit_length) in enumerate(_SHAPES):
            for scale_class, scale in enumerate(scales):
                length = unit_length * float(scale)
                inside_samples = inside(x_unrotated / length, y_unrotated / length)
                per_pixel = inside_samples.reshape(TILE_SIZE, _SUBSAMPLES, TILE_SIZE, _SUBSAMPLES)
                covered = per_pixel.sum(axis=(1, 3)) >= minimum_count
                tiles[shape_class, scale_class, orientation_class] = np.where(covered, _ON_VALUE, 0)
    return tiles.reshape(NUM_TILES, TILE_SIZE, TILE_SIZE)


class DSpritesRenderer:
    """Renders dSprites images by placing pre-rasterised sprite tiles into 64×64 canvases."""

    def __init__(self) -> None:
        # Tile pixel (r, c) sits at padded pixel (r + 31, c + 31); the 64×64 window starting at
        # (31 - posY, 31 - posX) is then the image with the tile at offset (posX, posY).
        margin = TILE_SIZE - 1
        padded = np.zeros((NUM_TILES, margin + IMAGE_SIZE, margin + IMAGE_SIZE), dtype=np.uint8)
        padded[:, margin : margin + TILE_SIZE, margin : margin + TILE_SIZE] = _rasterise_tiles()
        self._windows = sliding_window_view(padded, (IMAGE_SIZE, IMAGE_SIZE), axis=(1, 2))

    def render(self, indices: np.ndarray) -> np.ndarray:
        """uint8 [n, 1, 64, 64] in {0, 255}: the images at the given canonical indices, in that order."""
        flat_indices = _checked_indices(indices)
        tile_index, position = np.divmod(flat_indices, _IMAGES_PER_TILE)
        position_x, position_y = np.divmod(position, FACTOR_SIZES[4])
        margin = TILE_SIZE - 1
        images = self._windows[tile_index, margin - position_y, margin - position_x]
        return images[:, None]

    def render_range(self, start: int, stop: int) -> np.ndarray:
        """uint8 [stop - start, 1, 64, 64]: the canonical images start:stop."""
        if not 0 <= start <= stop <= NUM_IMAGES:
            raise ValueError(f"need 0 <= start <= stop <= {NUM_IMAGES}, got start={start}, stop={stop}")
        return self.render(np.arange(start, stop, dtype=np.int64))


def is_dsprites(info: DatasetInfo) -> bool:
    """Whether a dataset holds the built-in dSprites images (at any size), whose truth `nearest_images` knows."""
    return info.source == "dsprites" and info.factor_names == FACTOR_NAMES and info.factor_sizes == FACTOR_SIZES


TRUE_SPRITE_IOU = 0.9
"""A sample whose nearest true image overlaps it this much (intersection over union) is counted as a sprite."""
_MATCH_BATCH = 16


def sprite_tiles() -> torch.Tensor:
    """float32 [720, 1024] in {0, 1}: every (shape, scale, orientation) tile, flattened, in canonical order."""
    return torch.from_numpy(_rasterise_tiles().reshape(NUM_TILES, -1) > 0).float()


def nearest_images(samples: torch.Tensor, tiles: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The canonical index of the true dSprites image nearest each sample, and their IoU, among all 737,280.

    `samples` are float [N, C, S, S] in [0, 1] (averaged over channels, resized to 64×64 when S differs, on at
    0.5). An image is a tile placed at (posX, posY), so |sample ∧ image| for every tile and position is one matrix
    product of the sample's 32×32 windows with the tiles; IoU = |a ∧ b| / (|a| + |b| − |a ∧ b|).
    """
    tiles = sprite_tiles() if tiles is None else tiles
    tile_sizes = tiles.sum(1)
    x = samples.float().mean(1, keepdim=True)
    if x.shape[-1] != IMAGE_SIZE:
        x = torch.nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    binary = (x[:, 0] > 0.5).float()
    indices, ious = [], []
    for batch in binary.split(_MATCH_BATCH):
        # windows[n, posY, posX] = the 32×32 patch whose top-left corner is (posY, posX); positions 0…31
        windows = batch.unfold(1, TILE_SIZE, 1).unfold(2, TILE_SIZE, 1)[:, :FACTOR_SIZES[4], :FACTOR_SIZES[3]]
        windows = windows.reshape(len(batch), FACTOR_SIZES[4] * FACTOR_SIZES[3], TILE_SIZE * TILE_SIZE)
        intersection = windows @ tiles.T  # [n, posY·32 + posX, tile]
        union = batch.sum((1, 2))[:, None, None] + tile_sizes[None, None, :] - intersection
        iou = intersection / union.clamp(min=1)
        best = iou.flatten(1).max(1)
        position, tile = np.divmod(best.indices.numpy(), NUM_TILES)
        position_y, position_x = np.divmod(position, FACTOR_SIZES[3])
        indices.append(tile * _IMAGES_PER_TILE + position_x * FACTOR_SIZES[4] + position_y)
        ious.append(best.values.numpy())
    if not indices:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(indices).astype(np.int64), np.concatenate(ious).astype(np.float32)


class DSpritesSource:
    """The built-in dSprites set as a prepare-data source (resized or given 3 channels when params ask)."""

    def __init__(self, config: DataConfig) -> None:
        self.renderer = DSpritesRenderer()
        self.image_size, self.channels = config.image_size, config.channels
        self.info = DatasetInfo(source="dsprites", image_size=config.image_size, channels=config.channels,
                                num_classes=FACTOR_SIZES[0], class_names=SHAPE_NAMES,
                                factor_names=FACTOR_NAMES, factor_sizes=FACTOR_SIZES)
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return NUM_IMAGES

    def official_split(self) -> None:
        return None

    def read(self, indices: np.ndarray) -> DatasetChunk:
        images = self.renderer.render(indices)
        if (self.image_size, self.channels) != (IMAGE_SIZE, 1):
            images = fit_images(torch.from_numpy(images), self.channels, self.image_size)
        classes = factor_classes(indices)
        return DatasetChunk(images=images, labels=classes[:, 0].copy(), factors=factors(indices),
                            factor_classes=classes)
