"""Picture building blocks: upscaled tiles, grids (torchvision's make_grid), row labels, PNG files.

Tiles are upscaled by an integer nearest-neighbour factor to at least `MIN_TILE` pixels; labels are drawn with
PIL's built-in font into a left margin. PNGs carry no metadata, so the same pixels give the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import make_grid

MIN_TILE = 64
"""Tiles are upscaled by the smallest integer factor that makes them at least this many pixels wide."""
GRID_PADDING = 2
"""Pixels between tiles and around the grid (make_grid's padding)."""
LABEL_WIDTH = 104
"""Width of the left margin that holds row labels."""
FONT_SIZE = 12
BACKGROUND = 1.0
"""Padding, margins and empty cells are white; text is black."""
TEXT_COLOR = (0, 0, 0)
PNG_COMPRESS_LEVEL = 6


def tile_size(image_size: int) -> int:
    """Side of an upscaled tile: image_size times the smallest integer factor reaching MIN_TILE."""
    return image_size * -(-MIN_TILE // image_size)


def grid_extent(rows: int, columns: int, cell_width: int, cell_height: int, labelled: bool) -> tuple[int, int]:
    """(width, height) in pixels of a grid of equal cells, with the label margin when `labelled`."""
    width = columns * (cell_width + GRID_PADDING) + GRID_PADDING + (LABEL_WIDTH if labelled else 0)
    return width, rows * (cell_height + GRID_PADDING) + GRID_PADDING


def label_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=FONT_SIZE)


def as_tiles(images: Tensor) -> Tensor:
    """float RGB [n, 3, T, T] on the CPU: images in [0, 1] upscaled by an integer nearest-neighbour factor."""
    images = images.detach().float().cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    factor = tile_size(images.shape[-1]) // images.shape[-1]
    return images.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def blank_tiles(count: int, like: Tensor) -> Tensor:
    return torch.full((count, *like.shape[1:]), BACKGROUND)


def grid_image(tiles: Tensor, columns: int) -> Image.Image:
    grid = make_grid(tiles, nrow=columns, padding=GRID_PADDING, pad_value=BACKGROUND)
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(pixels)


def labelled_grid(tiles: Tensor, columns: int, row_labels: Sequence[Sequence[str]]) -> Image.Image:
    """A grid of `tiles` (row-major, rows × columns) with each row's label lines in a left margin."""
    grid = grid_image(tiles, columns)
    canvas = Image.new("RGB", (LABEL_WIDTH + grid.width, grid.height), (255, 255, 255))
    canvas.paste(grid, (LABEL_WIDTH, 0))
    draw = ImageDraw.Draw(canvas)
    font = label_font()
    cell_height = tiles.shape[2]
    line_height = FONT_SIZE + 3
    for row, lines in enumerate(row_labels):
        top = GRID_PADDING + row * (cell_height + GRID_PADDING) + (cell_height - line_height * len(lines)) // 2
        for number, line in enumerate(lines):
            draw.text((4, top + number * line_height), line, fill=TEXT_COLOR, font=font)
    return canvas


def save_png(image: Image.Image, path: Path) -> None:
    image.save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def square_grid(images: Tensor) -> Image.Image:
    """A near-square grid of images in [0, 1], tiled and upscaled."""
    return grid_image(as_tiles(images), math.ceil(math.sqrt(len(images))))


def to_uint8(images: Tensor) -> np.ndarray:
    return images.mul(255).round_().clamp_(0, 255).to(torch.uint8).numpy()
