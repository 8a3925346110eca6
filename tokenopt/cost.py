"""The cost model: what an action's tokens cost, and the reward ``EM - lambda * cost``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_COST_WEIGHT", "CostModel", "CostSettings"]

DEFAULT_COST_WEIGHT = 0.01
"""Default lambda: 100 billed tokens cost as much as one exact match."""


@dataclass(frozen=True)
class CostModel:
    """Prices of tokens and the weight of cost against exact match."""

    cost_weight: float = DEFAULT_COST_WEIGHT
    """lambda in ``reward = EM - lambda * cost``."""
    token_price: float = 1.0
    """Price of one billed (generated) token."""
    prompt_token_price: float = 0.0
    """Price of one prompt token (0 when prompts are not billed or are cached)."""
    normalizer: float = 1.0
    """Cost is divided by this, e.g. to express it per 1,000 tokens."""

    def __post_init__(self) -> None:
        for name in ("cost_weight", "token_price", "prompt_token_price"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0; got {value}")
        if not np.isfinite(self.normalizer) or self.normalizer <= 0:
            raise ValueError(f"normalizer must be a finite number > 0; got {self.normalizer}")

    def cost(self, billed_tokens: np.ndarray, prompt_tokens: np.ndarray | float = 0.0) -> np.ndarray:
        """The cost of actions with these token counts."""
        billed = np.asarray(billed_tokens, dtype=np.float64)
        prompt = np.asarray(prompt_tokens, dtype=np.float64)
        return (self.token_price * billed + self.prompt_token_price * prompt) / self.normalizer

    def reward(
        self, exact_match: np.ndarray, billed_tokens: np.ndarray, prompt_tokens: np.ndarray | float = 0.0
    ) -> np.ndarray:
        """``EM - lambda * cost`` for each action."""
        return np.asarray(exact_match, dtype=np.float64) - self.cost_weight * self.cost(billed_tokens, prompt_tokens)


@dataclass
class CostSettings:
    """The cost fields of a command's settings (train, gate, from-log, ...), declared once.

    A config dataclass inherits them and builds its :class:`CostModel` with
    :meth:`cost_model`, so every command prices tokens the same way.
    """

    cost_weight: float = DEFAULT_COST_WEIGHT
    """lambda in ``reward = EM - lambda * cost``."""
    token_price: float = 1.0
    """Price of a billed token."""
    prompt_token_price: float = 0.0
    """Price of a prompt token."""

    def cost_model(self, cost_weight: float | None = None) -> CostModel:
        """The cost model of these prices, at ``cost_weight`` (default: the configured lambda).

        Raises:
            ValueError: a price or the weight is negative or not finite.
        """
        weight = self.cost_weight if cost_weight is None else cost_weight
        return CostModel(weight, self.token_price, self.prompt_token_price)
