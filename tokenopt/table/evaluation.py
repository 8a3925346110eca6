"""Scoring per-query choices on an outcome table: EM, tokens, reward, gap recovered, action mix.

Every evaluation in tokenopt (validation while training, the demo's table, the
scoreboard, cross-validation, the gate) computes these figures here, so they agree.
"""

from __future__ import annotations

import numpy as np

from tokenopt.cost import CostModel
from tokenopt.table.reader import OutcomeMatrix

__all__ = ["action_mix", "evaluate_actions", "evaluate_outcomes", "gap_recovered", "reference_rewards"]


def gap_recovered(reward: float, best_fixed: float, oracle: float) -> float:
    """``(R - R_best_fixed) / (R_oracle - R_best_fixed)``: 0 is the best fixed action, 1 the oracle.

    A table on which the oracle does no better than the best fixed action gives 0.
    """
    spread = oracle - best_fixed
    return (reward - best_fixed) / spread if spread > 1e-12 else 0.0


def reference_rewards(matrix: OutcomeMatrix, cost_model: CostModel) -> tuple[float, float]:
    """Mean reward of the per-query oracle and of the best fixed action: ``(oracle, best_fixed)``."""
    rewards = matrix.rewards(cost_model)
    return float(rewards.max(axis=1).mean()), float(rewards.mean(axis=0).max())


def evaluate_outcomes(
    matrix: OutcomeMatrix,
    exact_match: np.ndarray,
    billed_tokens: np.ndarray,
    cost_model: CostModel,
    reference_em: float | None = None,
) -> dict[str, float]:
    """EM, mean billed tokens, mean reward and gap recovered of per-query outcomes on ``matrix``'s queries.

    Args:
        matrix: the queries (the oracle and the best fixed action come from its actions).
        exact_match: the EM each query got, in row order.
        billed_tokens: the tokens each query was billed.
        cost_model: prices and lambda.
        reference_em: EM to compare with (e.g. max-budget greedy); adds ``em_drop_points``.
    """
    exact = np.asarray(exact_match, dtype=np.float64)
    billed = np.asarray(billed_tokens, dtype=np.float64)
    reward = float(cost_model.reward(exact, billed, matrix.prompt_tokens).mean())
    oracle, best_fixed = reference_rewards(matrix, cost_model)
    metrics = {
        "em": float(exact.mean()),
        "tokens": float(billed.mean()),
        "reward": reward,
        "oracle_reward": oracle,
        "best_fixed_reward": best_fixed,
        "gap_recovered": gap_recovered(reward, best_fixed, oracle),
    }
    if reference_em is not None:
        metrics["em_drop_points"] = 100.0 * (reference_em - metrics["em"])
    return metrics


def evaluate_actions(
    matrix: OutcomeMatrix, chosen: np.ndarray, cost_model: CostModel, reference_em: float | None = None
) -> dict[str, float]:
    """:func:`evaluate_outcomes` of one chosen action column per query."""
    rows = np.arange(len(matrix.ids))
    columns = np.asarray(chosen, dtype=np.int64)
    return evaluate_outcomes(
        matrix, matrix.exact_match[rows, columns], matrix.billed_tokens[rows, columns], cost_model, reference_em
    )


def action_mix(matrix: OutcomeMatrix, chosen: np.ndarray) -> dict[str, dict[str, int]]:
    """How often each action is chosen, per task family (``all`` when the table has no family column)."""
    families = matrix.families if matrix.families is not None else np.array(["all"] * len(matrix.ids))
    mix: dict[str, dict[str, int]] = {}
    for family, column in zip(families, chosen, strict=True):
        counts = mix.setdefault(str(family), {})
        action = matrix.actions[int(column)]
        counts[action] = counts.get(action, 0) + 1
    return mix
