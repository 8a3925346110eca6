"""``tokenopt/TokenBudget-v0``: choose one query's token budget and decoding mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from tokenopt.cost import DEFAULT_COST_WEIGHT, CostModel, parse_cost_weight_range, with_price
from tokenopt.envs.sources import OutcomeSource, TableSource

__all__ = ["REWARD_BASELINES", "REWARD_SCALES", "TokenBudgetEnv"]

REWARD_BASELINES = ("none", "mean", "best_fixed")
"""Per-query baselines the training reward may subtract (``reward_baseline``): none, the query's mean
reward over every action, or the reward on it of the action best on average over the split."""
REWARD_SCALES = ("none", "spread")
"""What the training reward may be divided by (``reward_scale``): nothing, or its spread over actions at
the episode's lambda."""


class TokenBudgetEnv(gym.Env[np.ndarray, Any]):
    """One query per episode: pick a (budget, mode) action for it.

    ## Description
    Each episode draws one query of the split. The agent sees the query's feature
    vector and picks an action of the action table: a reasoning budget and a
    decoding mode. The source returns what that action did (exact match and tokens
    billed), from a collected outcome table or from the live LM.

    ## Action Space
    ``Discrete(n_actions)`` over the action table (modes outer, budgets inner), or
    with ``action_type="multidiscrete"`` a ``MultiDiscrete([n_budgets, n_modes])``.
    :meth:`action_masks` says which actions are valid for the current query (for
    MaskablePPO); an invalid action is replaced by the cheapest valid one.

    ## Observation Space
    ``Box(0, float32 max, (feature_dim,), float32)``: the query's features from
    :class:`tokenopt.PromptFeatures`; ``Box(float32 min, float32 max, ...)`` when some
    feature is negative (the projected hidden state of ``lm-hidden`` features).
    With ``cost_weight_range`` one more input comes last: ``log lambda`` of the episode
    (``Box(float32 min, ...)``, ``feature_dim + 1`` inputs).

    ## Rewards
    ``EM - cost_weight * cost``, with ``cost`` from :class:`tokenopt.CostModel`
    (price per billed token, optional price per prompt token, a normaliser).

    With ``reward_baseline`` ``mean`` or ``best_fixed`` (a source that knows every action's
    outcome, such as a table), the reward is shaped: ``r(q, a) - b(q)``, where ``b(q)`` is the
    query's mean reward over all actions, or the reward on ``q`` of the action with the best
    mean reward over the split. ``b`` does not depend on the action, so for these one-step
    episodes the policy gradient is unchanged in expectation (a baseline, Williams 1992) while
    its variance drops: what the query's difficulty adds to every action is taken out. The
    unshaped reward is in ``info["unshaped_reward"]``; validation and evaluation use it.

    With ``cost_weight_range=(low, high)`` the price is part of the episode: each reset draws
    lambda log-uniformly from the range (or takes ``options["cost_weight"]``), the agent sees
    ``log lambda`` as its last input, and the reward (and baseline) use that lambda. One
    policy then learns the decision at every price: a price-conditioned policy.

    With ``reward_scale="spread"`` (a source that knows every action's outcome) the training
    reward is divided by ``s(lambda)``, the reward's spread over actions at the episode's
    lambda: the standard deviation over actions of ``r(q, a)``, averaged over the split's
    queries. The spread grows with lambda (about 5x from 0.0025 to 0.08 on the demo), so
    without it a price-conditioned policy's batches take most of their advantages from the
    high prices; with it every price weighs alike. ``s`` depends on lambda alone, so at each
    price the best action is unchanged; the unshaped reward is still in
    ``info["unshaped_reward"]``.

    ## Episode End
    After one step: ``terminated=True``. ``info`` has ``em``, ``billed_tokens``,
    ``action`` (its name), ``query_id``, ``unshaped_reward`` and ``baseline`` (0 without shaping).

    ## Arguments
    - ``table``: an outcome-table folder, or ``source``: any :class:`OutcomeSource`.
    - ``split``: ``train``, ``val`` or ``test``.
    - ``cost_weight``, ``token_price``, ``prompt_token_price``, ``cost_normalizer``: the cost model.
    - ``action_type``: ``discrete`` or ``multidiscrete``.
    - ``budgets``, ``modes``: when given, the table must have exactly this action set.
    - ``reward_baseline``: ``none`` (default), ``mean`` or ``best_fixed`` (see Rewards).
    - ``reward_scale``: ``none`` (default) or ``spread`` (see Rewards).
    - ``cost_weight_range``: ``(low, high)`` with ``0 < low < high``, or ``"LOW:HIGH"``: draw lambda
      per episode and observe it (see Rewards); None (default): ``cost_weight`` throughout.
    - ``render_mode``: accepted as ``gymnasium.make`` passes it; nothing is rendered.

    ## Version History
    - v0: initial version; later the lower bound became float32 min when some feature is
      negative (lm-hidden), and ``reward_baseline`` was added (default ``none``: rewards unchanged);
      then ``cost_weight_range`` (default None: observations and rewards unchanged), then
      ``reward_scale`` (default ``none``: rewards unchanged).
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        table: str | Path | None = None,
        split: str = "train",
        cost_weight: float = DEFAULT_COST_WEIGHT,
        token_price: float = 1.0,
        prompt_token_price: float = 0.0,
        cost_normalizer: float = 1.0,
        action_type: str = "discrete",
        budgets: list[int] | None = None,
        modes: list[str] | None = None,
        source: OutcomeSource | None = None,
        render_mode: str | None = None,
        reward_baseline: str | None = None,
        cost_weight_range: tuple[float, float] | str | None = None,
        reward_scale: str | None = None,
    ) -> None:
        self.render_mode = render_mode  # nothing to render; accepted as gymnasium.make passes it
        if (table is None) == (source is None):
            raise ValueError("give exactly one of table (an outcome-table folder) or source")
        self.source: OutcomeSource = source if source is not None else TableSource(table, split, budgets, modes)
        self.split = split
        self.cost_model = CostModel(cost_weight, token_price, prompt_token_price, cost_normalizer)
        self.actions = self.source.actions
        self.budgets = sorted({a.budget for a in self.actions})
        self.modes = list(dict.fromkeys(a.mode for a in self.actions))
        if action_type == "discrete":
            self.action_space: spaces.Space[Any] = spaces.Discrete(len(self.actions))
        elif action_type == "multidiscrete":
            if len(self.actions) != len(self.budgets) * len(self.modes):
                raise ValueError("a multidiscrete action space needs the full budgets x modes table")
            self.action_space = spaces.MultiDiscrete([len(self.budgets), len(self.modes)])
        else:
            raise ValueError(f"unknown action_type {action_type!r}: expected discrete or multidiscrete")
        self.action_type = action_type
        self.cost_weight_range = None if cost_weight_range is None else parse_cost_weight_range(cost_weight_range)
        dim = self.source.features.shape[1] + (self.cost_weight_range is not None)
        limit = np.finfo(np.float32).max
        low = 0.0 if (self.source.features >= 0).all() and self.cost_weight_range is None else -limit
        self.observation_space = spaces.Box(low, limit, shape=(dim,), dtype=np.float32)
        self._query = 0
        self._cheapest = int(np.argmin([a.budget * 1000 + self.modes.index(a.mode) for a in self.actions]))
        self.reward_baseline = "none" if reward_baseline is None else str(reward_baseline)
        if self.reward_baseline not in REWARD_BASELINES:
            raise ValueError(
                f"unknown reward_baseline {reward_baseline!r}: expected one of {', '.join(REWARD_BASELINES)}"
            )
        self.reward_scale = "none" if reward_scale is None else str(reward_scale)
        if self.reward_scale not in REWARD_SCALES:
            raise ValueError(f"unknown reward_scale {reward_scale!r}: expected one of {', '.join(REWARD_SCALES)}")
        self._outcomes: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._baselines: np.ndarray | None = None
        self._scale: float | None = None
        self._rewards: np.ndarray | None = None
        settings = {"reward_baseline": self.reward_baseline, "reward_scale": self.reward_scale}
        shaping = [f"{name} {value!r}" for name, value in settings.items() if value != "none"]
        if shaping:
            known = [self.source.known_outcomes(q) for q in range(len(self.source.query_ids))]
            if any(row is None for row in known):
                raise ValueError(
                    f"{' and '.join(shaping)} need every action's outcome on every query, which this source does "
                    "not know (the live LM runs one action at a time); use a collected table or set them to 'none'"
                )
            rows = [row for row in known if row is not None]
            self._outcomes = (
                np.stack([row[0] for row in rows]).astype(np.float64),
                np.stack([row[1] for row in rows]).astype(np.float64),
                np.array([row[2] for row in rows], dtype=np.float64),
            )

    @property
    def cost_weight(self) -> float:
        """The current lambda (a Lagrangian callback may change it)."""
        return self.cost_model.cost_weight

    def set_cost_weight(self, value: float) -> None:
        """Set lambda, e.g. from a dual-ascent callback."""
        self.cost_model = CostModel(
            value, self.cost_model.token_price, self.cost_model.prompt_token_price, self.cost_model.normalizer
        )
        self._baselines = None  # they depend on lambda
        self._scale = None
        self._rewards = None

    def baselines(self) -> np.ndarray:
        """``b(q)`` of every query of the split under the current cost model (zeros without shaping)."""
        if self._outcomes is None or self.reward_baseline == "none":
            return np.zeros(len(self.source.query_ids))
        if self._baselines is None:
            rewards = self._split_rewards()
            if self.reward_baseline == "mean":
                self._baselines = rewards.mean(axis=1)
            else:
                self._baselines = rewards[:, int(np.argmax(rewards.mean(axis=0)))]
        return self._baselines

    def _split_rewards(self) -> np.ndarray:
        """Every (query, action) reward of the split at the current lambda, computed once per lambda."""
        assert self._outcomes is not None
        if self._rewards is None:
            exact, billed, prompt = self._outcomes
            self._rewards = self.cost_model.reward(exact, billed, prompt[:, None])
        return self._rewards

    def scale(self) -> float:
        """``s(lambda)``: what the training reward is divided by (1.0 without ``reward_scale``)."""
        if self._outcomes is None or self.reward_scale == "none":
            return 1.0
        if self._scale is None:
            spread = float(self._split_rewards().std(axis=1).mean())
            self._scale = spread if spread > 1e-9 else 1.0  # every action alike on every query: nothing to scale
        return self._scale

    def _action_index(self, action: Any) -> int:
        if self.action_type == "multidiscrete":
            budget_index, mode_index = (int(x) for x in np.asarray(action).reshape(-1))
            return mode_index * len(self.budgets) + budget_index
        return int(np.asarray(action).reshape(-1)[0])

    def action_masks(self) -> np.ndarray:
        """Valid actions for the current query (flat, or budgets then modes for multidiscrete)."""
        mask = self.source.action_mask(self._query)
        if self.action_type == "multidiscrete":
            grid = mask.reshape(len(self.modes), len(self.budgets))
            return np.concatenate([grid.any(axis=0), grid.any(axis=1)])
        return mask

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Draw a query (or take ``options["query_index"]``), and lambda when it is drawn, and observe them."""
        super().reset(seed=seed)
        if options and "query_index" in options:
            self._query = int(options["query_index"])
        else:
            self._query = int(self.np_random.integers(len(self.source.query_ids)))
        if self.cost_weight_range is not None:
            if options and "cost_weight" in options:
                self.set_cost_weight(float(options["cost_weight"]))
            else:
                low, high = np.log(self.cost_weight_range)
                self.set_cost_weight(float(np.exp(self.np_random.uniform(low, high))))
        return self._observation(), {"query_id": self.source.query_ids[self._query]}

    def _observation(self) -> np.ndarray:
        features = self.source.features[self._query]
        return features.copy() if self.cost_weight_range is None else with_price(features, self.cost_weight)

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Apply the action to the current query; the episode ends."""
        index = self._action_index(action)
        if not 0 <= index < len(self.actions):
            raise ValueError(f"action {action!r} is outside the action table of {len(self.actions)} actions")
        if not self.source.action_mask(self._query)[index]:
            index = self._cheapest
        outcome = self.source.outcome(self._query, index)
        reward = float(self.cost_model.reward(outcome.exact_match, outcome.billed_tokens, outcome.prompt_tokens))
        baseline = float(self.baselines()[self._query]) if self.reward_baseline != "none" else 0.0
        info = {
            "cost_weight": self.cost_weight,
            "em": outcome.exact_match,
            "billed_tokens": outcome.billed_tokens,
            "action": self.actions[index].name,
            "query_id": self.source.query_ids[self._query],
            "unshaped_reward": reward,
            "baseline": baseline,
        }
        return self._observation(), (reward - baseline) / self.scale(), True, False, info
