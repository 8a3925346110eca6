"""The serving layer: which arm, which action, how it is generated, streamed and logged.

:class:`ServerState` holds what the running server holds (arms, engine, log, metrics,
admission counters); :class:`OpenAIServing` serves a validated request on it: it
picks the arm, lets the policy decide (with exploration and its propensity), serves
the decision through the engine (the forced path, the probe controller's path, or
plain generation for a bypass), streams or answers, and logs the request exactly once.
Every failure becomes an HTTP status through one mapping, :func:`error_for`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tokenopt.decisions import DecisionLog, DecisionRecord
from tokenopt.runtime import BudgetPolicy, PolicyLoadError
from tokenopt.serve.backends import BackendError, Generation, LocalBackend, UpstreamBackend, UpstreamError
from tokenopt.serve.budget import SpendController, load_state, save_state
from tokenopt.serve.config import ServeConfig, resolve_prompt_format
from tokenopt.serve.engine import Backend, Engine, EngineInputError, as_engine
from tokenopt.serve.metrics import ServeMetrics
from tokenopt.serve.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    CompletionChoice,
    CompletionResponse,
    CompletionStreamChoice,
    DeltaMessage,
    FeedbackRequest,
    FeedbackResponse,
    FinalStreamChunk,
    ParsedRequest,
    RequestError,
    StreamChunk,
    TokenoptDecision,
    Usage,
    UsageStreamChunk,
    error_body,
)

__all__ = ["CLIENT_CLOSED", "Arm", "OpenAIServing", "ServerState", "error_for"]

logger = logging.getLogger(__name__)

CLIENT_CLOSED = 499
"""Status logged for a streamed request whose client left before the last event (nginx's convention)."""


def error_for(error: BaseException, timeout: float) -> RequestError:
    """The HTTP error a failure is answered with: the one status mapping of every path.

    A :class:`RequestError` stands; the server's timeout is 504; values the engine
    refuses are 413 (too long for the context) or 422; an upstream that fails is 502; a
    backend that fails is 500 with its message; anything else is a bug: 500, logged.
    """
    if isinstance(error, RequestError):
        return error
    if isinstance(error, asyncio.TimeoutError):
        return RequestError(504, f"the request took longer than the server's timeout of {timeout} s")
    if isinstance(error, EngineInputError):
        return RequestError(413 if "context" in str(error) else 422, str(error))
    if isinstance(error, UpstreamError):
        return RequestError(502, str(error))
    if isinstance(error, BackendError):
        return RequestError(500, str(error))
    logger.error("request failed", exc_info=error)
    return RequestError(500, f"internal error: {type(error).__name__}: {error}")


@dataclass
class Arm:
    """One policy being served (A, or B in an A/B test)."""

    name: str
    path: Path
    policy: BudgetPolicy
    rng: np.random.Generator
    controller: SpendController | None = None
    """The arm's spend controller when the server holds a budget (each arm has its own)."""

    @property
    def price(self) -> float | None:
        """The lambda the policy decides at: the controller's, else a price-conditioned policy's default.

        None for a policy trained for one lambda (it takes no price).
        """
        if self.controller is not None:
            return self.controller.cost_weight
        return self.policy.cost_weight

    def logged_cost_weight(self, price: float | None) -> float | None:
        """What the decision log records as the request's lambda: the price decided at, else the trained one."""
        if price is not None:
            return price
        trained = self.policy.spec.get("metadata", {})
        weight = trained.get("cost_weight") if isinstance(trained, dict) else None
        return float(weight) if isinstance(weight, int | float) and not isinstance(weight, bool) else None

    def describe(self) -> dict[str, object]:
        """What a reader of the decision log needs to interpret this arm's rows."""
        return {
            "policy_id": self.policy.policy_id,
            "path": str(self.path),
            "actions": [str(a["name"]) for a in self.policy.actions],
            "feature_spec": self.policy.spec.get("feature_spec"),
            "extra_inputs": self.policy.extra_inputs,
        }


def _check_hidden_fits(arms: dict[str, Arm], backend: Backend) -> None:
    """Refuse an ``lm-hidden`` arm whose recorded hidden state (size, layer) the served LM does not have.

    Only the hidden size and the layer range can be checked: another model of the same
    width would pass, so the message of a mismatch names the model the policy was fitted on.
    """
    lm = getattr(backend, "lm", None)
    if lm is None or not hasattr(lm, "hidden_size"):
        return
    for arm in arms.values():
        source = getattr(arm.policy.features, "source", None)
        if not arm.policy.features.needs_hidden or source is None:
            continue
        if lm.hidden_size != source.size or not 0 <= source.layer <= lm.num_layers:
            raise PolicyLoadError(
                f"{arm.path}: this policy reads layer {source.layer} of a hidden state of size {source.size} "
                f"(fitted on {source.model!r}); the served LM {getattr(lm, 'name', '?')!r} has hidden size "
                f"{lm.hidden_size} and {lm.num_layers} layers: serve it with the model its table was collected with"
            )


def _load_policy(path: Path, upstream: bool) -> BudgetPolicy:
    policy = BudgetPolicy.load(path)
    if policy.features.needs_hidden and upstream:
        raise PolicyLoadError(
            f"{path}: this policy's features ({policy.features.name}) need the LM's hidden state at prefill, which "
            "an --upstream server cannot return (the OpenAI API gives text and log-probabilities only): serve it "
            "with --model (the model its table was collected with), or train a prompt-text policy for the upstream"
        )
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


def _stable_fraction(key: str) -> float:
    """A number in [0, 1) that depends only on the key (the same in every process)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass
class ServerState:
    """What the running server holds: arms, backend, log, metrics, admission counters."""

    config: ServeConfig
    backend: LocalBackend | UpstreamBackend | Engine | None = None
    """The backend as given or built (None until it is loaded in the background)."""
    engine: Engine | None = None
    """The backend as the serving layer calls it."""
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

    def __post_init__(self) -> None:
        if self.backend is not None:
            self.attach(self.backend)

    def attach(self, backend: Backend) -> None:
        """Serve through this backend.

        Raises:
            PolicyLoadError: an ``lm-hidden`` policy whose hidden state this backend's LM cannot give.
        """
        _check_hidden_fits(self.arms, backend)
        self.backend = backend
        self.engine = as_engine(backend)

    def load_arms(self) -> dict[str, Arm]:
        """Load every arm's policy; raises :class:`PolicyLoadError` naming the file."""
        paths = {"A": self.config.policy}
        if self.config.policy_b is not None:
            paths["B"] = self.config.policy_b
        arms = {}
        target = self.config.spend_target()
        for index, (name, path) in enumerate(paths.items()):
            policy = _load_policy(Path(path), upstream=bool(self.config.upstream))
            if target is not None and policy.cost_weight_range is None:
                given = (
                    f"--token-budget {self.config.token_budget}"
                    if target.kind == "rate"
                    else (f"--target-mean-tokens {self.config.target_mean_tokens:g}")
                )
                raise PolicyLoadError(
                    f"{path}: {given} needs a price-conditioned policy (one that decides at any cost weight), and "
                    "this one was trained for one cost weight: train it with `tokenopt train --cost-weight-range "
                    "LOW:HIGH`, or serve without a budget"
                )
            arms[name] = Arm(name, Path(path), policy, np.random.default_rng([self.config.seed, index]))
        if len(arms) == 2:
            actions = [arm.describe()["actions"] for arm in arms.values()]
            if actions[0] != actions[1]:
                logger.warning("arms A and B have different action tables; the A/B report compares them as served")
        return arms

    def attach_controllers(self, arms: dict[str, Arm]) -> None:
        """Give each arm its own spend controller, holding the arm's share of the target.

        A rate is split between the arms by the share of users each is sent (A: 1 -
        split, B: split); a mean per request holds for both. The starting lambda is the
        arm's controller already running (a reload keeps it), else the one saved in the
        state file, else the policy's default; it is clipped into the policy's range.

        Raises:
            PolicyLoadError: the state file cannot be read.
        """
        target = self.config.spend_target()
        if target is None:
            return
        try:
            saved = load_state(self.config.budget_state_path())
        except ValueError as error:
            raise PolicyLoadError(str(error)) from None
        settings = self.config.control_settings()
        for name, arm in arms.items():
            assert arm.policy.cost_weight_range is not None and arm.policy.cost_weight is not None
            running = self.arms.get(name)
            if running is not None and running.controller is not None:
                running.controller.set_bounds(arm.policy.cost_weight_range)
                arm.controller = running.controller
                continue
            share = 1.0 if len(arms) == 1 else self.config.split if name == "B" else 1.0 - self.config.split
            start = saved.get(name, arm.policy.cost_weight)
            arm.controller = SpendController(
                target.share(share) if share > 0 else target, arm.policy.cost_weight_range, start, settings
            )
            if name in saved:
                logger.info("arm %s resumes at cost weight %.6g (%s)", name, start, self.config.budget_state_path())
            self.metrics.watch_budget(name, arm.controller)

    def save_budget_state(self) -> None:
        """Write every arm's lambda to the state file (atomically); nothing without a budget.

        Raises:
            OSError: the file cannot be written.
        """
        controllers = {name: arm.controller for name, arm in self.arms.items() if arm.controller is not None}
        if controllers:
            policy_ids = {name: arm.policy.policy_id for name, arm in self.arms.items()}
            save_state(self.config.budget_state_path(), controllers, policy_ids)

    def reload(self) -> dict[str, str]:
        """Swap in freshly loaded policies; requests in flight finish with the old ones."""
        try:
            arms = self.load_arms()
            if self.backend is not None:
                _check_hidden_fits(arms, self.backend)
            # The served prompt format stays: a policy collected with another one is refused.
            resolve_prompt_format(self.config, [arm.policy for arm in arms.values()])
            self.attach_controllers(arms)  # last: a running controller keeps its lambda, within the new range
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


@dataclass
class _Decision:
    """The action the policy chose for a request, and what it changes."""

    index: int
    propensity: float
    budget: int
    mode: str
    answer_cap: int | None


class _ClosingStreamingResponse(StreamingResponse):
    """A streaming response that calls ``on_close`` once it ends, however it ends.

    A client that disconnects can stop the stream before its generator runs, or in the
    middle; the decision is logged in ``on_close`` either way, exactly once.
    """

    def __init__(self, content: Any, on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            # A client gone while the request was decoded gets nothing: writing to its closed
            # connection would look like a stream read to the end.
            if not await _client_left(receive):
                await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _client_left(receive: Any) -> bool:
    """Whether the ASGI server has already reported the client's disconnect (without waiting for one)."""
    try:
        message = await asyncio.wait_for(receive(), timeout=0.001)
    except asyncio.TimeoutError:
        return False
    return bool(message.get("type") == "http.disconnect")


def _fill(record: DecisionRecord, generation: Generation) -> None:
    record.prompt_tokens = generation.prompt_tokens
    record.reasoning_tokens = generation.reasoning_tokens
    record.answer_tokens = generation.answer_tokens
    record.billed_tokens = generation.billed_tokens
    record.forced = generation.forced
    record.answer = generation.answer


def _usage(generation: Generation) -> Usage:
    return Usage(
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.billed_tokens,
        total_tokens=generation.prompt_tokens + generation.billed_tokens,
    )


def _event(chunk: StreamChunk) -> str:
    return f"data: {json.dumps(chunk.model_dump())}\n\n"


class _Events:
    """Server-sent events in OpenAI's chunk format for one response."""

    def __init__(self, endpoint: str, request_id: str, model: str) -> None:
        self.endpoint = endpoint
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self.kind = "text_completion" if endpoint == "completions" else "chat.completion.chunk"

    def _choice(
        self, piece: str | None, finish: str | None, first: bool = False
    ) -> CompletionStreamChoice | ChatCompletionStreamChoice:
        if self.endpoint == "completions":
            return CompletionStreamChoice(text=piece or "", finish_reason=finish)
        delta = DeltaMessage(role="assistant" if first else None, content=piece or None)
        return ChatCompletionStreamChoice(delta=delta, finish_reason=finish)

    def _head(self) -> dict[str, Any]:
        return {"id": self.request_id, "object": self.kind, "created": self.created, "model": self.model}

    def chunk(self, piece: str | None, finish: str | None, first: bool = False) -> str:
        """One chunk: a piece of text, or (with ``first``) the chat role."""
        return _event(StreamChunk(**self._head(), choices=[self._choice(piece, finish, first)]))

    async def ending(
        self, generation: Generation, usage: Usage, decision: TokenoptDecision, include_usage: bool
    ) -> AsyncIterator[str]:
        """The finish reason with the ``tokenopt`` decision, the usage if asked, and ``[DONE]``."""
        choice = self._choice(None, generation.finish_reason)
        yield _event(FinalStreamChunk(**self._head(), choices=[choice], tokenopt=decision))
        if include_usage:
            yield _event(UsageStreamChunk(**self._head(), choices=[], usage=usage))
        yield "data: [DONE]\n\n"

    async def whole(
        self, generation: Generation, usage: Usage, decision: TokenoptDecision, include_usage: bool
    ) -> AsyncIterator[str]:
        """A response decoded before streaming (votes, beams, probes, upstream): one chunk per token."""
        yield self.chunk(None, None, first=True)
        for piece in generation.pieces:
            yield self.chunk(piece, None)
        async for event in self.ending(generation, usage, decision, include_usage):
            yield event


def _token_logprobs(engine: Engine, result: Any) -> dict[str, Any] | None:
    """OpenAI's completions ``logprobs`` object for a plain generation (local LM only).

    The tokens are each generated token decoded alone; their concatenation is the text
    (up to a stop string). ``top_logprobs`` is not computed (null).
    """
    if len(result.token_logprobs) != len(result.token_ids):
        return None
    tokens = engine.token_texts(list(result.token_ids))
    if tokens is None:
        return None
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


class _Admission:
    """One admitted request's place in the queue, given back exactly once."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.released = False
        state.admitted += 1
        state.metrics.in_flight.inc()

    def release(self) -> None:
        """Give the place back (later calls do nothing)."""
        if not self.released:
            self.released = True
            self.state.admitted -= 1
            self.state.metrics.in_flight.dec()


class OpenAIServing:
    """Serves validated requests on a :class:`ServerState`."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    @property
    def config(self) -> ServeConfig:
        """The server's settings (prompt fields resolved)."""
        return self.state.config

    @property
    def engine(self) -> Engine:
        """The engine (only called once the server is ready)."""
        assert self.state.engine is not None
        return self.state.engine

    # --- errors ----------------------------------------------------------------------------------------------------

    def error_response(self, error: RequestError) -> JSONResponse:
        """An OpenAI-shaped error response, counted in ``/metrics``."""
        self.state.metrics.errors.labels(kind=str(error.status)).inc()
        return JSONResponse(error_body(error.status, error.message, error.param), error.status, headers=error.headers)

    def not_ready(self) -> RequestError:
        """Why the server cannot serve yet: the model is loading, or failed to load."""
        if self.state.load_error is not None:
            return RequestError(503, f"the model could not be loaded: {self.state.load_error}")
        return RequestError(503, "the server is still loading its model; retry shortly", headers={"Retry-After": "5"})

    def refuse(self, error: RequestError, endpoint: str) -> JSONResponse:
        """Answer a request refused before it was admitted (no arm yet)."""
        self.state.metrics.requests.labels(arm="none", endpoint=endpoint, status=str(error.status)).inc()
        return self.error_response(error)

    # --- completions -----------------------------------------------------------------------------------------------

    async def create_completion(self, parsed: ParsedRequest, user_header: str | None, started: float) -> Response:
        """Serve a completions or chat request: admit it, decide, generate, answer or stream, log."""
        state, config = self.state, self.config
        if state.admitted >= config.max_concurrency + config.max_queue:
            error = RequestError(429, "the server is at capacity; retry after a second", headers={"Retry-After": "1"})
            return self.refuse(error, parsed.endpoint)
        admission = _Admission(state)
        request_id = ("cmpl-" if parsed.endpoint == "completions" else "chatcmpl-") + uuid.uuid4().hex[:24]
        user_key = user_header or parsed.user or request_id
        arm = state.arm_for(user_key)
        holder: dict[str, Any] = {}
        tokens: asyncio.Queue[int] = asyncio.Queue()
        on_token = None
        if parsed.stream and self.engine.streams_tokens:
            loop = asyncio.get_running_loop()

            def on_token(token: int) -> None:  # called on the LM's worker thread
                loop.call_soon_threadsafe(tokens.put_nowait, token)

        assert state.semaphore is not None
        semaphore = state.semaphore

        async def admitted() -> tuple[Generation, DecisionRecord]:
            async with semaphore:
                return await self._serve_one(parsed, arm, request_id, user_key, holder, on_token)

        task = asyncio.ensure_future(asyncio.wait_for(admitted(), config.timeout))
        if on_token is None:
            try:
                generation, record = await task
            except Exception as error:  # RequestError, timeout, or a bug (500, logged)
                return self._failed(error, arm, parsed.endpoint, holder, started)
            finally:
                admission.release()
            decision = await self._succeeded(generation, record, arm, parsed.endpoint, started, log=not parsed.stream)
            return self._respond(parsed, request_id, arm, generation, record, decision, holder, started)
        # Live streaming: answer once the first token (or the outcome) is known, so that an
        # error before any token still gets its status code.
        getter = asyncio.ensure_future(tokens.get())
        await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
        if task.done() and task.exception() is not None:
            getter.cancel()
            admission.release()
            return self._failed(task.exception(), arm, parsed.endpoint, holder, started)  # type: ignore[arg-type]
        record = holder["record"]
        return _ClosingStreamingResponse(
            self._live_events(parsed, request_id, arm, task, getter, tokens, holder, started, admission.release),
            on_close=lambda: self._log_stream_end(holder, started, admission.release, task),
            media_type="text/event-stream",
            headers=self._decision_headers(request_id, arm, record),
        )

    def _log_stream_end(
        self,
        holder: dict[str, Any],
        started: float,
        release: Callable[[], None] | None = None,
        task: asyncio.Future[Any] | None = None,
    ) -> None:
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
            labels = {"arm": record.arm, "endpoint": record.endpoint, "status": str(CLIENT_CLOSED)}
            self.state.metrics.requests.labels(**labels).inc()
        assert self.state.log is not None
        self.state.log.append(record, record.checkpoints)

    def _failed(
        self, error: BaseException, arm: Arm, endpoint: str, holder: dict[str, Any], started: float
    ) -> JSONResponse:
        """Answer a failed request with its status, and log it once."""
        refusal = error_for(error, self.config.timeout)
        self.state.metrics.requests.labels(arm=arm.name, endpoint=endpoint, status=str(refusal.status)).inc()
        if "record" in holder and not holder.get("logged"):
            holder["logged"] = True
            record = holder["record"]
            record.status, record.latency_ms = refusal.status, (time.perf_counter() - started) * 1000.0
            assert self.state.log is not None
            self.state.log.append(record)
        return self.error_response(refusal)

    async def _succeeded(
        self, generation: Generation, record: DecisionRecord, arm: Arm, endpoint: str, started: float, log: bool = True
    ) -> TokenoptDecision:
        """Count a served request (and log it, unless a stream logs it when it ends); return its decision."""
        metrics = self.state.metrics
        elapsed = time.perf_counter() - started
        record.latency_ms = elapsed * 1000.0
        if arm.controller is not None and arm.controller.observe(generation.billed_tokens):
            try:  # lambda moved: keep it across a restart
                await asyncio.to_thread(self.state.save_budget_state)
            except OSError as error:  # the request was served; a state file that cannot be written is not its fault
                logger.error("could not save the budget state to %s: %s", self.config.budget_state_path(), error)
        if log:
            assert self.state.log is not None
            await asyncio.to_thread(self.state.log.append, record, record.checkpoints)
        metrics.requests.labels(arm=arm.name, endpoint=endpoint, status="200").inc()
        metrics.latency.labels(arm=arm.name, endpoint=endpoint).observe(elapsed)
        metrics.tokens.labels(arm=arm.name, kind="reasoning").inc(generation.reasoning_tokens)
        metrics.tokens.labels(arm=arm.name, kind="answer").inc(generation.answer_tokens)
        budget_label = "bypass" if record.bypass else str(record.budget)  # client max_tokens: unbounded values
        metrics.decisions.labels(arm=arm.name, budget=budget_label, mode=record.mode).inc()
        return TokenoptDecision(
            policy_id=record.policy_id,
            arm=arm.name,
            action=record.action,
            budget=record.budget,
            mode=record.mode,
            bypass=record.bypass,
            # Served an action other than the policy's own pick (every action, with --explore 1).
            explored=bool(
                record.propensity < 1.0
                and record.propensity <= self.config.explore / max(len(arm.policy.actions), 1) + 1e-12
            ),
            forced=generation.forced,
            billed_tokens=generation.billed_tokens,
            answer=generation.answer,
        )

    @staticmethod
    def _decision_headers(request_id: str, arm: Arm, record: DecisionRecord) -> dict[str, str]:
        return {
            "X-Request-Id": request_id,
            "X-Tokenopt-Decision": f"arm={arm.name}; policy={record.policy_id}; action={record.action}; "
            f"budget={record.budget}; mode={record.mode}",
        }

    def _respond(
        self,
        parsed: ParsedRequest,
        request_id: str,
        arm: Arm,
        generation: Generation,
        record: DecisionRecord,
        decision: TokenoptDecision,
        holder: dict[str, Any],
        started: float,
    ) -> Response:
        headers = self._decision_headers(request_id, arm, record)
        events = _Events(parsed.endpoint, request_id, parsed.model or self.engine.name)
        if parsed.stream:

            async def whole() -> AsyncIterator[str]:
                async for event in events.whole(generation, _usage(generation), decision, parsed.include_usage):
                    yield event
                holder["completed"] = True

            return _ClosingStreamingResponse(
                whole(),
                on_close=lambda: self._log_stream_end(holder, started),
                media_type="text/event-stream",
                headers=headers,
            )
        served = generation.choices or [(generation.text, generation.finish_reason, generation.token_logprobs)]
        usage, created = _usage(generation), events.created
        body: CompletionResponse | ChatCompletionResponse
        if parsed.endpoint == "completions":
            choices = [
                CompletionChoice(index=i, text=text, logprobs=logprobs, finish_reason=finish)
                for i, (text, finish, logprobs) in enumerate(served)
            ]
            body = CompletionResponse(
                id=request_id, created=created, model=events.model, choices=choices, usage=usage, tokenopt=decision
            )
        else:
            messages = [
                ChatCompletionChoice(index=i, message=AssistantMessage(content=text), finish_reason=finish)
                for i, (text, finish, _) in enumerate(served)
            ]
            body = ChatCompletionResponse(
                id=request_id, created=created, model=events.model, choices=messages, usage=usage, tokenopt=decision
            )
        return JSONResponse(body.model_dump(), headers=headers)

    async def _live_events(
        self,
        parsed: ParsedRequest,
        request_id: str,
        arm: Arm,
        task: asyncio.Future[tuple[Generation, DecisionRecord]],
        getter: asyncio.Future[int],
        tokens: asyncio.Queue[int],
        holder: dict[str, Any],
        started: float,
        release: Callable[[], None],
    ) -> AsyncIterator[str]:
        """Chunks as the LM chooses the tokens, then the decision and the usage."""
        events = _Events(parsed.endpoint, request_id, parsed.model or self.engine.name)
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
                    text = self.engine.decode(ids)
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
                response = self._failed(error, arm, parsed.endpoint, holder, started)
                yield f"data: {bytes(response.body).decode()}\n\n"
                yield "data: [DONE]\n\n"
                return
            generation, record = task.result()
            if not sent:  # decoded as a whole (a vote, a beam, a probe controller): a chunk per token
                for piece in generation.pieces:
                    yield events.chunk(piece, None)
            elif generation.text.startswith(sent) and len(generation.text) > len(sent):
                yield events.chunk(generation.text[len(sent) :], None)
            decision = await self._succeeded(generation, record, arm, parsed.endpoint, started, log=False)
            async for event in events.ending(generation, _usage(generation), decision, parsed.include_usage):
                yield event
            holder["completed"] = True
        finally:
            getter.cancel()
            if not task.done():
                task.cancel()
            release()

    # --- the three paths -------------------------------------------------------------------------------------------

    async def _serve_one(
        self,
        parsed: ParsedRequest,
        arm: Arm,
        request_id: str,
        user_key: str,
        holder: dict[str, Any],
        on_token: Callable[[int], None] | None = None,
    ) -> tuple[Generation, DecisionRecord]:
        policy = arm.policy
        tick = time.perf_counter()
        hidden = None
        if policy.features.needs_hidden:
            # lm-hidden: the LM's own prefill of the prompt, computed before the decision (and logged with it).
            assert policy.features.source is not None
            hidden = await self.engine.prompt_hidden(parsed.prompt, policy.features.source.layer)
        features = policy.features(parsed.prompt, hidden).astype(np.float32)
        price = arm.price  # read once: the lambda decided at is the one logged
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
            prompt=parsed.raw_prompt if self.config.log_prompts else None,
            created=time.time(),
            cost_weight=arm.logged_cost_weight(price),
        )
        holder["record"] = record
        if parsed.bypass:
            return await self._serve_plain(parsed, record, seed)
        if policy.probe is not None:
            return await self._serve_probe(parsed, arm, record, seed, tick)
        decision = self._decide(parsed, arm, features, price)
        record.propensity = decision.propensity
        record.policy_ms = (time.perf_counter() - tick) * 1000.0
        self.state.metrics.policy_latency.labels(arm=arm.name).observe(record.policy_ms / 1000.0)
        action = policy.actions[decision.index]
        record.action, record.action_index = str(action["name"]), decision.index
        record.budget, record.mode = decision.budget, decision.mode
        generation = await self.engine.generate(
            parsed.prompt,
            decision.budget,
            decision.mode,
            seed=seed,
            answer_cap=decision.answer_cap,
            on_token=on_token if decision.mode == "greedy" else None,
        )
        record.mode = generation.mode
        _fill(record, generation)
        return generation, record

    def _decide(self, parsed: ParsedRequest, arm: Arm, features: np.ndarray, price: float | None) -> _Decision:
        """The policy's action (or, with ``explore``, a uniformly random one), its propensity, and its budget.

        A price-conditioned policy decides at ``price`` (the arm's current lambda), as
        ``decide(prompt, cost_weight=price)`` does. A client ``max_tokens`` below the
        action's budget plus the answer's room lowers the budget and caps the answer so
        that the whole response fits in it.
        """
        policy, explore = arm.policy, self.config.explore
        # The runtime's own rule: the price appended and, where do no harm fell back at that price, the fixed action.
        probabilities = policy.decision_probabilities(features.astype(np.float64)[None, :], price)[0]
        greedy_index = int(np.argmax(probabilities))
        index = greedy_index
        if explore > 0 and arm.rng.random() < explore:
            index = int(arm.rng.integers(len(policy.actions)))
        share = explore / len(policy.actions)
        propensity = (1.0 - explore) * float(index == greedy_index) + share
        action = policy.actions[index]
        budget, mode = int(action["budget"]), str(action["mode"])  # type: ignore[call-overload]
        answer_cap = None
        room = int(self.engine.answer_room)
        if parsed.max_tokens is not None and parsed.max_tokens < budget + room:
            cue = room - int(self.engine.max_answer_tokens)
            if parsed.max_tokens <= cue:
                raise RequestError(
                    422,
                    f"`max_tokens` {parsed.max_tokens} leaves no room for the answer cue and an answer "
                    f"(at least {cue + 1}); raise it, or set tokenopt.bypass for plain generation",
                    "max_tokens",
                )
            budget = max(0, parsed.max_tokens - room)
            answer_cap = parsed.max_tokens - budget - cue
        return _Decision(index, propensity, budget, mode, answer_cap)

    async def _serve_probe(
        self, parsed: ParsedRequest, arm: Arm, record: DecisionRecord, seed: int, tick: float
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
        room = int(self.engine.answer_room)
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
            generation = await self.engine.generate(parsed.prompt, budget, settings.mode, seed=seed)
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
            generation = await self.engine.generate(parsed.prompt, budget, served_mode, seed=seed)
            # The escalated mode reasoned afresh from the prompt: its whole bill comes on top.
            generation.billed_tokens += reasoned + int(probe_tokens)
        else:
            generation.billed_tokens = generation.reasoning_tokens + int(probe_tokens)
            generation.answer_tokens = int(probe_tokens)
        record.action = f"probe/b{budget}/{served_mode}"
        record.action_index, record.budget, record.mode = len(checkpoints) - 1, budget, served_mode
        record.policy_ms = policy_ms
        record.checkpoints = checkpoints
        self.state.metrics.policy_latency.labels(arm=arm.name).observe(policy_ms / 1000.0)
        _fill(record, generation)
        return generation, record

    async def _serve_plain(
        self, parsed: ParsedRequest, record: DecisionRecord, seed: int
    ) -> tuple[Generation, DecisionRecord]:
        """Plain generation for a client that bypasses the policy."""
        engine = self.engine
        max_tokens = parsed.max_tokens or self.config.default_max_tokens
        temperature = 0.0 if parsed.temperature is None else parsed.temperature
        record.policy_id, record.budget = "bypass", max_tokens
        results = await engine.generate_plain(parsed.raw_prompt, max_tokens, parsed.n, temperature, seed, parsed.stop)
        prompt_tokens, result = results[0]
        cue = engine.answer_cue
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
            token_logprobs=_token_logprobs(engine, result) if parsed.logprobs is not None else None,
        )
        if len(results) > 1:
            generation.billed_tokens = generation.reasoning_tokens = sum(len(r.token_ids) for _, r in results)
            generation.choices = [
                (r.text, r.finish_reason, _token_logprobs(engine, r) if parsed.logprobs is not None else None)
                for _, r in results
            ]
        record.mode = "greedy" if temperature == 0 else "sample"
        _fill(record, generation)
        return generation, record

    # --- feedback --------------------------------------------------------------------------------------------------

    async def feedback(self, request: FeedbackRequest) -> FeedbackResponse:
        """Attach a client's feedback to the logged request it is about.

        With ``--keep-unmatched-feedback``, feedback for an id this server did not log is
        kept in its log for the readers to join (another replica served the request).

        Raises:
            RequestError: 404 when no logged request has the id and unmatched feedback is not kept.
        """
        assert self.state.log is not None
        attached = await asyncio.to_thread(self.state.log.attach_feedback, request.id, request.correct, request.gold)
        if attached is None and self.state.config.keep_unmatched_feedback:
            await asyncio.to_thread(self.state.log.keep_feedback, request.id, request.correct, request.gold)
            return FeedbackResponse(id=request.id, arm=None, correct=request.correct)
        if attached is None:
            raise RequestError(
                404,
                f"no logged request has id {request.id!r} (behind a load balancer, start every replica with "
                "--keep-unmatched-feedback)",
                "id",
            )
        arm_name, is_correct = attached
        self.state.metrics.record_feedback(arm_name, is_correct)
        return FeedbackResponse(id=request.id, arm=arm_name, correct=is_correct)
