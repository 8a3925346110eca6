"""A seeded generator of the demo question-answering suite.

The suite has five families whose need for reasoning tokens differs between and
within them, so that no single (budget, mode) action is right for every query:

- ``max``: the largest of n digits. The demo LM answers it directly (budget 0);
  its scratchpad (a running maximum, then a re-check) only wastes tokens.
- ``chain``: a chain of n modular operations (``+ * -`` mod 10). Answering
  directly is near chance from a few operations on; a scratchpad that writes each
  operation with its result (``+47 *24 -59``) makes it right, so the budget it
  needs grows with n.
- ``swap``: tracking a ball under three cups through n swaps. The trace writes the
  ball's position after each swap, then re-checks them after ``|``, as larger LMs
  "overthink" once the answer has settled: a budget that covers the first pass is
  as good as the largest one at about half the tokens.
- ``noise``: an answer that is a hash of the question (0 in 7 cases of 16, else
  1 to 9). The LM still "reasons"
  (it copies the key and re-checks it), but no budget helps: the right action is
  to spend nothing.
- ``vote``: the answer is a copy of the two digits in the question, but the
  training data gives it only 40% of the time; the other 60% is split between
  three wrong answers that share their first character (``x1 x2 x3``). Greedy
  decoding follows the shared first character and is wrong; beam search and
  self-consistency voting find the most likely whole answer, so a non-greedy mode
  beats greedy.

Each query is ``{"id", "question", "answers", "family", "difficulty"}``; the
reasoning trace that the LM is trained on comes from :func:`make_example`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "ANSWER_CUE",
    "FAMILIES",
    "RECHECK_MARK",
    "TRAINING_WEIGHTS",
    "SuiteConfig",
    "DemoExample",
    "generate_suite",
    "make_example",
    "write_jsonl",
]

ANSWER_CUE = "="
"""The demo LM's answer cue: appended when the budget runs out (budget forcing)."""

RECHECK_MARK = "|"
"""Separates a trace's first pass from its re-check."""

FAMILIES = ("max", "chain", "swap", "noise", "vote")
"""The suite's task families, in a fixed order."""

_FAMILY_WEIGHTS = {"max": 0.25, "chain": 0.2, "swap": 0.2, "noise": 0.2, "vote": 0.15}
TRAINING_WEIGHTS = {"max": 0.15, "chain": 0.35, "swap": 0.25, "noise": 0.1, "vote": 0.15}
_DIFFICULTY_RANGE = {"max": (3, 8), "chain": (1, 6), "swap": (1, 5), "noise": (1, 1), "vote": (1, 1)}
_VOTE_DECOYS = ("x1", "x2", "x3")
_VOTE_GOLD_PROBABILITY = 0.4


@dataclass(frozen=True)
class SuiteConfig:
    """Settings of the demo suite."""

    n_queries: int = 3000
    """Number of queries in the suite (train, val and test together)."""
    seed: int = 0
    """Seed of the generator; the same seed gives the same suite."""


@dataclass(frozen=True)
class DemoExample:
    """One demo query with the reasoning trace the LM is trained to write."""

    family: str
    difficulty: int
    question: str
    trace: str
    answer: str
    """The gold answer (what EM is measured against)."""
    answer_choices: tuple[tuple[str, float], ...] = ()
    """For ``vote``: the training distribution over answers; empty elsewhere."""
    reasoned_answer_choices: tuple[tuple[str, float], ...] = ()
    """The training distribution over answers after a trace (cut > 0), for families where
    reasoning misleads; empty: the same as ``answer_choices``."""

    def record(self, query_id: str) -> dict[str, object]:
        """The example as a line of a question file (``tokenopt.data.load_questions``)."""
        return {
            "id": query_id,
            "question": self.question,
            "answers": [self.answer],
            "family": self.family,
            "difficulty": self.difficulty,
        }


def _modular_chain(rng: np.random.Generator, n: int) -> tuple[str, str, str]:
    value = int(rng.integers(0, 10))
    question = f"C {value}"
    steps = []
    for _ in range(n):
        op = "+*-"[int(rng.integers(0, 3))]
        operand = int(rng.integers(1, 10))
        question += f"{op}{operand}"
        if op == "+":
            value = (value + operand) % 10
        elif op == "*":
            value = (value * operand) % 10
        else:
            value = (value - operand) % 10
        steps.append(f"{op}{operand}{value}")
    return question + "?", " ".join(steps), str(value)


def _cup_swaps(rng: np.random.Generator, n: int) -> tuple[str, str, str]:
    position = int(rng.integers(0, 3))
    question = f"S {position}:"
    steps = []
    for _ in range(n):
        a, b = (int(x) for x in rng.choice(3, size=2, replace=False))
        question += f" {a}{b}"
        if position == a:
            position = b
        elif position == b:
            position = a
        steps.append(str(position))
    first_pass = " ".join(steps)
    return question + "?", f"{first_pass}{RECHECK_MARK}{first_pass}", str(position)


def _max_of_digits(rng: np.random.Generator, n: int) -> tuple[str, str, str]:
    digits = [int(x) for x in rng.integers(0, 10, size=n)]
    running = []
    best = -1
    for digit in digits:
        best = max(best, digit)
        running.append(str(best))
    first_pass = " ".join(running)
    return "M " + " ".join(map(str, digits)) + "?", f"{first_pass}{RECHECK_MARK}{first_pass}", str(best)


def _noise(rng: np.random.Generator) -> tuple[str, str, str]:
    key = "".join(str(int(x)) for x in rng.integers(0, 10, size=6))
    digest = hashlib.blake2b(key.encode(), digest_size=4).digest()
    # A hash skewed towards 0 (7 in 16): the LM's best guess is 0 whatever it has
    # written, so no action is luckier than another on this family.
    value = digest[0] % 16
    answer = "0" if value < 7 else str(value - 6)
    # The LM copies the key and re-checks it: reasoning that cannot help.
    first_pass = " ".join(key)
    return f"N {key}?", f"{first_pass}{RECHECK_MARK}{first_pass}", answer


def _vote(rng: np.random.Generator) -> tuple[str, str, str, tuple[tuple[str, float], ...]]:
    a, b = (int(x) for x in rng.integers(0, 10, size=2))
    gold = f"{a}{b}"
    share = (1.0 - _VOTE_GOLD_PROBABILITY) / len(_VOTE_DECOYS)
    choices = ((gold, _VOTE_GOLD_PROBABILITY),) + tuple((decoy, share) for decoy in _VOTE_DECOYS)
    return f"V {gold}?", "", gold, choices


def make_example(
    rng: np.random.Generator,
    family: str | None = None,
    difficulty: int | None = None,
    weights: dict[str, float] | None = None,
) -> DemoExample:
    """Draw one example, with its trace, from the suite's distribution.

    Args:
        rng: the source of randomness.
        family: the family to draw from; drawn by the suite's weights when None.
        difficulty: the number of items, operations or swaps; drawn uniformly from
            the family's range when None.
        weights: family weights when the family is drawn; the suite's when None.

    Returns:
        The example.
    """
    if family is None:
        table = weights or _FAMILY_WEIGHTS
        names = list(table)
        shares = np.array([table[name] for name in names])
        family = names[int(rng.choice(len(names), p=shares / shares.sum()))]
    if family not in _DIFFICULTY_RANGE:
        raise ValueError(f"unknown demo family {family!r}; expected one of {FAMILIES}")
    low, high = _DIFFICULTY_RANGE[family]
    if difficulty is None:
        difficulty = int(rng.integers(low, high + 1))
    choices: tuple[tuple[str, float], ...] = ()
    if family == "max":
        question, trace, answer = _max_of_digits(rng, difficulty)
    elif family == "chain":
        question, trace, answer = _modular_chain(rng, difficulty)
    elif family == "swap":
        question, trace, answer = _cup_swaps(rng, difficulty)
    elif family == "noise":
        question, trace, answer = _noise(rng)
    else:
        question, trace, answer, choices = _vote(rng)
    return DemoExample(family, difficulty, question, trace, answer, choices)


def generate_suite(config: SuiteConfig | None = None) -> list[dict[str, object]]:
    """Generate the demo suite as question records.

    Args:
        config: the suite's settings; the defaults when None.

    Returns:
        One record per query: ``id``, ``question``, ``answers``, ``family`` and
        ``difficulty``. The split is left to the seeded hash of the id.
    """
    config = config or SuiteConfig()
    rng = np.random.default_rng(config.seed)
    records: list[dict[str, object]] = []
    for index in range(config.n_queries):
        example = make_example(rng)
        records.append(example.record(f"{example.family}-{index:06d}"))
    return records


def write_jsonl(records: list[dict[str, object]], path: str | Path) -> Path:
    """Write records as JSONL, one object per line, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from tokenopt.table.schema import write_atomic

    text = "".join(json.dumps(record) + "\n" for record in records)
    write_atomic(path, lambda partial: partial.write_text(text, encoding="utf-8"))
    return path
