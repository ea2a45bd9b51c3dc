"""The `runtime` params section (no torch: params are checked before any tensor library loads)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dvae_cli.core.errors import UserError
from dvae_cli.core.schema import KeyName, param


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how every stage runs its tensors."""

    device: str = param("auto", help="auto | cpu | cuda | cuda:N | mps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = param("auto", help="auto: bf16 autocast on CUDA, fp32 on CPU")
    compile: bool = param(False, help="torch.compile the model")

    def validate(self, key: KeyName) -> None:
        device = self.device
        if not (device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit())):
            raise UserError(f"params: `{key('device')}` is {device!r}; allowed: auto | cpu | cuda | cuda:N | mps")
