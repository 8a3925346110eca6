"""Exact match with SQuAD-style and numeric normalisation."""

from __future__ import annotations

import re
import string
from collections.abc import Iterable

__all__ = ["exact_match", "normalize_answer"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_PUNCTUATION = set(string.punctuation)


def _canonical_number(text: str) -> str | None:
    compact = text.replace(",", "").strip()
    if not _NUMBER.match(compact):
        return None
    value = float(compact)
    if value.is_integer():
        return str(int(value))
    return repr(value)


def normalize_answer(text: str) -> str:
    """Normalise an answer the way SQuAD's evaluation does, plus numbers.

    Lowercases, removes punctuation and the articles a/an/the, and collapses
    whitespace. A numeric answer is written canonically first, so "3.0", "3" and
    "+3" compare equal, and "1,000" equals "1000".

    Args:
        text: the answer text.

    Returns:
        The normalised text.
    """
    number = _canonical_number(text)
    if number is not None:
        return number
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = " ".join(_ARTICLES.sub(" ", text).split())
    number = _canonical_number(text)
    return text if number is None else number


def exact_match(prediction: str, answers: Iterable[str]) -> bool:
    """Whether the prediction equals any gold answer after normalisation."""
    normalized = normalize_answer(prediction)
    return any(normalized == normalize_answer(answer) for answer in answers)
