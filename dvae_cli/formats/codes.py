"""The codes file (`data/codes/M.h5`): schema, writer pieces and `CodesFile`, its reader.

It stores whatever the model's `encode` returns, row i for dataset row i: integer arrays in the smallest unsigned
type that holds the model's values, float arrays as float32; beside them the split, labels, factors and source paths
copied from the dataset. Every dataset in the file is per-row, so per-row readers (HF `datasets`' hdf5 loader, a
DataFrame) take the file as it is; the arrays the model stores once (the VQ-VAE codebook) are attributes, listed
in `model_arrays`. Attributes also name the model, the weights' and the dataset's sha256, the latent spec and the
precision it was encoded in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

from dvae_cli import __version__
from dvae_cli.core.errors import UserError
from dvae_cli.core.splits import SPLIT_NAMES
from dvae_cli.core.tensors import as_tensor, float32_if_floating
from dvae_cli.formats.dataset import (
    COMPRESSION,
    COMPRESSION_LEVEL,
    ROW_ARRAYS,
    SOURCE_PATHS,
    DatasetFile,
    DatasetInfo,
    NewHDF5File,
    open_hdf5,
    read_rows,
    unreadable_is_damaged,
)
from dvae_cli.models import FAMILIES
from dvae_cli.models.base import DiscreteVAE

FORMAT = "dvae-codes"
FORMAT_VERSION = 2
CODES_MAKER = "dvae encode"
WRITTEN_BY = "written_by"
"""The attribute naming the command that wrote a codes file, where it is not `CODES_MAKER` (`dvae sample`)."""
ROWS_PER_CHUNK = 1024
CHUNK_BYTES = 1 << 20
"""Chunks hold ROWS_PER_CHUNK rows, fewer when those would pass this size (large code maps)."""
QUEUE_DEPTH = 2
"""Batches the writer thread may lag behind the model."""
COPIED_ARRAYS = ("split", *ROW_ARRAYS)
REQUIRED_ATTRIBUTES = ("model", "model_dir", "weights_sha256", "dataset_sha256", "dataset_info", "latent_arrays",
                       "model_arrays", "image_size", "channels")
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def code_dtype(num_values: int) -> np.dtype:
    """The smallest type for values 0 … num_values − 1: uint8 up to 256 values, uint16 up to 65,536, else int32."""
    if num_values <= 1 << 8:
        return np.dtype(np.uint8)
    if num_values <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


@dataclass(frozen=True)
class ArraySpec:
    """One per-row array of the codes file."""

    name: str
    row_shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def row_bytes(self) -> int:
        return math.prod(self.row_shape) * self.dtype.itemsize


def latent_specs(model: DiscreteVAE, latent: dict[str, Tensor]) -> list[ArraySpec]:
    """The stored form of each array `model.encode` returns: integers in `code_dtype`, floats as float32."""
    most_values = {name: int(np.max(counts)) for name, counts in model.code_value_counts().items()}
    return [ArraySpec(name, tuple(tensor.shape[1:]),
                      np.dtype(np.float32) if tensor.is_floating_point() else code_dtype(most_values[name]))
            for name, tensor in latent.items()]


def chunk_rows(specs: Sequence[ArraySpec], num_rows: int) -> int:
    widest = max(spec.row_bytes for spec in specs)
    return max(1, min(ROWS_PER_CHUNK, CHUNK_BYTES // max(widest, 1), num_rows))


class ChunkedRowWriter:
    """Writes batches of per-row arrays on a background thread, at most QUEUE_DEPTH batches behind the caller.

    Rows must arrive in order; they are written in whole HDF5 chunks, so every chunk is compressed once.
    Call `finish` after the last batch; leaving the `with` block on an error drops what is still queued.
    """

    def __init__(self, datasets: dict[str, h5py.Dataset], specs: Sequence[ArraySpec], first_row: int) -> None:
        self.datasets = datasets
        self.dtypes = {spec.name: spec.dtype for spec in specs}
        self.rows_per_chunk = next(iter(datasets.values())).chunks[0]
        self.pending: dict[str, list[np.ndarray]] = {name: [] for name in datasets}
        self.pending_start = first_row
        self.pending_rows = 0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="dvae-codes-writer")
        self.queued: deque[Future[None]] = deque()

    def __enter__(self) -> ChunkedRowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __call__(self, start: int, latent: dict[str, Tensor]) -> None:
        """Queue one batch: `latent` holds rows [start, start + batch) of every array (on any device)."""
        on_gpu = next(iter(latent.values())).device.type == "cuda"
        # On a GPU the copies to (pinned) host memory run asynchronously; the writer waits for them.
        host = {name: float32_if_floating(latent[name].detach()).to("cpu", non_blocking=on_gpu)
                for name in self.datasets}
        copied: torch.cuda.Event | None = None
        if on_gpu:
            copied = torch.cuda.Event()
            copied.record()
        self.queued.append(self.pool.submit(self._append, start, host, copied))
        while len(self.queued) > QUEUE_DEPTH:
            self.queued.popleft().result()

    def finish(self) -> None:
        self.queued.append(self.pool.submit(self._write_pending, final=True))
        while self.queued:
            self.queued.popleft().result()

    def _append(self, start: int, host: dict[str, Tensor], copied: torch.cuda.Event | None) -> None:
        if copied is not None:
            copied.synchronize()
        if start != self.pending_start + self.pending_rows:
            raise ValueError(f"rows must arrive in order: expected row {self.pending_start + self.pending_rows}, "
                             f"got {start}")
        for name, tensor in host.items():
            self.pending[name].append(tensor.numpy().astype(self.dtypes[name], copy=False))
        self.pending_rows += len(next(iter(host.values())))
        self._write_pending(final=False)

    def _write_pending(self, final: bool) -> None:
        """Write the pending rows up to the last chunk boundary (all of them when `final`)."""
        end = self.pending_start + self.pending_rows
        if not final:
            end = end // self.rows_per_chunk * self.rows_per_chunk
        count = end - self.pending_start
        if count <= 0:
            return
        for name, parts in self.pending.items():
            rows = np.concatenate(parts) if len(parts) > 1 else parts[0]
            self.datasets[name][self.pending_start:end] = rows[:count]
            self.pending[name] = [rows[count:]] if count < len(rows) else []
        self.pending_start, self.pending_rows = end, self.pending_rows - count


def _attribute(value: object) -> object:
    """Lists become int64 arrays (h5py stores them natively); scalars stay as they are."""
    return np.asarray(value, dtype=np.int64) if isinstance(value, list) else value


@dataclass(frozen=True)
class CodesHeader:
    """What a codes file says about where its codes come from (its attributes)."""

    family: str
    model_dir: Path
    weights_sha256: str
    dataset: Path
    dataset_sha256: str
    dataset_info: DatasetInfo
    precision: str
    """fp32 | bf16 | fp16: the autocast the codes were encoded under."""
    latent_attributes: dict[str, object]
    """The model's `latent_attributes()` (latent shape, K and D, or the latent spec)."""
    written_by: str = CODES_MAKER


def new_codes_file(path: Path) -> h5py.File:
    """An empty HDF5 file for `create_codes_file`, in HDF5 1.8's format: the first with dense attribute storage,
    which attributes over 64 KiB need (a codebook of K = 512, D = 64 is 128 KiB)."""
    return NewHDF5File(path, libver=("v108", "v108"))


def copied_arrays(dataset: DatasetFile) -> dict[str, np.ndarray]:
    """The dataset's per-row arrays a codes file keeps: the split, and labels and factors when present."""
    return {name: values for name in COPIED_ARRAYS if (values := getattr(dataset, name)) is not None}


def create_codes_file(file: h5py.File, header: CodesHeader, copied: dict[str, np.ndarray], model: DiscreteVAE,
                      specs: Sequence[ArraySpec], rows_per_chunk: int, source_paths: h5py.Dataset | None = None
                      ) -> dict[str, h5py.Dataset]:
    """Write the attributes (the model's once-only arrays among them), the `copied` per-row arrays (`split` among them)
    and `source_paths` into a `new_codes_file`; returns its empty, compressed latent arrays (one per spec) for a
    `ChunkedRowWriter` to fill."""
    attrs = file.attrs
    attrs["format"] = FORMAT
    attrs["format_version"] = FORMAT_VERSION
    attrs["model"] = header.family
    attrs["model_dir"] = str(header.model_dir)
    attrs["weights_sha256"] = header.weights_sha256
    attrs["dataset"] = str(header.dataset)
    attrs["dataset_sha256"] = header.dataset_sha256
    attrs["dataset_info"] = json.dumps(dataclasses.asdict(header.dataset_info))
    attrs["image_size"] = header.dataset_info.image_size
    attrs["channels"] = header.dataset_info.channels
    attrs["latent_arrays"] = json.dumps([spec.name for spec in specs])
    model_arrays = model.extra_arrays()
    attrs["model_arrays"] = json.dumps(list(model_arrays))
    attrs["precision"] = header.precision
    attrs["dvae_version"] = __version__
    if header.written_by != CODES_MAKER:
        attrs[WRITTEN_BY] = header.written_by
    for key, value in header.latent_attributes.items():
        attrs[key] = _attribute(value)
    for name, tensor in model_arrays.items():
        attrs[name] = tensor.detach().cpu().float().numpy()
    compression = {"compression": COMPRESSION, "compression_opts": COMPRESSION_LEVEL}
    for name, values in copied.items():
        file.create_dataset(name, data=values, chunks=(rows_per_chunk, *values.shape[1:]), **compression)
    if source_paths is not None:
        source_paths.file.copy(source_paths, file, name=SOURCE_PATHS)
    return create_latent_datasets(file, specs, len(copied["split"]), rows_per_chunk, **compression)


def create_latent_datasets(file: h5py.File, specs: Sequence[ArraySpec], num_rows: int, rows_per_chunk: int,
                            **storage: Any) -> dict[str, h5py.Dataset]:
    return {spec.name: file.create_dataset(spec.name, shape=(num_rows, *spec.row_shape), dtype=spec.dtype,
                                           chunks=(rows_per_chunk, *spec.row_shape), **storage)
            for spec in specs}


def _plain(value: Any) -> Any:
    """HDF5 attribute values as plain Python (arrays → lists, numpy scalars → numbers)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class CodesFile:
    """A validated, open codes file: attributes, and its arrays read lazily as torch tensors.

    >>> with CodesFile("data/codes/vqvae.h5") as codes:
    ...     codebook = codes.model_arrays["codebook"]   # float32 [K, D]
    ...     for batch in codes.batches("train", batch_size=256):
    ...         tokens = batch["codes"]        # int64 [256, h, w]
    ...         labels = batch.get("labels")   # int64 [256], when the dataset has classes
    """

    def __init__(self, path: Path | str, family: str | None = None) -> None:
        self.path = Path(path)
        self.file = open_hdf5(self.path, FORMAT, FORMAT_VERSION, "codes", CODES_MAKER)
        try:
            with unreadable_is_damaged(self.path, CODES_MAKER):
                self.model_arrays: dict[str, np.ndarray] = self._read_model_arrays()
                """The arrays the model stores once (VQ-VAE: `codebook`, float32 [K, D])."""
                self.attrs: dict[str, Any] = {key: _plain(value) for key, value in self.file.attrs.items()
                                              if key not in self.model_arrays}
                self.latent_names, self.dataset_info = self._validate(family)
                self.split: np.ndarray = self.file["split"][:]
        except BaseException:
            self.file.close()
            raise

    def _damaged(self) -> UserError:
        return UserError(f"{self.path} is an incomplete or damaged codes file; re-run `dvae encode`")

    def _read_model_arrays(self) -> dict[str, np.ndarray]:
        try:
            names = json.loads(self.file.attrs["model_arrays"])
            arrays = {str(name): np.asarray(self.file.attrs[name]) for name in names}
        except (KeyError, ValueError, TypeError):
            raise self._damaged() from None
        if any(array.dtype.kind not in "fiu" for array in arrays.values()):
            raise self._damaged()
        return arrays

    def _validate(self, family: str | None) -> tuple[list[str], DatasetInfo]:
        broken = self._damaged()
        if any(key not in self.attrs for key in REQUIRED_ATTRIBUTES):
            raise broken
        try:
            found = str(self.attrs["model"])
            names = [str(name) for name in json.loads(self.attrs["latent_arrays"])]
            info = DatasetInfo.from_fields(json.loads(self.attrs["dataset_info"]))
        except (KeyError, ValueError, TypeError, AttributeError):
            raise broken from None
        if found not in FAMILIES:
            raise UserError(f"{self.path} holds codes of unknown model family {found!r}; re-run `dvae encode`")
        if family is not None and found != family:
            raise UserError(f"{self.path} holds {found} codes, not {family}; pass the {family} codes file "
                            f"(`dvae encode --model {family}` writes it)")
        if "split" not in self.file or not names or any(name not in self.file for name in names):
            raise broken
        num_rows = self.file["split"].shape[0]
        copied = [*self.dataset_row_names(), *([SOURCE_PATHS] if SOURCE_PATHS in self.file else [])]
        if any(self.file[name].shape[0] != num_rows for name in (*names, *copied)):
            raise broken
        for name in ("labels", "factor_classes"):
            if name in self.file and self.file[name].dtype.kind not in "iu":
                raise UserError(f"{self.path}: `{name}` are {self.file[name].dtype}, not integers; re-create the file "
                                f"with `{CODES_MAKER}`")
        return names, info

    @property
    def family(self) -> str:
        return str(self.attrs["model"])

    @property
    def model_dir(self) -> Path:
        """The model folder that wrote the codes, as `dvae encode` was given it."""
        return Path(self.attrs["model_dir"])

    def __len__(self) -> int:
        return len(self.split)

    def dataset_row_names(self) -> list[str]:
        """The per-row arrays copied from the dataset besides the split: labels, factors, factor_classes (if any)."""
        return [name for name in ROW_ARRAYS if name in self.file]

    def row_names(self) -> list[str]:
        """The per-row arrays `batches` yields by default: the latent arrays, then labels and factors when present."""
        return [*self.latent_names, *self.dataset_row_names()]

    def read_rows(self, start: int, stop: int, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Rows [start, stop) of the named arrays (default: `row_names()`), as stored."""
        with unreadable_is_damaged(self.path, CODES_MAKER):
            return {name: self.file[name][start:stop] for name in (self.row_names() if names is None else names)}

    def source_paths(self, start: int, stop: int) -> np.ndarray | None:
        """The source files (str, relative to the dataset's root) of rows [start, stop); None unless the dataset
        came from an image folder."""
        with unreadable_is_damaged(self.path, CODES_MAKER):
            return self.file[SOURCE_PATHS].asstr()[start:stop] if SOURCE_PATHS in self.file else None

    def read_at(self, name: str, rows: np.ndarray) -> np.ndarray | None:
        """Array `name` at sorted `rows`, as stored; None when the file has no such array."""
        with unreadable_is_damaged(self.path, CODES_MAKER):
            return read_rows(self.file[name], rows) if name in self.file else None

    def batches(self, split: str | None = "train", batch_size: int = 1024,
                names: Sequence[str] | None = None) -> Iterator[dict[str, Tensor]]:
        """Batches of the rows of `split` (train | val | test; None: every row) in file order, read lazily.

        Integer arrays come as int64, the rest as float32; the last batch may be smaller.
        """
        if split is not None and split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {', '.join(SPLIT_NAMES)} or None, not {split!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        names = list(names or self.row_names())
        wanted = np.ones(len(self), dtype=bool) if split is None else self.split == SPLIT_NAMES.index(split)
        block = max(batch_size, ROWS_PER_CHUNK)
        buffered: dict[str, np.ndarray] | None = None
        for start in range(0, len(self), block):
            mask = wanted[start:start + block]
            if not mask.any():
                continue
            arrays = {name: values[mask] for name, values in self.read_rows(start, start + block, names).items()}
            buffered = arrays if buffered is None else {
                name: np.concatenate([buffered[name], arrays[name]]) for name in names}
            while len(buffered[names[0]]) >= batch_size:
                yield {name: as_tensor(values[:batch_size]) for name, values in buffered.items()}
                buffered = {name: values[batch_size:] for name, values in buffered.items()}
        if buffered is not None and len(buffered[names[0]]):
            yield {name: as_tensor(values) for name, values in buffered.items()}

    def check_codebook(self, model: DiscreteVAE, model_dir: Path) -> str:
        """The codebook hash (`model_arrays_sha256`) of these codes; a UserError unless it is `model`'s."""
        found, expected = model_arrays_sha256(self.model_arrays), model_codebook_sha256(model)
        if found != expected:
            raise UserError(f"{self.path} holds codes of another {self.family} (codebook hash {found[:12]}…, "
                            f"{model_dir} has {expected[:12]}…); re-run `dvae encode --model {self.family}` or pass "
                            "that model's codes file")
        return found

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> CodesFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def model_codebook_sha256(model: DiscreteVAE) -> str:
    """`model_arrays_sha256` of the arrays `model` would store (compared with a codes file's or a prior's)."""
    arrays = model.extra_arrays()
    return model_arrays_sha256({name: tensor.detach().cpu().float().numpy() for name, tensor in arrays.items()})


def model_arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    """One hash of the arrays a model stores once (the VQ-VAE codebook), as float32 in name order: what tells the
    codes of one model from another's."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode() + b"\0" + np.ascontiguousarray(arrays[name], dtype=np.float32).tobytes())
    return digest.hexdigest()
