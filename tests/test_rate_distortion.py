import io
import math

import numpy as np
import pytest
from PIL import Image

from dvae_cli.scoring.rate_distortion import (
    LOSSLESS_PSNR,
    RatePoint,
    csv_bytes,
    palette_kmeans,
    patch_kmeans,
    pillow_codec,
    plot_png,
    psnr_of,
)


def psnr_of_sse(sse: float, pixels: int) -> float:
    """PSNR from a sum of squared errors in 8-bit units over `pixels` values."""
    return 10 * math.log10(pixels * 255**2 / sse)


def two_level_images() -> np.ndarray:
    """Two 4×4 grayscale images of two gray levels each: 10 pixels of 10 and 6 of 200; 3 of 40 and 13 of 90."""
    first = np.full(16, 10, np.uint8)
    first[[1, 4, 6, 9, 11, 15]] = 200
    second = np.full(16, 90, np.uint8)
    second[[0, 7, 12]] = 40
    return np.stack([first, second]).reshape(2, 1, 4, 4)


# psnr_of


def test_psnr_of_a_hand_computed_mse():
    originals = np.full((2, 1, 4, 4), 100, np.uint8)
    # Every pixel off by 51/255 = 0.2: MSE 0.04, PSNR 10·log10(25).
    assert psnr_of(originals, originals + 51) == pytest.approx(13.979400086720377)
    assert psnr_of(originals, np.full(originals.shape, 151 / 255)) == pytest.approx(13.979400086720377)
    half_off = originals.copy()
    half_off[0] += 51
    assert psnr_of(originals, half_off) == pytest.approx(10 * math.log10(1 / 0.02))


def test_psnr_of_identical_images_is_the_lossless_value():
    images = np.arange(48, dtype=np.uint8).reshape(1, 3, 4, 4)
    assert psnr_of(images, images.copy()) == LOSSLESS_PSNR
    assert psnr_of(images, images / 255.0) == LOSSLESS_PSNR
    with pytest.raises(ValueError):
        psnr_of(images, images[:, :1])


# palette_kmeans


def test_palette_of_two_gray_levels():
    images = two_level_images()
    one, two = palette_kmeans(images, colors=(1, 2))
    assert (two.method, two.setting) == ("kmeans-palette", "k=2")
    assert two.psnr == LOSSLESS_PSNR
    assert two.bits_per_image == 4 * 4 * 1 + 2 * 1 * 8
    # k=1: each image's palette is its mean rounded to 8 bits: 1300/16 = 81.25 → 81 and 1290/16 = 80.625 → 81.
    sse = 10 * (81 - 10) ** 2 + 6 * (200 - 81) ** 2 + 3 * (81 - 40) ** 2 + 13 * (90 - 81) ** 2
    assert one.setting == "k=1"
    assert one.bits_per_image == 0 + 1 * 1 * 8
    assert one.psnr == pytest.approx(psnr_of_sse(sse, 32))


def test_palette_larger_than_the_colors_of_an_image_is_lossless():
    image = np.zeros((1, 1, 4, 4), np.uint8)
    image[0, 0, 0, :2] = (100, 200)
    three, four = palette_kmeans(image, colors=(3, 4))
    assert three.psnr == four.psnr == LOSSLESS_PSNR
    assert four.bits_per_image == 16 * 2 + 4 * 8
    assert three.bits_per_image == pytest.approx(16 * math.log2(3) + 3 * 8)


def test_palette_of_two_rgb_colors():
    red, dark, azure = (255, 0, 0), (10, 20, 36), (0, 128, 255)
    first = np.array([red] * 12 + [dark] * 4, np.uint8)
    second = np.array([red] * 10 + [azure] * 6, np.uint8)
    images = np.stack([first, second]).reshape(2, 4, 4, 3).transpose(0, 3, 1, 2)
    one, two = palette_kmeans(images, colors=(1, 2))
    assert two.psnr == LOSSLESS_PSNR
    assert two.bits_per_image == 16 * 1 + 2 * 3 * 8
    # k=1: the mean colors (193.75, 5, 9) → (194, 5, 9) and (159.375, 48, 95.625) → (159, 48, 96).
    means = np.array([[194, 5, 9], [159, 48, 96]])
    sse = sum(((pixels.astype(int) - mean) ** 2).sum() for pixels, mean in zip((first, second), means))
    assert one.bits_per_image == 3 * 8
    assert one.psnr == pytest.approx(psnr_of_sse(sse, 2 * 16 * 3))


def test_palette_is_deterministic_and_checks_k():
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 8, 8), dtype=np.uint8)
    assert palette_kmeans(images, colors=(2, 5)) == palette_kmeans(images, colors=(2, 5))
    with pytest.raises(ValueError):
        palette_kmeans(images, colors=(0,))


# patch_kmeans

PATCH_A = (np.arange(16).reshape(4, 4) * 10).astype(np.uint8)
PATCH_B = 255 - PATCH_A


def tiled_images() -> np.ndarray:
    """Two 8×8 grayscale images tiled from the 4×4 patches A and B, four of each in all."""
    first = np.block([[PATCH_A, PATCH_B], [PATCH_B, PATCH_A]])
    second = np.block([[PATCH_B, PATCH_B], [PATCH_A, PATCH_A]])
    return np.stack([first, second])[:, None]


def test_patch_codebook_of_the_two_patches_is_lossless():
    images = tiled_images()
    (point,) = patch_kmeans(images, images, sizes=(2,))
    assert (point.method, point.setting) == ("kmeans-patch4x4", "K=2")
    assert point.psnr == LOSSLESS_PSNR
    assert point.bits_per_image == (8 / 4) * (8 / 4) * 1


def test_patch_codebook_larger_than_the_distinct_patches_is_capped():
    images = tiled_images()
    one, two = patch_kmeans(images, images, sizes=(1, 2, 16))
    assert [one.setting, two.setting] == ["K=1", "K=2"]
    assert two.psnr == LOSSLESS_PSNR
    # K=1: the codeword is the mean patch (A + B)/2 = 127.5 everywhere, rounded to 128.
    a = PATCH_A.astype(int)
    sse = 4 * (((a - 128) ** 2).sum() + ((255 - a - 128) ** 2).sum())
    assert one.bits_per_image == 0
    assert one.psnr == pytest.approx(psnr_of_sse(sse, 2 * 64))


def test_patch_size_must_divide_the_images():
    images = tiled_images()
    with pytest.raises(ValueError):
        patch_kmeans(images[..., :6, :], images, sizes=(2,))
    with pytest.raises(ValueError):
        patch_kmeans(images, images[..., :, :6], sizes=(2,))


# pillow_codec


def smooth_images(channels: int) -> np.ndarray:
    """Two 32×32 ramps (one of them flipped), gray or with the ramp in each color channel at a different slope."""
    y, x = np.mgrid[:32, :32]
    ramps = np.stack([(x * 4 + y * 3) * (2 + channel) // 4 for channel in range(channels)]).astype(np.uint8)
    return np.stack([ramps, ramps[:, ::-1]])


def own_bytes(images: np.ndarray, format: str, quality: int) -> list[int]:
    """Byte lengths of the images saved by Pillow directly."""
    lengths = []
    for image in images:
        buffer = io.BytesIO()
        picture = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        Image.fromarray(np.ascontiguousarray(picture)).save(buffer, format=format, quality=quality)
        lengths.append(len(buffer.getvalue()))
    return lengths


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("codec", ["jpeg", "webp"])
def test_pillow_codec_bits_and_quality(codec: str, channels: int):
    images = smooth_images(channels)
    low, high = pillow_codec(images, codec, qualities=(10, 90))
    assert (low.method, low.setting, high.setting) == (codec, "q=10", "q=90")
    for point, quality in ((low, 10), (high, 90)):
        assert point.bits_per_image == 8 * sum(own_bytes(images, codec.upper(), quality)) / 2
    assert high.psnr >= low.psnr
    assert high.psnr > 30


# csv_bytes and plot_png


def test_csv_bytes_are_exact_and_round_trip():
    points = [RatePoint("jpeg", "q=50", 1234.5, 30.25), RatePoint("kmeans-palette", "k=2", 0.1 + 0.2, 100.0)]
    expected = (
        b"method,setting,bits_per_image,psnr\n"
        b"jpeg,q=50,1234.5,30.25\n"
        b"kmeans-palette,k=2,0.30000000000000004,100.0\n"
    )
    assert csv_bytes(points) == expected
    assert float(csv_bytes(points).split(b"\n")[2].split(b",")[2]) == 0.1 + 0.2


def test_plot_png_is_a_deterministic_png():
    points = [
        RatePoint("jpeg", "q=10", 4000.0, 25.0),
        RatePoint("jpeg", "q=50", 9000.0, 31.0),
        RatePoint("kmeans-palette", "k=2", 4128.0, 20.0),
        RatePoint("kmeans-palette", "k=4", 8224.0, 24.5),
    ]
    first = plot_png(points, "64×64 test images")
    assert first.startswith(b"\x89PNG\r\n\x1a\n")
    assert first == plot_png(points, "64×64 test images")
    assert b"Software" not in first
