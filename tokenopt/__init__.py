"""tokenopt: learn per-query token budgets and decoding modes for LLMs with RL."""

from tokenopt.actions import Action, Mode, build_action_table, parse_budgets, parse_modes
from tokenopt.cost import DEFAULT_COST_WEIGHT, CostModel
from tokenopt.features import FeatureSpec, PromptFeatures
from tokenopt.scoring import exact_match, normalize_answer

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_COST_WEIGHT",
    "Action",
    "CostModel",
    "FeatureSpec",
    "Mode",
    "PromptFeatures",
    "__version__",
    "build_action_table",
    "exact_match",
    "normalize_answer",
    "parse_budgets",
    "parse_modes",
]
