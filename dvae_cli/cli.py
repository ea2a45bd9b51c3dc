"""The `dvae` program: a thin Typer layer over the stage functions.

Each command loads params (flag > params file > default), calls one plain function and prints a summary.
User mistakes exit 2 with one line on stderr; bugs exit 1 (`--debug` or DVAE_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from dvae_cli import __version__
from dvae_cli.config import Params, load_params, parse_set_options, parse_value
from dvae_cli.errors import UserError
from dvae_cli.progress import console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="dvae: discrete representations of image datasets (JointVAE, VQ-VAE) as a DVC pipeline.")

F = TypeVar("F", bound=Callable[..., Any])

ParamsOption = Annotated[Path, typer.Option("--params", help="params file", show_default=True)]
SetOption = Annotated[list[str] | None, typer.Option("--set", "-S", help="override any param: key.sub=value (repeatable)")]


def _debug_enabled() -> bool:
    return os.environ.get("DVAE_DEBUG", "") not in ("", "0")


def user_facing(function: F) -> F:
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
            if _debug_enabled():
                raise
            typer.echo(f"dvae: internal error: {type(error).__name__}: {error} (run with --debug for the traceback)",
                       err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def params_with(params_path: Path, set_options: list[str] | None, **flags: Any) -> Params:
    """Load params, then apply `--set` options and the command's own flags (dotted key → value)."""
    overrides = parse_set_options(set_options or [])
    overrides.update({key.replace("__", "."): value for key, value in flags.items() if value is not None})
    return load_params(params_path, overrides, missing_ok=params_path == Path("params.yaml"))


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


@app.command("prepare-data")
@user_facing
def prepare_data_command(
    params: ParamsOption = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="dataset file to write")] = Path("data/prepared/dataset.h5"),
    dataset: Annotated[str | None, typer.Option(help="source: dsprites | mnist | fashion-mnist | cifar10 | celeba | folder")] = None,
    root: Annotated[str | None, typer.Option(help="folder torchvision and folder sources read")] = None,
    subset: Annotated[str | None, typer.Option(help="keep a seeded random subset: a count or a fraction")] = None,
    image_size: Annotated[int | None, typer.Option(help="square image side")] = None,
    channels: Annotated[int | None, typer.Option(help="1 or 3")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the subset and split")] = None,
    set_: SetOption = None,
) -> None:
    """Write the dataset file from a source (built-in dSprites, torchvision, an image folder)."""
    from dvae_cli.prepare import prepare_data

    config = params_with(params, set_, data__dataset=dataset, data__root=root,
                         data__subset=None if subset is None else parse_value(subset),
                         data__image_size=image_size, data__channels=channels, seed=seed)
    summary = prepare_data(config, out)
    table = Table(title=f"{summary.path}")
    table.add_column("")
    table.add_column("value")
    info = summary.info
    for name, count in summary.split_counts.items():
        table.add_row(f"{name} images", f"{count:,}")
    table.add_row("image shape", f"{info.channels}×{info.image_size}×{info.image_size}")
    table.add_row("labels", f"{info.num_classes} classes" if info.has_labels else "none")
    table.add_row("factors", ", ".join(info.factor_names) if info.has_factors else "none")
    if summary.skipped:
        table.add_row("unreadable files skipped", str(summary.skipped))
    table.add_row("file size", f"{summary.file_bytes / 1e6:.1f} MB")
    table.add_row("seconds", f"{summary.seconds:.1f}")
    console().print(table)


ModelOption = Annotated[str, typer.Option("--model", "-m", help="model family: jointvae | vqvae")]
DatasetOption = Annotated[Path, typer.Option("--dataset", help="dataset file")]


def check_family(model: str) -> str:
    from dvae_cli.config import MODEL_FAMILIES

    if model not in MODEL_FAMILIES:
        raise UserError(f"--model {model!r} is not a model family; choose one of {', '.join(MODEL_FAMILIES)}")
    return model


@app.command("train")
@user_facing
def train_command(
    model: ModelOption,
    params: ParamsOption = Path("params.yaml"),
    dataset: DatasetOption = Path("data/prepared/dataset.h5"),
    out: Annotated[Path | None, typer.Option(help="model folder [default: models/MODEL]")] = None,
    live: Annotated[Path | None, typer.Option(help="DVCLive folder [default: dvclive/MODEL]")] = None,
    epochs: Annotated[int | None, typer.Option(help="override MODEL.epochs")] = None,
    batch_size: Annotated[int | None, typer.Option(help="override MODEL.batch_size (the global batch)")] = None,
    lr: Annotated[float | None, typer.Option(help="override MODEL.lr")] = None,
    max_steps: Annotated[int | None, typer.Option(help="override train.max_steps")] = None,
    device: Annotated[str | None, typer.Option(help="override train.device")] = None,
    precision: Annotated[str | None, typer.Option(help="override train.precision")] = None,
    seed: Annotated[int | None, typer.Option(help="override seed")] = None,
    restart: Annotated[bool, typer.Option(help="ignore an existing checkpoint and start over")] = False,
    restart_on_mismatch: Annotated[bool, typer.Option(
        help="resume a matching checkpoint, start over when params changed (what the DVC stage uses)")] = False,
    set_: SetOption = None,
) -> None:
    """Train a model (resumes from its checkpoint when one matches)."""
    from dvae_cli.trainer import TrainPaths, train

    family = check_family(model)
    config = params_with(params, set_, **{f"{family}__epochs": epochs, f"{family}__batch_size": batch_size,
                                          f"{family}__lr": lr, "train__max_steps": max_steps,
                                          "train__device": device, "train__precision": precision, "seed": seed})
    paths = TrainPaths(dataset=dataset, model_dir=out or Path("models") / family,
                       live_dir=live or Path("dvclive") / family)
    result = train(config, family, paths, restart=restart, restart_on_mismatch=restart_on_mismatch)
    if result.metrics:
        table = Table(title=f"{family}: {result.steps} steps in {result.seconds:.0f} s"
                            + (f" (resumed at step {result.resumed_from})" if result.resumed_from else ""))
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in result.metrics.items():
            table.add_row(name, f"{value:.5g}")
        console().print(table)


def run() -> None:
    """Console-script entry point: SIGTERM unwinds like Ctrl-C so temporary files are removed."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    app()
