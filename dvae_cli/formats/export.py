"""The folders `dvae export` writes, for tools other than dvae. A model folder's encoder (images → codes) and
decoder (codes → images) as `torch.export` programs, and as ONNX with the `onnx` extra; a codes file as a Hugging
Face `datasets` folder (`save_to_disk`) that keeps the class names, the codebook and the hashes tying it to its model
and data."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dvae_cli.core.errors import UserError
from dvae_cli.core.files import atomic_path, check_output, write_json_atomic
from dvae_cli.core.progress import Advance, progress_bar
from dvae_cli.core.splits import SPLIT_NAMES
from dvae_cli.formats.codes import CodesFile
from dvae_cli.formats.model_folder import (
    CONFIG,
    WEIGHTS,
    LoadedModel,
    load_model,
    model_files,
)

EXPORT_FORMAT = "dvae-export"
MANIFEST = "export.json"
PROBE_ROWS = 4
"""Rows of the example batch the programs are traced with and checked on (any batch size runs afterwards)."""
ONNX_MODULES = ("onnx", "onnxruntime", "onnxscript")
ONNX_EXTRA = "pip install 'dvae[onnx]'"
JSON_ATTRIBUTES = ("dataset_info", "latent_arrays", "model_arrays")
"""Codes-file attributes that hold JSON text (the export's info holds them as JSON values)."""


@dataclass(frozen=True)
class ExportPaths:
    source: Path
    """A model folder or a codes file."""
    out: Path
    """The folder to write (it must not exist, unless --force)."""

    @classmethod
    def of(cls, source: Path, out: Path | None = None) -> ExportPaths:
        """The default output: exports/NAME for a model folder, exports/NAME-codes for a codes file."""
        return cls(source, out or Path("exports") / (source.name if source.is_dir() else f"{source.stem}-codes"))


@dataclass(frozen=True)
class ExportResult:
    out: Path
    what: str
    """What was exported, in words."""
    files: list[str]
    """The files written, relative to `out`."""
    checks: dict[str, float]
    """Each program's largest absolute difference from the model on the example batch (codes: share that differ)."""
    seconds: float


def onnx_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ONNX_MODULES)


class ExportedEncoder(nn.Module):
    """images float [N, C, H, W] in [0, 1] → the codes file's arrays, in `names` order (what `dvae encode` stores)."""

    def __init__(self, network: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.network, self.names = network, names

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        latent = self.network.encode(images)
        return tuple(latent[name] for name in self.names)


class ExportedDecoder(nn.Module):
    """The arrays `decode` reads, in `names` order (integers as int64) → images float [N, C, H, W] in [0, 1]."""

    def __init__(self, network: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.network, self.names = network, names

    def forward(self, *arrays: Tensor) -> Tensor:
        return self.network.decode(dict(zip(self.names, arrays, strict=True)))


def _array_record(name: str, example: Tensor) -> dict[str, object]:
    return {"name": name, "dtype": str(example.dtype).removeprefix("torch."), "shape": ["N", *example.shape[1:]]}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print progress and warn about their internals; a command shows its own summary instead."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _largest_difference(expected: Tensor, found: Tensor) -> float:
    if expected.is_floating_point():
        return float((expected.float() - found.float()).abs().max())
    return float((expected != found).float().mean())


def export_model(loaded: LoadedModel, model_dir: Path, folder: Path, onnx: bool,
                 advance: Advance) -> tuple[list[str], dict[str, float]]:
    """Write the encoder and decoder programs of `loaded` (on the CPU, float32) and export.json into `folder`;
    `advance()` after each program format (torch.export, ONNX)."""
    network = loaded.model.to("cpu").eval()
    data = loaded.data
    images = torch.rand((PROBE_ROWS, data.channels, data.image_size, data.image_size),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latent = network.encode(images)
    encoder = ExportedEncoder(network, tuple(latent))
    decoder = ExportedDecoder(network, network.decode_inputs())
    decoder_inputs = tuple(latent[name] for name in decoder.names)
    with torch.no_grad():
        expected_images = network.decode(latent)
    batch = torch.export.Dim("batch")
    encoder_shapes, decoder_shapes = ({0: batch},), (tuple({0: batch} for _ in decoder_inputs),)
    files, checks = [], {}
    with _quiet(), torch.no_grad():
        programs = {"encoder": torch.export.export(encoder, (images,), dynamic_shapes=encoder_shapes),
                    "decoder": torch.export.export(decoder, decoder_inputs, dynamic_shapes=decoder_shapes)}
    for name, program in programs.items():
        torch.export.save(program, folder / f"{name}.pt2")
        files.append(f"{name}.pt2")
    reloaded = {name: torch.export.load(folder / f"{name}.pt2").module() for name in programs}
    with torch.no_grad():
        found = reloaded["encoder"](images)
        checks["encoder.pt2"] = max(_largest_difference(latent[n], f) for n, f in zip(encoder.names, found))
        checks["decoder.pt2"] = _largest_difference(expected_images, reloaded["decoder"](*decoder_inputs))
    advance()
    if onnx:
        files += _export_onnx(encoder, decoder, images, decoder_inputs, encoder_shapes, decoder_shapes, folder)
        checks |= _check_onnx(folder, encoder.names, decoder.names, images, latent, expected_images)
        advance()
    manifest = {
        "format": EXPORT_FORMAT,
        "family": loaded.family,
        "model_dir": str(model_dir),
        "weights_sha256": loaded.weights_sha256,
        "latent": network.latent_attributes(),
        "data": asdict(data),
        "encoder": {"inputs": [{**_array_record("images", images), "range": [0, 1]}],
                    "outputs": [_array_record(name, latent[name]) for name in encoder.names]},
        "decoder": {"inputs": [_array_record(name, latent[name]) for name in decoder.names],
                    "outputs": [{**_array_record("images", expected_images), "range": [0, 1]}]},
        "programs": files,
        "torch": torch.__version__,
    }
    write_json_atomic(folder / MANIFEST, manifest)
    return [*files, MANIFEST], checks


def _export_onnx(encoder: ExportedEncoder, decoder: ExportedDecoder, images: Tensor,
                 decoder_inputs: tuple[Tensor, ...], encoder_shapes: tuple, decoder_shapes: tuple,
                 folder: Path) -> list[str]:
    with _quiet(), torch.no_grad():
        torch.onnx.export(encoder, (images,), folder / "encoder.onnx", input_names=["images"],
                          output_names=list(encoder.names), dynamic_shapes=encoder_shapes, dynamo=True,
                          external_data=False)
        torch.onnx.export(decoder, decoder_inputs, folder / "decoder.onnx", input_names=list(decoder.names),
                          output_names=["images"], dynamic_shapes=decoder_shapes, dynamo=True,
                          external_data=False)
    return ["encoder.onnx", "decoder.onnx"]


def _check_onnx(folder: Path, encoder_names: tuple[str, ...], decoder_names: tuple[str, ...], images: Tensor,
                latent: dict[str, Tensor], expected_images: Tensor) -> dict[str, float]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    encoder = onnxruntime.InferenceSession(folder / "encoder.onnx", options, providers=["CPUExecutionProvider"])
    decoder = onnxruntime.InferenceSession(folder / "decoder.onnx", options, providers=["CPUExecutionProvider"])
    found = encoder.run(list(encoder_names), {"images": images.numpy()})
    decoded = decoder.run(["images"], {name: latent[name].numpy() for name in decoder_names})[0]
    return {"encoder.onnx": max(_largest_difference(latent[name], torch.from_numpy(array))
                                for name, array in zip(encoder_names, found)),
            "decoder.onnx": _largest_difference(expected_images, torch.from_numpy(decoded))}


def _features(codes: CodesFile) -> tuple[dict[str, np.ndarray], object]:
    """Every per-row array of `codes` (latent, split, labels, factors, source paths) and its HF `Features`."""
    from datasets import Array2D, Array3D, ClassLabel, Features, List, Value

    def feature(values: np.ndarray) -> object:
        value_type = str(values.dtype)
        if values.ndim == 1:
            return Value(value_type)
        if values.ndim == 2:
            return List(Value(value_type), length=values.shape[1])
        array_type = {3: Array2D, 4: Array3D}.get(values.ndim)
        if array_type is None:
            raise UserError(f"{codes.path}: arrays of {values.ndim - 1} dimensions per row have no HF feature; "
                            "export a codes file `dvae encode` wrote")
        return array_type(shape=values.shape[1:], dtype=value_type)

    info = codes.dataset_info
    columns = codes.read_rows(0, len(codes))
    features = {name: feature(values) for name, values in columns.items()}
    if "labels" in columns:
        names = list(info.class_names) or [str(index) for index in range(info.num_classes)]
        outside = (columns["labels"] < 0) | (columns["labels"] >= len(names))
        if outside.any():
            raise UserError(f"{codes.path}: label {columns['labels'][outside][0]} lies outside the {len(names)} "
                            "classes its dataset names; re-create it with `dvae encode`")
        features["labels"] = ClassLabel(names=names)
        columns["labels"] = columns["labels"].astype(np.int64)
    paths = codes.source_paths(0, len(codes))
    if paths is not None:
        columns["source_path"] = np.asarray(paths, dtype=object)
        features["source_path"] = Value("string")
    return columns, Features(features)


def export_codes(codes: CodesFile, folder: Path) -> list[str]:
    """A `DatasetDict` with one dataset per split that has rows, written by `save_to_disk` into `folder`."""
    from datasets import Dataset, DatasetDict, DatasetInfo

    columns, features = _features(codes)
    split = codes.split[:]
    record = {key: json.loads(value) if key in JSON_ATTRIBUTES else value for key, value in codes.attrs.items()}
    record |= {"codes_file": str(codes.path), **{name: array.tolist() for name, array in codes.model_arrays.items()}}
    checksums = {str(codes.model_dir / WEIGHTS): {"checksum": record["weights_sha256"]},
                 str(record.get("dataset")): {"checksum": record["dataset_sha256"]}}
    splits = {}
    for index, name in enumerate(SPLIT_NAMES):
        rows = np.flatnonzero(split == index)
        if len(rows):
            info = DatasetInfo(description=json.dumps(record), dataset_name=f"dvae-{codes.family}-codes",
                               features=features, download_checksums=checksums)
            table = {column: values[rows] for column, values in columns.items()}
            splits[name] = Dataset.from_dict(table, features=features, info=info, split=name)
    with _quiet():
        DatasetDict(splits).save_to_disk(str(folder))
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def export(paths: ExportPaths, onnx: bool | None = None, force: bool = False,
           show_progress: bool = True) -> ExportResult:
    """Export the model folder or codes file at `paths.source` into the new folder `paths.out`.

    `onnx`: True requires the ONNX programs (and the `onnx` extra), False leaves them out, None writes them when
    the extra is installed.
    """
    started = time.perf_counter()
    source, out = paths.source, paths.out
    if not source.exists():
        raise UserError(f"{source} does not exist; pass a model folder (models/M) or a codes file (data/codes/M.h5)")
    is_model = source.is_dir()
    if is_model and not (source / CONFIG).is_file():
        raise UserError(f"{source} is no model folder (it has no {CONFIG}); dvae export takes a model folder "
                        "(models/M) or a codes file (data/codes/M.h5)")
    check_output(out, model_files(source) if is_model else [source], folder=True)
    if out.exists() and not force:
        raise UserError(f"--out {out} already exists; choose a new folder, or pass --force to replace it")
    if is_model:
        available = onnx_available()
        if onnx and not available:
            raise UserError(f"ONNX export needs the packages {', '.join(ONNX_MODULES)}: {ONNX_EXTRA}")
        with_onnx = available if onnx is None else onnx
        loaded = load_model(source)
        with atomic_path(out) as tmp, progress_bar(f"export {loaded.family}", 1 + with_onnx, enabled=show_progress,
                                                   unit="format") as advance:
            tmp.mkdir()
            files, checks = export_model(loaded, source, tmp, with_onnx, advance)
        what = f"{loaded.family} encoder and decoder" + (" (torch.export and ONNX)" if with_onnx else
                                                         " (torch.export)")
    else:
        if importlib.util.find_spec("datasets") is None:
            raise UserError("exporting codes needs Hugging Face datasets: pip install datasets")
        with CodesFile(source) as codes, atomic_path(out) as tmp:
            files, checks = export_codes(codes, tmp), {}
            what = f"{codes.family} codes of {len(codes):,} rows as a Hugging Face datasets folder"
    return ExportResult(out=out, what=what, files=files, checks=checks, seconds=time.perf_counter() - started)
