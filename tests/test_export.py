"""`dvae export` (formats/export.py): the exported encoder and decoder programs give what `dvae encode` and
`dvae decode` give on the same rows; a codes file's datasets folder keeps class names, codebook and hashes; bad input
is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from test_faults import Project, assert_one_line_error, digest, invoke

from dvae_cli.core.images import to_uint8
from dvae_cli.formats.codes import CodesFile
from dvae_cli.formats.export import onnx_available

ROWS = slice(0, 24)
FAMILIES = ("jointvae", "vqvae")


@pytest.fixture(scope="module")
def project(trained_project, tmp_path_factory) -> Project:
    """A copy of the trained project with both codes files, the decoded first rows and both models exported."""
    root = tmp_path_factory.mktemp("export") / "project"
    shutil.copytree(trained_project.root, root)
    for family in FAMILIES:
        for args in (("encode", "--model", family),
                     ("decode", f"data/codes/{family}.h5", "--rows", f"{ROWS.start}:{ROWS.stop}",
                      "--out", f"decoded/{family}.h5"),
                     ("export", f"models/{family}", "--out", f"exports/{family}")):
            result = invoke(root, *args)
            assert result.exit_code == 0, result.output
    return Project(root)


def dataset_images(project: Project) -> np.ndarray:
    with h5py.File(project.path("data/prepared/dataset.h5")) as file:
        return file["images"][ROWS]


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_export_programs_give_what_encode_and_decode_write(project: Project, family: str) -> None:
    manifest = json.loads(project.path(f"exports/{family}/export.json").read_text())
    encoder = torch.export.load(project.path(f"exports/{family}/encoder.pt2")).module()
    decoder = torch.export.load(project.path(f"exports/{family}/decoder.pt2")).module()
    images = torch.from_numpy(dataset_images(project)).float() / 255
    with CodesFile(project.path(f"data/codes/{family}.h5")) as codes:
        stored = codes.read_rows(ROWS.start, ROWS.stop, codes.latent_names)
        assert [output["name"] for output in manifest["encoder"]["outputs"]] == codes.latent_names
    with torch.no_grad():
        encoded = dict(zip([output["name"] for output in manifest["encoder"]["outputs"]], encoder(images)))
    for name, values in stored.items():  # floats to rounding: `dvae encode` runs other batches, channels-last
        if values.dtype.kind == "f":
            np.testing.assert_allclose(encoded[name].numpy(), values, atol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(encoded[name].numpy().astype(values.dtype), values, err_msg=name)
    inputs = [torch.from_numpy(stored[item["name"]]).to(getattr(torch, item["dtype"]))
              for item in manifest["decoder"]["inputs"]]
    with h5py.File(project.path(f"decoded/{family}.h5")) as file, torch.no_grad():
        difference = np.abs(to_uint8(decoder(*inputs)).astype(int) - file["images"][:].astype(int))
    assert difference.max() <= 1 and (difference == 0).mean() > 0.99
    assert manifest["family"] == family and manifest["weights_sha256"] == json.loads(
        project.path(f"models/{family}/config.json").read_text())["weights_sha256"]


@pytest.mark.skipif(not onnx_available(), reason="the onnx extra is not installed")
@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_programs_give_what_encode_and_decode_write(project: Project, family: str) -> None:
    import onnxruntime

    manifest = json.loads(project.path(f"exports/{family}/export.json").read_text())
    assert {"encoder.onnx", "decoder.onnx"} <= set(manifest["programs"])
    encoder = onnxruntime.InferenceSession(project.path(f"exports/{family}/encoder.onnx"))
    decoder = onnxruntime.InferenceSession(project.path(f"exports/{family}/decoder.onnx"))
    images = dataset_images(project).astype(np.float32) / 255
    with CodesFile(project.path(f"data/codes/{family}.h5")) as codes:
        stored = codes.read_rows(ROWS.start, ROWS.stop, codes.latent_names)
    encoded = dict(zip([output.name for output in encoder.get_outputs()], encoder.run(None, {"images": images})))
    for name, values in stored.items():
        if values.dtype.kind == "f":
            np.testing.assert_allclose(encoded[name], values, atol=1e-4, err_msg=name)
        else:
            np.testing.assert_array_equal(encoded[name].astype(values.dtype), values, err_msg=name)
    feeds = {item["name"]: stored[item["name"]].astype(item["dtype"]) for item in manifest["decoder"]["inputs"]}
    (decoded,) = decoder.run(None, feeds)
    with h5py.File(project.path(f"decoded/{family}.h5")) as file:
        difference = np.abs(to_uint8(torch.from_numpy(decoded)).astype(int) - file["images"][:].astype(int))
    assert difference.max() <= 1


def test_codes_become_a_datasets_folder_with_class_names_codebook_and_hashes(project: Project) -> None:
    from datasets import load_from_disk

    result = invoke(project.root, "export", "data/codes/vqvae.h5")
    assert result.exit_code == 0, result.output
    exported = load_from_disk(str(project.path("exports/vqvae-codes")))
    with CodesFile(project.path("data/codes/vqvae.h5")) as codes:
        split, stored = codes.split, codes.read_rows(0, len(codes))
        codebook = codes.model_arrays["codebook"]
        weights_sha256, dataset_sha256 = codes.attrs["weights_sha256"], codes.attrs["dataset_sha256"]
    assert {name: len(rows) for name, rows in exported.items()} == {
        name: int((split == index).sum()) for index, name in enumerate(("train", "val", "test"))}
    test = exported["test"].with_format("numpy")
    rows = np.flatnonzero(split == 2)
    np.testing.assert_array_equal(test["codes"][:], stored["codes"][rows])
    np.testing.assert_array_equal(test["labels"][:], stored["labels"][rows])
    assert exported["test"].features["labels"].names == ["square", "ellipse", "heart"]
    info = json.loads(exported["test"].info.description)
    np.testing.assert_array_equal(np.asarray(info["codebook"], np.float32), codebook)
    assert (info["weights_sha256"], info["dataset_sha256"]) == (weights_sha256, dataset_sha256)
    assert {entry["checksum"] for entry in exported["test"].info.download_checksums.values()} == {
        weights_sha256, dataset_sha256}


def test_bad_input_is_one_line_and_writes_nothing(project: Project, tmp_path: Path) -> None:
    before = digest(project.root)
    cases = [
        (("export", "models/vqvae", "--out", "exports/jointvae"), "already exists"),
        (("export", "models/nothing"), "does not exist"),
        (("export", "dvclive"), "is no model folder"),
        (("export", "params.yaml"), "params.yaml"),
        (("export", "data/prepared/dataset.h5"), "dataset"),
        (("export", "models/vqvae", "--out", "models/vqvae"), "the input"),
    ]
    for args, fragment in cases:
        result = invoke(project.root, *args)
        assert_one_line_error(result.exit_code, result.stderr, fragment)
    damaged = tmp_path / "vqvae"
    shutil.copytree(project.path("models/vqvae"), damaged)
    (damaged / "config.json").write_text("{\"family\": \"vqvae\", \"model\": ")
    result = invoke(project.root, "export", str(damaged), "--out", str(tmp_path / "out"))
    assert_one_line_error(result.exit_code, result.stderr, "config.json")
    assert not (tmp_path / "out").exists()
    codes = tmp_path / "codes.h5"
    shutil.copyfile(project.path("data/codes/vqvae.h5"), codes)
    with h5py.File(codes, "a") as file:
        file["labels"][0] = 7
    result = invoke(project.root, "export", str(codes), "--out", str(tmp_path / "out"))
    assert_one_line_error(result.exit_code, result.stderr, "label 7 lies outside the 3 classes")
    assert not (tmp_path / "out").exists()
    assert digest(project.root) == before


def test_force_replaces_an_earlier_export(project: Project, tmp_path: Path) -> None:
    out = tmp_path / "vqvae"
    out.mkdir()
    (out / "stale.txt").write_text("an earlier export")
    result = invoke(project.root, "export", "models/vqvae", "--out", str(out), "--no-onnx", "--force")
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in out.iterdir()) == ["decoder.pt2", "encoder.pt2", "export.json"]
