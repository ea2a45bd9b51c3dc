"""`checkpoint.pt`: the resumable training state (`TrainState`), saved atomically, loaded with weights_only=True.

It lives in the model folder but is no DVC output: DVC keeps it when it deletes a stage's outputs before running
the stage (so a killed `dvc repro` resumes), and a stage with a persistent output never enters DVC's run cache.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dvae_cli.core.errors import UserError
from dvae_cli.core.files import atomic_path

CHECKPOINT = "checkpoint.pt"
"""The resumable training state's file name, in the model folder beside the model but no part of it (nor a DVC
output)."""

FORMAT = "dvae-checkpoint"
FORMAT_VERSION = 2
FIELDS = {"fingerprint": dict, "step": int, "model": dict, "optimizer": dict, "scaler": dict, "epoch_counts": dict,
          "history": list, "rng": dict}
"""The entries of a checkpoint of this format version, with their types."""


@dataclass
class TrainState:
    """Everything a run needs to go on exactly where it stopped: `capture` gives its checkpoint form, `restore`
    takes it back. Data order and sampling noise are functions of (seed, step), so they need no state of their own."""

    family: str
    fingerprint: dict[str, Any]
    """What must be unchanged for a checkpoint to resume (model params but epochs, seed, dataset hash)."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    step: int = 0
    epoch_counts: dict[str, Tensor] = field(default_factory=dict)
    """The current epoch's summed per-batch counts (squared error, pixels, code usage, ...)."""
    history: list[list[Any]] = field(default_factory=list)
    """Every row logged so far, in order, as [step, kind, {name: value}]: what the DVCLive folder is rebuilt from."""

    def capture(self) -> dict[str, Any]:
        on_cuda = self.device.type == "cuda"
        return {"family": self.family, "fingerprint": self.fingerprint, "step": self.step,
                "model": {k: v.contiguous() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch_counts": self.epoch_counts, "history": self.history,
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(self.device) if on_cuda else None}}

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch_counts, self.history = state["step"], state["epoch_counts"], state["history"]
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and state["rng"]["cuda"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)


def save_checkpoint(path: Path, state: TrainState) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **state.capture()}, tmp)


def _is_zip(path: Path) -> bool:
    """zipfile.is_zipfile, which itself raises on some damaged end records (a ZIP64 record naming several disks:
    found by benchmarks/fuzz_readers.py)."""
    try:
        return zipfile.is_zipfile(path)
    except zipfile.BadZipFile:
        return False


def read_checkpoint(path: Path, family: str | None = None) -> dict[str, Any]:
    """The checkpoint's state, of any format version; every way it can be unreadable (pickled code, damage, another
    program's file, another family than `family` when given) is a UserError."""
    fix = f"delete it or pass --restart to start {family or 'the'} training over"
    if not _is_zip(path):
        raise UserError(f"checkpoint {path} is truncated or damaged; {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"checkpoint {path} carries pickled code or objects, refusing to load it; {fix}") from None
    except Exception:  # damaged bytes raise many types (RuntimeError, EOFError, TypeError from a storage record, ...)
        raise UserError(f"checkpoint {path} is truncated or damaged; {fix}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a dvae checkpoint; {fix}")
    if family is not None and state.get("family") != family:
        raise UserError(f"checkpoint {path} belongs to a {state.get('family')} model, not {family}; {fix}")
    if state.get("format_version") == FORMAT_VERSION:
        for name, kind in FIELDS.items():
            if not isinstance(state.get(name), kind) or isinstance(state.get(name), bool):
                raise UserError(f"checkpoint {path} has no valid `{name}` (damaged or edited); {fix}")
        if state["step"] < 0:
            raise UserError(f"checkpoint {path} is at step {state['step']}, below 0 (damaged or edited); {fix}")
    return state


def first_difference(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """The first key (sorted, depth first) whose value differs, as "key: old → new"; "" when equal."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}: {a} → {b}"
    return ""


def resume(state: TrainState, path: Path, total_steps: int, restart_on_mismatch: bool) -> None:
    """Restore `state` from the checkpoint at `path` when this run can go on from it: same format version and
    fingerprint, at most `total_steps` steps done (a longer run's state cannot be wound back).

    Anything else is an error, or (with `restart_on_mismatch`) leaves `state` as it is, to start over.
    """
    saved = read_checkpoint(path, state.family)
    if saved.get("format_version") != FORMAT_VERSION:
        mismatch = f"has format version {saved.get('format_version')}, this dvae reads {FORMAT_VERSION}"
    elif difference := first_difference(saved["fingerprint"], state.fingerprint):
        mismatch = f"was made with other settings ({difference})"
    elif saved["step"] > total_steps:
        mismatch = f"is at step {saved['step']}, past this run's {total_steps} steps"
    else:
        try:
            state.restore(saved)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError):
            raise UserError(f"checkpoint {path} does not fit this {state.family} model (tensors of other shapes or "
                            "missing entries: damaged or edited); delete it or pass --restart to start over") from None
        return
    if not restart_on_mismatch:
        raise UserError(f"checkpoint {path} {mismatch}; pass --restart to start over")
