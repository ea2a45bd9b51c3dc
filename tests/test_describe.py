"""`dvae info` (formats/describe.py): every kind of dvae file recognized by content, the hashes that tie codes, models
and priors to their dataset, and every file it cannot read as one line, exit 2, the file untouched."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import h5py
import pytest
from test_faults import Project, assert_one_line_error, digest, invoke

from dvae_cli.formats.describe import describe


@pytest.fixture(scope="module")
def project(trained_project, tmp_path_factory) -> Project:
    """A copy of the trained project with VQ-VAE codes and a prior trained 3 steps."""
    root = tmp_path_factory.mktemp("describe") / "project"
    shutil.copytree(trained_project.root, root)
    assert invoke(root, "encode", "--model", "vqvae").exit_code == 0
    result = invoke(root, "prior", "--model", "vqvae", "--max-steps", "3", "--set", "prior.width=16",
                    "--set", "prior.layers=1", "--set", "prior.heads=2")
    assert result.exit_code == 0, result.output
    return Project(root)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_each_kind_is_recognized_and_tied_to_its_dataset(project: Project) -> None:
    dataset = describe(project.path("data/prepared/dataset.h5"))
    assert dataset.kind == "dataset file"
    assert dataset.fields["rows"] == 600 == sum(dataset.fields["rows per split"].values())
    assert dataset.fields["arrays"]["images"] == "uint8 [600, 1, 32, 32]"
    assert dataset.fields["sha256"] == sha256(project.path("data/prepared/dataset.h5"))
    assert dataset.fields["classes"] == ["square", "ellipse", "heart"]

    for family in ("jointvae", "vqvae"):
        model = describe(project.path(f"models/{family}"))
        assert (model.kind, model.fields["family"]) == ("model folder", family)
        assert model.fields["weights sha256"] == sha256(project.path(f"models/{family}/model.safetensors"))
        assert model.fields["dataset sha256"] == dataset.fields["sha256"]
        assert model.fields["parameters"] > 0
        checkpoint = describe(project.path(f"models/{family}/checkpoint.pt"))
        assert (checkpoint.kind, checkpoint.fields["family"]) == ("checkpoint", family)
        assert checkpoint.fields["step"] == model.fields["steps"]

    codes = describe(project.path("data/codes/vqvae.h5"))
    assert (codes.kind, codes.fields["family"], codes.fields["rows"]) == ("codes file", "vqvae", 600)
    assert codes.fields["arrays"]["codes"] == "uint8 [600, 8, 8]"
    assert codes.fields["model arrays"]["codebook"] == "float32 [16, 8]"
    assert codes.fields["weights sha256"] == describe(project.path("models/vqvae")).fields["weights sha256"]
    assert codes.fields["dataset sha256"] == dataset.fields["sha256"]

    prior = describe(project.path("models/vqvae-prior"))
    assert (prior.kind, prior.fields["prior of"], prior.fields["steps"]) == ("prior folder", "vqvae", 3)
    assert prior.fields["codes sha256"] == sha256(project.path("data/codes/vqvae.h5"))
    assert prior.fields["code maps"] == {"height": 8, "width": 8, "num_codes": 16, "num_classes": 3}


def test_info_shows_a_table_or_json(project: Project) -> None:
    result = invoke(project.root, "info", "models/vqvae")
    assert result.exit_code == 0, result.output
    assert "models/vqvae: model folder" in result.output and "config.num_codes" in result.output
    result = invoke(project.root, "info", "data/codes/vqvae.h5", "--json")
    record = json.loads(result.output)
    assert (record["kind"], record["family"], record["rows per split"]["train"]) == ("codes file", "vqvae", 480)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _foreign_hdf5(path: Path) -> Path:
    with h5py.File(path, "w") as file:
        file.create_dataset("x", data=[1, 2, 3])
    return path


def _bad_config(folder: Path, model: Path) -> Path:
    shutil.copytree(model, folder)
    (folder / "config.json").write_text("{")
    return folder


BAD = {
    "a folder of something else": (lambda tmp, project: shutil.copytree(project.path("dvclive"), tmp / "dvclive"),
                                   "no model or prior folder"),
    "an empty file": (lambda tmp, project: _write(tmp / "empty.h5", b""), "(empty)"),
    "a truncated dataset": (lambda tmp, project: _write(
        tmp / "cut.h5", project.path("data/prepared/dataset.h5").read_bytes()[:3000]), "truncated or damaged"),
    "a truncated checkpoint": (lambda tmp, project: _write(
        tmp / "cut.pt", project.path("models/vqvae/checkpoint.pt").read_bytes()[:2000]), "truncated or damaged"),
    "another program's HDF5 file": (lambda tmp, project: _foreign_hdf5(tmp / "other.h5"),
                                    "no dvae dataset or codes file"),
    "a text file": (lambda tmp, project: _write(tmp / "notes.txt", b"hello"), "no dvae file"),
    "a missing path": (lambda tmp, project: tmp / "nothing.h5", "does not exist"),
    "config.json that is not JSON": (lambda tmp, project: _bad_config(tmp / "model", project.path("models/vqvae")),
                                     "not a dvae model config"),
}


@pytest.mark.parametrize("name", BAD)
def test_what_info_cannot_read_is_one_line_and_left_as_it_was(name: str, project: Project, tmp_path: Path) -> None:
    make, fragment = BAD[name]
    target = make(tmp_path, project)
    before = digest(tmp_path)
    result = invoke(tmp_path, "info", target.name)
    assert_one_line_error(result.exit_code, result.output, fragment)
    assert digest(tmp_path) == before
