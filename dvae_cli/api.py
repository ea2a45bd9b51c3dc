"""dvae from Python: load a trained model folder, encode images to codes, decode codes back to images.

>>> from dvae_cli import api
>>> model = api.load("models/vqvae")
>>> latent = model.encode(images)     # uint8 [N, C, H, W] / [N, H, W, C], or float in [0, 1]
>>> tokens = latent["codes"]          # exactly what `dvae encode` stores for these images
>>> pictures = model.decode(tokens)   # uint8 [N, C, H, W], exactly what `dvae decode` writes

`encode` returns the arrays of the codes file (same names, dtypes and values as `dvae encode` with the same device,
precision and batch size); `decode` takes them back (or the rows of a codes file) and returns the images
`dvae decode` writes. Both run in batches on the device given to `load`, under the same precision as the CLI.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dvae_cli.core.errors import UserError
from dvae_cli.core.images import to_uint8
from dvae_cli.core.runtime import Runtime, resolve_runtime
from dvae_cli.core.runtime_config import RuntimeConfig
from dvae_cli.core.schema import build
from dvae_cli.core.tensors import as_tensor, float32_if_floating
from dvae_cli.formats.codes import ArraySpec, latent_specs
from dvae_cli.formats.model_folder import LoadedModel, load_model
from dvae_cli.models.base import DiscreteVAE, invalid_latent
from dvae_cli.params import EncodeConfig

ImageBatch = Any
"""uint8 or floating [N, C, H, W] or [N, H, W, C] (or [N, H, W] for one-channel models): a numpy array, a torch
tensor on any device, or anything with `shape`, `dtype` and slicing (an h5py dataset, read batch by batch)."""
LatentArray = np.ndarray | Tensor


class Model:
    """A trained dvae model, ready to encode and decode batches of any size. Make one with `load`."""

    def __init__(self, loaded: LoadedModel, model_dir: Path, runtime: Runtime, batch_size: int) -> None:
        self.family: str = loaded.family
        """The model family (its `--model` name)."""
        self.model_dir = model_dir
        self.runtime = runtime
        self.batch_size = batch_size
        """Images (or rows of codes) per batch on the device."""
        self.network: DiscreteVAE = runtime.prepare(loaded.model)
        """The torch module, in evaluation mode, on `device`."""
        self.weights_sha256 = loaded.weights_sha256
        """sha256 of the weights file, as the codes files `dvae encode` writes with them record it."""
        self.image_shape: tuple[int, int, int] = (loaded.data.channels, loaded.data.image_size, loaded.data.image_size)
        """(C, H, W) of the images the model takes and makes."""
        self.latent_attributes: dict[str, object] = self.network.latent_attributes()
        """What the codes file records about the latent (latent shape, K and D, or the latent spec)."""
        with torch.no_grad(), runtime.autocast():
            probe = self.network.encode(runtime.images(torch.zeros((1, *self.image_shape), dtype=torch.uint8)))
        self.arrays: dict[str, ArraySpec] = {spec.name: spec for spec in latent_specs(self.network, probe)}
        """Name → row shape and dtype of each array `encode` returns (those of the codes file)."""

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def __repr__(self) -> str:
        return f"<dvae {self.family} model from {self.model_dir} on {self.device}>"

    @torch.no_grad()
    def encode(self, images: ImageBatch) -> dict[str, np.ndarray]:
        """The codes of a batch of images: name → array [N, ...] on the CPU, as the codes file stores them.

        uint8 pixels are 0-255, floating ones lie in [0, 1]; the layout is told from the shape.
        """
        if not isinstance(images, Tensor) and not (hasattr(images, "shape") and hasattr(images, "dtype")):
            images = np.asarray(images)
        floating = self._check_pixel_type(images.dtype)
        layout = self._layout(tuple(images.shape))
        count = images.shape[0]
        encoded = {name: np.empty((count, *spec.row_shape), spec.dtype) for name, spec in self.arrays.items()}
        for start in range(0, count, self.batch_size):
            x = self._model_input(images[start:start + self.batch_size], layout, floating)
            with self.runtime.autocast():
                latent = self.network.encode(x)
            for name, array in encoded.items():
                array[start:start + len(x)] = float32_if_floating(latent[name]).cpu().numpy()
        return encoded

    @torch.no_grad()
    def decode(self, latent: Mapping[str, LatentArray] | LatentArray) -> np.ndarray:
        """Images uint8 [N, C, H, W] on the CPU from codes as `encode` returns them (or as a codes file holds them).

        `latent` maps array names to arrays [N, ...] (numpy or torch, any device; names the model does not use, such
        as a codes file's labels, are ignored); a model whose latent is one array also takes that array alone.
        """
        arrays = self._latent_arrays(latent)
        count = len(next(iter(arrays.values())))
        decoded = np.empty((count, *self.image_shape), np.uint8)
        for start in range(0, count, self.batch_size):
            stop = min(start + self.batch_size, count)
            batch = {name: _model_latent(values[start:stop]).to(self.device) for name, values in arrays.items()}
            with self.runtime.autocast():
                images = self.network.decode(batch)
            decoded[start:stop] = to_uint8(images.float().cpu())
        return decoded

    def _where(self) -> str:
        return f"the {self.family} model in {self.model_dir}"

    def _check_pixel_type(self, dtype: Any) -> bool:
        """Whether pixels of `dtype` are floating point; a UserError unless uint8 or floating."""
        if isinstance(dtype, torch.dtype):
            if dtype == torch.uint8 or dtype.is_floating_point:
                return dtype.is_floating_point
        elif np.dtype(dtype) == np.uint8 or np.dtype(dtype).kind == "f":
            return np.dtype(dtype).kind == "f"
        raise UserError(f"images of type {dtype} are neither uint8 (0-255) nor floating point (0-1); convert them "
                        "to one of those")

    def _layout(self, shape: tuple[int, ...]) -> str:
        """NCHW, NHWC or NHW: how a batch of `shape` holds the model's images; a UserError when it holds none."""
        channels, size, _ = self.image_shape
        if len(shape) == 4 and shape[1:] == (channels, size, size):
            return "NCHW"
        if len(shape) == 4 and shape[1:] == (size, size, channels):
            return "NHWC"
        if len(shape) == 3 and channels == 1 and shape[1:] == (size, size):
            return "NHW"
        expected = f"[N, {channels}, {size}, {size}] or [N, {size}, {size}, {channels}]" + (
            f" or [N, {size}, {size}]" if channels == 1 else "")
        if len(shape) == 4:
            readings = ((shape[1], shape[2], shape[3]), (shape[3], shape[1], shape[2]))  # as NCHW, as NHWC
            for found_channels, height, width in readings:
                if (height, width) == (size, size):
                    raise UserError(f"the images have {found_channels} channels but {self._where()} takes "
                                    f"{channels}; pass {expected}")
            for found_channels, height, width in readings:
                if found_channels == channels:
                    raise UserError(f"the images are {height}×{width} pixels but {self._where()} takes "
                                    f"{size}×{size}; resize them to {size}×{size}")
        raise UserError(f"images of shape {list(shape)} do not fit {self._where()}: pass a batch {expected} "
                        "(one image: add a batch axis, images[None])")

    def _model_input(self, block: ImageBatch, layout: str, floating: bool) -> Tensor:
        """One batch as the model takes it: float [n, C, H, W] in [0, 1] on the device, in the runtime's format."""
        if not isinstance(block, Tensor):
            block = torch.from_numpy(np.ascontiguousarray(block))
        if layout == "NHWC":
            block = block.permute(0, 3, 1, 2)
        elif layout == "NHW":
            block = block.unsqueeze(1)
        if not floating:
            return self.runtime.images(block)
        x = block.to(self.device, torch.float32)
        if len(x) and not (x.min() >= 0 and x.max() <= 1):
            raise UserError("floating-point images must lie in [0, 1] (and not be NaN); pass 0-255 pixels as uint8")
        return x.contiguous(memory_format=torch.channels_last) if self.runtime.channels_last else x

    def _latent_arrays(self, latent: Mapping[str, LatentArray] | LatentArray) -> dict[str, LatentArray]:
        """The arrays of `latent` the model knows, checked against its latent: row shapes, row counts, code ranges."""
        if not isinstance(latent, Mapping):
            if len(self.arrays) != 1:
                raise UserError(f"the latent of {self._where()} has several arrays ({', '.join(self.arrays)}); "
                                "pass them as a dict, as encode returns them")
            latent = {next(iter(self.arrays)): latent}
        arrays = {name: latent[name] for name in self.arrays if name in latent}
        if not arrays:
            raise UserError(f"the latent holds none of the arrays {self._where()} decodes ({', '.join(self.arrays)}); "
                            "pass what encode returns")
        counts = {len(values) for values in arrays.values()}
        if len(counts) > 1:
            raise UserError(f"the latent's arrays have different numbers of rows ({sorted(counts)}); pass the same "
                            "rows of each")
        for name, values in arrays.items():
            row_shape = tuple(values.shape[1:])
            if row_shape != self.arrays[name].row_shape:
                raise UserError(f"`{name}` has rows of shape {list(row_shape)} but {self._where()} makes "
                                f"{list(self.arrays[name].row_shape)}; decode codes this model encoded")
        if wrong := invalid_latent(self.network, arrays):
            raise UserError(f"{wrong} ({self._where()}); decode codes this model encoded")
        return arrays


def _model_latent(values: LatentArray) -> Tensor:
    """A latent array as model input: integers as int64, the rest as float32 (`as_tensor` for torch tensors too)."""
    if isinstance(values, Tensor):
        return values.float() if values.is_floating_point() else values.long()
    return as_tensor(np.ascontiguousarray(values))


def load(model_dir: Path | str, device: str = "auto", precision: str = "auto",
         batch_size: int = EncodeConfig().batch_size, force: bool = False) -> Model:
    """The trained model in `model_dir` (a folder `dvae train` wrote), in evaluation mode on `device`.

    `device` (auto | cpu | cuda | cuda:N | mps) and `precision` (auto | fp32 | bf16 | fp16) mean what
    `runtime.device` and `runtime.precision` mean in params.yaml: auto picks the GPU and bf16 autocast when there
    is one, as the CLI does. `batch_size` is the images (or rows of codes) per batch, as `encode.batch_size`.
    `force` takes weights that config.json's `weights_sha256` does not name (`--force` of the commands).
    """
    runtime = resolve_runtime(build(RuntimeConfig, {"device": device, "precision": precision}, "runtime"))
    batch_size = build(EncodeConfig, {"batch_size": batch_size}, "encode").batch_size
    folder = Path(model_dir)
    return Model(load_model(folder, device=runtime.device, force=force), folder, runtime, batch_size)
