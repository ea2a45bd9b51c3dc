"""Typed, validated config objects built from YAML mappings (params.yaml, config.json's model section).

A config is a frozen dataclass whose fields are declared with `param` (help line and numeric bounds). `build`
checks every key of a mapping against it: unknown keys (with a "did you mean"), wrong types and out-of-range
values are `UserError`s that name the dotted key and what is allowed; missing keys take the defaults. A class may
define `validate(self, key)` for checks across fields, where `key(name)` gives a field's dotted name.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import field
from typing import Any, Literal

from dvae_cli.core.errors import UserError

DERIVED = "derived"
"""Field metadata flag: the field is filled by the loader, never read from the mapping."""


def param(default: Any = dataclasses.MISSING, *, help: str, ge: float | None = None, gt: float | None = None,
          le: float | None = None, lt: float | None = None, factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its help line and numeric bounds (checked on load)."""
    metadata = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


KeyName = Callable[[str], str]
"""key(field name) → the field's dotted name in the file, for error messages."""


def type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(a) if isinstance(a, str) else str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"a list of {type_name(typing.get_args(annotation)[0])}"
    if dataclasses.is_dataclass(annotation):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(annotation, str(annotation))


def convert(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against `annotation`; return it converted (int → float, mappings → dataclasses)."""
    origin = typing.get_origin(annotation)
    wrong = UserError(f"params: `{key}` is {value!r}, expected {type_name(annotation)}; fix it in the params file or flag")
    if origin is Literal:
        # `type(...) is` so that 1.0 and True are not taken for the allowed 1
        if any(value == option and type(value) is type(option) for option in typing.get_args(annotation)):
            return value
        raise UserError(f"params: `{key}` is {value!r}; allowed: {type_name(annotation)}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(annotation):
            return None
        for option in typing.get_args(annotation):
            if option is type(None):
                continue
            try:
                return convert(value, option, key)
            except UserError:
                continue
        raise wrong
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise wrong
        (item,) = typing.get_args(annotation)
        return [convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
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


def build(cls: type, raw: dict[str, Any], prefix: str = "", also_allowed: Sequence[str] = ()) -> Any:
    """Build dataclass `cls` from a mapping, validating every key; missing keys take the defaults.

    `also_allowed` names keys handled elsewhere, offered in "did you mean" hints.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get(DERIVED)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            known = [*fields, *also_allowed]
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean `{(prefix + '.') if prefix else ''}{close[0]}`?" if close else \
                f"allowed keys: {', '.join(known)}"
            raise UserError(f"params: unknown key `{dotted}`; {hint}")
        converted = convert(_with_field_default(fields[key], value), hints[key], dotted)
        _check_bounds(converted, dict(fields[key].metadata), dotted)
        values[key] = converted
    instance = cls(**values)
    validate = getattr(instance, "validate", None)
    if validate is not None:
        validate(lambda name: f"{prefix}.{name}" if prefix else name)
    return instance


def flatten(sections: Mapping[str, Any], separator: str = ".") -> dict[str, Any]:
    """Nested sections as one level: {"factors": {"mig": m}} → {"factors<separator>mig": m} (a list is one value)."""
    flat: dict[str, Any] = {}
    for name, value in sections.items():
        if isinstance(value, Mapping):
            flat.update({f"{name}{separator}{inner}": v for inner, v in flatten(value, separator).items()})
        else:
            flat[name] = value
    return flat
