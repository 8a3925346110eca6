"""PPO training, tuning, evaluation and export of tokenopt, installed as ``tokenopt.agents``."""

__all__: list[str] = []
