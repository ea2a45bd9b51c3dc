"""`dvae encode` and `dvae decode`: a dataset ↔ its codes file (`data/codes/M.h5`), and `CodesFile`, its reader.

The codes file stores whatever the model's `encode` returns, row i for dataset row i: integer arrays in the
smallest unsigned type that holds the model's values, float arrays as float32; beside them the split, labels
and factors copied from the dataset, and the arrays the model stores once (the VQ-VAE codebook).

Encoding streams: a thread reads the next block of images while the model encodes the current one, and
another compresses and writes the codes behind it, at most QUEUE_DEPTH batches back, so memory follows the
batch size and not the number of rows.

Under torchrun each rank encodes a contiguous, batch-aligned slice of the rows into an uncompressed shard beside
the output; rank 0 encodes its own slice straight into the codes file and appends the shards behind it, so the
file is byte for byte the one a single process writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

from dvae_cli import __version__
from dvae_cli.config import MODEL_FAMILIES, Params
from dvae_cli.dataset import (COMPRESSION, COMPRESSION_LEVEL, ROW_ARRAYS, SPLIT_NAMES, DatasetChunk, DatasetFile,
                              DatasetInfo, DatasetWriter, open_hdf5)
from dvae_cli.distributed import all_gather_objects, join_cluster, leave_cluster
from dvae_cli.errors import UserError
from dvae_cli.files import atomic_path, pending_temporary, sha256_file
from dvae_cli.models import DiscreteVAE
from dvae_cli.modelstore import WEIGHTS, LoadedModel, load_model
from dvae_cli.progress import Advance, progress_bar
from dvae_cli.runtime import Runtime, resolve_runtime

FORMAT = "dvae-codes"
FORMAT_VERSION = 1
ROWS_PER_CHUNK = 1024
CHUNK_BYTES = 1 << 20
"""Chunks hold ROWS_PER_CHUNK rows, fewer when those would pass this size (large code maps)."""
QUEUE_DEPTH = 2
"""Batches the writer thread may lag behind the model."""
COPIED_ARRAYS = ("split", *ROW_ARRAYS)
REQUIRED_ATTRIBUTES = ("model", "model_dir", "weights_sha256", "dataset_sha256", "dataset_info", "latent_arrays",
                       "image_size", "channels")
DECODE_ROWS = 64
"""Rows `dvae decode` decodes when --rows is not given."""
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
    value_counts = model.code_value_counts()
    return [ArraySpec(name, tuple(tensor.shape[1:]),
                      np.dtype(np.float32) if tensor.is_floating_point() else code_dtype(value_counts[name]))
            for name, tensor in latent.items()]


def chunk_rows(specs: Sequence[ArraySpec], num_rows: int) -> int:
    widest = max(spec.row_bytes for spec in specs)
    return max(1, min(ROWS_PER_CHUNK, CHUNK_BYTES // max(widest, 1), num_rows))


def _float32_if_floating(tensor: Tensor) -> Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor


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
        host = {name: _float32_if_floating(latent[name].detach()).to("cpu", non_blocking=on_gpu)
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


@torch.no_grad()
def encode_rows(model: DiscreteVAE, images: h5py.Dataset, rows: range, batch_size: int, runtime: Runtime,
                write: Callable[[int, dict[str, Tensor]], None], advance: Advance) -> None:
    """Encode dataset rows [rows.start, rows.stop) in order; `write(first_row, latent)` receives every batch.

    The next block of images is read (and decompressed) on a thread while the model encodes the current one.
    """
    if not rows:
        return
    pin = runtime.device.type == "cuda"

    def read(start: int) -> Tensor:
        block = torch.from_numpy(images[start:min(start + batch_size, rows.stop)])
        return block.pin_memory() if pin else block

    # Pinning in a thread needs the thread's current CUDA device set, as DataLoader's pin-memory thread does.
    reader_setup = {"initializer": torch.cuda.set_device, "initargs": (runtime.device,)} if pin else {}
    with ThreadPoolExecutor(1, thread_name_prefix="dvae-images-reader", **reader_setup) as reader:
        ahead = reader.submit(read, rows.start)
        for start in range(rows.start, rows.stop, batch_size):
            block = ahead.result()
            if start + batch_size < rows.stop:
                ahead = reader.submit(read, start + batch_size)
            with runtime.autocast():
                latent = model.encode(runtime.images(block))
            write(start, latent)
            advance(len(block))


@dataclass(frozen=True)
class EncodePaths:
    dataset: Path
    model_dir: Path
    out: Path


@dataclass(frozen=True)
class EncodeResult:
    path: Path
    num_rows: int
    arrays: dict[str, str]
    """Name → "dtype [shape]" of every array written."""
    seconds: float
    encode_seconds: float
    """Time of the encoding loop alone (reading, model, writing), without loading and fingerprinting."""
    file_bytes: int

    @property
    def images_per_second(self) -> float:
        return self.num_rows / max(self.encode_seconds, 1e-9)


def check_image_shape(info: DatasetInfo, loaded: LoadedModel, dataset: Path, model_dir: Path) -> None:
    data = loaded.data
    if (info.channels, info.image_size) != (data.channels, data.image_size):
        raise UserError(
            f"{dataset} holds {info.channels}×{info.image_size}×{info.image_size} images but the {loaded.family} "
            f"model in {model_dir} takes {data.channels}×{data.image_size}×{data.image_size}; encode the dataset "
            f"it was trained on, or retrain it with `dvae train --model {loaded.family}`")


def _attribute(value: object) -> object:
    """Lists become int64 arrays (h5py stores them natively); scalars stay as they are."""
    return np.asarray(value, dtype=np.int64) if isinstance(value, list) else value


def _write_attributes(file: h5py.File, loaded: LoadedModel, paths: EncodePaths, dataset: DatasetFile,
                      dataset_sha256: str, specs: Sequence[ArraySpec], runtime: Runtime) -> None:
    attrs = file.attrs
    attrs["format"] = FORMAT
    attrs["format_version"] = FORMAT_VERSION
    attrs["model"] = loaded.family
    attrs["model_dir"] = str(paths.model_dir)
    attrs["weights_sha256"] = loaded.weights_sha256
    attrs["dataset"] = str(paths.dataset)
    attrs["dataset_sha256"] = dataset_sha256
    attrs["dataset_info"] = json.dumps(dataclasses.asdict(dataset.info))
    attrs["image_size"] = dataset.info.image_size
    attrs["channels"] = dataset.info.channels
    attrs["latent_arrays"] = json.dumps([spec.name for spec in specs])
    attrs["precision"] = PRECISION_NAMES[runtime.autocast_dtype]
    attrs["dvae_version"] = __version__
    for key, value in loaded.model.latent_attributes().items():
        attrs[key] = _attribute(value)


def batch_aligned_slices(num_rows: int, batch_size: int, world_size: int) -> list[range]:
    """Contiguous row slices, one per rank, that start on multiples of `batch_size`.

    Every rank's batches then hold exactly the rows a single process would put in them (a model's numerics may
    depend on the batch it sees); whole batches are shared out as evenly as they go, so a slice may be empty.
    """
    num_batches = math.ceil(num_rows / batch_size)
    bounds = [min(num_batches * rank // world_size * batch_size, num_rows) for rank in range(world_size + 1)]
    return [range(bounds[rank], bounds[rank + 1]) for rank in range(world_size)]


def shard_path(out: Path, rank: int) -> Path:
    """Where `rank` stages its rows for rank 0: beside the codes file, so every node must see that folder."""
    return out.with_name(f"{out.name}.shard-{rank}.tmp-{os.getpid()}")


def _create_latent_datasets(file: h5py.File, specs: Sequence[ArraySpec], num_rows: int, rows_per_chunk: int,
                            **storage: Any) -> dict[str, h5py.Dataset]:
    return {spec.name: file.create_dataset(spec.name, shape=(num_rows, *spec.row_shape), dtype=spec.dtype,
                                           chunks=(rows_per_chunk, *spec.row_shape), **storage)
            for spec in specs}


@dataclass(frozen=True)
class EncodeJob:
    """What every rank needs to encode its slice of the rows."""

    model: DiscreteVAE
    images: h5py.Dataset
    specs: list[ArraySpec]
    rows_per_chunk: int
    batch_size: int
    runtime: Runtime

    @property
    def num_rows(self) -> int:
        return len(self.images)


def _encode_shard(job: EncodeJob, rows: range, path: Path) -> None:
    """Encode `rows` into an uncompressed shard at `path`, then hand it to rank 0, which reads and deletes it.

    The shard's arrays span every row, but only the chunks of `rows` are ever allocated.
    """
    if rows:
        path.parent.mkdir(parents=True, exist_ok=True)
        with pending_temporary(path), h5py.File(path, "w") as file:
            datasets = _create_latent_datasets(file, job.specs, job.num_rows, job.rows_per_chunk)
            with ChunkedRowWriter(datasets, job.specs, first_row=rows.start) as write:
                encode_rows(job.model, job.images, rows, job.batch_size, job.runtime, write,
                            lambda count, **fields: None)
                write.finish()
    all_gather_objects(path if rows else None)


def _feed_shard(path: Path, rows: range, batch_size: int, write: ChunkedRowWriter, advance: Advance) -> None:
    """Pass a shard's rows to `write` in the batches a single process would have written, so the codes file
    receives the same sequence of writes (and so the same bytes)."""
    if not path.exists():
        raise UserError(f"rank 0 cannot see {path}, the rows another rank encoded: under several nodes --out "
                        "must lie on a filesystem every node shares")
    with h5py.File(path, "r") as shard:
        for start in range(rows.start, rows.stop, batch_size):
            stop = min(start + batch_size, rows.stop)
            write(start, {name: torch.from_numpy(shard[name][start:stop]) for name in write.datasets})
            advance(stop - start)


def _write_codes_file(job: EncodeJob, rows: range, loaded: LoadedModel, paths: EncodePaths, dataset: DatasetFile,
                      family: str, show_progress: bool) -> tuple[dict[str, str], float]:
    """Rank 0: encode `rows` into the codes file, then append the other ranks' shards in row order.

    Returns the arrays written (name → "dtype [shape]") and the seconds of the encoding loop.
    """
    dataset_sha256 = sha256_file(paths.dataset)
    with atomic_path(paths.out) as tmp, h5py.File(tmp, "w") as file:
        _write_attributes(file, loaded, paths, dataset, dataset_sha256, job.specs, job.runtime)
        compression = {"compression": COMPRESSION, "compression_opts": COMPRESSION_LEVEL}
        for name in COPIED_ARRAYS:
            values = getattr(dataset, name)
            if values is not None:
                file.create_dataset(name, data=values, chunks=(job.rows_per_chunk, *values.shape[1:]), **compression)
        for name, tensor in job.model.extra_arrays().items():
            file.create_dataset(name, data=tensor.detach().cpu().float().numpy())
        latent_datasets = _create_latent_datasets(file, job.specs, job.num_rows, job.rows_per_chunk, **compression)
        encode_started = time.perf_counter()
        with ChunkedRowWriter(latent_datasets, job.specs, first_row=0) as write, \
                progress_bar(f"encode {family}", job.num_rows, extra="{task.fields[info]}",
                             enabled=show_progress) as advance:
            done = 0

            def advance_with_rate(count: int) -> None:
                nonlocal done
                done += count
                rate = done / max(time.perf_counter() - encode_started, 1e-9)
                advance(count, info=f"{rate:,.0f} images/s")

            encode_rows(job.model, job.images, rows, job.batch_size, job.runtime, write, advance_with_rate)
            shards: list[Path | None] = all_gather_objects(None)
            try:
                other_slices = batch_aligned_slices(job.num_rows, job.batch_size, len(shards))[1:]
                for shard, shard_rows in zip(shards[1:], other_slices):
                    if shard is not None:
                        _feed_shard(shard, shard_rows, job.batch_size, write, advance_with_rate)
                write.finish()
            finally:
                for shard in shards:
                    if shard is not None:
                        shard.unlink(missing_ok=True)
        encode_seconds = time.perf_counter() - encode_started
        arrays = {name: f"{array.dtype} {list(array.shape)}" for name, array in file.items()}
    return arrays, encode_seconds


def encode_dataset(params: Params, family: str, paths: EncodePaths,
                   show_progress: bool = True) -> EncodeResult | None:
    """Write the codes file of every dataset row (all splits, in dataset order), atomically.

    Under torchrun each rank encodes a batch-aligned slice of the rows and rank 0 assembles them into the file a
    single process would write, byte for byte; rank 0 returns the result, the other ranks None.
    """
    started = time.perf_counter()
    runtime = resolve_runtime(params.train)
    cluster = join_cluster(runtime.device)
    try:
        loaded = load_model(paths.model_dir, family, runtime.device)
        model = runtime.prepare(loaded.model)
        with DatasetFile(paths.dataset) as dataset:
            check_image_shape(dataset.info, loaded, paths.dataset, paths.model_dir)
            images = dataset.file["images"]
            with torch.no_grad(), runtime.autocast():
                specs = latent_specs(model, model.encode(runtime.images(torch.from_numpy(images[:1]))))
            job = EncodeJob(model=model, images=images, specs=specs, rows_per_chunk=chunk_rows(specs, len(images)),
                            batch_size=params.encode.batch_size, runtime=runtime)
            rows = batch_aligned_slices(job.num_rows, job.batch_size, cluster.world_size)[cluster.rank]
            if not cluster.is_main:
                _encode_shard(job, rows, shard_path(paths.out, cluster.rank))
                return None
            arrays, encode_seconds = _write_codes_file(job, rows, loaded, paths, dataset, family, show_progress)
    finally:
        leave_cluster()
    return EncodeResult(path=paths.out, num_rows=job.num_rows, arrays=arrays, seconds=time.perf_counter() - started,
                        encode_seconds=encode_seconds, file_bytes=paths.out.stat().st_size)


def _plain(value: Any) -> Any:
    """HDF5 attribute values as plain Python (arrays → lists, numpy scalars → numbers)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def as_tensor(array: np.ndarray) -> Tensor:
    """Integer arrays as int64 (what embeddings and cross-entropy take), the rest as float32."""
    if array.dtype.kind in "iub":
        return torch.from_numpy(array.astype(np.int64))
    return torch.from_numpy(array.astype(np.float32, copy=False))


class CodesFile:
    """A validated, open codes file: attributes, and its arrays read lazily as torch tensors.

    >>> with CodesFile("data/codes/vqvae.h5") as codes:
    ...     for batch in codes.batches("train", batch_size=256):
    ...         tokens = batch["codes"]        # int64 [256, h, w]
    ...         labels = batch.get("labels")   # int64 [256], when the dataset has classes
    """

    def __init__(self, path: Path | str, family: str | None = None) -> None:
        self.path = Path(path)
        self.file = open_hdf5(self.path, FORMAT, FORMAT_VERSION, "codes", "dvae encode")
        self.attrs: dict[str, Any] = {key: _plain(value) for key, value in self.file.attrs.items()}
        try:
            self.latent_names, self.dataset_info = self._validate(family)
        except BaseException:
            self.file.close()
            raise
        self.split: np.ndarray = self.file["split"][:]

    def _validate(self, family: str | None) -> tuple[list[str], DatasetInfo]:
        broken = UserError(f"{self.path} is an incomplete or damaged codes file; re-run `dvae encode`")
        if any(key not in self.attrs for key in REQUIRED_ATTRIBUTES):
            raise broken
        try:
            found = str(self.attrs["model"])
            names = [str(name) for name in json.loads(self.attrs["latent_arrays"])]
            fields = json.loads(self.attrs["dataset_info"])
            info = DatasetInfo(**{key: tuple(value) if isinstance(value, list) else value
                                  for key, value in fields.items()})
        except (KeyError, ValueError, TypeError):
            raise broken from None
        if found not in MODEL_FAMILIES:
            raise UserError(f"{self.path} holds codes of unknown model family {found!r}; re-run `dvae encode`")
        if family is not None and found != family:
            raise UserError(f"{self.path} holds {found} codes, not {family}; pass the {family} codes file "
                            f"(`dvae encode --model {family}` writes it)")
        if "split" not in self.file or not names or any(name not in self.file for name in names):
            raise broken
        num_rows = self.file["split"].shape[0]
        if any(self.file[name].shape[0] != num_rows for name in (*names, *self.dataset_row_names())):
            raise broken
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
        return {name: self.file[name][start:stop] for name in (names or self.row_names())}

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

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> CodesFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_rows(text: str | None, num_rows: int) -> range:
    """`START:STOP` (either end may be left out) or one row index → a range within [0, num_rows).

    None → the first DECODE_ROWS rows (or all, when there are fewer).
    """
    if text is None:
        return range(min(DECODE_ROWS, num_rows))
    start_text, colon, stop_text = text.partition(":")
    try:
        start = int(start_text) if start_text.strip() else 0
        stop = (int(stop_text) if stop_text.strip() else num_rows) if colon else start + 1
    except ValueError:
        raise UserError(f"--rows {text!r} is not START:STOP (for example 0:64)") from None
    if not 0 <= start < stop <= num_rows:
        raise UserError(f"--rows {text} is out of range: the codes file has {num_rows} rows, so rows must lie in "
                        f"0:{num_rows} with START < STOP")
    return range(start, stop)


@dataclass(frozen=True)
class DecodeResult:
    path: Path
    rows: range
    model_dir: Path
    weights_match: bool
    seconds: float


IMAGE_SUFFIXES = (".png",)
DATASET_SUFFIXES = (".h5", ".hdf5")


def check_model_matches(codes: CodesFile, loaded: LoadedModel, model_dir: Path, force: bool) -> bool:
    """Same latent spec and image shape as the encoder (always required); same weights unless `force`.

    Returns whether the weights are the encoder's.
    """
    for key, value in loaded.model.latent_attributes().items():
        written = codes.attrs.get(key)
        if written != value:
            raise UserError(f"the {loaded.family} model in {model_dir} has {key} {value} but {codes.path} was "
                            f"written with {key} {written}; pass the model that wrote it with --model-dir")
    shape = (loaded.data.channels, loaded.data.image_size)
    if shape != (codes.attrs.get("channels"), codes.attrs.get("image_size")):
        raise UserError(f"the model in {model_dir} makes {shape[0]}-channel {shape[1]}-pixel images but {codes.path} "
                        f"encodes {codes.attrs.get('channels')}-channel {codes.attrs.get('image_size')}-pixel ones; "
                        "pass the model that wrote it with --model-dir")
    weights_match = loaded.weights_sha256 == codes.attrs.get("weights_sha256")
    if not weights_match and not force:
        raise UserError(f"{model_dir / WEIGHTS} is not the weights file that wrote {codes.path} (sha256 differs); "
                        "re-run `dvae encode`, pass the right --model-dir, or --force to decode anyway")
    return weights_match


@torch.no_grad()
def decode_batches(model: DiscreteVAE, codes: CodesFile, rows: range, batch_size: int,
                   runtime: Runtime) -> Iterator[tuple[range, Tensor]]:
    """(rows, images float32 [n, C, H, W] in [0, 1] on the CPU) for consecutive batches of `rows`."""
    for start in range(rows.start, rows.stop, batch_size):
        batch_rows = range(start, min(start + batch_size, rows.stop))
        latent = {name: as_tensor(values).to(runtime.device)
                  for name, values in codes.read_rows(batch_rows.start, batch_rows.stop, codes.latent_names).items()}
        with runtime.autocast():
            images = model.decode(latent)
        yield batch_rows, images.float().cpu()


def to_uint8(images: Tensor) -> np.ndarray:
    return images.mul(255).round_().clamp_(0, 255).to(torch.uint8).numpy()


def save_png_grid(images: Tensor, path: Path) -> None:
    """A near-square grid of the images, tiled and upscaled as `dvae render` draws its grids."""
    from dvae_cli.render import as_tiles, grid_image, save_png

    save_png(grid_image(as_tiles(images), math.ceil(math.sqrt(len(images)))), path)


def write_decoded_dataset(codes: CodesFile, rows: range, batches: Iterator[tuple[range, Tensor]], path: Path,
                          weights_sha256: str, advance: Advance) -> None:
    """A dataset file of the decoded images, with the split, labels and factors of the same rows."""
    info = codes.dataset_info
    provenance = {"decoded_from": str(codes.path), "rows": [rows.start, rows.stop], "model": codes.family,
                  "weights_sha256": weights_sha256}
    writer = DatasetWriter(path, dataclasses.replace(info, source=f"{info.source} decoded by {codes.family}"),
                           provenance)
    try:
        for batch_rows, images in batches:
            copied = codes.read_rows(batch_rows.start, batch_rows.stop, codes.dataset_row_names())
            writer.append(DatasetChunk(images=to_uint8(images), **copied))
            advance(len(batch_rows))
        writer.finish(codes.split[rows.start:rows.stop])
    finally:
        writer.close()


def decode_codes_file(params: Params, codes_path: Path, out: Path, rows_text: str | None = None,
                      model_dir: Path | None = None, force: bool = False, show_progress: bool = True) -> DecodeResult:
    """Decode rows of a codes file with the model that wrote it into a PNG grid or a dataset-format HDF5."""
    started = time.perf_counter()
    as_image = out.suffix.lower() in IMAGE_SUFFIXES
    if not as_image and out.suffix.lower() not in DATASET_SUFFIXES:
        raise UserError(f"--out {out} must end in .png (an image grid) or .h5 (a dataset file)")
    runtime = resolve_runtime(params.train)
    with CodesFile(codes_path) as codes:
        rows = parse_rows(rows_text, len(codes))
        folder = model_dir or codes.model_dir
        loaded = load_model(folder, codes.family, runtime.device)
        weights_match = check_model_matches(codes, loaded, folder, force)
        batches = decode_batches(runtime.prepare(loaded.model), codes, rows, params.encode.batch_size, runtime)
        with atomic_path(out) as tmp, \
                progress_bar(f"decode {codes.family}", len(rows), enabled=show_progress) as advance:
            if as_image:
                decoded = []
                for batch_rows, images in batches:
                    decoded.append(images)
                    advance(len(batch_rows))
                save_png_grid(torch.cat(decoded), tmp)
            else:
                write_decoded_dataset(codes, rows, batches, tmp, loaded.weights_sha256, advance)
    return DecodeResult(path=out, rows=rows, model_dir=folder, weights_match=weights_match,
                        seconds=time.perf_counter() - started)
