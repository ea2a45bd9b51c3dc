"""params.yaml as typed, validated config objects.

Precedence: command-line flag > params file > built-in default. Unknown keys, wrong types and
out-of-range values are `UserError`s that name the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dvae_cli.errors import UserError

MODEL_FAMILIES = ("jointvae", "vqvae")
DATASETS = ("dsprites", "mnist", "fashion-mnist", "cifar10", "celeba", "folder")


def param(default: Any = dataclasses.MISSING, *, help: str, ge: float | None = None, gt: float | None = None,
          le: float | None = None, lt: float | None = None, factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its help line and numeric bounds (checked on load)."""
    metadata = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class CapacitySchedule:
    max: float = param(help="capacity C reached at the end of the ramp, in nats", ge=0)
    steps: int = param(help="steps over which C rises linearly from 0", ge=1)
    gamma: float = param(help="weight γ of |KL − C|", ge=0)


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["dsprites", "mnist", "fashion-mnist", "cifar10", "celeba", "folder"] = param(
        "dsprites", help="data source")
    root: str = param("data/raw", help="where torchvision and folder sources read")
    download: bool = param(False, help="let torchvision sources download")
    image_size: int = param(64, help="square image side in pixels", ge=4, le=1024)
    channels: Literal[1, 3] = param(1, help="1 (grayscale) or 3 (RGB)")
    subset: int | float | None = param(None, help="null, an int count, or a fraction in (0, 1]", gt=0)
    split: list[float] = param(factory=lambda: [0.8, 0.1, 0.1],
                               help="train/val/test fractions for sources without an official split")


@dataclass(frozen=True)
class TrainConfig:
    device: str = param("auto", help="auto | cpu | cuda | cuda:N | mps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = param("auto", help="auto: bf16 autocast on CUDA, fp32 on CPU")
    compile: bool = param(False, help="torch.compile the model")
    checkpoint_every: int = param(1000, help="steps between checkpoints", ge=1)
    log_every: int = param(50, help="steps between logged points", ge=1)
    max_steps: int | None = param(None, help="stop after this many steps (null: train all epochs)", ge=1)


@dataclass(frozen=True)
class JointVAEConfig:
    continuous: int = param(6, help="number of Gaussian latent dimensions (may be 0)", ge=0)
    discrete: list[int] = param(factory=lambda: [3], help="categories of each discrete variable (each ≥ 2)")
    temperature: float = param(0.67, help="Gumbel-softmax temperature τ", gt=0)
    likelihood: Literal["bernoulli", "gaussian"] = param("bernoulli", help="bernoulli (BCE) or gaussian (MSE)")
    cont_capacity: CapacitySchedule = param(factory=lambda: CapacitySchedule(40.0, 300000, 150.0),
                                            help="C_z schedule")
    disc_capacity: CapacitySchedule = param(factory=lambda: CapacitySchedule(1.1, 300000, 150.0),
                                            help="C_c schedule (capped at Σ log k)")
    lr: float = param(5.0e-4, help="Adam learning rate", gt=0)
    batch_size: int = param(64, help="global batch size", ge=1)
    epochs: int = param(30, help="passes over the train split", ge=1)


@dataclass(frozen=True)
class VQVAEConfig:
    hidden: int = param(256, help="channels of the convolutional trunk", ge=1)
    res_blocks: int = param(2, help="residual blocks in encoder and decoder", ge=0)
    downsample: int = param(4, help="image side / code map side: 2, 4, 8, ... (a power of two)", ge=2)
    num_codes: int = param(512, help="codebook size K", ge=2)
    code_dim: int = param(64, help="code vector dimension D", ge=1)
    beta: float = param(0.25, help="commitment weight β", ge=0)
    codebook_update: Literal["ema", "loss"] = param("ema", help="ema (online k-means) or loss (codebook term)")
    ema_decay: float = param(0.99, help="EMA decay γ, in (0, 1)", gt=0, lt=1)
    init: Literal["kmeans", "random"] = param("kmeans", help="codebook initialisation")
    dead_code_threshold: float = param(1.0, help="EMA usage below which a code is re-seeded; 0 turns it off", ge=0)
    likelihood: Literal["bernoulli", "gaussian"] = param("gaussian", help="gaussian (MSE) or bernoulli (BCE)")
    lr: float = param(2.0e-4, help="Adam learning rate", gt=0)
    batch_size: int = param(128, help="global batch size", ge=1)
    epochs: int = param(30, help="passes over the train split", ge=1)


@dataclass(frozen=True)
class EncodeConfig:
    batch_size: int = param(512, help="images per encoding batch", ge=1)


@dataclass(frozen=True)
class EvaluateConfig:
    num_samples: int = param(10000, help="points sampled for MIG and the FactorVAE score", ge=1)
    dci: bool = param(False, help="also compute DCI (gradient-boosted trees; slow)")
    batch_size: int = param(512, help="images per evaluation batch", ge=1)


@dataclass(frozen=True)
class RenderConfig:
    steps: int = param(8, help="columns of a traversal", ge=2)
    base_index: int = param(0, help="test image the traversals start from", ge=0)
    seed: int = param(0, help="seed for prior samples and chosen images", ge=0)


@dataclass(frozen=True)
class Params:
    seed: int = param(0, help="seed of everything random", ge=0)
    models: list[Literal["jointvae", "vqvae"]] = param(factory=lambda: list(MODEL_FAMILIES),
                                                        help="model families `dvc repro` trains")
    data: DataConfig = param(factory=DataConfig, help="dataset preparation")
    train: TrainConfig = param(factory=TrainConfig, help="training runtime, shared by all models")
    jointvae: JointVAEConfig = param(factory=JointVAEConfig, help="JointVAE model and optimisation")
    vqvae: VQVAEConfig = param(factory=VQVAEConfig, help="VQ-VAE model and optimisation")
    encode: EncodeConfig = param(factory=EncodeConfig, help="dvae encode")
    evaluate: EvaluateConfig = param(factory=EvaluateConfig, help="dvae evaluate")
    render: RenderConfig = param(factory=RenderConfig, help="dvae render")

    def model_config(self, family: str) -> JointVAEConfig | VQVAEConfig:
        return getattr(self, family)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(a) if isinstance(a, str) else str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    if dataclasses.is_dataclass(annotation):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(annotation, str(annotation))


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against `annotation`; return it converted (int → float, mappings → dataclasses)."""
    origin = typing.get_origin(annotation)
    wrong = UserError(f"params: `{key}` is {value!r}, expected {_type_name(annotation)}; fix it in the params file or flag")
    if origin is Literal:
        # `type(...) is` so that 1.0 and True are not taken for the allowed 1
        if any(value == option and type(value) is type(option) for option in typing.get_args(annotation)):
            return value
        raise UserError(f"params: `{key}` is {value!r}; allowed: {_type_name(annotation)}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(annotation):
            return None
        for option in typing.get_args(annotation):
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except UserError:
                continue
        raise wrong
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise wrong
        (item,) = typing.get_args(annotation)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise wrong
        return build(annotation, value, key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise wrong
    if annotation is str:
        if isinstance(value, str):
            return value
        raise wrong
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")


def _check_bounds(value: Any, meta: dict[str, Any], key: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    checks = [("ge", lambda b: value >= b, "≥"), ("gt", lambda b: value > b, ">"),
              ("le", lambda b: value <= b, "≤"), ("lt", lambda b: value < b, "<")]
    for name, ok, symbol in checks:
        bound = meta.get(name)
        if bound is not None and not ok(bound):
            raise UserError(f"params: `{key}` is {value!r}, it must be {symbol} {bound} ({meta['help']})")


def _with_field_default(config_field: dataclasses.Field, value: Any) -> Any:
    """A partial mapping for a nested config (e.g. `cont_capacity: {max: 5}`) keeps the field's default for the rest."""
    if isinstance(value, dict) and config_field.default_factory is not dataclasses.MISSING:
        default = config_field.default_factory()
        if dataclasses.is_dataclass(default):
            return {**dataclasses.asdict(default), **value}
    return value


def build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, validating every key; missing keys take the defaults."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean `{(prefix + '.') if prefix else ''}{close[0]}`?" if close else \
                f"allowed keys: {', '.join(fields)}"
            raise UserError(f"params: unknown key `{dotted}`; {hint}")
        converted = _convert(_with_field_default(fields[key], value), hints[key], dotted)
        _check_bounds(converted, dict(fields[key].metadata), dotted)
        values[key] = converted
    instance = cls(**values)
    _validate(instance, prefix)
    return instance


def _validate(instance: Any, prefix: str) -> None:
    """Checks that involve more than one value or a list's items."""
    def key(name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    if isinstance(instance, DataConfig):
        if len(instance.split) != 3 or any(f < 0 for f in instance.split) or not math.isclose(sum(instance.split), 1.0, abs_tol=1e-6):
            raise UserError(f"params: `{key('split')}` is {instance.split}; it must be three non-negative fractions "
                            "train/val/test that sum to 1")
        if instance.split[0] == 0:
            raise UserError(f"params: `{key('split')}` gives the train split no images; make its first fraction > 0")
        if isinstance(instance.subset, float) and instance.subset > 1:
            raise UserError(f"params: `{key('subset')}` is {instance.subset}; a fraction must be in (0, 1], "
                            "or give an integer count")
    if isinstance(instance, TrainConfig):
        device = instance.device
        valid = device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit())
        if not valid:
            raise UserError(f"params: `{key('device')}` is {device!r}; allowed: auto | cpu | cuda | cuda:N | mps")
    if isinstance(instance, JointVAEConfig):
        for i, categories in enumerate(instance.discrete):
            if categories < 2:
                raise UserError(f"params: `{key('discrete')}[{i}]` is {categories}; a discrete variable needs "
                                "at least 2 categories")
        if instance.continuous == 0 and not instance.discrete:
            raise UserError(f"params: `{key('continuous')}` is 0 and `{key('discrete')}` is empty; "
                            "the latent needs at least one dimension")
    if isinstance(instance, VQVAEConfig):
        d = instance.downsample
        if d & (d - 1):
            raise UserError(f"params: `{key('downsample')}` is {d}; it must be a power of two (2, 4, 8, ...)")
    if isinstance(instance, Params):
        if len(set(instance.models)) != len(instance.models):
            raise UserError(f"params: `models` lists a family twice: {instance.models}")


def parse_value(text: str) -> Any:
    """A command-line override value, read as YAML (so `3`, `0.5`, `true`, `null`, `[3, 2]` work)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"params: cannot set `{dotted}`: `{part}` is not a section")
        node = child
    node[parts[-1]] = value


def read_params_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"params file {path} not found; pass --params PATH or run in the project root")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"params file {path} is not valid YAML{where}; fix its syntax") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"params file {path} must be a mapping of sections (seed, data, train, ...)")
    return raw


def load_params(path: Path | str = "params.yaml", overrides: dict[str, Any] | None = None,
                missing_ok: bool = False) -> Params:
    """Read and validate a params file, then apply `overrides` (dotted key → value)."""
    path = Path(path)
    raw = {} if missing_ok and not path.exists() else read_params_file(path)
    for dotted, value in (overrides or {}).items():
        apply_override(raw, dotted, value)
    return build(Params, raw)


def parse_set_options(pairs: list[str]) -> dict[str, Any]:
    """`--set key.sub=value` options into an overrides mapping."""
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set {pair!r} must look like key.sub=value (for example vqvae.num_codes=256)")
        dotted, text = pair.split("=", 1)
        overrides[dotted.strip()] = parse_value(text)
    return overrides


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
