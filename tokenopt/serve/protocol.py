"""Requests and responses of the OpenAI-compatible API, and its errors in OpenAI's shape.

The request models validate a body the way the server answers it: a field the server
does not implement is refused unless it carries the value that changes nothing, a
wrong type or value is a 422 naming the field (``param``), a prompt past the server's
limit a 413, and a body that is not a JSON object (or not JSON at all) a 400. The first
failing check answers, in the order the fields are declared; each raises
:class:`RequestError` at once, so its status and message are exactly the ones below.
Checks that depend on the server (the prompt limit, the prompt format the question is
read with, the ``X-Tokenopt-Bypass`` header) come in as the validation context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from tokenopt.prompt import PromptFormat

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_SEED",
    "NEUTRAL_VALUES",
    "SUPPORTED_FIELDS",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "CompletionRequest",
    "CompletionResponse",
    "ErrorResponse",
    "FeedbackRequest",
    "FeedbackResponse",
    "ModelList",
    "ParsedRequest",
    "RequestError",
    "StreamChunk",
    "TokenoptDecision",
    "Usage",
    "decode_body",
    "error_body",
    "parse_request",
]


class RequestError(Exception):
    """A request the server answers with a 4xx or 5xx and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}


# --- errors --------------------------------------------------------------------------------------------------------

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
"""OpenAI's error ``type`` per status; any other status is a ``server_error``."""


class ErrorInfo(BaseModel):
    """What went wrong: OpenAI's ``error`` object."""

    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    """An error body in OpenAI's shape."""

    error: ErrorInfo


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """The JSON body of an error response."""
    kind = ERROR_TYPES.get(status, "server_error")
    return ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=status)).model_dump()


# --- the body as JSON ----------------------------------------------------------------------------------------------

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


def decode_body(raw: bytes, max_bytes: int) -> Any:
    """The JSON value of a request body.

    Raises:
        RequestError: 413 past ``max_bytes``; 400 for nesting past :data:`MAX_JSON_DEPTH`, text
            that is not JSON, or a lone surrogate in a string.
    """
    if len(raw) > max_bytes:
        raise RequestError(413, f"the body has {len(raw)} bytes; this server accepts up to {max_bytes}")
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


# --- requests ------------------------------------------------------------------------------------------------------

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

_KINDS: dict[str, tuple[type, ...]] = {
    "max_tokens": (int,),
    "max_completion_tokens": (int,),
    "n": (int,),
    "temperature": (int, float),
    "stream": (bool,),
    "stream_options": (dict,),
    "seed": (int,),
    "model": (str,),
    "user": (str,),
    "logprobs": (int,),
    "tokenopt": (dict,),
}
"""The JSON types each scalar field accepts (a boolean is not an integer here)."""


def _of_kind(name: str, value: Any, kinds: tuple[type, ...]) -> Any:
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


def _check_prompt_length(question: str, raw: str, info: ValidationInfo) -> None:
    limit = int((info.context or {}).get("max_prompt_chars", 0)) or None
    if limit is not None and (len(question) > limit or len(raw) > limit):
        raise RequestError(413, f"the prompt has {len(raw)} characters; this server accepts up to {limit}")


class _GenerationRequest(BaseModel):
    """The fields both completions endpoints share, in the order they are checked (after the prompt)."""

    model_config = ConfigDict(extra="ignore", validate_default=True)

    endpoint: ClassVar[str]

    if TYPE_CHECKING:  # declared by each endpoint's model, in the order they are checked
        n: int
        temperature: int | float | None
        stream: bool
        stream_options: dict[str, Any]
        seed: int | None
        model: str
        user: str | None
        stop: list[str]
        tokenopt: dict[str, Any]

    @model_validator(mode="before")
    @classmethod
    def _supported_only(cls, body: Any) -> Any:
        if not isinstance(body, dict):
            raise RequestError(400, f"the request body must be a JSON object; got {type(body).__name__}")
        for name, value in body.items():
            if name in SUPPORTED_FIELDS[cls.endpoint] or value is None:
                continue
            if any(type(value) is type(neutral) and value == neutral for neutral in NEUTRAL_VALUES.get(name, ())):
                continue
            raise RequestError(422, f"`{name}` is not supported by tokenopt serve (got {value!r:.60}); remove it", name)
        return body

    @field_validator(*_KINDS, mode="before", check_fields=False)
    @classmethod
    def _typed(cls, value: Any, info: ValidationInfo) -> Any:
        assert info.field_name is not None
        if value is None:
            return cls.model_fields[info.field_name].get_default(call_default_factory=True)
        return _of_kind(info.field_name, value, _KINDS[info.field_name])

    @field_validator("temperature", check_fields=False)
    @classmethod
    def _temperature_range(cls, value: int | float | None) -> int | float | None:
        if value is not None and not 0 <= value <= 2:
            raise RequestError(422, f"`temperature` must be in [0, 2]; got {value}", "temperature")
        return value

    @field_validator("seed", check_fields=False)
    @classmethod
    def _seed_range(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= MAX_SEED:
            raise RequestError(422, f"`seed` must be in [0, {MAX_SEED}]; got {value}", "seed")
        return value

    @field_validator("stop", mode="before", check_fields=False)
    @classmethod
    def _stop_list(cls, stop: Any) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            return [stop]
        if isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
            return list(stop)
        raise RequestError(422, "`stop` must be a string or a list of up to 4 strings", "stop")

    @field_validator("tokenopt", check_fields=False)
    @classmethod
    def _extension(cls, extension: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(extension.get("bypass", False), bool):
            raise RequestError(422, "`tokenopt.bypass` must be a boolean", "tokenopt")
        return extension

    @model_validator(mode="after")
    def _decoding(self, info: ValidationInfo) -> _GenerationRequest:
        bypass = self.bypasses((info.context or {}).get("bypass_header", False))
        logprobs = self.requested_logprobs()
        if logprobs is not None and not bypass:
            raise RequestError(
                422, "`logprobs` is returned only for requests that bypass the policy (tokenopt.bypass)", "logprobs"
            )
        n = self.n
        if n != 1 and not bypass:
            raise RequestError(422, f"`n` must be 1 (the policy picks the decoding mode); got {n}", "n")
        if not 1 <= n <= 16:
            raise RequestError(422, f"`n` must be in [1, 16]; got {n}", "n")
        if n > 1 and (self.stream or not self.temperature):
            raise RequestError(422, f"`n` = {n} needs sampling (temperature > 0) and no streaming", "n")
        return self

    def bypasses(self, bypass_header: bool) -> bool:
        """Whether the request skips the policy (``tokenopt.bypass``, or the ``X-Tokenopt-Bypass`` header)."""
        return bool(self.tokenopt.get("bypass", False)) or bypass_header

    def requested_logprobs(self) -> int | None:
        """Completions' ``logprobs`` (chat has none)."""
        return None

    def effective_max_tokens(self) -> int | None:
        """The ``max_tokens`` the request sets."""
        raise NotImplementedError

    def texts(self, prompt_format: PromptFormat) -> tuple[str, str]:
        """(the question the policy reads, what a bypassed request sends to the LM as is)."""
        raise NotImplementedError

    def parsed(self, prompt_format: PromptFormat, bypass_header: bool) -> ParsedRequest:
        """The fields the server acts on."""
        question, raw = self.texts(prompt_format)
        return ParsedRequest(
            endpoint=self.endpoint,
            model=self.model,
            prompt=question,
            raw_prompt=raw,
            max_tokens=self.effective_max_tokens(),
            n=self.n,
            temperature=None if self.temperature is None else float(self.temperature),
            stream=self.stream,
            include_usage=bool(self.stream_options.get("include_usage", False)),
            logprobs=self.requested_logprobs(),
            user=self.user,
            seed=self.seed,
            stop=list(self.stop),
            bypass=self.bypasses(bypass_header),
        )


def _check_max_tokens(value: int | None) -> None:
    if value is not None and not 1 <= value <= 1_000_000:
        raise RequestError(422, f"`max_tokens` must be in [1, 1000000]; got {value}", "max_tokens")


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``."""

    endpoint: ClassVar[str] = "completions"

    prompt: str = Field(default=None, validate_default=True)  # missing: refused by its validator, as null
    """The prompt (a list of one string is read as that string)."""
    # Declared after the prompt so that the checks run in the server's order: prompt first, logprobs last.
    max_tokens: int | None = None
    n: int = 1
    temperature: int | float | None = None
    stream: bool = False
    stream_options: dict[str, Any] = {}
    seed: int | None = None
    model: str = ""
    user: str | None = None
    stop: list[str] = []
    logprobs: int | None = None
    """Return each generated token's log-probability (bypass only)."""
    tokenopt: dict[str, Any] = {}

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any, info: ValidationInfo) -> str:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError(422, "`prompt` must be a string (or a list of one string)", "prompt")
        prompt_format = (info.context or {}).get("prompt_format") or PromptFormat()
        _check_prompt_length(prompt_format.question_of(prompt), prompt, info)
        return prompt

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens_range(cls, value: int | None) -> int | None:
        _check_max_tokens(value)
        return value

    @field_validator("logprobs")
    @classmethod
    def _logprobs_range(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= 5:
            raise RequestError(422, f"`logprobs` must be in [0, 5]; got {value}", "logprobs")
        return value

    def requested_logprobs(self) -> int | None:
        """How many log-probabilities per token the client asked for (None: none)."""
        return self.logprobs

    def effective_max_tokens(self) -> int | None:
        """The ``max_tokens`` the request sets."""
        return self.max_tokens

    def texts(self, prompt_format: PromptFormat) -> tuple[str, str]:
        """Features read the bare question, as at collection, whether the client templated it or not."""
        return prompt_format.question_of(self.prompt), self.prompt


class ChatMessage(BaseModel):
    """One message of a chat request (text content only)."""

    role: str
    content: str


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``."""

    endpoint: ClassVar[str] = "chat.completions"

    messages: list[ChatMessage] = Field(default=None, validate_default=True)  # missing: refused as null
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    """OpenAI's newer name for ``max_tokens``; wins when both are given."""
    n: int = 1
    temperature: int | float | None = None
    stream: bool = False
    stream_options: dict[str, Any] = {}
    seed: int | None = None
    model: str = ""
    user: str | None = None
    stop: list[str] = []
    tokenopt: dict[str, Any] = {}

    @field_validator("messages", mode="before")
    @classmethod
    def _text_messages(cls, messages: Any, info: ValidationInfo) -> list[ChatMessage]:
        if not isinstance(messages, list) or not messages:
            raise RequestError(422, "`messages` must be a non-empty list of {role, content}", "messages")
        texts = []
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise RequestError(422, "each message must be an object with a string `role`", "messages")
            texts.append(ChatMessage(role=message["role"], content=_message_text(message.get("content", ""))))
        users = [message.content for message in texts if message.role == "user"]
        if not users:
            raise RequestError(422, "`messages` has no user message", "messages")
        _check_prompt_length(users[-1], "\n".join(message.content for message in texts), info)
        return texts

    @field_validator("max_completion_tokens")
    @classmethod
    def _served_max_tokens_range(cls, value: int | None, info: ValidationInfo) -> int | None:
        _check_max_tokens(value if value is not None else info.data.get("max_tokens"))
        return value

    def effective_max_tokens(self) -> int | None:
        """``max_completion_tokens`` if given, else ``max_tokens``."""
        return self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens

    def texts(self, prompt_format: PromptFormat) -> tuple[str, str]:
        """The last user message, and every message's text joined by newlines."""
        users = [message.content for message in self.messages if message.role == "user"]
        return users[-1], "\n".join(message.content for message in self.messages)


REQUEST_MODELS: dict[str, type[_GenerationRequest]] = {
    "completions": CompletionRequest,
    "chat.completions": ChatCompletionRequest,
}
"""The request model of each endpoint."""


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


def parse_request(
    body: Any, endpoint: str, prompt_format: PromptFormat, max_prompt_chars: int, bypass_header: bool
) -> ParsedRequest:
    """Validate a request body; raise :class:`RequestError` (400, 413, 422) naming the bad field."""
    context = {"prompt_format": prompt_format, "max_prompt_chars": max_prompt_chars, "bypass_header": bypass_header}
    try:
        request = REQUEST_MODELS[endpoint].model_validate(body, context=context)
    except ValidationError as error:  # every field refuses with a RequestError first; kept as a safety net
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise RequestError(422, f"`{param}`: {first['msg']}", param) from None
    return request.parsed(prompt_format, bypass_header)


class FeedbackRequest(BaseModel):
    """``POST /v1/feedback``: whether a served answer was right, or the right answer."""

    model_config = ConfigDict(extra="ignore")

    id: str
    """The response's id."""
    correct: bool | None = None
    gold: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _checked(cls, body: Any) -> Any:
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            raise RequestError(422, "feedback needs a string `id` (the response's id)", "id")
        correct, gold = body.get("correct"), body.get("gold")
        if correct is not None and not isinstance(correct, bool):
            raise RequestError(422, "`correct` must be a boolean", "correct")
        if gold is not None and not isinstance(gold, str):
            raise RequestError(422, "`gold` must be a string", "gold")
        if correct is None and gold is None:
            raise RequestError(422, "feedback needs `correct` (boolean) or `gold` (the right answer)")
        return body


class FeedbackResponse(BaseModel):
    """The arm a feedback was attached to, and whether the answer was right.

    Feedback kept for a request another replica served (answered 202) has no arm: the
    log readers join it to its request; ``correct`` is then the client's, if it said.
    """

    id: str
    arm: str | None
    """None: kept for a request this server did not log."""
    correct: bool | None


# --- responses -----------------------------------------------------------------------------------------------------


class TokenoptDecision(BaseModel):
    """The ``tokenopt`` field of every response: what the policy decided and what it cost."""

    policy_id: str
    arm: str
    action: str
    budget: int
    mode: str
    bypass: bool
    explored: bool
    """Served an action other than the policy's own pick (every action, with --explore 1)."""
    forced: bool
    billed_tokens: int
    answer: str


class Usage(BaseModel):
    """OpenAI's token usage."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    """One choice of a completions response."""

    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class AssistantMessage(BaseModel):
    """The message of a chat choice."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    """One choice of a chat response."""

    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    """A completions response."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    tokenopt: TokenoptDecision


class ChatCompletionResponse(BaseModel):
    """A chat completions response."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    tokenopt: TokenoptDecision


class DeltaMessage(BaseModel):
    """What a chat chunk adds: the role (first chunk), a piece of content, or nothing."""

    role: str | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _set_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class CompletionStreamChoice(BaseModel):
    """One choice of a streamed completions chunk."""

    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionStreamChoice(BaseModel):
    """One choice of a streamed chat chunk."""

    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None


class StreamChunk(BaseModel):
    """One server-sent event of a streamed response."""

    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionStreamChoice | ChatCompletionStreamChoice]


class FinalStreamChunk(StreamChunk):
    """The chunk with the finish reason, and the decision."""

    tokenopt: TokenoptDecision


class UsageStreamChunk(StreamChunk):
    """The last chunk before ``[DONE]`` when ``stream_options.include_usage`` is set."""

    usage: Usage


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tokenopt"


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
