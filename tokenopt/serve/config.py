"""Settings of ``tokenopt serve``, and the prompt format they resolve to with the served policies."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenopt.prompt import PromptFormat
from tokenopt.runtime import BudgetPolicy
from tokenopt.serve.budget import ControlSettings, SpendTarget
from tokenopt.serve.budget import spend_target as parse_spend_target

__all__ = ["LOOPBACK_HOSTS", "ServeConfig", "resolve_prompt_format"]

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


@dataclass
class ServeConfig:
    """Settings of ``tokenopt serve``."""

    policy: Path
    """Policy folder of arm A (``runs/<run>/policy``)."""
    policy_b: Path | None = None
    """Policy folder of arm B, for an A/B test."""
    split: float = 0.5
    """Share of users sent to arm B, in [0, 1]."""
    model: str | None = None
    """Local causal-LM folder or .gguf checkpoint to serve; with neither this nor ``upstream``, the demo LM."""
    upstream: str | None = None
    """Base URL of an OpenAI-compatible server to forward to (vLLM, TGI, llama.cpp)."""
    upstream_model: str = "default"
    """Model name sent to the upstream."""
    upstream_api_key: str | None = None
    """Bearer token for the upstream."""
    host: str = "127.0.0.1"
    """Interface to bind; a non-loopback bind needs an API key or ``insecure``."""
    port: int = 8000
    """Port to bind."""
    api_key: str | None = None
    """Bearer token clients must send (compared in constant time)."""
    insecure: bool = False
    """Allow a non-loopback bind without an API key."""
    log: Path = Path("runs/serve/decisions.sqlite")
    """Decision log (SQLite, WAL)."""
    log_prompts: bool = False
    """Also store prompt texts in the log (off: features only)."""
    keep_unmatched_feedback: bool = False
    """Keep feedback for a request id this server did not log (answered 202), for the log readers to join: set it on
    every replica behind a load balancer, where feedback may reach another replica than its request (off: 404)."""
    explore: float = 0.0
    """Share of requests served a uniformly random action (logged with its propensity), in [0, 1]."""
    seed: int = 0
    """Seed of exploration."""
    max_concurrency: int = 64
    """Requests processed at once."""
    max_queue: int = 256
    """Requests waiting beyond ``max_concurrency``; past it, 429 with Retry-After."""
    timeout: float = 60.0
    """Seconds before a request gets 504."""
    keep_alive: int = 75
    """Seconds an idle client connection stays open. Longer than a load balancer's or client pool's idle timeout
    (60 s on AWS ALB, 5 s in httpx), so that the client closes idle connections, not the server: a request sent on
    a connection the server is closing at that moment fails with a connection reset."""
    max_prompt_chars: int = 32_000
    """Longest prompt accepted (413 past it)."""
    max_body_bytes: int = 1_000_000
    """Largest request body accepted (413 past it)."""
    max_batch: int = 32
    """Requests the local LM decodes together."""
    batch_wait_ms: float = 2.0
    """How long the local LM waits for requests to join a batch."""
    default_max_tokens: int = 64
    """``max_tokens`` of a bypassed request that does not set it."""
    device: str = "auto"
    """Device of the local LM: auto, cpu, cuda, cuda:N or mps."""
    dtype: str = "auto"
    """Dtype of the local LM: auto, float32, float16 or bfloat16."""
    prompt_template: str | None = None
    """Prompt template with a {question} placeholder; default: the one the policy's table was collected with."""
    answer_cue: str | None = None
    """The cue appended when the budget runs out (budget forcing); default: the policy's."""
    answer_regex: str | None = None
    """Regex reading the answer after the cue; default: the policy's."""
    max_answer_tokens: int | None = None
    """Most tokens an answer may have; default: the policy's."""
    chat_template: bool | None = None
    """Wrap prompts with the tokenizer's chat template; default: as the policy's table was collected."""
    system_prompt: str | None = None
    """System message of the chat template; default: the policy's."""
    force_prompt_format: bool = False
    """Serve the prompt flags given even where they differ from the format the policy records."""
    temperature: float = 1.0
    """Sampling temperature of ``sc<k>``."""
    threads: int | None = None
    """torch CPU threads while serving; None leaves torch's setting. On a small CPU
    machine, fewer threads than cores leave room for the event loop: torch's
    spinning worker threads otherwise fight it for the cores."""
    token_budget: str | None = None
    """Billed tokens per unit of time to hold: N/s, N/min or N/h, k or M allowed (2M/h); needs a priced policy."""
    target_mean_tokens: float | None = None
    """Mean billed tokens per request to hold, instead of a rate; needs a price-conditioned policy."""
    replicas: int = 1
    """Servers sharing a --token-budget behind one load balancer: each holds 1/replicas of it."""
    budget_state: Path | None = None
    """File keeping each arm's cost weight across restarts; default: beside the decision log (NAME.budget.json)."""
    budget_window: float = 60.0
    """Seconds of billed tokens the spend is measured over (a sliding window)."""
    budget_interval: float = 10.0
    """Seconds between two updates of the cost weight."""
    budget_step: float = 0.25
    """Change of log(cost weight) per unit of relative overspend (spend / target - 1)."""
    budget_clip: float = 0.1
    """Largest change of log(cost weight) in one update."""
    budget_min_requests: int = 20
    """Requests the window must hold before an update."""

    def spend_target(self) -> SpendTarget | None:
        """This replica's target: a mean per request, or its 1/``replicas`` share of a rate (None without a budget).

        Raises:
            ValueError: both forms given, or a budget string that is not understood (the accepted forms are named).
        """
        target = parse_spend_target(self.token_budget, self.target_mean_tokens)
        return None if target is None else target.share(1.0 / self.replicas)

    def control_settings(self) -> ControlSettings:
        """The spend controller's settings."""
        return ControlSettings(
            window=self.budget_window,
            interval=self.budget_interval,
            step=self.budget_step,
            clip=self.budget_clip,
            min_requests=self.budget_min_requests,
        )

    def budget_state_path(self) -> Path:
        """Where the arms' cost weights are kept: ``budget_state``, else beside the decision log."""
        return self.budget_state or self.log.with_name(f"{self.log.stem}.budget.json")

    def prompt_format(self) -> PromptFormat:
        """The prompt format these settings give (a field left None takes the plain format's default).

        Raises:
            ValueError: a template without ``{question}``, an empty cue or a regex that does not compile.
        """
        plain = PromptFormat()
        return PromptFormat(
            template=plain.template if self.prompt_template is None else self.prompt_template,
            answer_cue=plain.answer_cue if self.answer_cue is None else self.answer_cue,
            answer_regex=self.answer_regex,
            max_answer_tokens=plain.max_answer_tokens if self.max_answer_tokens is None else self.max_answer_tokens,
            use_chat_template=bool(self.chat_template),
            system_prompt=self.system_prompt,
        )

    def __post_init__(self) -> None:
        checks = [
            (0.0 <= self.split <= 1.0, f"split must be in [0, 1]; got {self.split}"),
            (0.0 <= self.explore <= 1.0, f"explore must be in [0, 1]; got {self.explore}"),
            (self.max_concurrency >= 1, f"max_concurrency must be >= 1; got {self.max_concurrency}"),
            (self.max_queue >= 0, f"max_queue must be >= 0; got {self.max_queue}"),
            (self.timeout > 0, f"timeout must be > 0 seconds; got {self.timeout}"),
            (self.keep_alive >= 1, f"keep_alive must be >= 1 second; got {self.keep_alive}"),
            (1 <= self.port <= 65535 or self.port == 0, f"port must be in [1, 65535]; got {self.port}"),
            (not (self.model and self.upstream), "give --model or --upstream, not both"),
            (self.threads is None or self.threads >= 1, f"threads must be >= 1; got {self.threads}"),
            (self.replicas >= 1, f"replicas must be >= 1; got {self.replicas}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.host not in LOOPBACK_HOSTS and not self.api_key and not self.insecure:
            raise ValueError(
                f"refusing to bind {self.host} without an API key: set --api-key (or TOKENOPT_API_KEY), "
                "or pass --insecure to serve an open endpoint"
            )
        # A bad budget string or controller setting stops start-up here, with the accepted forms.
        self.spend_target()
        self.control_settings()


_PROMPT_FLAGS = {
    "prompt_template": ("template", "--prompt-template"),
    "answer_cue": ("answer_cue", "--answer-cue"),
    "answer_regex": ("answer_regex", "--answer-regex"),
    "max_answer_tokens": ("max_answer_tokens", "--max-answer-tokens"),
    "chat_template": ("use_chat_template", "--chat-template"),
    "system_prompt": ("system_prompt", "--system-prompt"),
}
"""ServeConfig's prompt fields: the PromptFormat attribute each sets, and its flag."""


def resolve_prompt_format(config: ServeConfig, policies: list[BudgetPolicy]) -> ServeConfig:
    """The config with every prompt field set: from the flags, else from the format the policies record.

    A policy records the prompt format its table was collected with; serving another
    one would give the policy prompts it never saw. A flag that differs from the
    recorded format is refused unless ``force_prompt_format``.

    Raises:
        ValueError: a flag conflicts with the recorded format, or the two arms record different formats.
    """
    recorded = [policy.prompt_format for policy in policies if policy.prompt_format is not None]
    if len(recorded) == 2 and recorded[0] != recorded[1] and not config.force_prompt_format:
        raise ValueError(
            f"the two policies were collected with different prompt formats ({recorded[0]} vs {recorded[1]}); "
            "one server serves one format: give --force-prompt-format to serve the flags' format to both"
        )
    base = recorded[0] if recorded else PromptFormat()
    values: dict[str, Any] = {}
    for name, (attribute, flag) in _PROMPT_FLAGS.items():
        given, policy_value = getattr(config, name), getattr(base, attribute)
        if given is None:
            values[name] = policy_value
            continue
        if recorded and given != policy_value and not config.force_prompt_format:
            raise ValueError(
                f"{flag} {given!r} differs from the prompt format the policy was trained with ({policy_value!r}); "
                "drop the flag to serve the policy's, or give --force-prompt-format to serve it anyway"
            )
        values[name] = given
    return dataclasses.replace(config, **values)
