"""CLEAR-style allocation against the fixed actions at equal total spend, on each outcome table's test split.

For each table the CLEAR-style baseline (``agents/evaluation/baselines.py``) is fitted on
train (strengths picked on val) and allocates, on test, exactly what each fixed action
bills there. Printed per table, as markdown: the best fixed action (picked on val by
reward at ``--cost-weight``) and max-budget greedy, each beside CLEAR-style at its spend,
with 95% paired-bootstrap intervals of the EM difference over the test queries; then,
as the scoreboard's rows do, the reward at ``--cost-weight`` of CLEAR-style's setting
picked on val minus the best fixed action's.

    python benchmarks/clear_baseline.py demo=/work/suites-data/demo/table \\
        gpt2_bits=/work/suites-data/gpt2_bits/table
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from tokenopt.agents.common.statistics import bootstrap_intervals
from tokenopt.agents.evaluation.baselines import OperatingPoint, ReplayTable, clear_points, fixed_points
from tokenopt.agents.evaluation.no_harm import best_fixed_column
from tokenopt.cost import CostModel


def compare(name: str, table: str, cost_weight: float, seed: int) -> tuple[list[str], str]:
    """The markdown rows of one table: at equal spend, and by reward."""
    replay = ReplayTable.load(table)
    train, val, test = (replay.subset(split) for split in ("train", "val", "test"))
    clear_val, clear = clear_points(train, val, [val, test])
    fixed = fixed_points(test)
    by_action = {point.setting.removeprefix("at the spend of "): point for point in clear}
    picked = best_fixed_column(val.matrix, CostModel(cost_weight))
    greedy = test.ladder("greedy")[-1] if "greedy" in test.mode_names else int(np.argmax(test.budgets))
    rows = []
    for label, j in ((f"best fixed on val (λ {cost_weight:g})", picked), ("max-budget greedy", greedy)):
        mine = by_action.get(fixed[j].setting)
        if mine is None:
            rows.append(f"| {name} | {label}: {fixed[j].setting} | below the cheapest predicted allocation |")
            continue
        difference = mine.exact_match - fixed[j].exact_match
        interval = bootstrap_intervals({"d": difference}, seed=seed)["d"]
        rows.append(
            f"| {name} | {label}: {fixed[j].setting} | {len(test.matrix.ids)} | {fixed[j].tokens:.2f} | "
            f"{fixed[j].em:.3f} | {mine.tokens:.2f} | {mine.em:.3f} | "
            f"{interval.value:+.3f} [{interval.low:+.3f}, {interval.high:+.3f}] |"
        )
    cost_model = CostModel(cost_weight)

    def rewards(point: OperatingPoint, replay: ReplayTable) -> np.ndarray:
        return np.asarray(cost_model.reward(point.exact_match, point.billed_tokens, replay.matrix.prompt_tokens))

    k = int(np.argmax([rewards(point, val).mean() for point in clear_val]))
    difference = rewards(clear[k], test) - rewards(fixed[picked], test)
    interval = bootstrap_intervals({"d": difference}, seed=seed)["d"]
    reward_row = (
        f"| {name} | {fixed[picked].setting}: {rewards(fixed[picked], test).mean():.3f} | {clear[k].setting}: "
        f"{rewards(clear[k], test).mean():.3f} | {interval.value:+.3f} [{interval.low:+.3f}, {interval.high:+.3f}] |"
    )
    return rows, reward_row


def main(argv: list[str] | None = None) -> int:
    """Print the comparison for every ``NAME=TABLE`` given."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tables", nargs="+", help="NAME=TABLE folder")
    parser.add_argument("--cost-weight", type=float, default=0.01, help="weight that picks the best fixed action")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    args = parser.parse_args(argv)
    lines = [
        "| suite | fixed action | test queries | fixed tokens | fixed EM | CLEAR-style tokens | CLEAR-style EM | "
        "CLEAR-style EM minus fixed [95%] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_reward = [
        "",
        f"| suite | best fixed (val-picked): reward at λ {args.cost_weight:g} | CLEAR-style (val-picked): reward | "
        "CLEAR-style minus fixed [95%] |",
        "|---|---|---|---|",
    ]
    for entry in args.tables:
        name, _, table = entry.partition("=")
        if not table:
            parser.error(f"give NAME=TABLE; got {entry!r}")
        rows, reward_row = compare(name, table, args.cost_weight, args.seed)
        lines += rows
        by_reward.append(reward_row)
    sys.stdout.write("\n".join(lines + by_reward) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
