"""Spend control: the server sets the price of a token online so that serving holds a token budget.

A price-conditioned policy maximises ``E[correct - lambda * billed_tokens]`` for any
``lambda`` (the cost weight) in its trained range. A budget is a constraint on the
spend: at most ``B`` billed tokens per second (``--token-budget``), or at most ``T``
billed tokens per request on average (``--target-mean-tokens``). The ``lambda`` that
meets it is the constraint's shadow price (Lagrange multiplier), and dual ascent finds
it by raising the price while the constraint is violated and lowering it while it is
slack: ``lambda <- lambda + eta * (spend - target)``.

:class:`SpendController` takes that step in log space on the relative violation,
``log lambda <- log lambda + clip(step * (spend / target - 1), -clip, clip)``, bounded
by the policy's ``cost_weight_range``: a multiplicative update keeps ``lambda``
positive, and one step size fits every budget (500 tokens/s or 2 M/h) and every
``lambda`` scale (1e-4 or 1e-1), which an additive step would not. Spend is measured
over a sliding window of the billed tokens the controller observed; the clock is
injectable so that tests are deterministic.

One controller holds one arm's share of the budget; :func:`save_state` and
:func:`load_state` keep each arm's ``lambda`` across restarts in a small JSON file,
written atomically.

This module imports the standard library only (a server's hot path; tests/test_layering.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "BUDGET_FORMS",
    "ControlSettings",
    "SpendController",
    "SpendTarget",
    "load_state",
    "parse_token_budget",
    "save_state",
    "spend_target",
]

BUDGET_FORMS = (
    "N/s, N/min or N/h, where N is a positive number with an optional k (thousand) or M (million) suffix, "
    "e.g. 500/s, 30k/min, 2M/h"
)
"""The budget strings ``--token-budget`` accepts (quoted in every refusal)."""

_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kKmM]?)\s*/\s*(s|sec|min|h|hour)\s*$")
_SECONDS = {"s": 1.0, "sec": 1.0, "min": 60.0, "h": 3600.0, "hour": 3600.0}
_MULTIPLIER = {"": 1.0, "k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6}

STATE_FORMAT = "tokenopt-spend-state"
STATE_VERSION = 1


@dataclass(frozen=True)
class SpendTarget:
    """What a controller holds the spend to: a rate (tokens per second) or a mean (tokens per request)."""

    kind: Literal["rate", "mean"]
    value: float
    """Tokens per second (``rate``) or billed tokens per request (``mean``)."""
    text: str
    """How the target was given (``2M/h``, ``300 tokens/request``), for messages and the state file."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.value) and self.value > 0):
            raise ValueError(f"a spend target must be a positive number of tokens; got {self.value} ({self.text})")

    def share(self, fraction: float) -> SpendTarget:
        """This target's share for a replica or an arm that gets ``fraction`` of the traffic.

        A rate is split (a fleet of N replicas behind an even load balancer spends N
        shares); a mean per request is the same for every share of the traffic.
        """
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"a share of the budget must be in (0, 1]; got {fraction}")
        if self.kind == "mean" or fraction == 1.0:
            return self
        return SpendTarget("rate", self.value * fraction, f"{self.text} x {fraction:g}")

    @property
    def unit(self) -> str:
        """``tokens/s`` or ``tokens/request``."""
        return "tokens/s" if self.kind == "rate" else "tokens/request"


def parse_token_budget(text: str) -> SpendTarget:
    """A ``--token-budget`` string (``500/s``, ``30k/min``, ``2M/h``) as a rate target in tokens per second.

    Raises:
        ValueError: the string is not one of the accepted forms (they are named), or is zero.
    """
    match = _BUDGET.match(text)
    if match is None:
        raise ValueError(f"token budget {text!r} is not understood; accepted forms: {BUDGET_FORMS}")
    number, suffix, unit = match.groups()
    tokens = float(number) * _MULTIPLIER[suffix]
    if tokens <= 0:
        raise ValueError(f"token budget {text!r} is zero; accepted forms: {BUDGET_FORMS}")
    return SpendTarget("rate", tokens / _SECONDS[unit], text.strip())


def spend_target(token_budget: str | None, target_mean_tokens: float | None) -> SpendTarget | None:
    """The target that ``--token-budget`` or ``--target-mean-tokens`` give (None with neither).

    Raises:
        ValueError: both are given, the budget string is not understood, or the mean is not positive.
    """
    if token_budget is not None and target_mean_tokens is not None:
        raise ValueError(
            "give --token-budget (a rate, e.g. 2M/h) or --target-mean-tokens (tokens per request), not both"
        )
    if token_budget is not None:
        return parse_token_budget(token_budget)
    if target_mean_tokens is not None:
        if not (math.isfinite(target_mean_tokens) and target_mean_tokens > 0):
            raise ValueError(f"--target-mean-tokens must be a positive number of tokens; got {target_mean_tokens}")
        return SpendTarget("mean", float(target_mean_tokens), f"{target_mean_tokens:g} tokens/request")
    return None


@dataclass(frozen=True)
class ControlSettings:
    """How a :class:`SpendController` measures spend and moves ``lambda`` (``tokenopt serve --budget-*``).

    The defaults are for a server that answers at least a few requests per second;
    the window and the interval are in seconds of the controller's clock.
    """

    window: float = 60.0
    """Seconds of billed tokens the spend is measured over (a sliding window). Long
    enough that one long request or a burst moves the measured spend a little, short
    enough to follow a change of the traffic mix within minutes; one minute matches
    the resolution at which Prometheus rules look at the spend."""
    interval: float = 10.0
    """Seconds between two updates of ``lambda``. Shorter than the window, so that
    consecutive measurements overlap: each update sees part of the spend at the
    previous prices, which damps the loop (six updates per window by default)."""
    step: float = 0.25
    """Step size: the change of ``log lambda`` per unit of relative overspend
    (``spend / target - 1``). If spend falls as ``lambda ** -e`` (``e``: its
    elasticity), the loop's gain is ``step * e``; simulated with the default window
    and interval, it settles without ringing while ``step * e <= 0.5`` and rings from
    about 1 (the window's lag). 0.25 therefore holds a spend that falls up to twice as
    fast as ``lambda`` rises; a policy choosing among a few budgets responds far more
    slowly than that."""
    clip: float = 0.1
    """Largest change of ``log lambda`` in one update (about +-10 %), whatever the
    measured violation: a spike of spend (an idle window, one huge request) cannot
    throw ``lambda`` across its range; a steady violation still moves it by a factor
    of e in ten updates."""
    min_requests: int = 20
    """Requests the window must hold before an update: fewer say too little about the
    spend at this price (the mean of fewer than 20 billed-token counts is noisy). On a
    server with fewer requests per window, lengthen the window."""

    def __post_init__(self) -> None:
        checks = [
            (self.window > 0, f"budget window must be > 0 seconds; got {self.window}"),
            (
                0 < self.interval <= self.window,
                f"budget interval must be in (0, window={self.window}] s; got {self.interval}",
            ),
            (self.step > 0, f"budget step must be > 0; got {self.step}"),
            (self.clip > 0, f"budget clip must be > 0; got {self.clip}"),
            (self.min_requests >= 1, f"budget min_requests must be >= 1; got {self.min_requests}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class SpendController:
    """Dual ascent of one arm's ``lambda`` on the billed tokens it observes.

    Call :meth:`observe` with each answered request's billed tokens; read
    :attr:`cost_weight` for the price to decide the next request at. Every
    ``settings.interval`` seconds, once the window holds ``settings.min_requests``
    requests, ``log lambda`` moves by ``clip(step * (spend / target - 1))`` and is
    kept within ``bounds``.

    Args:
        target: what the spend is held to (a rate, or a mean per request).
        bounds: the policy's ``cost_weight_range`` (low, high), both positive.
        cost_weight: the starting ``lambda`` (the policy's default, or the saved
            one); clipped into ``bounds``.
        settings: window, interval, step, clip and minimum requests.
        clock: seconds, monotonic (``time.monotonic``; tests pass their own).

    Raises:
        ValueError: bounds that are not positive and ordered, or a non-positive ``cost_weight``.
    """

    def __init__(
        self,
        target: SpendTarget,
        bounds: tuple[float, float],
        cost_weight: float,
        settings: ControlSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        low, high = float(bounds[0]), float(bounds[1])
        if not (0 < low <= high and math.isfinite(high)):
            raise ValueError(f"cost weight bounds must satisfy 0 < low <= high; got ({low}, {high})")
        if not (math.isfinite(cost_weight) and cost_weight > 0):
            raise ValueError(f"the starting cost weight must be positive; got {cost_weight}")
        self.target = target
        self.bounds = (low, high)
        self.settings = settings or ControlSettings()
        self.clock = clock
        self._weight = min(max(float(cost_weight), low), high)
        self._events: deque[tuple[float, float]] = deque()
        self._tokens = 0.0
        self._started = clock()
        self._last_update = self._started
        self._lock = threading.Lock()
        self.updates = 0
        """Updates of ``lambda`` made so far."""

    @property
    def cost_weight(self) -> float:
        """The current ``lambda``: the price to decide the next request at (within ``bounds``)."""
        return self._weight

    def set_bounds(self, bounds: tuple[float, float]) -> None:
        """New bounds (a reloaded policy's range); ``lambda`` is clipped into them, the window kept.

        Raises:
            ValueError: bounds that are not positive and ordered.
        """
        low, high = float(bounds[0]), float(bounds[1])
        if not (0 < low <= high and math.isfinite(high)):
            raise ValueError(f"cost weight bounds must satisfy 0 < low <= high; got ({low}, {high})")
        with self._lock:
            self.bounds = (low, high)
            self._weight = min(max(self._weight, low), high)

    def _drop_old(self, now: float) -> None:
        horizon = now - self.settings.window
        while self._events and self._events[0][0] <= horizon:
            self._tokens -= self._events.popleft()[1]
        if not self._events:
            self._tokens = 0.0  # no rounding residue once the window is empty

    def _measure(self, now: float) -> float | None:
        """The windowed spend now (caller holds the lock)."""
        self._drop_old(now)
        if self.target.kind == "mean":
            return self._tokens / len(self._events) if self._events else None
        # Before a whole window has passed, the rate is over the time since the start.
        span = min(self.settings.window, now - self._started)
        return self._tokens / span if span > 0 else None

    def measured(self) -> float | None:
        """The spend over the window: tokens per second, or per request (None before any can be measured)."""
        with self._lock:
            return self._measure(self.clock())

    def observe(self, billed_tokens: float) -> bool:
        """Count one answered request's billed tokens, and update ``lambda`` if an update is due.

        Returns:
            Whether ``lambda`` was updated (the caller then saves the state).

        Raises:
            ValueError: a negative or non-finite token count.
        """
        if not (math.isfinite(billed_tokens) and billed_tokens >= 0):
            raise ValueError(f"billed tokens must be a non-negative number; got {billed_tokens}")
        with self._lock:
            now = self.clock()
            self._events.append((now, float(billed_tokens)))
            self._tokens += float(billed_tokens)
            if now - self._last_update < self.settings.interval:
                return False
            spend = self._measure(now)
            if spend is None or len(self._events) < self.settings.min_requests:
                return False
            violation = spend / self.target.value - 1.0
            change = min(max(self.settings.step * violation, -self.settings.clip), self.settings.clip)
            # A step in log lambda; the bounds are applied to lambda itself, so that a pinned
            # lambda equals its bound exactly (the policy refuses a price outside its range).
            self._weight = min(max(self._weight * math.exp(change), self.bounds[0]), self.bounds[1])
            self._last_update = now
            self.updates += 1
            return True

    def at_bound(self) -> Literal["low", "high"] | None:
        """Which bound ``lambda`` is pinned at, if any."""
        if self._weight <= self.bounds[0]:
            return "low"
        if self._weight >= self.bounds[1]:
            return "high"
        return None


def load_state(path: str | Path) -> dict[str, float]:
    """The saved ``lambda`` of each arm (empty when the file does not exist).

    Raises:
        ValueError: the file exists but is not a spend-state file this version reads
            (delete it to start from the policies' default cost weights).
    """
    path = Path(path)
    if not path.exists():
        return {}
    fix = "delete it to start from the policies' default cost weights"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"budget state {path} cannot be read ({error}); {fix}") from None
    if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a tokenopt budget state file (format {STATE_FORMAT!r}); {fix}")
    if document.get("version") != STATE_VERSION:
        version = document.get("version")
        raise ValueError(f"{path} has budget-state version {version!r}; this tokenopt reads {STATE_VERSION}")
    weights: dict[str, float] = {}
    arms = document.get("arms")
    if not isinstance(arms, dict):
        raise ValueError(f"{path}: 'arms' must be an object of arm -> state; {fix}")
    for arm, entry in arms.items():
        weight = entry.get("cost_weight") if isinstance(entry, dict) else None
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight < math.inf:
            raise ValueError(f"{path}: arm {arm!r} has cost_weight {weight!r}; expected a positive number; {fix}")
        weights[str(arm)] = float(weight)
    return weights


def save_state(path: str | Path, controllers: dict[str, SpendController], policy_ids: dict[str, str]) -> None:
    """Write each arm's ``lambda`` (and what it was held to) to ``path`` atomically.

    The file is written beside its destination, flushed to disk and renamed over it,
    so a crash leaves either the old state or the new one, never half a file.
    """
    path = Path(path)
    document = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "saved_at": time.time(),
        "arms": {
            arm: {
                "cost_weight": controller.cost_weight,
                "bounds": list(controller.bounds),
                "target": controller.target.text,
                "target_kind": controller.target.kind,
                "target_value": controller.target.value,
                "policy_id": policy_ids.get(arm, ""),
                "updates": controller.updates,
            }
            for arm, controller in controllers.items()
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
