"""The prompt format: how a question becomes a prompt, where budget forcing cuts in, how the answer is read."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

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
    system_prompt: str | None = None
    """System message placed before the question in the chat template; None keeps the template's default."""

    def __post_init__(self) -> None:
        if "{question}" not in self.template:
            raise ValueError(f"prompt template {self.template!r} has no {{question}} placeholder")
        if not self.answer_cue:
            raise ValueError("the answer cue is empty: budget forcing needs a cue such as '=' or '\\nFinal answer:'")
        if self.max_answer_tokens < 1:
            raise ValueError(f"max_answer_tokens must be >= 1; got {self.max_answer_tokens}")
        if self.system_prompt is not None and not self.use_chat_template:
            raise ValueError("a system prompt needs the chat template (--chat-template)")
        if self.answer_regex is not None:
            try:
                re.compile(self.answer_regex)
            except re.error as error:
                raise ValueError(f"answer regex {self.answer_regex!r} does not compile: {error}") from None

    def question_of(self, text: str) -> str:
        """The question inside a prompt a client wrote with this template (the text itself otherwise).

        Collection computes features from the bare question; a server given the
        templated prompt reads the question back out, so its features match.
        """
        prefix, suffix = self.template.split("{question}", 1)
        if (prefix or suffix) and text.startswith(prefix) and text.endswith(suffix):
            if len(text) >= len(prefix) + len(suffix):
                return text[len(prefix) : len(text) - len(suffix)]
        return text

    def to_dict(self) -> dict[str, object]:
        """The format as policy.json records it (with which text the features read)."""
        return {
            "template": self.template,
            "answer_cue": self.answer_cue,
            "answer_regex": self.answer_regex,
            "max_answer_tokens": self.max_answer_tokens,
            "use_chat_template": self.use_chat_template,
            "system_prompt": self.system_prompt,
            "features_read": "question",
        }

    @classmethod
    def from_dict(cls, data: object) -> PromptFormat:
        """Read :meth:`to_dict`'s record back.

        Raises:
            ValueError: a field is missing or of the wrong type (named).
        """
        if not isinstance(data, dict):
            raise ValueError(f"prompt_format must be an object; got {type(data).__name__}")
        kinds: dict[str, Any] = {
            "template": str,
            "answer_cue": str,
            "answer_regex": (str, type(None)),
            "max_answer_tokens": int,
            "use_chat_template": bool,
        }
        for name, kind in kinds.items():
            if name not in data or not isinstance(data[name], kind) or (kind is int and isinstance(data[name], bool)):
                raise ValueError(f"prompt_format.{name} is missing or of the wrong type: {data.get(name)!r}")
        system_prompt = data.get("system_prompt")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise ValueError(f"prompt_format.system_prompt must be a string or null; got {system_prompt!r}")
        if data.get("features_read", "question") != "question":
            raise ValueError(f"prompt_format.features_read {data.get('features_read')!r} is not 'question'")
        return cls(
            template=data["template"],
            answer_cue=data["answer_cue"],
            answer_regex=data["answer_regex"],
            max_answer_tokens=data["max_answer_tokens"],
            use_chat_template=data["use_chat_template"],
            system_prompt=system_prompt,
        )

    def prompt_text(self, question: str) -> str:
        """The prompt's text for a question (before any chat template)."""
        return self.template.replace("{question}", question)

    def chat_messages(self, question: str) -> list[dict[str, str]]:
        """The chat messages of a question: the system prompt (when set), then the prompt as the user's turn."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        return [*messages, {"role": "user", "content": self.prompt_text(question)}]

    def extract_answer(self, text: str) -> str:
        """The answer in the text generated after the cue (see :func:`tokenopt.scoring.extract_answer`)."""
        return extract_answer(text, self.answer_regex)
