"""What tests compare policies with, computed from the outcome table without tokenopt's scoring code.

- :func:`paired_noise`: a comparison's tolerance, from the split's own noise (two
  standard errors of the paired per-query difference), so that a threshold states a
  property ("beats X by more than the noise") instead of a measured number minus a little;
- :func:`table_metrics` and :func:`policy_metrics`: EM, mean billed tokens, reward and gap
  recovered of a per-query policy, recomputed from the table's columns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from tokenopt.runtime import BudgetPolicy
from tokenopt.table import OutcomeMatrix


def paired_noise(mine: np.ndarray, other: np.ndarray, z: float = 2.0) -> tuple[float, float]:
    """The mean of the per-query differences ``mine - other`` and ``z`` standard errors of that mean."""
    difference = np.asarray(mine, dtype=np.float64) - np.asarray(other, dtype=np.float64)
    return float(difference.mean()), float(z * difference.std(ddof=1) / np.sqrt(len(difference)))


def assert_beats(mine: np.ndarray, other: np.ndarray, what: str) -> None:
    """Per-query rewards ``mine`` beat ``other`` on average by more than two standard errors of the difference."""
    mean, noise = paired_noise(mine, other)
    assert mean > noise, f"{what}: mean per-query reward difference {mean:+.4f}, within the noise (2 SE {noise:.4f})"


def per_query_reward(exact_match: np.ndarray, billed_tokens: np.ndarray, cost_weight: float = 0.01) -> np.ndarray:
    """EM minus lambda times the billed tokens, per query (the default cost: one price per billed token)."""
    return np.asarray(exact_match, dtype=np.float64) - cost_weight * np.asarray(billed_tokens, dtype=np.float64)


def questions_of(table: str | Path) -> dict[str, str]:
    """Question text by query id, read from the table's ``queries.parquet``."""
    queries = pq.read_table(Path(table) / "queries.parquet", columns=["id", "question"])
    return dict(zip(queries.column("id").to_pylist(), queries.column("question").to_pylist(), strict=True))


def policy_columns(policy: BudgetPolicy, matrix: OutcomeMatrix, questions: dict[str, str]) -> np.ndarray:
    """The column of the action the exported policy decides for each query of ``matrix``, from its question."""
    decisions = policy.decide_batch([questions[query_id] for query_id in matrix.ids])
    return np.array([matrix.actions.index(decision.action) for decision in decisions])


def table_metrics(matrix: OutcomeMatrix, columns: np.ndarray, cost_weight: float = 0.01) -> dict[str, float]:
    """EM, tokens, reward and gap recovered of picking ``columns[i]`` for query ``i``."""
    rows = np.arange(len(columns))
    rewards = per_query_reward(matrix.exact_match, matrix.billed_tokens, cost_weight)
    reward = float(rewards[rows, columns].mean())
    best_fixed, oracle = float(rewards.mean(axis=0).max()), float(rewards.max(axis=1).mean())
    return {
        "em": float(np.asarray(matrix.exact_match, dtype=np.float64)[rows, columns].mean()),
        "tokens": float(np.asarray(matrix.billed_tokens, dtype=np.float64)[rows, columns].mean()),
        "reward": reward,
        "gap_recovered": (reward - best_fixed) / (oracle - best_fixed),
    }


def policy_metrics(
    policy_dir: str | Path, table: str | Path, split: str, cost_weight: float = 0.01
) -> dict[str, float]:
    """:func:`table_metrics` of an exported per-query policy on a split of a table."""
    matrix = OutcomeMatrix.from_table(table).subset(split)
    columns = policy_columns(BudgetPolicy.load(policy_dir), matrix, questions_of(table))
    return table_metrics(matrix, columns, cost_weight)
