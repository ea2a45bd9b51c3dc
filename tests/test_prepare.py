import numpy as np
import pytest

from dvae_cli.core.errors import UserError
from dvae_cli.core.splits import TEST, TRAIN, VAL
from dvae_cli.formats.dataset import DatasetFile
from dvae_cli.params import Params
from dvae_cli.sources import DataConfig
from dvae_cli.stages import prepare
from dvae_cli.stages.prepare import (
    assign_split,
    check_classes,
    describe_skipped,
    select_subset,
)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# select_subset

def test_no_subset_keeps_every_row():
    np.testing.assert_array_equal(select_subset(7, None, rng()), np.arange(7))


def test_subset_count_is_sorted_unique_and_seeded():
    rows = select_subset(100, 10, rng(0))
    assert len(rows) == 10 and len(np.unique(rows)) == 10
    assert np.all(np.diff(rows) > 0) and rows.min() >= 0 and rows.max() < 100
    np.testing.assert_array_equal(rows, select_subset(100, 10, rng(0)))
    assert not np.array_equal(rows, select_subset(100, 10, rng(1)))


@pytest.mark.parametrize(("num_rows", "subset", "expected_count"), [
    (8, 0.25, 2), (10, 0.5, 5), (10, 0.01, 1), (10, 1.0, 10), (10, 3, 3), (10, 10, 10), (10, 50, 10), (10, 1, 1),
])
def test_subset_size(num_rows, subset, expected_count):
    rows = select_subset(num_rows, subset, rng())
    assert len(rows) == expected_count
    assert len(np.unique(rows)) == expected_count


def test_subset_of_everything_is_in_order():
    np.testing.assert_array_equal(select_subset(5, 1.0, rng()), np.arange(5))
    np.testing.assert_array_equal(select_subset(5, 9, rng()), np.arange(5))


# assign_split

def counts(split: np.ndarray) -> list[int]:
    return [int((split == s).sum()) for s in (TRAIN, VAL, TEST)]


@pytest.mark.parametrize(("num_rows", "fractions", "expected"), [
    (10, [0.8, 0.1, 0.1], [8, 1, 1]),
    (20, [0.5, 0.25, 0.25], [10, 5, 5]),
    (7, [1.0, 0.0, 0.0], [7, 0, 0]),
    (9, [2 / 3, 1 / 3, 0.0], [6, 3, 0]),
])
def test_split_by_fractions(num_rows, fractions, expected):
    split = assign_split(num_rows, fractions, rng(), None)
    assert split.dtype == np.uint8 and split.shape == (num_rows,)
    assert counts(split) == expected


def test_split_by_fractions_is_shuffled_and_seeded():
    split = assign_split(100, [0.8, 0.1, 0.1], rng(0), None)
    np.testing.assert_array_equal(split, assign_split(100, [0.8, 0.1, 0.1], rng(0), None))
    assert not np.array_equal(split, assign_split(100, [0.8, 0.1, 0.1], rng(1), None))
    assert not np.all(split[:80] == TRAIN)  # not cut in file order


def test_official_split_keeps_test_and_carves_val_from_train():
    official = np.array([TRAIN] * 8 + [TEST] * 4, np.uint8)
    split = assign_split(12, [0.6, 0.2, 0.2], rng(), official)
    # val : train = 0.2 : 0.6 of the 8 official train rows → 2 val, 6 train
    assert counts(split) == [6, 2, 4]
    np.testing.assert_array_equal(split[8:], TEST)
    assert set(np.flatnonzero(split == VAL)) <= set(range(8))
    np.testing.assert_array_equal(official, [TRAIN] * 8 + [TEST] * 4)  # input untouched


def test_official_split_without_val_fraction():
    official = np.array([TRAIN, TEST, TRAIN, TEST], np.uint8)
    np.testing.assert_array_equal(assign_split(4, [0.9, 0.0, 0.1], rng(), official), official)


# prepare_data

def folder_params(root, **data) -> Params:
    return Params(seed=4, data=DataConfig(dataset="folder", root=str(root), **data))


def test_prepare_folder(tmp_path, image_folder):
    out = tmp_path / "prepared" / "dataset.h5"
    params = folder_params(image_folder, image_size=8, channels=1, split=[0.6, 0.2, 0.2])
    summary = prepare.run(params, prepare.PreparePaths(out), show_progress=False)
    assert summary.path == out and summary.skipped == []
    assert summary.split_counts == {"train": 3, "val": 1, "test": 1}
    assert summary.file_bytes == out.stat().st_size
    with DatasetFile(out) as dataset:
        assert dataset.num_images == 5
        assert dataset.info.class_names == ("cat", "dog") and dataset.info.source == "folder"
        images = dataset.read_images()
        assert images.shape == (5, 1, 8, 8)
        np.testing.assert_array_equal(images[:, 0, 0, 0], [10, 20, 30, 200, 210])
        np.testing.assert_array_equal(dataset.labels, [0, 0, 0, 1, 1])
        assert counts(dataset.split) == [3, 1, 1]
        assert dataset.params["seed"] == 4
        assert list(dataset.file["source_paths"].asstr()[:]) == [
            "cat/0.png", "cat/1.png", "cat/2.png", "dog/0.png", "dog/1.png"]
        assert dataset.params["data"]["dataset"] == "folder" and dataset.params["data"]["image_size"] == 8
    assert [p.name for p in out.parent.iterdir()] == ["dataset.h5"]


def test_prepare_is_deterministic_and_the_seed_matters(tmp_path, flat_image_folder):
    def prepared(seed: int, name: str) -> tuple[np.ndarray, np.ndarray]:
        out = tmp_path / name
        params = Params(seed=seed, data=DataConfig(dataset="folder", root=str(flat_image_folder), image_size=8,
                                                   channels=3, subset=3, split=[0.4, 0.3, 0.3]))
        prepare.run(params, prepare.PreparePaths(out), show_progress=False)
        with DatasetFile(out) as dataset:
            return dataset.read_images()[:, 0, 0, 0], dataset.split

    first, again = prepared(0, "a.h5"), prepared(0, "b.h5")
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    others = [prepared(seed, f"seed{seed}.h5") for seed in range(1, 6)]
    assert any(not np.array_equal(first[0], o[0]) or not np.array_equal(first[1], o[1]) for o in others)


def test_prepare_subset_keeps_each_rows_source_path(tmp_path, flat_image_folder):
    out = tmp_path / "dataset.h5"
    prepare.run(folder_params(flat_image_folder, image_size=8, subset=3), prepare.PreparePaths(out),
                show_progress=False)
    with DatasetFile(out) as dataset:
        paths = list(dataset.file["source_paths"].asstr()[:])
        assert len(paths) == 3 and paths == sorted(paths)
        # img{i}.png is gray 40 i: each row's path names the file its image came from
        assert [f"img{gray // 40}.png" for gray in dataset.read_images()[:, 0, 0, 0]] == paths


def test_prepare_skips_and_names_unreadable_files(tmp_path, image_folder):
    (image_folder / "dog" / "broken.png").write_bytes(b"garbage")
    out = tmp_path / "dataset.h5"
    summary = prepare.run(folder_params(image_folder, image_size=8, split=[1.0, 0.0, 0.0]), prepare.PreparePaths(out),
                          show_progress=False)
    assert summary.skipped == ["dog/broken.png"]
    with DatasetFile(out) as dataset:
        assert dataset.num_images == 5
        np.testing.assert_array_equal(dataset.labels, [0, 0, 0, 1, 1])
        assert "dog/broken.png" not in list(dataset.file["source_paths"].asstr()[:])


def test_describe_skipped_names_the_first_few_and_counts_all():
    assert describe_skipped(["a.png"]) == "1: a.png"
    names = [f"{i}.png" for i in range(1, 1201)]
    assert describe_skipped(names[:5]) == "5: 1.png, 2.png, 3.png, 4.png, 5.png"
    assert describe_skipped(names) == "1,200: 1.png, 2.png, 3.png, 4.png, 5.png, …"


def test_prepare_with_no_readable_image_leaves_no_file(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for name in ("a.png", "b.jpg"):
        (root / name).write_bytes(b"not an image")
    out = tmp_path / "out" / "dataset.h5"
    with pytest.raises(UserError, match=r"none of the 2 images .* could be read \(2: a.png, b.jpg\)"):
        prepare.run(folder_params(root), prepare.PreparePaths(out), show_progress=False)
    assert not out.parent.exists()  # the folder made for the output goes with it


def test_prepare_mnist_keeps_official_test_and_carves_val(tmp_path, fake_mnist):
    out = tmp_path / "dataset.h5"
    params = Params(data=DataConfig(dataset="mnist", root=str(fake_mnist.root), image_size=28, channels=1,
                                    split=[0.8, 0.1, 0.1]))
    summary = prepare.run(params, prepare.PreparePaths(out), show_progress=False)
    # val = round(0.1 / 0.9 × 40) = 4 of the 40 official train images; the 10 official test images stay test
    assert summary.split_counts == {"train": 36, "val": 4, "test": 10}
    with DatasetFile(out) as dataset:
        assert dataset.info.source == "mnist" and dataset.info.num_classes == 10
        assert "source_paths" not in dataset.file
        np.testing.assert_array_equal(dataset.split[40:], TEST)
        np.testing.assert_array_equal(dataset.read_images()[:, 0],
                                      np.concatenate([fake_mnist.train_images, fake_mnist.test_images]))
        np.testing.assert_array_equal(dataset.labels, np.concatenate([fake_mnist.train_labels,
                                                                      fake_mnist.test_labels]))


def test_prepare_mnist_subset_keeps_rows_and_labels_together(tmp_path, fake_mnist):
    out = tmp_path / "dataset.h5"
    params = Params(seed=2, data=DataConfig(dataset="mnist", root=str(fake_mnist.root), image_size=28, subset=20))
    prepare.run(params, prepare.PreparePaths(out), show_progress=False)
    all_images = np.concatenate([fake_mnist.train_images, fake_mnist.test_images])
    all_labels = np.concatenate([fake_mnist.train_labels, fake_mnist.test_labels])
    with DatasetFile(out) as dataset:
        images = dataset.read_images()[:, 0]
        assert len(images) == 20
        # find each stored image among the originals: it carries its own label and its official split
        rows = [int(np.flatnonzero((all_images == image).all(axis=(1, 2)))[0]) for image in images]
        assert rows == sorted(rows)
        np.testing.assert_array_equal(dataset.labels, all_labels[rows])
        np.testing.assert_array_equal(dataset.split == TEST, np.array(rows) >= 40)


def test_prepare_keeps_a_folders_test_split_and_carves_val_from_train(tmp_path, png_writer):
    root = tmp_path / "digits"
    for split, count in (("train", 8), ("test", 2)):
        for name in ("a", "b"):
            for i in range(count):
                png_writer(root / split / name / f"{i}.png", np.full((8, 8), i, dtype=np.uint8))
    (root / "train" / "a" / "3.png").write_bytes(b"unreadable")
    out = tmp_path / "dataset.h5"
    summary = prepare.run(folder_params(root, image_size=8, channels=1, split=[0.8, 0.2, 0.0]),
                          prepare.PreparePaths(out), show_progress=False)
    assert summary.split_counts == {"train": 12, "val": 3, "test": 4}
    assert summary.warnings == []
    with DatasetFile(out) as dataset:
        test_rows = dataset.indices(TEST)
        paths = dataset.file["source_paths"].asstr()[:]
        assert sorted(paths[test_rows]) == ["test/a/0.png", "test/a/1.png", "test/b/0.png", "test/b/1.png"]
        np.testing.assert_array_equal(dataset.labels[test_rows], [0, 0, 1, 1])


def test_check_classes_warns_of_unbalanced_classes_and_of_a_class_missing_from_the_test_split():
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 2, 2, 2])
    split = np.array([TRAIN] * 8 + [TEST, TEST])
    warnings = check_classes(labels, split, ("zero", "one", "two"))
    assert warnings == ["the test split has no images of class 'zero', 'one'; its scores leave that class out",
                        "classes are unbalanced: 'one' has 2 images, 'zero' 5; clustering scores favour the large "
                        "classes"]
    assert check_classes(labels[5:] - 1, split[5:] * 0, ()) == []  # no test rows, balanced
