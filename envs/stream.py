"""``tokenopt/TokenBudgetStream-v0``: a stream of queries that share one token budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from tokenopt.envs.sources import OutcomeSource, TableSource

__all__ = ["TokenBudgetStreamEnv"]


class TokenBudgetStreamEnv(gym.Env[np.ndarray, Any]):
    """A stream of queries sharing one total token budget.

    ## Description
    An episode is a stream of ``stream_length`` queries drawn from the split. They
    share ``total_budget`` billed tokens: the agent must save tokens on easy queries
    to spend them on hard ones. Overspending is impossible: an action that costs
    more than what is left falls back to the cheapest action, and once the budget
    is spent a query that cannot afford even the cheapest action scores 0 and costs
    nothing.

    ## Action Space
    ``Discrete(n_actions)`` over the action table; :meth:`action_masks` hides the
    actions that no longer fit in what is left (when their cost is known, i.e. from
    a table).

    ## Observation Space
    ``Box(0, float32 max, (feature_dim + 2,), float32)``: the query's features, then the
    fraction of the token budget left and the fraction of queries left.

    ## Rewards
    The exact match of each query (the budget is the only cost).

    ## Episode End
    ``terminated=True`` after the last query of the stream.

    ## Arguments
    - ``table`` or ``source``; ``split``.
    - ``stream_length``: queries per episode (default 16).
    - ``total_budget``: billed tokens for the whole stream; default
      ``budget_fraction`` times the tokens of the most expensive greedy action
      summed over the stream (the mean over the split).
    - ``budget_fraction``: see above (default 0.5).
    - ``render_mode``: accepted as ``gymnasium.make`` passes it; nothing is rendered.

    ## Version History
    - v0: initial version.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        table: str | Path | None = None,
        split: str = "train",
        stream_length: int = 16,
        total_budget: float | None = None,
        budget_fraction: float = 0.5,
        source: OutcomeSource | None = None,
        render_mode: str | None = None,
    ) -> None:
        self.render_mode = render_mode  # nothing to render; accepted as gymnasium.make passes it
        if (table is None) == (source is None):
            raise ValueError("give exactly one of table (an outcome-table folder) or source")
        if stream_length < 1:
            raise ValueError(f"stream_length must be >= 1; got {stream_length}")
        self.source: OutcomeSource = source if source is not None else TableSource(table, split)
        self.actions = self.source.actions
        self.stream_length = stream_length
        if total_budget is None:
            if not 0 < budget_fraction:
                raise ValueError(f"budget_fraction must be > 0; got {budget_fraction}")
            greedy = [i for i, a in enumerate(self.actions) if a.mode == "greedy"] or list(range(len(self.actions)))
            largest = max(greedy, key=lambda i: self.actions[i].budget)
            costs = [self.source.known_costs(q) for q in range(len(self.source.query_ids))]
            if any(cost is None for cost in costs):
                # Deriving it would run the LM on every query of the split first.
                raise ValueError("give total_budget when the source's costs are not known in advance (a live LM)")
            mean_tokens = np.mean([float(cost[largest]) for cost in costs if cost is not None])
            total_budget = budget_fraction * stream_length * float(mean_tokens)
        if total_budget <= 0:
            raise ValueError(f"total_budget must be > 0; got {total_budget}")
        self.total_budget = float(total_budget)
        self._cheapest = int(np.argmin([a.budget * 1000 + (a.mode != "greedy") for a in self.actions]))
        self.action_space: spaces.Space[Any] = spaces.Discrete(len(self.actions))
        dim = self.source.features.shape[1] + 2
        self.observation_space = spaces.Box(0.0, np.finfo(np.float32).max, shape=(dim,), dtype=np.float32)
        self._order = np.zeros(stream_length, dtype=np.int64)
        self._position = 0
        self._left = self.total_budget

    def _observation(self) -> np.ndarray:
        query = self._order[min(self._position, self.stream_length - 1)]
        extra = np.array(
            [self._left / self.total_budget, (self.stream_length - self._position) / self.stream_length],
            dtype=np.float32,
        )
        return np.concatenate([self.source.features[query], extra]).astype(np.float32)

    def action_masks(self) -> np.ndarray:
        """Actions valid for the current query whose cost fits in what is left."""
        query = int(self._order[self._position])
        mask = self.source.action_mask(query)
        costs = self.source.known_costs(query)
        if costs is not None:
            mask = mask & (costs <= self._left)
        if not mask.any():
            mask[self._cheapest] = True
        return mask

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Draw a new stream and give the first query.

        ``options={"order": [...]}`` gives the stream instead: ``stream_length`` indices of
        the split's queries, answered in that order (to replay every query of a split
        once, as ``tokenopt eval --stream-run`` does).

        Raises:
            ValueError: an order of another length, or with an index outside the split.
        """
        super().reset(seed=seed)
        order = (options or {}).get("order")
        if order is None:
            self._order = self.np_random.integers(len(self.source.query_ids), size=self.stream_length)
        else:
            order = np.asarray(order, dtype=np.int64).reshape(-1)
            n = len(self.source.query_ids)
            if len(order) != self.stream_length or not ((order >= 0) & (order < n)).all():
                raise ValueError(
                    f"options['order'] must hold {self.stream_length} query indices in [0, {n}); got {order.tolist()}"
                )
            self._order = order
        self._position = 0
        self._left = self.total_budget
        return self._observation(), {"total_budget": self.total_budget}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Answer the current query with the action, within what is left."""
        index = int(np.asarray(action).reshape(-1)[0])
        if not 0 <= index < len(self.actions):
            raise ValueError(f"action {action!r} is outside the action table of {len(self.actions)} actions")
        query = int(self._order[self._position])
        if not self.source.action_mask(query)[index]:
            index = self._cheapest
        outcome = self.source.outcome(query, index)
        if outcome.billed_tokens > self._left:
            index = self._cheapest
            outcome = self.source.outcome(query, index)
        if outcome.billed_tokens > self._left:
            exact, billed = 0.0, 0.0
        else:
            exact, billed = outcome.exact_match, outcome.billed_tokens
        self._left -= billed
        self._position += 1
        terminated = self._position >= self.stream_length
        info = {
            "em": exact,
            "billed_tokens": billed,
            "action": self.actions[index].name,
            "query_id": self.source.query_ids[query],
            "budget_left": self._left,
        }
        return self._observation(), float(exact), terminated, False, info
