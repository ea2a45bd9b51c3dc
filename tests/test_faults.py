"""Faults a hostile user or a bad day brings, one table row each: the command exits 2 with one line naming what is
wrong, no traceback, and leaves its inputs byte for byte and no output or temporary behind. Refused writes
(RLIMIT_FSIZE), signals and kill -9 run in child processes; the rest in-process."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dvae_cli.cli import app
from dvae_cli.core.errors import UserError
from dvae_cli.core.files import exclusive_lock
from dvae_cli.trainer import LOCK


@dataclass(frozen=True)
class Project:
    """A copy of the session's trained project with both codes files, per test module; tests copy what they edit."""

    root: Path

    def path(self, relative: str) -> Path:
        return self.root / relative


@pytest.fixture(scope="module")
def project(trained_project, tmp_path_factory) -> Project:
    root = tmp_path_factory.mktemp("faults") / "project"
    shutil.copytree(trained_project.root, root)
    for family in ("jointvae", "vqvae"):
        result = invoke(root, "encode", "--model", family)
        assert result.exit_code == 0, result.output
    result = invoke(root, "prior", "--model", "vqvae", "--set", "prior.width=16", "--set", "prior.layers=1")
    assert result.exit_code == 0, result.output
    return Project(root)


def invoke(cwd: Path, *args: str):
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        return CliRunner(env={"DVAE_DEBUG": None}).invoke(app, list(args))
    finally:
        os.chdir(previous)


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (links as their targets' paths)."""
    return {str(path.relative_to(folder)): (f"link → {os.readlink(path)}" if path.is_symlink()
                                           else hashlib.sha256(path.read_bytes()).hexdigest())
            for path in sorted(folder.rglob("*")) if path.is_file() or path.is_symlink()}


PROGRESS = ("prepare ", "train ", "encode ", "decode ", "evaluate ", "render ", "compare ")
"""How the plain progress lines of a log start; the work done before a fault is found prints them."""


def assert_one_line_error(exit_code: int, stderr: str, *fragments: str) -> None:
    assert exit_code == 2, stderr
    lines = [line for line in stderr.strip().splitlines() if not line.startswith(PROGRESS)]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def overwrite_chunk(path: Path, name: str) -> None:
    """Overwrite the bytes of the first stored chunk of array `name` in the middle of the file, as a disk would."""
    with h5py.File(path, "r") as file:
        chunk = file[name].id.get_chunk_info(0)
    with open(path, "r+b") as stream:
        stream.seek(chunk.byte_offset)
        stream.write(b"\xa5" * chunk.size)


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def edit_h5(path: Path, change: Callable[[h5py.File], None]) -> None:
    with h5py.File(path, "a") as file:
        change(file)


def replace_array(name: str, values: Callable[[np.ndarray], np.ndarray]) -> Callable[[h5py.File], None]:
    def change(file: h5py.File) -> None:
        new = values(file[name][:])
        del file[name]
        file.create_dataset(name, data=new)
    return change


def spanning_disks(path: Path) -> None:
    """A ZIP64 end-of-directory locator before the end record naming two disks, which zipfile.is_zipfile raises on."""
    data = bytearray(path.read_bytes())
    end = data.rindex(b"PK\x05\x06")
    disk, offset, disks = (0).to_bytes(4, "little"), (0).to_bytes(8, "little"), (2).to_bytes(4, "little")
    data[end - 20:end] = b"PK\x06\x07" + disk + offset + disks
    path.write_bytes(bytes(data))


def edit_checkpoint(path: Path, change: Callable[[dict], None]) -> None:
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def overwrite_bytes(path: Path, offset: int, count: int) -> None:
    with open(path, "r+b") as stream:
        stream.seek(offset)
        stream.write(b"\x5a" * count)


def write_reference(root: Path, latent_spec: dict) -> None:
    """A reference-layout model.pt and specs.json under root/ref (the state dict is checked after the specs)."""
    (root / "ref").mkdir()
    torch.save({"fc_mean.weight": torch.zeros(1)}, root / "ref" / "model.pt")
    (root / "ref" / "specs.json").write_text(json.dumps({"dataset": "mnist", "latent_spec": latent_spec}))


def reshaped_first_tensor(state: dict) -> None:
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros(3, 3)


@dataclass(frozen=True)
class Case:
    """A command and what is done to a scratch copy of the project first; the error must name `fragments`."""

    args: tuple[str, ...]
    fragments: tuple[str, ...]
    prepare: Callable[[Path], None] = lambda root: None


def link(target: str, name: str) -> Callable[[Path], None]:
    return lambda root: (root / name).symlink_to(root / target)


def make_folder(name: str) -> Callable[[Path], None]:
    return lambda root: (root / name).mkdir(parents=True)


DATASET, JOINTVAE_CODES, VQVAE_CODES = "data/prepared/dataset.h5", "data/codes/jointvae.h5", "data/codes/vqvae.h5"

CASES = {
    # No input is ever destroyed; outputs that cannot be written are refused before any work.
    "encode over its dataset": Case(("encode", "-m", "vqvae", "--out", DATASET), ("is the input", DATASET)),
    "encode over its dataset through a link": Case(("encode", "-m", "vqvae", "--out", "link.h5"),
                                                   ("is the input", DATASET), link(DATASET, "link.h5")),
    "encode over the weights": Case(("encode", "-m", "vqvae", "--out", "models/vqvae/model.safetensors"),
                                    ("is the input",)),
    "decode over its codes": Case(("decode", VQVAE_CODES, "--out", VQVAE_CODES), ("is the input",)),
    "evaluate over the dataset": Case(("evaluate", "-m", "vqvae", "--out", DATASET), ("is the input",)),
    "render into the data folder": Case(("render", "-m", "vqvae", "--out", "data"), ("holds the input",)),
    "train into the dataset file": Case(("train", "-m", "vqvae", "--out", DATASET), ("is the input",)),
    "encode to a folder": Case(("encode", "-m", "vqvae", "--out", "out"), ("is an existing folder",),
                               make_folder("out")),
    "prepare to a folder": Case(("prepare-data", "--out", "data"), ("is an existing folder",)),
    "decode under a file": Case(("decode", VQVAE_CODES, "--out", f"{DATASET}/x.png"), ("lies under", "is a file")),
    # Damaged or hand-edited files.
    "dataset overwritten mid-file": Case(("encode", "-m", "vqvae", "--out", "codes.h5"), ("is damaged", DATASET),
                                         lambda root: overwrite_chunk(root / DATASET, "images")),
    "codes overwritten mid-file": Case(("decode", VQVAE_CODES, "--out", "out.png", "--rows", "0:600"),
                                       ("is damaged", VQVAE_CODES), lambda root: overwrite_chunk(root / VQVAE_CODES, "codes")),
    "code value ≥ K": Case(("decode", VQVAE_CODES, "--out", "out.png"), ("`codes` holds 16", "0…15"),
                           lambda root: edit_h5(root / VQVAE_CODES, replace_array("codes", lambda c: c * 0 + 16))),
    "discrete value ≥ k": Case(("evaluate", "-m", "jointvae", "--out", "m.json"), ("`discrete` holds", "0…2"),
                               lambda root: edit_h5(root / JOINTVAE_CODES,
                                                    replace_array("discrete", lambda c: c * 0 + 7))),
    "codes naming an array in bytes that are no UTF-8": Case(  # found by benchmarks/fuzz_readers.py
        ("decode", VQVAE_CODES, "--out", "out.png"), ("is damaged", VQVAE_CODES),
        lambda root: edit_h5(root / VQVAE_CODES, lambda file: file.attrs.create(
            "latent_arrays", b'["c\xefdes"]', dtype=h5py.string_dtype("utf-8")))),
    "float labels": Case(("evaluate", "-m", "vqvae", "--out", "m.json"), ("`labels` are float32", DATASET),
                         lambda root: edit_h5(root / DATASET, replace_array("labels", lambda v: v.astype(np.float32)))),
    "checkpoint whose zip spans disks": Case(  # found by benchmarks/fuzz_readers.py
        ("train", "-m", "vqvae", "--epochs", "3"), ("is truncated or damaged",),
        lambda root: spanning_disks(root / "models/vqvae/checkpoint.pt")),
    "checkpoint without fingerprint": Case(
        ("train", "-m", "vqvae", "--epochs", "3"), ("no valid `fingerprint`",),
        lambda root: edit_checkpoint(root / "models/vqvae/checkpoint.pt", lambda state: state.pop("fingerprint"))),
    "checkpoint with misshapen tensors": Case(
        ("train", "-m", "vqvae", "--epochs", "3"), ("does not fit",),
        lambda root: edit_checkpoint(root / "models/vqvae/checkpoint.pt", reshaped_first_tensor)),
    "checkpoint at an absurd step": Case(
        ("train", "-m", "vqvae"), ("is at step 1000000000000", "past this run's"),
        lambda root: edit_checkpoint(root / "models/vqvae/checkpoint.pt",
                                     lambda state: state.update(step=10 ** 12))),
    "config.json with an extra data key": Case(
        ("encode", "-m", "vqvae", "--out", "c.h5"), ("config.json: unknown key `data.extra`",),
        lambda root: edit_json(root / "models/vqvae/config.json", lambda r: r["data"].update(extra=1))),
    "config.json without model": Case(
        ("encode", "-m", "vqvae", "--out", "c.h5"), ("config.json has no `model` section",),
        lambda root: edit_json(root / "models/vqvae/config.json", lambda r: r.pop("model"))),
    "config.json with negative channels": Case(
        ("render", "-m", "jointvae", "--out", "r"), ("config.json: `data.channels` is -1",),
        lambda root: edit_json(root / "models/jointvae/config.json", lambda r: r["data"].update(channels=-1))),
    "config.json with K 10^9": Case(
        ("encode", "-m", "vqvae", "--out", "c.h5"), ("`model.num_codes` is 1000000000", "≤ 65536"),
        lambda root: edit_json(root / "models/vqvae/config.json", lambda r: r["model"].update(num_codes=10 ** 9))),
    "config.json with another K": Case(
        ("encode", "-m", "vqvae", "--out", "c.h5"), ("does not match", "config.json"),
        lambda root: edit_json(root / "models/vqvae/config.json", lambda r: r["model"].update(num_codes=32))),
    "weights config.json does not name": Case(
        ("evaluate", "-m", "vqvae", "--out", "m.json"), ("is not the file", "--force"),
        lambda root: edit_json(root / "models/vqvae/config.json", lambda r: r.update(weights_sha256="0" * 64))),
    "params K 10^9": Case(("train", "-m", "vqvae", "--out", "m", "--set", "vqvae.num_codes=1000000000"),
                          ("`vqvae.num_codes` is 1000000000", "≤ 65536")),
    "params that is a folder": Case(("encode", "-m", "vqvae", "--params", "data", "--out", "c.h5"), ("is a folder",)),
    "params that is binary": Case(("encode", "-m", "vqvae", "--params", "bin.yaml", "--out", "c.h5"),
                                  ("is not text",), lambda root: (root / "bin.yaml").write_bytes(b"\x00\xff\xfe\x01")),
    "float labels in a VQ-VAE codes file": Case(
        ("evaluate", "-m", "vqvae", "--out", "m.json"), ("`labels` are float32", VQVAE_CODES),
        lambda root: edit_h5(root / VQVAE_CODES, replace_array("labels", lambda v: v.astype(np.float32)))),
    "float labels in a JointVAE codes file": Case(
        ("evaluate", "-m", "jointvae", "--out", "m.json"), ("`labels` are float64", JOINTVAE_CODES),
        lambda root: edit_h5(root / JOINTVAE_CODES, replace_array("labels", lambda v: v.astype(np.float64)))),
    "codes file damaged in its headers": Case(
        ("decode", VQVAE_CODES, "--rows", "0:64", "--out", "o.png"), ("damaged", VQVAE_CODES),
        lambda root: overwrite_bytes(root / VQVAE_CODES, 1024, 5 * 1024)),
    "NaN continuous means": Case(
        ("decode", JOINTVAE_CODES, "--out", "o.png"), ("`continuous_mean` holds nan at row 0", "not a finite number"),
        lambda root: edit_h5(root / JOINTVAE_CODES, replace_array("continuous_mean", lambda v: v * np.nan))),
    "specs.json with 10^9 continuous dimensions": Case(
        ("import-reference", "ref/model.pt", "--out", "imported"), ("`latent_spec.cont` is 1000000000", "≤ 4096"),
        lambda root: write_reference(root, {"cont": 10 ** 9})),
    "specs.json with 10^9 categories": Case(
        ("import-reference", "ref/model.pt", "--out", "imported"), ("`latent_spec.disc[0]` is 1000000000",),
        lambda root: write_reference(root, {"cont": 2, "disc": [10 ** 9]})),
    "top-k above K": Case(("sample", "-m", "vqvae", "--top-k", "17", "--out", "s.png", "--codes-out", "s.h5"),
                          ("top_k (--top-k) is 17", "models 16 codes")),
    "encode under /proc": Case(("encode", "-m", "vqvae", "--out", "/proc/codes.h5"),
                               ("/proc/codes.h5", "no such file or directory")),
    "sample under /proc": Case(("sample", "-m", "vqvae", "--out", "/proc/x.png"), ("/proc/x.png", "no such file")),
    # One rule for outputs that exist: a command replaces what it wrote itself, another command's only with --force.
    "sample over the encoded codes": Case(("sample", "-m", "vqvae", "--codes-out", VQVAE_CODES),
                                          ("is a codes file written by `dvae encode`", "--force")),
    "decode over the dataset": Case(("decode", VQVAE_CODES, "--out", DATASET),
                                    ("is a dataset file written by `dvae prepare-data`", "--force")),
    "prepare-data over a codes file": Case(("prepare-data", "--out", JOINTVAE_CODES),
                                           ("is a codes file written by `dvae encode`",)),
    "train into the prior's folder": Case(("train", "-m", "vqvae", "--out", "models/vqvae-prior", "--live", "l"),
                                          ("is a prior folder written by `dvae prior`",)),
    "prior into a model folder": Case(("prior", "-m", "vqvae", "--out", "models/jointvae"),
                                      ("is a model folder written by `dvae train`",)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fault_is_one_line_and_leaves_everything_as_it_was(name, project, tmp_path):
    case = CASES[name]
    root = tmp_path / "project"
    shutil.copytree(project.root, root, symlinks=True)
    case.prepare(root)
    before = digest(root)
    result = invoke(root, *case.args)
    assert_one_line_error(result.exit_code, result.stderr, *case.fragments)
    assert digest(root) == before


def test_force_takes_weights_config_json_does_not_name(project, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(project.root, root)
    edit_json(root / "models/vqvae/config.json", lambda r: r.update(weights_sha256="0" * 64))
    result = invoke(root, "evaluate", "-m", "vqvae", "--out", "m.json", "--force")
    assert result.exit_code == 0, result.output
    assert (root / "m.json").exists()


def test_force_replaces_another_commands_file_and_a_command_its_own(project, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(project.root, root)
    assert invoke(root, "prepare-data", "--out", "again.h5").exit_code == 0
    assert invoke(root, "prepare-data", "--out", "again.h5").exit_code == 0  # its own file: replaced as before
    result = invoke(root, "sample", "-m", "vqvae", "--codes-out", VQVAE_CODES, "--force")
    assert result.exit_code == 0, result.output
    with h5py.File(root / VQVAE_CODES) as codes:
        assert codes.attrs["written_by"] == "dvae sample"


def test_a_full_disk_in_training_reports_the_first_refusal(project, tmp_path, monkeypatch):
    """The checkpoint cannot be written; DVCLive's summary then fails the same way, and is not the error reported."""
    def no_space(*_args, **_kwargs):
        raise UserError("cannot write models/vqvae/checkpoint.pt: no space left on the device; free some space and "
                        "run the command again")

    def summary_fails(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    root = tmp_path / "project"
    shutil.copytree(project.root, root)
    monkeypatch.setattr("dvae_cli.trainer.save_checkpoint", no_space)
    monkeypatch.setattr("dvae_cli.trainer.Logger.close", summary_fails)
    result = invoke(root, "train", "-m", "vqvae", "--epochs", "3", "--out", "fresh", "--live", "fresh-live")
    assert_one_line_error(result.exit_code, result.stderr, "cannot write models/vqvae/checkpoint.pt", "no space")
    assert not (root / "fresh").exists() and not (root / "fresh-live").exists()


def test_a_second_training_of_a_folder_is_refused_and_a_dead_holders_lock_taken_over(project, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(project.root, root)
    lock = root / "models" / "vqvae" / LOCK
    with exclusive_lock(lock, "model folder"):
        before = digest(root)
        result = invoke(root, "train", "-m", "vqvae", "--epochs", "3")
        assert_one_line_error(result.exit_code, result.stderr, "is in use by process", str(os.getpid()))
        assert digest(root) == before
    lock.write_text("999999999\n")  # a holder that died without removing its file
    result = invoke(root, "train", "-m", "vqvae", "--epochs", "3")
    assert result.exit_code == 0, result.output
    assert not lock.exists()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_later_run_removes_dead_processes_temporaries_only(project, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(project.root, root)
    out = root / "codes.h5"
    dead = root / f"codes.h5.tmp-{dead_pid()}"
    dead_shard = root / f"codes.h5.shard-1.tmp-{dead_pid()}"
    alive = root / f"codes.h5.tmp-{os.getppid()}"
    for path in (dead, dead_shard, alive):
        path.write_bytes(b"partial")
    result = invoke(root, "encode", "-m", "vqvae", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert out.exists() and alive.exists() and not dead.exists() and not dead_shard.exists()


# Child processes: refused writes, signals, kill -9.

def dvae_process(root: Path, *args: str, file_size_limit: int | None = None) -> subprocess.Popen:
    def limit() -> None:
        if file_size_limit is not None:
            import resource
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    env = {key: value for key, value in os.environ.items() if key != "DVAE_DEBUG"}
    return subprocess.Popen([sys.executable, "-m", "dvae_cli", *args], cwd=root, env=env, preexec_fn=limit,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


def leftovers(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if ".tmp-" in path.name)


@pytest.mark.parametrize(("args", "written"), [
    (("prepare-data", "--out", "big/dataset.h5"), "big/dataset.h5"),
    (("encode", "-m", "vqvae", "--out", "big/codes.h5"), "big/codes.h5"),
    (("decode", VQVAE_CODES, "--out", "big/decoded.h5", "--rows", "0:600"), "big/decoded.h5"),
    (("train", "-m", "vqvae", "--out", "big/model", "--live", "big/live"), "big/model/checkpoint.pt"),
])
def test_a_refused_write_is_one_line_and_leaves_nothing(args, written, project, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(project.root, root)
    before = digest(root)
    code, stderr = finished(dvae_process(root, *args, file_size_limit=16 * 1024))
    assert_one_line_error(code, stderr, f"cannot write {written}", "file-size limit")
    assert not (root / "big").exists()
    assert digest(root) == before


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_stop_prepare_data_at_once_without_temporaries(signum, code, tmp_path):
    out = tmp_path / "dataset.h5"
    process = dvae_process(tmp_path, "prepare-data", "--out", str(out), "--subset", "300000")
    deadline = time.monotonic() + 60
    while not any(".tmp-" in path.name for path in tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signum)
    sent = time.monotonic()
    returned, _ = finished(process)
    assert returned == code
    assert time.monotonic() - sent < 5
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [
    ("prepare-data", "--out", "again/dataset.h5"),
    ("encode", "-m", "jointvae", "--out", "again/codes.h5"),
    ("decode", JOINTVAE_CODES, "--out", "again/decoded.h5", "--rows", "0:600"),
    ("render", "-m", "vqvae", "--out", "again/renders"),
])
def test_kill_9_mid_write_then_the_same_command_leaves_only_the_artifact(args, project, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(project.root, root)
    process = dvae_process(root, *args)
    deadline = time.monotonic() + 60
    while not leftovers(root) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(random.Random(" ".join(args)).uniform(0, 0.05))
    process.kill()
    process.communicate()
    code, stderr = finished(dvae_process(root, *args))
    assert code == 0, stderr
    assert (root / args[args.index("--out") + 1]).exists()
    assert leftovers(root) == []
