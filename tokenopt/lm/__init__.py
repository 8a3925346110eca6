"""The language model: a local transformers LM or an OpenAI-compatible upstream, with budget forcing."""

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
