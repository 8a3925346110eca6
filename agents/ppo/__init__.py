"""PPO on the environments: training, validators, warm starts and hyperparameter tuning."""

from tokenopt.agents.ppo.train import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
