"""`dvae encode`: every dataset row into the codes file (`data/codes/M.h5`, whose format is `formats.codes`).

Encoding streams: a thread reads the next block of images while the model encodes the current one, and
another compresses and writes the codes behind it, at most QUEUE_DEPTH batches back, so memory follows the
batch size and not the number of rows.

Under torchrun each rank encodes a contiguous, batch-aligned slice of the rows into an uncompressed shard beside
the output; rank 0 encodes its own slice straight into the codes file and appends the shards behind it, so the
file is byte for byte the one a single process writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import torch
from torch import Tensor

from dvae_cli.core import layout
from dvae_cli.core.distributed import all_gather_objects, join_cluster, leave_cluster
from dvae_cli.core.errors import UserError
from dvae_cli.core.files import (
    atomic_path,
    check_output,
    pending_temporary,
    sha256_file,
)
from dvae_cli.core.progress import Advance, progress_bar
from dvae_cli.core.runtime import Runtime, resolve_runtime
from dvae_cli.formats.artifact import check_replaceable
from dvae_cli.formats.codes import (
    CODES_MAKER,
    PRECISION_NAMES,
    ArraySpec,
    ChunkedRowWriter,
    CodesHeader,
    chunk_rows,
    copied_arrays,
    create_codes_file,
    create_latent_datasets,
    latent_specs,
    new_codes_file,
)
from dvae_cli.formats.dataset import (
    DATASET_MAKER,
    SOURCE_PATHS,
    DatasetFile,
    NewHDF5File,
    unreadable_is_damaged,
)
from dvae_cli.formats.model_folder import LoadedModel, load_model, model_files
from dvae_cli.models.base import DiscreteVAE
from dvae_cli.params import Params


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
        with unreadable_is_damaged(images.file.filename, DATASET_MAKER):
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

    @classmethod
    def of(cls, family: str, **given: Path | None) -> EncodePaths:
        return layout.fill(cls, given, dataset=layout.DATASET, model_dir=layout.model_dir(family),
                           out=layout.codes(family))


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
        with pending_temporary(path), NewHDF5File(path) as file:
            datasets = create_latent_datasets(file, job.specs, job.num_rows, job.rows_per_chunk)
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
    header = CodesHeader(family=family, model_dir=paths.model_dir, weights_sha256=loaded.weights_sha256,
                         dataset=paths.dataset, dataset_sha256=sha256_file(paths.dataset), dataset_info=dataset.info,
                         precision=PRECISION_NAMES[job.runtime.autocast_dtype],
                         latent_attributes=loaded.model.latent_attributes())
    with atomic_path(paths.out) as tmp, new_codes_file(tmp) as file:
        latent_datasets = create_codes_file(file, header, copied_arrays(dataset), job.model, job.specs,
                                            job.rows_per_chunk, dataset.file.get(SOURCE_PATHS))
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
        for name in json.loads(file.attrs["model_arrays"]):
            arrays[f"{name} (attribute)"] = f"{file.attrs[name].dtype} {list(file.attrs[name].shape)}"
    return arrays, encode_seconds


def run(params: Params, family: str, paths: EncodePaths, show_progress: bool = True,
        force: bool = False) -> EncodeResult | None:
    """Write the codes file of every dataset row (all splits, in dataset order), atomically.

    Under torchrun each rank encodes a batch-aligned slice of the rows and rank 0 assembles them into the file a
    single process would write, byte for byte; rank 0 returns the result, the other ranks None.
    """
    started = time.perf_counter()
    check_output(paths.out, [paths.dataset, *model_files(paths.model_dir)])
    check_replaceable(paths.out, CODES_MAKER, "--out", force)
    runtime = resolve_runtime(params.runtime)
    cluster = join_cluster(runtime.device)
    try:
        loaded = load_model(paths.model_dir, family, runtime.device, force=force)
        model = runtime.prepare(loaded.model)
        with DatasetFile(paths.dataset) as dataset:
            loaded.check_image_shape(dataset.info.channels, dataset.info.image_size, paths.dataset,
                                     f"encode the dataset it was trained on, or retrain it with `dvae train --model "
                                     f"{family}`")
            images = dataset.file["images"]
            with unreadable_is_damaged(paths.dataset, DATASET_MAKER):
                first = torch.from_numpy(images[:1])
            with torch.no_grad(), runtime.autocast():
                specs = latent_specs(model, model.encode(runtime.images(first)))
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
