"""`dvae encode` / `dvae decode` and the codes-file reader, on the session's tiny trained project."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from dvae_cli.core.errors import UserError
from dvae_cli.core.files import sha256_file
from dvae_cli.core.images import to_uint8
from dvae_cli.formats.codes import ROWS_PER_CHUNK, CodesFile, code_dtype
from dvae_cli.formats.dataset import DatasetChunk, DatasetFile, DatasetWriter
from dvae_cli.formats.model_folder import WEIGHTS, load_model, save_model
from dvae_cli.models import get_family
from dvae_cli.params import load_params
from dvae_cli.stages import decode, encode, prepare
from dvae_cli.stages.decode import parse_rows
from dvae_cli.stages.encode import EncodePaths

FAMILIES = ("vqvae", "jointvae")


def dvae_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvae_cli", *args]


def single_threaded_env() -> dict[str, str]:
    """Subprocess environment with one torch thread: OpenMP threads on shared, busy cores slow down many-fold."""
    env = {key: value for key, value in os.environ.items() if key != "DVAE_DEBUG"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def write_tiled_dataset(source: Path, out: Path, num_rows: int, image_size: int | None = None) -> Path:
    """A dataset of `num_rows` rows: the source's rows repeated (optionally cropped to `image_size`)."""
    with DatasetFile(source) as dataset:
        images = dataset.read_images()
        take = np.arange(num_rows) % dataset.num_images
        info = dataset.info if image_size is None else replace(dataset.info, image_size=image_size)
        writer = DatasetWriter(out, info, dataset.params)
        try:
            writer.append(DatasetChunk(images=images[take][:, :, :info.image_size, :info.image_size],
                                       labels=dataset.labels[take], factors=dataset.factors[take],
                                       factor_classes=dataset.factor_classes[take]))
            writer.finish(dataset.split[take])
        finally:
            writer.close()
    return out


@pytest.fixture(scope="module")
def codes_files(trained_project, tmp_path_factory) -> dict[str, Path]:
    """Both families' codes files of the trained project's 600-image dataset."""
    folder = tmp_path_factory.mktemp("codes")
    params = load_params(trained_project.params_path)
    files = {}
    for family in FAMILIES:
        paths = EncodePaths(trained_project.dataset, trained_project.model_dir(family), folder / f"{family}.h5")
        result = encode.run(params, family, paths, show_progress=False)
        assert result.num_rows == 600
        files[family] = result.path
    return files


@pytest.fixture(scope="module")
def big_dataset(trained_project, tmp_path_factory) -> Path:
    """20,000 rows (the 600 tiled): enough to take a few seconds to encode."""
    return write_tiled_dataset(trained_project.dataset, tmp_path_factory.mktemp("big") / "dataset.h5", 20_000)


def dataset_images(trained_project) -> torch.Tensor:
    with DatasetFile(trained_project.dataset) as dataset:
        return torch.from_numpy(dataset.read_images()).float() / 255


@pytest.mark.parametrize(("num_values", "dtype"), [
    (2, np.uint8), (256, np.uint8), (257, np.uint16), (65_536, np.uint16), (65_537, np.int32)])
def test_code_dtype_is_the_smallest_that_holds_every_value(num_values, dtype):
    assert code_dtype(num_values) == np.dtype(dtype)
    assert np.iinfo(code_dtype(num_values)).max >= num_values - 1


def test_vqvae_codes_are_the_models_and_decode_to_its_reconstruction(trained_project, codes_files):
    model = load_model(trained_project.model_dir("vqvae"), "vqvae").model
    x = dataset_images(trained_project)
    with h5py.File(codes_files["vqvae"]) as file:
        codes = file["codes"][:]
        assert file["codes"].dtype == np.uint8 and codes.shape == (600, 8, 8)  # K = 16, 32 px / 4
        assert json.loads(file.attrs["model_arrays"]) == ["codebook"] and "codebook" not in file
        assert file.attrs["codebook"].dtype == np.float32
        np.testing.assert_array_equal(file.attrs["codebook"], model.codebook().numpy())
    with CodesFile(codes_files["vqvae"]) as reader:
        np.testing.assert_array_equal(reader.model_arrays["codebook"], model.codebook().numpy())
        assert "codebook" not in reader.attrs
    np.testing.assert_array_equal(codes, model.codes(x).numpy())
    decoded = model.decode({"codes": torch.from_numpy(codes)})
    torch.testing.assert_close(decoded, model.reconstruct(x), atol=1e-6, rtol=0)


def test_jointvae_latents_are_the_models_and_decode_to_its_reconstruction(trained_project, codes_files):
    model = load_model(trained_project.model_dir("jointvae"), "jointvae").model
    x = dataset_images(trained_project)
    expected = model.encode(x)
    with CodesFile(codes_files["jointvae"], family="jointvae") as codes:
        stored = codes.read_rows(0, 600, codes.latent_names)
    assert {name: (array.dtype, array.shape) for name, array in stored.items()} == {
        "continuous_mean": (np.float32, (600, 4)), "continuous_logvar": (np.float32, (600, 4)),
        "discrete_probs": (np.float32, (600, 3)), "discrete": (np.uint8, (600, 1))}
    np.testing.assert_array_equal(stored["discrete"], expected["discrete"].numpy())
    for name in ("continuous_mean", "continuous_logvar", "discrete_probs"):
        np.testing.assert_allclose(stored[name], expected[name].numpy(), atol=1e-6, rtol=0)
    decoded = model.decode({name: torch.from_numpy(array) for name, array in stored.items()})
    torch.testing.assert_close(decoded, model.reconstruct(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_codes_file_describes_itself_and_copies_the_dataset_rows(trained_project, codes_files, family):
    with h5py.File(codes_files[family]) as file, DatasetFile(trained_project.dataset) as dataset:
        attrs = file.attrs
        assert attrs["format"] == "dvae-codes" and attrs["format_version"] == 2 and attrs["model"] == family
        assert attrs["weights_sha256"] == sha256_file(trained_project.model_dir(family) / WEIGHTS)
        assert attrs["dataset_sha256"] == sha256_file(trained_project.dataset)
        assert attrs["dvae_version"] and attrs["precision"] == "fp32"
        if family == "vqvae":
            assert (attrs["num_codes"], attrs["code_dim"], list(attrs["latent_shape"])) == (16, 8, [8, 8])
        else:
            assert (attrs["continuous"], list(attrs["discrete"])) == (4, [3])
        for name in ("split", "labels", "factors", "factor_classes"):
            assert file[name].dtype == getattr(dataset, name).dtype
            np.testing.assert_array_equal(file[name][:], getattr(dataset, name))
        for name, array in file.items():  # every array has one row per dataset row (per-row readers need it)
            assert array.shape[0] == 600, name
            assert array.compression == "gzip" and array.chunks[0] == 600, name  # fewer rows than a chunk


LATENT_COLUMNS = {"vqvae": {"codes"},
                  "jointvae": {"discrete", "discrete_probs", "continuous_mean", "continuous_logvar"}}


@pytest.mark.parametrize("family", FAMILIES)
def test_huggingface_datasets_loads_the_codes_file(codes_files, load_with_datasets, family):
    loaded = load_with_datasets(codes_files[family])
    assert loaded.num_rows == 600
    assert set(loaded.column_names) == LATENT_COLUMNS[family] | {"split", "labels", "factors", "factor_classes"}
    columns = loaded.with_format("numpy")
    with h5py.File(codes_files[family]) as file:
        for name in loaded.column_names:
            np.testing.assert_array_equal(columns[name][:], file[name][:], err_msg=name)


def test_codes_of_a_folder_dataset_keep_each_rows_source_path(trained_project, image_folder, tmp_path,
                                                              load_with_datasets):
    params = load_params(trained_project.params_path)
    dataset = tmp_path / "folder.h5"
    prepare.run(replace(params, data=replace(params.data, dataset="folder", root=str(image_folder), subset=None)),
                prepare.PreparePaths(dataset), show_progress=False)
    paths = EncodePaths(dataset, trained_project.model_dir("vqvae"), tmp_path / "codes.h5")
    codes = encode.run(params, "vqvae", paths, show_progress=False).path
    expected = ["cat/0.png", "cat/1.png", "cat/2.png", "dog/0.png", "dog/1.png"]
    with CodesFile(codes) as reader:
        assert list(reader.source_paths(0, 5)) == expected
        assert reader.row_names() == ["codes", "labels"]  # batches yield tensors only
    assert load_with_datasets(codes)["source_paths"] == expected
    decoded = tmp_path / "decoded.h5"
    decode.run(params, decode.DecodePaths(codes, decoded), "1:4", show_progress=False)
    with DatasetFile(decoded) as dataset:
        assert list(dataset.file["source_paths"].asstr()[:]) == expected[1:4]


def test_reader_yields_lazy_batches_of_a_split(codes_files):
    with h5py.File(codes_files["vqvae"]) as file:
        codes, split, labels = file["codes"][:], file["split"][:], file["labels"][:]
    with CodesFile(codes_files["vqvae"]) as reader:
        assert len(reader) == 600 and reader.family == "vqvae" and reader.attrs["num_codes"] == 16
        batches = list(reader.batches("val", batch_size=7))
        assert all(len(batch["codes"]) == 7 for batch in batches[:-1]) and 1 <= len(batches[-1]["codes"]) <= 7
        assert set(batches[0]) == {"codes", "labels", "factors", "factor_classes"}
        assert batches[0]["codes"].dtype == torch.int64 and batches[0]["factors"].dtype == torch.float32
        np.testing.assert_array_equal(torch.cat([b["codes"] for b in batches]).numpy(), codes[split == 1])
        np.testing.assert_array_equal(torch.cat([b["labels"] for b in batches]).numpy(), labels[split == 1])
        every_row = list(reader.batches(None, batch_size=256, names=["codes"]))
        assert [len(b["codes"]) for b in every_row] == [256, 256, 88]
        with pytest.raises(ValueError, match="split"):
            next(reader.batches("training"))
    with pytest.raises(UserError, match="holds vqvae codes, not jointvae"):
        CodesFile(codes_files["vqvae"], family="jointvae")


def test_decode_to_png_grid_of_upscaled_reconstructions(trained_project, codes_files, tmp_path):
    params = load_params(trained_project.params_path)
    out = tmp_path / "grid.png"
    result = decode.run(params, decode.DecodePaths(codes_files["vqvae"], out), "0:64", show_progress=False)
    assert result.rows == range(64) and result.weights_match
    grid = np.asarray(Image.open(out).convert("L"))
    assert grid.shape == (8 * (64 + 2) + 2,) * 2  # 8 × 8 tiles of 32 px upscaled ×2, 2 px padding
    model = load_model(trained_project.model_dir("vqvae"), "vqvae").model
    first = model.reconstruct(dataset_images(trained_project)[:1])[0, 0]
    upscaled = first.repeat_interleave(2, 0).repeat_interleave(2, 1)
    expected = upscaled.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).numpy()  # render.grid_image's rounding
    np.testing.assert_array_equal(grid[2:66, 2:66], expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_to_dataset_file_readable_by_every_stage(trained_project, codes_files, tmp_path, family):
    params = load_params(trained_project.params_path)
    out = tmp_path / "decoded.h5"
    decode.run(params, decode.DecodePaths(codes_files[family], out), "10:30", show_progress=False)
    model = load_model(trained_project.model_dir(family), family).model
    with DatasetFile(out) as decoded, DatasetFile(trained_project.dataset) as dataset:
        assert decoded.num_images == 20 and decoded.info.image_size == 32
        np.testing.assert_array_equal(decoded.read_images(),
                                      to_uint8(model.reconstruct(dataset_images(trained_project)[10:30])))
        for name in ("split", "labels", "factors", "factor_classes"):
            np.testing.assert_array_equal(getattr(decoded, name), getattr(dataset, name)[10:30])
        assert decoded.info.factor_names == dataset.info.factor_names


@pytest.mark.parametrize(("text", "rows"), [
    (None, range(64)), ("5", range(5, 6)), (":10", range(10)), ("590:", range(590, 600)), ("0:600", range(600))])
def test_rows_option(text, rows):
    assert parse_rows(text, 600) == rows
    assert parse_rows(None, 10) == range(10)


@pytest.mark.parametrize("text", ["a:b", "10:10", "-1:5", "0:601", "600"])
def test_rows_option_rejects(text):
    with pytest.raises(UserError, match="--rows"):
        parse_rows(text, 600)


def test_reader_refuses_other_files(trained_project, codes_files, tmp_path):
    with pytest.raises(UserError, match="format 'dvae-dataset'"):
        CodesFile(trained_project.dataset)
    for change, message in (("version 1", "codes format version 1, this dvae reads version 2"),
                            ("no model_arrays", "incomplete or damaged codes file")):
        damaged = tmp_path / "damaged.h5"
        shutil.copyfile(codes_files["vqvae"], damaged)
        with h5py.File(damaged, "a") as file:
            if change == "version 1":
                file.attrs["format_version"] = 1
            else:
                del file.attrs["model_arrays"]
        with pytest.raises(UserError, match=message):
            CodesFile(damaged)
    with pytest.raises(UserError, match="not found; create it with `dvae encode`"):
        CodesFile(tmp_path / "none.h5")
    with pytest.raises(UserError, match="must end in .png"):
        decode.run(load_params(trained_project.params_path),
                   decode.DecodePaths(codes_files["vqvae"], tmp_path / "x.jpg"))
    assert not (tmp_path / "x.jpg").exists()


# Bad inputs: exit 2, one line on stderr, no output file. All cases run as concurrent subprocesses.

def save_vqvae_variant(trained_project, folder: Path, **changes) -> Path:
    """A VQ-VAE model folder like the trained one, with config `changes` (or, without any, perturbed weights)."""
    loaded = load_model(trained_project.model_dir("vqvae"), "vqvae")
    config = replace(loaded.config, **changes)
    model = get_family("vqvae").model(config, loaded.data) if changes else loaded.model
    if not changes:
        with torch.no_grad():
            model.decoder[0].bias.add_(0.01)
    save_model(folder, "vqvae", model, config, loaded.data, {})
    return folder


def test_bad_inputs_exit_2_with_one_line_and_no_output(trained_project, codes_files, tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as file:
        file["codes"] = np.zeros((4, 8, 8), dtype=np.uint8)
    small_images = write_tiled_dataset(trained_project.dataset, tmp_path / "small.h5", 50, image_size=16)
    other_k = save_vqvae_variant(trained_project, tmp_path / "vqvae-k32", num_codes=32)
    retrained = save_vqvae_variant(trained_project, tmp_path / "vqvae-retrained")
    vq_codes, models = str(codes_files["vqvae"]), trained_project.root / "models"
    dataset = str(trained_project.dataset)
    cases = {
        "foreign file": (["decode", str(foreign)], ["not a dvae codes file", "dvae encode"]),
        "other family's model": (["decode", vq_codes, "--model-dir", str(models / "jointvae")],
                                 ["holds a jointvae model, not vqvae"]),
        "rows out of range": (["decode", vq_codes, "--rows", "590:601"], ["out of range", "600 rows"]),
        "other K": (["decode", vq_codes, "--model-dir", str(other_k)], ["num_codes 32", "num_codes 16"]),
        "other weights": (["decode", vq_codes, "--model-dir", str(retrained)], ["sha256 differs", "--force"]),
        "other image size": (["encode", "--model", "vqvae", "--dataset", str(small_images)],
                             ["1×16×16", "1×32×32"]),
        "missing model": (["encode", "--model", "vqvae", "--dataset", dataset, "--model-dir",
                           str(tmp_path / "none")], ["dvae train --model vqvae"]),
    }
    outs = {name: tmp_path / "out" / f"{index}.{'h5' if args[0] == 'encode' else 'png'}"
            for index, (name, (args, _)) in enumerate(cases.items())}
    processes = {name: subprocess.Popen(dvae_command(*args, "--out", str(outs[name])), cwd=trained_project.root,
                                        env=single_threaded_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
                 for name, (args, _) in cases.items()}
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=120)
        lines = stderr.strip().splitlines()
        assert process.returncode == 2, (name, stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, stderr)
        for fragment in cases[name][1]:
            assert fragment in lines[0], (name, lines[0])
        assert not outs[name].exists(), name
    assert list(tmp_path.rglob("*.tmp-*")) == []

    forced = tmp_path / "forced.png"
    result = subprocess.run(dvae_command("decode", vq_codes, "--model-dir", str(retrained), "--force",
                                         "--out", str(forced)),
                            cwd=trained_project.root, env=single_threaded_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert forced.exists() and "warning" in result.stderr


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_interrupted_encode_leaves_no_output_file(trained_project, big_dataset, tmp_path, stop_signal):
    out = tmp_path / "codes.h5"
    process = subprocess.Popen(
        dvae_command("encode", "--model", "vqvae", "--dataset", str(big_dataset), "--out", str(out),
                     "--batch-size", "32"),
        cwd=trained_project.root, env=single_threaded_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    temporary = out.with_name(f"{out.name}.tmp-{process.pid}")
    while process.poll() is None and not (temporary.exists() and temporary.stat().st_size > 0):
        time.sleep(0.01)
    assert process.poll() is None, "encode finished before it could be interrupted"
    process.send_signal(stop_signal)
    process.communicate(timeout=60)
    assert process.returncode != 0
    assert not out.exists()
    if stop_signal == signal.SIGTERM:
        assert not temporary.exists()  # cleaned up; SIGKILL leaves the temporary file, never `out`


def peak_rss_bytes(args: list[str], cwd: Path) -> int:
    process = subprocess.Popen(args, cwd=cwd, env=single_threaded_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0
    return usage.ru_maxrss * 1024  # kilobytes on Linux


def test_peak_memory_does_not_follow_the_row_count(trained_project, big_dataset, tmp_path):
    small = write_tiled_dataset(trained_project.dataset, tmp_path / "small.h5", 2_000)
    peaks = {}
    for name, dataset in (("small", small), ("big", big_dataset)):
        peaks[name] = peak_rss_bytes(dvae_command("encode", "--model", "vqvae", "--dataset", str(dataset),
                                                  "--out", str(tmp_path / f"{name}-codes.h5")), trained_project.root)
    # 18,000 more images: 18 MB as uint8, 74 MB as float32. Streaming keeps the growth to the per-row labels
    # and factors the dataset reader holds (~1 MB).
    assert peaks["big"] - peaks["small"] < 16e6, peaks

    with h5py.File(tmp_path / "big-codes.h5") as file:
        assert file["codes"].chunks == (ROWS_PER_CHUNK, 8, 8) and file["codes"].compression == "gzip"
        assert file["labels"].chunks == (ROWS_PER_CHUNK,) and file["codes"].shape == (20_000, 8, 8)
        codes = file["codes"][:]
    # Rows 600 apart are the same image: every chunk was written once, in its place.
    np.testing.assert_array_equal(codes[600:1200], codes[:600])
    np.testing.assert_array_equal(codes[19_200:], codes[:800])
