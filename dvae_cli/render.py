"""`dvae render`: the pictures a person reads at a glance, written to `renders/M/`.

JointVAE: latent traversals (the paper's figures), a category × continuous grid, reconstructions and prior
samples. VQ-VAE: reconstructions, code maps in a fixed palette, the images single codes draw, and the code
usage as a CSV that `dvc plots show` charts.

Every grid comes from torchvision's `make_grid` with tiles upscaled by an integer nearest-neighbour factor to
at least `MIN_TILE` pixels; labels are drawn with PIL's built-in font into a left margin (or a caption band
under each codebook tile). PNGs carry no metadata, so the same model, data and params give the same bytes.
"""

from __future__ import annotations

import colorsys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import make_grid

from dvae_cli.config import Params
from dvae_cli.dataset import SPLIT_NAMES, DatasetFile
from dvae_cli.errors import UserError
from dvae_cli.files import atomic_path
from dvae_cli.models.base import DiscreteVAE
from dvae_cli.models.jointvae import JointVAE, kl_categorical, kl_normal
from dvae_cli.models.vqvae import VQVAE
from dvae_cli.modelstore import load_model
from dvae_cli.progress import Advance, progress_bar
from dvae_cli.runtime import resolve_device

MIN_TILE = 64
"""Tiles are upscaled by the smallest integer factor that makes them at least this many pixels wide."""
GRID_PADDING = 2
"""Pixels between tiles and around the grid (make_grid's padding)."""
LABEL_WIDTH = 104
"""Width of the left margin that holds row labels."""
CAPTION_HEIGHT = 30
"""Height of the band under each codebook tile that holds its index and usage."""
FONT_SIZE = 12
BACKGROUND = 1.0
"""Padding, margins and empty cells are white; text is black."""
TEXT_COLOR = (0, 0, 0)
SHOWN_IMAGES = 8
"""Evaluation images in reconstructions.png and code_maps.png."""
CODE_MAP_PAIRS_PER_ROW = 4
PRIOR_SAMPLES = 64
SAMPLE_COLUMNS = 8
MEASURED_IMAGES = 1000
"""Evaluation images (a seeded sample) over which KL per dimension and code usage are measured."""
CODEBOOK_CODES = 16
CODEBOOK_COLUMNS = 8
ENCODE_BATCH = 256
TRAVERSAL_QUANTILES = (0.05, 0.95)
GOLDEN_RATIO_CONJUGATE = 0.6180339887498949
PNG_COMPRESS_LEVEL = 6

FILES: dict[str, tuple[str, ...]] = {
    "jointvae": ("traversals.png", "discrete_x_continuous.png", "reconstructions.png", "samples.png"),
    "vqvae": ("reconstructions.png", "code_maps.png", "codebook.png", "code_usage.csv"),
}
"""Every file each family's renderer can write (a picture it cannot draw is skipped with a note)."""


@dataclass(frozen=True)
class RenderInputs:
    """Evaluation images the pictures start from, uint8 [n, C, H, W] on the model's device."""

    base: Tensor
    """The one image traversals start from (render.base_index of the evaluation split)."""
    shown: Tensor
    """A fixed seeded set of up to SHOWN_IMAGES images for reconstructions and code maps."""
    measured: Tensor
    """A fixed seeded sample of up to MEASURED_IMAGES images for KL and code usage."""
    steps: int
    seed: int


@dataclass
class Rendered:
    pictures: dict[str, Image.Image] = field(default_factory=dict)
    tables: dict[str, str] = field(default_factory=dict)
    """CSV text by file name."""
    notes: list[str] = field(default_factory=list)
    """Pictures skipped and why."""


@dataclass(frozen=True)
class RenderResult:
    folder: Path
    files: dict[str, tuple[int, int] | None]
    """Each file written: its (width, height) in pixels, None for a data file."""
    notes: list[str]
    seconds: float


def tile_size(image_size: int) -> int:
    """Side of an upscaled tile: image_size times the smallest integer factor reaching MIN_TILE."""
    return image_size * -(-MIN_TILE // image_size)


def grid_extent(rows: int, columns: int, cell_width: int, cell_height: int, labelled: bool) -> tuple[int, int]:
    """(width, height) in pixels of a grid of equal cells, with the label margin when `labelled`."""
    width = columns * (cell_width + GRID_PADDING) + GRID_PADDING + (LABEL_WIDTH if labelled else 0)
    return width, rows * (cell_height + GRID_PADDING) + GRID_PADDING


def traversal_values(steps: int) -> Tensor:
    """Φ⁻¹(linspace(0.05, 0.95, steps)): evenly spaced quantiles of the N(0, 1) prior."""
    quantiles = torch.linspace(*TRAVERSAL_QUANTILES, steps, dtype=torch.float64)
    return torch.distributions.Normal(0.0, 1.0).icdf(quantiles).float()


def code_palette(num_codes: int) -> Tensor:
    """float [K, 3] in [0, 1]: hues stepped by the golden ratio, so neighbouring indices get distant colors."""
    colors = [colorsys.hsv_to_rgb((code * GOLDEN_RATIO_CONJUGATE) % 1.0, 0.75, 0.95) for code in range(num_codes)]
    return torch.tensor(colors, dtype=torch.float32)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=FONT_SIZE)


def as_tiles(images: Tensor) -> Tensor:
    """float RGB [n, 3, T, T] on the CPU: images in [0, 1] upscaled by an integer nearest-neighbour factor."""
    images = images.detach().float().cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    factor = tile_size(images.shape[-1]) // images.shape[-1]
    return images.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def _blank_tiles(count: int, like: Tensor) -> Tensor:
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
    font = _font()
    cell_height = tiles.shape[2]
    line_height = FONT_SIZE + 3
    for row, lines in enumerate(row_labels):
        top = GRID_PADDING + row * (cell_height + GRID_PADDING) + (cell_height - line_height * len(lines)) // 2
        for number, line in enumerate(lines):
            draw.text((4, top + number * line_height), line, fill=TEXT_COLOR, font=font)
    return canvas


def save_png(image: Image.Image, path: Path) -> None:
    image.save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def _to_float(images: Tensor) -> Tensor:
    return images.float().div_(255)


def _batches(images: Tensor) -> Iterator[Tensor]:
    for start in range(0, images.shape[0], ENCODE_BATCH):
        yield _to_float(images[start:start + ENCODE_BATCH])


def reconstructions_picture(model: DiscreteVAE, images: Tensor) -> Image.Image:
    """The images (top row) above their evaluation-mode reconstructions (bottom row)."""
    originals = _to_float(images)
    tiles = as_tiles(torch.cat([originals, model.reconstruct(originals)]))
    return labelled_grid(tiles, images.shape[0], [["input"], ["reconstruction"]])


@dataclass(frozen=True)
class LatentKL:
    """KL(q ‖ prior) in nats on the measured images: per continuous dimension and per discrete variable."""

    continuous: Tensor  # [d]
    discrete: list[float]


def measure_kl(model: JointVAE, images: Tensor) -> LatentKL:
    """Batch-mean KL of each continuous dimension (posterior means and log-variances) and each discrete variable."""
    parts = [model.encode(batch) for batch in _batches(images)]
    kl_z = torch.zeros(0)
    if model.continuous:
        mean = torch.cat([part["continuous_mean"] for part in parts]).cpu()
        logvar = torch.cat([part["continuous_logvar"] for part in parts]).cpu()
        kl_z = kl_normal(mean, logvar)
    kl_c: list[float] = []
    if model.discrete:
        probs = torch.cat([part["discrete_probs"] for part in parts]).cpu()
        for variable in probs.split(model.discrete, dim=1):
            kl_c.append(float(kl_categorical(variable)))
    return LatentKL(continuous=kl_z, discrete=kl_c)


def render_jointvae(model: DiscreteVAE, inputs: RenderInputs, advance: Advance) -> Rendered:
    assert isinstance(model, JointVAE)
    rendered = Rendered()
    kl = measure_kl(model, inputs.measured)
    # Stable sort: equally informative dimensions keep their index order.
    order = [int(i) for i in torch.sort(kl.continuous, descending=True, stable=True).indices]
    base = model.encode(_to_float(inputs.base))
    base_z = base["continuous_mean"].cpu() if model.continuous else torch.zeros(1, 0)
    base_categories = base["discrete"].cpu() if model.discrete else torch.zeros(1, 0, dtype=torch.long)
    values = traversal_values(inputs.steps)
    columns = max([inputs.steps, *model.discrete])

    rows: list[Tensor] = []
    labels: list[list[str]] = []
    for dimension in order:
        z = base_z.repeat(inputs.steps, 1)
        z[:, dimension] = values
        rows.append(model.decode_latent(z, base_categories.repeat(inputs.steps, 1)))
        labels.append([f"z{dimension}", f"KL {float(kl.continuous[dimension]):.2f} nats"])
    for variable, categories in enumerate(model.discrete):
        chosen = base_categories.repeat(categories, 1)
        chosen[:, variable] = torch.arange(categories)
        rows.append(model.decode_latent(base_z.repeat(categories, 1), chosen))
        labels.append([f"c{variable} (k={categories})", f"KL {kl.discrete[variable]:.2f} nats"])
    if not model.continuous:
        rendered.notes.append("the model has no continuous dimension: traversals.png shows only its discrete "
                              "variables and discrete_x_continuous.png is skipped")
    if rows:
        tiles = [as_tiles(row) for row in rows]
        padded = [torch.cat([row, _blank_tiles(columns - row.shape[0], row)]) for row in tiles]
        rendered.pictures["traversals.png"] = labelled_grid(torch.cat(padded), columns, labels)
    advance()

    if model.continuous and model.discrete:
        dimension, categories = order[0], model.discrete[0]
        z = base_z.repeat(categories * inputs.steps, 1)
        z[:, dimension] = values.repeat(categories)
        chosen = base_categories.repeat(categories * inputs.steps, 1)
        chosen[:, 0] = torch.arange(categories).repeat_interleave(inputs.steps)
        labels = [[f"c0 = {category}", f"z{dimension} across"] for category in range(categories)]
        rendered.pictures["discrete_x_continuous.png"] = labelled_grid(
            as_tiles(model.decode_latent(z, chosen)), inputs.steps, labels)
    elif model.continuous:
        rendered.notes.append("the model has no discrete variable: discrete_x_continuous.png is skipped")
    advance()

    rendered.pictures["reconstructions.png"] = reconstructions_picture(model, inputs.shown)
    advance()

    generator = torch.Generator().manual_seed(inputs.seed)
    z = torch.randn(PRIOR_SAMPLES, model.continuous, generator=generator)
    prior_columns = [torch.randint(categories, (PRIOR_SAMPLES,), generator=generator) for categories in model.discrete]
    categories = (torch.stack(prior_columns, dim=1) if prior_columns
                  else torch.zeros(PRIOR_SAMPLES, 0, dtype=torch.long))
    rendered.pictures["samples.png"] = grid_image(as_tiles(model.decode_latent(z, categories)), SAMPLE_COLUMNS)
    advance()
    return rendered


def code_usage(model: VQVAE, images: Tensor) -> Tensor:
    """int64 [K]: how many code-map positions of `images` each code holds."""
    counts = torch.zeros(model.config.num_codes, dtype=torch.long)
    for batch in _batches(images):
        counts += torch.bincount(model.codes(batch).flatten().cpu(), minlength=model.config.num_codes)
    return counts


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
    font = _font()
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


def render_vqvae(model: DiscreteVAE, inputs: RenderInputs, advance: Advance) -> Rendered:
    assert isinstance(model, VQVAE)
    rendered = Rendered()
    rendered.pictures["reconstructions.png"] = reconstructions_picture(model, inputs.shown)
    advance()

    palette = code_palette(model.config.num_codes)
    image_tiles = as_tiles(_to_float(inputs.shown))
    map_tiles = code_map_tiles(model.codes(_to_float(inputs.shown)), palette, image_tiles.shape[-1])
    pairs = torch.stack([image_tiles, map_tiles], dim=1).flatten(0, 1)
    rendered.pictures["code_maps.png"] = grid_image(pairs, 2 * min(CODE_MAP_PAIRS_PER_ROW, inputs.shown.shape[0]))
    advance()

    counts = code_usage(model, inputs.measured)
    most_used = [int(code) for code in np.argsort(-counts.numpy(), kind="stable")[:CODEBOOK_CODES]
                 if counts[code] > 0]
    side = inputs.shown.shape[-1] // model.config.downsample
    filled = torch.tensor(most_used).view(-1, 1, 1).expand(-1, side, side)
    rendered.pictures["codebook.png"] = codebook_picture(model.decode_codes(filled), most_used, counts)
    advance()

    rendered.tables["code_usage.csv"] = usage_table(counts)
    advance()
    return rendered


RENDERERS: dict[str, Callable[[DiscreteVAE, RenderInputs, Advance], Rendered]] = {
    "jointvae": render_jointvae,
    "vqvae": render_vqvae,
}


def _seeded_rows(rows: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sorted `count` rows drawn without replacement (all of them when there are no more)."""
    if len(rows) <= count:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, size=count, replace=False))


def _check_out_folder(out: Path, family: str) -> None:
    """Refuse to replace a folder that holds anything render did not write: the whole folder is replaced."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for the renders")
    foreign = sorted(path.name for path in out.iterdir() if path.name not in FILES[family])
    if foreign:
        raise UserError(f"--out {out} holds {foreign[0]!r}, which dvae render did not write, and render replaces "
                        "the whole folder; pass an empty or new folder")


def render(params: Params, family: str, model_dir: Path, dataset_path: Path, out: Path,
           show_progress: bool = True) -> RenderResult:
    """Draw the family's pictures for the model in `model_dir` from the dataset's evaluation split into `out`."""
    started = time.perf_counter()
    settings = params.render
    device = resolve_device(params.train.device)
    loaded = load_model(model_dir, family, device)
    _check_out_folder(out, family)
    with DatasetFile(dataset_path) as dataset:
        shape = (dataset.info.channels, dataset.info.image_size)
        if shape != (loaded.data.channels, loaded.data.image_size):
            trained = (loaded.data.channels, loaded.data.image_size)
            raise UserError(f"{dataset_path} holds {shape[0]}-channel {shape[1]}×{shape[1]} images but the model in "
                            f"{model_dir} was trained on {trained[0]}-channel {trained[1]}×{trained[1]} ones; "
                            "pass the dataset it was trained on")
        split = dataset.evaluation_split()
        rows = dataset.indices(split)
        if settings.base_index >= len(rows):
            raise UserError(f"render.base_index (--base) is {settings.base_index} but the {SPLIT_NAMES[split]} split "
                            f"of {dataset_path} has {len(rows)} images; choose 0 to {len(rows) - 1}")
        shown = _seeded_rows(rows, SHOWN_IMAGES, settings.seed)
        measured = _seeded_rows(rows, MEASURED_IMAGES, settings.seed)
        inputs = RenderInputs(
            base=torch.from_numpy(dataset.read_images(rows[settings.base_index:settings.base_index + 1])).to(device),
            shown=torch.from_numpy(dataset.read_images(shown)).to(device),
            measured=torch.from_numpy(dataset.read_images(measured)).to(device),
            steps=settings.steps, seed=settings.seed)

    with torch.inference_mode(), progress_bar(f"render {family}", len(FILES[family]), enabled=show_progress) as advance:
        rendered = RENDERERS[family](loaded.model, inputs, advance)

    files: dict[str, tuple[int, int] | None] = {}
    with atomic_path(out) as folder:
        folder.mkdir()
        for name, picture in rendered.pictures.items():
            save_png(picture, folder / name)
            files[name] = picture.size
        for name, text in rendered.tables.items():
            (folder / name).write_text(text)
            files[name] = None
    return RenderResult(folder=out, files=files, notes=rendered.notes, seconds=time.perf_counter() - started)
