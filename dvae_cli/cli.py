"""The `dvae` program: one command per stage, each a thin layer over the stage's `run`.

Each command gets its params merged (flag > preset > params file > default: `command`), calls one stage and shows
a summary. The plumbing every command shares (options, errors, tables) is in `dvae_cli.command`.
"""

from __future__ import annotations

import json
import shlex
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from dvae_cli.command import (
    DEFAULT_PARAMS_FILE,
    DEVICE,
    SEED,
    Flag,
    ParamsFileOption,
    PresetOption,
    SetOption,
    app,
    command,
    complete_code_map_family,
    complete_family,
    may_be_missing,
    notes,
    path_option,
    show,
    terminate,
    user_facing,
)
from dvae_cli.core.errors import warn
from dvae_cli.core.schema import flatten
from dvae_cli.models import FAMILIES, code_map_name
from dvae_cli.params import (
    Params,
    annotated_yaml,
    experiment_arguments,
    load_params,
    parse_set_options,
    value_origins,
)
from dvae_cli.sources import SOURCES

ModelOption = Annotated[str, typer.Option("--model", "-m", help=f"model family: {' | '.join(FAMILIES)}",
                                          autocompletion=complete_family)]
CodeMapModelOption = Annotated[str, typer.Option("--model", "-m", help="the family whose code maps the prior models: "
                                                 f"{' | '.join(n for n, f in FAMILIES.items() if f.code_map)}",
                                                 autocompletion=complete_code_map_family)]
ForceOption = Annotated[bool, typer.Option(help="use weights that config.json's weights_sha256 does not name, and "
                                           "replace a dvae file another command wrote at the output")]
ReplaceOption = Annotated[bool, typer.Option("--force", help="replace a dvae file another command wrote at the output")]
RestartOption = Annotated[bool, typer.Option(help="ignore an existing checkpoint and start over")]
RestartOnMismatchOption = Annotated[bool, typer.Option(
    help="resume a matching checkpoint, start over when params changed (what the DVC stage uses)")]
DatasetPath = path_option("dataset file [default: data/prepared/dataset.h5]", "--dataset")
ModelDirPath = path_option("model folder [default: models/MODEL]")
PriorDirPath = path_option("prior folder [default: models/MODEL-prior]", "--prior")


@command("prepare-data",
         example="dvae prepare-data --dataset folder --root data/raw/digits --image-size 32 --channels 1",
         dataset=Flag("data.dataset", str, f"source: {' | '.join(SOURCES)}"),
         root=Flag("data.root", str, "folder torchvision and folder sources read"),
         subset=Flag("data.subset", str, "keep a seeded random subset: a count or a fraction", yaml=True),
         image_size=Flag("data.image_size", int, "square image side"), channels=Flag("data.channels", int, "1 or 3"),
         seed=Flag("seed", int, "seed of the subset and split"))
def prepare_data_command(params: Params, out: path_option("dataset file to write [default: data/prepared/dataset.h5]")
                         = None, force: ReplaceOption = False) -> None:
    """Write the dataset file from a source (built-in dSprites, torchvision, an image folder)."""
    from dvae_cli.stages import prepare

    summary = prepare.run(params, prepare.PreparePaths.of(out=out), force=force)
    for message in summary.warnings:
        warn(message)
    info = summary.info
    show(f"{summary.path}", [
        *((f"{name} images", f"{count:,}") for name, count in summary.split_counts.items()),
        ("image shape", f"{info.channels}×{info.image_size}×{info.image_size}"),
        ("labels", f"{info.num_classes} classes" if info.has_labels else "none"),
        ("factors", ", ".join(info.factor_names) if info.has_factors else "none"),
        *((("unreadable files skipped", prepare.describe_skipped(summary.skipped)),) if summary.skipped else ()),
        ("file size", f"{summary.file_bytes / 1e6:.1f} MB"), ("seconds", f"{summary.seconds:.1f}")])


@command("train",
         example="dvae train --model jointvae --preset jointvae-dsprites-cpu --seed 1",
         epochs=Flag("{model}.epochs", int), batch_size=Flag("{model}.batch_size", int,
         "override MODEL.batch_size (the global batch)"), lr=Flag("{model}.lr", float),
         max_steps=Flag("train.max_steps", int), device=DEVICE, precision=Flag("runtime.precision", str), seed=SEED)
def train_command(
    params: Params,
    model: ModelOption,
    dataset: DatasetPath = None,
    out: path_option("model folder [default: models/MODEL]") = None,
    live: path_option("DVCLive folder [default: dvclive/MODEL]") = None,
    restart: RestartOption = False,
    restart_on_mismatch: RestartOnMismatchOption = False,
    nproc: Annotated[int | None, typer.Option(
        help="run N data-parallel processes on this machine through torchrun (one per GPU)", min=1)] = None,
    force: ReplaceOption = False,
) -> None:
    """Train a model (resumes from its checkpoint when one matches)."""
    if nproc is not None and nproc > 1:
        from dvae_cli.core.distributed import launch_with_torchrun

        raise typer.Exit(launch_with_torchrun(nproc, sys.argv[1:]))
    from dvae_cli.stages import train

    paths = train.TrainPaths.of(model, dataset=dataset, model_dir=out, live_dir=live)
    result = train.run(params, model, paths, restart=restart, restart_on_mismatch=restart_on_mismatch, force=force)
    if result.resumed_from:
        typer.echo(f"{model}: resumed from step {result.resumed_from} of {paths.checkpoint}", err=True)
    if result.metrics:
        show(f"{model}: {result.steps} steps in {result.seconds:.0f} s", result.metrics.items(), ("metric", "value"))


@command("encode",
         example="dvae encode --model vqvae --out data/codes/vqvae.h5",
         batch_size=Flag("encode.batch_size", int), device=DEVICE)
def encode_command(
    params: Params,
    model: ModelOption,
    dataset: DatasetPath = None,
    model_dir: ModelDirPath = None,
    out: path_option("codes file to write [default: data/codes/MODEL.h5]") = None,
    force: ForceOption = False,
) -> None:
    """Encode every dataset row into a codes file (VQ-VAE code maps, JointVAE latents)."""
    from dvae_cli.stages import encode

    result = encode.run(params, model, encode.EncodePaths.of(model, dataset=dataset, model_dir=model_dir, out=out),
                        force=force)
    if result is None:  # a torchrun rank other than 0: rank 0 wrote the file
        return
    show(f"{result.path}: {result.num_rows:,} rows", [
        *result.arrays.items(), ("images/s", f"{result.images_per_second:,.0f}"),
        ("file size", f"{result.file_bytes / 1e6:.1f} MB"), ("seconds", f"{result.seconds:.1f}")],
        ("array", "type and shape"))


@command("decode",
         example="dvae decode data/codes/vqvae.h5 --rows 0:16 --out decoded.png",
         batch_size=Flag("encode.batch_size", int), device=DEVICE)
def decode_command(
    params: Params,
    codes: Annotated[Path, typer.Argument(help="codes file written by `dvae encode`")],
    out: Annotated[Path, typer.Option(help="output: a .png grid or a dataset-format .h5")],
    rows: Annotated[str | None, typer.Option(help="rows START:STOP to decode [default: the first 64]")] = None,
    model_dir: path_option("model folder [default: the one the codes file names]") = None,
    force: Annotated[bool, typer.Option(
        help="decode even when the model's weights are not the encoder's, or not those config.json names, and "
             "replace a dvae file another command wrote at --out")] = False,
) -> None:
    """Decode rows of a codes file into a PNG grid or a dataset-format HDF5."""
    from dvae_cli.stages import decode

    result = decode.run(params, decode.DecodePaths(codes, out, model_dir), rows, force=force)
    if not result.weights_match:
        typer.echo(f"warning: {result.model_dir} is not the model that wrote {codes} (--force)", err=True)
    typer.echo(f"decoded rows {result.rows.start}:{result.rows.stop} into {result.path} "
               f"({result.seconds:.1f} s)", err=True)


@command("evaluate",
         example="dvae evaluate --model jointvae --num-samples 2000",
         num_samples=Flag("evaluate.num_samples", int), dci=Flag("evaluate.dci", bool),
         batch_size=Flag("evaluate.batch_size", int), device=DEVICE, seed=SEED)
def evaluate_command(
    params: Params,
    model: ModelOption,
    dataset: DatasetPath = None,
    model_dir: ModelDirPath = None,
    codes: path_option("codes file [default: data/codes/MODEL.h5]") = None,
    out: path_option("metrics file [default: metrics/MODEL.json]") = None,
    force: ForceOption = False,
) -> None:
    """Compute the metrics of a trained model on the test split (val when there is none) into metrics/MODEL.json."""
    from dvae_cli.stages import evaluate

    paths = evaluate.EvaluatePaths.of(model, model_dir=model_dir, dataset=dataset, codes=codes, metrics=out)
    result = evaluate.run(params, model, paths, force=force)
    notes(result.notes)
    show(f"{model}: {result.split_name} split, {result.num_images:,} images",
         [(name, str(value) if isinstance(value, int) else value)
          for name, value in flatten(result.metrics, ".").items()],
         ("metric", "value"), caption=f"written to {result.path}")


@command("render",
         example="dvae render --model jointvae --base 7 --steps 10",
         base=Flag("render.base_index", int, "override render.base_index: test image the traversals start from"),
         steps=Flag("render.steps", int, "override render.steps: columns of a traversal"),
         seed=Flag("render.seed", int, "override render.seed: prior samples and chosen images"), device=DEVICE)
def render_command(
    params: Params,
    model: ModelOption,
    dataset: DatasetPath = None,
    model_dir: ModelDirPath = None,
    out: path_option("folder of the pictures (replaced) [default: renders/MODEL]") = None,
    force: ForceOption = False,
) -> None:
    """Draw traversals, reconstructions, samples and code maps as PNGs (and code usage as a CSV)."""
    from dvae_cli.stages import render

    result = render.run(params, model, render.RenderPaths.of(model, model_dir=model_dir, dataset=dataset, out=out),
                        force=force)
    notes(result.notes)
    show(f"{result.folder}: {len(result.files)} files in {result.seconds:.1f} s",
         [(name, "data" if size is None else f"{size[0]}×{size[1]}") for name, size in result.files.items()],
         ("file", "pixels"))


@command("prior",
         example="dvae prior --model vqvae --epochs 3",
         epochs=Flag("prior.epochs", int), max_steps=Flag("train.max_steps", int), device=DEVICE, seed=SEED)
def prior_command(
    params: Params,
    model: CodeMapModelOption,
    codes: path_option("codes file [default: data/codes/MODEL.h5]") = None,
    model_dir: path_option("the model that wrote the codes [default: models/MODEL]") = None,
    out: path_option("prior folder [default: models/MODEL-prior]") = None,
    live: path_option("DVCLive folder [default: dvclive/MODEL-prior]") = None,
    metrics: path_option("test NLL file [default: metrics/MODEL-prior.json]") = None,
    restart: RestartOption = False,
    restart_on_mismatch: RestartOnMismatchOption = False,
    force: ReplaceOption = False,
) -> None:
    """Train an autoregressive prior over the code maps of the codes file's train split; report its test NLL."""
    code_map_name(model)
    from dvae_cli.stages import prior

    paths = prior.PriorPaths.of(model, codes=codes, model_dir=model_dir, out=out, live_dir=live, metrics=metrics)
    result = prior.run(params, model, paths, restart=restart, restart_on_mismatch=restart_on_mismatch, force=force)
    if result.resumed_from:
        typer.echo(f"{model} prior: resumed from step {result.resumed_from} of {paths.folders.checkpoint}", err=True)
    test = json.loads(paths.metrics.read_text())["test"]
    show(f"{model} prior: {result.steps} steps in {result.seconds:.0f} s", [
        ("bits per code", f"{test['bits_per_code']:.4f}"), ("bits per image", f"{test['bits_per_image']:.1f}"),
        ("bits per image, uniform codes", f"{test['uniform_bits_per_image']:.1f}")],
        (f"{test['split']} split, {test['maps']:,} code maps", "value"), caption=f"written to {paths.out} and "
                                                                                f"{paths.metrics}")


@command("sample",
         example="dvae sample --model vqvae -n 16 --temperature 0.8",
         count=Flag("prior.sample.count", int, names=("-n",)), temperature=Flag("prior.sample.temperature",
         float), top_k=Flag("prior.sample.top_k", int), device=DEVICE, seed=SEED)
def sample_command(
    params: Params,
    model: CodeMapModelOption,
    prior_dir: PriorDirPath = None,
    model_dir: path_option("model folder that decodes [default: models/MODEL]") = None,
    out: path_option("PNG of the samples [default: renders/MODEL-prior/prior_samples.png]") = None,
    codes_out: path_option("codes file of the drawn maps [default: data/codes/MODEL-samples.h5]") = None,
    metrics_out: path_option("the samples' scores as JSON [default: metrics/MODEL-samples.json]") = None,
    truth: Annotated[bool | None, typer.Option(
        "--truth/--no-truth", help="score the samples against the true dSprites images [default: on dSprites data]",
        show_default=False)] = None,
    force: ReplaceOption = False,
) -> None:
    """Draw code maps from the prior and decode them: a PNG grid, a codes file `dvae decode` reads and, on dSprites,
    how many samples are true sprites (of the asked shape) and which factor values they reach."""
    code_map_name(model)
    from dvae_cli.stages import sample

    paths = sample.SamplePaths.of(model, prior_dir=prior_dir, model_dir=model_dir, picture=out, codes=codes_out,
                                  metrics=metrics_out)
    result = sample.run(params, model, paths, force=force, truth=truth)
    per_class = f", {result.count // len(result.classes)} per class" if result.classes else ""
    typer.echo(f"drew {result.count} code maps{per_class} into {result.picture} and {result.codes} "
               f"({result.seconds:.1f} s)", err=True)
    if result.truth is not None:
        show_truth(f"{result.count} samples against the true dSprites images", result.truth)


def show_truth(title: str, scores: dict) -> None:
    """`sample_truth_scores` as a table: the shares, then each factor's coverage beside a uniform draw's."""
    rows = [("true sprites (IoU ≥ 0.9 with one)", f"{scores['sprites']:.3f}"),
            ("mean IoU", f"{scores['mean_iou']:.3f}")]
    if "asked_class" in scores:
        rows.append(("of the asked shape", f"{scores['asked_class']:.3f}"))
    rows += [(f"{name} values the sprites reach (uniform draw)", f"{share:.2f} ({scores['uniform'][name]:.2f})")
             for name, share in scores["coverage"].items()]
    show(title, rows)


@command("compare",
         example="dvae compare --model vqvae",
         device=DEVICE, seed=Flag("seed", int, "override seed (the patch k-means sample)"))
def compare_command(
    params: Params,
    model: CodeMapModelOption,
    dataset: DatasetPath = None,
    model_dir: ModelDirPath = None,
    codes: path_option("codes file [default: data/codes/MODEL.h5]") = None,
    prior_dir: PriorDirPath = None,
    table: path_option("CSV of every point [default: renders/MODEL-prior/rate_distortion.csv]") = None,
    out: path_option("PNG plot [default: renders/MODEL-prior/rate_distortion.png]") = None,
    metrics: path_option("summary [default: metrics/MODEL-rate-distortion.json]") = None,
) -> None:
    """Rate–distortion on the test split: the codes (plain and coded by the prior) against k-means VQ, JPEG, WebP."""
    code_map_name(model)
    from dvae_cli.stages import compare

    paths = compare.ComparePaths.of(model, dataset=dataset, model_dir=model_dir, codes=codes, prior_dir=prior_dir,
                                    table=table, picture=out, metrics=metrics)
    result = compare.run(params, model, paths)
    show(f"{model}: rate–distortion on {result.summary['images']:,} images ({result.seconds:.0f} s)",
         [(p.method, p.setting, f"{p.bits_per_image:,.0f}", f"{p.psnr:.2f}") for p in result.points],
         ("method", "setting", "bits per image", "PSNR dB"),
         caption=f"every point in {paths.table}, plotted in {paths.picture}")


@command("import-reference", example="dvae import-reference trained_models/mnist/model.pt")
def import_reference_command(
    params: Params,
    model_pt: Annotated[Path, typer.Argument(help="the reference JointVAE's model.pt (a state dict)")],
    specs: path_option("its specs.json [default: specs.json beside MODEL_PT]") = None,
    out: path_option("model folder to write [default: models/jointvae]") = None,
    force: Annotated[bool, typer.Option(help="replace OUT when it exists and is not empty")] = False,
) -> None:
    """Turn a reference JointVAE checkpoint (model.pt + specs.json) into a model folder encode/evaluate/render read."""
    from dvae_cli.stages import import_reference

    result = import_reference.run(params, import_reference.ImportPaths.of(model_pt, specs=specs, out=out), force=force)
    notes(result.notes)
    config, data = result.config, result.data
    show(f"{result.folder}: imported {model_pt}", [
        ("reference dataset", result.dataset), ("image shape", f"{data.channels}×{data.image_size}×{data.image_size}"),
        ("continuous", str(config.continuous)), ("discrete", str(config.discrete)),
        *((name, f"max {s.max:g} nats over {s.steps:,} steps, γ {s.gamma:g}")
          for name, s in (("C_z", config.cont_capacity), ("C_c", config.disc_capacity))),
        ("temperature, lr, batch size", f"{config.temperature:g}, {config.lr:g}, {config.batch_size}"),
        ("parameters", f"{result.num_parameters:,}"), ("weights sha256", result.weights_sha256[:16])],
        caption=f"next: dvae encode --model {result.family} --model-dir {result.folder}")


@app.command("info", epilog="\b\nExample: dvae info data/codes/vqvae.h5")
@user_facing
def info_command(
    path: Annotated[Path, typer.Argument(help="a dataset, codes file, model or prior folder, or checkpoint")],
    as_json: Annotated[bool, typer.Option("--json", help="print it as JSON instead of a table")] = False,
) -> None:
    """Say what a dvae file holds: its kind, rows per split, arrays, family and config, the hashes that tie it to its
    dataset and model, the figures stored with it. Recognized by content; checked as the commands check it."""
    from dvae_cli.formats.describe import describe

    description = describe(path)
    if as_json:
        typer.echo(json.dumps(description.as_json(), indent=2))
        return
    show(f"{path}: {description.kind}", [(name, _cell(value)) for name, value in flatten(description.fields).items()])


def _cell(value: object) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        return json.dumps(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.5g}" if isinstance(value, float) else str(value)


@app.command("export", epilog="\b\nExample: dvae export models/vqvae --out exports/vqvae")
@user_facing
def export_command(
    source: Annotated[Path, typer.Argument(help="a model folder (models/M) or a codes file (data/codes/M.h5)")],
    out: path_option("folder to write [default: exports/M, or exports/M-codes for a codes file]") = None,
    onnx: Annotated[bool | None, typer.Option(
        "--onnx/--no-onnx", help="also write ONNX programs (needs the onnx extra) [default: when it is installed]",
        show_default=False)] = None,
    force: Annotated[bool, typer.Option(help="replace OUT when it exists")] = False,
) -> None:
    """Export a model's encoder and decoder as torch.export programs (and ONNX), or a codes file as a Hugging Face
    datasets folder that keeps class names, codebook and hashes. Each program is checked against the model."""
    from dvae_cli.formats.export import ExportPaths, export

    result = export(ExportPaths.of(source, out), onnx=onnx, force=force)
    checked = bool(result.checks)
    show(result.what, [(name, f"{(result.out / name).stat().st_size:,}",
                        *((f"{result.checks[name]:.2g}" if name in result.checks else "",) if checked else ()))
                       for name in result.files],
         ("file", "bytes", *(("|Δ| vs the model",) if checked else ())),
         caption=f"in {result.out} ({result.seconds:.1f} s)" + (
             "; |Δ|: on a random batch, the largest difference of floats, the share of codes that differ"
             if checked else ""))


@app.command("params", epilog="\b\nExample: dvae params --preset jointvae-digits-cpu --set seed=3")
@user_facing
def params_command(
    params_file: ParamsFileOption = DEFAULT_PARAMS_FILE,
    preset: PresetOption = None,
    set_: SetOption = None,
    exp_args: Annotated[bool, typer.Option(
        "--exp-args", help="print the `dvc exp run` options (-S key=value) that apply the preset and --set to the "
                           "params file, one per line, for `| xargs dvc exp run`")] = False,
) -> None:
    """Print the params a command runs with (the params file, a preset, --set merged) as YAML; each value that is
    not the built-in default says where it came from."""
    overrides = parse_set_options(set_ or [])
    missing_ok = may_be_missing(params_file)
    params = load_params(params_file, overrides, missing_ok=missing_ok, preset=preset)
    origins = value_origins(params_file, overrides, missing_ok=missing_ok, preset=preset)
    if exp_args:
        arguments = experiment_arguments(params, origins, params_file)
        typer.echo("".join(f"-S {shlex.quote(value)}\n" for value in arguments[1::2]), nl=False)
    else:
        typer.echo(annotated_yaml(params, origins), nl=False)


def run() -> None:
    """Console-script entry point: Ctrl-C and SIGTERM remove the temporary files being written, then exit 130 / 143."""
    signal.signal(signal.SIGINT, terminate)
    signal.signal(signal.SIGTERM, terminate)
    app()
