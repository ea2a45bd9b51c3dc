"""`dvae evaluate`: hand-checked pieces, the stage end to end on the tiny trained project, bad inputs via the CLI.

The metric functions' known cases (MIG, FactorVAE, Hungarian accuracy, perplexity, PSNR) are in test_metrics.py.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dvae_cli.cli import app
from dvae_cli.core.errors import UserError
from dvae_cli.core.splits import TEST
from dvae_cli.formats.dataset import DatasetFile
from dvae_cli.formats.model_folder import load_model, save_model
from dvae_cli.models.base import DiscreteVAE
from dvae_cli.models.jointvae.metrics import (
    factor_representation,
    gaussian_nll_per_image,
)
from dvae_cli.params import Params, load_params
from dvae_cli.scoring.evaluation import (
    PROBABILITY_FLOOR,
    ReconstructionTotals,
    finite_only,
    reconstruction_metrics,
    reconstruction_totals,
)
from dvae_cli.scoring.metrics import (
    DCIResult,
    factor_nmi,
    factorvae_score,
    hungarian_accuracy,
    mutual_information_gap,
    perplexity,
)
from dvae_cli.sources.dsprites import nearest_images
from dvae_cli.stages import encode, evaluate
from dvae_cli.stages.encode import EncodePaths
from dvae_cli.stages.evaluate import EvaluatePaths

FAMILIES = ("jointvae", "vqvae")
TEST_IMAGES = 60
"""The tiny project's test split: 10% of 600 images."""


# Pieces, against hand computations


class ConstantDecoder(DiscreteVAE):
    """Decodes every latent to 2×2 one-channel images of one value."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def decode(self, latent: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.full((latent["codes"].shape[0], 1, 2, 2), self.value)


def totals_of(value: float, images: np.ndarray) -> ReconstructionTotals:
    latent = {"codes": np.zeros((len(images), 1, 1), dtype=np.uint16)}
    return reconstruction_totals(ConstantDecoder(value), latent, images, batch_size=2, device=torch.device("cpu"),
                                 advance=lambda n=1, **fields: None)


def test_reconstruction_of_binary_images_by_gray_matches_hand_computation():
    # 3 images of 4 pixels, 5 of the 12 pixels white; every decoded pixel is 0.5.
    images = np.zeros((3, 1, 2, 2), dtype=np.uint8)
    images.reshape(-1)[[0, 3, 5, 6, 11]] = 255
    totals = totals_of(0.5, images)
    assert (totals.images, totals.pixels_per_image, totals.binary) == (3, 4, True)
    fraction_white = 5 / 12
    assert totals.pixel_variance == pytest.approx(fraction_white * (1 - fraction_white))
    section = reconstruction_metrics(totals)
    assert section["mse"] == pytest.approx(0.25)
    assert section["psnr"] == pytest.approx(10 * math.log10(4))
    assert section["normalized_mse"] == pytest.approx(0.25 / (fraction_white * (1 - fraction_white)))
    assert section["bernoulli_nll"] == pytest.approx(4 * math.log(2), rel=1e-6)


def test_bernoulli_nll_clamps_certain_mistakes_and_needs_binary_data():
    wrong = totals_of(1.0, np.zeros((2, 1, 2, 2), dtype=np.uint8))
    assert reconstruction_metrics(wrong)["bernoulli_nll"] == pytest.approx(-4 * math.log(PROBABILITY_FLOOR), rel=1e-2)
    gray = np.full((2, 1, 2, 2), 255, dtype=np.uint8)
    gray[0, 0, 0, 0] = 128
    assert "bernoulli_nll" not in reconstruction_metrics(totals_of(0.5, gray))


def test_gaussian_nll_is_squared_error_plus_normaliser():
    totals = ReconstructionTotals(images=2, pixels_per_image=4, squared_error=3.0, bernoulli_nll=0.0,
                                  pixel_variance=0.1, binary=False)
    # −log N(x; x̂, ½) summed over 4 pixels = Σ(x − x̂)² + 4 · ½ log π, averaged over 2 images.
    assert gaussian_nll_per_image(totals) == pytest.approx(1.5 + 2 * math.log(math.pi))


def test_perfect_reconstruction_leaves_psnr_out_of_the_json():
    images = np.full((2, 1, 2, 2), 255, dtype=np.uint8)
    section = finite_only({"reconstruction": reconstruction_metrics(totals_of(1.0, images))})
    assert section["reconstruction"]["mse"] == 0.0
    assert "psnr" not in section["reconstruction"]


def test_finite_only_drops_non_finite_numbers_and_empty_sections():
    sections = {"a": {"x": 1.0, "y": math.inf, "z": {"nan": math.nan}}, "b": {"n": 3}, "c": {"gone": -math.inf}}
    assert finite_only(sections) == {"a": {"x": 1.0}, "b": {"n": 3}}


def test_factor_representation_is_continuous_means_then_discrete_argmax():
    means = np.array([[0.5, -1.0], [2.0, 0.25]], dtype=np.float32)
    discrete = np.array([[2, 0], [1, 1]], dtype=np.uint8)
    np.testing.assert_array_equal(factor_representation(means, discrete),
                                  [[0.5, -1.0, 2.0, 0.0], [2.0, 0.25, 1.0, 1.0]])


def test_factor_representation_of_true_factors_scores_perfectly():
    # A JointVAE that put shape in its categorical variable and the 4 other factors in its means, one each.
    rng = np.random.default_rng(0)
    factor_classes = np.stack([rng.integers(size, size=4000) for size in (3, 6, 40, 32, 32)], axis=1)
    means = factor_classes[:, 1:] * np.array([0.1, 0.2, -0.5, 1.0]) + 3.0
    representation = factor_representation(means, factor_classes[:, :1])
    assert factorvae_score(representation, factor_classes, np.random.default_rng(1)).eval_accuracy == 1.0
    mig = mutual_information_gap(representation, factor_classes)
    # 20 histogram bins hold shape and scale one value per bin; orientation (40) and position (32) values share
    # bins, so their gaps stay below 1 even for the true factors, as in disentanglement_lib.
    assert min(mig.per_factor[:2]) >= 0.99
    assert mig.mig >= 0.75


# The stage on the tiny trained project


@dataclass(frozen=True)
class EncodedProject:
    """The trained project's dataset and models, with both codes files (read-only)."""

    params_path: Path
    dataset: Path
    models: Path
    codes: Path

    def params(self, **overrides: object) -> Params:
        return load_params(self.params_path, dict(overrides))

    def paths(self, family: str, metrics: Path) -> EvaluatePaths:
        return EvaluatePaths(model_dir=self.models / family, dataset=self.dataset,
                             codes=self.codes / f"{family}.h5", metrics=metrics)


@pytest.fixture(scope="module")
def encoded(trained_project, tmp_path_factory) -> EncodedProject:
    codes = tmp_path_factory.mktemp("codes")
    params = load_params(trained_project.params_path)
    for family in FAMILIES:
        encode.run(params, family, EncodePaths(trained_project.dataset, trained_project.model_dir(family),
                                                   codes / f"{family}.h5"), show_progress=False)
    return EncodedProject(params_path=trained_project.params_path, dataset=trained_project.dataset,
                          models=trained_project.root / "models", codes=codes)


def all_numbers(sections: dict) -> list[float]:
    return [number for value in sections.values()
            for number in (all_numbers(value) if isinstance(value, dict) else [value])]


def test_jointvae_metrics_end_to_end(encoded, tmp_path):
    result = evaluate.run(encoded.params(), "jointvae", encoded.paths("jointvae", tmp_path / "metrics.json"),
                          show_progress=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == result.metrics
    assert set(metrics) == {"evaluation", "reconstruction", "latent", "elbo", "labels", "discrete_factors",
                            "factors", "sample", "prior_samples"}
    assert all(math.isfinite(number) for number in all_numbers(metrics))
    assert metrics["evaluation"] == {"split": TEST, "images": TEST_IMAGES}
    assert (result.split_name, result.num_images) == ("test", TEST_IMAGES)

    # The same figures from the model's own evaluation-mode loss over the whole test split in one batch.
    loaded = load_model(encoded.models / "jointvae", "jointvae")
    # Its prior's draws (seeded by `seed`) against the true images.
    _, iou = nearest_images(loaded.model.sample_images(16, torch.Generator().manual_seed(0)))
    assert metrics["prior_samples"]["samples"] == 16
    assert metrics["prior_samples"]["mean_iou"] == pytest.approx(float(iou.mean()))
    with DatasetFile(encoded.dataset) as dataset:
        rows = dataset.indices(TEST)
        x = torch.from_numpy(dataset.read_images(rows)).float() / 255
        labels, factor_classes = dataset.labels[rows], dataset.factor_classes[rows]
    with torch.no_grad():
        loss = loaded.model.loss(x, step=0)
    assert metrics["reconstruction"]["mse"] == pytest.approx(((loss.reconstruction - x) ** 2).mean().item(), rel=1e-5)
    latent, elbo = metrics["latent"], metrics["elbo"]
    assert latent["kl_z"] == pytest.approx(loss.terms["kl_z"].item(), rel=1e-5)
    assert latent["kl_c"] == pytest.approx(loss.terms["kl_c"].item(), rel=1e-5)
    # The whole split is the loss's one batch, so the split's decomposition of KL_c is the batch estimate.
    for name in ("mutual_information_c", "marginal_kl_c"):
        assert latent[name] == pytest.approx(loss.terms[name].item(), rel=1e-4, abs=1e-6)
    assert latent["mutual_information_c"] + latent["marginal_kl_c"] == pytest.approx(latent["kl_c"])
    for dim in range(4):
        assert latent["kl_z_per_dim"][str(dim)] == pytest.approx(loss.terms[f"kl_z_{dim}"].item(), rel=1e-5)
    assert latent["active_dims"] == sum(kl > 0.01 for kl in latent["kl_z_per_dim"].values())
    # The split has fewer rows than the z sample takes: KL_z of all of them, split into I(x; z) ≤ log M and the rest.
    z_sample = latent["z_sample"]
    assert z_sample["sample_rows"] == len(x) and z_sample["kl_z"] == pytest.approx(latent["kl_z"], rel=1e-9)
    # Estimates at one draw each: a posterior near the prior can come out a little below 0.
    assert -0.05 < z_sample["mutual_information_z"] <= math.log(len(x))
    assert z_sample["mutual_information_z"] + z_sample["marginal_kl_z"] == pytest.approx(latent["kl_z"])
    assert z_sample["total_correlation_z"] > -0.05
    # Bernoulli likelihood: the clamped probabilities give the loss's BCE of the logits up to the clamp.
    assert elbo["reconstruction_nll"] == pytest.approx(loss.terms["recon"].item(), rel=1e-3)
    assert elbo["negative_elbo"] == pytest.approx(elbo["reconstruction_nll"] + latent["kl_z"] + latent["kl_c"])
    assert elbo["bits_per_dim"] == pytest.approx(elbo["negative_elbo"] / (32 * 32 * math.log(2)))

    categories = loaded.model.encode(x)["discrete"][:, 0].numpy()
    assert metrics["labels"]["discrete_0"]["hungarian_accuracy"] == pytest.approx(
        hungarian_accuracy(categories, labels))
    # 3 categories for 3 shapes: the one-to-one matching is the measure, whatever categories the model uses.
    assert set(metrics["labels"]["discrete_0"]) == {"hungarian_accuracy", "nmi", "ari"}
    assert list(metrics["discrete_factors"]["discrete_0"].values()) == pytest.approx(
        [nmi for nmi in factor_nmi(categories, factor_classes) if nmi is not None])
    assert set(metrics["factors"]["mig_per_factor"]) <= {"shape", "scale", "orientation", "posX", "posY"}
    assert {"mig", "factorvae_score", "factorvae_train_accuracy", "factorvae_active_dims"} <= set(metrics["factors"])
    assert "dci" not in metrics["factors"]

    # evaluate.num_samples (200) is larger than the split: all of it is used, and the user is told.
    assert metrics["sample"] == {"seed": 0, "size": TEST_IMAGES, "requested": 200}
    assert any("num_samples is 200" in note and f"all {TEST_IMAGES}" in note for note in result.notes)


def test_vqvae_metrics_end_to_end(encoded, tmp_path):
    result = evaluate.run(encoded.params(), "vqvae", encoded.paths("vqvae", tmp_path / "metrics.json"),
                          show_progress=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == result.metrics
    assert set(metrics) == {"evaluation", "reconstruction", "codes", "labels"}
    assert all(math.isfinite(number) for number in all_numbers(metrics))

    loaded = load_model(encoded.models / "vqvae", "vqvae")
    with DatasetFile(encoded.dataset) as dataset:
        rows = dataset.indices(TEST)
        x = torch.from_numpy(dataset.read_images(rows)).float() / 255
    codes = loaded.model.codes(x).numpy()
    counts = np.bincount(codes.ravel(), minlength=16)
    assert metrics["codes"] == {"perplexity": pytest.approx(perplexity(counts)),
                                "fraction_used": pytest.approx(np.mean(counts > 0)),
                                "unused": int(np.sum(counts == 0)),
                                "bits_per_image": pytest.approx(8 * 8 * 4)}  # 8×8 code map, K = 16
    assert metrics["reconstruction"]["mse"] == pytest.approx(
        ((loaded.model.reconstruct(x) - x) ** 2).mean().item(), rel=1e-5)
    assert 0 <= metrics["labels"]["linear_probe_accuracy"] <= 1
    assert metrics["labels"]["probe_train_images"] == 480


def test_dci_runs_on_a_capped_subsample_of_the_seeded_sample(encoded, tmp_path, monkeypatch):
    fitted: list[tuple[int, ...]] = []

    def recording_dci(representation, factor_classes, rng):
        fitted.append((*representation.shape, factor_classes.shape[1]))
        return DCIResult(disentanglement=0.5, completeness=0.25, informativeness_train=1.0, informativeness_test=0.75)

    monkeypatch.setattr("dvae_cli.scoring.evaluation.dci", recording_dci)
    monkeypatch.setattr("dvae_cli.scoring.evaluation.DCI_MAX_POINTS", 25)
    params = encoded.params(**{"evaluate.dci": True, "evaluate.num_samples": 40, "seed": 3})
    result = evaluate.run(params, "jointvae", encoded.paths("jointvae", tmp_path / "metrics.json"), show_progress=False)
    assert fitted == [(25, 4 + 1, 5)]  # 25 points; 4 means + 1 discrete argmax; 5 dSprites factors
    assert result.metrics["factors"]["dci"] == {"disentanglement": 0.5, "completeness": 0.25,
                                                "informativeness_train": 1.0, "informativeness_test": 0.75,
                                                "sample_size": 25}
    assert result.metrics["sample"] == {"seed": 3, "size": 40, "requested": 40}
    assert not any("num_samples" in note for note in result.notes)


def test_factor_sample_is_seeded(encoded, tmp_path):
    def factors(seed: int, name: str) -> dict:
        params = encoded.params(**{"evaluate.num_samples": 30, "seed": seed})
        return evaluate.run(params, "jointvae", encoded.paths("jointvae", tmp_path / name), show_progress=False).metrics

    first, again, other = factors(1, "a.json"), factors(1, "b.json"), factors(2, "c.json")
    assert first == again
    assert first["factors"]["mig"] != other["factors"]["mig"]


def copy_without_labels_and_factors(source: Path, target: Path) -> None:
    with h5py.File(source, "r") as original, h5py.File(target, "w") as copy:
        for name in ("images", "split"):
            original.copy(name, copy)
        copy.attrs.update(original.attrs)
        copy.attrs.update({"num_classes": 0, "class_names": "[]", "factor_names": "[]", "factor_sizes": "[]"})


def test_dataset_without_labels_or_factors_has_no_such_sections(encoded, tmp_path):
    dataset = tmp_path / "unlabelled.h5"
    copy_without_labels_and_factors(encoded.dataset, dataset)
    params = encoded.params()
    paths = EvaluatePaths(model_dir=encoded.models / "jointvae", dataset=dataset, codes=tmp_path / "codes.h5",
                          metrics=tmp_path / "metrics.json")
    encode.run(params, "jointvae", EncodePaths(dataset, paths.model_dir, paths.codes), show_progress=False)
    result = evaluate.run(params, "jointvae", paths, show_progress=False)
    assert set(result.metrics) == {"evaluation", "reconstruction", "latent", "elbo"}
    assert result.notes == []


def test_codes_of_the_other_family_are_refused(encoded, tmp_path):
    paths = EvaluatePaths(model_dir=encoded.models / "jointvae", dataset=encoded.dataset,
                          codes=encoded.codes / "vqvae.h5", metrics=tmp_path / "metrics.json")
    with pytest.raises(UserError, match="holds vqvae codes, not jointvae"):
        evaluate.run(encoded.params(), "jointvae", paths, show_progress=False)
    assert not paths.metrics.exists()


def test_evaluate_command_prints_a_table_and_notes(encoded, tmp_path):
    out = tmp_path / "metrics.json"
    result = CliRunner(env={"DVAE_DEBUG": None}).invoke(app, [
        "evaluate", "--model", "jointvae", "--params", str(encoded.params_path), "--dataset", str(encoded.dataset),
        "--model-dir", str(encoded.models / "jointvae"), "--codes", str(encoded.codes / "jointvae.h5"),
        "--out", str(out), "--num-samples", "500"])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "note: evaluate.num_samples is 500" in result.stderr
    assert "elbo.negative_elbo" in result.stderr and "factors.mig" in result.stderr
    assert json.loads(out.read_text())["sample"]["requested"] == 500


# Bad inputs, as a user meets them: exit 2, one line, no metrics file


def make_other_model(model_dir: Path, target: Path) -> None:
    """The same model with one weight changed, so its weights fingerprint differs."""
    loaded = load_model(model_dir)
    with torch.no_grad():
        next(loaded.model.parameters()).add_(1.0)
    save_model(target, loaded.family, loaded.model, loaded.config, loaded.data,
               {"dataset_sha256": loaded.record["dataset_sha256"]})


def make_other_dataset(dataset: Path, target: Path) -> None:
    """The same images under a different fingerprint."""
    shutil.copy(dataset, target)
    with h5py.File(target, "a") as file:
        file.attrs["note"] = "a copy"


@pytest.mark.parametrize(("case", "fragments"), [
    ("missing codes", ["codes file", "not found", "`dvae encode --model jointvae`"]),
    ("other model", ["made by another model", "re-run `dvae encode --model jointvae`"]),
    ("other dataset", ["made from another dataset", "re-run `dvae encode --model jointvae`"]),
])
def test_bad_inputs_exit_2_with_one_line_and_no_metrics(encoded, tmp_path, case, fragments):
    model_dir, dataset, codes = encoded.models / "jointvae", encoded.dataset, encoded.codes / "jointvae.h5"
    if case == "missing codes":
        codes = tmp_path / "absent.h5"
    elif case == "other model":
        model_dir = tmp_path / "other-model"
        make_other_model(encoded.models / "jointvae", model_dir)
    else:
        dataset = tmp_path / "other-dataset.h5"
        make_other_dataset(encoded.dataset, dataset)
    out = tmp_path / "metrics" / "jointvae.json"
    env = {key: value for key, value in os.environ.items() if key != "DVAE_DEBUG"}
    result = subprocess.run(
        [sys.executable, "-m", "dvae_cli", "evaluate", "--model", "jointvae", "--params", str(encoded.params_path),
         "--dataset", str(dataset), "--model-dir", str(model_dir), "--codes", str(codes), "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert not out.exists()
    assert list(tmp_path.rglob("*.tmp-*")) == []
