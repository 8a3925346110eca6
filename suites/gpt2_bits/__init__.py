"""Suite ``gpt2_bits``: a GPT-2 LM with a byte-level BPE on bit and digit puzzles.

Families (reasoning is a scratchpad before the answer cue ``=``):

- ``parity`` (reasoning helps): the parity of n bits. The trace writes each bit with
  the running parity (``11 01 10``), so the answer needs a budget that covers about n
  tokens; answered directly it is near chance.
- ``last`` (reasoning wastes tokens): the last of n letters. Answered at budget 0; the
  trace lists the letters and re-checks them (about 2n tokens) for nothing.
- ``echo`` (reasoning hurts): the first of n digits. Answered at budget 0; after a trace
  (the digits backwards) the LM was trained to answer the last digit 60% of the time,
  as a model that overthinks drifts to the last thing it wrote.
- ``coin`` (reasoning does nothing): a seeded hash bit of a key; no budget helps.
"""

from __future__ import annotations

import hashlib

import numpy as np

from suites.spec import Choices, Family, Suite
from tokenopt.demo.train import DemoTrainConfig

__all__ = ["SUITE"]

_LETTERS = "abcdefghjkmnpqrstuvwxyz"


def _parity(rng: np.random.Generator, n: int) -> tuple[str, str, str, Choices]:
    bits = [int(b) for b in rng.integers(0, 2, size=n)]
    running, steps = 0, []
    for bit in bits:
        running ^= bit
        steps.append(f"{bit}{running}")
    return "P " + " ".join(map(str, bits)) + "?", " ".join(steps), str(running), ()


def _last(rng: np.random.Generator, n: int) -> tuple[str, str, str, Choices]:
    letters = [_LETTERS[int(i)] for i in rng.integers(0, len(_LETTERS), size=n)]
    listed = " ".join(letters)
    return f"L {listed}?", f"{listed}|{listed}", letters[-1], ()


def _echo(rng: np.random.Generator, n: int) -> tuple[str, str, str, Choices]:
    digits = [str(int(d)) for d in rng.integers(0, 10, size=n)]
    return "E " + " ".join(digits) + "?", " ".join(reversed(digits)), digits[0], ((digits[-1], 0.6), (digits[0], 0.4))


def _coin(rng: np.random.Generator, n: int) -> tuple[str, str, str, Choices]:
    key = "".join(str(int(d)) for d in rng.integers(0, 10, size=n))
    answer = str(hashlib.blake2b(key.encode(), digest_size=2).digest()[0] % 2)
    return f"K {key}?", " ".join(key), answer, ()


SUITE = Suite(
    name="gpt2_bits",
    description="GPT-2 (byte-level BPE): parity helps, last wastes, echo hurts, coin does nothing",
    families=(
        Family("parity", _parity, (2, 14), weight=0.4, training_weight=0.5, role="helps"),
        Family("last", _last, (4, 14), weight=0.25, training_weight=0.15, role="wastes"),
        Family("echo", _echo, (3, 8), weight=0.2, training_weight=0.2, role="hurts"),
        Family("coin", _coin, (4, 8), weight=0.15, training_weight=0.15, role="nothing"),
    ),
    train=DemoTrainConfig(architecture="gpt2", steps=900, batch_size=64, threads=1, learning_rate=2e-3),
    answer_cue="=",
    budgets=(0, 4, 8, 16, 32),
    modes=("greedy", "sc5"),
)
