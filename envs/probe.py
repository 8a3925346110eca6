"""``tokenopt/TokenBudgetProbe-v0``: watch the reasoning and decide when to answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from tokenopt.cost import DEFAULT_COST_WEIGHT, CostModel
from tokenopt.data import SPLITS
from tokenopt.probe import (
    PROBE_INPUTS,
    ProbeAction,
    answer_adjustment,
    escalate_columns,
    probe_inputs,
    probe_observation,
    segment_bill,
)
from tokenopt.table import OutcomeMatrix, ReplayTable

__all__ = ["DEFAULT_MODE", "DEFAULT_PROBE_TOKEN_PRICE", "PROBE_INPUTS", "TokenBudgetProbeEnv"]

DEFAULT_MODE = "greedy"
"""The mode reasoned in unless told otherwise (what ``tokenopt train --env probe`` trains)."""

DEFAULT_PROBE_TOKEN_PRICE = 1.0
"""Probe tokens cost what generated tokens cost unless told otherwise."""


class TokenBudgetProbeEnv(gym.Env[np.ndarray, np.int64]):
    """One query per episode, reasoned in segments: answer now, or reason on.

    ## Description
    The LM reasons on one query in one decoding mode. At each checkpoint (each budget
    of the action table, smallest first) the answer is probed: the answer cue is
    appended to the trace so far and the forced answer read, as ``tokenopt collect``
    does for every budget, so an outcome table already holds every probe and this
    environment replays it. After each probe the agent answers with it or lets the
    LM reason to the next checkpoint. With ``escalate_mode``, it may also escalate:
    give up on this trace and answer with another decoding mode at the current
    checkpoint's budget (the DEER/Dynasor rules can only stop; a query the reasoning
    mode gets wrong at every budget may be right in another mode even at budget 0).

    ## Action Space
    ``Discrete(2)``: 0 answers with the current probe's answer, 1 continues. With
    ``escalate_mode``, ``Discrete(3)``: 2 escalates, answering with the outcome of the
    fixed action (current checkpoint's budget, ``escalate_mode``) of the table.

    ## Observation Space
    ``Box(float32 min, float32 max, (feature_dim + 7,), float32)``: the prompt's features, then
    :data:`PROBE_INPUTS`: tokens billed so far over the largest budget, the
    checkpoint's index over the last index, the probe answer's mean log-probability,
    whether it equals the previous probe's answer, whether the last three agree, the
    share of probes whose answer changed, and whether the LM has stopped reasoning
    by itself.

    ## Rewards
    Each step is charged ``cost_weight * cost`` of the tokens it adds (the first step
    also pays for the probe at the first checkpoint): the reasoning
    up to the checkpoint, and the probe's cue and answer tokens, each weighted by
    ``probe_token_price`` relative to a generated token (1: a probe costs what
    generated tokens cost; a server with prefix caching re-reads the trace cheaply
    and may price probes lower). The final answer's own cue and answer tokens count
    in full. Probes are not free: with the default price, probing every checkpoint
    of a long ladder can cost more than the reasoning it saves.
    Answering adds the exact match of the returned answer (0 or 1).
    Escalating adds that fixed action's exact match and is charged its full billed
    tokens on top of everything billed so far (the reasoning and every probe,
    this checkpoint's included, at the probe price): the escalated mode reasons again
    from the prompt, since a trace of one mode cannot be continued in another (beam
    search or self-consistency sampling starts from the prompt).

    ## Episode End
    ``terminated`` when the agent answers, when the LM has stopped reasoning by itself
    (reasoning on would change nothing, so the probe is the answer), or at the
    largest budget. At such a checkpoint the probe answers whatever the action (the
    runtime session does not ask the controller there), so escalation happens only
    at a checkpoint the agent could have continued from. ``info`` has ``em``,
    ``billed_tokens``, ``budget``, ``checkpoint``, ``escalated`` (whether the answer
    came from ``escalate_mode``) and ``query_id``.

    ## Arguments
    - ``table``: an outcome-table folder, or ``replay``: a loaded :class:`ReplayTable`.
    - ``split``: ``train``, ``val`` or ``test``.
    - ``mode``: the decoding mode whose budgets are the checkpoints (default greedy).
    - ``cost_weight``, ``token_price``: the cost model; ``probe_token_price``: the
      weight of a probe's tokens relative to generated tokens.
    - ``escalate_mode``: a mode of the table, other than ``mode``, with a budget at
      every checkpoint, to escalate to (action 2); None (default): no escalation.
    - ``render_mode``: accepted as ``gymnasium.make`` passes it; nothing is rendered.

    ## Version History
    - v0: initial version; ``escalate_mode`` added later (optional, off by default,
      so v0 behaves as before).
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        table: str | Path | None = None,
        split: str = "train",
        mode: str = DEFAULT_MODE,
        cost_weight: float = DEFAULT_COST_WEIGHT,
        token_price: float = 1.0,
        probe_token_price: float = DEFAULT_PROBE_TOKEN_PRICE,
        replay: ReplayTable | None = None,
        escalate_mode: str | None = None,
        render_mode: str | None = None,
    ) -> None:
        self.render_mode = render_mode  # nothing to render; accepted as gymnasium.make passes it
        if (table is None) == (replay is None):
            raise ValueError("give exactly one of table (a folder) or replay (a loaded ReplayTable)")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
        if replay is None:
            replay = ReplayTable.load(str(table), OutcomeMatrix.from_table(str(table)))
        if mode not in replay.mode_names:
            raise ValueError(f"mode {mode!r} is not in the table; it has {replay.mode_names}")
        if replay.matrix.features is None:
            raise ValueError("the outcome table has no features.parquet; collect it again")
        self.replay = replay.subset(split)
        self.ladder = replay.ladder(mode)
        if len(self.ladder) < 2:
            raise ValueError(f"mode {mode!r} has {len(self.ladder)} budget(s); probing needs at least 2 checkpoints")
        self.escalate_mode = escalate_mode
        actions = list(zip(replay.budgets.tolist(), replay.modes, strict=True))
        self.escalate_columns = escalate_columns(actions, mode, escalate_mode)
        """Per checkpoint: the action column escalation answers with (empty without ``escalate_mode``)."""
        self.cost_model = CostModel(cost_weight, token_price)
        self.probe_token_price = float(probe_token_price)
        if not np.isfinite(self.probe_token_price) or self.probe_token_price < 0:
            raise ValueError(f"probe_token_price must be a finite number >= 0; got {probe_token_price}")
        features = self.replay.matrix.features
        assert features is not None
        self.features: np.ndarray = features
        self.max_budget = float(self.replay.budgets[self.ladder[-1]])
        dim = self.features.shape[1] + len(PROBE_INPUTS)
        limit = np.finfo(np.float32).max
        self.observation_space = spaces.Box(-limit, limit, (dim,), np.float32)
        self.action_space = spaces.Discrete(2 if escalate_mode is None else 3)
        self._query = 0
        self._step = 0
        self._billed = 0.0
        self._changes = 0
        self._unpaid = 0.0

    def set_cost_weight(self, cost_weight: float) -> None:
        """Change lambda (a training callback adapts it)."""
        self.cost_model = CostModel(cost_weight, self.cost_model.token_price)

    def _observation(self) -> np.ndarray:
        i, k = self._query, self._step
        column = self.ladder[k]
        answers = [self.replay.answers[i, j] for j in self.ladder[: k + 1]]
        inputs = probe_inputs(
            self._billed, self.max_budget, k, len(self.ladder), self.replay.answer_logprob[i, column], answers,
            self._changes, bool(self.replay.natural_stop[i, column]),
        )  # fmt: skip
        return probe_observation(self.features[i], inputs)

    def _probe_cost(self, step: int) -> float:
        """Tokens billed to reach checkpoint ``step`` from the previous one, and probe it."""
        i, column = self._query, self.ladder[step]
        previous = self.replay.reasoning_tokens[i, self.ladder[step - 1]] if step > 0 else 0.0
        return segment_bill(
            self.replay.reasoning_tokens[i, column],
            previous,
            self.replay.probe_tokens[i, column],
            self.probe_token_price,
        )

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        """Draw a query (``options={"query": row}`` picks one) and probe at the first checkpoint."""
        super().reset(seed=seed)
        if options is not None and "query" in options:
            self._query = int(options["query"])
        else:
            self._query = int(self.np_random.integers(len(self.replay.matrix.ids)))
        self._step = 0
        self._changes = 0
        self._billed = self._probe_cost(0)
        self._unpaid = self._billed  # charged with the first step's reward (reset returns none)
        return self._observation(), {"query_id": self.replay.matrix.ids[self._query]}

    def _settled(self) -> bool:
        column = self.ladder[self._step]
        return bool(self.replay.natural_stop[self._query, column]) or self._step == len(self.ladder) - 1

    def step(self, action: np.int64 | int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Answer with the current probe, or reason on to the next checkpoint and probe there.

        Reaching a checkpoint where the LM has stopped by itself, or the largest budget,
        answers there: nothing is left to decide.
        """
        if not self.action_space.contains(action):
            allowed = "0 (answer) or 1 (continue)" if self.escalate_mode is None else "0, 1 or 2 (escalate)"
            raise ValueError(f"action {action!r} is not {allowed}")
        i = self._query
        reward = -self.cost_model.cost_weight * float(self.cost_model.cost(np.asarray(self._unpaid)))
        self._unpaid = 0.0
        if int(action) == ProbeAction.ESCALATE and not self._settled():
            return self._escalate(reward)
        if int(action) == ProbeAction.CONTINUE and not self._settled():
            before = self.replay.answers[i, self.ladder[self._step]]
            self._step += 1
            added = self._probe_cost(self._step)
            self._billed += added
            self._changes += int(self.replay.answers[i, self.ladder[self._step]] != before)
            reward -= self.cost_model.cost_weight * float(self.cost_model.cost(np.asarray(added)))
            if not self._settled():
                return self._observation(), reward, False, False, {}
        # Answer with the current probe: its cue and answer are the answer's, billed at the token price.
        column = self.ladder[self._step]
        adjust = answer_adjustment(self.replay.probe_tokens[i, column], self.probe_token_price)
        em = float(self.replay.matrix.exact_match[i, column])
        reward += em - self.cost_model.cost_weight * float(self.cost_model.cost(np.asarray(adjust)))
        info = {
            "em": em,
            "billed_tokens": self._billed + adjust,
            "budget": int(self.replay.budgets[column]),
            "checkpoint": self._step,
            "escalated": False,
            "query_id": self.replay.matrix.ids[i],
        }
        return self._observation(), reward, True, False, info

    def _escalate(self, reward: float) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Answer with the fixed action (current budget, ``escalate_mode``): its EM, its full bill on top."""
        i, column = self._query, self.escalate_columns[self._step]
        added = float(self.replay.matrix.billed_tokens[i, column])
        em = float(self.replay.matrix.exact_match[i, column])
        reward += em - self.cost_model.cost_weight * float(self.cost_model.cost(np.asarray(added)))
        info = {
            "em": em,
            "billed_tokens": self._billed + added,
            "budget": int(self.replay.budgets[column]),
            "checkpoint": self._step,
            "escalated": True,
            "query_id": self.replay.matrix.ids[i],
        }
        return self._observation(), reward, True, False, info
