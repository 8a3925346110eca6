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
