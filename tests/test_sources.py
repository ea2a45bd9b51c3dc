import os

import numpy as np
import pytest
import torch
from PIL import Image

from dvae_cli.core.errors import UserError
from dvae_cli.core.splits import TEST, TRAIN
from dvae_cli.sources import DataConfig, open_source
from dvae_cli.sources.folder import FolderSource
from dvae_cli.sources.torchvision_sources import TorchvisionSource
from dvae_cli.sources.transform import fit_images, fit_pil_image


def folder_config(root, **fields) -> DataConfig:
    return DataConfig(dataset="folder", root=str(root), **fields)


def read_all(source) -> tuple[np.ndarray, np.ndarray | None]:
    chunk = source.read(np.arange(len(source)))
    return chunk.images, chunk.labels


# Image folders

def test_class_folders_give_labels_and_class_names(image_folder):
    source = FolderSource(folder_config(image_folder, image_size=8, channels=1))
    assert len(source) == 5
    assert source.info.class_names == ("cat", "dog")
    assert source.info.num_classes == 2 and source.info.source == "folder"
    assert source.official_split() is None
    images, labels = read_all(source)
    assert images.shape == (5, 1, 8, 8) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(images.reshape(5, -1).min(axis=1), [10, 20, 30, 200, 210])
    np.testing.assert_array_equal(images.reshape(5, -1).max(axis=1), [10, 20, 30, 200, 210])
    assert source.skipped == []


def test_flat_folder_has_no_labels(flat_image_folder):
    source = FolderSource(folder_config(flat_image_folder, image_size=8, channels=3))
    assert source.info.num_classes == 0 and source.info.class_names == ()
    images, labels = read_all(source)
    assert labels is None
    assert images.shape == (4, 3, 8, 8)
    np.testing.assert_array_equal(images[:, :, 0, 0], [[0] * 3, [40] * 3, [80] * 3, [120] * 3])


def test_read_returns_the_rows_asked_for_in_order(image_folder):
    source = FolderSource(folder_config(image_folder, image_size=8, channels=1))
    chunk = source.read(np.array([1, 3]))
    np.testing.assert_array_equal(chunk.images[:, 0, 0, 0], [20, 200])
    np.testing.assert_array_equal(chunk.labels, [0, 1])
    assert chunk.source_paths == ["cat/1.png", "dog/0.png"]


def test_rows_keep_their_path_relative_to_the_root_in_sorted_order(image_folder, flat_image_folder, png_writer):
    png_writer(image_folder / "cat" / "10.png", np.full((10, 12), 40, np.uint8))  # sorts between 1.png and 2.png
    chunk = FolderSource(folder_config(image_folder, image_size=8, channels=1)).read(np.arange(6))
    assert chunk.source_paths == ["cat/0.png", "cat/1.png", "cat/10.png", "cat/2.png", "dog/0.png", "dog/1.png"]
    np.testing.assert_array_equal(chunk.images[:, 0, 0, 0], [10, 20, 40, 30, 200, 210])
    flat = FolderSource(folder_config(flat_image_folder, image_size=8, channels=1)).read(np.arange(4))
    assert flat.source_paths == ["img0.png", "img1.png", "img2.png", "img3.png"]


def test_file_name_that_is_not_utf8_is_kept_escaped(tmp_path, png_writer):
    root = tmp_path / "images"
    root.mkdir()
    png = png_writer(tmp_path / "gray.png", np.full((8, 8), 90, np.uint8)).read_bytes()
    (root / os.fsdecode(b"caf\xe9.png")).write_bytes(png)
    chunk = FolderSource(folder_config(root, image_size=8, channels=1)).read(np.arange(1))
    assert chunk.source_paths == ["caf\\xe9.png"] and chunk.images[0, 0, 0, 0] == 90


def test_corrupt_and_non_image_files(image_folder, png_writer):
    (image_folder / "cat" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (image_folder / "cat" / "notes.txt").write_text("not an image")
    png_writer(image_folder / "dog" / "2.png", np.full((10, 12), 220, np.uint8))
    truncated = image_folder / "dog" / "3.png"
    png_writer(truncated, np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    truncated.write_bytes(truncated.read_bytes()[:200])
    source = FolderSource(folder_config(image_folder, image_size=8, channels=1))
    assert len(source) == 7  # .txt is not listed
    chunk = source.read(np.arange(len(source)))
    images, labels = chunk.images, chunk.labels
    assert source.skipped == ["cat/1.png", "dog/3.png"]
    assert chunk.source_paths == ["cat/0.png", "cat/2.png", "dog/0.png", "dog/1.png", "dog/2.png"]
    np.testing.assert_array_equal(images[:, 0, 0, 0], [10, 30, 200, 210, 220])
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 1])


def test_wide_image_is_center_cropped(tmp_path, png_writer):
    # Three 10-column bands 0 | 200 | 50: the shorter side is already 10, the crop keeps the middle band.
    bands = np.repeat(np.array([0, 200, 50], np.uint8), 10)[None].repeat(10, axis=0)
    png_writer(tmp_path / "images" / "wide.png", bands)
    images, _ = read_all(FolderSource(folder_config(tmp_path / "images", image_size=10, channels=1)))
    np.testing.assert_array_equal(images, np.full((1, 1, 10, 10), 200))


def test_tall_image_is_resized_on_the_shorter_side_then_center_cropped(tmp_path, png_writer):
    # 60×20 (H×W) in three 20-row bands 0 | 200 | 50 → resized to 30×10 → rows 10..19 kept.
    bands = np.repeat(np.array([0, 200, 50], np.uint8), 20)[:, None].repeat(20, axis=1)
    png_writer(tmp_path / "images" / "tall.png", bands)
    images, _ = read_all(FolderSource(folder_config(tmp_path / "images", image_size=10, channels=1)))
    assert images.shape == (1, 1, 10, 10)
    # the antialiasing filter reaches one row into the neighbouring bands at the crop edges
    np.testing.assert_array_equal(images[0, 0, 2:-2], np.full((6, 10), 200))
    assert images[0, 0, 0, 0] < 200 and images[0, 0, -1, 0] < 200


def test_rgb_to_one_channel_uses_luma_weights(tmp_path, png_writer):
    for name, rgb in (("0red", (255, 0, 0)), ("1green", (0, 255, 0)), ("2blue", (0, 0, 255)), ("3gray", (90, 90, 90))):
        png_writer(tmp_path / "images" / f"{name}.png", np.full((4, 4, 3), rgb, np.uint8))
    images, _ = read_all(FolderSource(folder_config(tmp_path / "images", image_size=4, channels=1)))
    # ITU-R 601-2 luma 0.299 R + 0.587 G + 0.114 B, rounded: 76.2, 149.7, 29.1, 90
    np.testing.assert_array_equal(images[:, 0, 0, 0], [76, 150, 29, 90])


def test_grayscale_to_three_channels_repeats_it(tmp_path, png_writer):
    png_writer(tmp_path / "images" / "gray.png", np.full((6, 6), 123, np.uint8))
    images, _ = read_all(FolderSource(folder_config(tmp_path / "images", image_size=6, channels=3)))
    np.testing.assert_array_equal(images, np.full((1, 3, 6, 6), 123))


def test_palette_and_alpha_images_are_converted(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGBA", (5, 5), (0, 255, 0, 128)).save(root / "a.png")
    Image.new("P", (5, 5), 0).save(root / "b.bmp")
    images, _ = read_all(FolderSource(folder_config(root, image_size=5, channels=3)))
    assert images.shape == (2, 3, 5, 5)
    np.testing.assert_array_equal(images[0, :, 0, 0], [0, 255, 0])


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match=r"image folder .*nowhere not found; set data.root"):
        FolderSource(folder_config(tmp_path / "nowhere"))


def test_empty_folder(tmp_path):
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match=r"image folder .*empty holds no images"):
        FolderSource(folder_config(tmp_path / "empty"))


def split_folder(root, png_writer, test_classes=("cat", "dog")):
    """train/ with cat (2 images) and dog (1), test/ with one image of each of `test_classes`."""
    for split, name, count in (("train", "cat", 2), ("train", "dog", 1),
                               *(("test", name, 1) for name in test_classes)):
        for i in range(count):
            png_writer(root / split / name / f"{i}.png", np.full((8, 8), 10 * i + (100 if name == "dog" else 0),
                                                                 dtype=np.uint8))
    return root


def test_train_and_test_folders_keep_their_split(tmp_path, png_writer):
    source = FolderSource(folder_config(split_folder(tmp_path / "digits", png_writer), image_size=8, channels=1))
    assert source.info.class_names == ("cat", "dog")
    assert source.names == ["train/cat/0.png", "train/cat/1.png", "train/dog/0.png", "test/cat/0.png", "test/dog/0.png"]
    np.testing.assert_array_equal(source.official_split(), [TRAIN, TRAIN, TRAIN, TEST, TEST])
    np.testing.assert_array_equal(read_all(source)[1], [0, 0, 1, 0, 1])


def test_a_class_without_test_images_is_refused(tmp_path, png_writer):
    root = split_folder(tmp_path / "digits", png_writer, test_classes=("cat",))
    with pytest.raises(UserError, match=r"digits/test has no folder for class 'dog'; give every class images under "
                                        r"both train/ and test/"):
        FolderSource(folder_config(root))


def test_an_empty_class_folder_is_refused(image_folder):
    (image_folder / "bird").mkdir()
    with pytest.raises(UserError, match=r"class folder .*images/bird holds no images; add its images or remove"):
        FolderSource(folder_config(image_folder))


def test_unreadable_rows_are_named_by_their_source_row(image_folder):
    (image_folder / "cat" / "1.png").write_bytes(b"not a png")
    chunk = FolderSource(folder_config(image_folder, image_size=8, channels=1)).read(np.arange(5))
    np.testing.assert_array_equal(chunk.source_rows, [0, 2, 3, 4])


def test_open_source_picks_the_source(image_folder, fake_mnist):
    assert isinstance(open_source(folder_config(image_folder)), FolderSource)
    assert isinstance(open_source(DataConfig(dataset="mnist", root=str(fake_mnist.root))), TorchvisionSource)


# Tensor transform

def test_fit_images_resizes_and_crops_a_batch():
    images = torch.arange(2 * 3 * 4 * 6, dtype=torch.uint8).reshape(2, 3, 4, 6)
    fitted = fit_images(images, 3, 4)
    assert fitted.shape == (2, 3, 4, 4) and fitted.dtype == np.uint8
    np.testing.assert_array_equal(fitted, images[:, :, :, 1:5].numpy())


def test_fit_images_grayscale_agrees_with_pil():
    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    from_tensor = fit_images(torch.from_numpy(rgb).permute(2, 0, 1)[None], 1, 5)
    from_pil = fit_pil_image(Image.fromarray(rgb), 1, 5)
    assert np.abs(from_tensor.astype(int) - from_pil.astype(int)).max() <= 1


# MNIST through torchvision, offline

def mnist_config(fake_mnist, **fields) -> DataConfig:
    return DataConfig(dataset="mnist", root=str(fake_mnist.root), **fields)


def test_fake_mnist_loads_with_official_split_and_labels(fake_mnist):
    source = TorchvisionSource(mnist_config(fake_mnist, image_size=28, channels=1))
    assert len(source) == 50
    np.testing.assert_array_equal(source.official_split(), [TRAIN] * 40 + [TEST] * 10)
    assert source.info.num_classes == 10 and source.info.class_names[3] == "3 - three"
    images, labels = read_all(source)
    assert images.shape == (50, 1, 28, 28)
    np.testing.assert_array_equal(images[:40, 0], fake_mnist.train_images)
    np.testing.assert_array_equal(images[40:, 0], fake_mnist.test_images)
    np.testing.assert_array_equal(labels, np.concatenate([fake_mnist.train_labels, fake_mnist.test_labels]))


def test_fake_mnist_resized_to_three_channels(fake_mnist):
    source = TorchvisionSource(mnist_config(fake_mnist, image_size=14, channels=3))
    chunk = source.read(np.array([2, 45]))
    assert chunk.images.shape == (2, 3, 14, 14)
    np.testing.assert_array_equal(chunk.images[:, 0], chunk.images[:, 2])
    np.testing.assert_array_equal(chunk.labels, [fake_mnist.train_labels[2], fake_mnist.test_labels[5]])


def test_missing_mnist_without_download_names_the_layout(tmp_path):
    with pytest.raises(UserError) as error:
        TorchvisionSource(DataConfig(dataset="mnist", root=str(tmp_path / "raw"), download=False))
    message = str(error.value)
    assert "mnist not found under" in message and "nothing is downloaded" in message
    assert f"{tmp_path / 'raw'}/MNIST/raw/train-images-idx3-ubyte" in message
    assert "data.download: true" in message
    assert "\n" not in message
