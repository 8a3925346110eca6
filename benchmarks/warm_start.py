"""How many environment steps a warm start (``tokenopt train --init-from``) saves.

Trains a source policy at one cost weight, then trains at another cost weight twice
from the same seed: from scratch, and warm-started from the source. Both validate
every ``--eval-freq`` steps without early stopping; the figure is the step at which
validation reward first reaches a fraction (95%, and the stricter 99% and 100%) of
the scratch run's best, so its resolution is ``--eval-freq``. The source policy
itself, unchanged, is scored on the val split at the new cost weight for reference.

    python benchmarks/warm_start.py --table runs/demo/table
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from tokenopt.agents.common.evaluation import evaluate_policy
from tokenopt.agents.export import export_run
from tokenopt.agents.ppo.train import TrainConfig, train
from tokenopt.cost import CostModel


def _history(config: TrainConfig) -> tuple[list[tuple[int, float]], float]:
    history: list[tuple[int, float]] = []
    started = time.perf_counter()
    train(config, progress=lambda steps, _, metrics: history.append((steps, metrics["reward"])))
    return history, time.perf_counter() - started


def _first_reaching(history: list[tuple[int, float]], target: float) -> int | None:
    return next((steps for steps, reward in history if reward >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", required=True, help="outcome table (e.g. from `tokenopt collect`)")
    parser.add_argument("--out", default="runs/warm_start_bench", help="folder for the runs")
    parser.add_argument("--source-cost-weight", type=float, default=0.02)
    parser.add_argument("--cost-weight", type=float, default=0.01)
    parser.add_argument("--source-steps", type=int, default=None, help="default: n_timesteps of the YAML")
    parser.add_argument("--steps", type=int, default=60_000, help="steps of each compared run")
    parser.add_argument("--eval-freq", type=int, default=2048)
    parser.add_argument(
        "--fractions", default="0.95,0.99,1.0", help="of the scratch run's best val reward; the first is the headline"
    )
    parser.add_argument("--init-lr-scale", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="compared pairs, seeds seed+1, seed+2, ...")
    args = parser.parse_args()

    out = Path(args.out)
    source = out / "source"
    _, source_seconds = _history(
        TrainConfig(
            table=args.table, out=str(source), cost_weight=args.source_cost_weight, seed=args.seed,
            total_timesteps=args.source_steps, eval_freq=args.eval_freq,
        )
    )  # fmt: skip
    rows, _ = evaluate_policy(export_run(source), args.table, "val", CostModel(args.cost_weight))
    source_reward = rows[0].reward
    print(
        f"source: lambda {args.source_cost_weight:g}, seed {args.seed}, trained in {source_seconds:.0f} s; "
        f"as-is val reward at lambda {args.cost_weight:g}: {source_reward:.3f}"
    )
    fractions = [float(f) for f in args.fractions.split(",")]
    results = []
    for repeat in range(args.repeats):
        seed = args.seed + 1 + repeat
        common: dict[str, Any] = {
            "table": args.table, "cost_weight": args.cost_weight, "seed": seed, "total_timesteps": args.steps,
            "eval_freq": args.eval_freq, "patience": 10**9,
        }  # fmt: skip
        scratch, scratch_seconds = _history(TrainConfig(out=str(out / f"scratch-{seed}"), **common))
        warm, warm_seconds = _history(
            TrainConfig(
                out=str(out / f"warm-{seed}"), init_from=str(source), init_lr_scale=args.init_lr_scale,
                **common,
            )
        )  # fmt: skip
        best = max(reward for _, reward in scratch)
        row: dict[str, Any] = {
            "seed": seed,
            "scratch_best_reward": best,
            "warm_best_reward": max(reward for _, reward in warm),
            "warm_first_reward": warm[0][1],
            "targets": {},
            "scratch_history": scratch,
            "warm_history": warm,
            "seconds": {"scratch": scratch_seconds, "warm": warm_seconds},
        }
        for fraction in fractions:
            target = best - (1.0 - fraction) * abs(best)
            scratch_steps, warm_steps = _first_reaching(scratch, target), _first_reaching(warm, target)
            row["targets"][f"{fraction:g}"] = {
                "target_reward": target,
                "scratch_steps": scratch_steps,
                "warm_steps": warm_steps,
                "ratio": scratch_steps / warm_steps if scratch_steps and warm_steps else None,
            }
        results.append(row)
        print(
            f"seed {seed}: best val reward {best:.3f} from scratch, {row['warm_best_reward']:.3f} warm-started "
            f"(first validation {warm[0][1]:.3f} at {warm[0][0]} steps)"
        )
    lines = ["| target (of scratch best) | steps from scratch | steps warm-started | ratio |", "|---|---|---|---|"]
    medians: dict[str, dict[str, float | None]] = {}
    for fraction in fractions:
        key = f"{fraction:g}"
        per_seed = [row["targets"][key] for row in results]
        scratch_steps = [t["scratch_steps"] for t in per_seed if t["scratch_steps"] is not None]
        warm_steps = [t["warm_steps"] for t in per_seed if t["warm_steps"] is not None]
        ratios = [t["ratio"] for t in per_seed if t["ratio"] is not None]
        medians[key] = {
            "scratch_steps": float(np.median(scratch_steps)) if scratch_steps else None,
            "warm_steps": float(np.median(warm_steps)) if warm_steps else None,
            "ratio": float(np.median(ratios)) if ratios else None,
        }
        lines.append(
            f"| {fraction:.0%} | {' / '.join(str(t['scratch_steps']) for t in per_seed)} "
            f"| {' / '.join(str(t['warm_steps']) for t in per_seed)} "
            f"| {' / '.join('n/a' if t['ratio'] is None else format(t['ratio'], '.1f') for t in per_seed)} |"
        )
    summary = {"args": vars(args), "source_val_reward": source_reward, "medians": medians, "runs": results}
    (out / "warm_start.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"\nsteps until val reward first reaches the target, seeds {[row['seed'] for row in results]}:\n")
    print("\n".join(lines))
    headline = medians[f"{fractions[0]:g}"]
    print(
        f"\nmedian at {fractions[0]:.0%}: {headline['scratch_steps']} steps from scratch, {headline['warm_steps']} "
        f"warm-started, ratio {headline['ratio']}"
    )


if __name__ == "__main__":
    main()
