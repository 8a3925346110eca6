"""The robustness suites by name."""

from __future__ import annotations

import importlib

from suites.spec import Suite

__all__ = ["HELD_OUT", "SUITE_NAMES", "load_suite"]

SUITE_NAMES = ("gpt2_bits", "qwen2_letters")
"""The suites built by ``python -m suites.build``."""

HELD_OUT = "qwen2_letters"
"""The suite kept out of every tuning decision (defaults are chosen on the others)."""


def load_suite(name: str) -> Suite:
    """The suite of a name.

    Raises:
        ValueError: an unknown name, with the known ones.
    """
    if name not in SUITE_NAMES:
        raise ValueError(f"unknown suite {name!r}; expected one of {', '.join(SUITE_NAMES)}")
    suite: Suite = importlib.import_module(f"suites.{name}").SUITE
    return suite
