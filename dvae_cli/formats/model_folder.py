"""The model folder: `model.safetensors` (weights only) and `config.json` (everything to rebuild the model)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from dvae_cli import __version__
from dvae_cli.core.errors import UserError
from dvae_cli.core.files import sha256_file, write_bytes_atomic, write_json_atomic
from dvae_cli.core.schema import build
from dvae_cli.families import FAMILIES, DataShape, DiscreteVAE

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
"""The resumable training state (`formats.checkpoint`), kept beside the model but no part of it (nor a DVC output)."""


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


def contiguous_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous copies (channels_last weights are not contiguous; safetensors needs them to be)."""
    return {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}


def save_model(folder: Path, family: str, model: DiscreteVAE, config: Any, data: DataShape,
               extra: dict[str, Any]) -> str:
    """Write weights then config.json (each atomically); returns the weights' sha256. `extra` holds no timings or
    host facts, so that equal weights give equal files."""
    # One metadata key only: safetensors keeps metadata in a hash map, so several keys come out in varying order.
    weights = save(contiguous_state_dict(model), metadata={"format": "dvae-weights"})
    write_bytes_atomic(folder / WEIGHTS, weights)
    weights_sha256 = sha256_file(folder / WEIGHTS)
    record = {"family": family, "dvae_version": __version__, "model": dataclasses.asdict(config),
              "data": dataclasses.asdict(data), "weights_sha256": weights_sha256, **extra}
    write_json_atomic(folder / CONFIG, record)
    return weights_sha256


def load_model(folder: Path, family: str | None = None, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild a trained model from its folder, in evaluation mode."""
    folder = Path(folder)
    name = family or folder.name
    if not (folder / CONFIG).exists() or not (folder / WEIGHTS).exists():
        raise UserError(f"model folder {folder} has no trained model; make it with `dvae train --model {name}`")
    try:
        record = json.loads((folder / CONFIG).read_text())
        found_family = record["family"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{folder / CONFIG} is not a dvae model config; re-create it with `dvae train`") from None
    if found_family not in FAMILIES:
        raise UserError(f"{folder / CONFIG} names unknown model family {found_family!r}")
    if family is not None and found_family != family:
        raise UserError(f"{folder} holds a {found_family} model, not {family}; pass the {family} model folder")
    config = build(FAMILIES[found_family].config, record["model"], found_family)
    data = DataShape(**record["data"])
    model = FAMILIES[found_family].model(config, data)
    try:
        state = load_file(folder / WEIGHTS)
    except (SafetensorError, OSError):
        raise UserError(f"{folder / WEIGHTS} is damaged; re-create it with `dvae train --model {found_family}`") from None
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise UserError(f"{folder / WEIGHTS} does not match {folder / CONFIG}; re-create them with "
                        f"`dvae train --model {found_family}`") from None
    model.to(device).eval()
    return LoadedModel(model=model, family=found_family, config=config, data=data, record=record,
                       weights_sha256=sha256_file(folder / WEIGHTS))
