"""`dvae evaluate`: the figures that say whether a discrete representation is good, as `metrics/M.json`.

Everything is computed on the evaluation split (test, or val when there is no test split). Reconstructions are
decoded from the codes file's latents: the codes file is checked to come from this model and this dataset, and
decoding a row's latent is the model's evaluation-mode reconstruction of that row. Code usage, labels and
factors are read from the codes file too, so the encoder never runs again.

The JSON holds nested sections of numbers only; a figure that is not finite (the PSNR of a perfect
reconstruction) is left out rather than written as inf or NaN, which JSON and `dvc metrics` cannot compare.
Sections: `evaluation` (split: 2 test, 1 val; images), `reconstruction`, then the family's own (its registered
`metrics`: JointVAE `latent`, `elbo`, `labels`, `factors`, `sample`; VQ-VAE `codes`, `labels`), and on dSprites
`prior_samples`: images drawn from the model's own prior (JointVAE's p(z) p(c)) against the true images nearest them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dvae_cli.core import layout
from dvae_cli.core.errors import UserError
from dvae_cli.core.files import check_output, sha256_file, write_json_atomic
from dvae_cli.core.progress import progress_bar
from dvae_cli.core.runtime import resolve_runtime
from dvae_cli.core.splits import SPLIT_NAMES
from dvae_cli.formats.codes import CodesFile
from dvae_cli.formats.dataset import DatasetFile
from dvae_cli.formats.model_folder import LoadedModel, load_model, model_files
from dvae_cli.models import get_family
from dvae_cli.models.base import invalid_latent
from dvae_cli.params import Params
from dvae_cli.scoring.evaluation import (
    Evaluation,
    Sections,
    evaluation_sections,
    reconstruction_totals,
    timed,
)
from dvae_cli.scoring.metrics import sample_truth_scores
from dvae_cli.sources import dsprites


@dataclass(frozen=True)
class EvaluatePaths:
    model_dir: Path
    dataset: Path
    codes: Path
    metrics: Path

    @classmethod
    def of(cls, family: str, **given: Path | None) -> EvaluatePaths:
        return layout.fill(cls, given, model_dir=layout.model_dir(family), dataset=layout.DATASET,
                           codes=layout.codes(family), metrics=layout.metrics(family))


@dataclass
class EvaluateResult:
    family: str
    metrics: Sections
    """What `metrics` holds, as written."""
    split_name: str
    num_images: int
    notes: list[str]
    """Things the user should know that are not errors (e.g. a sample capped at the split size)."""
    seconds: dict[str, float]
    """Wall time of each group of metrics, in the order computed."""
    path: Path


def _open_codes(paths: EvaluatePaths, family: str, loaded: LoadedModel, dataset: DatasetFile) -> CodesFile:
    """The codes file, checked to be this family's, made by these weights from this dataset."""
    rerun = f"re-run `dvae encode --model {family}`"
    if not paths.codes.exists():
        raise UserError(f"codes file {paths.codes} not found; make it with `dvae encode --model {family}`")
    codes = CodesFile(paths.codes, family)
    try:
        if codes.attrs["weights_sha256"] != loaded.weights_sha256:
            raise UserError(f"{paths.codes} was made by another model than {paths.model_dir} "
                            f"(weights fingerprints differ); {rerun}")
        if codes.attrs["dataset_sha256"] != sha256_file(paths.dataset) or len(codes) != dataset.num_images:
            raise UserError(f"{paths.codes} was made from another dataset than {paths.dataset} "
                            f"(dataset fingerprints differ); {rerun}")
    except BaseException:
        codes.close()
        raise
    return codes


def run(params: Params, family: str, paths: EvaluatePaths, show_progress: bool = True,
        force: bool = False) -> EvaluateResult:
    """Compute every metric of `family`'s model on the evaluation split and write them atomically to paths.metrics."""
    started = time.perf_counter()
    check_output(paths.metrics, [*model_files(paths.model_dir), paths.dataset, paths.codes])
    # The runtime's device and memory format, but fp32 whatever runtime.precision: these are the reported figures.
    runtime = resolve_runtime(params.runtime)
    device = runtime.device
    loaded = load_model(paths.model_dir, family, device, force=force)
    loaded.model = runtime.prepare(loaded.model)
    with DatasetFile(paths.dataset) as dataset, _open_codes(paths, family, loaded, dataset) as codes:
        split = dataset.evaluation_split()
        rows = dataset.indices(split)
        latent = {name: codes.read_at(name, rows) for name in codes.latent_names}
        if wrong := invalid_latent(loaded.model, latent):
            raise UserError(f"{paths.codes}: {wrong}; re-create it with "
                            f"`dvae encode --model {family}`")
        seconds: dict[str, float] = {}
        with timed(seconds, "reconstruction"), \
                progress_bar(f"evaluate {family}", len(rows), enabled=show_progress) as advance:
            images = dataset.read_images(rows)
            totals = reconstruction_totals(loaded.model, latent, images, params.evaluate.batch_size, device, advance)
        run = Evaluation(config=loaded.config, seed=params.seed, settings=params.evaluate, source=codes,
                         factor_names=dataset.info.factor_names, num_classes=dataset.info.num_classes,
                         split=split, rows=rows, arrays=latent, reconstruction=totals, notes=[],
                         seconds=seconds)
        metrics = evaluation_sections(run, get_family(family).metrics)
        if params.evaluate.prior_samples and dsprites.is_dsprites(dataset.info):
            with timed(seconds, "prior samples"):
                generator = torch.Generator().manual_seed(params.seed)
                drawn = loaded.model.sample_images(params.evaluate.prior_samples, generator)
                if drawn is not None:
                    nearest, iou = dsprites.nearest_images(drawn.float().cpu())
                    metrics["prior_samples"] = sample_truth_scores(
                        iou, dsprites.factor_classes(nearest), dsprites.FACTOR_NAMES, dsprites.FACTOR_SIZES,
                        dsprites.TRUE_SPRITE_IOU)
    write_json_atomic(paths.metrics, metrics)
    seconds["total"] = time.perf_counter() - started
    return EvaluateResult(family=family, metrics=metrics, split_name=SPLIT_NAMES[split], num_images=len(rows),
                          notes=run.notes, seconds=seconds, path=paths.metrics)
