"""The `dvae` program as a user meets it: bad inputs through real subprocesses, the happy path in-process."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from dvae_cli import __version__
from dvae_cli.cli import app
from dvae_cli.formats.dataset import DatasetFile


def run_dvae(*args: str, cwd: Path, debug: bool = False) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "DVAE_DEBUG"}
    if debug:
        env["DVAE_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-m", "dvae_cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0]


def assert_no_output(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert list(tmp_path.rglob("*.tmp-*")) == []


# Bad inputs: exit 2, one line on stderr, no traceback, no output file

@pytest.mark.parametrize(("data", "extra_args", "fragments"), [
    ({"imagesize": 8}, [], ["unknown key `data.imagesize`", "did you mean `data.image_size`"]),
    ({"image_size": "big"}, [], ["`data.image_size` is 'big'", "expected an integer"]),
    ({"image_size": 2}, [], ["`data.image_size` is 2", "≥ 4"]),
    ({}, ["--set", "data.imagesize=8"], ["unknown key `data.imagesize`", "did you mean `data.image_size`"]),
    ({}, ["--set", "data.download=maybe"], ["`data.download` is 'maybe'", "true or false"]),
    ({}, ["--set", "data.split=[0.5, 0.6, 0.1]"], ["`data.split`", "sum to 1"]),
    ({}, ["--channels", "2"], ["`data.channels` is 2", "allowed: 1 | 3"]),
    ({}, ["--subset", "1.5"], ["`data.subset` is 1.5", "(0, 1]"]),
    ({}, ["--dataset", "imagenet"], ["`data.dataset` is 'imagenet'", "'folder'"]),
    ({}, ["--set", "vqvae.num_codes"], ["key.sub=value"]),
])
def test_bad_params_are_user_errors(tmp_path, write_params, image_folder, data, extra_args, fragments):
    params = write_params(data={"dataset": "folder", "root": str(image_folder), **data})
    out = tmp_path / "out" / "dataset.h5"
    result = run_dvae("prepare-data", "--params", str(params), "--out", str(out), *extra_args, cwd=tmp_path)
    assert_user_error(result, *fragments)
    assert_no_output(tmp_path, out)


def test_missing_params_file(tmp_path):
    out = tmp_path / "dataset.h5"
    result = run_dvae("prepare-data", "--params", "presets/nope.yaml", "--out", str(out), cwd=tmp_path)
    assert_user_error(result, "params file presets/nope.yaml not found")
    assert_no_output(tmp_path, out)


def test_missing_image_folder(tmp_path, write_params):
    params = write_params(data={"dataset": "folder", "root": "no/such/folder"})
    out = tmp_path / "dataset.h5"
    result = run_dvae("prepare-data", "--params", str(params), "--out", str(out), cwd=tmp_path)
    assert_user_error(result, "image folder no/such/folder not found", "data.root")
    assert_no_output(tmp_path, out)


def test_empty_image_folder(tmp_path, write_params):
    (tmp_path / "empty").mkdir()
    params = write_params(data={"dataset": "folder"})
    out = tmp_path / "dataset.h5"
    result = run_dvae("prepare-data", "--params", str(params), "--root", "empty", "--out", str(out), cwd=tmp_path)
    assert_user_error(result, "image folder empty holds no images")
    assert_no_output(tmp_path, out)


def test_empty_class_folder_and_a_class_missing_from_test(tmp_path, write_params, image_folder, png_writer):
    (image_folder / "bird").mkdir()
    params = write_params(data={"dataset": "folder", "root": str(image_folder)})
    out = tmp_path / "dataset.h5"
    result = run_dvae("prepare-data", "--params", str(params), "--out", str(out), cwd=tmp_path)
    assert_user_error(result, "class folder", "images/bird holds no images; add its images or remove the folder")
    assert_no_output(tmp_path, out)
    split_root = tmp_path / "split"
    for name in ("train/a/0.png", "train/b/0.png", "test/a/0.png"):
        png_writer(split_root / name, np.zeros((8, 8), dtype=np.uint8))
    result = run_dvae("prepare-data", "--params", str(params), "--root", "split", "--out", str(out), cwd=tmp_path)
    assert_user_error(result, "split/test has no folder for class 'b'; give every class images under both train/ and "
                              "test/")
    assert_no_output(tmp_path, out)


def test_unbalanced_classes_are_a_warning_and_the_dataset_is_written(tmp_path, write_params, png_writer):
    for name, count in (("few", 2), ("many", 5)):
        for i in range(count):
            png_writer(tmp_path / "images" / name / f"{i}.png", np.zeros((8, 8), dtype=np.uint8))
    params = write_params(data={"dataset": "folder", "root": "images", "image_size": 8, "split": [1.0, 0.0, 0.0]})
    out = tmp_path / "dataset.h5"
    result = run_dvae("prepare-data", "--params", str(params), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0
    assert [line for line in result.stderr.splitlines() if line.startswith("warning")] == [
        "warning: classes are unbalanced: 'few' has 2 images, 'many' 5; clustering scores favour the large classes"]
    assert out.exists()


def test_folder_without_a_readable_image_names_the_files(tmp_path, write_params):
    root = tmp_path / "broken"
    root.mkdir()
    for name in ("a.png", "b.png", "c.jpg"):
        (root / name).write_bytes(b"not an image")
    params = write_params(data={"dataset": "folder", "root": "broken"})
    out = tmp_path / "dataset.h5"
    result = run_dvae("prepare-data", "--params", str(params), "--out", str(out), cwd=tmp_path)
    # The files are found unreadable only by reading them, so the progress log's lines come first.
    *progress, error = result.stderr.strip().splitlines()
    assert all(line.startswith("prepare folder: row ") for line in progress)
    assert_user_error(subprocess.CompletedProcess(result.args, result.returncode, result.stdout, error),
                      "none of the 3 images of broken could be read (3: a.png, b.png, c.jpg)")
    assert_no_output(tmp_path, out)


# Help and version

def test_help_lists_commands_and_debug(tmp_path):
    result = run_dvae("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "prepare-data" in result.stdout
    assert "--debug" in result.stdout and "DVAE_DEBUG=1" in result.stdout
    assert "--version" in result.stdout


@pytest.mark.skipif(shutil.which("dvae") is None, reason="the dvae console script is not installed")
def test_console_script_version_and_help(tmp_path):
    version = subprocess.run(["dvae", "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert version.returncode == 0
    assert version.stdout.strip() == f"dvae {__version__}"
    help_text = subprocess.run(["dvae", "prepare-data", "--help"], cwd=tmp_path, capture_output=True, text=True,
                               timeout=60)
    assert help_text.returncode == 0
    for option in ("--params", "--set", "--out", "--dataset", "--root", "--subset", "--image-size", "--channels"):
        assert option in help_text.stdout



def test_shell_completion_completes_commands_options_and_values(tmp_path):
    def complete(words: str) -> list[str]:
        env = {**os.environ, "_DVAE_COMPLETE": "complete_bash", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))}
        result = subprocess.run(["dvae"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0
        return result.stdout.split()

    (tmp_path / "presets").mkdir()
    for name in ("tiny-cpu", "tiny-gpu", "other"):
        (tmp_path / "presets" / f"{name}.yaml").write_text("seed: 1\n")
    assert complete("dvae tr") == ["train"]
    assert "--preset" in complete("dvae train --pre")
    assert complete("dvae train --model ") == ["jointvae", "vqvae"]
    assert complete("dvae prior --model ") == ["vqvae"]  # only families with code maps
    assert complete("dvae encode --preset tiny") == ["tiny-cpu", "tiny-gpu"]


def test_every_command_help_has_an_example_that_parses_and_answers_h():
    group = typer.main.get_command(app)
    for name in [command.name for command in app.registered_commands]:
        result = invoke(name, "-h")
        assert result.exit_code == 0, name
        example = result.output.split("Example: ")[1].split()
        assert example[:2] == ["dvae", name], name
        group.commands[name].make_context(name, example[2:])  # every option and value of the example is one the command takes


def test_params_command_prints_the_merged_params_and_refuses_an_unknown_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "small.yaml").write_text("vqvae: {num_codes: 16}\n")
    result = invoke("params", "--preset", "small", "-S", "seed=4")
    assert result.exit_code == 0, result.output
    assert "seed: 4  # flag" in result.output.splitlines()
    assert "  num_codes: 16  # preset small" in result.output.splitlines()
    result = invoke("params", "--preset", "small", "--exp-args")
    assert result.output == "-S +vqvae.num_codes=16\n"  # no params.yaml here: every key is added
    result = invoke("params", "--preset", "nosuch")
    assert result.exit_code == 2
    assert "preset 'nosuch' not found" in result.output


@pytest.mark.parametrize("args", [("--help",), ("train", "--help"), ("train", "--model", "nope"),
                                  ("train", "--model", "jointvae", "-S", "jointvae.lr=-1"),
                                  ("prior", "--model", "jointvae")])
def test_help_and_argument_errors_never_import_torch(tmp_path, args):
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "dvae_cli", *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode in (0, 2), result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")}
    assert not imported & {"torch", "torchvision", "sklearn", "h5py", "scipy"}, args


# The happy path and precedence (in-process: no second torch import)

def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner(env={"DVAE_DEBUG": None, **(env or {})}).invoke(app, list(args))


def test_prepare_data_command_flag_over_file_over_default(tmp_path, write_params, image_folder):
    params = write_params(seed=1, data={"dataset": "folder", "root": str(image_folder), "image_size": 16})
    from_file = tmp_path / "from-file.h5"
    result = invoke("prepare-data", "--params", str(params), "--out", str(from_file))
    assert result.exit_code == 0, result.output
    assert "train images" in result.stderr and result.stdout == ""
    with DatasetFile(from_file) as dataset:
        assert dataset.info.image_size == 16  # file over default (64)
        assert dataset.info.channels == 1  # default
        assert dataset.params["seed"] == 1
        assert dataset.params["data"]["split"] == [0.8, 0.1, 0.1]

    from_flags = tmp_path / "from-flags.h5"
    result = invoke("prepare-data", "--params", str(params), "--out", str(from_flags), "--image-size", "8",
                    "--set", "data.channels=3", "--seed", "9")
    assert result.exit_code == 0, result.output
    with DatasetFile(from_flags) as dataset:
        assert dataset.info.image_size == 8 and dataset.read_images().shape == (5, 3, 8, 8)
        assert dataset.info.channels == 3
        assert dataset.params["seed"] == 9
        np.testing.assert_array_equal(dataset.labels, [0, 0, 0, 1, 1])
    assert params.read_text().count("image_size: 16") == 1


def test_subset_null_flag_keeps_every_image_over_the_params_file(tmp_path, write_params, image_folder):
    params = write_params(data={"dataset": "folder", "root": str(image_folder), "image_size": 8, "subset": 2})
    out = tmp_path / "all.h5"
    result = invoke("prepare-data", "--params", str(params), "--out", str(out), "--subset", "null")
    assert result.exit_code == 0, result.output
    with DatasetFile(out) as dataset:
        assert dataset.num_images == 5 and dataset.params["data"]["subset"] is None


def test_prepare_data_names_the_files_it_skipped(tmp_path, write_params, image_folder):
    for i in range(7):
        (image_folder / "dog" / f"broken{i}.png").write_bytes(b"not an image")
    params = write_params(data={"dataset": "folder", "root": str(image_folder), "image_size": 8})
    result = invoke("prepare-data", "--params", str(params), "--out", str(tmp_path / "dataset.h5"),
                    env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert ("unreadable files skipped │ 7: dog/broken0.png, dog/broken1.png, dog/broken2.png, dog/broken3.png, "
            "dog/broken4.png, …") in result.stderr


def test_internal_error_is_short_without_debug(monkeypatch, tmp_path, write_params, image_folder):
    def broken(*_args, **_kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("dvae_cli.stages.prepare.run", broken)
    params = write_params(data={"dataset": "folder", "root": str(image_folder)})
    args = ("prepare-data", "--params", str(params), "--out", str(tmp_path / "dataset.h5"))

    result = invoke(*args)
    assert result.exit_code == 1
    assert result.stderr.strip() == ("dvae: internal error: RuntimeError: boom "
                                     "(run with --debug for the traceback)")

    for debug_args, env in ((("--debug",), None), ((), {"DVAE_DEBUG": "1"})):
        result = invoke(*debug_args, *args, env=env)
        assert result.exit_code == 1
        assert isinstance(result.exception, RuntimeError)  # propagated: the traceback is shown


def test_prepare_dsprites_subset(tmp_path, write_params):
    """dSprites through the whole command: factors, labels (the shape) and the fraction split."""
    params = write_params(seed=0, data={"dataset": "dsprites", "subset": 40, "image_size": 64, "channels": 1})
    out = tmp_path / "dataset.h5"
    result = invoke("prepare-data", "--params", str(params), "--out", str(out))
    assert result.exit_code == 0, result.output
    with DatasetFile(out) as dataset:
        assert dataset.num_images == 40 and dataset.info.source == "dsprites"
        images = dataset.read_images()
        assert images.shape == (40, 1, 64, 64) and set(np.unique(images)) <= {0, 255}
        assert dataset.factors.shape == (40, 5) and dataset.factor_classes.shape == (40, 5)
        assert dataset.info.factor_sizes == (3, 6, 40, 32, 32)
        assert (dataset.factor_classes < np.array(dataset.info.factor_sizes)).all()
        np.testing.assert_array_equal(dataset.labels, dataset.factor_classes[:, 0])  # the shape is the class
        assert sorted(int((dataset.split == s).sum()) for s in range(3)) == [4, 4, 32]
