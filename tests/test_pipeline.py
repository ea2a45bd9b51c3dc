"""The whole DVC pipeline on tiny params, in temporary copies of the project (git repos made for the test)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dvae_cli.formats.codes import CodesFile
from dvae_cli.formats.dataset import DatasetFile
from tests.conftest import TINY_PARAMS

PROJECT = Path(__file__).resolve().parents[1]
COPIED = ["dvc.yaml", ".dvc/config", ".dvc/plots", ".dvcignore", ".gitignore", "dvae_cli", "pyproject.toml"]


def merged(base: dict, changes: dict) -> dict:
    return {key: merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
            for key, value in {**base, **changes}.items()}


# The shipped params.yaml (DVC needs every key a stage tracks) with the tiny sizes of the test suite (and the
# shipped 6 continuous dimensions, which dvc.yaml's KL chart names).
PIPELINE_PARAMS = merged(yaml.safe_load((PROJECT / "params.yaml").read_text()),
                         {**TINY_PARAMS, "jointvae": {**TINY_PARAMS["jointvae"], "epochs": 4, "continuous": 6},
                          "prior": {"width": 32, "layers": 1, "heads": 2, "sample": {"count": 9}}})
FAMILIES = ("jointvae", "vqvae")
ARTIFACTS = ["data/prepared/dataset.h5"] + [
    path for family in FAMILIES for path in (f"models/{family}/model.safetensors", f"models/{family}/config.json",
                                             f"data/codes/{family}.h5", f"metrics/{family}.json")] + [
    "models/vqvae-prior/model.safetensors", "models/vqvae-prior/config.json", "metrics/vqvae-prior.json",
    "data/codes/vqvae-samples.h5", "metrics/vqvae-rate-distortion.json"]
CHARTS = {"jointvae-loss", "jointvae-kl-z", "jointvae-kl-c", "jointvae-reconstruction", "jointvae-disentanglement",
          "vqvae-loss", "vqvae-loss-terms", "vqvae-code-usage", "vqvae-perplexity", "vqvae-reconstruction",
          "vqvae-prior-bits"}
PICTURES = {"renders/jointvae/traversals.png", "renders/jointvae/discrete_x_continuous.png",
            "renders/jointvae/reconstructions.png", "renders/jointvae/samples.png", "renders/vqvae/reconstructions.png",
            "renders/vqvae/code_maps.png", "renders/vqvae/codebook.png", "renders/vqvae/code_usage.csv",
            "renders/vqvae-prior/prior_samples.png", "renders/vqvae-prior/rate_distortion.csv",
            "renders/vqvae-prior/rate_distortion.png"}


VQVAE_STAGES = ("evaluate@vqvae", "render@vqvae")
DVC = [sys.executable, "-m", "dvc"]
"""DVC of the interpreter running the tests, so that an unactivated virtual environment works too."""


def make_project(folder: Path, params: dict = PIPELINE_PARAMS) -> Path:
    folder.mkdir(parents=True)
    for name in COPIED:
        source, target = PROJECT / name, folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], folder)
    run(["git", "add", "-A"], folder)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "project"], folder)
    return folder


def environment() -> dict[str, str]:
    """The stages' `dvae` is the one installed beside the running interpreter."""
    scripts = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": os.pathsep.join([scripts, os.environ.get("PATH", "")]), "OMP_NUM_THREADS": "1",
            "DVC_NO_ANALYTICS": "1"}


def run(command: list[str], cwd: Path) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=environment(), timeout=600)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def digests(folder: Path, paths: list[str] = ARTIFACTS) -> dict[str, str]:
    return {path: hashlib.sha256((folder / path).read_bytes()).hexdigest() for path in paths}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_project(tmp_path_factory.mktemp("pipeline") / "project")
    output = run([*DVC, "repro"], folder)
    assert stages_run(output) == {"prepare", *(f"{stage}@{family}" for stage in ("train", "encode", "evaluate",
                                                                                  "render") for family in FAMILIES),
                                  "prior@vqvae", "sample@vqvae", "compare@vqvae"}
    return folder


def test_every_artifact_exists_and_is_valid(project: Path) -> None:
    with DatasetFile(project / "data/prepared/dataset.h5") as dataset:
        assert dataset.num_images == 600
    for family in FAMILIES:
        model_dir = project / "models" / family
        assert {p.name for p in model_dir.iterdir()} >= {"model.safetensors", "config.json", "checkpoint.pt"}
        assert json.loads((model_dir / "config.json").read_text())["family"] == family
        with CodesFile(project / "data" / "codes" / f"{family}.h5", family=family) as codes:
            assert len(codes) == 600
        metrics = json.loads((project / "metrics" / f"{family}.json").read_text())
        assert metrics["reconstruction"]["mse"] > 0
        assert (project / "dvclive" / family / "metrics.json").exists()
        assert sorted(p.suffix for p in (project / "renders" / family).iterdir())[-1] == ".png"
    assert (project / "dvc.lock").exists()


def test_dvc_shows_metrics_and_plots(project: Path) -> None:
    metrics = json.loads(run([*DVC, "metrics", "show", "--json"], project))
    shown = json.dumps(metrics)
    for key in ("metrics/jointvae.json", "metrics/vqvae.json", "dvclive/jointvae/metrics.json", "negative_elbo",
                "perplexity", "mig"):
        assert key in shown, key
    plots = json.loads(run([*DVC, "plots", "show", "--json"], project))
    assert set(plots["data"]) == CHARTS | PICTURES and "errors" not in plots
    kl_z = plots["data"]["jointvae-kl-z"][0]["content"]["data"]["values"]
    assert {point["field"] for point in kl_z} == {f"train/kl_z_{i}" for i in range(6)} | {"train/kl_z",
                                                                                          "train/capacity_z"}
    rate_distortion = plots["data"]["renders/vqvae-prior/rate_distortion.csv"][0]["content"]
    assert rate_distortion["encoding"]["color"]["field"] == "method"
    assert {"method", "setting"} <= {tip["field"] for tip in rate_distortion["encoding"]["tooltip"]}
    assert {point["method"] for point in rate_distortion["data"]["values"]} >= {"vqvae", "vqvae+prior", "jpeg", "webp"}


def test_a_fresh_clone_draws_the_committed_curves_and_pictures(project: Path, tmp_path: Path) -> None:
    """What git keeps is enough for `dvc plots show`: no DVC cache, no remote."""
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "run"], project)
    assert run(["git", "ls-files", "models"], project).split() == ["models/jointvae/.gitignore",
                                                                   "models/vqvae-prior/.gitignore",
                                                                   "models/vqvae/.gitignore"]
    run(["git", "clone", "-q", str(project), str(tmp_path / "clone")], tmp_path)
    clone = tmp_path / "clone"
    plots = json.loads(run([*DVC, "plots", "show", "--json"], clone))
    assert set(plots["data"]) == CHARTS | PICTURES and "errors" not in plots
    output = run([*DVC, "plots", "show", "-o", "page"], clone)
    assert "failed" not in output and (clone / "page" / "index.html").exists()


def test_forced_train_of_a_finished_run_resumes_at_its_end_and_changes_nothing(project: Path) -> None:
    """DVC deletes the stage's outputs first; the checkpoint, no output, stays and rebuilds the DVCLive folder."""
    live = ["dvclive/vqvae/metrics.json", "dvclive/vqvae/plots/train.json", "dvclive/vqvae/plots/epoch.json",
            "dvclive/vqvae/plots/eval.json", "models/vqvae/config.json"]
    before = digests(project, live)
    output = run([*DVC, "repro", "--force", "--single-item", "train@vqvae"], project)
    assert "vqvae: resumed from step 30" in output
    assert digests(project, live) == before
    assert stages_run(run([*DVC, "repro"], project)) == set()


def test_second_repro_does_nothing_and_render_steps_rerun_only_render(project: Path) -> None:
    assert stages_run(run([*DVC, "repro"], project)) == set()
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["render"]["steps"] = 5
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(run([*DVC, "repro"], project)) == {"render@jointvae", "render@vqvae"}
    count, params["prior"]["sample"]["count"] = params["prior"]["sample"]["count"], 6
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(run([*DVC, "repro"], project)) == {"sample@vqvae"}
    params["prior"]["sample"]["count"] = count  # back, restored from the run cache (a later test compares the files)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run([*DVC, "repro"], project)

    params["vqvae"]["num_codes"] = 32
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = json.loads(run([*DVC, "status", "--json"], project))
    assert {stage.split(":")[-1] for stage in changed} == {"train@vqvae"}  # encode/evaluate/render@vqvae follow it


def test_a_killed_repro_resumes_and_two_clones_give_identical_files(project: Path, tmp_path: Path) -> None:
    """The JointVAE chain of a second clone, killed in training and run again, gives the first clone's bytes."""
    clone = make_project(tmp_path / "clone")
    checkpoint = clone / "models" / "jointvae" / "checkpoint.pt"
    chain = ["evaluate@jointvae", "render@jointvae"]  # with what they depend on: prepare, train, encode
    process = subprocess.Popen([*DVC, "repro", *chain], cwd=clone, env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert checkpoint.exists() and not (clone / "models" / "jointvae" / "model.safetensors").exists()

    output = run([*DVC, "repro", *chain], clone)
    assert "jointvae: resumed from step" in output
    summary = json.loads((clone / "dvclive" / "jointvae" / "metrics.json").read_text())
    assert summary["step"] == 60 and "loss" in summary["train"], "the resumed run keeps its DVCLive summary"
    made = [path for path in ARTIFACTS if path.startswith("data/prepared/") or "jointvae" in path]
    assert digests(clone, made) == digests(project, made)


def test_returning_to_an_experiment_restores_it_from_the_run_cache(tmp_path: Path) -> None:
    """Experiment A, experiment B, A again: the third trains nothing and its files are A's, byte for byte."""
    folder = make_project(tmp_path / "project", {**PIPELINE_PARAMS, "models": ["vqvae"]})
    outputs = ["models/vqvae/model.safetensors", "models/vqvae/config.json", "data/codes/vqvae.h5",
               "metrics/vqvae.json", "dvclive/vqvae/metrics.json", "dvclive/vqvae/plots/train.json",
               "dvclive/vqvae/plots/epoch.json", "dvclive/vqvae/plots/eval.json",
               *sorted(picture for picture in PICTURES if picture.startswith("renders/vqvae/"))]
    learning_rate = PIPELINE_PARAMS["vqvae"]["lr"]
    # The VQ-VAE's own stages (and what they depend on); the prior's, downstream, would only add minutes.
    assert "train@vqvae" in stages_run(run([*DVC, "exp", "run", *VQVAE_STAGES, "-S", f"vqvae.lr={learning_rate}"], folder))
    first = digests(folder, outputs)
    assert "train@vqvae" in stages_run(run([*DVC, "exp", "run", *VQVAE_STAGES, "-S", f"vqvae.lr={2 * learning_rate}"], folder))
    assert digests(folder, outputs) != first
    again = run([*DVC, "exp", "run", *VQVAE_STAGES, "-S", f"vqvae.lr={learning_rate}"], folder)
    assert stages_run(again) == set() and "Stage 'train@vqvae' is cached" in again
    assert digests(folder, outputs) == first
