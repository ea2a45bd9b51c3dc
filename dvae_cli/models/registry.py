"""What the registry (`dvae_cli.models`) holds for each model, without importing torch: a model's config class is
imported at once (params are checked before any tensor library loads), its implementation on first use (`Lazy`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dvae_cli.core.progress import Advance
    from dvae_cli.models.base import DataShape, DiscreteVAE
    from dvae_cli.models.prior.config import CodeMaps
    from dvae_cli.models.prior.model import CodePrior
    from dvae_cli.scoring.evaluation import Evaluation, Sections
    from dvae_cli.scoring.pictures import Rendered, RenderInputs


@dataclass(frozen=True)
class Lazy:
    """`module:attribute`, imported when first called (so `dvae --help` never pays for torch)."""

    target: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module), attribute)(*args, **kwargs)


@dataclass(frozen=True)
class Family:
    """Everything dvae knows of a model family: registered once, looked up by name everywhere else."""

    name: str
    """The family's params section, `--model` value and model folder name."""
    config: type
    """Its params section's config class (a frozen dataclass of `param` fields)."""
    model: Callable[[Any, DataShape], DiscreteVAE]
    """model(config, data shape) → an untrained model."""
    metrics: Callable[[Evaluation], Sections]
    """`dvae evaluate`'s family sections."""
    pictures: Callable[[Any, RenderInputs, Advance], Rendered]
    """`dvae render`'s pictures; `advance()` once per entry of `picture_files`."""
    picture_files: tuple[str, ...]
    """Every file `pictures` can write."""
    code_map: str | None = None
    """The `encode` array holding an integer code map [h, w] that `dvae prior` can model (None: the family has none)."""


@dataclass(frozen=True)
class PriorKind:
    """A registered prior over code maps: its params section, config class and model."""

    name: str
    """The params section (`prior:`) and what messages call it."""
    config: type
    model: Callable[[Any, CodeMaps], CodePrior]
    """model(config, code maps) → an untrained prior."""
