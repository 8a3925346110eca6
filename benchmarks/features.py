"""The feature specs side by side: train, export and evaluate each on the same tables.

For every table, cost weight, seed and feature spec (``prompt-text``, ``lm-hidden``,
``prompt-text+lm-hidden``) it trains PPO with ``tokenopt train --features SPEC``,
exports the policy and scores it on the test split, deciding exactly as a server
would (the question text, and for lm-hidden the hidden state the LM computed at
prefill, which the table recorded). It prints the test reward, the reward difference
to the best fixed action and the gap recovered, each with a 95% bootstrap interval
over the test queries (2,000 resamples, seeded).

A table without the ``lm_hidden`` column is copied into the work folder and gets it
there by a prefill pass (``tokenopt add-features``), so the given tables are never
modified; its model must be available locally.

Usage: python benchmarks/features.py TABLE [TABLE ...] [--cost-weights 0.01,0.02]
       [--seeds 1] [--timesteps 30000] [--work runs/features-bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from tokenopt.agents.common.evaluation import policy_choices, query_questions
from tokenopt.agents.common.statistics import bootstrap_intervals
from tokenopt.agents.export import export_run
from tokenopt.agents.ppo.train import TrainConfig, train
from tokenopt.collect import add_features
from tokenopt.cost import CostModel
from tokenopt.features import FEATURE_SPECS
from tokenopt.runtime import BudgetPolicy
from tokenopt.table import OutcomeMatrix, evaluate_actions, load_manifest

RESAMPLES = 2000


def _intervals(rewards: np.ndarray, chosen: np.ndarray, seed: int) -> dict[str, tuple[float, float, float]]:
    """Reward, reward minus the best fixed action's, and gap recovered, each (value, low, high) at 95%.

    The best fixed action is the split's (as evaluate_actions takes it); the intervals are
    the evaluation's paired bootstrap over queries (agents/common/statistics.py).
    """
    policy = rewards[np.arange(len(chosen)), chosen]
    fixed = rewards[:, int(np.argmax(rewards.mean(axis=0)))]
    intervals = bootstrap_intervals(
        {"reward": policy, "vs_best_fixed": policy - fixed, "margin": rewards.max(axis=1) - fixed},
        resamples=RESAMPLES,
        seed=seed,
        ratios={"gap_recovered": ("vs_best_fixed", "margin")},
    )
    return {
        key: (intervals[key].value, intervals[key].low, intervals[key].high)
        for key in ("reward", "vs_best_fixed", "gap_recovered")
    }


def _with_hidden(table: Path, work: Path) -> Path:
    """The table itself when it records lm_hidden, else a copy in the work folder that does."""
    if "lm_hidden" in load_manifest(table):
        return table
    copy = work / "tables" / table.parent.name / table.name
    if not (copy / "manifest.json").is_file() or "lm_hidden" not in load_manifest(copy):
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(table, copy)
        started = time.perf_counter()
        source = add_features(copy, device="cpu")
        print(f"# {table}: recorded lm-hidden ({source}) in {time.perf_counter() - started:.0f} s")
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tables", type=Path, nargs="+", help="outcome-table folders")
    parser.add_argument("--specs", default=",".join(FEATURE_SPECS), help="feature specs, comma-separated")
    parser.add_argument("--cost-weights", default="0.01,0.02")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--timesteps", type=int, default=30_000)
    parser.add_argument("--work", type=Path, default=Path("runs/features-bench"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    specs = args.specs.split(",")
    weights = [float(w) for w in args.cost_weights.split(",")]
    results = []
    print("| table | weight | features | seed | test reward [95%] | vs best fixed [95%] | gap recovered [95%] |")
    print("|---|---|---|---|---|---|---|")
    for given in args.tables:
        table = _with_hidden(given, args.work)
        matrix = OutcomeMatrix.from_table(table)
        test = matrix.subset("test")
        questions = query_questions(table)
        name = given.parent.name if given.name == "table" else given.name
        for weight in weights:
            cost_model = CostModel(cost_weight=weight)
            rewards = test.rewards(cost_model)
            for seed in range(args.seeds):
                for spec in specs:
                    run = args.work / "runs" / name / f"w{weight}" / spec / f"seed{seed}"
                    shutil.rmtree(run, ignore_errors=True)
                    started = time.perf_counter()
                    train(
                        TrainConfig(
                            table=str(table),
                            out=str(run),
                            total_timesteps=args.timesteps,
                            seed=seed,
                            cost_weight=weight,
                            features=spec,
                        ),  # fmt: skip
                        matrix=matrix,
                    )
                    policy = BudgetPolicy.load(export_run(run))
                    chosen = policy_choices(policy, test, questions)
                    metrics = evaluate_actions(test, chosen, cost_model)
                    figures = _intervals(rewards, chosen, seed)
                    cells = " | ".join(f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in figures.values())
                    print(f"| {name} | {weight} | {spec} | {seed} | {cells} |", flush=True)
                    results.append(
                        {"table": str(given), "cost_weight": weight, "features": spec, "seed": seed,
                         "queries": len(test.ids), "em": metrics["em"], "tokens": metrics["tokens"],
                         "seconds": time.perf_counter() - started, **{k: list(v) for k, v in figures.items()}}
                    )  # fmt: skip
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
