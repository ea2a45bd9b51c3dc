"""`dvae compare` (stages/compare.py) on the tiny trained project with its prior: every method's points, the summary,
and mismatched inputs as one line, exit 2, nothing written."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
from test_faults import Project, assert_one_line_error, digest, edit_h5, edit_json, invoke
from test_prior import another_codebook, other_codebook_hash, project, without_labels  # noqa: F401 (the fixture)


def test_rate_distortion_of_every_method(project: Project, tmp_path: Path) -> None:  # noqa: F811
    root = tmp_path / "project"
    shutil.copytree(project.root, root)
    result = invoke(root, "compare", "--model", "vqvae")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((root / "renders/vqvae-prior/rate_distortion.csv").open()))
    methods = {row["method"] for row in rows}
    assert methods == {"vqvae", "vqvae+prior", "kmeans-palette", "kmeans-patch4x4", "jpeg", "webp"}
    plain = next(row for row in rows if row["method"] == "vqvae")
    assert float(plain["bits_per_image"]) == 8 * 8 * math.log2(16)
    summary = json.loads((root / "metrics/vqvae-rate-distortion.json").read_text())
    prior_bits = json.loads((root / "metrics/vqvae-prior.json").read_text())["test"]["bits_per_image"]
    assert summary["vqvae+prior"]["bits_per_image"] == pytest.approx(prior_bits)
    assert summary["vqvae+prior"]["psnr"] == summary["vqvae"]["psnr"] == pytest.approx(float(plain["psnr"]))
    assert set(summary["best_psnr_at_prior_bits"]) == methods - {"vqvae", "vqvae+prior"}
    assert (root / "renders/vqvae-prior/rate_distortion.png").read_bytes().startswith(b"\x89PNG")


BAD_INPUTS = {
    "codes of another VQ-VAE": (lambda root: edit_h5(root / "data/codes/vqvae.h5", another_codebook),
                                "holds codes of another vqvae"),
    "a prior of another VQ-VAE": (lambda root: edit_json(root / "models/vqvae-prior/config.json", other_codebook_hash),
                                  "prior over the codes of another vqvae"),
    "codes without the labels of a conditional prior": (
        lambda root: edit_h5(root / "data/codes/vqvae.h5", without_labels), "conditioned on classes but"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_mismatched_inputs_are_one_line_and_write_nothing(name: str, project: Project,  # noqa: F811
                                                         tmp_path: Path) -> None:
    edit, fragment = BAD_INPUTS[name]
    root = tmp_path / "project"
    shutil.copytree(project.root, root)
    edit(root)
    before = digest(root)
    result = invoke(root, "compare", "--model", "vqvae")
    assert_one_line_error(result.exit_code, result.stderr, fragment)
    assert digest(root) == before
