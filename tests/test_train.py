"""The shared trainer: learning, bit-exact resume, checkpoint safety, divergence, bad inputs."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import pytest
import torch
import yaml

from dvae_cli.core.errors import TrainingDiverged, UserError
from dvae_cli.formats.checkpoint import read_checkpoint
from dvae_cli.models.jointvae.model import JointVAE
from dvae_cli.params import load_params
from dvae_cli.scoring.metrics import pixel_histogram, pixel_variance
from dvae_cli.stages import prepare, train
from dvae_cli.stages.train import TrainPaths
from dvae_cli.trainer import epoch_permutation
from tests.conftest import TINY_PARAMS

FAMILIES = ("jointvae", "vqvae")


def write_params(folder: Path, **changes: Any) -> Path:
    params = copy.deepcopy(TINY_PARAMS)
    for dotted, value in changes.items():
        node = params
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_training(folder: Path, dataset: Path, family: str, restart: bool = False, restart_on_mismatch: bool = False,
                 **changes: Any) -> Path:
    params = load_params(write_params(folder, **changes))
    paths = TrainPaths(dataset, folder / "models" / family, folder / "dvclive" / family)
    train.run(params, family, paths, restart=restart, restart_on_mismatch=restart_on_mismatch, show_progress=False)
    return paths.model_dir


def weights_bytes(model_dir: Path) -> bytes:
    return (model_dir / "model.safetensors").read_bytes()


def curve(folder: Path, family: str, kind: str) -> list[dict[str, Any]]:
    """The rows of DVCLive curve `kind` (train, epoch, eval) of a run in `folder`."""
    return json.loads((folder / "dvclive" / family / "plots" / f"{kind}.json").read_text())


def series(folder: Path, family: str, name: str) -> list[tuple[int, float]]:
    """The (step, value) points of figure `name` of a run in `folder`."""
    kind = name.split("/")[0] if name.split("/")[0] in ("train", "eval") else "epoch"
    return [(row["step"], row[name]) for row in curve(folder, family, kind)]


def test_pixel_variance_is_exact() -> None:
    images = torch.tensor([0, 255, 255, 0], dtype=torch.uint8).numpy()
    assert pixel_variance(pixel_histogram(images)) == pytest.approx(0.25)


def test_epoch_permutation_depends_on_seed_and_epoch_only() -> None:
    assert torch.equal(epoch_permutation(3, 1, 50), epoch_permutation(3, 1, 50))
    assert not torch.equal(epoch_permutation(3, 1, 50), epoch_permutation(3, 2, 50))
    assert sorted(epoch_permutation(3, 1, 50).tolist()) == list(range(50))


@pytest.mark.parametrize("family", FAMILIES)
def test_short_run_learns(tmp_path: Path, tiny_dataset: Path, family: str) -> None:
    model_dir = run_training(tmp_path, tiny_dataset, family, **{f"{family}.epochs": 4, f"{family}.lr": 2e-3,
                                                               "train.log_every": 1})
    losses = [value for _, value in series(tmp_path, family, "train/loss")]
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    record = json.loads((model_dir / "config.json").read_text())
    assert record["steps"] == 60 and record["family"] == family
    if family == "vqvae":
        assert record["final_metrics"]["epoch/codes_used_fraction"] >= 0.5


def test_more_categories_than_classes_is_a_warning_and_the_run_goes_on(tmp_path: Path, tiny_dataset: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = run_training(tmp_path, tiny_dataset, "jointvae", **{"jointvae.discrete": [5, 3], "train.max_steps": 2})
    assert capsys.readouterr().err.splitlines() == [
        "warning: jointvae.discrete[0] has 5 categories for 3 classes: the extra categories split classes, and the "
        "Hungarian accuracy counts one category per class"]
    assert (model_dir / "model.safetensors").exists()


def test_vqvae_keeps_most_of_a_64_code_book(tmp_path: Path, tiny_dataset: Path) -> None:
    model_dir = run_training(tmp_path, tiny_dataset, "vqvae", **{"vqvae.num_codes": 64, "vqvae.epochs": 6,
                                                                "vqvae.lr": 2e-3})
    record = json.loads((model_dir / "config.json").read_text())
    assert record["final_metrics"]["epoch/codes_used_fraction"] >= 0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_bytes(tmp_path: Path, tiny_dataset: Path, family: str) -> None:
    """The whole model folder: no timing or host fact in config.json (DVCLive has the images/s)."""
    first = run_training(tmp_path / "a", tiny_dataset, family)
    second = run_training(tmp_path / "b", tiny_dataset, family)
    assert weights_bytes(first) == weights_bytes(second)
    assert (first / "config.json").read_bytes() == (second / "config.json").read_bytes()
    assert "images_per_second" not in (first / "config.json").read_text()
    assert series(tmp_path / "a", family, "train/images_per_second")


@pytest.mark.parametrize(("family", "changes"), [("jointvae", {}), ("vqvae", {}),
                                                 ("vqvae", {"vqvae.quantizer": "fsq"}),
                                                 ("vqvae", {"vqvae.quantizer": "rvq"})])
def test_stopped_and_resumed_equals_uninterrupted(tmp_path: Path, tiny_dataset: Path, family: str,
                                                  changes: dict) -> None:
    uninterrupted = run_training(tmp_path / "whole", tiny_dataset, family, **changes)
    stopped = run_training(tmp_path / "parts", tiny_dataset, family, **changes, **{"train.max_steps": 13})
    assert read_checkpoint(stopped / "checkpoint.pt", family)["step"] == 13
    resumed = run_training(tmp_path / "parts", tiny_dataset, family, **changes)
    assert weights_bytes(resumed) == weights_bytes(uninterrupted)


def test_killed_and_resumed_equals_uninterrupted(tmp_path: Path, tiny_dataset: Path) -> None:
    """SIGKILL a real `dvae train` after its first checkpoint; the resumed run ends with the same bytes."""
    family = "jointvae"
    uninterrupted = run_training(tmp_path / "whole", tiny_dataset, family, **{"jointvae.epochs": 6})
    folder = tmp_path / "killed"
    folder.mkdir()
    params = write_params(folder, **{"jointvae.epochs": 6, "train.checkpoint_every": 4})
    checkpoint = folder / "models" / family / "checkpoint.pt"
    process = subprocess.Popen([sys.executable, "-m", "dvae_cli", "train", "--model", family, "--params", str(params),
                                "--dataset", str(tiny_dataset)], cwd=folder, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    step = read_checkpoint(checkpoint, family)["step"]
    assert 0 < step < 90, "the run must be killed between its first checkpoint and its end"
    assert not (folder / "models" / family / "model.safetensors").exists()
    params_obj = load_params(params)
    train.run(params_obj, family, TrainPaths(tiny_dataset, folder / "models" / family, folder / "dvclive" / family),
              show_progress=False)
    assert weights_bytes(folder / "models" / family) == weights_bytes(uninterrupted)


@pytest.mark.parametrize(("family", "figures"), [
    ("jointvae", ["eval/factors/mig", "eval/factors/factorvae_score", "eval/labels/discrete_0/hungarian_accuracy"]),
    ("vqvae", ["eval/reconstruction/normalized_mse", "eval/codes/perplexity"]),
])
def test_periodic_evaluation_logs_its_curves_at_its_steps(tmp_path: Path, tiny_dataset: Path, family: str,
                                                          figures: list[str]) -> None:
    run_training(tmp_path, tiny_dataset, family, **{"train.eval_every": 12})
    for figure in figures:
        rows = series(tmp_path, family, figure)
        assert [step for step, _ in rows] == [12, 24, 30], figure  # every 12 steps, and the last of the 30
        assert all(0 <= value for _, value in rows), figure


@pytest.mark.parametrize("family", FAMILIES)
def test_periodic_evaluation_changes_no_training_byte(tmp_path: Path, tiny_dataset: Path, family: str) -> None:
    without = run_training(tmp_path / "off", tiny_dataset, family, **{"train.eval_every": None})
    evaluated = run_training(tmp_path / "on", tiny_dataset, family, **{"train.eval_every": 7})
    assert not (tmp_path / "off" / "dvclive" / family / "plots" / "eval.json").exists()
    assert weights_bytes(evaluated) == weights_bytes(without)
    states = [read_checkpoint(folder / "checkpoint.pt", family) for folder in (without, evaluated)]
    assert torch.equal(states[0]["rng"]["torch"], states[1]["rng"]["torch"])


def without_timings(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{name: value for name, value in row.items() if name != "train/images_per_second"} for row in rows]


@pytest.mark.parametrize("deleted", [False, True])
def test_resume_continues_the_curves_without_repeating_steps(tmp_path: Path, tiny_dataset: Path,
                                                             deleted: bool) -> None:
    """Rows logged after the last checkpoint of a killed run are logged once, by the resumed run, as uninterrupted;
    the DVCLive folder is rebuilt from the checkpoint, also when it is gone (DVC deletes a stage's outputs)."""
    family = "vqvae"
    run_training(tmp_path / "whole", tiny_dataset, family, **{"train.eval_every": 10})
    parts = tmp_path / "parts"
    run_training(parts, tiny_dataset, family, **{"train.max_steps": 20, "train.eval_every": 10})
    checkpoint = parts / "models" / family / "checkpoint.pt"
    at_step_20 = checkpoint.read_bytes()
    run_training(parts, tiny_dataset, family, **{"train.max_steps": 25, "train.eval_every": 10})
    checkpoint.write_bytes(at_step_20)  # as if killed after logging step 25, before its checkpoint
    if deleted:
        shutil.rmtree(parts / "dvclive")
    run_training(parts, tiny_dataset, family, **{"train.eval_every": 10})
    # not the epoch rows: the run that max_steps stopped at 20 logged an epoch's end there
    for kind in ("train", "eval"):
        assert without_timings(curve(parts, family, kind)) == without_timings(curve(tmp_path / "whole", family, kind))
    summaries = [json.loads((folder / "dvclive" / family / "metrics.json").read_text())
                 for folder in (parts, tmp_path / "whole")]
    for summary in summaries:
        summary["train"].pop("images_per_second")
    assert summaries[0]["step"] == summaries[1]["step"] == 30
    assert (summaries[0]["train"], summaries[0]["eval"]) == (summaries[1]["train"], summaries[1]["eval"])


def test_changed_params_refuse_to_resume_until_restart(tmp_path: Path, tiny_dataset: Path) -> None:
    run_training(tmp_path, tiny_dataset, "vqvae", **{"train.max_steps": 5})
    with pytest.raises(UserError, match=r"other settings \(vqvae.num_codes: 16 → 32\).*--restart"):
        run_training(tmp_path, tiny_dataset, "vqvae", **{"vqvae.num_codes": 32})
    run_training(tmp_path, tiny_dataset, "vqvae", restart=True, **{"vqvae.num_codes": 32, "train.max_steps": 5})
    assert read_checkpoint(tmp_path / "models" / "vqvae" / "checkpoint.pt", "vqvae")["step"] == 5


def test_a_checkpoint_past_the_run_or_of_an_older_format_starts_over_only_when_asked(tmp_path: Path,
                                                                                     tiny_dataset: Path) -> None:
    """A longer run's state cannot be wound back to this run's last step: another error, or a fresh start."""
    fresh = run_training(tmp_path / "fresh", tiny_dataset, "vqvae", **{"train.max_steps": 5})
    folder = tmp_path / "longer"
    run_training(folder, tiny_dataset, "vqvae", **{"train.max_steps": 10})
    with pytest.raises(UserError, match=r"is at step 10, past this run's 5 steps; pass --restart"):
        run_training(folder, tiny_dataset, "vqvae", **{"train.max_steps": 5})
    model_dir = run_training(folder, tiny_dataset, "vqvae", restart_on_mismatch=True, **{"train.max_steps": 5})
    assert weights_bytes(model_dir) == weights_bytes(fresh)
    assert [step for step, _ in series(folder, "vqvae", "train/loss")] == [5]

    checkpoint = model_dir / "checkpoint.pt"
    state = read_checkpoint(checkpoint, "vqvae")
    torch.save({**state, "format_version": 1}, checkpoint)
    with pytest.raises(UserError, match=r"has format version 1, this dvae reads 2; pass --restart"):
        run_training(folder, tiny_dataset, "vqvae", **{"train.max_steps": 5})
    run_training(folder, tiny_dataset, "vqvae", restart_on_mismatch=True, **{"train.max_steps": 5})
    assert read_checkpoint(checkpoint, "vqvae")["format_version"] == 2


def test_more_epochs_resume_instead_of_restarting(tmp_path: Path, tiny_dataset: Path) -> None:
    run_training(tmp_path, tiny_dataset, "vqvae")
    run_training(tmp_path, tiny_dataset, "vqvae", **{"vqvae.epochs": 3})
    record = json.loads((tmp_path / "models" / "vqvae" / "config.json").read_text())
    assert record["steps"] == 45


class Payload:
    def __reduce__(self) -> tuple:
        return (os.system, ("touch pwned",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "dvae-checkpoint", "payload": Payload()}, path)
    with pytest.raises(UserError, match="pickled code"):
        read_checkpoint(path, "jointvae")
    assert not Path("pwned").exists() and not (tmp_path / "pwned").exists()


def test_damaged_and_foreign_checkpoints_are_refused(tmp_path: Path, tiny_dataset: Path) -> None:
    model_dir = run_training(tmp_path, tiny_dataset, "vqvae", **{"train.max_steps": 3})
    checkpoint = model_dir / "checkpoint.pt"
    with pytest.raises(UserError, match="belongs to a vqvae model, not jointvae"):
        read_checkpoint(checkpoint, "jointvae")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(UserError, match="truncated or damaged"):
        read_checkpoint(truncated, "vqvae")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(UserError, match="not a dvae checkpoint"):
        read_checkpoint(other, "vqvae")


def test_divergence_stops_with_a_checkpoint_of_the_last_good_state(
        tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    honest_loss = JointVAE.loss

    def loss_that_diverges_at_step_7(self: JointVAE, x: torch.Tensor, step: int):  # type: ignore[no-untyped-def]
        output = honest_loss(self, x, step)
        if step == 7:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(JointVAE, "loss", loss_that_diverges_at_step_7)
    with pytest.raises(TrainingDiverged, match="at step 7"):
        run_training(tmp_path, tiny_dataset, "jointvae")
    model_dir = tmp_path / "models" / "jointvae"
    state = read_checkpoint(model_dir / "checkpoint.pt", "jointvae")
    assert state["step"] == 7
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (model_dir / "model.safetensors").exists()


def dvae(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvae_cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def assert_user_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert pattern in lines[0], lines[0]


@pytest.mark.parametrize(("changes", "pattern"), [
    ({"jointvae.discrete": [1]}, "`jointvae.discrete[0]` is 1"),
    ({"jointvae.continuous": -1}, "`jointvae.continuous` is -1"),
    ({"jointvae.continuous": 0, "jointvae.discrete": []}, "needs at least one dimension"),
    ({"vqvae.num_codes": 1}, "`vqvae.num_codes` is 1"),
    ({"vqvae.downsample": 3}, "`vqvae.downsample` is 3"),
    ({"vqvae.downsample": 64}, "downsample"),
    ({"vqvae.code_dim": 0}, "`vqvae.code_dim` is 0"),
    ({"vqvae.ema_decay": 1.0}, "`vqvae.ema_decay` is 1.0"),
    ({"vqvae.batch_size": 60000}, "fewer than vqvae.batch_size"),
])
def test_bad_params_exit_2_and_write_nothing(tmp_path: Path, tiny_dataset: Path, changes: dict, pattern: str) -> None:
    family = next(key.split(".")[0] for key in changes)
    params = write_params(tmp_path, **changes)
    result = dvae("train", "--model", family, "--params", str(params), "--dataset", str(tiny_dataset), cwd=tmp_path)
    assert_user_error(result, pattern)
    assert not (tmp_path / "models").exists() and not (tmp_path / "dvclive").exists()


def test_bad_files_exit_2_and_write_nothing(tmp_path: Path, tiny_dataset: Path) -> None:
    params = write_params(tmp_path)
    assert_user_error(dvae("train", "--model", "vqvae", "--params", str(params), "--dataset", "missing.h5",
                           cwd=tmp_path), "dvae prepare-data")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as file:
        file["x"] = [1, 2, 3]
    assert_user_error(dvae("train", "--model", "vqvae", "--params", str(params), "--dataset", str(foreign),
                           cwd=tmp_path), "not a dvae dataset")
    odd = tmp_path / "odd"
    odd.mkdir()
    odd_dataset = odd / "dataset.h5"
    prepare.run(load_params(write_params(odd, **{"data.image_size": 48})), prepare.PreparePaths(odd_dataset),
                show_progress=False)
    assert_user_error(dvae("train", "--model", "jointvae", "--params", str(params), "--dataset", str(odd_dataset),
                           cwd=tmp_path), "power of two")
    assert not (tmp_path / "models").exists() and not (tmp_path / "dvclive").exists()

    model_dir = tmp_path / "models" / "jointvae"
    model_dir.mkdir(parents=True)
    (model_dir / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
    assert_user_error(dvae("train", "--model", "jointvae", "--params", str(params), "--dataset", str(tiny_dataset),
                           cwd=tmp_path), "truncated or damaged")
    run_training(tmp_path / "v", tiny_dataset, "vqvae", **{"train.max_steps": 2})
    (model_dir / "checkpoint.pt").write_bytes((tmp_path / "v" / "models" / "vqvae" / "checkpoint.pt").read_bytes())
    assert_user_error(dvae("train", "--model", "jointvae", "--params", str(params), "--dataset", str(tiny_dataset),
                           cwd=tmp_path), "belongs to a vqvae model")
    assert sorted(p.name for p in model_dir.iterdir()) == ["checkpoint.pt"]
    assert not (tmp_path / "dvclive").exists()
