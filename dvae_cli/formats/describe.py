"""What a dvae file holds, for `dvae info`: a dataset, codes file, model folder, prior folder or checkpoint,
recognized by its content and read by the same checked readers the commands use (so a damaged or foreign file is
the same one-line error), described as plain data (JSON-able, in reading order)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dvae_cli.core.errors import UserError
from dvae_cli.core.files import sha256_file
from dvae_cli.core.splits import SPLIT_NAMES
from dvae_cli.formats import codes, dataset
from dvae_cli.formats.checkpoint import read_checkpoint
from dvae_cli.formats.model_folder import CONFIG, load_model, load_prior
from dvae_cli.models.prior import PRIOR

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"
"""torch.save writes a zip archive: a checkpoint starts so."""
WHAT = "a dataset, codes file, model or prior folder, or checkpoint"


@dataclass(frozen=True)
class Description:
    path: Path
    kind: str
    """dataset file | codes file | model folder | prior folder | checkpoint."""
    fields: dict[str, Any]
    """Name → value (numbers, strings, lists, nested sections)."""

    def as_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "kind": self.kind, **self.fields}


def describe(path: Path) -> Description:
    if not path.exists():
        raise UserError(f"{path} does not exist; pass {WHAT}")
    if path.is_dir():
        if not (path / CONFIG).is_file():
            raise UserError(f"{path} is a folder without {CONFIG}, so no model or prior folder; pass {WHAT}")
        return _folder(path)
    with open(path, "rb") as stream:
        signature = stream.read(8)
    if signature == HDF5_SIGNATURE:
        return _hdf5(path)
    if signature.startswith(ZIP_SIGNATURE):
        return _checkpoint(path)
    raise UserError(f"{path} is no dvae file ({'empty' if not signature else 'neither HDF5 nor a checkpoint'}); "
                    f"pass {WHAT}")


def _split_rows(split: np.ndarray) -> dict[str, int]:
    return {name: int((split == index).sum()) for index, name in enumerate(SPLIT_NAMES)}


def _arrays(file: h5py.File) -> dict[str, str]:
    return {name: f"{item.dtype} {list(item.shape)}" for name, item in file.items() if isinstance(item, h5py.Dataset)}


def _dataset_info(info: dataset.DatasetInfo) -> dict[str, Any]:
    return {"source": info.source, "image shape": [info.channels, info.image_size, info.image_size],
            "classes": list(info.class_names) or info.num_classes, "factors": dict(zip(info.factor_names,
                                                                                        info.factor_sizes))}


def _hdf5(path: Path) -> Description:
    if not dataset.headers_end(path):
        raise UserError(f"{path} is damaged, reading its HDF5 headers does not end; re-create it with the command "
                        "that wrote it")
    try:
        with h5py.File(path, "r") as file:
            found = file.attrs.get("format")
    except (OSError, ValueError, KeyError, RuntimeError):
        raise UserError(f"{path} is an HDF5 file whose header cannot be read (truncated or damaged); re-create it "
                        "with the command that wrote it") from None
    if found not in (codes.FORMAT, dataset.FORMAT):
        raise UserError(f"{path} is an HDF5 file but no dvae dataset or codes file (format {found!r}); pass {WHAT}")
    if found == codes.FORMAT:
        with codes.CodesFile(path) as opened:
            attrs = opened.attrs
            return Description(path, "codes file", {
                "family": opened.family, "rows": len(opened), "rows per split": _split_rows(opened.split),
                "arrays": _arrays(opened.file),
                "model arrays": {name: f"{array.dtype} {list(array.shape)}"
                                 for name, array in opened.model_arrays.items()},
                "dataset": _dataset_info(opened.dataset_info),
                "written by": str(attrs.get(codes.WRITTEN_BY, codes.CODES_MAKER)),
                "model folder": str(opened.model_dir), "weights sha256": attrs.get("weights_sha256"),
                "dataset file": attrs.get("dataset"), "dataset sha256": attrs.get("dataset_sha256"),
                "precision": attrs.get("precision"), "dvae version": attrs.get("dvae_version")})
    with dataset.DatasetFile(path) as opened:
        return Description(path, "dataset file", {
            "rows": opened.num_images, "rows per split": _split_rows(opened.split), "arrays": _arrays(opened.file),
            **_dataset_info(opened.info), "made with": opened.params, "sha256": sha256_file(path)})


def _folder(path: Path) -> Description:
    try:
        record = json.loads((path / CONFIG).read_text())
        is_prior = isinstance(record, dict) and record.get("family") == PRIOR.name
    except (json.JSONDecodeError, UnicodeDecodeError):
        is_prior = False  # load_model words the error
    if is_prior:
        prior = load_prior(path, record.get("prior_of"))
        return Description(path, "prior folder", {
            "prior of": record["prior_of"], "config": dataclasses.asdict(prior.config),
            "code maps": prior.maps.record(), "parameters": _parameters(prior.model),
            "weights sha256": record["weights_sha256"], "codes file": record.get("codes"),
            "codes sha256": record.get("codes_sha256"), "codebook sha256": record.get("codebook_sha256"),
            "model folder": record.get("model_dir"), "dataset sha256": record.get("dataset_sha256"),
            "steps": record.get("steps"), "test": record.get("test"), "final metrics": record.get("final_metrics")})
    loaded = load_model(path)
    record = loaded.record
    return Description(path, "model folder", {
        "family": loaded.family, "config": dataclasses.asdict(loaded.config), "data": dataclasses.asdict(loaded.data),
        "parameters": _parameters(loaded.model), "weights sha256": loaded.weights_sha256,
        "dataset sha256": record.get("dataset_sha256"), "seed": record.get("seed"), "steps": record.get("steps"),
        **({"reference": {key: value for key, value in record["reference"].items() if key != "specs"}}
           if isinstance(record.get("reference"), dict) else {}),
        "final metrics": record.get("final_metrics"), "dvae version": record.get("dvae_version")})


def _parameters(model: Any) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def _checkpoint(path: Path) -> Description:
    state = read_checkpoint(path)
    return Description(path, "checkpoint", {
        "family": state["family"], "format version": state.get("format_version"), "step": state.get("step"),
        "curve rows": len(state.get("history", [])), "fingerprint": state.get("fingerprint"),
        "model tensors": len(state.get("model", {}))})
