"""Settings of ``tokenopt collect`` and what a collection reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tokenopt.prompt import PromptFormat

__all__ = ["CollectConfig", "CollectSummary"]


@dataclass
class CollectConfig:
    """Settings of ``tokenopt collect``; every default suits the demo LM."""

    out: str = "runs/collect"
    """Output folder."""
    data: str | None = None
    """Question file (JSONL); None collects the embedded demo suite."""
    model: str | None = None
    """Local model folder, .gguf checkpoint (pip install 'tokenopt[gguf]') or hub id; None uses the embedded demo LM."""
    budgets: list[int] = field(default_factory=lambda: [0, 4, 8, 16, 32])
    """Reasoning budgets of the action table, increasing."""
    modes: list[str] = field(default_factory=lambda: ["greedy", "sc5", "beam3"])
    """Decoding modes of the action table."""
    prompt_template: str = "{question}"
    """Prompt template with a {question} placeholder."""
    answer_cue: str = "="
    """Appended when the budget runs out (budget forcing)."""
    answer_regex: str | None = None
    """Regex that extracts the answer from the text after the cue."""
    max_answer_tokens: int = 8
    """Most tokens of an answer."""
    use_chat_template: bool = False
    """Wrap prompts in the tokenizer's chat template."""
    system_prompt: str | None = None
    """System message of the chat template (with --chat-template); None keeps the template's default."""
    temperature: float = 1.0
    """Sampling temperature of sc<k>."""
    device: str = "auto"
    """auto (cuda, mps, cpu), cpu, cuda, cuda:N or mps."""
    dtype: str = "auto"
    """auto, float32, float16 or bfloat16."""
    batch_size: int = 32
    """Queries decoded together."""
    shard_size: int = 256
    """Queries per written shard (the unit of resumption)."""
    seed: int = 0
    """Seed of the split hash and of sc<k> sampling."""
    strict: bool = False
    """Fail on a prompt that does not fit the context instead of skipping it."""
    splits: list[str] | None = None
    """Collect only these splits; None collects all."""
    upstream: str | None = None
    """Base URL of an OpenAI-compatible completions server to collect from instead of a local model."""
    upstream_model: str | None = None
    """Model name sent to the upstream; None takes the first of its /v1/models."""
    upstream_api_key: str | None = None
    """Bearer token of the upstream (never written to the manifest)."""
    concurrency: int = 16
    """Requests in flight at once against the upstream."""
    features: str = "prompt-text"
    """Feature spec the table records: prompt-text (always recorded), lm-hidden or prompt-text+lm-hidden
    (also the LM's hidden state of each prompt at prefill; on a table already collected, a prefill pass
    fills in just that column, with no decoding)."""
    hidden_layer: int | None = None
    """With lm-hidden: the hidden state's layer (0: embeddings, i: block i's output); None: the middle block."""

    def prompt_format(self) -> PromptFormat:
        """The prompt format these settings describe.

        Raises:
            ValueError: a template without ``{question}``, an empty cue or a regex that does not compile.
        """
        return PromptFormat(
            template=self.prompt_template,
            answer_cue=self.answer_cue,
            answer_regex=self.answer_regex,
            max_answer_tokens=self.max_answer_tokens,
            use_chat_template=self.use_chat_template,
            system_prompt=self.system_prompt,
        )


@dataclass
class CollectSummary:
    """What a collection did."""

    out: Path
    queries: int
    skipped: list[str]
    rows: int
    shards_written: int
    shards_reused: int
    seconds: float
    forward_tokens: int
