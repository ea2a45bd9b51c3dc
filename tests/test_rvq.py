"""Residual VQ (models/vqvae/rvq.py): the error falls with depth, codes ↔ vectors by stage, the straight-through
gradient, and a VQ-VAE with `vqvae.quantizer: rvq` through train, encode, decode, prior, sample and compare (one
model, a rate per depth)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_faults import Project, assert_one_line_error, digest, invoke

from dvae_cli.formats.codes import CodesFile
from dvae_cli.models.vqvae.quantizer import VectorQuantizer
from dvae_cli.models.vqvae.rvq import ResidualVectorQuantizer

RVQ = ("--set", "vqvae.quantizer=rvq", "--set", "vqvae.rvq_depth=3")


def trained_quantizer(depth: int, z: torch.Tensor) -> ResidualVectorQuantizer:
    torch.manual_seed(0)
    quantizer = ResidualVectorQuantizer(depth, 16, 3)
    for _ in range(20):
        quantizer(z)
    return quantizer.eval()


def test_error_falls_with_depth_and_the_first_stage_is_plain_vq() -> None:
    z = torch.randn(32, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    quantizer = trained_quantizer(4, z)
    codes = quantizer.codes(z)
    assert codes.shape == (32, 4, 4, 4) and codes.dtype == torch.int64
    errors = [(quantizer.lookup(codes[:, :depth]) - z).pow(2).mean().item() for depth in range(1, 5)]
    assert all(deeper < 0.5 * shallower for shallower, deeper in zip(errors, errors[1:])), errors
    # The first stage alone is the nearest-code VQ of z with its codebook; each later stage codes the residual.
    first = VectorQuantizer(16, 3).eval()
    first.load_state_dict(quantizer.stages[0].state_dict())
    assert torch.equal(codes[:, 0], first.codes(z))
    residual = z - first.lookup(codes[:, 0])
    assert torch.equal(codes[:, 1], quantizer.stages[1].codes(residual))


def test_codes_give_back_the_quantized_vectors_and_the_gradient_passes_straight_through() -> None:
    z = torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    quantizer = trained_quantizer(3, z)
    z = z.clone().requires_grad_()
    output = quantizer(z)
    assert torch.equal(output.indices, quantizer.codes(z))
    assert torch.equal(quantizer.lookup(output.indices), output.quantized.detach())  # bit for bit: decode = training
    output.quantized.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))
    assert output.usage.shape == (3 * 16,) and output.usage.sum() == 3 * 8 * 2 * 2
    stage_commitments = []
    residual = z.detach()
    for stage in quantizer.stages:
        stage_output = stage(residual)
        stage_commitments.append(stage_output.commitment_loss)
        residual = residual - stage_output.quantized
    torch.testing.assert_close(output.commitment_loss.detach(), sum(stage_commitments))
    with pytest.raises(ValueError, match=r"codes \[N, 1…3"):
        quantizer.lookup(output.indices.repeat(1, 2, 1, 1))


@pytest.fixture(scope="module")
def project(trained_project, tmp_path_factory) -> Project:
    """A copy of the trained project with a depth-3 residual VQ-VAE in models/rvq, its codes and a prior, and a prior
    of the plain VQ-VAE's codes."""
    root = tmp_path_factory.mktemp("rvq") / "project"
    shutil.copytree(trained_project.root, root)
    small_prior = ("--max-steps", "5", "--set", "prior.width=16", "--set", "prior.layers=1", "--set", "prior.heads=2")
    for args in (("train", "--model", "vqvae", "--out", "models/rvq", "--live", "dvclive/rvq", *RVQ),
                 ("encode", "--model", "vqvae", "--model-dir", "models/rvq", "--out", "data/codes/rvq.h5"),
                 ("prior", "--model", "vqvae", "--codes", "data/codes/rvq.h5", "--model-dir", "models/rvq",
                  "--out", "models/rvq-prior", "--live", "dvclive/rvq-prior", "--metrics", "metrics/rvq-prior.json",
                  *small_prior),
                 ("encode", "--model", "vqvae"),
                 ("prior", "--model", "vqvae", *small_prior)):
        result = invoke(root, *args)
        assert result.exit_code == 0, result.output
    return Project(root)


def test_a_residual_vqvae_trains_and_its_codes_decode_feed_a_prior_and_sample(project: Project,
                                                                            tmp_path: Path) -> None:
    curve = json.loads(project.path("dvclive/rvq/plots/train.json").read_text())
    assert curve[-1]["train/recon"] < curve[0]["train/recon"]
    with CodesFile(project.path("data/codes/rvq.h5"), "vqvae") as codes:
        assert (codes.attrs["quantizer"], codes.attrs["rvq_depth"], codes.attrs["num_codes"]) == ("rvq", 3, 16)
        assert list(codes.attrs["latent_shape"]) == [3, 8, 8]
        assert codes.model_arrays["codebook"].shape == (3, 16, 8)
        stored = codes.read_rows(0, len(codes))["codes"]
    assert stored.shape[1:] == (3, 8, 8)
    assert all(len(np.unique(stored[:, stage])) >= 4 for stage in range(3))  # every stage's codes in use
    assert json.loads(project.path("metrics/rvq-prior.json").read_text())["test"]["uniform_bits_per_image"] == (
        pytest.approx(3 * 64 * 4))
    root = tmp_path / "project"
    shutil.copytree(project.root, root)
    for args in (("decode", "data/codes/rvq.h5", "--out", "rvq.png"),
                 ("sample", "--model", "vqvae", "--prior", "models/rvq-prior", "--model-dir", "models/rvq",
                  "--count", "4", "--out", "rvq-samples.png", "--codes-out", "data/codes/rvq-samples.h5",
                  "--metrics-out", "metrics/rvq-samples.json")):
        result = invoke(root, *args)
        assert result.exit_code == 0, result.output
    with CodesFile(root / "data/codes/rvq-samples.h5", "vqvae") as samples:
        assert samples.read_rows(0, len(samples))["codes"].shape == (4, 3, 8, 8)


def test_compare_draws_one_rate_per_depth(project: Project, tmp_path: Path) -> None:
    root = tmp_path / "project"
    shutil.copytree(project.root, root)
    result = invoke(root, "compare", "--model", "vqvae", "--model-dir", "models/rvq", "--codes", "data/codes/rvq.h5",
                    "--prior", "models/rvq-prior", "--metrics", "metrics/rvq-rate-distortion.json")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((root / "renders/vqvae-prior/rate_distortion.csv").open()))
    plain = [row for row in rows if row["method"] == "vqvae"]
    with_prior = [row for row in rows if row["method"] == "vqvae+prior"]
    assert [row["setting"] for row in plain] == [f"K=16, depth {depth}" for depth in (1, 2, 3)]
    assert [float(row["bits_per_image"]) for row in plain] == [depth * 64 * math.log2(16) for depth in (1, 2, 3)]
    psnr = [float(row["psnr"]) for row in plain]
    assert psnr[0] < psnr[1] < psnr[2]
    prior_bits = [float(row["bits_per_image"]) for row in with_prior]
    assert prior_bits[0] < prior_bits[1] < prior_bits[2]  # the NLL of more stages' codes
    summary = json.loads((root / "metrics/rvq-rate-distortion.json").read_text())
    full = json.loads(project.path("metrics/rvq-prior.json").read_text())["test"]["bits_per_image"]
    assert summary["vqvae+prior"]["bits_per_image"] == pytest.approx(full) == prior_bits[-1]
    assert summary["vqvae"]["psnr"] == pytest.approx(psnr[-1])


def test_codes_of_a_residual_model_are_refused_by_a_prior_of_the_vq_model(project: Project, tmp_path: Path) -> None:
    root = tmp_path / "project"
    shutil.copytree(project.root, root)
    result = invoke(root, "sample", "--model", "vqvae", "--prior", "models/rvq-prior", "--count", "3")
    assert_one_line_error(result.exit_code, result.stderr, "another vqvae")
    before = digest(root)
    result = invoke(root, "compare", "--model", "vqvae", "--model-dir", "models/rvq", "--codes", "data/codes/rvq.h5")
    assert_one_line_error(result.exit_code, result.stderr, "prior over the codes of another vqvae")
    result = invoke(root, "compare", "--model", "vqvae", "--codes", "data/codes/rvq.h5")
    assert_one_line_error(result.exit_code, result.stderr, "holds codes of another vqvae")
    assert digest(root) == before


@pytest.mark.parametrize(("depth", "fragment"), [("0", "vqvae.rvq_depth"), ("1000000", "vqvae.rvq_depth")])
def test_a_bad_depth_is_one_line_and_writes_nothing(depth: str, fragment: str, project: Project) -> None:
    before = digest(project.root)
    result = invoke(project.root, "train", "--model", "vqvae", "--out", "models/bad", "--set", "vqvae.quantizer=rvq",
                    "--set", f"vqvae.rvq_depth={depth}")
    assert_one_line_error(result.exit_code, result.stderr, fragment)
    assert digest(project.root) == before
