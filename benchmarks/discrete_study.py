"""The JointVAE paper's discrete-dimension study on dSprites: a queued `dvc exp` sweep of jointvae.discrete.

Usage: python benchmarks/discrete_study.py queue [--categories 2 3 4 6] [--preset jointvae-dsprites-cpu]
       dvc queue start -j 2            (then `dvc queue status` until every task is Success)
       python benchmarks/discrete_study.py collect [--categories 2 3 4 6] [--docs docs/discrete-study]
       python benchmarks/discrete_study.py --smoke [--categories 2 3 4 6] [--preset jointvae-dsprites-cpu]

`queue` queues one experiment per k, named disc-K: the preset's keys as `-S` overrides (the preset is the one
source of the setting) plus `jointvae.discrete=[K]`, for the JointVAE chain (evaluate@jointvae render@jointvae).
`collect` reads each experiment's metrics/jointvae.json and discrete × continuous grid from its git ref, prints a
Markdown table (shape accuracy, NMI with shape and with every other factor, MIG, FactorVAE score, KL_c) and copies
the grids into --docs. On a 2-core CPU each experiment trains about 40 minutes with one thread per worker.
--smoke: `queue` printing its `dvc exp run` commands instead of running them, in a second; a check that the preset
still reads and turns into overrides (nothing is queued: that would stash experiments in this repository).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
from pathlib import Path

from dvae_cli.params import preset_path, read_params_file

TARGETS = ["evaluate@jointvae", "render@jointvae"]
GRID = "renders/jointvae/discrete_x_continuous.png"
METRICS = "metrics/jointvae.json"
SKIPPED_KEYS = {"models"}
"""The preset's model list: the targets pick the JointVAE chain instead."""


def overrides(tree: dict, prefix: str = "") -> list[str]:
    """`-S` values for every leaf of a preset (JSON is YAML, so lists and floats keep their type)."""
    found = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if name in SKIPPED_KEYS:
            continue
        if isinstance(value, dict):
            found += overrides(value, f"{name}.")
        else:
            found.append(f"{name}={json.dumps(value)}")
    return found


def queue(categories: list[int], preset: str, dry_run: bool) -> None:
    settings = overrides(read_params_file(preset_path(preset)))
    for k in categories:
        command = ["dvc", "exp", "run", "--queue", "-n", f"disc-{k}"]
        for setting in [*settings, f"jointvae.discrete=[{k}]"]:
            command += ["-S", setting]
        if dry_run:
            print(shlex.join([*command, *TARGETS]))
        else:
            subprocess.run([*command, *TARGETS], check=True)


def experiment_ref(name: str) -> str:
    """The newest git ref of the experiment called `name`."""
    refs = subprocess.run(["git", "for-each-ref", "--sort=-committerdate", "--format=%(refname)", "refs/exps"],
                          check=True, capture_output=True, text=True).stdout.split()
    matching = [ref for ref in refs if ref.rsplit("/", 1)[-1] == name]
    if not matching:
        raise SystemExit(f"no experiment named {name}: run `queue`, then `dvc queue start` and wait for it")
    return matching[0]


def show(ref: str, path: str) -> bytes:
    return subprocess.run(["git", "show", f"{ref}:{path}"], check=True, capture_output=True).stdout


def collect(categories: list[int], docs: Path | None) -> None:
    rows = []
    for k in categories:
        ref = experiment_ref(f"disc-{k}")
        metrics = json.loads(show(ref, METRICS))
        labels, nmi = metrics["labels"]["discrete_0"], metrics["discrete_factors"]["discrete_0"]
        factors = metrics["factors"]
        others = ", ".join(f"{name} {value:.2f}" for name, value in nmi.items() if name != "shape")
        majority = labels.get("majority_accuracy", labels["hungarian_accuracy"])
        rows.append(f"| [{k}] | {labels['hungarian_accuracy']:.2f} | {majority:.2f} | {nmi['shape']:.3f} | {others} "
                    f"| {factors['mig']:.3f} | {factors['factorvae_score']:.2f} | {metrics['latent']['kl_c']:.2f} |")
        if docs:
            docs.mkdir(parents=True, exist_ok=True)
            (docs / f"k{k}-discrete-x-continuous.png").write_bytes(show(ref, GRID))
    print("| discrete | shape accuracy (Hungarian) | majority accuracy | NMI with shape | NMI with the other factors "
          "| MIG | FactorVAE | KL_c (nats) |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", nargs="?", choices=["queue", "collect"], help="required but with --smoke")
    parser.add_argument("--categories", type=int, nargs="+", default=[2, 3, 4, 6])
    parser.add_argument("--preset", default="jointvae-dsprites-cpu")
    parser.add_argument("--docs", type=Path, help="collect: copy each experiment's discrete × continuous grid here")
    parser.add_argument("--smoke", action="store_true", help="print the queue's commands instead of queueing them")
    args = parser.parse_args()
    if args.smoke or args.action == "queue":
        queue(args.categories, args.preset, dry_run=args.smoke)
    elif args.action == "collect":
        collect(args.categories, args.docs)
    else:
        parser.error("the following arguments are required: action (queue or collect)")


if __name__ == "__main__":
    main()
