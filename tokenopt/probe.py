"""Probing the reasoning: the probe controller's inputs, decisions and bill (numpy and the standard library only).

A probe controller watches one request reason in one mode. At each checkpoint (a
budget of that mode) the answer is probed: the cue is forced and the answer read.
The controller then answers with that probe, reasons on to the next checkpoint, or
(with an ``escalate_mode``) generates afresh in another mode. The environment
(``tokenopt/TokenBudgetProbe-v0``), the runtime session that servers drive, and the
replayed baselines all build the controller's input and the bill here, so what a
controller sees in training is what it sees in production.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum

import numpy as np

__all__ = [
    "ANSWER",
    "CONTINUE",
    "ESCALATE",
    "PROBE_INPUTS",
    "ProbeAction",
    "answer_adjustment",
    "escalate_columns",
    "exit_bill",
    "probe_inputs",
    "probe_observation",
    "segment_bill",
]

PROBE_INPUTS = [
    "tokens_spent_fraction",
    "checkpoint_fraction",
    "probe_logprob",
    "agrees_with_last",
    "last_three_agree",
    "answer_changes_fraction",
    "stopped_by_itself",
]
"""What the probes said so far, appended to the prompt features (in this order)."""


class ProbeAction(IntEnum):
    """A probe controller's outputs: the environment's actions, and the index of its action head."""

    ANSWER = 0
    """Answer with the current probe."""
    CONTINUE = 1
    """Reason on to the next checkpoint and probe there."""
    ESCALATE = 2
    """Generate afresh in the escalate mode at the current checkpoint's budget (controllers with one)."""

    @property
    def decision(self) -> str:
        """The decision's name, as the runtime session returns it: ``answer``, ``continue`` or ``escalate``."""
        return self.name.lower()


ANSWER, CONTINUE, ESCALATE = (action.decision for action in ProbeAction)
"""The runtime session's decisions, by name."""


def probe_inputs(
    tokens_spent: float,
    max_budget: float,
    step: int,
    checkpoints: int,
    logprob: float,
    answers: Sequence[str],
    changes: int,
    stopped: bool,
) -> list[float]:
    """The :data:`PROBE_INPUTS` at checkpoint ``step``.

    Args:
        tokens_spent: tokens billed so far (reasoning plus every probe, probes at their price).
        max_budget: the last checkpoint's budget.
        step: the checkpoint's index (0 first).
        checkpoints: how many checkpoints the ladder has.
        logprob: the probe answer's mean token log-probability.
        answers: the normalised probe answers so far, this one last.
        changes: how many times the probe answer changed so far.
        stopped: the LM ended its reasoning by itself before this checkpoint.
    """
    recent = list(answers[-3:])
    return [
        tokens_spent / max(float(max_budget), 1.0),
        step / (checkpoints - 1),
        float(logprob),
        float(step >= 1 and recent[-1] == recent[-2]),
        float(step >= 2 and len(set(recent)) == 1),
        changes / max(step, 1),
        float(stopped),
    ]


def probe_observation(features: np.ndarray, inputs: Sequence[float]) -> np.ndarray:
    """The controller's input: the prompt features, then the probe inputs, as float32."""
    return np.concatenate([np.asarray(features, dtype=np.float32), np.asarray(inputs, dtype=np.float32)]).astype(
        np.float32
    )


def segment_bill(reasoning_now: float, reasoning_before: float, probe_tokens: float, probe_token_price: float) -> float:
    """Tokens billed to reason from one checkpoint to the next and probe there (probe tokens at their price)."""
    return (reasoning_now - reasoning_before) + probe_token_price * probe_tokens


def answer_adjustment(probe_tokens: float, probe_token_price: float) -> float:
    """Added to the bill when a probe becomes the answer: its cue and answer tokens are billed in full."""
    return (1.0 - probe_token_price) * probe_tokens


def exit_bill(reasoning: float, earlier_probe_tokens: float, probe_tokens: float, probe_token_price: float) -> float:
    """What answering at a checkpoint bills.

    The reasoning up to it, the earlier probes at their price, and the last probe in
    full (it is the answer).
    """
    return float(reasoning + probe_token_price * earlier_probe_tokens + probe_tokens)


def escalate_columns(
    actions: Sequence[tuple[int, str]], mode: str, escalate_mode: str | None, where: str = "the table"
) -> list[int]:
    """The action column of (checkpoint budget, ``escalate_mode``) for each checkpoint of ``mode``.

    The one check of an escalate mode, for the environment, the runtime and the replay.

    Args:
        actions: the action table as (budget, mode) pairs, in column order.
        mode: the mode the request reasons in (its budgets are the checkpoints).
        escalate_mode: the mode escalation answers in; None gives ``[]``.
        where: how to name the action table in a message.

    Raises:
        ValueError: ``escalate_mode`` is not in the action table, is ``mode`` itself, or
            lacks a checkpoint's budget.
    """
    if escalate_mode is None:
        return []
    modes = list(dict.fromkeys(m for _, m in actions))
    if escalate_mode not in modes:
        raise ValueError(f"escalate_mode {escalate_mode!r} is not in {where}; it has {modes}")
    if escalate_mode == mode:
        others = [name for name in modes if name != mode]
        raise ValueError(f"escalate_mode {escalate_mode!r} is the reasoning mode itself; pick another: {others}")
    column_of = {budget: j for j, (budget, m) in enumerate(actions) if m == escalate_mode}
    checkpoints = sorted(budget for budget, m in actions if m == mode)
    missing = [budget for budget in checkpoints if budget not in column_of]
    if missing:
        raise ValueError(
            f"escalate_mode {escalate_mode!r} has no action at the checkpoint budgets {missing} of mode {mode!r} "
            f"(it has {sorted(column_of)}); escalation answers at the current checkpoint's budget"
        )
    return [column_of[budget] for budget in checkpoints]
