"""Policy evaluation on an outcome table: what a policy decides from the question text, and how it scores.

The scoreboard, the gate, cross-validation and ``tokenopt train``'s final table all
decide through :func:`policy_choices`, exactly as a server would, and score through
:mod:`tokenopt.table.evaluation`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenopt.cost import CostModel
from tokenopt.runtime import BudgetPolicy
from tokenopt.table import OutcomeMatrix, action_mix, evaluate_actions
from tokenopt.table.schema import QUERIES_FILE

__all__ = ["EvaluationRow", "check_policy_fits_table", "evaluate_policy", "policy_choices", "query_questions"]


def query_questions(table: str | Path) -> dict[str, str]:
    """Question text of every query of a table, by id (from ``queries.parquet``).

    Raises:
        FileNotFoundError: the table has no ``queries.parquet``.
    """
    import pyarrow.parquet as pq

    path = Path(table) / QUERIES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the table needs its queries (run `tokenopt collect`)")
    queries = pq.read_table(path, columns=["id", "question"])
    return dict(zip(queries.column("id").to_pylist(), queries.column("question").to_pylist(), strict=True))


def check_policy_fits_table(
    policy: BudgetPolicy,
    manifest: dict[str, Any],
    where: str,
    probe_controller: bool = False,
    stream_policy: bool = False,
) -> None:
    """Refuse a policy whose action table or feature spec is not the table's.

    Args:
        policy: the loaded policy.
        manifest: the outcome table's manifest.
        where: how to name the policy in a message.
        probe_controller: expect a probe controller (``train --env probe``) instead of
            a per-query policy.
        stream_policy: expect a stream policy (``train --env stream``) instead of a
            per-query policy.

    Raises:
        ValueError: the action names (in order) or the feature spec differ, or the
            policy is not of the expected kind; the message names the differences.
    """
    policy_actions = [str(action["name"]) for action in policy.actions]
    table_actions = [str(action["name"]) for action in manifest["actions"]]
    if policy_actions != table_actions:
        missing = [name for name in table_actions if name not in policy_actions]
        extra = [name for name in policy_actions if name not in table_actions]
        detail = (
            f"the table's actions missing from the policy: {missing}; the policy's actions not in the table: {extra}"
            if missing or extra
            else "the same actions in another order"
        )
        raise ValueError(
            f"{where}: the policy's action table {policy_actions} differs from the table's {table_actions} ({detail}); "
            "compare policies trained on this table"
        )
    features = policy.features
    if features.prompt is not None:
        recorded_spec: dict[str, Any] = dict(policy.spec.get("feature_spec") or {})  # type: ignore[call-overload]
        # The prompt-text part as policy.json records it (the whole spec, or its prompt_text part).
        policy_spec: dict[str, Any] = dict(recorded_spec.get("prompt_text", recorded_spec))
        table_spec: dict[str, Any] = dict(manifest["feature_spec"])
        if policy_spec != table_spec:
            keys = sorted(key for key in policy_spec | table_spec if policy_spec.get(key) != table_spec.get(key))
            raise ValueError(f"{where}: the policy's feature spec differs from the table's in {keys}")
    if features.source is not None:
        recorded = manifest.get("lm_hidden")
        if recorded is None:
            raise ValueError(
                f"{where}: the policy's features ({features.name}) need the LM's hidden states, which the table has "
                "not recorded; add them with `tokenopt add-features TABLE --features lm-hidden`"
            )
        if dict(recorded) != features.source.to_dict():
            raise ValueError(
                f"{where}: the policy reads the hidden state {features.source.to_dict()}; the table recorded {recorded}"
            )
    if probe_controller:
        if policy.probe is None:
            raise ValueError(
                f"{where}: not a probe controller (trained on {policy.spec.get('env_id')!r}); "
                "expected a `tokenopt train --env probe` run"
            )
    elif policy.probe is not None:
        raise ValueError(
            f"{where}: a probe controller (answer or continue at checkpoints); gate, cv and eval's policy "
            "argument take per-query policies (eval scores a probe controller with --probe-run)"
        )
    elif stream_policy:
        from tokenopt.agents.common.hyperparams import ENV_IDS

        if policy.spec.get("env_id") != ENV_IDS["stream"]:
            raise ValueError(
                f"{where}: not a stream policy (trained on {policy.spec.get('env_id')!r}); "
                "expected a `tokenopt train --env stream` run"
            )
    elif policy.extra_inputs:
        raise ValueError(
            f"{where}: the policy takes extra inputs {policy.extra_inputs} (a stream policy); "
            "gate, cv and eval score per-query (budget env) policies (eval scores a stream policy with --stream-run)"
        )


def policy_choices(
    policy: BudgetPolicy, matrix: OutcomeMatrix, questions: dict[str, str], cost_weight: float | None = None
) -> np.ndarray:
    """The matrix column of the action the policy picks for each query, deciding from the question text.

    Args:
        policy: the runtime policy.
        matrix: the queries (a split of a table).
        questions: question text by query id.
        cost_weight: the price a price-conditioned policy decides at (the evaluation's lambda);
            None: its default. Ignored for a policy trained for one lambda.

    Raises:
        ValueError: a query has no question, the policy picks an action the table lacks, or
            ``cost_weight`` lies outside a price-conditioned policy's range.
    """
    missing = [query_id for query_id in matrix.ids if query_id not in questions]
    if missing:
        raise ValueError(f"{len(missing)} queries have no question in queries.parquet, e.g. {missing[0]!r}")
    hidden = None
    if policy.features.needs_hidden:
        if matrix.hidden is None:
            raise ValueError(f"the policy's features ({policy.features.name}) need the table's recorded hidden states")
        hidden = matrix.hidden  # what the LM computed at prefill, as a local server computes it
    price = cost_weight if policy.cost_weight_range is not None else None
    decisions = policy.decide_batch([questions[query_id] for query_id in matrix.ids], hidden=hidden, cost_weight=price)
    column = {name: j for j, name in enumerate(matrix.actions)}
    unknown = sorted({d.action for d in decisions} - set(column))
    if unknown:
        raise ValueError(f"the policy picks actions {unknown} that the table does not have")
    return np.array([column[d.action] for d in decisions], dtype=np.int64)


@dataclass
class EvaluationRow:
    """One method's metrics on a split."""

    method: str
    em: float
    tokens: float
    reward: float
    gap_recovered: float


def evaluate_policy(
    policy_dir: str | Path, table: str | Path, split: str = "test", cost_model: CostModel | None = None
) -> tuple[list[EvaluationRow], dict[str, Any]]:
    """The runtime policy against every fixed action and the oracle on a split.

    The policy decides from the question text, exactly as a server would.
    """
    cost_model = cost_model or CostModel()
    matrix = OutcomeMatrix.from_table(table).subset(split)
    chosen = policy_choices(BudgetPolicy.load(policy_dir), matrix, query_questions(table), cost_model.cost_weight)
    rewards = matrix.rewards(cost_model)

    def row(method: str, picks: np.ndarray) -> EvaluationRow:
        metrics = evaluate_actions(matrix, picks, cost_model)
        return EvaluationRow(method, metrics["em"], metrics["tokens"], metrics["reward"], metrics["gap_recovered"])

    rows = [row("tokenopt policy", chosen)]
    rows.append(row("oracle", rewards.argmax(axis=1)))
    for j, name in enumerate(matrix.actions):
        rows.append(row(f"fixed {name}", np.full(len(matrix.ids), j)))
    best_fixed_action = matrix.actions[int(np.argmax(rewards.mean(axis=0)))]
    extra = {
        "best_fixed_action": best_fixed_action,
        "action_mix": action_mix(matrix, chosen),
        "queries": len(matrix.ids),
    }
    return rows, extra
