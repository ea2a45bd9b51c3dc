"""`dvae_cli.api`: load, encode, decode from Python, equal to `dvae encode` + `dvae decode`, on tiny seeded models."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from dvae_cli import api
from dvae_cli.cli import app
from dvae_cli.core.errors import UserError
from dvae_cli.core.schema import build
from dvae_cli.formats.codes import CodesFile
from dvae_cli.formats.dataset import (
    DatasetChunk,
    DatasetFile,
    DatasetInfo,
    DatasetWriter,
)
from dvae_cli.formats.model_folder import save_model
from dvae_cli.models import get_family
from dvae_cli.models.base import DataShape
from tests.conftest import TINY_PARAMS

FAMILIES = ("vqvae", "jointvae")
NUM_IMAGES = 40
IMAGE_SIZE = 32
BATCH = 16
"""encode.batch_size of the project: 40 rows make two full batches and a partial one."""
README = Path(__file__).resolve().parents[1] / "README.md"


@dataclass(frozen=True)
class Project:
    root: Path
    params: Path
    dataset: Path
    images: np.ndarray
    """The dataset's images, uint8 [N, 1, 32, 32]."""

    def model_dir(self, family: str) -> Path:
        return self.root / "models" / family


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    """A project laid out as the CLI's defaults expect: 40 random 32×32 grayscale images and both families' models,
    untrained but seeded (VQ-VAE with a random codebook, so codes vary)."""
    root = tmp_path_factory.mktemp("api_project")
    params = copy.deepcopy(TINY_PARAMS)
    params["vqvae"]["init"] = "random"
    params["encode"] = {"batch_size": BATCH}
    params["runtime"] = {"device": "cpu"}
    params_path = root / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))

    images = np.random.default_rng(0).integers(0, 256, (NUM_IMAGES, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    dataset = root / "data" / "prepared" / "dataset.h5"
    dataset.parent.mkdir(parents=True)
    writer = DatasetWriter(dataset, DatasetInfo(source="random", image_size=IMAGE_SIZE, channels=1), {})
    try:
        writer.append(DatasetChunk(images=images))
        writer.finish(np.arange(NUM_IMAGES) % 3)
    finally:
        writer.close()

    data = DataShape(channels=1, image_size=IMAGE_SIZE)
    for name in FAMILIES:
        family = get_family(name)
        config = build(family.config, params[name], name)
        torch.manual_seed(0)
        save_model(root / "models" / name, name, family.model(config, data), config, data, {})
    return Project(root=root, params=params_path, dataset=dataset, images=images)


@pytest.fixture(scope="module")
def models(project) -> dict[str, api.Model]:
    return {name: api.load(project.model_dir(name), device="cpu", batch_size=BATCH) for name in FAMILIES}


def invoke(*args: str) -> None:
    result = CliRunner(env={"DVAE_DEBUG": None}).invoke(app, list(args))
    assert result.exit_code == 0, result.output


def check_one_line(error: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(error.value)


# Equal to the CLI

@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_equals_dvae_encode_and_dvae_decode(project, models, family, tmp_path):
    codes_path, decoded_path = tmp_path / "codes.h5", tmp_path / "decoded.h5"
    invoke("encode", "--model", family, "--params", str(project.params), "--dataset", str(project.dataset),
           "--model-dir", str(project.model_dir(family)), "--out", str(codes_path))
    invoke("decode", str(codes_path), "--rows", f"0:{NUM_IMAGES}", "--out", str(decoded_path),
           "--params", str(project.params))
    model = models[family]

    latent = model.encode(project.images)
    with CodesFile(codes_path, family=family) as codes:
        stored = codes.read_rows(0, NUM_IMAGES, codes.latent_names)
        rows_of_the_file = codes.read_rows(0, NUM_IMAGES)
    assert list(latent) == list(stored) == list(model.arrays)
    for name, array in stored.items():
        assert latent[name].dtype == array.dtype == model.arrays[name].dtype, name
        np.testing.assert_array_equal(latent[name], array, err_msg=name)

    pictures = model.decode(latent)
    with DatasetFile(decoded_path) as decoded:
        np.testing.assert_array_equal(pictures, decoded.read_images())
    assert pictures.dtype == np.uint8 and pictures.shape == (NUM_IMAGES, 1, IMAGE_SIZE, IMAGE_SIZE)
    np.testing.assert_array_equal(model.decode(rows_of_the_file), pictures)  # labels etc. of a codes file ignored


def test_vqvae_codes_are_not_trivial(project, models):
    """The round trip above means something: the untrained model uses several codes."""
    assert len(np.unique(models["vqvae"].encode(project.images)["codes"])) > 1


def test_the_raw_module_rejects_uint8_but_the_api_takes_it(project, models):
    model = models["vqvae"]
    with pytest.raises(RuntimeError):
        model.network.encode(torch.from_numpy(project.images))
    np.testing.assert_array_equal(model.encode(project.images)["codes"],
                                  model.network.encode(torch.from_numpy(project.images).float() / 255)["codes"])


# Inputs

@pytest.mark.parametrize("family", FAMILIES)
def test_layouts_types_and_containers_give_the_same_codes(project, models, family):
    model, images = models[family], project.images
    expected = model.encode(images)
    hwc = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    as_float = images.astype(np.float32) / 255
    with h5py.File(project.dataset) as file:
        inputs = {
            "NHWC": hwc,
            "NHWC view": images.transpose(0, 2, 3, 1),
            "NHW": images[:, 0],
            "torch uint8": torch.from_numpy(images),
            "torch uint8 NHWC": torch.from_numpy(hwc),
            "float32 numpy": as_float,
            "float32 torch NHWC": torch.from_numpy(hwc).float() / 255,
            "list of images": list(hwc),
            "h5py dataset": file["images"],
        }
        for kind, batch in inputs.items():
            latent = model.encode(batch)
            for name, array in expected.items():
                np.testing.assert_array_equal(latent[name], array, err_msg=f"{kind}: {name}")


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_size_does_not_change_the_codes(project, models, family):
    expected = models[family].encode(project.images)
    latent = api.load(project.model_dir(family), device="cpu", batch_size=7).encode(project.images)
    for name, array in expected.items():
        assert latent[name].dtype == array.dtype
        if array.dtype.kind == "f":
            np.testing.assert_allclose(latent[name], array, atol=1e-5, rtol=0, err_msg=name)
        else:
            np.testing.assert_array_equal(latent[name], array, err_msg=name)


def test_decode_takes_a_single_array_alone_numpy_or_torch(project, models):
    model = models["vqvae"]
    latent = model.encode(project.images)
    expected = model.decode(latent)
    codes = latent["codes"]
    for form in (codes, torch.from_numpy(codes), torch.from_numpy(codes).long(), {"codes": codes.astype(np.int64)}):
        np.testing.assert_array_equal(model.decode(form), expected)


def test_empty_batches(models):
    model = models["jointvae"]
    latent = model.encode(np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 1), np.uint8))
    assert {name: array.shape for name, array in latent.items()} == {
        "continuous_mean": (0, 4), "continuous_logvar": (0, 4), "discrete_probs": (0, 3), "discrete": (0, 1)}
    assert model.decode(latent).shape == (0, 1, IMAGE_SIZE, IMAGE_SIZE)


def test_model_describes_itself(models):
    model = models["vqvae"]
    assert model.family == "vqvae" and model.device == torch.device("cpu")
    assert model.image_shape == (1, IMAGE_SIZE, IMAGE_SIZE)
    assert model.latent_attributes == {"latent_shape": [8, 8], "num_codes": 16, "code_dim": 8}
    spec = model.arrays["codes"]
    assert (spec.row_shape, spec.dtype) == ((8, 8), np.dtype(np.uint8))
    assert "vqvae" in repr(model)


# Bad inputs: one-line UserErrors

@pytest.mark.parametrize(("images", "fragments"), [
    (np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8), ["shape [32, 32]", "[N, 1, 32, 32]", "images[None]"]),
    (np.zeros((2, 1, 1, IMAGE_SIZE, IMAGE_SIZE), np.uint8), ["shape [2, 1, 1, 32, 32]"]),
    (np.zeros((2, 3, IMAGE_SIZE, IMAGE_SIZE), np.uint8), ["have 3 channels", "takes 1"]),
    (np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8), ["have 3 channels", "takes 1"]),
    (np.zeros((2, 1, 28, 28), np.uint8), ["28×28 pixels", "takes 32×32"]),
    (np.zeros((2, 28, 28, 1), np.uint8), ["28×28 pixels", "takes 32×32"]),
    (np.zeros((2, 28, 28), np.uint8), ["shape [2, 28, 28]"]),
    (np.zeros((2, 1, IMAGE_SIZE, IMAGE_SIZE), np.int64), ["type int64", "uint8"]),
    (torch.zeros((2, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.bool), ["type torch.bool"]),
    (np.full((2, 1, IMAGE_SIZE, IMAGE_SIZE), 255.0, np.float32), ["[0, 1]", "uint8"]),
    (torch.full((2, 1, IMAGE_SIZE, IMAGE_SIZE), float("nan")), ["[0, 1]"]),
])
def test_bad_images_are_user_errors(models, images, fragments):
    with pytest.raises(UserError) as error:
        models["vqvae"].encode(images)
    check_one_line(error)
    for fragment in fragments:
        assert fragment in str(error.value)


@pytest.mark.parametrize(("family", "latent", "fragments"), [
    ("vqvae", np.full((2, 8, 8), 16, np.uint8), ["outside the model's 0…15"]),
    ("vqvae", torch.full((2, 8, 8), -1), ["outside the model's 0…15"]),
    ("vqvae", np.full((2, 8, 8), 1.5), ["`codes` are float64, not integer codes"]),
    ("jointvae", {"continuous_mean": np.full((2, 4), np.nan, np.float32), "discrete": np.zeros((2, 1), np.uint8)},
     ["`continuous_mean` holds nan at row 0, not a finite number"]),
    ("vqvae", np.zeros((2, 4, 4), np.uint8), ["rows of shape [4, 4]", "makes [8, 8]"]),
    ("vqvae", {"tokens": np.zeros((2, 8, 8), np.uint8)}, ["none of the arrays", "(codes)"]),
    ("jointvae", np.zeros((2, 4), np.float32), ["several arrays", "as a dict"]),
    ("jointvae", {"continuous_mean": np.zeros((2, 4), np.float32)}, ["lacks `discrete`"]),
    ("jointvae", {"continuous_mean": np.zeros((2, 4), np.float32), "discrete": np.zeros((3, 1), np.uint8)},
     ["different numbers of rows"]),
])
def test_bad_latents_are_user_errors(models, family, latent, fragments):
    with pytest.raises(UserError) as error:
        models[family].decode(latent)
    check_one_line(error)
    for fragment in fragments:
        assert fragment in str(error.value)


@pytest.mark.parametrize(("where", "options", "fragments"), [
    ("missing", {}, ["has no trained model", "dvae train --model missing"]),
    ("vqvae", {"device": "gpu"}, ["`runtime.device` is 'gpu'", "cuda:N"]),
    ("vqvae", {"precision": "fp8"}, ["`runtime.precision` is 'fp8'"]),
    ("vqvae", {"batch_size": 0}, ["`encode.batch_size` is 0"]),
])
def test_bad_load_arguments_are_user_errors(project, where, options, fragments):
    with pytest.raises(UserError) as error:
        api.load(project.model_dir(where), **options)
    check_one_line(error)
    for fragment in fragments:
        assert fragment in str(error.value)


# The README's example runs

def test_readme_python_api_example_runs(project, monkeypatch, capsys):
    section = README.read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    example = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert example is not None
    monkeypatch.chdir(project.root)
    exec(compile(example.group(1), "README.md (Python API)", "exec"), {})
    assert capsys.readouterr().out.strip()
