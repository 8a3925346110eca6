"""The language model: a local transformers LM or an OpenAI-compatible upstream, with budget forcing.

The re-exports load on first use (PEP 562): the proxy imports
:mod:`tokenopt.lm.openai_client` and must not load torch and transformers with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenopt.lm.decoding import DecodeSettings, DecodeStats, SequenceOutcome, decode_with_budgets
    from tokenopt.lm.local import ModeOutcome, TransformersLM, resolve_device

__all__ = [
    "DecodeSettings",
    "DecodeStats",
    "ModeOutcome",
    "SequenceOutcome",
    "TransformersLM",
    "decode_with_budgets",
    "resolve_device",
]

_HOMES = {
    "DecodeSettings": "tokenopt.lm.decoding",
    "DecodeStats": "tokenopt.lm.decoding",
    "SequenceOutcome": "tokenopt.lm.decoding",
    "decode_with_budgets": "tokenopt.lm.decoding",
    "ModeOutcome": "tokenopt.lm.local",
    "TransformersLM": "tokenopt.lm.local",
    "resolve_device": "tokenopt.lm.local",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
