"""Suite ``qwen2_letters`` (the held-out suite): a Qwen2 LM with a byte-level BPE on letter puzzles.

Mostly easy queries, so the oracle's margin over the best fixed action is small;
collected greedy only. Families (reasoning is a scratchpad before the cue ``=>``), with
what the trained LM measured on them (suites/README.md):

- ``next`` (reasoning wastes tokens): the letter after a letter. Answered at budget 0;
  the trace recites the alphabet up to the letter (up to 24 tokens) for nothing.
- ``lookup`` (reasoning helps a little, or misleads): the digit paired with a letter
  among 2 to 6 pairs; the trace copies pairs up to the one asked. The LM answers
  about half directly; the trace helps with 2 pairs and copies a wrong pair with more.
- ``count`` (reasoning designed to help, measured to waste): how many times a letter
  occurs among 3 to 9; the trace writes the running count, one digit per letter. The
  LM learned to count directly (as the demo LM learned to add up to nine digits).
"""

from __future__ import annotations

import numpy as np

from suites.spec import Choices, Family, Suite
from tokenopt.demo.train import DemoTrainConfig

__all__ = ["SUITE"]

_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def _next(rng: np.random.Generator, _: int) -> tuple[str, str, str, Choices]:
    index = int(rng.integers(0, len(_ALPHABET) - 1))
    letter = _ALPHABET[index]
    return f"next {letter}?", " ".join(_ALPHABET[: index + 1]), _ALPHABET[index + 1], ()


def _lookup(rng: np.random.Generator, n: int) -> tuple[str, str, str, Choices]:
    keys = [_ALPHABET[int(i)] for i in rng.choice(len(_ALPHABET), size=n, replace=False)]
    values = [str(int(v)) for v in rng.integers(0, 10, size=n)]
    asked = int(rng.integers(0, n))
    pairs = [f"{k}{v}" for k, v in zip(keys, values, strict=True)]
    return f"find {keys[asked]} in {' '.join(pairs)}?", " ".join(pairs[: asked + 1]), values[asked], ()


def _count(rng: np.random.Generator, n: int) -> tuple[str, str, str, Choices]:
    pool = _ALPHABET[: int(rng.integers(2, 5))]
    letters = [pool[int(i)] for i in rng.integers(0, len(pool), size=n)]
    target = pool[int(rng.integers(0, len(pool)))]
    running, steps = 0, []
    for letter in letters:
        running += letter == target
        steps.append(str(running))
    return f"count {target} in {' '.join(letters)}?", "".join(steps), str(running), ()


SUITE = Suite(
    name="qwen2_letters",
    description="Qwen2 (byte-level BPE), held out, greedy only: next and count waste, lookup is mixed",
    families=(
        Family("next", _next, (1, 1), weight=0.4, training_weight=0.25, role="wastes"),
        Family("lookup", _lookup, (2, 6), weight=0.35, training_weight=0.3, role="mixed"),
        Family("count", _count, (3, 9), weight=0.25, training_weight=0.45, role="wastes"),
    ),
    train=DemoTrainConfig(
        architecture="qwen2", num_kv_heads=2, steps=900, batch_size=64, threads=1, learning_rate=2e-3
    ),
    answer_cue="=>",
    budgets=(0, 4, 8, 16, 32),
    modes=("greedy",),
    held_out=True,
)
