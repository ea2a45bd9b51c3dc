"""The model folder: `model.safetensors` (weights only) and `config.json` (everything to rebuild the model)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from dvae_cli import __version__
from dvae_cli.core.errors import UserError
from dvae_cli.core.files import sha256_file, write_bytes_atomic, write_json_atomic
from dvae_cli.core.schema import build
from dvae_cli.formats.checkpoint import CHECKPOINT
from dvae_cli.formats.codes import model_codebook_sha256
from dvae_cli.models import FAMILIES
from dvae_cli.models.base import DataShape, DiscreteVAE
from dvae_cli.models.prior import PRIOR
from dvae_cli.models.prior.config import CodeMaps, PriorConfig
from dvae_cli.models.prior.model import CodePrior

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def model_files(folder: Path) -> list[Path]:
    """The files of a model folder, as inputs an output must not replace."""
    return [folder / WEIGHTS, folder / CONFIG, folder / CHECKPOINT]


@dataclass
class LoadedModel:
    model: DiscreteVAE
    family: str
    config: Any
    """The family's config (its params section)."""
    data: DataShape
    record: dict[str, Any]
    """The whole config.json."""
    weights_sha256: str
    folder: Path

    def check_image_shape(self, channels: Any, image_size: Any, holder: Path, remedy: str) -> None:
        """A UserError, ending in `remedy`, unless the images of `holder` (a dataset or codes file) have the shape
        this model takes."""
        data = self.data
        if (channels, image_size) != (data.channels, data.image_size):
            raise UserError(f"{holder} holds {channels}×{image_size}×{image_size} images but the {self.family} model "
                            f"in {self.folder} takes {data.channels}×{data.image_size}×{data.image_size}; {remedy}")


def contiguous_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous copies (channels_last weights are not contiguous; safetensors needs them to be)."""
    return {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}


def save_model(folder: Path, family: str, model: DiscreteVAE, config: Any, data: DataShape,
               extra: dict[str, Any]) -> str:
    """Write weights then config.json (each atomically); returns the weights' sha256. `extra` holds no timings or
    host facts, so that equal weights give equal files."""
    return _write_folder(folder, model, {"family": family, "dvae_version": __version__,
                                         "model": dataclasses.asdict(config), "data": dataclasses.asdict(data), **extra})


def _write_folder(folder: Path, model: torch.nn.Module, record: dict[str, Any]) -> str:
    # One metadata key only: safetensors keeps metadata in a hash map, so several keys come out in varying order.
    weights = save(contiguous_state_dict(model), metadata={"format": "dvae-weights"})
    write_bytes_atomic(folder / WEIGHTS, weights)
    weights_sha256 = sha256_file(folder / WEIGHTS)
    write_json_atomic(folder / CONFIG, {**record, "weights_sha256": weights_sha256})
    return weights_sha256


def _config_json_error(path: Path, error: UserError, family: str) -> UserError:
    """A schema error about config.json's sections, worded as config.json's (the schema words them as params')."""
    detail = str(error).removeprefix("params: ").split("; fix it in the params file")[0]
    return UserError(f"{path}: {detail}; re-create it with `dvae train --model {family}`")


def _weights_shapes(path: Path, remake: str) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the safetensors header, without reading the tensors."""
    try:
        with safe_open(path, "pt") as weights:
            return {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}  # noqa: SIM118
    except (SafetensorError, OSError):
        raise UserError(f"{path} is damaged; {remake}") from None


def load_model(folder: Path, family: str | None = None, device: torch.device | str = "cpu",
               force: bool = False) -> LoadedModel:
    """Rebuild a trained model from its folder, in evaluation mode.

    config.json is checked like params (unknown or missing keys, bounds), the weights' shapes in the safetensors
    header against a model built on the meta device (so nothing absurd is allocated), and the weights' sha256
    against config.json's `weights_sha256` unless `force`.
    """
    folder = Path(folder)
    name = family or folder.name
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise UserError(f"model folder {folder} has no trained model; make it with `dvae train --model {name}`")
    try:
        record = json.loads(config_path.read_text())
        found_family = record["family"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise UserError(f"{config_path} is not a dvae model config; re-create it with `dvae train`") from None
    if record.get("prior_of") is not None:
        raise UserError(f"{folder} holds a prior over {record['prior_of']} codes, not a model; pass the model folder "
                        f"(models/{record['prior_of']})")
    if not isinstance(found_family, str) or found_family not in FAMILIES:
        raise UserError(f"{config_path} names unknown model family {found_family!r}; re-create it with `dvae train`")
    if family is not None and found_family != family:
        raise UserError(f"{folder} holds a {found_family} model, not {family}; pass the {family} model folder")
    for section in ("model", "data"):
        if not isinstance(record.get(section), dict):
            raise UserError(f"{config_path} has no `{section}` section; re-create it with "
                            f"`dvae train --model {found_family}`")
    try:
        config = build(FAMILIES[found_family].config, record["model"], "model")
        data = build(DataShape, record["data"], "data")
    except UserError as error:
        raise _config_json_error(config_path, error, found_family) from None
    except TypeError:  # a field without a default is missing
        raise UserError(f"{config_path}: `data` lacks `channels` or `image_size`; re-create it with "
                        f"`dvae train --model {found_family}`") from None
    with torch.device("meta"):
        expected = {key: tuple(tensor.shape)
                    for key, tensor in FAMILIES[found_family].model(config, data).state_dict().items()}
    if _weights_shapes(weights_path, f"re-create it with `dvae train --model {found_family}`") != expected:
        raise UserError(f"{weights_path} does not match {config_path} (other tensors or shapes); re-create them "
                        f"with `dvae train --model {found_family}`")
    weights_sha256 = sha256_file(weights_path)
    if weights_sha256 != record.get("weights_sha256") and not force:
        raise UserError(f"{weights_path} is not the file {config_path} names (sha256 {weights_sha256[:12]}…, "
                        f"config.json says {str(record.get('weights_sha256'))[:12]}…): replaced or damaged; "
                        f"re-create it with `dvae train --model {found_family}`, or pass --force to use it anyway")
    model = FAMILIES[found_family].model(config, data)
    try:
        model.load_state_dict(load_file(weights_path))
    except (SafetensorError, OSError):
        raise UserError(f"{weights_path} is damaged; re-create it with `dvae train --model {found_family}`") from None
    model.to(device).eval()
    return LoadedModel(model=model, family=found_family, config=config, data=data, record=record,
                       weights_sha256=weights_sha256, folder=Path(folder))




@dataclass
class LoadedPrior:
    folder: Path
    model: CodePrior
    config: PriorConfig
    maps: CodeMaps
    record: dict[str, Any]
    """The whole config.json: `prior_of`, `codebook_sha256`, `codes_sha256`, `dataset_info`, `class_names`, ..."""


    def check_model(self, model: DiscreteVAE, model_dir: Path) -> None:
        """A UserError unless `model` (from `model_dir`) has the codebook of the codes this prior learned."""
        expected, found = model_codebook_sha256(model), str(self.record.get("codebook_sha256"))
        if found != expected:
            of = self.record["prior_of"]
            raise UserError(f"{self.folder} is a prior over the codes of another {of} (codebook hash {found[:12]}…, "
                            f"{model_dir} has {expected[:12]}…); re-run `dvae encode` and `dvae prior` for this "
                            "model, or pass the model the prior was made for")


def save_prior(folder: Path, of: str, model: CodePrior, extra: dict[str, Any]) -> str:
    """A prior's folder: weights, then config.json with its config, its code maps and `extra` (no timings)."""
    return _write_folder(folder, model, {"family": PRIOR.name, "prior_of": of, "dvae_version": __version__,
                                         PRIOR.name: dataclasses.asdict(model.config), "maps": model.maps.record(),
                                         **extra})


def load_prior(folder: Path, of: str, device: torch.device | str = "cpu") -> LoadedPrior:
    """Rebuild a trained prior over `of`'s codes from its folder, in evaluation mode (checked as `load_model` checks
    a model folder)."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    remake = f"re-create it with `dvae prior --model {of}`"
    if not config_path.is_file() or not weights_path.is_file():
        raise UserError(f"{folder} has no trained prior; make it with `dvae prior --model {of}`")
    try:
        record = json.loads(config_path.read_text())
        found = record["prior_of"] if record["family"] == PRIOR.name else None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise UserError(f"{config_path} is not a dvae prior config; {remake}") from None
    if found != of:
        raise UserError(f"{folder} holds no prior over {of} codes; pass the folder `dvae prior --model {of}` wrote")
    try:
        config = build(PRIOR.config, record[PRIOR.name], PRIOR.name)
        maps = build(CodeMaps, record["maps"], "maps")
    except (UserError, TypeError, KeyError, AttributeError):
        raise UserError(f"{config_path} has a damaged `prior` or `maps` section; {remake}") from None
    with torch.device("meta"):
        expected = {key: tuple(tensor.shape) for key, tensor in PRIOR.model(config, maps).state_dict().items()}
    if _weights_shapes(weights_path, remake) != expected or sha256_file(weights_path) != record.get("weights_sha256"):
        raise UserError(f"{weights_path} is not the file {config_path} names (other tensors, or replaced or damaged); "
                        f"{remake}")
    model = PRIOR.model(config, maps)
    model.load_state_dict(load_file(weights_path))
    return LoadedPrior(folder=folder, model=model.to(device).eval(), config=config, maps=maps, record=record)
