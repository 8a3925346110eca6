"""Summarise a suite's outcome table on a split: EM and tokens by action and family, best fixed and oracle.

    python -m suites.report DIR [--split test] [--weights 0.01,0.02]

``DIR`` is a build folder (with ``table/``) or a table folder. The figures come from
tokenopt's own evaluation helpers, so they agree with ``tokenopt eval``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tokenopt.cost import CostModel
from tokenopt.demo.properties import property_table
from tokenopt.table import OutcomeMatrix
from tokenopt.table.evaluation import reference_rewards

__all__ = ["main", "summary", "type_router_reward"]


def type_router_reward(whole: OutcomeMatrix, split: str, cost_model: CostModel) -> float | None:
    """Mean reward on ``split`` of the best action per (family, prompt length) chosen on train (None: no families)."""
    if whole.families is None:
        return None
    rewards = whole.rewards(cost_model)
    train = whole.splits == "train"
    overall = int(rewards[train].mean(axis=0).argmax())
    choice = np.full(len(whole.ids), overall)
    for family in set(whole.families):
        in_family = whole.families == family
        if (in_family & train).any():
            choice[in_family] = int(rewards[in_family & train].mean(axis=0).argmax())
        for length in set(whole.prompt_tokens[in_family]):
            cell = in_family & (whole.prompt_tokens == length)
            if (cell & train).any():
                choice[cell] = int(rewards[cell & train].mean(axis=0).argmax())
    rows = np.flatnonzero(whole.splits == split)
    return float(rewards[rows, choice[rows]].mean())


def summary(table: Path, split: str = "test", weights: tuple[float, ...] = (0.01, 0.02)) -> str:
    """A Markdown summary of a table on a split."""
    whole = OutcomeMatrix.from_table(table)
    matrix = whole.subset(split)
    lines = [f"{len(whole.ids)} queries x {len(whole.actions)} actions; {split} split: {len(matrix.ids)} queries", ""]
    lines.append("| action | EM | mean billed tokens |")
    lines.append("|---|---|---|")
    for column, action in enumerate(matrix.actions):
        em = matrix.exact_match[:, column].mean()
        lines.append(f"| {action} | {em:.3f} | {matrix.billed_tokens[:, column].mean():.1f} |")
    lines += [
        "",
        "| cost weight | best fixed action | its reward | oracle reward | oracle margin | type router | its gap |",
    ]
    lines.append("|---|---|---|---|---|---|---|")
    for weight in weights:
        cost_model = CostModel(cost_weight=weight)
        oracle, best_fixed = reference_rewards(matrix, cost_model)
        action, _ = matrix.best_fixed(cost_model)
        router = type_router_reward(whole, split, cost_model)
        margin = oracle - best_fixed
        routed = "n/a | n/a" if router is None else f"{router:.3f} | {(router - best_fixed) / margin:.2f}"
        lines.append(f"| {weight} | {action} | {best_fixed:.3f} | {oracle:.3f} | {margin:.3f} | {routed} |")
    lines += [
        "",
        "Type router: each query gets the action with the best mean reward on the train queries of its "
        "family and prompt length in tokens (its family's best where no train query has that length): what a "
        "controller that knew each query's family and length could earn. Its gap is the share of the oracle's "
        "margin it recovers; the rest is per-query luck no prompt-level controller can predict.",
    ]
    if matrix.families is not None:
        lines += ["", property_table(table, split)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a build folder (with table/) or a table folder")
    parser.add_argument("--split", default="test", help="train, val or test (default test)")
    parser.add_argument("--weights", default="0.01,0.02", help="cost weights, comma-separated")
    args = parser.parse_args(argv)
    table = args.folder / "table" if (args.folder / "table").is_dir() else args.folder
    print(summary(table, args.split, tuple(float(w) for w in args.weights.split(","))))


if __name__ == "__main__":
    main()
