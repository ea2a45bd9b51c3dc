"""The `prior` params section and the shape of what a prior models (no torch: params are checked before any tensor
library loads)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from dvae_cli.core.errors import UserError
from dvae_cli.core.schema import KeyName, param


@dataclass(frozen=True)
class SampleConfig:
    """What `dvae sample` draws from the prior."""

    count: int = param(48, help="code maps drawn (split evenly over the classes, in class order, when conditional)",
                       ge=1, le=1 << 20)
    temperature: float = param(1.0, help="sampling temperature (logits divided by it)", gt=0, le=100)
    top_k: int | None = param(None, help="sample among the k likeliest codes (null: all)", ge=1)


@dataclass(frozen=True)
class PriorConfig:
    """The `prior:` params section: the transformer and its training, and (`sample`) what `dvae sample` draws."""

    width: int = param(64, help="transformer width (token and position embedding size)", ge=8, le=4096)
    layers: int = param(3, help="transformer blocks", ge=1, le=64)
    heads: int = param(4, help="attention heads (must divide width)", ge=1, le=64)
    conditional: bool = param(True, help="condition on the class label (needs a dataset with labels)")
    lr: float = param(1.0e-3, help="Adam learning rate", gt=0, le=1)
    batch_size: int = param(32, help="code maps per step", ge=1, le=1 << 16)
    epochs: int = param(1, help="passes over the train split's code maps", ge=1, le=100000)
    sample: SampleConfig = param(factory=SampleConfig, help="dvae sample")

    def validate(self, key: KeyName) -> None:
        if self.width % self.heads:
            raise UserError(f"params: `{key('heads')}` is {self.heads}, which does not divide `{key('width')}` "
                            f"{self.width}; pick a head count that divides the width")


@dataclass(frozen=True)
class CodeMaps:
    """What the prior models: h×w maps of codes 0 … K − 1 (residual codes: depth such maps, coarsest first), and the
    number of classes it is conditioned on (0: none)."""

    height: int = param(help="code map rows", ge=1, le=1024)
    width: int = param(help="code map columns", ge=1, le=1024)
    num_codes: int = param(help="K, the codebook size", ge=1, le=1 << 20)
    num_classes: int = param(0, help="classes of the start token (0: unconditioned)", ge=0, le=1 << 20)
    depth: int = param(0, help="stages of residual codes [depth, h, w] (0: plain [h, w] maps)", ge=0, le=1024)

    @property
    def shape(self) -> tuple[int, ...]:
        """One code map's shape: (h, w), or (depth, h, w)."""
        return (self.depth, self.height, self.width) if self.depth else (self.height, self.width)

    @property
    def length(self) -> int:
        return math.prod(self.shape)

    def record(self) -> dict[str, int]:
        """The fields a prior's config.json keeps: `depth` only for residual codes, so priors over plain maps keep
        the record they have always had."""
        fields = dataclasses.asdict(self)
        if not self.depth:
            del fields["depth"]
        return fields
