"""The cost model: what an action's tokens cost, and the reward ``EM - lambda * cost``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_COST_WEIGHT", "CostModel", "CostSettings", "parse_cost_weight_range", "with_price"]

DEFAULT_COST_WEIGHT = 0.01
"""Default lambda: 100 billed tokens cost as much as one exact match."""


def parse_cost_weight_range(text: str | tuple[float, float] | list[float]) -> tuple[float, float]:
    """``LOW:HIGH`` (or a pair) as the lambda range of a price-conditioned policy.

    A price-conditioned policy takes ``log lambda`` as an input, so both ends must be > 0.

    Raises:
        ValueError: not two numbers, not finite, ``LOW <= 0`` or ``HIGH <= LOW``; the message gives the form.
    """
    if isinstance(text, str):
        parts = text.split(":")
        if len(parts) != 2:
            raise ValueError(f"cost weight range {text!r} is not LOW:HIGH (e.g. 0.002:0.05)")
        try:
            low, high = float(parts[0]), float(parts[1])
        except ValueError:
            raise ValueError(f"cost weight range {text!r} is not LOW:HIGH with two numbers (e.g. 0.002:0.05)") from None
    else:
        if len(text) != 2:
            raise ValueError(f"a cost weight range has two ends (LOW, HIGH); got {list(text)}")
        low, high = float(text[0]), float(text[1])
    if not (np.isfinite(low) and np.isfinite(high)) or low <= 0 or high <= low:
        raise ValueError(
            f"cost weight range {low:g}:{high:g} must satisfy 0 < LOW < HIGH < inf (log lambda is the policy's input)"
        )
    return low, high


def with_price(features: np.ndarray, cost_weight: float | np.ndarray) -> np.ndarray:
    """What a price-conditioned policy observes: the features with ``log lambda`` appended as the last input.

    Args:
        features: one feature vector, or a batch (rows).
        cost_weight: lambda (> 0), one for all rows or one per row.
    """
    features = np.asarray(features)
    if features.ndim == 1:
        return np.append(features, np.log(float(cost_weight))).astype(features.dtype, copy=False)
    column = np.broadcast_to(np.log(np.asarray(cost_weight, dtype=np.float64)), (len(features),))
    return np.concatenate([features, column[:, None].astype(features.dtype)], axis=1)


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
