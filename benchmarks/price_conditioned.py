"""One price-conditioned policy against one policy per cost weight, on every suite.

For each outcome table the runner trains, with ``tokenopt train`` in a subprocess (one
torch thread), one policy per weight of the sweep (the cells of ``benchmarks/suites.py``,
same folders, so its finished cells are reused) and one price-conditioned policy with
``--cost-weight-range MIN:MAX`` of the sweep. Each policy decides on the test split from
the question text, as a server would; the conditioned one at each weight of the sweep
(``decide(cost_weight=W)``). Per (suite, weight) it prints the test reward of both, and
the conditioned policy's reward minus the per-weight policy's with a 95% paired-bootstrap
interval over the test queries (the seeds' per-query mean when several are given), and
with several seeds a second interval that also resamples each method's seeds (what one
training run's luck adds, which the first leaves out). With several seeds a second table
gives the yardstick: the per-weight policies of the later half of the seeds minus those
of the earlier half, how far two sets of seeds of one method land apart.

    python benchmarks/price_conditioned.py --table demo=runs/suites/demo/table \\
        --weights 0.005,0.01,0.02,0.04 --seeds 0 --out runs/suites

Results go to ``OUT/LABEL.json`` and, as markdown, to stdout and ``OUT/LABEL.md``
(``--label``, default ``conditioned``, also names the conditioned runs' folders). The
per-weight policies are the exported ones (after the do-no-harm fallback): what a user
is shipped.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suites import CELL_FILE, run_cell, train_cell  # noqa: E402  (the sibling runner's cells)
from tokenopt.agents.common.evaluation import policy_choices, query_questions  # noqa: E402
from tokenopt.agents.common.statistics import bootstrap_intervals, seed_and_query_bootstrap  # noqa: E402
from tokenopt.agents.evaluation.no_harm import split_figures  # noqa: E402
from tokenopt.cost import CostModel  # noqa: E402
from tokenopt.runtime import BudgetPolicy  # noqa: E402
from tokenopt.table import OutcomeMatrix  # noqa: E402

TOLERANCE = 0.005
"""The goal: the conditioned policy's reward within this of each per-weight policy's, at every weight."""


def conditioned_cell(
    table: Path, test: OutcomeMatrix, questions: dict[str, str], run_dir: Path, weights: list[float], seed: int,
    extra: list[str],
) -> dict[str, Any]:  # fmt: skip
    """Train the price-conditioned policy (unless ``cell.json`` has the same settings); its test picks per weight.

    The picks are recomputed from ``RUN/policy/`` on every call, so a policy exported again (e.g. after a
    change to the do-no-harm rule) is scored without training again.
    """
    low, high = min(weights), max(weights)
    default = float(np.sqrt(low * high))
    extra = ["--cost-weight-range", f"{low:g}:{high:g}", *extra]
    settings = {"table": str(table), "weights": weights, "seed": seed, "extra": extra}
    cell_path = run_dir / CELL_FILE
    cell: dict[str, Any] | None = None
    if cell_path.is_file():
        cell = json.loads(cell_path.read_text(encoding="utf-8"))
        if cell.get("settings") != settings:
            cell = None
    if cell is None:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        seconds, output = train_cell(table, run_dir, default, seed, {}, extra)
        summary = json.loads((run_dir / "training.json").read_text(encoding="utf-8"))
        cell = {"settings": settings, "seconds": seconds, "timesteps": summary.get("timesteps"),
                "best_val": summary.get("best_val"), "output": output[-2000:]}  # fmt: skip
        cell_path.write_text(json.dumps(cell, indent=2) + "\n", encoding="utf-8")
    policy = BudgetPolicy.load(run_dir / "policy")
    cell["fallback"] = policy.fallback is not None
    cell["test_columns"] = {f"{w:g}": policy_choices(policy, test, questions, w).tolist() for w in weights}
    return cell


def _cell(interval: list[float], digits: int, signed: bool = False) -> str:
    sign = "+" if signed else ""
    value, low, high = interval
    return f"{value:{sign}.{digits}f} [{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"


def compare(
    suite: str, weight: float, test: OutcomeMatrix, per_weight: list[list[int]], conditioned: list[list[int]]
) -> dict[str, Any]:
    """One row: both policies' test figures and the paired difference, with intervals."""
    cost_model = CostModel(weight)
    rows = np.arange(len(test.ids))

    def outcomes(columns: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        picks = np.array(columns, dtype=np.int64)
        exact = np.mean([test.exact_match[rows, c] for c in picks], axis=0)
        billed = np.mean([test.billed_tokens[rows, c] for c in picks], axis=0)
        return exact, billed

    single_exact, single_billed = outcomes(per_weight)
    single = split_figures(test, single_exact, single_billed, cost_model)
    exact, billed = outcomes(conditioned)
    reference = cost_model.reward(single_exact, single_billed, test.prompt_tokens)
    figures = split_figures(test, exact, billed, cost_model, compare={"per-weight": reference})
    difference = figures["reward_minus:per-weight"]

    def per_seed_rewards(columns: list[list[int]]) -> np.ndarray:
        return np.stack([cost_model.reward(test.exact_match[rows, c], test.billed_tokens[rows, c], test.prompt_tokens)
                         for c in np.array(columns, dtype=np.int64)])  # fmt: skip

    single_rewards = per_seed_rewards(per_weight)
    seeds = seed_and_query_bootstrap(per_seed_rewards(conditioned), single_rewards)
    # The yardstick: the per-weight method against itself, its later seeds minus its earlier ones.
    half = len(single_rewards) // 2
    halves = None
    if half:
        later, earlier = single_rewards[len(single_rewards) - half :], single_rewards[:half]
        over_queries = bootstrap_intervals({"d": later.mean(axis=0) - earlier.mean(axis=0)})["d"]
        over_seeds = seed_and_query_bootstrap(later, earlier)
        halves = [over_queries.value, over_queries.low, over_queries.high, over_seeds.low, over_seeds.high]
    return {
        "suite": suite,
        "weight": weight,
        "queries": len(test.ids),
        "per_weight": {key: [v.value, v.low, v.high] for key, v in single.items()},
        "conditioned": {key: [v.value, v.low, v.high] for key, v in figures.items()},
        "difference": [difference.value, difference.low, difference.high],
        "difference_over_seeds": [seeds.value, seeds.low, seeds.high],
        "per_weight_halves": halves,
        "within_tolerance": difference.value >= -TOLERANCE,
    }


def format_rows(rows: list[dict[str, Any]], held_out: str | None) -> str:
    """The markdown table."""
    lines = [
        "| suite | λ | per-weight policy: reward | gap | conditioned: reward | gap | conditioned − per-weight | "
        f"the same, interval over seeds and queries | within {TOLERANCE} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        name = f"{row['suite']}, held out" if row["suite"] == held_out else row["suite"]
        single, mine = row["per_weight"], row["conditioned"]
        lines.append(
            f"| {name} ({row['queries']}) | {row['weight']:g} | {_cell(single['reward'], 3)} | "
            f"{single['gap_recovered'][0]:.2f} | {_cell(mine['reward'], 3)} | {mine['gap_recovered'][0]:.2f} | "
            f"{_cell(row['difference'], 3, True)} | {_cell(row['difference_over_seeds'], 3, True)} | "
            f"{'yes' if row['within_tolerance'] else 'no'} |"
        )
    return "\n".join(lines)


def format_halves(rows: list[dict[str, Any]], held_out: str | None) -> str:
    """The per-weight policies against themselves: the later half of the seeds minus the earlier half."""
    lines = [
        "| suite | λ | per-weight, later seeds − earlier seeds | interval over seeds and queries |",
        "|---|---|---|---|",
    ]
    for row in rows:
        if row.get("per_weight_halves") is None:
            continue
        name = f"{row['suite']}, held out" if row["suite"] == held_out else row["suite"]
        value, low, high, seeds_low, seeds_high = row["per_weight_halves"]
        lines.append(
            f"| {name} ({row['queries']}) | {row['weight']:g} | {_cell([value, low, high], 3, True)} | "
            f"[{seeds_low:+.3f}, {seeds_high:+.3f}] |"
        )
    return "\n".join(lines)


def main() -> None:
    """Train what is missing, compare, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", action="append", required=True, help="NAME=PATH of an outcome table (repeatable)")
    parser.add_argument("--weights", default="0.005,0.01,0.02,0.04", help="the sweep, comma-separated")
    parser.add_argument("--seeds", default="0", help="training seeds, comma-separated")
    parser.add_argument("--out", default="runs/suites", help="where the runs and results go (shared with suites.py)")
    parser.add_argument("--held-out", default=None, help="the suite kept out of tuning (marked in the table)")
    parser.add_argument("--label", default="conditioned", help="the conditioned runs' folder name, OUT/<suite>/LABEL/")
    parser.add_argument("--train-args", default="", help="more `tokenopt train` options for the conditioned runs")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    weights = sorted(float(w) for w in args.weights.split(","))
    if len(weights) < 2 or weights[0] <= 0:
        parser.error(f"--weights needs at least two weights > 0; got {args.weights}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for text in args.table:
        suite, _, path = text.rpartition("=")
        table = Path(path).resolve()
        suite = suite or table.parent.name
        test = OutcomeMatrix.from_table(table).subset("test")
        questions = query_questions(table)
        singles: dict[float, list[list[int]]] = {w: [] for w in weights}
        conditioned: dict[float, list[list[int]]] = {w: [] for w in weights}
        for seed in seeds:
            for weight in weights:
                print(f"{suite} λ={weight:g} seed {seed} ...", file=sys.stderr, flush=True)
                run_dir = out / suite / f"w{weight:g}" / "default" / f"seed-{seed}"
                cell = run_cell(table, test, questions, run_dir, weight, seed, {}, [])
                singles[weight].append(cell["test_columns"]["shipped"])
            print(f"{suite} conditioned seed {seed} ...", file=sys.stderr, flush=True)
            run_dir = out / suite / args.label / f"seed-{seed}"
            cell = conditioned_cell(table, test, questions, run_dir, weights, seed, shlex.split(args.train_args))
            for weight in weights:
                conditioned[weight].append(cell["test_columns"][f"{weight:g}"])
        for weight in weights:
            rows.append(compare(suite, weight, test, singles[weight], conditioned[weight]))
            print(format_rows(rows[-1:], args.held_out).splitlines()[-1], file=sys.stderr, flush=True)
        (out / f"{args.label}.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n", encoding="utf-8")
    table_md = format_rows(rows, args.held_out)
    if len(seeds) >= 2:
        # How far two sets of seeds of one method land apart: the resolution of the table above.
        table_md += "\n\n" + format_halves(rows, args.held_out)
    (out / f"{args.label}.md").write_text(table_md + "\n", encoding="utf-8")
    print(table_md)


if __name__ == "__main__":
    main()
