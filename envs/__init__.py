"""Gymnasium environments of tokenopt, installed as ``tokenopt.envs``.

Importing this package registers ``tokenopt/TokenBudget-v0``,
``tokenopt/TokenBudgetStream-v0`` and ``tokenopt/TokenBudgetProbe-v0``.
"""

from gymnasium.envs.registration import register, registry

from tokenopt.envs.budget import TokenBudgetEnv
from tokenopt.envs.probe import TokenBudgetProbeEnv
from tokenopt.envs.sources import LiveLMSource, Outcome, OutcomeSource, TableSource
from tokenopt.envs.stream import TokenBudgetStreamEnv

__all__ = [
    "LiveLMSource",
    "Outcome",
    "OutcomeSource",
    "TableSource",
    "TokenBudgetEnv",
    "TokenBudgetProbeEnv",
    "TokenBudgetStreamEnv",
]

for _env_id, _entry_point in (
    ("tokenopt/TokenBudget-v0", "tokenopt.envs.budget:TokenBudgetEnv"),
    ("tokenopt/TokenBudgetStream-v0", "tokenopt.envs.stream:TokenBudgetStreamEnv"),
    ("tokenopt/TokenBudgetProbe-v0", "tokenopt.envs.probe:TokenBudgetProbeEnv"),
):
    if _env_id not in registry:
        register(id=_env_id, entry_point=_entry_point)
