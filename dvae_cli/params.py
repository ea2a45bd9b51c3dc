"""params.yaml as typed, validated config objects: the one set of defaults and the loader.

Sections: seed, models, data, runtime (read by every stage), train (the shared training loop), encode, evaluate,
render, and one section per registered model (`models.SECTIONS`: the families and the prior). A section whose
reader sits below params in the floor plan is declared beside it (the models' in `models/`, `data` in `sources`,
`runtime` in `core.runtime`, `evaluate` in `scoring.evaluation`); train, encode and render, read by the trainer and
the stages above params, are declared here. Precedence:
command-line flag > preset > params file > the defaults declared in the config classes. Unknown keys,
wrong types, out-of-range values and keys of an older layout are `UserError`s that name the key.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dvae_cli.core.errors import UserError
from dvae_cli.core.runtime_config import RuntimeConfig
from dvae_cli.core.schema import DERIVED, KeyName, build, convert, flatten, param
from dvae_cli.models import FAMILIES, SECTIONS
from dvae_cli.scoring.config import EvaluateConfig
from dvae_cli.sources import DataConfig

PRESETS_FOLDER = Path("presets")
MOVED_KEYS = {"train.device": "runtime.device", "train.precision": "runtime.precision",
              "train.compile": "runtime.compile"}
"""Keys of an older params layout → where they live now."""


@dataclass(frozen=True)
class TrainConfig:
    """The training loop every family shares."""

    checkpoint_every: int = param(500, help="steps between checkpoints", ge=1)
    log_every: int = param(50, help="steps between logged points", ge=1)
    max_steps: int | None = param(None, help="stop after this many steps (null: train all epochs)", ge=1)
    eval_every: int | None = param(250, help="steps between evaluations of a validation sample logged as curves "
                                             "(MIG, FactorVAE, accuracies, reconstruction); null: off", ge=1)


@dataclass(frozen=True)
class EncodeConfig:
    batch_size: int = param(512, help="images per encoding batch", ge=1, le=1 << 16)


@dataclass(frozen=True)
class RenderConfig:
    steps: int = param(8, help="columns of a traversal", ge=2, le=256)
    base_index: int = param(0, help="test image the traversals start from", ge=0)
    seed: int = param(0, help="seed for prior samples and chosen images", ge=0)


def _default_model_configs() -> Mapping[str, Any]:
    return {name: config() for name, config in SECTIONS.items()}


@dataclass(frozen=True)
class Params:
    seed: int = param(0, help="seed of everything random", ge=0)
    models: list[str] = param(factory=lambda: list(FAMILIES), help="model families `dvc repro` trains")
    data: DataConfig = param(factory=DataConfig, help="dataset preparation")
    runtime: RuntimeConfig = param(factory=RuntimeConfig, help="device, precision and compilation of every stage")
    train: TrainConfig = param(factory=TrainConfig, help="the training loop, shared by all models")
    encode: EncodeConfig = param(factory=EncodeConfig, help="dvae encode")
    evaluate: EvaluateConfig = param(factory=EvaluateConfig, help="dvae evaluate")
    render: RenderConfig = param(factory=RenderConfig, help="dvae render")
    model_configs: Mapping[str, Any] = field(default_factory=_default_model_configs, metadata={DERIVED: True})
    """Model name → its section (the model's config class), for every registered model."""

    def model_config(self, name: str) -> Any:
        return self.model_configs[name]

    def validate(self, key: KeyName) -> None:
        for i, name in enumerate(self.models):
            if name not in FAMILIES:
                raise UserError(f"params: `models[{i}]` is {name!r}; allowed: {' | '.join(map(repr, FAMILIES))}")
        if len(set(self.models)) != len(self.models):
            raise UserError(f"params: `models` lists a family twice: {self.models}")


def build_params(raw: Mapping[str, Any]) -> Params:
    """Params from a whole mapping: model sections by the registry's config classes, the rest by `Params`."""
    for old, new in MOVED_KEYS.items():
        section, name = old.split(".")
        if isinstance(raw.get(section), dict) and name in raw[section]:
            raise UserError(f"params: `{old}` has moved to `{new}`; move it into the `runtime` section")
    rest = {key: value for key, value in raw.items() if key not in SECTIONS}
    model_configs = {name: convert(raw.get(name, {}), config, name) for name, config in SECTIONS.items()}
    params = build(Params, rest, also_allowed=list(SECTIONS))
    return dataclasses.replace(params, model_configs=model_configs)


def to_dict(params: Params) -> dict[str, Any]:
    """The mapping `build_params` reads back into equal params (model sections at the top level)."""
    raw = {f.name: dataclasses.asdict(getattr(params, f.name)) if dataclasses.is_dataclass(getattr(params, f.name))
           else getattr(params, f.name) for f in dataclasses.fields(params) if not f.metadata.get(DERIVED)}
    raw.update({name: dataclasses.asdict(config) for name, config in params.model_configs.items()})
    return raw


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


def merge(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """`overlay` over `base`: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in overlay.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def read_params_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"params file {path} not found; pass --params PATH or run in the project root")
    if not path.is_file():
        raise UserError(f"params file {path} is a folder; pass --params with a YAML file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, PermissionError) as error:
        cause = "not text" if isinstance(error, UnicodeDecodeError) else "not readable (permission denied)"
        raise UserError(f"params file {path} is {cause}; pass --params with a YAML file") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"params file {path} is not valid YAML{where}; fix its syntax") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"params file {path} must be a mapping of sections (seed, data, train, ...)")
    return raw


def preset_names() -> list[str]:
    """The presets under the working folder, by name."""
    return sorted(p.stem for p in PRESETS_FOLDER.glob("*.yaml")) if PRESETS_FOLDER.is_dir() else []


def preset_path(preset: str) -> Path:
    """A preset by name (`presets/NAME.yaml` under the working folder) or by path."""
    path = Path(preset)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESETS_FOLDER / f"{preset}.yaml"
    if not path.exists():
        available = preset_names()
        listed = f"available: {', '.join(available)}" if available else "run in the project root or pass a path"
        raise UserError(f"preset {preset!r} not found ({path}); {listed}")
    return path


def load_params(path: Path | str = "params.yaml", overrides: dict[str, Any] | None = None,
                missing_ok: bool = False, preset: str | None = None) -> Params:
    """Read and validate a params file, merge a preset over it, then apply `overrides` (dotted key → value)."""
    path = Path(path)
    raw = {} if missing_ok and not path.exists() else read_params_file(path)
    if preset is not None:
        raw = merge(raw, read_params_file(preset_path(preset)))
    for dotted, value in (overrides or {}).items():
        apply_override(raw, dotted, value)
    return build_params(raw)


def value_origins(path: Path | str, overrides: Mapping[str, Any] | None = None, missing_ok: bool = False,
                  preset: str | None = None) -> dict[str, str]:
    """Dotted key → where `load_params` with the same arguments takes its value from: the params file's path,
    `preset NAME` or `flag` (a flag or --set); keys none of them sets are absent (the built-in default)."""
    path = Path(path)
    origins = {} if missing_ok and not path.exists() else dict.fromkeys(flatten(read_params_file(path)), str(path))
    if preset is not None:
        origins.update(dict.fromkeys(flatten(read_params_file(preset_path(preset))), f"preset {preset}"))
    for dotted, value in (overrides or {}).items():
        origins.update(dict.fromkeys(flatten({dotted: value}), "flag"))
    return origins


def annotated_yaml(params: Params, origins: Mapping[str, str]) -> str:
    """`params` as YAML, one line per value; a value that is not the built-in default says where it came from."""
    defaults = flatten(to_dict(Params()))
    lines: list[str] = []

    def emit(mapping: Mapping[str, Any], prefix: str, indent: str) -> None:
        for key, value in mapping.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, Mapping) and value:
                lines.append(f"{indent}{key}:")
                emit(value, f"{dotted}.", indent + "  ")
                continue
            line = f"{indent}{key}: {json.dumps(value, ensure_ascii=False)}"
            if dotted not in defaults or value != defaults[dotted]:
                line += f"  # {origins.get(dotted, 'default')}"
            lines.append(line)

    emit(to_dict(params), "", "")
    return "\n".join(lines) + "\n"


def experiment_arguments(params: Params, origins: Mapping[str, str], path: Path | str) -> list[str]:
    """`dvc exp run` options that turn the params file at `path` into `params`: `-S key=value` for each value a
    preset or flag sets (`-S +key=value` where the file lacks the key, as DVC's override grammar asks)."""
    path = Path(path)
    in_file = set(flatten(read_params_file(path))) if path.exists() else set()
    values = flatten(to_dict(params))
    arguments = []
    for key, origin in origins.items():
        if origin != str(path) and key in values:
            arguments += ["-S", f"{'' if key in in_file else '+'}{key}={json.dumps(values[key], ensure_ascii=False)}"]
    return arguments


def parse_set_options(pairs: list[str]) -> dict[str, Any]:
    """`--set key.sub=value` options into an overrides mapping."""
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set {pair!r} must look like key.sub=value (for example vqvae.num_codes=256)")
        dotted, text = pair.split("=", 1)
        overrides[dotted.strip()] = parse_value(text)
    return overrides
