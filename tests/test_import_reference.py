"""`dvae import-reference`: a reference-layout model.pt + specs.json into a model folder the other commands read.

The reference's parameter names are dvae's, so a dvae JointVAE's state dict saved with torch.save is a
reference model.pt; the specs follow the published mnist example (with a smaller latent).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from dvae_cli.cli import app
from dvae_cli.formats.codes import CodesFile
from dvae_cli.formats.dataset import DatasetFile
from dvae_cli.formats.model_folder import load_model
from dvae_cli.models.base import DataShape
from dvae_cli.models.jointvae.config import JointVAEConfig
from dvae_cli.models.jointvae.model import JointVAE
from tests.conftest import TINY_PARAMS

SPECS: dict[str, Any] = {
    "cont_capacity": [0.0, 5.0, 25000, 30.0], "disc_capacity": [0.0, 5.0, 25000, 30.0], "record_loss_every": 50,
    "batch_size": 64, "latent_spec": {"disc": [3], "cont": 4}, "epochs": [100, 101, 102], "experiment_name": "fast_5",
    "lr": [0.0005], "print_loss_every": 50, "dataset": "mnist"}


@dataclass
class Reference:
    model_pt: Path
    specs: Path
    model: JointVAE
    params: Path

    def write(self, state: Any = None, specs: Any = None, legacy: bool = False) -> None:
        torch.save(self.model.state_dict() if state is None else state, self.model_pt,
                   _use_new_zipfile_serialization=not legacy)
        self.specs.write_text(json.dumps(SPECS if specs is None else specs))


@pytest.fixture
def reference(tmp_path: Path, write_params: Callable[..., Path]) -> Reference:
    torch.manual_seed(3)
    model = JointVAE(JointVAEConfig(continuous=4, discrete=[3]), DataShape(channels=1, image_size=32)).eval()
    folder = tmp_path / "reference"
    folder.mkdir()
    files = Reference(folder / "model.pt", folder / "specs.json", model, write_params(**TINY_PARAMS))
    files.write()
    return files


def invoke(*args: str):
    return CliRunner(env={"DVAE_DEBUG": None}).invoke(app, list(args))


def import_into(reference: Reference, out: Path, *extra: str):
    return invoke("import-reference", str(reference.model_pt), "--out", str(out), "--params", str(reference.params),
                  *extra)


def test_imported_folder_encodes_evaluates_and_renders_like_the_source(tmp_path, reference, tiny_dataset):
    out = tmp_path / "models" / "imported"
    result = import_into(reference, out)
    assert result.exit_code == 0, result.output
    assert "1×32×32" in result.stderr and "note:" not in result.stderr

    loaded = load_model(out, "jointvae")
    config = loaded.config
    assert (config.continuous, config.discrete, config.lr, config.batch_size) == (4, [3], 0.0005, 64)
    assert (config.cont_capacity.max, config.cont_capacity.steps, config.cont_capacity.gamma) == (5.0, 25000, 30.0)
    assert loaded.record["reference"]["specs"] == SPECS and loaded.record["dataset_sha256"] is None
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name

    common = ("--model", "jointvae", "--model-dir", str(out), "--dataset", str(tiny_dataset),
              "--params", str(reference.params))
    codes = tmp_path / "codes.h5"
    for args in (("encode", *common, "--out", str(codes)),
                 ("evaluate", *common, "--codes", str(codes), "--out", str(tmp_path / "metrics.json")),
                 ("render", *common, "--out", str(tmp_path / "renders"))):
        result = invoke(*args)
        assert result.exit_code == 0, (args[0], result.output)
    assert json.loads((tmp_path / "metrics.json").read_text())["reconstruction"]
    assert (tmp_path / "renders" / "traversals.png").exists()

    with DatasetFile(tiny_dataset) as dataset:
        images = torch.from_numpy(dataset.read_images()).float() / 255
    expected = reference.model.encode(images)
    with CodesFile(codes, family="jointvae") as written:
        stored = written.read_rows(0, len(written), ["continuous_mean", "discrete"])
    torch.testing.assert_close(torch.from_numpy(stored["continuous_mean"]), expected["continuous_mean"],
                               rtol=1e-4, atol=1e-5)
    assert torch.equal(torch.from_numpy(stored["discrete"]).long(), expected["discrete"])


def test_import_is_deterministic_and_reads_the_legacy_format(tmp_path, reference):
    out = tmp_path / "imported"
    assert import_into(reference, out).exit_code == 0
    zip_weights = (out / "model.safetensors").read_bytes()
    reference.write(legacy=True)  # the reference's 2018 checkpoints predate torch's zip format
    (out / "stale.txt").write_text("from an earlier model")
    folders = []
    for _ in range(2):
        result = import_into(reference, out, "--force")
        assert result.exit_code == 0, result.output
        folders.append({path.name: path.read_bytes() for path in out.iterdir()})
    assert folders[0] == folders[1]
    assert sorted(folders[0]) == ["config.json", "model.safetensors"]
    assert folders[0]["model.safetensors"] == zip_weights
    assert list(tmp_path.rglob("*.tmp-*")) == []


def test_specs_keys_over_params_and_a_nonzero_capacity_start_is_a_note(tmp_path, reference, write_params):
    specs = {key: value for key, value in SPECS.items() if key not in ("lr", "disc_capacity")}
    specs["cont_capacity"] = [2.0, 5.0, 25000, 30.0]
    reference.write(specs=specs)
    reference.params = write_params(jointvae={"lr": 0.01, "temperature": 0.5, "discrete": [7],
                                              "disc_capacity": {"max": 0.8, "steps": 10, "gamma": 2.0}})
    out = tmp_path / "imported"
    result = import_into(reference, out)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "cont_capacity starts at 2 nats" in notes[0]
    config = load_model(out, "jointvae").config
    assert config.discrete == [3] and config.cont_capacity.max == 5.0  # from specs.json
    assert (config.lr, config.temperature, config.disc_capacity.max) == (0.01, 0.5, 0.8)  # from params


def _without(mapping: dict[str, Any], key: str) -> dict[str, Any]:
    return {name: value for name, value in mapping.items() if name != key}


def _with(key: str, value: Any) -> dict[str, Any]:
    specs = copy.deepcopy(SPECS)
    specs[key] = value
    return specs


BAD_INPUTS: dict[str, tuple[Callable[[Reference], None], list[str]]] = {
    "missing files": (lambda ref: (ref.model_pt.unlink(), ref.specs.unlink()), ["model.pt not found"]),
    "missing specs.json": (lambda ref: ref.specs.unlink(), ["specs.json not found", "--specs"]),
    "model.pt not a torch file": (lambda ref: ref.model_pt.write_text("hello"), ["not a PyTorch state dict"]),
    "model.pt not a state dict": (lambda ref: ref.write(state=[1, 2]), ["holds a list, not a state dict"]),
    "model.pt a wrapped state dict": (lambda ref: ref.write(state={"state_dict": ref.model.state_dict()}),
                                      ["entry 'state_dict' is OrderedDict, not a tensor"]),
    "specs.json not JSON": (lambda ref: ref.specs.write_text("{cont: 4"), ["specs.json is not JSON"]),
    "specs.json without latent_spec": (lambda ref: ref.write(specs=_without(SPECS, "latent_spec")),
                                       ["has no `latent_spec`"]),
    "unknown dataset": (lambda ref: ref.write(specs=_with("dataset", "svhn")), ["'svhn'", "mnist | fashion_mnist"]),
    "bad capacity": (lambda ref: ref.write(specs=_with("cont_capacity", [0.0, 5.0, 0, 30.0])),
                     ["`cont_capacity[2]` is 0", "integer ≥ 1"]),
    "other latent spec": (lambda ref: ref.write(specs=_with("latent_spec", {"disc": [3], "cont": 6})),
                          ["does not fit", "`fc_mean.weight` has shape (4, 256)", "(6, 256)"]),
    "other image size": (lambda ref: ref.write(specs=_with("dataset", "dsprites")),
                         ["does not fit", "dsprites 1×64×64", "`img_to_features.2.weight` has shape (64, 32, 4, 4)"]),
    "missing parameter": (lambda ref: ref.write(state=_without(ref.model.state_dict(), "fc_mean.bias")),
                          ["lacks `fc_mean.bias`"]),
    "extra parameter": (lambda ref: ref.write(state={**ref.model.state_dict(), "fc_alphas.1.weight": torch.zeros(2)}),
                        ["has `fc_alphas.1.weight`"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, reference, case):
    spoil, fragments = BAD_INPUTS[case]
    spoil(reference)
    out = tmp_path / "models" / "imported"
    result = import_into(reference, out)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists() and not out.parent.exists()


def test_existing_output_is_kept(tmp_path, reference):
    out = tmp_path / "imported"
    out.mkdir()
    (out / "config.json").write_text("a trained model")
    result = import_into(reference, out)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {out} already exists; pass --force to replace it, or another --out"
    assert [path.name for path in out.iterdir()] == ["config.json"]
    assert (out / "config.json").read_text() == "a trained model"


def test_pickled_objects_are_refused_by_the_real_program(tmp_path, reference):
    """A whole pickled module (what torch.save(model) writes) needs unpickling code: weights_only refuses it."""
    torch.save(reference.model, reference.model_pt)
    out = tmp_path / "imported"
    env = {**{key: value for key, value in os.environ.items() if key != "DVAE_DEBUG"}, "OMP_NUM_THREADS": "1"}
    process = subprocess.run([sys.executable, "-m", "dvae_cli", "import-reference", str(reference.model_pt),
                              "--out", str(out), "--params", str(reference.params)],
                             check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert process.returncode == 2, process.stderr
    assert process.stderr.count("\n") == 1 and process.stderr.startswith("error: "), process.stderr
    assert "weights_only" in process.stderr and "Traceback" not in process.stderr + process.stdout
    assert not out.exists()
