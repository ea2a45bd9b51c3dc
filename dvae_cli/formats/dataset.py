"""The dataset file (`data/prepared/dataset.h5`): the one format every stage after prepare-data reads.

| name | type | shape |
| images | uint8 | [N, C, H, W], chunked by whole images, compressed |
| split | uint8 | [N]: 0 train, 1 val, 2 test |
| labels | int64 | [N], when the source has classes |
| factors / factor_classes | float32 / int64 | [N, F], when the source has ground-truth factors |
| source_paths | variable-length UTF-8 str | [N], when the source is files: each row's file, relative to its root |
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dvae_cli.core.errors import UserError
from dvae_cli.core.splits import evaluation_split

FORMAT = "dvae-dataset"
FORMAT_VERSION = 1
IMAGES_PER_CHUNK = 64
COMPRESSION = "gzip"
COMPRESSION_LEVEL = 1
ROWS_PER_READ = 16384
"""Rows read at a time when gathering scattered rows."""
ROW_ARRAYS = ("labels", "factors", "factor_classes")
"""The numeric per-row arrays a dataset file may hold beside the images and the split."""
SOURCE_PATHS = "source_paths"
DATASET_MAKER = "dvae prepare-data"


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset file says about itself (its attributes)."""

    source: str
    image_size: int
    channels: int
    num_classes: int = 0
    class_names: tuple[str, ...] = ()
    factor_names: tuple[str, ...] = ()
    factor_sizes: tuple[int, ...] = ()

    @property
    def has_labels(self) -> bool:
        return self.num_classes > 0

    @property
    def has_factors(self) -> bool:
        return len(self.factor_names) > 0

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> DatasetInfo:
        """From `dataclasses.asdict` of one, as JSON gives it back (lists for the tuples)."""
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in fields.items()})


@dataclass
class DatasetChunk:
    """Consecutive rows of a dataset, as a source delivers them."""

    images: np.ndarray
    labels: np.ndarray | None = None
    factors: np.ndarray | None = None
    factor_classes: np.ndarray | None = None
    source_paths: Sequence[str] | None = None
    source_rows: np.ndarray | None = None
    """The source's row of each image, where a source drops rows it cannot read (None: the rows asked for)."""

    def __len__(self) -> int:
        return len(self.images)


class DatasetWriter:
    """Streams chunks into a new dataset file; `finish` writes the split and the attributes.

    The first chunk decides whether the file keeps source paths: when it carries them, every chunk must.
    """

    def __init__(self, path: Path, info: DatasetInfo, params: dict[str, Any]) -> None:
        self.info = info
        self.file = NewHDF5File(path)
        shape = (info.channels, info.image_size, info.image_size)
        self.images = self.file.create_dataset(
            "images", shape=(0, *shape), maxshape=(None, *shape), dtype=np.uint8,
            chunks=(IMAGES_PER_CHUNK, *shape), compression=COMPRESSION, compression_opts=COMPRESSION_LEVEL)
        self.labels = self._rows("labels", (), np.int64) if info.has_labels else None
        num_factors = len(info.factor_names)
        self.factors = self._rows("factors", (num_factors,), np.float32) if info.has_factors else None
        self.factor_classes = self._rows("factor_classes", (num_factors,), np.int64) if info.has_factors else None
        self.source_paths: h5py.Dataset | None = None
        self.params = params
        self.num_rows = 0

    def _rows(self, name: str, row_shape: tuple[int, ...], dtype: Any) -> h5py.Dataset:
        return self.file.create_dataset(name, shape=(0, *row_shape), maxshape=(None, *row_shape), dtype=dtype,
                                        chunks=(4096, *row_shape), compression=COMPRESSION,
                                        compression_opts=COMPRESSION_LEVEL)

    def append(self, chunk: DatasetChunk) -> None:
        start, stop = self.num_rows, self.num_rows + len(chunk)
        if start == 0 and chunk.source_paths is not None and self.source_paths is None:
            self.source_paths = self._rows(SOURCE_PATHS, (), h5py.string_dtype())
        paths = None if chunk.source_paths is None else np.array(chunk.source_paths, dtype=object)
        for dataset, rows in ((self.images, chunk.images), (self.labels, chunk.labels),
                              (self.factors, chunk.factors), (self.factor_classes, chunk.factor_classes),
                              (self.source_paths, paths)):
            if dataset is not None:
                dataset.resize(stop, axis=0)
                dataset[start:stop] = rows
        self.num_rows = stop
        self.file.check_writes()

    def finish(self, split: np.ndarray) -> None:
        if len(split) != self.num_rows:
            raise ValueError(f"split has {len(split)} rows for {self.num_rows} images")
        self.file.create_dataset("split", data=split.astype(np.uint8), chunks=True, compression=COMPRESSION,
                                 compression_opts=COMPRESSION_LEVEL)
        info = self.info
        attrs = self.file.attrs
        attrs["format"] = FORMAT
        attrs["format_version"] = FORMAT_VERSION
        attrs["source"] = info.source
        attrs["image_size"] = info.image_size
        attrs["channels"] = info.channels
        attrs["num_classes"] = info.num_classes
        attrs["class_names"] = json.dumps(list(info.class_names))
        attrs["factor_names"] = json.dumps(list(info.factor_names))
        attrs["factor_sizes"] = json.dumps(list(info.factor_sizes))
        attrs["params"] = json.dumps(self.params, sort_keys=True)
        self.file.close()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


class DatasetFile:
    """A validated, open dataset file. Small per-row arrays are read eagerly; images on demand."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.file = open_hdf5(self.path, FORMAT, FORMAT_VERSION, "dataset", DATASET_MAKER)
        try:
            with unreadable_is_damaged(self.path, DATASET_MAKER):
                self.info, self.num_images = self._validate()
                self.split = self.file["split"][:]
                self.labels = self.file["labels"][:] if "labels" in self.file else None
                self.factors = self.file["factors"][:] if "factors" in self.file else None
                self.factor_classes = self.file["factor_classes"][:] if "factor_classes" in self.file else None
                self.params = self._produced_by()
        except BaseException:
            self.file.close()
            raise

    def _produced_by(self) -> dict[str, Any]:
        """The `params` attribute: what made the file (prepare-data's params, or decode's provenance)."""
        try:
            produced = json.loads(self.file.attrs.get("params", "{}"))
        except (TypeError, ValueError):
            produced = None
        if not isinstance(produced, dict):
            raise UserError(f"{self.path} is an incomplete or damaged dataset file (its `params` attribute); re-run "
                            "`dvae prepare-data`")
        return produced

    def _validate(self) -> tuple[DatasetInfo, int]:
        file, path = self.file, self.path
        broken = UserError(f"{path} is an incomplete or damaged dataset file; re-run `dvae prepare-data`")
        arrays = [name for name in ("images", "split", *ROW_ARRAYS, SOURCE_PATHS) if name in file]
        if "images" not in arrays or "split" not in arrays or \
                any(not isinstance(file[name], h5py.Dataset) for name in arrays):
            raise broken
        images = file["images"]
        attrs = file.attrs
        try:
            info = DatasetInfo(
                source=str(attrs["source"]), image_size=int(attrs["image_size"]), channels=int(attrs["channels"]),
                num_classes=int(attrs["num_classes"]), class_names=tuple(json.loads(attrs["class_names"])),
                factor_names=tuple(json.loads(attrs["factor_names"])),
                factor_sizes=tuple(json.loads(attrs["factor_sizes"])))
        except (KeyError, ValueError, TypeError, OverflowError):
            raise broken from None
        n = images.shape[0]
        expected = (n, info.channels, info.image_size, info.image_size)
        if images.dtype != np.uint8 or images.shape != expected or file["split"].shape != (n,):
            raise broken
        for name in (*ROW_ARRAYS, SOURCE_PATHS):
            if name in file and file[name].shape[0] != n:
                raise broken
        for name in ("labels", "factor_classes"):
            if name in file and file[name].dtype.kind not in "iu":
                raise UserError(f"{path}: `{name}` are {file[name].dtype}, not integers; re-create the file with "
                                f"`{DATASET_MAKER}`")
        if n == 0:
            raise UserError(f"{path} holds no images; re-run `dvae prepare-data` with a source that has images")
        try:
            images[n - 1]
            file["split"][n - 1]
        except (OSError, RuntimeError, KeyError):
            raise broken from None
        return info, n

    def indices(self, split: int) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def evaluation_split(self) -> int:
        """The test split, or val when there is no test split."""
        split = evaluation_split(self.split)
        if split is not None:
            return split
        raise UserError(f"{self.path} has no test or val images; prepare it with a non-zero test or val fraction")

    def read_images(self, indices: np.ndarray | None = None, block: int = ROWS_PER_READ) -> np.ndarray:
        """uint8 [n, C, H, W] for sorted row `indices` (all rows when None), read block by block."""
        with unreadable_is_damaged(self.path, DATASET_MAKER):
            images = self.file["images"]
            return images[:] if indices is None else read_rows(images, indices, block)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> DatasetFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_rows(array: h5py.Dataset, rows: np.ndarray, block: int = ROWS_PER_READ) -> np.ndarray:
    """array[rows] for sorted, unique `rows`, read block by block (h5py's fancy indexing is slow on many rows)."""
    if np.any(np.diff(rows) <= 0):
        raise ValueError("rows must be sorted, unique and in range")
    out = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
    written = 0
    for start in range(0, array.shape[0], block):
        stop = min(start + block, array.shape[0])
        in_block = rows[(rows >= start) & (rows < stop)]
        if len(in_block):
            out[written:written + len(in_block)] = array[start:stop][in_block - start]
            written += len(in_block)
    if written != len(rows):
        raise ValueError("rows must be sorted, unique and in range")
    return out


@contextmanager
def unreadable_is_damaged(path: Path | str, maker: str) -> Iterator[None]:
    """Reads of an HDF5 file inside the block that fail on damaged bytes (h5py raises OSError, KeyError or
    RuntimeError: a checksum or filter failure, an object header it cannot open; UnicodeError: a name that is no
    UTF-8, which h5py reads with surrogates and cannot encode again) are a UserError naming the file."""
    try:
        yield
    except (OSError, KeyError, RuntimeError, UnicodeError) as error:
        cause = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{path} is damaged, HDF5 cannot read it ({cause}); re-create it with `{maker}`") from None


HEADERS_SECONDS = 20.0
"""How long reading an HDF5 file's attributes may take before the file counts as damaged."""


def ends_in_time(work: Callable[[], object], seconds: float) -> bool:
    """Whether `work` ends within `seconds`, run in a forked child (its errors are left to the caller's own reading).

    Some damage in an HDF5 file's heap makes the HDF5 library loop forever inside one call, which no signal
    interrupts (a single flipped bit did, found by benchmarks/fuzz_readers.py); only another process can be stopped.
    """
    if not hasattr(os, "fork"):
        return True
    child = os.fork()
    if child == 0:
        try:
            for signum in (signal.SIGINT, signal.SIGTERM):  # a Ctrl-C of the terminal ends it, even inside HDF5
                signal.signal(signum, signal.SIG_DFL)
            work()
        finally:
            os._exit(0)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if os.waitpid(child, os.WNOHANG)[0]:
                return True
            time.sleep(0.001)
    except BaseException:  # Ctrl-C while waiting: the child must not outlive the command
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        raise
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    return False


def _read_attributes(path: Path) -> None:
    """Read each root attribute the file lists and the two every reader asks for, ignoring every error."""
    with h5py.File(path, "r") as file:
        names = {"format", "format_version"}
        with contextlib.suppress(Exception):
            names |= set(file.attrs)
        for name in names:
            with contextlib.suppress(Exception):
                file.attrs.get(name)


def headers_end(path: Path) -> bool:
    """Whether the root attributes of the HDF5 file at `path` read in finite time."""
    return ends_in_time(lambda: _read_attributes(path), HEADERS_SECONDS)


def open_hdf5(path: Path, expected_format: str, expected_version: int, what: str, maker: str) -> h5py.File:
    """Open an HDF5 file of dvae's `expected_format`, turning every way it can be wrong into a UserError."""
    if not path.exists():
        raise UserError(f"{what} file {path} not found; create it with `{maker}`")
    if not headers_end(path):
        raise UserError(f"{path} is damaged, reading its HDF5 headers does not end; re-create it with `{maker}`")
    try:
        file = h5py.File(path, "r")
    except OSError:
        raise UserError(f"{path} is not a readable HDF5 file (truncated or not HDF5); re-create it with `{maker}`") from None
    try:
        with unreadable_is_damaged(path, maker):  # damage in the file's headers shows when its attributes are read
            found = file.attrs.get("format")
            if not isinstance(found, str) or found != expected_format:
                described = f"format {found!r}" if found is not None else "no dvae format attribute"
                raise UserError(f"{path} is not a dvae {what} file ({described}); pass a file made by `{maker}`")
            version = file.attrs.get("format_version", -1)
            if not isinstance(version, int | np.integer) or version != expected_version:
                raise UserError(f"{path} has {what} format version {version}, this dvae reads version "
                                f"{expected_version}; re-create it with `{maker}`")
    except BaseException:
        file.close()
        raise
    return file


class _KeepRefusedWrite(io.RawIOBase):
    """The file a NewHDF5File writes through. A write the filesystem refuses (no space, file-size limit) is kept,
    not raised: HDF5 flushes from finalizers, where an exception is only printed, and the file must still close.
    Later writes are dropped; `refused` is raised by NewHDF5File."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.raw = open(path, "w+b", buffering=0)  # noqa: SIM115 (closed by close)
        self.refused: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        return self.raw.readinto(buffer)

    def write(self, data: Any) -> int:
        if self.refused is None:
            try:
                return self.raw.write(data)
            except OSError as error:
                self.refused = error
        return len(memoryview(data))

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def truncate(self, size: int | None = None) -> int:
        return self.tell() if self.refused else self.raw.truncate(size)

    def close(self) -> None:
        super().close()
        self.raw.close()


class NewHDF5File(h5py.File):
    """A new HDF5 file for writing, through h5py's file-object driver. A write refused inside HDF5's own driver
    leaves the library unable to close the file and the process crashes at exit (segmentation fault); through a
    Python file the refusal is kept, the file closes, and `check_writes` or `close` raises the OSError, errno and
    all."""

    def __init__(self, path: Path, **options: Any) -> None:
        self.stream = _KeepRefusedWrite(path)
        try:
            super().__init__(self.stream, "w", **options)
        except BaseException:
            self.stream.close()
            raise

    def check_writes(self) -> None:
        if self.stream.refused is not None:
            raise self.stream.refused

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.stream.close()
        self.check_writes()
