"""What the agents share: run folders, hyperparameters, callbacks, policy evaluation, statistics, plots."""

from tokenopt.agents.common.run_dir import RunDir

__all__ = ["RunDir"]
