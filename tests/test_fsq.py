"""Finite scalar quantization (models/vqvae/fsq.py): the grid by hand, index ↔ code, the straight-through gradient,
and a VQ-VAE with `vqvae.quantizer: fsq` through train, encode, decode, prior and compare."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_faults import Project, assert_one_line_error, digest, invoke

from dvae_cli.formats.codes import CodesFile
from dvae_cli.models.vqvae.fsq import FiniteScalarQuantizer

FSQ = ("--set", "vqvae.quantizer=fsq", "--set", "vqvae.fsq_levels=[3, 4]")


def test_levels_3_and_4_make_a_grid_of_12_codes_in_mixed_radix():
    quantizer = FiniteScalarQuantizer([3, 4])
    assert (quantizer.num_codes, quantizer.code_dim) == (12, 2)
    # Channel 0 rounds to {−1, 0, 1}, channel 1 to {−2, −1, 0, 1}; each is scaled by ⌊L/2⌋ = 1 and 2.
    grid = {(a, b / 2) for a, b in itertools.product((-1, 0, 1), (-2, -1, 0, 1))}
    codebook = quantizer.codebook
    assert codebook.shape == (12, 2) and {tuple(row.tolist()) for row in codebook} == grid
    # index = (digit0 + 1) + 3 · (digit1 + 2)
    assert codebook[0].tolist() == [-1, -1] and codebook[1].tolist() == [0, -1] and codebook[3].tolist() == [-1, -0.5]
    assert codebook[11].tolist() == [1, 0.5]


def test_codes_are_the_rounded_bounded_values_and_round_trip():
    quantizer = FiniteScalarQuantizer([3, 4])
    # Large inputs saturate at the outermost levels; 0 maps to the middle digit (an even L is shifted half a level).
    z = torch.tensor([[-9.0, -9.0], [9.0, 9.0], [0.0, 0.0]]).T.reshape(1, 2, 3, 1)
    digits = quantizer.quantized_digits(z)
    assert digits[0, :, :, 0].T.tolist() == [[-1, -2], [1, 1], [0, 0]]
    codes = quantizer.codes(z)
    assert codes[0, :, 0].tolist() == [0, 2 + 3 * 3, 1 + 3 * 2]
    assert torch.equal(quantizer.lookup(codes), quantizer(z).quantized)
    spread = torch.randn(1, 2, 100, 100, generator=torch.Generator().manual_seed(0)) * 3
    codes = quantizer.codes(spread)
    assert torch.equal(quantizer.lookup(codes), quantizer(spread).quantized)  # index → code gives the quantized value
    assert torch.equal(codes.unique(), torch.arange(12))  # and every grid point is reached


def test_the_gradient_passes_the_rounding():
    quantizer = FiniteScalarQuantizer([5, 8, 8])
    z = torch.randn(4, 3, 2, 2, requires_grad=True)
    output = quantizer(z)
    output.quantized.sum().backward()
    expected = torch.autograd.functional.jacobian(lambda v: quantizer.bound(v).sum(), z.detach())
    scale = quantizer.half_width.view(1, -1, 1, 1)
    torch.testing.assert_close(z.grad, expected / scale)
    assert output.usage.sum() == 16 and output.commitment_loss == 0


@pytest.fixture(scope="module")
def project(trained_project, tmp_path_factory) -> Project:
    """A copy of the trained project with an FSQ VQ-VAE (levels [3, 4]) in models/fsq, its codes and a prior."""
    root = tmp_path_factory.mktemp("fsq") / "project"
    shutil.copytree(trained_project.root, root)
    for args in (("train", "--model", "vqvae", "--out", "models/fsq", "--live", "dvclive/fsq", *FSQ),
                 ("encode", "--model", "vqvae", "--model-dir", "models/fsq", "--out", "data/codes/fsq.h5"),
                 ("prior", "--model", "vqvae", "--codes", "data/codes/fsq.h5", "--model-dir", "models/fsq",
                  "--out", "models/fsq-prior", "--live", "dvclive/fsq-prior", "--metrics", "metrics/fsq-prior.json",
                  "--max-steps", "5", "--set", "prior.width=16", "--set", "prior.layers=1", "--set", "prior.heads=2")):
        result = invoke(root, *args)
        assert result.exit_code == 0, result.output
    return Project(root)


def test_an_fsq_vqvae_trains_and_its_codes_decode_and_feed_a_prior(project: Project) -> None:
    curve = json.loads(project.path("dvclive/fsq/plots/train.json").read_text())
    assert curve[-1]["train/recon"] < curve[0]["train/recon"]
    with CodesFile(project.path("data/codes/fsq.h5"), "vqvae") as codes:
        assert (codes.attrs["quantizer"], codes.attrs["fsq_levels"], codes.attrs["num_codes"]) == ("fsq", [3, 4], 12)
        assert codes.model_arrays["codebook"].shape == (12, 2)
        stored = codes.read_rows(0, len(codes))["codes"]
    assert stored.max() < 12 and len(np.unique(stored)) >= 4  # codes in use
    assert json.loads(project.path("metrics/fsq-prior.json").read_text())["test"]["uniform_bits_per_image"] == (
        pytest.approx(64 * np.log2(12)))
    result = invoke(project.root, "decode", "data/codes/fsq.h5", "--out", "fsq.png")
    assert result.exit_code == 0, result.output


def test_codes_of_an_fsq_model_are_refused_by_a_prior_of_the_vq_model(project: Project, tmp_path: Path) -> None:
    root = tmp_path / "project"
    shutil.copytree(project.root, root)
    result = invoke(root, "sample", "--model", "vqvae", "--prior", "models/fsq-prior", "--count", "3")
    assert_one_line_error(result.exit_code, result.stderr, "another vqvae")


@pytest.mark.parametrize(("levels", "fragment"), [("[1, 4]", "each channel needs 2 to 256 levels"),
                                                  ("[256, 256, 2]", "131,072 codes"),
                                                  ("[]", "FSQ needs 1 to 16 channels")])
def test_bad_levels_are_one_line_and_write_nothing(levels: str, fragment: str, project: Project) -> None:
    before = digest(project.root)
    result = invoke(project.root, "train", "--model", "vqvae", "--out", "models/bad", "--set", "vqvae.quantizer=fsq",
                    "--set", f"vqvae.fsq_levels={levels}")
    assert_one_line_error(result.exit_code, result.stderr, "vqvae.fsq_levels", fragment)
    assert digest(project.root) == before
