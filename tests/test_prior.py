"""`dvae prior` and `dvae sample` (stages/prior.py, stages/sample.py) on the tiny trained project: what they write,
that the prior learns and resumes exactly, seeded samples, and every bad input as one line, exit 2, nothing written."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_faults import (
    Project,
    assert_one_line_error,
    digest,
    edit_h5,
    edit_json,
    invoke,
)

from dvae_cli.formats.codes import CodesFile

PRIOR_FLAGS = ("--set", "prior.width=32", "--set", "prior.layers=1", "--set", "prior.heads=2",
               "--set", "prior.lr=0.003")


@pytest.fixture(scope="module")
def project(trained_project, tmp_path_factory) -> Project:
    """A copy of the trained project with both codes files, a prior trained 15 steps and 9 samples of it."""
    root = tmp_path_factory.mktemp("prior") / "project"
    shutil.copytree(trained_project.root, root)
    for family in ("jointvae", "vqvae"):
        assert invoke(root, "encode", "--model", family).exit_code == 0
    result = invoke(root, "prior", "--model", "vqvae", *PRIOR_FLAGS)
    assert result.exit_code == 0, result.output
    result = invoke(root, "sample", "--model", "vqvae", "--count", "9")
    assert result.exit_code == 0, result.output
    return Project(root)


def copy(project: Project, tmp_path: Path) -> Project:
    root = tmp_path / "project"
    shutil.copytree(project.root, root)
    return Project(root)


def test_the_prior_learns_and_reports_test_bits(project: Project) -> None:
    config = json.loads(project.path("models/vqvae-prior/config.json").read_text())
    assert config["family"] == "prior" and config["prior_of"] == "vqvae"
    assert config["maps"] == {"height": 8, "width": 8, "num_codes": 16, "num_classes": 3}
    test = json.loads(project.path("metrics/vqvae-prior.json").read_text())["test"]
    assert test["split"] == "test" and test["maps"] == 60
    assert test["bits_per_image"] == pytest.approx(test["bits_per_code"] * 64)
    assert test["uniform_bits_per_image"] == 64 * math.log2(16)
    assert test["bits_per_image"] < 0.75 * test["uniform_bits_per_image"]
    curve = json.loads(project.path("dvclive/vqvae-prior/plots/train.json").read_text())
    assert curve[-1]["train/bits_per_code"] < curve[0]["train/bits_per_code"] - 0.5
    assert config["test"] == test


def test_a_resumed_prior_equals_an_uninterrupted_one(project: Project, tmp_path: Path) -> None:
    copied = copy(project, tmp_path)
    first = invoke(copied.root, "prior", "--model", "vqvae", "--out", "models/p", "--live", "dvclive/p",
                   "--metrics", "metrics/p.json", "--max-steps", "6", *PRIOR_FLAGS, "--set", "train.checkpoint_every=3")
    assert first.exit_code == 0, first.output
    resumed = invoke(copied.root, "prior", "--model", "vqvae", "--out", "models/p", "--live", "dvclive/p",
                     "--metrics", "metrics/p.json", *PRIOR_FLAGS, "--set", "train.checkpoint_every=3")
    assert resumed.exit_code == 0 and "resumed from step 6" in resumed.output
    for name in ("model.safetensors", "config.json"):
        assert copied.path(f"models/p/{name}").read_bytes() == project.path(f"models/vqvae-prior/{name}").read_bytes()
    steps = [row["step"] for row in json.loads(copied.path("dvclive/p/plots/train.json").read_text())]
    assert steps == sorted(set(steps))


def test_samples_are_seeded_decodable_codes_in_class_rows(project: Project, tmp_path: Path) -> None:
    with CodesFile(project.path("data/codes/vqvae-samples.h5"), "vqvae") as samples:
        codes = samples.read_rows(0, len(samples))
        assert codes["codes"].shape == (9, 8, 8) and codes["codes"].dtype == np.uint8
        assert codes["labels"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    copied = copy(project, tmp_path)
    again = invoke(copied.root, "sample", "--model", "vqvae", "--count", "9")
    assert again.exit_code == 0
    assert digest(copied.path("renders/vqvae-prior")) == digest(project.path("renders/vqvae-prior"))
    with h5py.File(copied.path("data/codes/vqvae-samples.h5")) as file:
        assert np.array_equal(file["codes"][:], codes["codes"])
    other = invoke(copied.root, "sample", "--model", "vqvae", "--count", "9", "--seed", "1")
    assert other.exit_code == 0
    with h5py.File(copied.path("data/codes/vqvae-samples.h5")) as file:
        assert not np.array_equal(file["codes"][:], codes["codes"])
    decoded = invoke(copied.root, "decode", "data/codes/vqvae-samples.h5", "--out", "samples.png")
    assert decoded.exit_code == 0, decoded.output
    assert copied.path("samples.png").stat().st_size > 0


def test_samples_of_dsprites_are_scored_against_the_true_images(project: Project) -> None:
    scores = json.loads(project.path("metrics/vqvae-samples.json").read_text())
    assert scores["samples"] == 9 and scores["truth"]["samples"] == 9
    assert 0 <= scores["truth"]["sprites"] <= 1 and 0 <= scores["truth"]["asked_class"] <= 1
    assert set(scores["truth"]["coverage"]) == {"shape", "scale", "orientation", "posX", "posY"}


def test_more_samples_than_memory_holds_are_refused_before_any_work(project: Project, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    copied = copy(project, tmp_path)
    before = digest(copied.root)
    pages = {"SC_AVPHYS_PAGES": 25_000, "SC_PAGE_SIZE": 4096}  # 100 MB free
    monkeypatch.setattr("dvae_cli.stages.sample.os.sysconf", pages.__getitem__)
    result = invoke(copied.root, "sample", "--model", "vqvae", "--count", "100000")
    assert_one_line_error(result.exit_code, result.stderr, "prior.sample.count 100,000", "GB free", "--count")
    assert digest(copied.root) == before


def test_no_truth_on_other_data(project: Project, tmp_path: Path) -> None:
    """A prior over codes of a folder dataset: no scores by default, and --truth is refused before any work."""
    copied = copy(project, tmp_path)

    def from_a_folder(record: dict) -> None:
        record["dataset_info"]["source"] = "folder"

    edit_json(copied.path("models/vqvae-prior/config.json"), from_a_folder)
    before = digest(copied.root)
    result = invoke(copied.root, "sample", "--model", "vqvae", "--count", "3", "--truth")
    assert_one_line_error(result.exit_code, result.stderr, "--truth", "'folder'")
    assert digest(copied.root) == before
    result = invoke(copied.root, "sample", "--model", "vqvae", "--count", "3")
    assert result.exit_code == 0, result.output
    assert json.loads(copied.path("metrics/vqvae-samples.json").read_text()) == {"samples": 3, "truth": None}


def another_codebook(file: h5py.File) -> None:
    file.attrs["codebook"] = file.attrs["codebook"] + 1.0


def without_labels(file: h5py.File) -> None:
    del file["labels"]


BAD_PRIOR_INPUTS = {
    "codes of another VQ-VAE": (lambda p: edit_h5(p.path("data/codes/vqvae.h5"), another_codebook), (),
                                ("holds codes of another vqvae", "codebook hash")),
    "a JointVAE codes file": (None, ("--codes", "data/codes/jointvae.h5"), ("holds jointvae codes, not vqvae",)),
    "a family without code maps": (None, ("--model", "jointvae"), ("jointvae codes hold no code map",)),
    "a conditional prior on a dataset without labels": (
        lambda p: edit_h5(p.path("data/codes/vqvae.h5"), without_labels), (),
        ("prior.conditional is on", "has no class labels", "prior.conditional: false")),
}


@pytest.mark.parametrize("name", BAD_PRIOR_INPUTS)
def test_bad_prior_input_is_one_line_and_writes_nothing(name: str, project: Project, tmp_path: Path) -> None:
    edit, args, fragments = BAD_PRIOR_INPUTS[name]
    copied = copy(project, tmp_path)
    if edit:
        edit(copied)
    before = digest(copied.root)
    model = () if "--model" in args else ("--model", "vqvae")
    result = invoke(copied.root, "prior", *model, *args, "--out", "models/new", "--live", "dvclive/new",
                    "--metrics", "metrics/new.json", *PRIOR_FLAGS)
    assert_one_line_error(result.exit_code, result.stderr, *fragments)
    assert digest(copied.root) == before


def other_codebook_hash(record: dict) -> None:
    record["codebook_sha256"] = "0" * 64


BAD_SAMPLE_INPUTS = {
    "no samples": (None, ("--count", "0"), ("prior.sample.count", "≥ 1")),
    "negative samples": (None, ("--set", "prior.sample.count=-3"), ("prior.sample.count", "≥ 1")),
    "a prior of another VQ-VAE": (lambda p: edit_json(p.path("models/vqvae-prior/config.json"), other_codebook_hash),
                                  (), ("prior over the codes of another vqvae",)),
    "a model folder as the prior": (None, ("--prior", "models/vqvae"), ("holds no prior over vqvae codes",)),
}


@pytest.mark.parametrize("name", BAD_SAMPLE_INPUTS)
def test_bad_sample_input_is_one_line_and_writes_nothing(name: str, project: Project, tmp_path: Path) -> None:
    edit, args, fragments = BAD_SAMPLE_INPUTS[name]
    copied = copy(project, tmp_path)
    for path in (copied.path("renders/vqvae-prior"), copied.path("data/codes/vqvae-samples.h5")):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if edit:
        edit(copied)
    before = digest(copied.root)
    result = invoke(copied.root, "sample", "--model", "vqvae", *args)
    assert_one_line_error(result.exit_code, result.stderr, *fragments)
    assert digest(copied.root) == before
