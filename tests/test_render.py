"""dvae render: picture sizes from the layout constants, what traversal rows show, identical reruns, bad inputs."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dvae_cli.cli import app
from dvae_cli.core.errors import UserError
from dvae_cli.core.images import GRID_PADDING, LABEL_WIDTH, grid_extent, tile_size
from dvae_cli.formats.dataset import DatasetFile
from dvae_cli.formats.model_folder import load_model, save_model
from dvae_cli.models import FAMILIES
from dvae_cli.models.base import DataShape
from dvae_cli.models.jointvae.model import JointVAE
from dvae_cli.models.jointvae.pictures import (
    PRIOR_SAMPLES,
    SAMPLE_COLUMNS,
    traversal_values,
)
from dvae_cli.models.vqvae.pictures import (
    CAPTION_HEIGHT,
    CODE_MAP_PAIRS_PER_ROW,
    CODEBOOK_CODES,
    CODEBOOK_COLUMNS,
    code_map_tiles,
    code_palette,
    usage_table,
)
from dvae_cli.params import load_params
from dvae_cli.scoring.pictures import SHOWN_IMAGES
from dvae_cli.stages import render
from tests.test_cli import assert_no_output, assert_user_error, run_dvae

TILE = 64  # the fixture's 32-pixel images, upscaled ×2
FILES = {name: family.picture_files for name, family in FAMILIES.items()}


@pytest.fixture(scope="module")
def params(trained_project):
    return load_params(trained_project.params_path)


@pytest.fixture(scope="module")
def rendered(trained_project, params, tmp_path_factory):
    """Both families rendered once from the trained project: family -> renders folder."""
    out = tmp_path_factory.mktemp("renders")
    for family in FILES:
        render.run(params, family,
                   render.RenderPaths(trained_project.model_dir(family), trained_project.dataset, out / family),
                   show_progress=False)
    return out


def cells(path: Path, rows: int, columns: int, cell_height: int = TILE, labelled: bool = True) -> np.ndarray:
    """uint8 [rows, columns, cell_height, TILE, 3]: the grid cells of a PNG laid out by render."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    left = LABEL_WIDTH if labelled else 0
    return np.stack([np.stack([
        pixels[GRID_PADDING + r * (cell_height + GRID_PADDING):][:cell_height,
               left + GRID_PADDING + c * (TILE + GRID_PADDING):][:, :TILE]
        for c in range(columns)]) for r in range(rows)])


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def test_layout_arithmetic_by_hand():
    assert [tile_size(side) for side in (28, 32, 64, 100)] == [84, 64, 64, 100]
    # 4 tiles of 64 with 2-pixel gaps and borders, plus the 104-pixel label margin
    assert grid_extent(5, 4, 64, 64, labelled=True) == (104 + 4 * 66 + 2, 5 * 66 + 2) == (370, 332)
    assert grid_extent(2, 8, 64, 94, labelled=False) == (8 * 66 + 2, 2 * 96 + 2)


def test_traversal_values_are_normal_quantiles():
    # Φ⁻¹ of 0.05, 0.275, 0.5, 0.725, 0.95
    expected = [-1.644854, -0.597760, 0.0, 0.597760, 1.644854]
    assert traversal_values(5).tolist() == pytest.approx(expected, abs=1e-5)


def test_jointvae_pictures_have_the_layout_sizes(rendered, params):
    config = params.model_config("jointvae")
    steps, folder = params.render.steps, rendered / "jointvae"
    columns = max(steps, *config.discrete)
    assert sorted(path.name for path in folder.iterdir()) == sorted(FILES["jointvae"])
    assert png_size(folder / "traversals.png") == grid_extent(
        config.continuous + len(config.discrete), columns, TILE, TILE, labelled=True)
    assert png_size(folder / "discrete_x_continuous.png") == grid_extent(
        config.discrete[0], steps, TILE, TILE, labelled=True)
    assert png_size(folder / "reconstructions.png") == grid_extent(2, SHOWN_IMAGES, TILE, TILE, labelled=True)
    assert png_size(folder / "samples.png") == grid_extent(
        PRIOR_SAMPLES // SAMPLE_COLUMNS, SAMPLE_COLUMNS, TILE, TILE, labelled=False)


def test_vqvae_pictures_have_the_layout_sizes_and_usage_counts_every_position(rendered, trained_project, params):
    folder = rendered / "vqvae"
    assert sorted(path.name for path in folder.iterdir()) == sorted(FILES["vqvae"])
    table = np.loadtxt(folder / "code_usage.csv", delimiter=",", skiprows=1, dtype=np.int64)
    assert (folder / "code_usage.csv").read_text().splitlines()[0] == "rank,code,count"
    ranks, codes, counts = table.T
    assert ranks.tolist() == list(range(1, params.model_config("vqvae").num_codes + 1))
    assert sorted(codes.tolist()) == list(range(params.model_config("vqvae").num_codes))
    assert np.all(np.diff(counts) <= 0)
    with DatasetFile(trained_project.dataset) as dataset:
        test_images = len(dataset.indices(dataset.evaluation_split()))
    code_side = 32 // params.model_config("vqvae").downsample
    assert counts.sum() == test_images * code_side * code_side

    shown_codes = min(CODEBOOK_CODES, int((counts > 0).sum()))
    assert png_size(folder / "codebook.png") == grid_extent(
        math.ceil(shown_codes / CODEBOOK_COLUMNS), min(CODEBOOK_COLUMNS, shown_codes), TILE, TILE + CAPTION_HEIGHT,
        labelled=False)
    assert png_size(folder / "reconstructions.png") == grid_extent(2, SHOWN_IMAGES, TILE, TILE, labelled=True)
    assert png_size(folder / "code_maps.png") == grid_extent(
        SHOWN_IMAGES // CODE_MAP_PAIRS_PER_ROW, 2 * CODE_MAP_PAIRS_PER_ROW, TILE, TILE, labelled=False)


def test_discrete_rows_show_k_different_tiles(rendered, params):
    config = params.model_config("jointvae")
    categories, columns = config.discrete[0], max(params.render.steps, *config.discrete)
    grid = cells(rendered / "jointvae" / "traversals.png", config.continuous + 1, columns)
    discrete_row = grid[config.continuous]
    distinct = {tile.tobytes() for tile in discrete_row[:categories]}
    assert len(distinct) == categories
    assert np.all(discrete_row[categories:] == 255)  # cells past the k categories stay empty

    by_category = cells(rendered / "jointvae" / "discrete_x_continuous.png", categories, params.render.steps)
    assert len({row.tobytes() for row in by_category}) == categories


def test_a_dimension_the_decoder_ignores_gives_a_row_of_identical_tiles(trained_project, params, tmp_path):
    """Dimension 0 made uninformative (posterior = prior, KL 0) and ignored by the decoder: sorted last, unchanging."""
    loaded = load_model(trained_project.model_dir("jointvae"), "jointvae")
    model = loaded.model
    assert isinstance(model, JointVAE)
    ignored = 0
    with torch.no_grad():
        model.latent_to_features[0].weight[:, ignored] = 0.0
        for head in (model.fc_mean, model.fc_log_var):
            head.weight[ignored] = 0.0
            head.bias[ignored] = 0.0
    save_model(tmp_path / "model", loaded.family, model, loaded.config, loaded.data, {})
    render.run(params, "jointvae", render.RenderPaths(tmp_path / "model", trained_project.dataset, tmp_path / "out"),
               show_progress=False)

    continuous, columns = params.model_config("jointvae").continuous, max(params.render.steps, *params.model_config("jointvae").discrete)
    grid = cells(tmp_path / "out" / "traversals.png", continuous + 1, columns)
    last_continuous_row = grid[continuous - 1]
    assert all(np.array_equal(tile, last_continuous_row[0]) for tile in last_continuous_row)
    most_informative_row = grid[0]
    assert len({tile.tobytes() for tile in most_informative_row[:params.render.steps]}) > 1


def test_rendering_twice_gives_identical_bytes(rendered, trained_project, params, tmp_path):
    for family in FILES:
        render.run(params, family,
                   render.RenderPaths(trained_project.model_dir(family), trained_project.dataset, tmp_path / family),
                   show_progress=False)
        for name in FILES[family]:
            assert (tmp_path / family / name).read_bytes() == (rendered / family / name).read_bytes(), name


def test_code_maps_paint_each_code_its_palette_color():
    palette = code_palette(4)
    assert len({tuple(color) for color in palette.tolist()}) == 4
    tiles = code_map_tiles(torch.tensor([[[0, 3], [2, 2]]]), palette, side=8)
    assert tiles.shape == (1, 3, 8, 8)
    for (top, left), code in {(0, 0): 0, (0, 4): 3, (4, 0): 2, (4, 4): 2}.items():
        block = tiles[0, :, top:top + 4, left:left + 4]
        assert torch.equal(block, palette[code].view(3, 1, 1).expand(3, 4, 4))


def test_usage_table_ranks_by_count_then_code():
    assert usage_table(torch.tensor([2, 5, 0, 5])) == "rank,code,count\n1,1,5\n2,3,5\n3,0,2\n4,2,0\n"


def test_no_continuous_dimension_skips_its_pictures_with_a_note(trained_project, params, tmp_path):
    config = dataclasses.replace(params.model_config("jointvae"), continuous=0)
    data = DataShape(channels=1, image_size=32)
    torch.manual_seed(0)
    save_model(tmp_path / "model", "jointvae", JointVAE(config, data), config, data, {})
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["render", "--model", "jointvae", "--params", str(trained_project.params_path),
                                      "--dataset", str(trained_project.dataset), "--model-dir", str(tmp_path / "model"),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "note: the model has no continuous dimension" in result.stderr
    assert sorted(path.name for path in out.iterdir()) == ["reconstructions.png", "samples.png", "traversals.png"]
    columns = max(params.render.steps, *config.discrete)
    assert png_size(out / "traversals.png") == grid_extent(len(config.discrete), columns, TILE, TILE, labelled=True)


def test_a_folder_with_other_files_is_not_replaced(trained_project, params, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):
        render.run(params, "vqvae",
                   render.RenderPaths(trained_project.model_dir("vqvae"), trained_project.dataset, tmp_path),
                   show_progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(("family", "args", "fragments"), [
    ("vqvae", [], ["models/vqvae", "`dvae train --model vqvae`"]),
    ("jointvae", ["--base", "{test_images}"], ["render.base_index (--base) is {test_images}", "choose 0 to"]),
    ("jointvae", ["--steps", "1"], ["`render.steps` is 1", "≥ 2"]),
])
def test_bad_inputs_exit_2_with_one_line_and_no_output(trained_project, tmp_path, family, args, fragments):
    with DatasetFile(trained_project.dataset) as dataset:
        test_images = str(len(dataset.indices(dataset.evaluation_split())))
    out = tmp_path / "out"
    # the missing model is looked for under an empty folder; the others use the trained project
    cwd = tmp_path if family == "vqvae" else trained_project.root
    args = [arg.format(test_images=test_images) for arg in args]
    result = run_dvae("render", "--model", family, "--out", str(out), *args, cwd=cwd)
    assert_user_error(result, *(fragment.format(test_images=test_images) for fragment in fragments))
    assert_no_output(tmp_path, out)
