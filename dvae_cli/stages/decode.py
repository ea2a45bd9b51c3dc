"""`dvae decode`: rows of a codes file back to images, with the model that wrote them, as a PNG grid or a
dataset-format HDF5 that every stage reads."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from dvae_cli.core.errors import UserError
from dvae_cli.core.files import atomic_path, check_output
from dvae_cli.core.images import save_png, square_grid, to_uint8
from dvae_cli.core.progress import Advance, progress_bar
from dvae_cli.core.runtime import Runtime, resolve_runtime
from dvae_cli.core.tensors import as_tensor
from dvae_cli.formats.artifact import DECODE_MAKER, check_replaceable
from dvae_cli.formats.codes import CodesFile
from dvae_cli.formats.dataset import DatasetChunk, DatasetWriter
from dvae_cli.formats.model_folder import WEIGHTS, LoadedModel, load_model, model_files
from dvae_cli.models.base import DiscreteVAE, invalid_latent
from dvae_cli.params import Params

DECODE_ROWS = 64
"""Rows `dvae decode` decodes when --rows is not given."""


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
    loaded.check_image_shape(codes.attrs.get("channels"), codes.attrs.get("image_size"), codes.path,
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
        stored = codes.read_rows(batch_rows.start, batch_rows.stop, codes.latent_names)
        if wrong := invalid_latent(model, stored):
            raise UserError(f"{codes.path}: {wrong}; re-create it with `dvae encode`")
        latent = {name: as_tensor(values).to(runtime.device) for name, values in stored.items()}
        with runtime.autocast():
            images = model.decode(latent)
        yield batch_rows, images.float().cpu()


def write_decoded_dataset(codes: CodesFile, rows: range, batches: Iterator[tuple[range, Tensor]], path: Path,
                          weights_sha256: str, advance: Advance) -> None:
    """A dataset file of the decoded images, with the split, labels, factors and source paths of the same rows."""
    info = codes.dataset_info
    provenance = {"decoded_from": str(codes.path), "rows": [rows.start, rows.stop], "model": codes.family,
                  "weights_sha256": weights_sha256}
    writer = DatasetWriter(path, dataclasses.replace(info, source=f"{info.source} decoded by {codes.family}"),
                           provenance)
    try:
        for batch_rows, images in batches:
            copied = codes.read_rows(batch_rows.start, batch_rows.stop, codes.dataset_row_names())
            writer.append(DatasetChunk(images=to_uint8(images), **copied,
                                       source_paths=codes.source_paths(batch_rows.start, batch_rows.stop)))
            advance(len(batch_rows))
        writer.finish(codes.split[rows.start:rows.stop])
    finally:
        writer.close()


@dataclass(frozen=True)
class DecodePaths:
    codes: Path
    out: Path
    """A .png grid or a dataset-format .h5."""
    model_dir: Path | None = None
    """The model that decodes (None: the one the codes file names)."""


def run(params: Params, paths: DecodePaths, rows_text: str | None = None, force: bool = False,
        show_progress: bool = True) -> DecodeResult:
    """Decode rows of a codes file with the model that wrote it into a PNG grid or a dataset-format HDF5."""
    started = time.perf_counter()
    codes_path, out = paths.codes, paths.out
    as_image = out.suffix.lower() in IMAGE_SUFFIXES
    if not as_image and out.suffix.lower() not in DATASET_SUFFIXES:
        raise UserError(f"--out {out} must end in .png (an image grid) or .h5 (a dataset file)")
    runtime = resolve_runtime(params.runtime)
    with CodesFile(codes_path) as codes:
        rows = parse_rows(rows_text, len(codes))
        folder = paths.model_dir or codes.model_dir
        check_output(out, [codes_path, *model_files(folder)])
        check_replaceable(out, DECODE_MAKER, "--out", force)
        loaded = load_model(folder, codes.family, runtime.device, force=force)
        weights_match = check_model_matches(codes, loaded, folder, force)
        batches = decode_batches(runtime.prepare(loaded.model), codes, rows, params.encode.batch_size, runtime)
        with atomic_path(out) as tmp, \
                progress_bar(f"decode {codes.family}", len(rows), enabled=show_progress) as advance:
            if as_image:
                decoded = []
                for batch_rows, images in batches:
                    decoded.append(images)
                    advance(len(batch_rows))
                save_png(square_grid(torch.cat(decoded)), tmp)
            else:
                write_decoded_dataset(codes, rows, batches, tmp, loaded.weights_sha256, advance)
    return DecodeResult(path=out, rows=rows, model_dir=folder, weights_match=weights_match,
                        seconds=time.perf_counter() - started)
