"""VQ-VAE's pictures: reconstructions, code maps in a fixed palette, the images single codes draw, and the code
usage as a CSV that `dvc plots show` charts."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from dvae_cli.core.images import (
    BACKGROUND,
    FONT_SIZE,
    GRID_PADDING,
    TEXT_COLOR,
    as_tiles,
    grid_image,
    label_font,
)
from dvae_cli.core.progress import Advance
from dvae_cli.models.vqvae.model import VQVAE
from dvae_cli.scoring.metrics import code_counts
from dvae_cli.scoring.pictures import (
    Rendered,
    RenderInputs,
    batches,
    reconstructions_picture,
    to_float,
)

CAPTION_HEIGHT = 30
"""Height of the band under each codebook tile that holds its index and usage."""
CODE_MAP_PAIRS_PER_ROW = 4
CODEBOOK_CODES = 16
CODEBOOK_COLUMNS = 8
GOLDEN_RATIO_CONJUGATE = 0.6180339887498949


def code_palette(num_codes: int) -> Tensor:
    """float [K, 3] in [0, 1]: hues stepped by the golden ratio, so neighbouring indices get distant colors."""
    colors = [colorsys.hsv_to_rgb((code * GOLDEN_RATIO_CONJUGATE) % 1.0, 0.75, 0.95) for code in range(num_codes)]
    return torch.tensor(colors, dtype=torch.float32)


def first_stage(codes: Tensor) -> Tensor:
    """The code maps [N, h, w] of the first (coarsest) stage of residual codes [N, depth, h, w]; others as they are."""
    return codes[:, 0] if codes.dim() == 4 else codes


def measured_code_counts(model: VQVAE, images: Tensor) -> Tensor:
    """int64 [K]: how many code-map positions of `images` each code holds (rvq: each first-stage code)."""
    codes = np.concatenate([first_stage(model.codes(batch)).cpu().numpy() for batch in batches(images)])
    return torch.from_numpy(code_counts(codes, model.config.codebook_size))


def code_map_tiles(codes: Tensor, palette: Tensor, side: int) -> Tensor:
    """Code maps [n, h, w] as float RGB [n, 3, side, side]: each code its palette color, nearest-upscaled."""
    colored = palette[codes.cpu()].permute(0, 3, 1, 2)
    factor = side // codes.shape[-1]
    return colored.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def codebook_picture(images: Tensor, codes: Sequence[int], counts: Tensor) -> Image.Image:
    """Each code's image with its index and its share of the measured code-map positions written under it."""
    tiles = as_tiles(images)
    side = tiles.shape[-1]
    cells = torch.cat([tiles, torch.full((tiles.shape[0], 3, CAPTION_HEIGHT, side), BACKGROUND)], dim=2)
    columns = min(CODEBOOK_COLUMNS, len(codes))
    grid = grid_image(cells, columns)
    draw = ImageDraw.Draw(grid)
    font = label_font()
    total = max(int(counts.sum()), 1)
    for position, code in enumerate(codes):
        row, column = divmod(position, columns)
        left = GRID_PADDING + column * (side + GRID_PADDING)
        top = GRID_PADDING + row * (side + CAPTION_HEIGHT + GRID_PADDING) + side
        draw.text((left + 2, top + 1), f"code {code}", fill=TEXT_COLOR, font=font)
        share = 100 * int(counts[code]) / total
        draw.text((left + 2, top + 1 + FONT_SIZE + 2), f"{share:.1f}% used" if share >= 0.1 else "<0.1% used",
                  fill=TEXT_COLOR, font=font)
    return grid


def usage_table(counts: Tensor) -> str:
    """CSV of every code by usage: rank (1 = most used), code index, count of code-map positions."""
    order = np.argsort(-counts.numpy(), kind="stable")
    lines = ["rank,code,count"] + [f"{rank},{code},{int(counts[code])}" for rank, code in enumerate(order, start=1)]
    return "\n".join(lines) + "\n"


def render_vqvae(model: VQVAE, inputs: RenderInputs, advance: Advance) -> Rendered:
    rendered = Rendered()
    rendered.pictures["reconstructions.png"] = reconstructions_picture(model, inputs.shown)
    advance()

    palette = code_palette(model.config.codebook_size)
    image_tiles = as_tiles(to_float(inputs.shown))
    map_tiles = code_map_tiles(first_stage(model.codes(to_float(inputs.shown))), palette, image_tiles.shape[-1])
    pairs = torch.stack([image_tiles, map_tiles], dim=1).flatten(0, 1)
    rendered.pictures["code_maps.png"] = grid_image(pairs, 2 * min(CODE_MAP_PAIRS_PER_ROW, inputs.shown.shape[0]))
    advance()

    counts = measured_code_counts(model, inputs.measured)
    most_used = [int(code) for code in np.argsort(-counts.numpy(), kind="stable")[:CODEBOOK_CODES]
                 if counts[code] > 0]
    side = inputs.shown.shape[-1] // model.config.downsample
    filled = torch.tensor(most_used).view(-1, 1, 1).expand(-1, side, side)
    if model.config.quantizer == "rvq":  # each first-stage code alone
        filled = filled.unsqueeze(1)
    rendered.pictures["codebook.png"] = codebook_picture(model.decode_codes(filled), most_used, counts)
    advance()

    rendered.tables["code_usage.csv"] = usage_table(counts)
    advance()
    return rendered
