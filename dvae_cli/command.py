"""The Typer plumbing every `dvae` command shares: the app, the params options declared once, flags that override
one param, the summary table, and the error convention (a user mistake: one line on stderr and exit 2; a bug: exit 1,
`--debug` or DVAE_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import functools
import inspect
import os
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dvae_cli import __version__
from dvae_cli.core.errors import UserError
from dvae_cli.core.files import refused_write, remove_pending_temporaries
from dvae_cli.core.progress import console
from dvae_cli.models import FAMILIES, get_family
from dvae_cli.params import load_params, parse_set_options, parse_value, preset_names

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]},
                  help="dvae: discrete representations of image datasets (JointVAE, VQ-VAE) as a DVC pipeline.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dvae {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks of internal errors (or set DVAE_DEBUG=1)")] = False,
) -> None:
    """dvae: discrete representations of image datasets (JointVAE, VQ-VAE) as a DVC pipeline."""
    # The environment, not a click context: recent typer vendors click, so click.get_current_context() sees
    # no context; the variable also reaches worker processes (torchrun, data loaders).
    if debug:
        os.environ["DVAE_DEBUG"] = "1"


def _debug_enabled() -> bool:
    return os.environ.get("DVAE_DEBUG", "") not in ("", "0")


def user_facing(function: Callable[..., Any]) -> Callable[..., Any]:
    """Turn UserError into one line on stderr and exit 2; a bug into a short message and exit 1."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except UserError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise
        except Exception as error:
            # A write refused outside the atomic writers (DVCLive's files, a folder made on the way).
            named = isinstance(error, OSError) and error.filename
            failure = refused_write(Path(error.filename), error) if named else None
            if failure is not None:
                typer.echo(f"error: {failure}", err=True)
                raise typer.Exit(2) from None
            if _debug_enabled():
                raise
            typer.echo(f"dvae: internal error: {type(error).__name__}: {error} (run with --debug for the traceback)",
                       err=True)
            raise typer.Exit(1) from None

    return wrapper


@dataclass(frozen=True)
class Flag:
    """A command-line flag that overrides one param: `key` (`{model}` stands for the --model family)."""

    key: str
    type: type
    help: str | None = None
    names: tuple[str, ...] = ()
    yaml: bool = False
    """Read the value as YAML (so `null` is a value) instead of as `type`."""

    def option(self, name: str) -> Any:
        flag = f"--{name.replace('_', '-')}"
        names = (f"{flag}/--no-{name.replace('_', '-')}",) if self.type is bool else (flag, *self.names)
        help_text = self.help or f"override {self.key.replace('{model}', 'MODEL')}"
        return Annotated[self.type | None, typer.Option(*names, help=help_text)]


def complete_family(incomplete: str) -> list[str]:
    return [name for name in FAMILIES if name.startswith(incomplete)]


def complete_code_map_family(incomplete: str) -> list[str]:
    return [name for name, family in FAMILIES.items() if family.code_map and name.startswith(incomplete)]


def complete_preset(incomplete: str) -> list[str]:
    return [name for name in preset_names() if name.startswith(incomplete)]


DEVICE = Flag("runtime.device", str)
SEED = Flag("seed", int)
DEFAULT_PARAMS_FILE = Path("params.yaml")


def may_be_missing(params_file: Path) -> bool:
    """Only the default params file may be absent: the built-in defaults stand in for it (a named one must exist)."""
    return params_file == DEFAULT_PARAMS_FILE


ParamsFileOption = Annotated[Path, typer.Option("--params", help="params file", show_default=True)]
PresetOption = Annotated[str | None, typer.Option(
    "--preset", help="overlay merged over the params file: a name in presets/ or a .yaml path",
    autocompletion=complete_preset)]
SetOption = Annotated[list[str] | None, typer.Option("--set", "-S",
                                                     help="override any param: key.sub=value (repeatable)")]
SHARED_OPTIONS = {"params_file": (ParamsFileOption, DEFAULT_PARAMS_FILE), "preset": (PresetOption, None),
                  "set_": (SetOption, None)}
"""Options every command that reads params takes, declared here once."""


def command(name: str, example: str, **flags: Flag) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `function(params, ...)` as the command `name`: it gains the shared params options and `flags`, and
    receives the merged params (and `model` as the family's name, checked before params are read). `example`, a
    command line, ends its help."""

    def register(function: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(function, eval_str=True).parameters.values() if p.name != "params"]
        added = [inspect.Parameter(flag, inspect.Parameter.KEYWORD_ONLY, annotation=spec.option(flag), default=None)
                 for flag, spec in flags.items()]
        added += [inspect.Parameter(option, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
                  for option, (annotation, default) in SHARED_OPTIONS.items()]
        parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + added

        @functools.wraps(function)
        def wrapper(**values: Any) -> Any:
            if "model" in values:
                values["model"] = get_family(values["model"]).name
            overrides = parse_set_options(values.pop("set_") or [])
            for flag, spec in flags.items():
                value = values.pop(flag)
                if value is not None:
                    key = spec.key.replace("{model}", values.get("model", ""))
                    overrides[key] = parse_value(value) if spec.yaml else value
            params_file, preset = values.pop("params_file"), values.pop("preset")
            params = load_params(params_file, overrides, missing_ok=may_be_missing(params_file), preset=preset)
            return function(params, **values)

        del wrapper.__wrapped__  # Typer reads the signature below, not the function's
        wrapper.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return app.command(name, epilog=f"\b\nExample: {example}")(user_facing(wrapper))

    return register


def show(title: str, rows: Iterable[tuple[Any, ...]], columns: tuple[str, ...] = ("", "value"),
         caption: str | None = None) -> None:
    """One summary table: the first column names a row, the others (right-aligned when numeric) hold its values."""
    cells = [[value if isinstance(value, str) else f"{value:.5g}" for value in row] for row in rows]
    table = Table(title=title, caption=caption)
    for i, column in enumerate(columns):
        numeric = i > 0 and all(_is_number(row[i]) for row in cells)
        table.add_column(column, justify="right" if numeric else "left")
    for row in cells:
        table.add_row(*row)
    console().print(table)


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def path_option(help_text: str, *names: str) -> Any:
    return Annotated[Path | None, typer.Option(*names, help=help_text)]


def notes(messages: Iterable[str]) -> None:
    for message in messages:
        typer.echo(f"note: {message}", err=True)


def terminate(signum: int, frame: object) -> None:
    # Raising from a signal handler is unreliable (an exception that lands in a finalizer is dropped, and h5py
    # runs many), so remove the temporary files being written and exit at once: no artifact looks complete.
    remove_pending_temporaries()
    os.write(2, b"interrupted\n" if signum == signal.SIGINT else b"terminated\n")
    os._exit(128 + signum)
