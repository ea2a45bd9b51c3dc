"""`dvae prior`: an autoregressive prior over the code maps of a codes file's train split (`models.prior`), trained
by the shared loop (`dvae_cli.trainer`: DVCLive curves, exact resume, seeds); its test NLL, in bits per code and bits
per image, goes into its config.json and its metrics file."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dvae_cli.core import layout
from dvae_cli.core.errors import UserError
from dvae_cli.core.files import check_output, sha256_file, write_json_atomic
from dvae_cli.core.runtime import Runtime
from dvae_cli.core.splits import SPLIT_NAMES, TEST, TRAIN, VAL, evaluation_split
from dvae_cli.formats.artifact import PRIOR_MAKER
from dvae_cli.formats.codes import CodesFile
from dvae_cli.formats.model_folder import load_model, save_prior
from dvae_cli.models import code_map_name
from dvae_cli.models.base import Trainable, invalid_latent
from dvae_cli.models.prior import PRIOR
from dvae_cli.models.prior.config import CodeMaps
from dvae_cli.models.prior.model import CodePrior, training_rows
from dvae_cli.params import Params
from dvae_cli.trainer import RunFolders, TrainResult, fit, training_run


@dataclass(frozen=True)
class PriorPaths:
    codes: Path
    model_dir: Path
    """The model whose codes these are (its codebook must be the codes file's)."""
    out: Path
    live_dir: Path
    metrics: Path

    @classmethod
    def of(cls, family: str, **given: Path | None) -> PriorPaths:
        name = layout.prior_name(family)
        return layout.fill(cls, given, codes=layout.codes(family), model_dir=layout.model_dir(family),
                           out=layout.model_dir(name), live_dir=layout.live_dir(name), metrics=layout.metrics(name))

    @property
    def folders(self) -> RunFolders:
        return RunFolders(self.out, self.live_dir, inputs=(self.codes, self.model_dir), maker=PRIOR_MAKER)


@dataclass(frozen=True)
class CodeMapRows:
    """A codes file's code maps as prior rows (int64 [n, 1 + h·w]) by split, and where they come from."""

    maps: CodeMaps
    rows: dict[int, Tensor]
    """Split (TRAIN, VAL, TEST) → its rows."""
    evaluation_split: int | None
    """The split the test figures are computed on (`core.splits.evaluation_split`)."""
    record: dict[str, Any]
    """What the prior's config.json keeps of them: codes file hash, codebook hash, dataset info."""


def read_code_maps(codes_path: Path, model_dir: Path, family: str, conditional: bool) -> CodeMapRows:
    """Every row of the codes file as prior rows, after checking the codes are `model_dir`'s and in range."""
    code_map = code_map_name(family)
    loaded = load_model(model_dir, family)
    with CodesFile(codes_path, family) as codes:
        codebook_sha256 = codes.check_codebook(loaded.model, model_dir)
        arrays = codes.read_rows(0, len(codes), [code_map, *(["labels"] if "labels" in codes.file else [])])
        info = codes.dataset_info
        split = codes.split
        attrs = codes.attrs
    wrong = invalid_latent(loaded.model, {code_map: arrays[code_map]})
    if wrong:
        raise UserError(f"{codes_path}: {wrong} (damaged or edited); re-run `dvae encode --model {family}`")
    if conditional and "labels" not in arrays:
        raise UserError(f"prior.conditional is on but {codes_path} has no class labels (its dataset has none); set "
                        "prior.conditional: false (or --set prior.conditional=false)")
    *depth, height, width = arrays[code_map].shape[1:]
    maps = CodeMaps(height=height, width=width, num_codes=int(loaded.model.code_value_counts()[code_map]),
                    num_classes=info.num_classes if conditional else 0, depth=depth[0] if depth else 0)
    labels = torch.from_numpy(arrays["labels"].astype(np.int64)) if conditional else None
    every = training_rows(maps, torch.from_numpy(arrays[code_map].astype(np.int64)), labels)
    rows = {index: every[torch.from_numpy(np.flatnonzero(split == index))] for index in (TRAIN, VAL, TEST)}
    record = {"codes": str(codes_path), "codes_sha256": sha256_file(codes_path), "codebook_sha256": codebook_sha256,
              "model_dir": str(model_dir), "weights_sha256": loaded.weights_sha256, "code_map": code_map,
              "dataset": attrs["dataset"], "dataset_sha256": attrs["dataset_sha256"],
              "dataset_info": dataclasses.asdict(info)}
    return CodeMapRows(maps=maps, rows=rows, evaluation_split=evaluation_split(split), record=record)


def test_figures(model: CodePrior, data: CodeMapRows, runtime: Runtime) -> dict[str, Any]:
    """The prior's NLL on the test split (val when it is empty): bits per code and bits per image."""
    split = VAL if data.evaluation_split is None else data.evaluation_split
    with runtime.autocast():
        nll = model.map_nll(data.rows[split])
    per_image = nll.mean().item() / math.log(2) if len(nll) else float("nan")
    return {"split": SPLIT_NAMES[split], "maps": len(nll), "bits_per_image": per_image,
            "bits_per_code": per_image / data.maps.length, "uniform_bits_per_image": data.maps.length *
            math.log2(data.maps.num_codes)}


def run_fingerprint(params: Params, data: CodeMapRows) -> dict[str, Any]:
    """What must be unchanged for a checkpoint to resume: the prior's settings but epochs and sampling, the seed, the
    codes."""
    prior = dataclasses.asdict(params.model_config(PRIOR.name))
    for name in ("epochs", "sample"):
        prior.pop(name)
    return {PRIOR.name: prior, "seed": params.seed, "codes_sha256": data.record["codes_sha256"]}


class PriorTraining:
    """What `fit` trains for `dvae prior`: the prior over a codes file's code maps, saved as a prior folder with its
    test figures."""

    def __init__(self, params: Params, family: str, paths: PriorPaths, data: CodeMapRows, runtime: Runtime) -> None:
        self.params, self.family, self.paths, self.data, self.runtime = params, family, paths, data, runtime
        self.name, self.section = layout.prior_name(family), PRIOR.name
        self.config = params.model_config(PRIOR.name)
        self.fingerprint = run_fingerprint(params, data)
        self.train, self.val, self.pixel_variance = runtime.place(data.rows[TRAIN]), data.rows[VAL][:2048], None

    def as_input(self, rows: Tensor) -> Tensor:
        return rows.to(self.runtime.device, non_blocking=True)

    def build(self) -> Trainable:
        return PRIOR.model(self.config, self.data.maps)

    def score(self, model: Trainable) -> None:
        return None

    def save(self, model: Trainable, steps: int, metrics: dict[str, float]) -> None:
        test = test_figures(model, self.data, self.runtime)
        save_prior(self.paths.out, self.family, model, {**self.data.record, "seed": self.params.seed, "steps": steps,
                                                        "final_metrics": metrics, "test": test})
        write_json_atomic(self.paths.metrics, {"test": test, "steps": steps})


def run(params: Params, family: str, paths: PriorPaths, restart: bool = False, restart_on_mismatch: bool = False,
        show_progress: bool = True, force: bool = False) -> TrainResult:
    """Train the prior over the code maps of `family`'s codes file, from its checkpoint when one fits."""
    check_output(paths.metrics, [paths.codes], "--metrics")
    with training_run(params, paths.folders, force) as (runtime, cluster):
        data = read_code_maps(paths.codes, paths.model_dir, family, params.model_config(PRIOR.name).conditional)
        job = PriorTraining(params, family, paths, data, runtime)
        return fit(params, paths.folders, job, runtime, cluster, restart, restart_on_mismatch, show_progress)
