"""Figures of a policy on an outcome table, for TensorBoard and reports (matplotlib, Agg backend)."""

from __future__ import annotations

from typing import Any

import numpy as np

from tokenopt.cost import CostModel
from tokenopt.table import OutcomeMatrix

__all__ = ["action_mix_figure", "log_figures", "tradeoff_figure"]


def tradeoff_figure(matrix: OutcomeMatrix, chosen: np.ndarray, cost_model: CostModel) -> Any:
    """EM against mean billed tokens: every fixed action, the policy and the oracle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = np.arange(len(matrix.ids))
    oracle = matrix.rewards(cost_model).argmax(axis=1)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for mode, marker in zip(matrix.mode_names, "osD^v<>", strict=False):
        columns = matrix.mode_columns(mode)
        axis.plot(
            matrix.billed_tokens[:, columns].mean(axis=0),
            matrix.exact_match[:, columns].mean(axis=0),
            marker=marker,
            alpha=0.7,
            label=f"fixed budgets, {mode}",
        )
    for picks, size, color, marker, label in (
        (chosen, 180, "crimson", "*", "tokenopt policy"),
        (oracle, 90, "black", "X", "oracle"),
    ):
        axis.scatter(
            [matrix.billed_tokens[rows, picks].mean()], [matrix.exact_match[rows, picks].mean()],
            s=size, c=color, marker=marker, zorder=5, label=label,
        )  # fmt: skip
    axis.set_xscale("symlog", linthresh=10)
    axis.set_xlabel("mean billed tokens per query")
    axis.set_ylabel("exact match")
    axis.set_title(f"EM vs tokens (lambda {cost_model.cost_weight:g})")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    return figure


def action_mix_figure(matrix: OutcomeMatrix, chosen: np.ndarray) -> Any:
    """Share of each action the policy picks, per task family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = matrix.families if matrix.families is not None else np.array(["all"] * len(matrix.ids))
    names = list(dict.fromkeys(families.tolist()))
    figure, axis = plt.subplots(figsize=(7, 0.6 * len(names) + 1.5))
    left = np.zeros(len(names))
    colors = plt.get_cmap("tab20")
    for k, action in enumerate(sorted(set(chosen.tolist()))):
        shares = np.array([np.mean(chosen[families == name] == action) for name in names])
        axis.barh(names, shares, left=left, color=colors(k % 20), label=matrix.actions[action])
        left += shares
    axis.set_xlabel("share of queries")
    axis.set_title("actions chosen per family")
    axis.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    figure.tight_layout()
    return figure


def log_figures(logger_: Any, matrix: OutcomeMatrix, chosen: np.ndarray, cost_model: CostModel) -> None:
    """Record both figures on an SB3 logger (TensorBoard only)."""
    from stable_baselines3.common.logger import Figure

    hidden = ("stdout", "log", "json", "csv")
    logger_.record("figures/em_vs_tokens", Figure(tradeoff_figure(matrix, chosen, cost_model), close=True), hidden)
    logger_.record("figures/action_mix", Figure(action_mix_figure(matrix, chosen), close=True), hidden)
