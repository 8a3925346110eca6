"""Scoring answers: normalisation, exact match, answer extraction and the majority vote."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

__all__ = ["exact_match", "extract_answer", "majority_vote", "normalize_answer", "vote_share"]

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


def extract_answer(text: str, pattern: str | re.Pattern[str] | None) -> str:
    """The answer in the text after the cue: stripped, then passed through the answer regex.

    The regex's first group is the answer when it has groups, else its whole match;
    no match gives ``""`` (an answer that cannot be right).
    """
    text = text.strip()
    if pattern is None:
        return text
    match = re.search(pattern, text)
    if match is None:
        return ""
    return (match.group(1) if match.groups() else match.group(0)).strip()


def majority_vote(answers: Sequence[str], logprobs: Sequence[float] | None = None, normalized: bool = False) -> int:
    """The sequence a majority vote returns: the one vote of tokenopt (``sc<k>``, its replay, the proxy).

    Answers are compared after :func:`normalize_answer` (unless already ``normalized``).
    The most frequent answer wins; a tie goes to the answer whose best sequence has the
    higher mean log-probability, and within the winning answer the sequence with the
    highest log-probability is returned. Without log-probabilities (all equal) a tie
    goes to the answer seen first, and its first sequence is returned.

    Args:
        answers: one answer per sequence.
        logprobs: mean log-probability of each sequence's answer, or None.
        normalized: the answers are normalised already.

    Returns:
        The index of the returned sequence.
    """
    if not answers:
        raise ValueError("majority_vote needs at least one answer")
    keys = list(answers) if normalized else [normalize_answer(answer) for answer in answers]
    scores = [0.0] * len(keys) if logprobs is None else [float(lp) for lp in logprobs]
    if len(scores) != len(keys):
        raise ValueError(f"majority_vote got {len(keys)} answers but {len(scores)} log-probabilities")
    counts = Counter(keys)
    best = max(counts, key=lambda key: (counts[key], max(s for k, s in zip(keys, scores, strict=True) if k == key)))
    members = [i for i, key in enumerate(keys) if key == best]
    return max(members, key=lambda i: scores[i])


def vote_share(answers: Sequence[str], chosen: int, normalized: bool = False) -> float:
    """The share of sequences whose answer equals the chosen one's."""
    keys = list(answers) if normalized else [normalize_answer(answer) for answer in answers]
    return keys.count(keys[chosen]) / len(keys)
