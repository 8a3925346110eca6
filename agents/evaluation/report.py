"""Reports of a policy on a split: the demo's table, the seed report of ``train --seeds``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tokenopt.agents.common.evaluation import EvaluationRow, evaluate_policy, policy_choices, query_questions
from tokenopt.agents.evaluation.no_harm import best_fixed_column, split_figures
from tokenopt.cost import CostModel
from tokenopt.runtime import BudgetPolicy
from tokenopt.table import OutcomeMatrix

__all__ = ["format_seed_report", "format_table", "save_report", "seed_report"]


def format_table(rows: list[EvaluationRow], max_greedy: str) -> str:
    """A Markdown table of the evaluation, the policy and oracle first."""
    lines = ["| method | EM | mean billed tokens | reward | gap recovered |", "|---|---|---|---|---|"]
    for r in rows:
        name = r.method + (" (max-budget greedy)" if r.method == f"fixed {max_greedy}" else "")
        lines.append(f"| {name} | {r.em:.3f} | {r.tokens:.2f} | {r.reward:.3f} | {r.gap_recovered:.2f} |")
    return "\n".join(lines)


def seed_report(
    policies: dict[str, Path],
    table: str | Path,
    cost_model: CostModel | None = None,
    ensemble: Path | None = None,
    split: str = "test",
) -> dict[str, Any]:
    """Each seed's policy (and the ensemble of them) on a split, to see what the ensemble buys.

    Args:
        policies: a label (``seed 3``) and policy folder per single policy.
        table: the outcome table.
        cost_model: the reward's cost model (default lambda 0.01).
        ensemble: the ensemble's policy folder, if there is one.
        split: the split to evaluate on.

    Returns:
        ``{"split", "queries", "cost_weight", "best_fixed_action", "singles", "mean_single",
        "best_single", "ensemble"}``; every policy entry has ``em``, ``tokens``, ``reward``
        and ``gap_recovered``, and (but the mean of singles) ``ci``: their 95% bootstrap intervals
        over the queries, and ``reward_minus_best_fixed``: ``[difference, low, high]``, paired.

    Raises:
        ValueError: the table has no query in the split.
    """
    cost_model = cost_model or CostModel()
    metric_names = ("em", "tokens", "reward", "gap_recovered")
    matrix = OutcomeMatrix.from_table(table).subset(split)
    questions = query_questions(table)
    fixed = matrix.rewards(cost_model)[:, best_fixed_column(matrix, cost_model)]

    def evaluate(label: str, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        rows, extra = evaluate_policy(path, table, split, cost_model)
        policy_row = rows[0]
        chosen = policy_choices(BudgetPolicy.load(path), matrix, questions, cost_model.cost_weight)
        picked = np.arange(len(chosen)), chosen
        figures = split_figures(matrix, matrix.exact_match[picked], matrix.billed_tokens[picked], cost_model,
                                compare={"best fixed": fixed})  # fmt: skip
        difference = figures["reward_minus:best fixed"]
        return {"policy": label, "path": str(path)} | {k: getattr(policy_row, k) for k in metric_names} | {
            "ci": {k: figures[k].to_list() for k in metric_names},
            "reward_minus_best_fixed": [difference.value, difference.low, difference.high],
        }, extra

    singles = []
    extra: dict[str, Any] = {}
    for label, path in policies.items():
        entry, extra = evaluate(label, path)
        singles.append(entry)
    report: dict[str, Any] = {
        "split": split,
        "queries": extra.get("queries"),
        "cost_weight": cost_model.cost_weight,
        "best_fixed_action": extra.get("best_fixed_action"),
        "singles": singles,
        "mean_single": {k: float(np.mean([entry[k] for entry in singles])) for k in metric_names},
        "best_single": max(singles, key=lambda entry: entry["reward"])["policy"] if singles else None,
        "ensemble": None,
    }
    if ensemble is not None:
        report["ensemble"], _ = evaluate("ensemble", ensemble)
    return report


def format_seed_report(report: dict[str, Any]) -> str:
    """A Markdown table of :func:`seed_report`: every single policy, their mean and the ensemble."""
    from tokenopt.agents.evaluation.scoreboard import format_row_cells

    lines = [
        "Each figure with its 95% bootstrap interval over the queries (paired for the difference).",
        "",
        f"| policy | EM | mean billed tokens | reward | gap recovered | reward minus best fixed "
        f"{report['best_fixed_action']} |",
        "|---|---|---|---|---|---|",
    ]
    entries = [*report["singles"], {"policy": "mean of singles"} | report["mean_single"]]
    if report["ensemble"] is not None:
        entries.append(report["ensemble"])
    for e in entries:
        minus = e.get("reward_minus_best_fixed")
        difference = "" if minus is None else f"{minus[0]:+.3f} [{minus[1]:+.3f}, {minus[2]:+.3f}]"
        lines.append(f"| {e['policy']} | {format_row_cells(e)} | {difference} |")
    return "\n".join(lines)


def save_report(path: Path, rows: list[EvaluationRow], extra: dict[str, Any]) -> None:
    """Write the evaluation as JSON."""
    data = {"rows": [r.__dict__ for r in rows], **extra}
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
