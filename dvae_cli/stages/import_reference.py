"""`dvae import-reference`: a reference JointVAE checkpoint (`model.pt` + `specs.json`) into a dvae model folder.

The reference saves a plain state dict (model.pt) and its training specs (specs.json: latent_spec, dataset,
capacities [min, max, steps, gamma], lr as a one-element list, batch_size). The parameter names are dvae's, so
the weights carry over unchanged (`load_reference_state_dict`). dvae's capacity schedule rises from 0, so a
nonzero min is kept in config.json's `reference.specs` only, with a note: it shapes training, not the weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dvae_cli.core import layout
from dvae_cli.core.errors import UserError
from dvae_cli.core.files import atomic_path, check_output, sha256_file
from dvae_cli.core.schema import build
from dvae_cli.formats.model_folder import save_model
from dvae_cli.models.base import DataShape
from dvae_cli.models.jointvae import FAMILY
from dvae_cli.models.jointvae.config import CapacitySchedule, JointVAEConfig
from dvae_cli.models.jointvae.model import JointVAE, load_reference_state_dict
from dvae_cli.params import Params

DATASET_SHAPES: dict[str, tuple[int, int]] = {
    "mnist": (1, 32), "fashion_mnist": (1, 32), "dsprites": (1, 64), "chairs": (1, 64), "celeba": (3, 64)}
"""The reference's datasets → (channels, image side), as its load_model has them."""

REQUIRED_KEYS = ("dataset", "latent_spec")
"""What the reference itself needs to rebuild a model; the training keys fall back to params' jointvae section."""


@dataclass(frozen=True)
class ReferenceSpecs:
    dataset: str
    config: JointVAEConfig
    data: DataShape
    notes: list[str]
    raw: dict[str, Any]


@dataclass(frozen=True)
class ImportResult:
    folder: Path
    family: str
    dataset: str
    config: JointVAEConfig
    data: DataShape
    num_parameters: int
    weights_sha256: str
    notes: list[str]


def _wrong(path: Path, key: str, value: Any, expected: str) -> UserError:
    return UserError(f"{path}: `{key}` is {value!r}, expected {expected}; pass the specs.json saved beside model.pt")


def _number(path: Path, key: str, value: Any, *, integer: bool = False, low: float = 0.0,
            strict: bool = False) -> Any:
    """`value` as a finite number ≥ low (> low when strict), an integer when asked; otherwise a UserError."""
    fits = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    fits = fits and (not integer or float(value).is_integer()) and (value > low if strict else value >= low)
    if not fits:
        kind = "an integer" if integer else "a number"
        raise _wrong(path, key, value, f"{kind} {'>' if strict else '≥'} {low:g}")
    return int(value) if integer else float(value)


def _capacity(path: Path, key: str, value: Any) -> tuple[CapacitySchedule, float]:
    """The reference's [min, max, steps, gamma] → dvae's schedule and the min it cannot hold."""
    if not isinstance(value, list) or len(value) != 4:
        raise _wrong(path, key, value, "[min, max, steps, gamma]")
    low, high, gamma = (_number(path, f"{key}[{i}]", value[i]) for i in (0, 1, 3))
    return CapacitySchedule(high, _number(path, f"{key}[2]", value[2], integer=True, low=1), gamma), low


def read_specs(path: Path, base: JointVAEConfig) -> ReferenceSpecs:
    """specs.json → the model's config and image shape; the keys it lacks come from `base`."""
    if not path.is_file():
        raise UserError(f"specs file {path} not found; pass the specs.json saved beside model.pt with --specs")
    try:
        specs = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not JSON; pass the specs.json saved beside model.pt") from None
    if not isinstance(specs, dict):
        raise UserError(f"{path} is not a JointVAE specs.json (expected a JSON object)")
    for key in REQUIRED_KEYS:
        if key not in specs:
            raise UserError(f"{path} has no `{key}`; pass the specs.json saved beside model.pt")

    dataset = specs["dataset"]
    if not isinstance(dataset, str) or dataset not in DATASET_SHAPES:
        raise UserError(f"{path}: `dataset` is {dataset!r}, which the reference does not know (it sets the image "
                        f"shape); allowed: {' | '.join(DATASET_SHAPES)}")
    latent = specs["latent_spec"]
    if not isinstance(latent, dict) or not latent or set(latent) - {"cont", "disc"}:
        raise _wrong(path, "latent_spec", latent, 'an object with "cont" and/or "disc"')
    continuous = _number(path, "latent_spec.cont", latent.get("cont", 0), integer=True)
    discrete = latent.get("disc", [])
    if not isinstance(discrete, list):
        raise _wrong(path, "latent_spec.disc", discrete, "a list of category counts")
    discrete = [_number(path, f"latent_spec.disc[{i}]", k, integer=True, low=2) for i, k in enumerate(discrete)]
    if continuous == 0 and not discrete:
        raise _wrong(path, "latent_spec", latent, "at least one latent dimension")

    changes: dict[str, Any] = {"continuous": continuous, "discrete": discrete}
    notes = []
    for key in ("cont_capacity", "disc_capacity"):
        if key in specs:
            changes[key], low = _capacity(path, key, specs[key])
            if low != 0:
                notes.append(f"{path}: {key} starts at {low:g} nats, dvae's schedule at 0; config.json keeps its max, "
                             "steps and gamma (all the specs under `reference.specs`): the start shapes training only, "
                             "not these weights")
    if "lr" in specs:
        lr = specs["lr"][0] if isinstance(specs["lr"], list) and len(specs["lr"]) == 1 else specs["lr"]
        changes["lr"] = _number(path, "lr", lr, strict=True)
    if "batch_size" in specs:
        changes["batch_size"] = _number(path, "batch_size", specs["batch_size"], integer=True, low=1)
    if "temperature" in specs:
        changes["temperature"] = _number(path, "temperature", specs["temperature"], strict=True)
    channels, side = DATASET_SHAPES[dataset]
    config = checked_config(path, dataclasses.replace(base, **changes))
    return ReferenceSpecs(dataset, config, DataShape(channels, side), notes, specs)


SPECS_KEYS = {"continuous": "latent_spec.cont", "discrete": "latent_spec.disc", "lr": "lr", "batch_size": "batch_size",
              "temperature": "temperature", "cont_capacity": "cont_capacity", "disc_capacity": "disc_capacity"}
"""The config's fields that specs.json sets → its keys."""


def checked_config(path: Path, config: JointVAEConfig) -> JointVAEConfig:
    """`config` within the bounds params and config.json are held to (so specs.json cannot ask for terabytes)."""
    try:
        return build(JointVAEConfig, dataclasses.asdict(config), FAMILY.name)
    except UserError as error:
        detail = str(error).removeprefix("params: ")
        for field, key in SPECS_KEYS.items():
            detail = detail.replace(f"`{FAMILY.name}.{field}", f"`{key}")
        raise UserError(f"{path}: {detail}; pass the specs.json saved beside model.pt") from None


def read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"reference model {path} not found; pass the model.pt of a reference JointVAE")
    try:
        # weights_only: pickled code is refused. Unreadable bytes raise many exception types (UnpicklingError,
        # RuntimeError, EOFError, KeyError, struct.error, ...), and old pickle protocols warn on stderr.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise UserError(f"{path} is not a PyTorch state dict that torch.load(weights_only=True) reads (damaged, "
                        "another format, or pickled objects besides tensors); pass the reference's model.pt") from None
    if not isinstance(state, Mapping):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict; pass the reference's model.pt")
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise UserError(f"{path} is not a state dict of named tensors: its entry {name!r} is "
                            f"{type(tensor).__name__}, not a tensor; pass the reference's model.pt")
    return state


@dataclass(frozen=True)
class ImportPaths:
    model_pt: Path
    """The reference's state dict."""
    specs: Path
    out: Path
    """The model folder to write."""

    @classmethod
    def of(cls, model_pt: Path, **given: Path | None) -> ImportPaths:
        return layout.fill(cls, given, model_pt=model_pt, specs=model_pt.with_name("specs.json"),
                           out=layout.model_dir(FAMILY.name))


def run(params: Params, paths: ImportPaths, force: bool = False) -> ImportResult:
    """Check both files, then write the model folder atomically (replacing it only with `force`); the training
    settings specs.json leaves out come from params' jointvae section."""
    model_pt, specs_path, out = paths.model_pt, paths.specs, paths.out
    base = params.model_config(FAMILY.name)
    check_output(out, [model_pt, specs_path], folder=True)
    if out.is_dir() and not force and any(out.iterdir()):
        raise UserError(f"{out} already exists; pass --force to replace it, or another --out")
    state = read_state_dict(model_pt)
    specs = read_specs(specs_path, base)
    config, data = specs.config, specs.data
    model = JointVAE(config, data)
    try:
        load_reference_state_dict(model, state)
    except UserError as error:
        raise UserError(f"{model_pt} does not fit {specs_path} (cont {config.continuous}, disc {config.discrete}, "
                        f"{specs.dataset} {data.channels}×{data.image_size}×{data.image_size}): {error}") from None
    reference = {"model_pt_sha256": sha256_file(model_pt), "specs": specs.raw}
    with atomic_path(out) as tmp:
        weights_sha256 = save_model(tmp, FAMILY.name, model, config, data,
                                    {"dataset_sha256": None, "reference": reference})
    return ImportResult(folder=out, family=FAMILY.name, dataset=specs.dataset, config=config, data=data,
                        num_parameters=sum(tensor.numel() for tensor in model.state_dict().values()),
                        weights_sha256=weights_sha256, notes=specs.notes)
