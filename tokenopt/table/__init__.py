"""The outcome table: its schema on disk, the reader, and the evaluation of choices on it."""

from tokenopt.table.evaluation import (
    action_mix,
    evaluate_actions,
    evaluate_outcomes,
    gap_recovered,
    reference_rewards,
)
from tokenopt.table.reader import OutcomeMatrix, ReplayTable, load_manifest, load_outcomes
from tokenopt.table.schema import OUTCOME_SCHEMA, SCHEMA_VERSION

__all__ = [
    "OUTCOME_SCHEMA",
    "SCHEMA_VERSION",
    "OutcomeMatrix",
    "ReplayTable",
    "action_mix",
    "evaluate_actions",
    "evaluate_outcomes",
    "gap_recovered",
    "load_manifest",
    "load_outcomes",
    "reference_rewards",
]
