"""`checkpoint.pt`: resumable training state, saved atomically and loaded only with weights_only=True."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from dvae_cli.errors import UserError
from dvae_cli.files import atomic_path

FORMAT = "dvae-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **state}, tmp)


def load_checkpoint(path: Path, family: str) -> dict[str, Any]:
    """The checkpoint's state; every way it can be wrong (pickled code, damage, other family) is a UserError."""
    fix = f"delete it or pass --restart to start {family} training over"
    if not zipfile.is_zipfile(path):
        raise UserError(f"checkpoint {path} is truncated or damaged; {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"checkpoint {path} carries pickled code or objects, refusing to load it; {fix}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError):
        raise UserError(f"checkpoint {path} is truncated or damaged; {fix}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a dvae checkpoint; {fix}")
    if state.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format version {state.get('format_version')}, this dvae reads "
                        f"{FORMAT_VERSION}; {fix}")
    if state.get("family") != family:
        raise UserError(f"checkpoint {path} belongs to a {state.get('family')} model, not {family}; {fix}")
    return state
