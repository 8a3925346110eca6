"""The OpenAI-compatible server: the policy sets each request's budget and mode.

``create_app(config)`` builds a FastAPI app with

- ``POST /v1/completions`` and ``POST /v1/chat/completions`` (OpenAI request and
  response shapes, ``usage`` included, ``stream: true`` as server-sent events);
- ``POST /v1/feedback`` (``{"id": ..., "correct": true}`` or ``{"id": ..., "gold": ...}``);
- ``GET /metrics`` (Prometheus), ``GET /healthz``, ``GET /readyz``;
- ``POST /admin/reload`` (and SIGHUP) to reload the policies without dropping requests.

Every response says what was decided in a ``tokenopt`` field and in the
``X-Tokenopt-Decision`` header; every decided request is appended to the decision log.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenopt.decisions import DecisionLog, DecisionRecord
from tokenopt.prompt import PromptFormat
from tokenopt.runtime import BudgetPolicy, PolicyLoadError
from tokenopt.serve.backends import BackendError, Generation, UpstreamError
from tokenopt.serve.metrics import ServeMetrics

__all__ = ["RequestError", "ServeConfig", "ServerState", "create_app"]

logger = logging.getLogger(__name__)

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
    """Local causal-LM folder to serve; with neither this nor ``upstream``, the demo LM."""
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
    force_prompt_format: bool = False
    """Serve the prompt flags given even where they differ from the format the policy records."""
    temperature: float = 1.0
    """Sampling temperature of ``sc<k>``."""
    threads: int | None = None
    """torch CPU threads while serving; None leaves torch's setting. On a small CPU
    machine, fewer threads than cores leave room for the event loop: torch's
    spinning worker threads otherwise fight it for the cores."""

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
        )

    def __post_init__(self) -> None:
        checks = [
            (0.0 <= self.split <= 1.0, f"split must be in [0, 1]; got {self.split}"),
            (0.0 <= self.explore <= 1.0, f"explore must be in [0, 1]; got {self.explore}"),
            (self.max_concurrency >= 1, f"max_concurrency must be >= 1; got {self.max_concurrency}"),
            (self.max_queue >= 0, f"max_queue must be >= 0; got {self.max_queue}"),
            (self.timeout > 0, f"timeout must be > 0 seconds; got {self.timeout}"),
            (1 <= self.port <= 65535 or self.port == 0, f"port must be in [1, 65535]; got {self.port}"),
            (not (self.model and self.upstream), "give --model or --upstream, not both"),
            (self.threads is None or self.threads >= 1, f"threads must be >= 1; got {self.threads}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.host not in LOOPBACK_HOSTS and not self.api_key and not self.insecure:
            raise ValueError(
                f"refusing to bind {self.host} without an API key: set --api-key (or TOKENOPT_API_KEY), "
                "or pass --insecure to serve an open endpoint"
            )


class RequestError(Exception):
    """A request the server answers with a 4xx or 5xx and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}


@dataclass
class Arm:
    """One policy being served (A, or B in an A/B test)."""

    name: str
    path: Path
    policy: BudgetPolicy
    rng: np.random.Generator

    def describe(self) -> dict[str, object]:
        """What a reader of the decision log needs to interpret this arm's rows."""
        return {
            "policy_id": self.policy.policy_id,
            "path": str(self.path),
            "actions": [str(a["name"]) for a in self.policy.actions],
            "feature_spec": self.policy.spec.get("feature_spec"),
            "extra_inputs": self.policy.extra_inputs,
        }


def _load_policy(path: Path, upstream: bool) -> BudgetPolicy:
    policy = BudgetPolicy.load(path)
    if policy.probe is not None:
        if upstream:
            raise PolicyLoadError(
                f"{path} is a probe controller; it needs each probe's answer log-probability, which the upstream "
                "path does not read: serve it with --model (or the demo LM)"
            )
        return policy
    if policy.extra_inputs:
        raise PolicyLoadError(
            f"{path}: this policy needs the inputs {policy.extra_inputs} besides the prompt "
            f"({policy.spec.get('env_id')}); the server serves prompt-only policies (TokenBudget-v0)"
        )
    return policy


@dataclass
class ParsedRequest:
    """The fields of a completions request the server acts on."""

    endpoint: str
    model: str
    prompt: str
    """The text the policy reads (the prompt, or the last user message)."""
    raw_prompt: str
    """What a bypassed request sends to the LM as is."""
    max_tokens: int | None
    n: int
    temperature: float | None
    stream: bool
    include_usage: bool
    logprobs: int | None
    """Completions' ``logprobs``: return each generated token's log-probability (bypass only)."""
    user: str | None
    seed: int | None
    stop: list[str]
    bypass: bool


def _field(body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds:
        raise RequestError(422, f"`{name}` must be {' or '.join(k.__name__ for k in kinds)}; got a boolean", name)
    if not isinstance(value, kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise RequestError(422, f"`{name}` must be {expected}; got {type(value).__name__}", name)
    return value


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(422, "message content parts must be {'type': 'text', 'text': str}", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(422, "message content must be a string or a list of text parts", "messages")


def parse_request(body: Any, endpoint: str, config: ServeConfig, bypass_header: bool) -> ParsedRequest:
    """Validate a request body; raise :class:`RequestError` (422, 413) naming the bad field."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object; got {type(body).__name__}")
    for name, value in body.items():
        if name in SUPPORTED_FIELDS[endpoint] or value is None:
            continue
        if any(type(value) is type(neutral) and value == neutral for neutral in NEUTRAL_VALUES.get(name, ())):
            continue
        raise RequestError(422, f"`{name}` is not supported by tokenopt serve (got {value!r:.60}); remove it", name)
    if endpoint == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError(422, "`prompt` must be a string (or a list of one string)", "prompt")
        # Features read the bare question, as at collection, whether the client templated it or not.
        question = config.prompt_format().question_of(prompt)
        raw = prompt
    else:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(422, "`messages` must be a non-empty list of {role, content}", "messages")
        texts = []
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise RequestError(422, "each message must be an object with a string `role`", "messages")
            texts.append((message["role"], _message_text(message.get("content", ""))))
        users = [text for role, text in texts if role == "user"]
        if not users:
            raise RequestError(422, "`messages` has no user message", "messages")
        question = users[-1]
        raw = "\n".join(text for _, text in texts)
    if len(question) > config.max_prompt_chars or len(raw) > config.max_prompt_chars:
        raise RequestError(
            413, f"the prompt has {len(raw)} characters; this server accepts up to {config.max_prompt_chars}"
        )
    max_tokens = _field(body, "max_tokens", (int,))
    if endpoint == "chat.completions":
        max_tokens = _field(body, "max_completion_tokens", (int,), max_tokens)
    if max_tokens is not None and not 1 <= max_tokens <= 1_000_000:
        raise RequestError(422, f"`max_tokens` must be in [1, 1000000]; got {max_tokens}", "max_tokens")
    n = _field(body, "n", (int,), 1)
    temperature = _field(body, "temperature", (int, float))
    if temperature is not None and not 0 <= temperature <= 2:
        raise RequestError(422, f"`temperature` must be in [0, 2]; got {temperature}", "temperature")
    stream = _field(body, "stream", (bool,), False)
    options = _field(body, "stream_options", (dict,), {})
    seed = _field(body, "seed", (int,))
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise RequestError(422, f"`seed` must be in [0, {MAX_SEED}]; got {seed}", "seed")
    model = _field(body, "model", (str,), "")
    user = _field(body, "user", (str,))
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = list(stop)
    else:
        raise RequestError(422, "`stop` must be a string or a list of up to 4 strings", "stop")
    logprobs = _field(body, "logprobs", (int,)) if endpoint == "completions" else None
    if logprobs is not None and not 0 <= logprobs <= 5:
        raise RequestError(422, f"`logprobs` must be in [0, 5]; got {logprobs}", "logprobs")
    extension = _field(body, "tokenopt", (dict,), {})
    bypass = extension.get("bypass", False)
    if not isinstance(bypass, bool):
        raise RequestError(422, "`tokenopt.bypass` must be a boolean", "tokenopt")
    if logprobs is not None and not (bypass or bypass_header):
        raise RequestError(
            422, "`logprobs` is returned only for requests that bypass the policy (tokenopt.bypass)", "logprobs"
        )
    if n != 1 and not (bypass or bypass_header):
        raise RequestError(422, f"`n` must be 1 (the policy picks the decoding mode); got {n}", "n")
    if not 1 <= n <= 16:
        raise RequestError(422, f"`n` must be in [1, 16]; got {n}", "n")
    if n > 1 and (stream or not temperature):
        raise RequestError(422, f"`n` = {n} needs sampling (temperature > 0) and no streaming", "n")
    return ParsedRequest(
        endpoint=endpoint,
        model=model,
        prompt=question,
        raw_prompt=raw,
        max_tokens=max_tokens,
        n=n,
        temperature=None if temperature is None else float(temperature),
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        logprobs=logprobs,
        user=user,
        seed=seed,
        stop=stops,
        bypass=bypass or bypass_header,
    )


def _stable_fraction(key: str) -> float:
    """A number in [0, 1) that depends only on the key (the same in every process)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass
class ServerState:
    """What the running server holds: arms, backend, log, metrics, admission counters."""

    config: ServeConfig
    backend: Any
    arms: dict[str, Arm] = field(default_factory=dict)
    metrics: ServeMetrics = field(default_factory=ServeMetrics)
    log: DecisionLog | None = None
    admitted: int = 0
    ready: bool = False
    semaphore: asyncio.Semaphore | None = None
    load_error: str | None = None
    """Why the model could not be loaded (when it was loaded in the background)."""
    started: int = field(default_factory=lambda: int(time.time()))
    """When the server started (Unix seconds): the ``created`` of ``/v1/models``."""

    def load_arms(self) -> dict[str, Arm]:
        """Load every arm's policy; raises :class:`PolicyLoadError` naming the file."""
        paths = {"A": self.config.policy}
        if self.config.policy_b is not None:
            paths["B"] = self.config.policy_b
        arms = {}
        for index, (name, path) in enumerate(paths.items()):
            policy = _load_policy(Path(path), upstream=bool(self.config.upstream))
            arms[name] = Arm(name, Path(path), policy, np.random.default_rng([self.config.seed, index]))
        if len(arms) == 2:
            actions = [arm.describe()["actions"] for arm in arms.values()]
            if actions[0] != actions[1]:
                logger.warning("arms A and B have different action tables; the A/B report compares them as served")
        return arms

    def reload(self) -> dict[str, str]:
        """Swap in freshly loaded policies; requests in flight finish with the old ones."""
        try:
            arms = self.load_arms()
            # The served prompt format stays: a policy collected with another one is refused.
            resolve_prompt_format(self.config, [arm.policy for arm in arms.values()])
        except ValueError as error:  # PolicyLoadError included
            self.metrics.reloads.labels(result="failed").inc()
            raise error if isinstance(error, PolicyLoadError) else PolicyLoadError(str(error)) from None
        self.arms = arms
        if self.log is not None:
            for arm in arms.values():
                self.log.describe_arm(arm.name, arm.describe())
        self.metrics.reloads.labels(result="ok").inc()
        return {name: arm.policy.policy_id for name, arm in arms.items()}

    def arm_for(self, user_key: str) -> Arm:
        """Arm A or B by a stable hash of the user key (one user stays in one arm)."""
        if "B" in self.arms and _stable_fraction(user_key) < self.config.split:
            return self.arms["B"]
        return self.arms["A"]


SUPPORTED_FIELDS = {
    "completions": {"model", "prompt", "max_tokens", "n", "temperature", "stream", "stream_options", "seed", "user",
                    "stop", "logprobs", "tokenopt"},
    "chat.completions": {"model", "messages", "max_tokens", "max_completion_tokens", "n", "temperature", "stream",
                         "stream_options", "seed", "user", "stop", "tokenopt"},
}  # fmt: skip
"""The request fields the server acts on, per endpoint."""

NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "top_p": (1, 1.0),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "best_of": (1,),
    "echo": (False,),
    "logit_bias": ({},),
    "suffix": ("",),
    "parallel_tool_calls": (True, False),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "tools": ([],),
    "metadata": ({},),
    "store": (False,),
}
"""Fields the server does not implement but accepts at the value that changes nothing (clients send
some of them by default); any other value, or any unknown field, is an error naming the field."""

MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects a request body may have (OpenAI's bodies need 4)."""

MAX_SEED = 2**63 - 1
"""Largest ``seed`` a request may give (the samplers take signed 64-bit seeds)."""


def _json_depth_ok(raw: bytes, limit: int) -> bool:
    """Whether the JSON text nests arrays and objects at most ``limit`` deep (brackets in strings skipped)."""
    depth = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return False
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return True


def _check_text(value: Any, where: str) -> None:
    """Refuse strings that cannot be encoded as UTF-8 (lone surrogates), anywhere in the body."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            message = f"`{where}` holds a lone surrogate (e.g. \\ud800), which is not valid text"
            raise RequestError(400, message, where or None) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, where)
            _check_text(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for item in value:
            _check_text(item, where)


_PROMPT_FLAGS = {
    "prompt_template": ("template", "--prompt-template"),
    "answer_cue": ("answer_cue", "--answer-cue"),
    "answer_regex": ("answer_regex", "--answer-regex"),
    "max_answer_tokens": ("max_answer_tokens", "--max-answer-tokens"),
    "chat_template": ("use_chat_template", "--chat-template"),
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


def _error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}
    kinds.update({405: "invalid_request_error"})
    kinds.update({413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"})
    return {"error": {"message": message, "type": kinds.get(status, "server_error"), "param": param, "code": status}}


def create_app(config: ServeConfig, backend: Any = None, load_in_background: bool = False) -> FastAPI:
    """Build the FastAPI app (uvicorn runs it; tests run it on loopback too).

    The policies are loaded and validated here, so a broken one stops start-up.

    Args:
        config: the server's settings.
        backend: the generation backend; None builds it from the config (the local
            LM or the upstream).
        load_in_background: build that backend (load the model) after the server has
            started listening: ``/readyz`` answers 503 until it is loaded, and
            completions 503 with the reason.

    Raises:
        PolicyLoadError: a policy fails its hash, version or shape checks.
    """
    state = ServerState(config=config, backend=backend)
    state.arms = state.load_arms()
    config = state.config = resolve_prompt_format(config, [arm.policy for arm in state.arms.values()])
    state.log = DecisionLog(config.log, {name: arm.describe() for name, arm in state.arms.items()})
    if state.backend is None and not load_in_background:
        state.backend = build_backend(config)

    async def load_backend() -> None:
        try:
            state.backend = await asyncio.to_thread(build_backend, config)
        except Exception as error:  # reported by /readyz and every request; the process stays up to say so
            state.load_error = f"{type(error).__name__}: {error}"
            logger.error("loading the model failed: %s", state.load_error)
            return
        state.ready = True

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        state.semaphore = asyncio.Semaphore(config.max_concurrency)
        threads_before = None
        if config.threads is not None:
            import torch

            threads_before = torch.get_num_threads()
            torch.set_num_threads(config.threads)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError, AttributeError):
            loop.add_signal_handler(signal.SIGHUP, _reload_on_signal)  # main thread only
        loader = None
        if state.backend is None:
            loader = asyncio.ensure_future(load_backend())
        else:
            state.ready = True
        try:
            yield
        finally:
            if loader is not None and not loader.done():
                await asyncio.wait({loader})
            state.ready = False
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError, AttributeError):
                loop.remove_signal_handler(signal.SIGHUP)
            closer = getattr(state.backend, "aclose", None)
            if closer is not None:
                await closer()
            elif hasattr(state.backend, "close"):
                state.backend.close()
            if state.log is not None:
                state.log.close()
            if threads_before is not None:
                import torch

                torch.set_num_threads(threads_before)

    def _reload_on_signal() -> None:
        try:
            ids = state.reload()
            logger.warning("SIGHUP: policies reloaded: %s", ids)
        except PolicyLoadError as error:
            logger.error("SIGHUP: reload failed, still serving the previous policies: %s", error)

    pages: dict[str, Any] = {"docs_url": None, "redoc_url": None, "openapi_url": None} if config.api_key else {}
    app = FastAPI(title="tokenopt", lifespan=lifespan, **pages)
    app.state.tokenopt = state

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        # Unknown routes (404) and wrong methods (405) in OpenAI's error shape, counted like any error.
        status = int(error.status_code)
        message = f"{request.method} {request.url.path}: {error.detail}"
        state.metrics.errors.labels(kind=str(status)).inc()
        return JSONResponse(_error_body(status, message), status, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> Response:
        # The last resort: still OpenAI-shaped JSON, still counted in /metrics, and logged with its traceback.
        logger.error("unexpected error on %s %s", request.method, request.url.path, exc_info=error)
        state.metrics.errors.labels(kind="500").inc()
        return JSONResponse(_error_body(500, f"internal error: {type(error).__name__}"), 500)

    if config.api_key:
        # FastAPI's API pages answer only with the key, as every other route does.
        @app.get("/openapi.json", include_in_schema=False)
        async def get_openapi(request: Request) -> Response:
            try:
                check_key(request)
            except RequestError as error:
                return error_response(error)
            return JSONResponse(app.openapi())

        @app.get("/docs", include_in_schema=False)
        async def get_docs(request: Request) -> Response:
            try:
                check_key(request)
            except RequestError as error:
                return error_response(error)
            return get_swagger_ui_html(openapi_url="/openapi.json", title="tokenopt")

        @app.get("/redoc", include_in_schema=False)
        async def get_redoc(request: Request) -> Response:
            try:
                check_key(request)
            except RequestError as error:
                return error_response(error)
            return get_redoc_html(openapi_url="/openapi.json", title="tokenopt")

    def error_response(error: RequestError) -> JSONResponse:
        state.metrics.errors.labels(kind=str(error.status)).inc()
        return JSONResponse(_error_body(error.status, error.message, error.param), error.status, headers=error.headers)

    def check_key(request: Request) -> None:
        if not config.api_key:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode("utf-8"), config.api_key.encode("utf-8")):
            raise RequestError(401, "missing or wrong API key: send `Authorization: Bearer <key>`")

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise RequestError(413, f"the body has {declared} bytes; this server accepts up to {config.max_body_bytes}")
        raw = await request.body()
        if len(raw) > config.max_body_bytes:
            raise RequestError(413, f"the body has {len(raw)} bytes; this server accepts up to {config.max_body_bytes}")
        if not _json_depth_ok(raw, MAX_JSON_DEPTH):
            raise RequestError(400, f"the body nests arrays and objects more than {MAX_JSON_DEPTH} deep")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(400, f"the body is not valid JSON: {error}") from None
        except (ValueError, RecursionError) as error:  # e.g. an integer of more than 4,300 digits
            raise RequestError(400, f"the body cannot be read: {error}") from None
        _check_text(body, "")
        return body

    def not_ready() -> RequestError:
        if state.load_error is not None:
            return RequestError(503, f"the model could not be loaded: {state.load_error}")
        return RequestError(503, "the server is still loading its model; retry shortly", headers={"Retry-After": "5"})

    async def completions(request: Request, endpoint: str) -> Response:
        started = time.perf_counter()
        try:
            check_key(request)
            if not state.ready:
                raise not_ready()
            body = await read_json(request)
            bypass_header = request.headers.get("x-tokenopt-bypass", "").lower() in {"1", "true", "yes"}
            parsed = parse_request(body, endpoint, config, bypass_header)
        except RequestError as error:
            state.metrics.requests.labels(arm="none", endpoint=endpoint, status=str(error.status)).inc()
            return error_response(error)
        if state.admitted >= config.max_concurrency + config.max_queue:
            state.metrics.requests.labels(arm="none", endpoint=endpoint, status="429").inc()
            return error_response(
                RequestError(429, "the server is at capacity; retry after a second", headers={"Retry-After": "1"})
            )
        state.admitted += 1
        state.metrics.in_flight.inc()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                state.admitted -= 1
                state.metrics.in_flight.dec()

        request_id = ("cmpl-" if endpoint == "completions" else "chatcmpl-") + uuid.uuid4().hex[:24]
        user_key = request.headers.get("x-tokenopt-user") or parsed.user or request_id
        arm = state.arm_for(user_key)
        holder: dict[str, Any] = {}
        tokens: asyncio.Queue[int] = asyncio.Queue()
        on_token = None
        if parsed.stream and getattr(state.backend, "streams_tokens", False):
            loop = asyncio.get_running_loop()

            def on_token(token: int) -> None:  # called on the LM's worker thread
                loop.call_soon_threadsafe(tokens.put_nowait, token)

        assert state.semaphore is not None
        semaphore = state.semaphore

        async def admitted() -> tuple[Generation, DecisionRecord]:
            async with semaphore:
                return await serve_one(parsed, arm, request_id, user_key, holder, on_token)

        task = asyncio.ensure_future(asyncio.wait_for(admitted(), config.timeout))
        if on_token is None:
            try:
                generation, record = await task
            except Exception as error:  # RequestError, timeout, or a bug (500, logged)
                return failed(error, arm, endpoint, holder, started)
            finally:
                release()
            decision = await succeeded(generation, record, arm, endpoint, started, log=not parsed.stream)
            return respond(parsed, request_id, arm, generation, record, decision, holder, started)
        # Live streaming: answer once the first token (or the outcome) is known, so that an
        # error before any token still gets its status code.
        getter = asyncio.ensure_future(tokens.get())
        await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
        if task.done() and task.exception() is not None:
            getter.cancel()
            release()
            return failed(task.exception(), arm, endpoint, holder, started)  # type: ignore[arg-type]
        record = holder["record"]
        return _ClosingStreamingResponse(
            live_events(parsed, request_id, arm, task, getter, tokens, holder, started, release),
            on_close=lambda: log_stream_end(holder, started, release, task),
            media_type="text/event-stream",
            headers=decision_headers(request_id, arm, record),
        )

    def log_stream_end(holder: dict[str, Any], started: float, release: Any = None, task: Any = None) -> None:
        """Log a streamed request exactly once when its response ends: 200 if every event went out, else 499."""
        if task is not None and not task.done():
            task.cancel()  # the client left before the stream started: stop generating for it
        if release is not None:
            release()
        if holder.get("logged") or "record" not in holder:
            return
        holder["logged"] = True
        record = holder["record"]
        record.status = 200 if holder.get("completed") else CLIENT_CLOSED
        record.latency_ms = (time.perf_counter() - started) * 1000.0
        if record.status == CLIENT_CLOSED:
            arm_name = record.arm
            state.metrics.requests.labels(arm=arm_name, endpoint=record.endpoint, status=str(CLIENT_CLOSED)).inc()
        state.log.append(record, record.checkpoints)  # type: ignore[union-attr]

    def failed(error: BaseException, arm: Arm, endpoint: str, holder: dict[str, Any], started: float) -> JSONResponse:
        if isinstance(error, asyncio.TimeoutError):
            error = RequestError(504, f"the request took longer than the server's timeout of {config.timeout} s")
        elif not isinstance(error, RequestError):
            logger.error("request failed", exc_info=error)
            error = RequestError(500, f"internal error: {type(error).__name__}: {error}")
        state.metrics.requests.labels(arm=arm.name, endpoint=endpoint, status=str(error.status)).inc()
        if "record" in holder and not holder.get("logged"):
            holder["logged"] = True
            record = holder["record"]
            record.status, record.latency_ms = error.status, (time.perf_counter() - started) * 1000.0
            state.log.append(record)  # type: ignore[union-attr]
        return error_response(error)

    async def succeeded(
        generation: Generation, record: DecisionRecord, arm: Arm, endpoint: str, started: float, log: bool = True
    ) -> dict[str, Any]:
        """Count a served request (and log it, unless a stream logs it when it ends); return its decision."""
        elapsed = time.perf_counter() - started
        record.latency_ms = elapsed * 1000.0
        if log:
            await asyncio.to_thread(state.log.append, record, record.checkpoints)  # type: ignore[union-attr]
        state.metrics.requests.labels(arm=arm.name, endpoint=endpoint, status="200").inc()
        state.metrics.latency.labels(arm=arm.name, endpoint=endpoint).observe(elapsed)
        state.metrics.tokens.labels(arm=arm.name, kind="reasoning").inc(generation.reasoning_tokens)
        state.metrics.tokens.labels(arm=arm.name, kind="answer").inc(generation.answer_tokens)
        budget_label = "bypass" if record.bypass else str(record.budget)  # client max_tokens: unbounded values
        state.metrics.decisions.labels(arm=arm.name, budget=budget_label, mode=record.mode).inc()
        return {
            "policy_id": record.policy_id,
            "arm": arm.name,
            "action": record.action,
            "budget": record.budget,
            "mode": record.mode,
            "bypass": record.bypass,
            # Served an action other than the policy's own pick (every action, with --explore 1).
            "explored": record.propensity < 1.0
            and record.propensity <= config.explore / max(len(arm.policy.actions), 1) + 1e-12,
            "forced": generation.forced,
            "billed_tokens": generation.billed_tokens,
            "answer": generation.answer,
        }

    def decision_headers(request_id: str, arm: Arm, record: DecisionRecord) -> dict[str, str]:
        return {
            "X-Request-Id": request_id,
            "X-Tokenopt-Decision": f"arm={arm.name}; policy={record.policy_id}; action={record.action}; "
            f"budget={record.budget}; mode={record.mode}",
        }

    def usage_of(generation: Generation) -> dict[str, int]:
        return {
            "prompt_tokens": generation.prompt_tokens,
            "completion_tokens": generation.billed_tokens,
            "total_tokens": generation.prompt_tokens + generation.billed_tokens,
        }

    def respond(
        parsed: ParsedRequest,
        request_id: str,
        arm: Arm,
        generation: Generation,
        record: DecisionRecord,
        decision: dict[str, Any],
        holder: dict[str, Any],
        started: float,
    ) -> Response:
        headers = decision_headers(request_id, arm, record)
        events = _Events(parsed.endpoint, request_id, parsed.model or str(state.backend.name))
        if parsed.stream:

            async def whole() -> AsyncIterator[str]:
                async for event in events.whole(generation, usage_of(generation), decision, parsed.include_usage):
                    yield event
                holder["completed"] = True

            return _ClosingStreamingResponse(
                whole(),
                on_close=lambda: log_stream_end(holder, started),
                media_type="text/event-stream",
                headers=headers,
            )
        served = generation.choices or [(generation.text, generation.finish_reason, generation.token_logprobs)]
        if parsed.endpoint == "completions":
            choices = [
                {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}
                for i, (text, finish, logprobs) in enumerate(served)
            ]
            kind = "text_completion"
        else:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                }
                for i, (text, finish, _) in enumerate(served)
            ]
            kind = "chat.completion"
        payload = {
            "id": request_id,
            "object": kind,
            "created": events.created,
            "model": events.model,
            "choices": choices,
            "usage": usage_of(generation),
            "tokenopt": decision,
        }
        return JSONResponse(payload, headers=headers)

    async def live_events(
        parsed: ParsedRequest,
        request_id: str,
        arm: Arm,
        task: asyncio.Future[tuple[Generation, DecisionRecord]],
        getter: asyncio.Future[int],
        tokens: asyncio.Queue[int],
        holder: dict[str, Any],
        started: float,
        release: Any,
    ) -> AsyncIterator[str]:
        """Chunks as the LM chooses the tokens, then the decision and the usage."""
        events = _Events(parsed.endpoint, request_id, parsed.model or str(state.backend.name))
        ids: list[int] = []
        sent = ""
        try:
            yield events.chunk(None, None, first=True)
            while True:
                if getter.done():
                    ids.append(getter.result())
                    while not tokens.empty():
                        ids.append(tokens.get_nowait())
                    getter = asyncio.ensure_future(tokens.get())
                    text = state.backend.decode(ids)
                    if text.startswith(sent) and len(text) > len(sent):
                        yield events.chunk(text[len(sent) :], None)
                        sent = text
                    continue
                if task.done():
                    break
                waiting: set[asyncio.Future[Any]] = {task, getter}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            getter.cancel()
            error = task.exception()
            if error is not None:
                response = failed(error, arm, parsed.endpoint, holder, started)
                yield f"data: {bytes(response.body).decode()}\n\n"
                yield "data: [DONE]\n\n"
                return
            generation, record = task.result()
            if not sent:  # decoded as a whole (a vote, a beam, a probe controller): a chunk per token
                for piece in generation.pieces:
                    yield events.chunk(piece, None)
            elif generation.text.startswith(sent) and len(generation.text) > len(sent):
                yield events.chunk(generation.text[len(sent) :], None)
            decision = await succeeded(generation, record, arm, parsed.endpoint, started, log=False)
            async for event in events.ending(generation, usage_of(generation), decision, parsed.include_usage):
                yield event
            holder["completed"] = True
        finally:
            getter.cancel()
            if not task.done():
                task.cancel()
            release()

    async def serve_one(
        parsed: ParsedRequest,
        arm: Arm,
        request_id: str,
        user_key: str,
        holder: dict[str, Any],
        on_token: Any = None,
    ) -> tuple[Generation, DecisionRecord]:
        policy = arm.policy
        tick = time.perf_counter()
        features = policy.features(parsed.prompt).astype(np.float32)
        seed = parsed.seed if parsed.seed is not None else int(_stable_fraction(request_id) * 2**31)
        record = DecisionRecord(
            id=request_id,
            arm=arm.name,
            policy_id=policy.policy_id,
            endpoint=parsed.endpoint,
            bypass=parsed.bypass,
            action="bypass",
            action_index=-1,
            budget=0,
            mode="greedy",
            propensity=1.0,
            features=features.tobytes(),
            user_key=hashlib.sha256(user_key.encode("utf-8")).hexdigest()[:16],
            prompt=parsed.raw_prompt if config.log_prompts else None,
            created=time.time(),
        )
        holder["record"] = record
        if parsed.bypass:
            return await serve_plain(parsed, record, seed)
        if policy.probe is not None:
            return await serve_probe(parsed, arm, record, seed, tick)
        probabilities = policy.probabilities(features[None, :].astype(np.float64))[0]
        greedy_index = int(np.argmax(probabilities))
        index = greedy_index
        if config.explore > 0 and arm.rng.random() < config.explore:
            index = int(arm.rng.integers(len(policy.actions)))
        share = config.explore / len(policy.actions)
        record.propensity = (1.0 - config.explore) * float(index == greedy_index) + share
        record.policy_ms = (time.perf_counter() - tick) * 1000.0
        state.metrics.policy_latency.labels(arm=arm.name).observe(record.policy_ms / 1000.0)
        action = policy.actions[index]
        budget, mode = int(action["budget"]), str(action["mode"])  # type: ignore[call-overload]
        answer_cap = None
        room = int(state.backend.answer_room)
        if parsed.max_tokens is not None and parsed.max_tokens < budget + room:
            cue = room - int(getattr(state.backend, "max_answer_tokens", room - 1))
            if parsed.max_tokens <= cue:
                raise RequestError(
                    422,
                    f"`max_tokens` {parsed.max_tokens} leaves no room for the answer cue and an answer "
                    f"(at least {cue + 1}); raise it, or set tokenopt.bypass for plain generation",
                    "max_tokens",
                )
            budget = max(0, parsed.max_tokens - room)
            answer_cap = parsed.max_tokens - budget - cue
        record.action, record.action_index, record.budget, record.mode = str(action["name"]), index, budget, mode
        try:
            stream = {"on_token": on_token} if on_token is not None and mode == "greedy" else {}
            generation = await state.backend.generate(
                parsed.prompt, budget, mode, seed=seed, answer_cap=answer_cap, **stream
            )
        except ValueError as error:
            raise RequestError(413 if "context" in str(error) else 422, str(error)) from None
        except UpstreamError as error:
            raise RequestError(502, str(error)) from None
        except BackendError as error:
            raise RequestError(500, str(error)) from None
        record.mode = generation.mode
        _fill(record, generation)
        return generation, record

    async def serve_probe(
        parsed: ParsedRequest, arm: Arm, record: DecisionRecord, seed: int, tick: float
    ) -> tuple[Generation, DecisionRecord]:
        """Reason to each checkpoint, probe, and let the controller answer or continue.

        Each probe is the forced answer at that checkpoint's budget, decoded as
        ``tokenopt collect`` decodes it, so the controller sees the probes it was
        trained on. Usage counts the reasoning up to the exit and every probe's cue and
        answer (what a server continuing one trace generates); the controller's
        ``tokens_spent`` weights probes by its probe price, as in training. On
        ``"escalate"`` (a controller with an ``escalate_mode``) the request is generated
        afresh in that mode at the checkpoint's budget and answered with; usage adds
        that generation's billed tokens to the reasoning and probes so far.
        """
        session = arm.policy.start(parsed.prompt)
        settings = session.settings
        policy_ms = (time.perf_counter() - tick) * 1000.0
        room = int(state.backend.answer_room)
        cap = None if parsed.max_tokens is None else parsed.max_tokens - room
        if cap is not None and cap < settings.checkpoints[0]:
            raise RequestError(
                422,
                f"`max_tokens` {parsed.max_tokens} is below the controller's first checkpoint "
                f"({settings.checkpoints[0]}) plus the answer ({room}); raise it or set tokenopt.bypass",
                "max_tokens",
            )
        probe_tokens = 0.0
        checkpoints: list[tuple[int, str, float, str]] = []
        while True:
            budget = session.next_budget
            assert budget is not None
            try:
                generation = await state.backend.generate(parsed.prompt, budget, settings.mode, seed=seed)
            except ValueError as error:
                raise RequestError(413 if "context" in str(error) else 422, str(error)) from None
            except BackendError as error:
                raise RequestError(500, str(error)) from None
            probe_tokens += generation.answer_tokens
            spent = generation.reasoning_tokens + settings.probe_token_price * probe_tokens
            tick = time.perf_counter()
            decision = session.observe(generation.answer, generation.answer_logprob, spent, not generation.forced)
            policy_ms += (time.perf_counter() - tick) * 1000.0
            following = session.next_budget
            if decision == "continue" and cap is not None and following is not None and following > cap:
                decision = "answer (max_tokens)"
            checkpoints.append((budget, generation.answer, generation.answer_logprob, decision))
            if decision != "continue":
                break
        served_mode = settings.mode
        if decision == "escalate":
            assert settings.escalate_mode is not None
            served_mode, reasoned = settings.escalate_mode, generation.reasoning_tokens
            try:
                generation = await state.backend.generate(parsed.prompt, budget, served_mode, seed=seed)
            except ValueError as error:
                raise RequestError(413 if "context" in str(error) else 422, str(error)) from None
            except BackendError as error:
                raise RequestError(500, str(error)) from None
            # The escalated mode reasoned afresh from the prompt: its whole bill comes on top.
            generation.billed_tokens += reasoned + int(probe_tokens)
        else:
            generation.billed_tokens = generation.reasoning_tokens + int(probe_tokens)
            generation.answer_tokens = int(probe_tokens)
        record.action = f"probe/b{budget}/{served_mode}"
        record.action_index, record.budget, record.mode = len(checkpoints) - 1, budget, served_mode
        record.policy_ms = policy_ms
        record.checkpoints = checkpoints
        state.metrics.policy_latency.labels(arm=arm.name).observe(policy_ms / 1000.0)
        _fill(record, generation)
        return generation, record

    async def serve_plain(
        parsed: ParsedRequest, record: DecisionRecord, seed: int
    ) -> tuple[Generation, DecisionRecord]:
        max_tokens = parsed.max_tokens or config.default_max_tokens
        temperature = 0.0 if parsed.temperature is None else parsed.temperature
        record.policy_id, record.budget = "bypass", max_tokens
        try:
            results = await state.backend.generate_plain(
                parsed.raw_prompt, max_tokens, parsed.n, temperature, seed, parsed.stop
            )
        except ValueError as error:
            raise RequestError(413 if "context" in str(error) else 422, str(error)) from None
        except UpstreamError as error:
            raise RequestError(502, str(error)) from None
        except BackendError as error:
            raise RequestError(500, str(error)) from None
        prompt_tokens, result = results[0]
        cue = str(getattr(state.backend, "answer_cue", "="))
        answer = result.text[result.text.find(cue) + len(cue) :].split("\n")[0].strip() if cue in result.text else ""
        generation = Generation(
            text=result.text,
            answer=answer,
            prompt_tokens=prompt_tokens,
            reasoning_tokens=len(result.token_ids),
            answer_tokens=0,
            billed_tokens=len(result.token_ids),
            forced=False,
            finish_reason=result.finish_reason,
            mode="greedy" if temperature == 0 else f"sample@{temperature:g}",
            pieces=[result.text],
            token_logprobs=_token_logprobs(state.backend, result) if parsed.logprobs is not None else None,
        )
        if len(results) > 1:
            generation.billed_tokens = generation.reasoning_tokens = sum(len(r.token_ids) for _, r in results)
            generation.choices = [
                (
                    r.text,
                    r.finish_reason,
                    _token_logprobs(state.backend, r) if parsed.logprobs is not None else None,
                )
                for _, r in results
            ]
        record.mode = "greedy" if temperature == 0 else "sample"
        _fill(record, generation)
        return generation, record

    @app.post("/v1/completions")
    async def post_completions(request: Request) -> Response:
        return await completions(request, "completions")

    @app.post("/v1/chat/completions")
    async def post_chat_completions(request: Request) -> Response:
        return await completions(request, "chat.completions")

    @app.post("/v1/feedback")
    async def post_feedback(request: Request) -> Response:
        try:
            check_key(request)
            body = await read_json(request)
            if not isinstance(body, dict) or not isinstance(body.get("id"), str):
                raise RequestError(422, "feedback needs a string `id` (the response's id)", "id")
            correct, gold = body.get("correct"), body.get("gold")
            if correct is not None and not isinstance(correct, bool):
                raise RequestError(422, "`correct` must be a boolean", "correct")
            if gold is not None and not isinstance(gold, str):
                raise RequestError(422, "`gold` must be a string", "gold")
            if correct is None and gold is None:
                raise RequestError(422, "feedback needs `correct` (boolean) or `gold` (the right answer)")
            assert state.log is not None
            attached = await asyncio.to_thread(state.log.attach_feedback, body["id"], correct, gold)
            if attached is None:
                raise RequestError(404, f"no logged request has id {body['id']!r}", "id")
        except RequestError as error:
            return error_response(error)
        arm_name, is_correct = attached
        state.metrics.record_feedback(arm_name, is_correct)
        return JSONResponse({"id": body["id"], "arm": arm_name, "correct": is_correct})

    @app.get("/metrics")
    async def get_metrics(request: Request) -> Response:
        try:
            check_key(request)
        except RequestError as error:
            return error_response(error)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def get_models(request: Request) -> Response:
        # Many OpenAI clients and UIs list the models first.
        try:
            check_key(request)
        except RequestError as error:
            return error_response(error)
        if not state.ready:
            return error_response(not_ready())
        model = {"id": str(state.backend.name), "object": "model", "created": state.started, "owned_by": "tokenopt"}
        return JSONResponse({"object": "list", "data": [model]})

    @app.get("/healthz")
    async def get_healthz() -> Response:
        return PlainTextResponse("ok")

    @app.get("/readyz")
    async def get_readyz() -> Response:
        policies = {name: arm.policy.policy_id for name, arm in state.arms.items()}
        status = 200 if state.ready else 503
        backend = None if state.backend is None else str(state.backend.name)
        body = {"ready": state.ready, "policies": policies, "backend": backend, "error": state.load_error}
        return JSONResponse(body, status)

    @app.post("/admin/reload")
    async def post_reload(request: Request) -> Response:
        try:
            check_key(request)
            try:
                policies = await asyncio.to_thread(state.reload)
            except PolicyLoadError as error:
                raise RequestError(409, f"reload failed; still serving the previous policies: {error}") from None
        except RequestError as error:
            return error_response(error)
        return JSONResponse({"reloaded": True, "policies": policies})

    return app


CLIENT_CLOSED = 499
"""Status logged for a streamed request whose client left before the last event (nginx's convention)."""


class _ClosingStreamingResponse(StreamingResponse):
    """A streaming response that calls ``on_close`` once it ends, however it ends.

    A client that disconnects can stop the stream before its generator runs, or in the
    middle; the decision is logged in ``on_close`` either way, exactly once.
    """

    def __init__(self, content: Any, on_close: Any, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _fill(record: DecisionRecord, generation: Generation) -> None:
    record.prompt_tokens = generation.prompt_tokens
    record.reasoning_tokens = generation.reasoning_tokens
    record.answer_tokens = generation.answer_tokens
    record.billed_tokens = generation.billed_tokens
    record.forced = generation.forced
    record.answer = generation.answer


class _Events:
    """Server-sent events in OpenAI's chunk format for one response."""

    def __init__(self, endpoint: str, request_id: str, model: str) -> None:
        self.endpoint = endpoint
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self.kind = "text_completion" if endpoint == "completions" else "chat.completion.chunk"

    def _payload(self, piece: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if self.endpoint == "completions":
            choice: dict[str, Any] = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
        else:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if piece:
                delta["content"] = piece
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {
            "id": self.request_id,
            "object": self.kind,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def chunk(self, piece: str | None, finish: str | None, first: bool = False) -> str:
        """One chunk: a piece of text, or (with ``first``) the chat role."""
        return f"data: {json.dumps(self._payload(piece, finish, first))}\n\n"

    async def ending(
        self, generation: Generation, usage: dict[str, int], decision: dict[str, Any], include_usage: bool
    ) -> AsyncIterator[str]:
        """The finish reason with the ``tokenopt`` decision, the usage if asked, and ``[DONE]``."""
        final = self._payload(None, generation.finish_reason)
        final["tokenopt"] = decision
        yield f"data: {json.dumps(final)}\n\n"
        if include_usage:
            tail = {
                "id": self.request_id,
                "object": self.kind,
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage,
            }
            yield f"data: {json.dumps(tail)}\n\n"
        yield "data: [DONE]\n\n"

    async def whole(
        self, generation: Generation, usage: dict[str, int], decision: dict[str, Any], include_usage: bool
    ) -> AsyncIterator[str]:
        """A response decoded before streaming (votes, beams, probes, upstream): one chunk per token."""
        yield self.chunk(None, None, first=True)
        for piece in generation.pieces:
            yield self.chunk(piece, None)
        async for event in self.ending(generation, usage, decision, include_usage):
            yield event


def build_backend(config: ServeConfig) -> Any:
    """The backend a config asks for: the upstream, a local LM folder, or the demo LM."""
    from tokenopt.serve.backends import LocalBackend, UpstreamBackend

    prompt_format = config.prompt_format()
    if config.upstream:
        extractor = prompt_format.extract_answer if prompt_format.answer_regex else None
        return UpstreamBackend(
            config.upstream,
            model=config.upstream_model,
            answer_cue=prompt_format.answer_cue,
            max_answer_tokens=prompt_format.max_answer_tokens,
            answer_extractor=extractor,
            api_key=config.upstream_api_key,
            timeout=config.timeout,
            temperature=config.temperature,
            prompt_template=prompt_format.template,
        )
    from tokenopt.lm.local import TransformersLM

    lm = TransformersLM(
        config.model,
        device=config.device,
        dtype=config.dtype,
        prompt_format=prompt_format,
        temperature=config.temperature,
    )
    return LocalBackend(lm, max_batch=config.max_batch, batch_wait_ms=config.batch_wait_ms)


def _token_logprobs(backend: Any, result: Any) -> dict[str, Any] | None:
    """OpenAI's completions ``logprobs`` object for a plain generation (local LM only).

    The tokens are each generated token decoded alone; their concatenation is the text
    (up to a stop string). ``top_logprobs`` is not computed (null).
    """
    tokenizer = getattr(getattr(backend, "lm", None), "tokenizer", None)
    if tokenizer is None or len(result.token_logprobs) != len(result.token_ids):
        return None
    tokens = [str(tokenizer.decode([token])) for token in result.token_ids]
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": list(result.token_logprobs),
        "top_logprobs": None,
        "text_offset": offsets,
    }
