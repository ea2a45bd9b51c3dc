"""What `train.eval_every` costs: training with the periodic evaluation against the same training without it.

Usage: python benchmarks/eval_cost.py [--family jointvae] [--steps 500] [--rounds 3] [--smoke]
Target (2-core CPU): at most 5 % of training time at the shipped setting (params.yaml's train.eval_every).

The shipped quick configuration of the family (./params.yaml) on its 20,000-image dSprites subset; each round
trains --steps steps twice in this process, with eval_every off and at the shipped value, in alternating order
(the machine is shared and noisy: the figure is the median of the per-round ratios, measured side by side).
The evaluation runs at every multiple of eval_every and at the last step, as in a full run.
--smoke: the same on 1,000 images at 32×32, 4 steps (one evaluation, at the last) and 1 round, in seconds; a check
that the benchmark still runs, its figures meaningless.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from dvae_cli.params import load_params
from dvae_cli.stages import prepare, train
from dvae_cli.stages.train import TrainPaths

TARGET_OVERHEAD = 0.05


def timed_training(params_path: Path, overrides: dict, family: str, dataset: Path, folder: Path) -> float:
    params = load_params(params_path, overrides, missing_ok=True)
    paths = TrainPaths(dataset, folder / "models" / family, folder / "dvclive" / family)
    started = time.perf_counter()
    train.run(params, family, paths, restart=True, show_progress=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="jointvae")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: check that the benchmark runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.rounds = 4, 1
    data = {"data.subset": 1000, "data.image_size": 32} if args.smoke else {}
    params_path = Path("params.yaml")
    shipped = load_params(params_path, missing_ok=True).train.eval_every
    if shipped is None:
        raise SystemExit("params.yaml sets train.eval_every to null: nothing to measure")
    common = {**data, "train.max_steps": args.steps, "train.checkpoint_every": args.steps}
    settings = {"off": {**common, "train.eval_every": None}, "on": {**common, "train.eval_every": shipped}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset = root / "dataset.h5"
        prepare.run(load_params(params_path, data, missing_ok=True), prepare.PreparePaths(dataset),
                    show_progress=False)
        seconds: dict[str, list[float]] = {"off": [], "on": []}
        for round_ in range(args.rounds):
            for name in (("off", "on") if round_ % 2 == 0 else ("on", "off")):
                seconds[name].append(timed_training(params_path, settings[name], args.family, dataset, root / name))
    ratios = [on / off for on, off in zip(seconds["on"], seconds["off"])]
    overhead = statistics.median(ratios) - 1
    evaluations = args.steps // shipped + (args.steps % shipped != 0)
    print(f"{args.family}: {args.steps} steps, eval_every {shipped} ({evaluations} evaluations), {args.rounds} rounds")
    print(f"  without evaluation  {statistics.median(seconds['off']):7.1f} s (median)")
    print(f"  with evaluation     {statistics.median(seconds['on']):7.1f} s (median)")
    print(f"  overhead            {100 * overhead:+6.1f} % (median of per-round ratios; range "
          f"{100 * (min(ratios) - 1):+.1f} to {100 * (max(ratios) - 1):+.1f} %)  target ≤ {100 * TARGET_OVERHEAD:.0f} %: "
          f"{'met' if overhead <= TARGET_OVERHEAD else 'MISSED'}")


if __name__ == "__main__":
    main()
