"""Tests of the procedural dSprites renderer: factor layout, pixel guarantees and shape geometry, and the search for
the true image nearest a sample."""

import numpy as np
import pytest
import torch

from dvae_cli.sources.dsprites import (
    FACTOR_NAMES,
    FACTOR_SIZES,
    IMAGE_SIZE,
    NUM_IMAGES,
    NUM_TILES,
    SHAPE_NAMES,
    TILE_SIZE,
    DSpritesRenderer,
    factor_classes,
    factor_values,
    factors,
    nearest_images,
)
from dvae_cli.sources.transform import fit_images

IMAGES_PER_TILE = FACTOR_SIZES[3] * FACTOR_SIZES[4]
SQUARE, ELLIPSE, HEART = 0, 1, 2


@pytest.fixture(scope="module")
def renderer() -> DSpritesRenderer:
    return DSpritesRenderer()


@pytest.fixture(scope="module")
def tiles(renderer: DSpritesRenderer) -> np.ndarray:
    """bool [shape, scale, orientation, 32, 32]: each sprite as rendered at posX = posY = 0."""
    images = renderer.render(np.arange(NUM_TILES) * IMAGES_PER_TILE)
    return (images[:, 0, :TILE_SIZE, :TILE_SIZE] > 0).reshape(*FACTOR_SIZES[:3], TILE_SIZE, TILE_SIZE)


def test_counts_and_names() -> None:
    assert FACTOR_NAMES == ("shape", "scale", "orientation", "posX", "posY")
    assert FACTOR_SIZES == (3, 6, 40, 32, 32)
    assert SHAPE_NAMES == ("square", "ellipse", "heart")
    assert NUM_IMAGES == 3 * 6 * 40 * 32 * 32 == 737_280
    assert NUM_TILES == 720


def test_factor_order_is_row_major_with_pos_y_fastest() -> None:
    indices = np.array([0, 1, 32, 1024, 40960, 245760, NUM_IMAGES - 1])
    expected = np.array(
        [
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 1],
            [0, 0, 0, 1, 0],
            [0, 0, 1, 0, 0],
            [0, 1, 0, 0, 0],
            [1, 0, 0, 0, 0],
            [2, 5, 39, 31, 31],
        ]
    )
    classes = factor_classes(indices)
    assert classes.dtype == np.int64 and classes.shape == (7, 5)
    np.testing.assert_array_equal(classes, expected)


def test_index_class_round_trip() -> None:
    indices = np.arange(0, NUM_IMAGES, 997)
    classes = factor_classes(indices)
    np.testing.assert_array_equal(np.ravel_multi_index(tuple(classes.T), FACTOR_SIZES), indices)
    assert (classes >= 0).all() and (classes < np.array(FACTOR_SIZES)).all()


def test_factor_values() -> None:
    values = factor_values()
    assert [len(grid) for grid in values] == list(FACTOR_SIZES)
    np.testing.assert_array_equal(values[0], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(values[1], [0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    assert values[2][0] == 0.0 and values[2][-1] == pytest.approx(2 * np.pi)
    np.testing.assert_allclose(np.diff(values[2]), 2 * np.pi / 39)
    for position_grid in values[3:]:
        np.testing.assert_allclose(position_grid, np.arange(32) / 31)


def test_factors_are_the_values_of_the_classes() -> None:
    values = factors(np.array([0, NUM_IMAGES - 1, 1024 * 10 + 32 * 3 + 7]))
    assert values.dtype == np.float32 and values.shape == (3, 5)
    np.testing.assert_allclose(values[0], [1.0, 0.5, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(values[1], [3.0, 1.0, 2 * np.pi, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(values[2], [1.0, 0.5, 10 * 2 * np.pi / 39, 3 / 31, 7 / 31], rtol=1e-6)


@pytest.mark.parametrize(
    "bad_indices", [np.array([-1]), np.array([NUM_IMAGES]), np.zeros((2, 2), dtype=np.int64), np.array([0.5])]
)
def test_bad_indices_are_rejected(renderer: DSpritesRenderer, bad_indices: np.ndarray) -> None:
    with pytest.raises(ValueError):
        factor_classes(bad_indices)
    with pytest.raises(ValueError):
        renderer.render(bad_indices)


@pytest.mark.parametrize(("start", "stop"), [(-1, 3), (5, 4), (0, NUM_IMAGES + 1)])
def test_bad_ranges_are_rejected(renderer: DSpritesRenderer, start: int, stop: int) -> None:
    with pytest.raises(ValueError):
        renderer.render_range(start, stop)


def test_rendering_is_deterministic(renderer: DSpritesRenderer) -> None:
    indices = np.arange(0, NUM_IMAGES, 211)
    assert DSpritesRenderer().render(indices).tobytes() == renderer.render(indices).tobytes()


def _assert_valid_images(images: np.ndarray) -> None:
    assert images.dtype == np.uint8 and images.shape[1:] == (1, IMAGE_SIZE, IMAGE_SIZE)
    assert set(np.unique(images)) <= {0, 255}
    assert (images.reshape(len(images), -1).max(axis=1) == 255).all(), "an image is empty"
    pixels = images[:, 0]
    assert not pixels[:, [0, -1], :].any() and not pixels[:, :, [0, -1]].any(), "a sprite touches the border"


def test_strided_sample_is_valid(renderer: DSpritesRenderer) -> None:
    _assert_valid_images(renderer.render(np.arange(0, NUM_IMAGES, 101)))


def test_every_sprite_at_extreme_positions_is_valid(renderer: DSpritesRenderer) -> None:
    corner_offsets = np.array([0, 31, 31 * 32, 31 * 32 + 31])  # (posX, posY) = (0,0), (0,31), (31,0), (31,31)
    indices = (np.arange(NUM_TILES)[:, None] * IMAGES_PER_TILE + corner_offsets[None, :]).ravel()
    _assert_valid_images(renderer.render(indices))


def test_tile_is_placed_at_pos_x_column_and_pos_y_row(renderer: DSpritesRenderer) -> None:
    for shape, scale, orientation, x0, y0 in [(0, 5, 0, 3, 20), (2, 1, 17, 31, 0), (1, 3, 9, 12, 31)]:
        index = np.ravel_multi_index((shape, scale, orientation, x0, y0), FACTOR_SIZES)
        tile = renderer.render(np.array([index - index % IMAGES_PER_TILE]))[0, 0, :TILE_SIZE, :TILE_SIZE]
        image = renderer.render(np.array([index]))[0, 0]
        expected = np.zeros_like(image)
        expected[y0 : y0 + TILE_SIZE, x0 : x0 + TILE_SIZE] = tile
        np.testing.assert_array_equal(image, expected)


def test_axis_aligned_squares_match_hand_rasterisation(tiles: np.ndarray) -> None:
    # Squares have area 270 px² at scale 1: half-side √270 / 2 = 8.216 around centre 15.5, edges at
    # 7.28 and 23.72, so pixels 8..23 are covered; at scale 0.5 the edges are 11.39 and 19.61: pixels 12..19.
    # The partly covered edge pixels hold 1 of 4 subsample columns, below the half-coverage threshold.
    for scale, first, last in [(5, 8, 23), (0, 12, 19)]:
        expected = np.zeros((TILE_SIZE, TILE_SIZE), dtype=bool)
        expected[first : last + 1, first : last + 1] = True
        np.testing.assert_array_equal(tiles[SQUARE, scale, 0], expected)


def test_area_grows_with_scale_and_is_similar_across_shapes(tiles: np.ndarray) -> None:
    areas = tiles.sum(axis=(-2, -1))
    assert (np.diff(areas, axis=1) > 0).all()
    assert (areas.max(axis=0) / areas.min(axis=0) < 1.2).all()
    # Areas scale with the square of the scale (270 px² at scale 1), up to rasterisation.
    np.testing.assert_allclose(areas.mean(axis=(0, 2)), 270 * factor_values()[1] ** 2, rtol=0.05)


def _centroid_and_covariance(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid and covariance of the on pixels in (x rightwards, y upwards) coordinates."""
    rows, columns = np.nonzero(mask)
    points = np.stack([columns, -rows], axis=1).astype(np.float64)
    return points.mean(axis=0), np.cov(points.T)


def test_sprites_rotate_about_the_tile_centre(tiles: np.ndarray) -> None:
    for mask in tiles.reshape(-1, TILE_SIZE, TILE_SIZE):
        centroid, _ = _centroid_and_covariance(mask)
        np.testing.assert_allclose(centroid, [15.5, -15.5], atol=0.5)


def test_ellipse_is_two_to_one_and_rotates_counter_clockwise(tiles: np.ndarray) -> None:
    angles = factor_values()[2]
    for orientation in [0, 3, 10, 20, 27]:
        _, covariance = _centroid_and_covariance(tiles[ELLIPSE, 5, orientation])
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        assert np.sqrt(eigenvalues[1] / eigenvalues[0]) == pytest.approx(2.0, rel=0.1)
        major_axis = eigenvectors[:, 1]
        expected_axis = np.array([np.cos(angles[orientation]), np.sin(angles[orientation])])
        assert abs(major_axis @ expected_axis) > np.cos(np.radians(3))


def test_heart_points_down_at_orientation_zero_and_right_after_a_quarter_turn(tiles: np.ndarray) -> None:
    upright = tiles[HEART, 5, 0]
    rows = np.nonzero(upright.any(axis=1))[0]
    assert upright[rows[-1]].sum() < upright[rows[0]].sum()  # the tip is narrower than the lobes
    notch_row = upright[rows[0]]
    assert not notch_row[15] and not notch_row[16]  # the notch between the two lobes
    quarter_turn = tiles[HEART, 5, 10]  # 92.3°
    columns = np.nonzero(quarter_turn.any(axis=0))[0]
    assert quarter_turn[:, columns[-1]].sum() < quarter_turn[:, columns[0]].sum()


def _pairwise_iou(masks_a: np.ndarray, masks_b: np.ndarray) -> np.ndarray:
    flat_a = masks_a.reshape(len(masks_a), -1).astype(np.int64)
    flat_b = masks_b.reshape(len(masks_b), -1).astype(np.int64)
    intersection = flat_a @ flat_b.T
    union = flat_a.sum(axis=1)[:, None] + flat_b.sum(axis=1)[None, :] - intersection
    return intersection / union


def test_shapes_overlap_little_at_equal_scale_and_orientation(tiles: np.ndarray) -> None:
    for shape_a, shape_b in [(SQUARE, ELLIPSE), (SQUARE, HEART), (ELLIPSE, HEART)]:
        intersection = (tiles[shape_a] & tiles[shape_b]).sum(axis=(-2, -1))
        union = (tiles[shape_a] | tiles[shape_b]).sum(axis=(-2, -1))
        assert (intersection / union).max() < 0.8


def test_nearest_neighbour_at_another_orientation_has_the_same_shape(tiles: np.ndarray) -> None:
    shape_of_row = np.repeat(np.arange(FACTOR_SIZES[0]), FACTOR_SIZES[2])
    orientation_of_row = np.tile(np.arange(FACTOR_SIZES[2]), FACTOR_SIZES[0])
    for scale in range(FACTOR_SIZES[1]):
        masks = tiles[:, scale].reshape(-1, TILE_SIZE, TILE_SIZE)
        iou = _pairwise_iou(masks, masks)
        iou[orientation_of_row[:, None] == orientation_of_row[None, :]] = -1.0
        nearest = iou.argmax(axis=1)
        np.testing.assert_array_equal(shape_of_row[nearest], shape_of_row)


def test_render_matches_render_range(renderer: DSpritesRenderer) -> None:
    start, stop = 300_000, 303_000
    block = renderer.render_range(start, stop)
    assert block.shape == (stop - start, 1, IMAGE_SIZE, IMAGE_SIZE)
    assert block.flags.c_contiguous and block.flags.writeable
    shuffled = np.random.default_rng(0).permutation(np.arange(start, stop))[:500]
    np.testing.assert_array_equal(renderer.render(shuffled), block[shuffled - start])
    assert renderer.render_range(7, 7).shape == (0, 1, IMAGE_SIZE, IMAGE_SIZE)


def test_every_true_image_is_its_own_nearest(renderer: DSpritesRenderer) -> None:
    """IoU 1 and the same shape, scale and position (orientations that draw the same pixels are one image)."""
    indices = np.random.default_rng(0).integers(0, NUM_IMAGES, 40)
    images = torch.from_numpy(renderer.render(indices)).float() / 255
    found, iou = nearest_images(images)
    assert np.all(iou == 1)
    np.testing.assert_array_equal(renderer.render(found), renderer.render(indices))
    assert np.array_equal(factor_classes(found)[:, [0, 1, 3, 4]], factor_classes(indices)[:, [0, 1, 3, 4]])


def test_the_nearest_image_of_a_damaged_or_resized_sprite(renderer: DSpritesRenderer) -> None:
    index = np.array([np.ravel_multi_index((HEART, 5, 0, 10, 20), FACTOR_SIZES)])
    image = torch.from_numpy(renderer.render(index)).float() / 255
    on = int(image.sum())
    damaged = image.clone()
    damaged[0, 0, 2:4, 2:4] = 1  # 4 stray pixels far from the sprite: IoU = on / (on + 4)
    found, iou = nearest_images(damaged)
    assert found[0] == index[0] and iou[0] == pytest.approx(on / (on + 4))
    small = torch.from_numpy(fit_images(torch.from_numpy(renderer.render(index)), 1, 32)).float() / 255  # at 32×32
    found, iou = nearest_images(small)
    assert iou[0] > 0.8 and factor_classes(found)[0, 0] == HEART
    found, iou = nearest_images(torch.zeros(2, 1, 64, 64))
    assert np.all(iou == 0)

