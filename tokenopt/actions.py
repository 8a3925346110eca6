"""The action table: ordered (budget, mode) pairs, and parsing of their settings."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Action", "Mode", "build_action_table", "parse_budgets", "parse_mode", "parse_modes"]

_MODE_PATTERN = re.compile(r"^(greedy|beam(\d+)|sc(\d+))$")
_ACTION_PATTERN = re.compile(r"^b(\d+)/(\S+)$")


@dataclass(frozen=True)
class Mode:
    """A decoding mode: ``greedy``, ``beam<k>`` or ``sc<k>``."""

    name: str
    kind: str
    """``greedy``, ``beam`` or ``sc``."""
    width: int
    """Sequences the mode runs: 1 for greedy, k for beam<k> and sc<k>."""


@dataclass(frozen=True)
class Action:
    """One (budget, mode) pair of the action table."""

    budget: int
    mode: str

    @property
    def name(self) -> str:
        """The action's name in tables and logs, e.g. ``b16/sc5``."""
        return f"b{self.budget}/{self.mode}"

    @classmethod
    def parse(cls, name: str) -> Action:
        """The action of a name such as ``b16/sc5`` (the one parser of action names).

        Raises:
            ValueError: the name is not ``b<budget>/<mode>`` with a budget >= 0 and a known mode.
        """
        match = _ACTION_PATTERN.match(name.strip())
        if not match:
            raise ValueError(f"action {name!r} is not of the form b<budget>/<mode>, e.g. b16/greedy or b0/sc5")
        return cls(int(match.group(1)), parse_mode(match.group(2)).name)


def parse_mode(name: str) -> Mode:
    """Parse a mode name.

    Raises:
        ValueError: the name is not ``greedy``, ``beam<k>`` or ``sc<k>`` with k >= 2.
    """
    match = _MODE_PATTERN.match(name.strip())
    if not match:
        raise ValueError(f"unknown decoding mode {name!r}: expected greedy, beam<k> or sc<k> (e.g. beam3, sc5)")
    if match.group(1) == "greedy":
        return Mode("greedy", "greedy", 1)
    kind, width = ("beam", int(match.group(2))) if match.group(2) else ("sc", int(match.group(3)))
    if width < 2:
        raise ValueError(f"mode {name!r} needs k >= 2 sequences; use greedy for one")
    return Mode(f"{kind}{width}", kind, width)


def parse_modes(text: str | list[str]) -> list[Mode]:
    """Parse a comma-separated list of modes; duplicates are an error."""
    names = [part.strip() for part in text.split(",")] if isinstance(text, str) else list(text)
    modes = [parse_mode(name) for name in names if name]
    if not modes:
        raise ValueError("the mode list is empty: give at least one of greedy, beam<k>, sc<k>")
    seen = [mode.name for mode in modes]
    duplicates = sorted({name for name in seen if seen.count(name) > 1})
    if duplicates:
        raise ValueError(f"modes {duplicates} are listed more than once in {names}")
    return modes


def parse_budgets(text: str | list[int]) -> list[int]:
    """Parse a budget list such as ``0,4,8,16,32``.

    Raises:
        ValueError: a budget is not an integer, is negative, or the list is empty,
            unsorted or has duplicates.
    """
    if isinstance(text, str):
        parts = [part.strip() for part in text.split(",") if part.strip()]
        budgets = []
        for part in parts:
            try:
                budgets.append(int(part))
            except ValueError:
                raise ValueError(f"budget {part!r} in {text!r} is not an integer") from None
    else:
        budgets = [int(b) for b in text]
    if not budgets:
        raise ValueError("the budget list is empty: give increasing non-negative integers, e.g. 0,4,8,16,32")
    negative = [b for b in budgets if b < 0]
    if negative:
        raise ValueError(f"budgets must be >= 0; got {negative} in {budgets}")
    if len(set(budgets)) != len(budgets):
        raise ValueError(f"budgets {budgets} contain duplicates; list each budget once, in increasing order")
    if budgets != sorted(budgets):
        raise ValueError(f"budgets {budgets} are not in increasing order; expected {sorted(budgets)}")
    return budgets


def build_action_table(budgets: list[int], modes: list[Mode]) -> list[Action]:
    """The ordered action table: modes outer, budgets inner."""
    return [Action(budget, mode.name) for mode in modes for budget in budgets]
