"""What a robustness suite is: task families, their mix, the LM that learns them, and the collection.

A suite draws examples (question, reasoning trace, answer) from weighted families,
writes a question file from them, trains a small LM with the demo's trainer
(:func:`tokenopt.demo.train.train_lm`) on a byte-level BPE trained on its own text,
and collects an outcome table with ``tokenopt collect``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from transformers import PreTrainedTokenizerBase

from tokenopt.demo.suite import DemoExample
from tokenopt.demo.tokenizer import train_bpe_tokenizer
from tokenopt.demo.train import DemoTrainConfig, TraceTask

__all__ = ["Family", "Suite"]

Choices = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Family:
    """One task family: how to draw a query of a difficulty, and how much of the suite it is."""

    name: str
    make: Callable[[np.random.Generator, int], tuple[str, str, str, Choices]]
    """``make(rng, difficulty) -> (question, trace, answer, reasoned_answer_choices)``."""
    difficulty: tuple[int, int]
    """Lowest and highest difficulty, drawn uniformly."""
    weight: float
    """Share of the question set."""
    training_weight: float
    """Share of the LM's training examples."""
    role: str
    """What reasoning does here as measured on the suite's LM: helps, wastes, hurts, nothing or mixed."""


@dataclass(frozen=True)
class Suite:
    """A (model, question set) pair: families, LM, tokenizer and collection settings."""

    name: str
    description: str
    families: tuple[Family, ...]
    train: DemoTrainConfig
    """The LM's architecture (``architecture``: gpt2, qwen2) and schedule."""
    answer_cue: str
    budgets: tuple[int, ...]
    modes: tuple[str, ...]
    n_questions: int = 2000
    vocab_size: int = 320
    """BPE vocabulary (256 bytes, EOS and merges)."""
    max_answer_tokens: int = 4
    tokenizer_corpus: int = 4000
    """Examples drawn (seeded) to train the BPE on."""
    held_out: bool = False
    """Kept out of every tuning decision."""
    seed: int = 0
    extra_collect_args: tuple[str, ...] = field(default_factory=tuple)

    def family(self, name: str) -> Family:
        """The family of a name.

        Raises:
            ValueError: an unknown family, with the suite's families.
        """
        for family in self.families:
            if family.name == name:
                return family
        raise ValueError(f"suite {self.name!r} has no family {name!r}; expected one of {self.family_names}")

    @property
    def family_names(self) -> tuple[str, ...]:
        """The families, in order."""
        return tuple(family.name for family in self.families)

    def example(
        self, rng: np.random.Generator, family: str | None = None, training: bool = False, difficulty: int | None = None
    ) -> DemoExample:
        """Draw one example (by the question mix, or the training mix when ``training``)."""
        if family is None:
            shares = np.array([f.training_weight if training else f.weight for f in self.families])
            chosen = self.families[int(rng.choice(len(self.families), p=shares / shares.sum()))]
        else:
            chosen = self.family(family)
        low, high = chosen.difficulty
        level = int(rng.integers(low, high + 1)) if difficulty is None else difficulty
        question, trace, answer, reasoned = chosen.make(rng, level)
        return DemoExample(chosen.name, level, question, trace, answer, reasoned_answer_choices=reasoned)

    def questions(self, n_questions: int | None = None, seed: int | None = None) -> list[dict[str, object]]:
        """The question set: ``{"id", "question", "answers", "family", "difficulty"}`` records."""
        rng = np.random.default_rng([self.seed if seed is None else seed, 7])
        records: list[dict[str, object]] = []
        for index in range(self.n_questions if n_questions is None else n_questions):
            example = self.example(rng)
            records.append(example.record(f"{self.name}-{example.family}-{index:05d}"))
        return records

    def build_tokenizer(self) -> PreTrainedTokenizerBase:
        """A byte-level BPE of the LM's family, trained on a seeded sample of the suite's text."""
        rng = np.random.default_rng([self.seed, 3])
        texts = [self.answer_cue]
        for _ in range(self.tokenizer_corpus):
            example = self.example(rng, training=True)
            texts += [example.question, example.trace, example.answer]
        return train_bpe_tokenizer(texts, self.train.architecture, self.vocab_size)

    def task(self) -> TraceTask:
        """The LM's training task."""
        return TraceTask(
            draw=lambda rng: self.example(rng, training=True),
            build_tokenizer=self.build_tokenizer,
            answer_cue=self.answer_cue,
        )
