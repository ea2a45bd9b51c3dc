"""Every file dvae reads, corrupted at random and read as the commands read it: each case must end in a valid result
or one `UserError` (what the commands turn into one line and exit 2), never another exception, never a hang, and
never a change to the file read.

Usage: python benchmarks/fuzz_readers.py [--cases N] [--seed S] [--reader NAME ...] [--results FILE] [--smoke]

Setup (once, in a temporary folder): a 200-image dSprites dataset at 32×32, a VQ-VAE and a JointVAE trained a few
steps with their checkpoints, both codes files, a prior over the VQ-VAE codes, params.yaml and a reference
specs.json. Each case copies one file (or folder), applies one mutation drawn from a generator seeded by
(seed, reader, case) — bytes flipped, the file truncated, a range inserted or deleted; for HDF5 files an attribute
edited; for JSON and YAML a value edited, removed or added — and reads it with the reader of the command that takes
it (`READERS`). Printed per reader: cases, cases/s, refused (UserError), read (a valid result), internal errors (the
first few named, with the seed that makes them) and hangs; --results writes the same as JSON.
--smoke: 2 cases per reader, in seconds; a check that the benchmark still runs (tests/test_fuzz_readers.py runs a
seeded budget of the cases themselves).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import yaml

from dvae_cli.core.errors import UserError
from dvae_cli.formats.checkpoint import CHECKPOINT, TrainState, resume
from dvae_cli.formats.codes import CodesFile
from dvae_cli.formats.dataset import HEADERS_SECONDS, DatasetFile
from dvae_cli.formats.model_folder import load_model, load_prior
from dvae_cli.models.base import invalid_latent
from dvae_cli.models.jointvae.config import JointVAEConfig
from dvae_cli.params import build_params, load_params
from dvae_cli.stages import encode, prepare, prior, train
from dvae_cli.stages.import_reference import read_specs

TIMEOUT_SECONDS = int(HEADERS_SECONDS) + 10
"""A case that takes longer hangs; a damaged HDF5 header is refused after HEADERS_SECONDS, which is no hang."""
PARAMS = {"seed": 3, "data": {"subset": 200, "image_size": 32},
          "train": {"checkpoint_every": 1000, "log_every": 2, "max_steps": 4, "eval_every": None},
          "jointvae": {"continuous": 3, "discrete": [3], "batch_size": 16, "epochs": 1},
          "vqvae": {"hidden": 16, "res_blocks": 1, "num_codes": 8, "code_dim": 4, "batch_size": 16, "epochs": 1},
          "prior": {"width": 16, "layers": 1, "heads": 2, "batch_size": 16, "epochs": 1}}
SPECS = {"dataset": "mnist", "latent_spec": {"cont": 4, "disc": [3]}, "cont_capacity": [0.0, 5.0, 25000, 30.0],
         "disc_capacity": [0.0, 5.0, 25000, 30.0], "lr": [0.0005], "batch_size": 64, "temperature": 0.67}


def make_project(root: Path) -> None:
    """The files the readers read, made by the stages themselves."""
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    (root / "specs.json").write_text(json.dumps(SPECS))
    params = build_params(PARAMS)
    dataset = root / "dataset.h5"
    prepare.run(params, prepare.PreparePaths(dataset), show_progress=False)
    for family in ("jointvae", "vqvae"):
        train.run(params, family, train.TrainPaths(dataset, root / family, root / f"live-{family}"), show_progress=False)
        encode.run(params, family, encode.EncodePaths(dataset, root / family, root / f"{family}.h5"), show_progress=False)
    prior.run(params, "vqvae", prior.PriorPaths(root / "vqvae.h5", root / "vqvae", root / "prior", root / "live-prior",
                                                root / "prior.json"), show_progress=False)


# Readers: each reads what `path` (a corrupted copy in a scratch folder) stands for, as the command does.

def read_dataset(path: Path, project: Path) -> None:
    with DatasetFile(path) as dataset:
        dataset.read_images(dataset.indices(dataset.evaluation_split()))


def read_codes(path: Path, project: Path) -> None:
    with CodesFile(path) as codes:
        loaded = load_model(project / codes.family, codes.family)
        if loaded.model.extra_arrays():
            codes.check_codebook(loaded.model, project / codes.family)
        rows = codes.read_rows(0, len(codes))
        wrong = invalid_latent(loaded.model, {name: rows[name] for name in codes.latent_names})
        if wrong:
            raise UserError(wrong)
        codes.source_paths(0, len(codes))


def read_model_folder(path: Path, project: Path) -> None:
    load_model(path)


def read_prior_folder(path: Path, project: Path) -> None:
    load_prior(path, "vqvae")


def read_checkpoint(path: Path, project: Path) -> None:
    loaded = load_model(project / "vqvae", "vqvae")
    model = loaded.model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    saved = torch.load(project / "vqvae" / CHECKPOINT, weights_only=True)
    state = TrainState("vqvae", saved["fingerprint"], model, optimizer, scaler, torch.device("cpu"))
    resume(state, path / CHECKPOINT, total_steps=4, restart_on_mismatch=False)


def read_params(path: Path, project: Path) -> None:
    load_params(path)


def read_reference_specs(path: Path, project: Path) -> None:
    read_specs(path, JointVAEConfig())


@dataclass(frozen=True)
class Reader:
    read: Callable[[Path, Path], None]
    copied: str
    """What a case copies: a file or a folder of the project."""
    mutated: tuple[str, ...]
    """The files mutated (relative to the copy; "" is the copy itself), one drawn per case."""
    kind: str
    """binary | hdf5 | json | yaml: which mutations apply (binary ones apply to all)."""


READERS = {
    "dataset": Reader(read_dataset, "dataset.h5", ("",), "hdf5"),
    "codes (VQ-VAE)": Reader(read_codes, "vqvae.h5", ("",), "hdf5"),
    "codes (JointVAE)": Reader(read_codes, "jointvae.h5", ("",), "hdf5"),
    "model config.json": Reader(read_model_folder, "jointvae", ("config.json",), "json"),
    "model weights": Reader(read_model_folder, "vqvae", ("model.safetensors",), "binary"),
    "prior folder": Reader(read_prior_folder, "prior", ("config.json", "model.safetensors"), "json"),
    "checkpoint": Reader(read_checkpoint, "vqvae", (CHECKPOINT,), "binary"),
    "params": Reader(read_params, "params.yaml", ("",), "yaml"),
    "specs.json": Reader(read_reference_specs, "specs.json", ("",), "json"),
}


# Mutations.

def random_value(rng: random.Random) -> Any:
    return rng.choice([
        lambda: rng.randint(-2**63, 2**63 - 1), lambda: rng.randint(-3, 3), lambda: 10 ** rng.randint(3, 30),
        lambda: rng.uniform(-1e9, 1e9), lambda: float(rng.choice(["nan", "inf", "-inf"])), lambda: None,
        lambda: rng.choice([True, False]), lambda: "".join(chr(rng.randint(1, 0x2FF)) for _ in range(rng.randint(0, 12))),
        lambda: [rng.randint(-5, 10**6) for _ in range(rng.randint(0, 4))], lambda: {"x": rng.randint(0, 9)},
    ])()


def mutate_bytes(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    how = rng.choice(["flip", "truncate", "insert", "delete"])
    at = rng.randrange(len(data) + 1)
    if how == "flip":
        for _ in range(rng.randint(1, 16)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif how == "truncate":
        del data[at:]
    elif how == "insert":
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4096)))
    else:
        del data[at:at + rng.randint(1, 4096)]
    path.write_bytes(bytes(data))
    return f"{how} at {at}"


def mutate_hdf5_attribute(path: Path, rng: random.Random) -> str:
    with h5py.File(path, "a") as file:
        holders = [file, *(file[name] for name in file)]
        holder = rng.choice(holders)
        names = list(holder.attrs)
        name = rng.choice(names) if names and rng.random() < 0.9 else "extra"
        value = random_value(rng)
        if value is None or isinstance(value, dict):
            value = json.dumps(value)
        try:
            holder.attrs[name] = np.asarray(value) if isinstance(value, list) and value else value
        except (TypeError, ValueError, OverflowError):
            holder.attrs[name] = str(value)
        return f"attribute {name!r} of {holder.name} = {str(value)[:40]!r}"


def _json_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    paths = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            paths += _json_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            paths += _json_paths(value, (*prefix, index))
    return paths


def mutate_tree(path: Path, rng: random.Random, loads: Callable, dumps: Callable) -> str:
    tree = loads(path.read_text())
    where = rng.choice(_json_paths(tree)[1:] or [()])
    if not where:
        tree = random_value(rng)
        path.write_text(dumps(tree))
        return "the whole document replaced"
    parent = tree
    for key in where[:-1]:
        parent = parent[key]
    how = rng.choice(["replace", "remove", "add"])
    if how == "remove":
        del parent[where[-1]]
    elif how == "add" and isinstance(parent, dict):
        parent["extra_" + str(rng.randrange(100))] = random_value(rng)
    else:
        parent[where[-1]] = random_value(rng)
    path.write_text(dumps(tree))
    return f"{how} {'.'.join(map(str, where))}"


def mutate(path: Path, kind: str, rng: random.Random) -> str:
    choices = ["bytes"] + {"hdf5": ["hdf5"] * 2, "json": ["json"] * 3, "yaml": ["yaml"] * 3}.get(kind, [])
    chosen = rng.choice(choices)
    if chosen == "hdf5":
        return mutate_hdf5_attribute(path, rng)
    if chosen == "json":
        return mutate_tree(path, rng, json.loads, json.dumps)
    if chosen == "yaml":
        return mutate_tree(path, rng, yaml.safe_load, lambda tree: yaml.safe_dump(tree, sort_keys=False))
    return mutate_bytes(path, rng)


# Cases.

class Hang(Exception):
    pass


@dataclass
class Outcome:
    result: str
    """read | refused | internal | hang"""
    mutation: str
    detail: str = ""


def digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def run_case(project: Path, scratch: Path, name: str, seed: int) -> Outcome:
    """One corrupted copy of `name`'s file, read; `scratch` is a new or empty folder of the caller's."""
    reader = READERS[name]
    scratch.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}")
    source, copy_path = project / reader.copied, scratch / reader.copied
    if source.is_dir():
        shutil.copytree(source, copy_path)
    else:
        shutil.copyfile(source, copy_path)
    target = copy_path / rng.choice(reader.mutated) if source.is_dir() else copy_path
    kind = reader.kind if target.suffix != ".safetensors" else "binary"
    try:
        mutation = mutate(target, kind, rng)
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError, json.JSONDecodeError) as error:
        mutation = f"mutation failed ({type(error).__name__}), bytes flipped instead: " + mutate_bytes(target, rng)
    before = digest(copy_path)

    def alarm(*_args: Any) -> None:
        raise Hang

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(TIMEOUT_SECONDS)
    try:
        reader.read(copy_path, project)
        outcome = Outcome("read", mutation)
    except UserError as error:
        outcome = Outcome("refused", mutation, str(error).splitlines()[0][:160])
        if "\n" in str(error):
            outcome = Outcome("internal", mutation, f"a UserError of several lines: {str(error)[:160]!r}")
    except Hang:
        outcome = Outcome("hang", mutation)
    except Exception as error:  # noqa: BLE001 (what the fuzzing is for)
        message = str(error).splitlines()[0][:160] if str(error) else ""
        outcome = Outcome("internal", mutation, f"{type(error).__name__}: {message}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    if outcome.result in ("read", "refused") and digest(copy_path) != before:
        outcome = Outcome("internal", mutation, "the reader changed its input")
    return outcome


@dataclass
class Tally:
    cases: int = 0
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=lambda: {"read": 0, "refused": 0, "internal": 0, "hang": 0})
    failures: list[dict[str, Any]] = field(default_factory=list)


def fuzz(project: Path, name: str, cases: int, seed: int) -> Tally:
    tally = Tally()
    started = time.perf_counter()
    for case in range(cases):
        case_seed = int.from_bytes(hashlib.sha256(f"{seed}/{name}/{case}".encode()).digest()[:8], "big")
        with tempfile.TemporaryDirectory() as scratch:
            outcome = run_case(project, Path(scratch), name, case_seed)
        tally.counts[outcome.result] += 1
        if outcome.result in ("internal", "hang") and len(tally.failures) < 10:
            tally.failures.append({"seed": case_seed, **asdict(outcome)})
    tally.cases, tally.seconds = cases, time.perf_counter() - started
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200, help="cases per reader")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reader", action="append", choices=list(READERS), help="repeatable (default: all)")
    parser.add_argument("--results", type=Path, help="write the tallies here as JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: check that the benchmark runs")
    args = parser.parse_args()
    if args.smoke:
        args.cases = 2
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        project = Path(folder)
        make_project(project)
        for name in args.reader or list(READERS):
            tally = fuzz(project, name, args.cases, args.seed)
            counts = tally.counts
            print(f"{name}: {tally.cases} cases, {tally.cases / tally.seconds:.1f} cases/s; read {counts['read']}, "
                  f"refused {counts['refused']}, internal errors {counts['internal']}, hangs {counts['hang']}",
                  flush=True)
            for failure in tally.failures[:3]:
                print(f"  seed {failure['seed']}: {failure['mutation']} → {failure['result']}: {failure['detail']}")
            results[name] = {"cases": tally.cases, "cases_per_second": round(tally.cases / tally.seconds, 2),
                             **counts, "failures": copy.deepcopy(tally.failures)}
    total = sum(result["internal"] + result["hang"] for result in results.values())
    print(f"all readers: {sum(r['cases'] for r in results.values())} cases, {total} internal errors or hangs")
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({"seed": args.seed, "cases_per_reader": args.cases,
                                            "timeout_seconds": TIMEOUT_SECONDS, "readers": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
