"""Language-model backends: generation with budget forcing and decoding modes."""

from tokenopt.lm.backend import ModeOutcome, PromptFormat, TransformersLM, resolve_device
from tokenopt.lm.decoding import DecodeSettings, DecodeStats, SequenceOutcome, decode_with_budgets

__all__ = [
    "DecodeSettings",
    "DecodeStats",
    "ModeOutcome",
    "PromptFormat",
    "SequenceOutcome",
    "TransformersLM",
    "decode_with_budgets",
    "resolve_device",
]
