"""The prompt format: how a question becomes a prompt, where budget forcing cuts in, how the answer is read."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tokenopt.scoring import extract_answer

__all__ = ["PromptFormat"]


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes a prompt, and how an answer is read back."""

    template: str = "{question}"
    """Prompt template with a ``{question}`` placeholder."""
    answer_cue: str = "="
    """Text appended when the budget runs out; for chat models e.g. ``\\nFinal answer:``."""
    answer_regex: str | None = None
    """Regex applied to the answer text; its first group (or whole match) is the answer."""
    max_answer_tokens: int = 8
    """Most tokens an answer may have after the cue."""
    use_chat_template: bool = False
    """Wrap the prompt with the tokenizer's chat template (for chat models)."""

    def __post_init__(self) -> None:
        if "{question}" not in self.template:
            raise ValueError(f"prompt template {self.template!r} has no {{question}} placeholder")
        if not self.answer_cue:
            raise ValueError("the answer cue is empty: budget forcing needs a cue such as '=' or '\\nFinal answer:'")
        if self.max_answer_tokens < 1:
            raise ValueError(f"max_answer_tokens must be >= 1; got {self.max_answer_tokens}")
        if self.answer_regex is not None:
            try:
                re.compile(self.answer_regex)
            except re.error as error:
                raise ValueError(f"answer regex {self.answer_regex!r} does not compile: {error}") from None

    def prompt_text(self, question: str) -> str:
        """The prompt's text for a question (before any chat template)."""
        return self.template.replace("{question}", question)

    def extract_answer(self, text: str) -> str:
        """The answer in the text generated after the cue (see :func:`tokenopt.scoring.extract_answer`)."""
        return extract_answer(text, self.answer_regex)
