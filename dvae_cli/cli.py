"""The `dvae` program: a thin Typer layer over the stage functions.

Each command loads params (flag > preset > params file > default), calls one plain function and prints a summary.
User mistakes exit 2 with one line on stderr; bugs exit 1 (`--debug` or DVAE_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from dvae_cli import __version__
from dvae_cli.core.errors import UserError, warn
from dvae_cli.core.files import refused_write, remove_pending_temporaries
from dvae_cli.core.progress import console
from dvae_cli.families import FAMILIES, code_map_name, get_family
from dvae_cli.params import Params, load_params, parse_set_options

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="dvae: discrete representations of image datasets (JointVAE, VQ-VAE) as a DVC pipeline.")

F = TypeVar("F", bound=Callable[..., Any])

ParamsOption = Annotated[Path, typer.Option("--params", help="params file", show_default=True)]
PresetOption = Annotated[str | None, typer.Option(
    "--preset", help="overlay merged over the params file: a name in presets/ or a .yaml path")]
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

    return wrapper  # type: ignore[return-value]


def params_with(params_file: Path, preset: str | None, set_options: list[str] | None, **flags: Any) -> Params:
    """Load params and the preset, then apply `--set` options and the command's own flags (dotted key → value)."""
    overrides = parse_set_options(set_options or [])
    overrides.update({key.replace("__", "."): value for key, value in flags.items() if value is not None})
    return load_params(params_file, overrides, missing_ok=params_file == Path("params.yaml"), preset=preset)


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
    params_file: ParamsOption = Path("params.yaml"),
    preset: PresetOption = None,
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
    from dvae_cli.stages.prepare import describe_skipped, prepare_data

    # Through --set, where `null` (keep every image) is a value, not an absent flag.
    subset_option = [] if subset is None else [f"data.subset={subset}"]
    params = params_with(params_file, preset, [*(set_ or []), *subset_option], data__dataset=dataset, data__root=root,
                         data__image_size=image_size, data__channels=channels, seed=seed)
    summary = prepare_data(params, out)
    for message in summary.warnings:
        warn(message)
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
        table.add_row("unreadable files skipped", describe_skipped(summary.skipped))
    table.add_row("file size", f"{summary.file_bytes / 1e6:.1f} MB")
    table.add_row("seconds", f"{summary.seconds:.1f}")
    console().print(table)


ModelOption = Annotated[str, typer.Option("--model", "-m", help=f"model family: {' | '.join(FAMILIES)}")]
ForceOption = Annotated[bool, typer.Option(help="use weights that config.json's weights_sha256 does not name")]
DatasetOption = Annotated[Path, typer.Option("--dataset", help="dataset file")]


def check_family(model: str) -> str:
    return get_family(model).name


@app.command("train")
@user_facing
def train_command(
    model: ModelOption,
    params_file: ParamsOption = Path("params.yaml"),
    preset: PresetOption = None,
    dataset: DatasetOption = Path("data/prepared/dataset.h5"),
    out: Annotated[Path | None, typer.Option(help="model folder [default: models/MODEL]")] = None,
    live: Annotated[Path | None, typer.Option(help="DVCLive folder [default: dvclive/MODEL]")] = None,
    epochs: Annotated[int | None, typer.Option(help="override MODEL.epochs")] = None,
    batch_size: Annotated[int | None, typer.Option(help="override MODEL.batch_size (the global batch)")] = None,
    lr: Annotated[float | None, typer.Option(help="override MODEL.lr")] = None,
    max_steps: Annotated[int | None, typer.Option(help="override train.max_steps")] = None,
    device: Annotated[str | None, typer.Option(help="override runtime.device")] = None,
    precision: Annotated[str | None, typer.Option(help="override runtime.precision")] = None,
    seed: Annotated[int | None, typer.Option(help="override seed")] = None,
    restart: Annotated[bool, typer.Option(help="ignore an existing checkpoint and start over")] = False,
    restart_on_mismatch: Annotated[bool, typer.Option(
        help="resume a matching checkpoint, start over when params changed (what the DVC stage uses)")] = False,
    nproc: Annotated[int | None, typer.Option(
        help="run N data-parallel processes on this machine through torchrun (one per GPU)", min=1)] = None,
    set_: SetOption = None,
) -> None:
    """Train a model (resumes from its checkpoint when one matches)."""
    from dvae_cli.stages.train import TrainPaths, train

    family = check_family(model)
    if nproc is not None and nproc > 1:
        from dvae_cli.core.distributed import launch_with_torchrun

        raise typer.Exit(launch_with_torchrun(nproc, sys.argv[1:]))
    params = params_with(params_file, preset, set_, **{f"{family}__epochs": epochs, f"{family}__batch_size": batch_size,
                                          f"{family}__lr": lr, "train__max_steps": max_steps,
                                          "runtime__device": device, "runtime__precision": precision, "seed": seed})
    paths = TrainPaths(dataset=dataset, model_dir=out or Path("models") / family,
                       live_dir=live or Path("dvclive") / family)
    result = train(params, family, paths, restart=restart, restart_on_mismatch=restart_on_mismatch)
    if result.resumed_from:
        typer.echo(f"{family}: resumed from step {result.resumed_from} of {paths.checkpoint}", err=True)
    if result.metrics:
        table = Table(title=f"{family}: {result.steps} steps in {result.seconds:.0f} s")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in result.metrics.items():
            table.add_row(name, f"{value:.5g}")
        console().print(table)


@app.command("encode")
@user_facing
def encode_command(
    model: ModelOption,
    params_file: ParamsOption = Path("params.yaml"),
    preset: PresetOption = None,
    dataset: DatasetOption = Path("data/prepared/dataset.h5"),
    model_dir: Annotated[Path | None, typer.Option(help="model folder [default: models/MODEL]")] = None,
    out: Annotated[Path | None, typer.Option(help="codes file to write [default: data/codes/MODEL.h5]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="override encode.batch_size")] = None,
    device: Annotated[str | None, typer.Option(help="override runtime.device")] = None,
    force: ForceOption = False,
    set_: SetOption = None,
) -> None:
    """Encode every dataset row into a codes file (VQ-VAE code maps, JointVAE latents)."""
    from dvae_cli.stages.encode import EncodePaths, encode_dataset

    family = check_family(model)
    params = params_with(params_file, preset, set_, encode__batch_size=batch_size, runtime__device=device)
    paths = EncodePaths(dataset=dataset, model_dir=model_dir or Path("models") / family,
                        out=out or Path("data/codes") / f"{family}.h5")
    result = encode_dataset(params, family, paths, force=force)
    if result is None:  # a torchrun rank other than 0: rank 0 wrote the file
        return
    table = Table(title=f"{result.path}: {result.num_rows:,} rows")
    table.add_column("array")
    table.add_column("type and shape")
    for name, description in result.arrays.items():
        table.add_row(name, description)
    table.add_row("images/s", f"{result.images_per_second:,.0f}")
    table.add_row("file size", f"{result.file_bytes / 1e6:.1f} MB")
    table.add_row("seconds", f"{result.seconds:.1f}")
    console().print(table)


@app.command("decode")
@user_facing
def decode_command(
    codes: Annotated[Path, typer.Argument(help="codes file written by `dvae encode`")],
    out: Annotated[Path, typer.Option(help="output: a .png grid or a dataset-format .h5")],
    rows: Annotated[str | None, typer.Option(help="rows START:STOP to decode [default: the first 64]")] = None,
    model_dir: Annotated[Path | None, typer.Option(help="model folder [default: the one the codes file names]")] = None,
    force: Annotated[bool, typer.Option(
        help="decode even when the model's weights are not the encoder's, or not those config.json names")] = False,
    params_file: ParamsOption = Path("params.yaml"),
    preset: PresetOption = None,
    batch_size: Annotated[int | None, typer.Option(help="override encode.batch_size")] = None,
    device: Annotated[str | None, typer.Option(help="override runtime.device")] = None,
    set_: SetOption = None,
) -> None:
    """Decode rows of a codes file into a PNG grid or a dataset-format HDF5."""
    from dvae_cli.stages.decode import decode_codes_file

    params = params_with(params_file, preset, set_, encode__batch_size=batch_size, runtime__device=device)
    result = decode_codes_file(params, codes, out, rows, model_dir=model_dir, force=force)
    if not result.weights_match:
        typer.echo(f"warning: {result.model_dir} is not the model that wrote {codes} (--force)", err=True)
    typer.echo(f"decoded rows {result.rows.start}:{result.rows.stop} into {result.path} "
               f"({result.seconds:.1f} s)", err=True)


@app.command("evaluate")
@user_facing
def evaluate_command(
    model: ModelOption,
    params_file: ParamsOption = Path("params.yaml"),
    preset: PresetOption = None,
    dataset: DatasetOption = Path("data/prepared/dataset.h5"),
    model_dir: Annotated[Path | None, typer.Option(help="model folder [default: models/MODEL]")] = None,
    codes: Annotated[Path | None, typer.Option(help="codes file [default: data/codes/MODEL.h5]")] = None,
    out: Annotated[Path | None, typer.Option(help="metrics file [default: metrics/MODEL.json]")] = None,
    num_samples: Annotated[int | None, typer.Option(help="override evaluate.num_samples")] = None,
    dci: Annotated[bool | None, typer.Option("--dci/--no-dci", help="override evaluate.dci")] = None,
    batch_size: Annotated[int | None, typer.Option(help="override evaluate.batch_size")] = None,
    device: Annotated[str | None, typer.Option(help="override runtime.device")] = None,
    seed: Annotated[int | None, typer.Option(help="override seed")] = None,
    force: ForceOption = False,
    set_: SetOption = None,
) -> None:
    """Compute the metrics of a trained model on the test split (val when there is none) into metrics/MODEL.json."""
    from dvae_cli.families.evaluation import flatten
    from dvae_cli.stages.evaluate import EvaluatePaths, evaluate

    family = check_family(model)
    params = params_with(params_file, preset, set_, evaluate__num_samples=num_samples, evaluate__dci=dci,
                         evaluate__batch_size=batch_size, runtime__device=device, seed=seed)
    paths = EvaluatePaths(model_dir=model_dir or Path("models") / family, dataset=dataset,
                          codes=codes or Path("data/codes") / f"{family}.h5",
                          metrics=out or Path("metrics") / f"{family}.json")
    result = evaluate(params, family, paths, force=force)
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    table = Table(title=f"{family}: {result.split_name} split, {result.num_images:,} images",
                  caption=f"written to {result.path}")
    table.add_column("metric")
    table.add_column("value", justify="right")

    for name, value in flatten(result.metrics, ".").items():
        table.add_row(name, str(value) if isinstance(value, int) else f"{value:.5g}")
    console().print(table)


@app.command("render")
@user_facing
def render_command(
    model: ModelOption,
    params_file: ParamsOption = Path("params.yaml"),
    preset: PresetOption = None,
    dataset: DatasetOption = Path("data/prepared/dataset.h5"),
    model_dir: Annotated[Path | None, typer.Option(help="model folder [default: models/MODEL]")] = None,
    out: Annotated[Path | None, typer.Option(help="folder of the pictures (replaced) [default: renders/MODEL]")] = None,
    base: Annotated[int | None, typer.Option(help="override render.base_index: test image the traversals start from")
                    ] = None,
    steps: Annotated[int | None, typer.Option(help="override render.steps: columns of a traversal")] = None,
    seed: Annotated[int | None, typer.Option(help="override render.seed: prior samples and chosen images")] = None,
    device: Annotated[str | None, typer.Option(help="override runtime.device")] = None,
    force: ForceOption = False,
    set_: SetOption = None,
) -> None:
    """Draw traversals, reconstructions, samples and code maps as PNGs (and code usage as a CSV)."""
    from dvae_cli.stages.render import render

    family = check_family(model)
    params = params_with(params_file, preset, set_, render__base_index=base, render__steps=steps, render__seed=seed,
                         runtime__device=device)
    result = render(params, family, model_dir or Path("models") / family, dataset, out or Path("renders") / family,
                    force=force)
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    table = Table(title=f"{result.folder}: {len(result.files)} files in {result.seconds:.1f} s")
    table.add_column("file")
    table.add_column("pixels", justify="right")
    for name, size in result.files.items():
        table.add_row(name, "data" if size is None else f"{size[0]}×{size[1]}")
    console().print(table)


@app.command("prior")
@user_facing
def prior_command(
    model: ModelOption,
    params_file: ParamsOption = Path("params.yaml"),
    preset: PresetOption = None,
    codes: Annotated[Path | None, typer.Option(help="codes file [default: data/codes/MODEL.h5]")] = None,
    model_dir: Annotated[Path | None, typer.Option(help="the model that wrote the codes [default: models/MODEL]")
                         ] = None,
    out: Annotated[Path | None, typer.Option(help="prior folder [default: models/MODEL-prior]")] = None,
    live: Annotated[Path | None, typer.Option(help="DVCLive folder [default: dvclive/MODEL-prior]")] = None,
    metrics: Annotated[Path | None, typer.Option(help="test NLL file [default: metrics/MODEL-prior.json]")] = None,
    epochs: Annotated[int | None, typer.Option(help="override prior.epochs")] = None,
    max_steps: Annotated[int | None, typer.Option(help="override train.max_steps")] = None,
    device: Annotated[str | None, typer.Option(help="override runtime.device")] = None,
    seed: Annotated[int | None, typer.Option(help="override seed")] = None,
    restart: Annotated[bool, typer.Option(help="ignore an existing checkpoint and start over")] = False,
    restart_on_mismatch: Annotated[bool, typer.Option(
        help="resume a matching checkpoint, start over when params changed (what the DVC stage uses)")] = False,
    set_: SetOption = None,
) -> None:
    """Train an autoregressive prior over the code maps of the codes file's train split; report its test NLL."""
    from dvae_cli.stages.prior import PriorPaths, train_prior

    family = check_family(model)
    code_map_name(family)
    params = params_with(params_file, preset, set_, prior__epochs=epochs, train__max_steps=max_steps,
                         runtime__device=device, seed=seed)
    paths = PriorPaths(codes=codes or Path("data/codes") / f"{family}.h5",
                       model_dir=model_dir or Path("models") / family, out=out or Path("models") / f"{family}-prior",
                       live_dir=live or Path("dvclive") / f"{family}-prior",
                       metrics=metrics or Path("metrics") / f"{family}-prior.json")
    result = train_prior(params, family, paths, restart=restart, restart_on_mismatch=restart_on_mismatch)
    if result.resumed_from:
        typer.echo(f"{family} prior: resumed from step {result.resumed_from} of {paths.folders.checkpoint}", err=True)
    test = json.loads(paths.metrics.read_text())["test"]
    table = Table(title=f"{family} prior: {result.steps} steps in {result.seconds:.0f} s",
                  caption=f"written to {paths.out} and {paths.metrics}")
    table.add_column(f"{test['split']} split, {test['maps']:,} code maps")
    table.add_column("value", justify="right")
    table.add_row("bits per code", f"{test['bits_per_code']:.4f}")
    table.add_row("bits per image", f"{test['bits_per_image']:.1f}")
    table.add_row("bits per image, uniform codes", f"{test['uniform_bits_per_image']:.1f}")
    console().print(table)


@app.command("sample")
@user_facing
def sample_command(
    model: ModelOption,
    params_file: ParamsOption = Path("params.yaml"),
    preset: PresetOption = None,
    prior_dir: Annotated[Path | None, typer.Option("--prior", help="prior folder [default: models/MODEL-prior]")
                         ] = None,
    model_dir: Annotated[Path | None, typer.Option(help="model folder that decodes [default: models/MODEL]")] = None,
    out: Annotated[Path | None, typer.Option(
        help="PNG of the samples [default: renders/MODEL-prior/prior_samples.png]")] = None,
    codes_out: Annotated[Path | None, typer.Option(
        help="codes file of the drawn maps [default: data/codes/MODEL-samples.h5]")] = None,
    count: Annotated[int | None, typer.Option("--count", "-n", help="override prior.sample.count")] = None,
    temperature: Annotated[float | None, typer.Option(help="override prior.sample.temperature")] = None,
    top_k: Annotated[int | None, typer.Option(help="override prior.sample.top_k")] = None,
    device: Annotated[str | None, typer.Option(help="override runtime.device")] = None,
    seed: Annotated[int | None, typer.Option(help="override seed")] = None,
    set_: SetOption = None,
) -> None:
    """Draw code maps from the prior and decode them: a PNG grid and a codes file `dvae decode` reads."""
    from dvae_cli.stages.sample import SamplePaths, draw

    family = check_family(model)
    code_map_name(family)
    params = params_with(params_file, preset, set_, prior__sample__count=count, prior__sample__temperature=temperature,
                         prior__sample__top_k=top_k, runtime__device=device, seed=seed)
    paths = SamplePaths(prior_dir=prior_dir or Path("models") / f"{family}-prior",
                        model_dir=model_dir or Path("models") / family,
                        picture=out or Path("renders") / f"{family}-prior" / "prior_samples.png",
                        codes=codes_out or Path("data/codes") / f"{family}-samples.h5")
    result = draw(params, paths, family)
    per_class = f", {result.count // len(result.classes)} per class" if result.classes else ""
    typer.echo(f"drew {result.count} code maps{per_class} into {result.picture} and {result.codes} "
               f"({result.seconds:.1f} s)", err=True)


@app.command("compare")
@user_facing
def compare_command(
    model: ModelOption,
    params_file: ParamsOption = Path("params.yaml"),
    preset: PresetOption = None,
    dataset: DatasetOption = Path("data/prepared/dataset.h5"),
    model_dir: Annotated[Path | None, typer.Option(help="model folder [default: models/MODEL]")] = None,
    codes: Annotated[Path | None, typer.Option(help="codes file [default: data/codes/MODEL.h5]")] = None,
    prior_dir: Annotated[Path | None, typer.Option("--prior", help="prior folder [default: models/MODEL-prior]")
                         ] = None,
    table: Annotated[Path | None, typer.Option(
        help="CSV of every point [default: renders/MODEL-prior/rate_distortion.csv]")] = None,
    out: Annotated[Path | None, typer.Option(
        help="PNG plot [default: renders/MODEL-prior/rate_distortion.png]")] = None,
    metrics: Annotated[Path | None, typer.Option(
        help="summary [default: metrics/MODEL-rate-distortion.json]")] = None,
    device: Annotated[str | None, typer.Option(help="override runtime.device")] = None,
    seed: Annotated[int | None, typer.Option(help="override seed (the patch k-means sample)")] = None,
    set_: SetOption = None,
) -> None:
    """Rate–distortion on the test split: the codes (plain and coded by the prior) against k-means VQ, JPEG, WebP."""
    from dvae_cli.stages.compare import ComparePaths, compare

    family = check_family(model)
    code_map_name(family)
    params = params_with(params_file, preset, set_, runtime__device=device, seed=seed)
    folder = Path("renders") / f"{family}-prior"
    paths = ComparePaths(dataset=dataset, model_dir=model_dir or Path("models") / family,
                         codes=codes or Path("data/codes") / f"{family}.h5",
                         prior_dir=prior_dir or Path("models") / f"{family}-prior",
                         table=table or folder / "rate_distortion.csv", picture=out or folder / "rate_distortion.png",
                         metrics=metrics or Path("metrics") / f"{family}-rate-distortion.json")
    result = compare(params, family, paths)
    summary = Table(title=f"{family}: rate–distortion on {result.summary['images']:,} images ({result.seconds:.0f} s)",
                    caption=f"every point in {paths.table}, plotted in {paths.picture}")
    summary.add_column("method")
    summary.add_column("setting")
    summary.add_column("bits per image", justify="right")
    summary.add_column("PSNR dB", justify="right")
    for point in result.points:
        summary.add_row(point.method, point.setting, f"{point.bits_per_image:,.0f}", f"{point.psnr:.2f}")
    console().print(summary)


@app.command("import-reference")
@user_facing
def import_reference_command(
    model_pt: Annotated[Path, typer.Argument(help="the reference JointVAE's model.pt (a state dict)")],
    specs: Annotated[Path | None, typer.Option(help="its specs.json [default: specs.json beside MODEL_PT]")] = None,
    out: Annotated[Path | None, typer.Option(help="model folder to write [default: models/jointvae]")] = None,
    force: Annotated[bool, typer.Option(help="replace OUT when it exists and is not empty")] = False,
    params_file: ParamsOption = Path("params.yaml"),
    preset: PresetOption = None,
    set_: SetOption = None,
) -> None:
    """Turn a reference JointVAE checkpoint (model.pt + specs.json) into a model folder encode/evaluate/render read."""
    from dvae_cli.families.jointvae import FAMILY
    from dvae_cli.families.jointvae.reference import import_reference

    params = params_with(params_file, preset, set_)
    result = import_reference(model_pt, specs or model_pt.with_name("specs.json"),
                              out or Path("models") / FAMILY.name, params.model_config(FAMILY.name), force=force)
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    config, data = result.config, result.data
    table = Table(title=f"{result.folder}: imported {model_pt}",
                  caption=f"next: dvae encode --model {FAMILY.name} --model-dir {result.folder}")
    table.add_column("")
    table.add_column("value")
    table.add_row("reference dataset", result.dataset)
    table.add_row("image shape", f"{data.channels}×{data.image_size}×{data.image_size}")
    table.add_row("continuous", str(config.continuous))
    table.add_row("discrete", str(config.discrete))
    for name, schedule in (("C_z", config.cont_capacity), ("C_c", config.disc_capacity)):
        table.add_row(name, f"max {schedule.max:g} nats over {schedule.steps:,} steps, γ {schedule.gamma:g}")
    table.add_row("temperature, lr, batch size", f"{config.temperature:g}, {config.lr:g}, {config.batch_size}")
    table.add_row("parameters", f"{result.num_parameters:,}")
    table.add_row("weights sha256", result.weights_sha256[:16])
    console().print(table)


def _terminate(signum: int, frame: object) -> None:
    # Raising from a signal handler is unreliable (an exception that lands in a finalizer is dropped, and h5py
    # runs many), so remove the temporary files being written and exit at once: no artifact looks complete.
    remove_pending_temporaries()
    os.write(2, b"interrupted\n" if signum == signal.SIGINT else b"terminated\n")
    os._exit(128 + signum)


def run() -> None:
    """Console-script entry point: Ctrl-C and SIGTERM remove the temporary files being written, then exit 130 / 143."""
    signal.signal(signal.SIGINT, _terminate)
    signal.signal(signal.SIGTERM, _terminate)
    app()
