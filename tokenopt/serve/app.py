"""The OpenAI-compatible server: the policy sets each request's budget and mode.

``create_app(config)`` builds a FastAPI app with

- ``POST /v1/completions`` and ``POST /v1/chat/completions`` (OpenAI request and
  response shapes, ``usage`` included, ``stream: true`` as server-sent events);
- ``POST /v1/feedback`` (``{"id": ..., "correct": true}`` or ``{"id": ..., "gold": ...}``);
- ``GET /metrics`` (Prometheus), ``GET /healthz``, ``GET /readyz``;
- ``POST /admin/reload`` (and SIGHUP) to reload the policies without dropping requests.

Every response says what was decided in a ``tokenopt`` field and in the
``X-Tokenopt-Decision`` header; every decided request is appended to the decision log.

The routes here are thin, as in vLLM's ``entrypoints/openai/api_server.py``: they check
the key, validate the body with :mod:`tokenopt.serve.protocol`, and hand the request to
:mod:`tokenopt.serve.serving`, which calls the model through the
:class:`~tokenopt.serve.engine.Engine` interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenopt.decisions import DecisionLog
from tokenopt.runtime import PolicyLoadError
from tokenopt.serve.config import ServeConfig, resolve_prompt_format
from tokenopt.serve.engine import Backend, build_backend
from tokenopt.serve.protocol import (
    FeedbackRequest,
    ModelCard,
    ModelList,
    RequestError,
    decode_body,
    error_body,
    parse_request,
)
from tokenopt.serve.serving import OpenAIServing, ServerState

__all__ = ["RequestError", "ServeConfig", "ServerState", "build_backend", "create_app", "resolve_prompt_format"]

logger = logging.getLogger(__name__)


def create_app(config: ServeConfig, backend: Backend | None = None, load_in_background: bool = False) -> FastAPI:
    """Build the FastAPI app (uvicorn runs it; tests run it on loopback too).

    The policies are loaded and validated here, so a broken one stops start-up.

    Args:
        config: the server's settings.
        backend: the generation backend (a :class:`~tokenopt.serve.backends.LocalBackend`,
            an :class:`~tokenopt.serve.backends.UpstreamBackend`, or any
            :class:`~tokenopt.serve.engine.Engine`); None builds it from the config (the
            local LM or the upstream).
        load_in_background: build that backend (load the model) after the server has
            started listening: ``/readyz`` answers 503 until it is loaded, and
            completions 503 with the reason.

    Raises:
        PolicyLoadError: a policy fails its hash, version or shape checks.
    """
    state = ServerState(config=config, backend=backend)
    arms = state.load_arms()
    state.attach_controllers(arms)
    state.arms = arms
    state.save_budget_state()  # a state path that cannot be written stops start-up, not a request later
    if state.backend is not None:
        state.attach(state.backend)  # again, now that the arms are known: their hidden-state needs are checked
    config = state.config = resolve_prompt_format(config, [arm.policy for arm in state.arms.values()])
    state.log = DecisionLog(config.log, {name: arm.describe() for name, arm in state.arms.items()})
    if state.backend is None and not load_in_background:
        state.attach(build_backend(config))
    serving = OpenAIServing(state)
    prompt_format = config.prompt_format()

    async def load_backend() -> None:
        try:
            built = await asyncio.to_thread(build_backend, config)
            state.attach(built)
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
            try:
                state.save_budget_state()
            except OSError as error:
                logger.error("could not save the budget state: %s", error)
            if state.engine is not None:
                await state.engine.aclose()
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
        return JSONResponse(error_body(status, message), status, headers=error.headers)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> Response:
        # The last resort: still OpenAI-shaped JSON, still counted in /metrics, and logged with its traceback.
        logger.error("unexpected error on %s %s", request.method, request.url.path, exc_info=error)
        state.metrics.errors.labels(kind="500").inc()
        return JSONResponse(error_body(500, f"internal error: {type(error).__name__}"), 500)

    if config.api_key:
        # FastAPI's API pages answer only with the key, as every other route does.
        @app.get("/openapi.json", include_in_schema=False)
        async def get_openapi(request: Request) -> Response:
            try:
                check_key(request)
            except RequestError as error:
                return serving.error_response(error)
            return JSONResponse(app.openapi())

        @app.get("/docs", include_in_schema=False)
        async def get_docs(request: Request) -> Response:
            try:
                check_key(request)
            except RequestError as error:
                return serving.error_response(error)
            return get_swagger_ui_html(openapi_url="/openapi.json", title="tokenopt")

        @app.get("/redoc", include_in_schema=False)
        async def get_redoc(request: Request) -> Response:
            try:
                check_key(request)
            except RequestError as error:
                return serving.error_response(error)
            return get_redoc_html(openapi_url="/openapi.json", title="tokenopt")

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
        return decode_body(await request.body(), config.max_body_bytes)

    async def completions(request: Request, endpoint: str) -> Response:
        started = time.perf_counter()
        try:
            check_key(request)
            if not state.ready:
                raise serving.not_ready()
            body = await read_json(request)
            bypass_header = request.headers.get("x-tokenopt-bypass", "").lower() in {"1", "true", "yes"}
            parsed = parse_request(body, endpoint, prompt_format, config.max_prompt_chars, bypass_header)
        except RequestError as error:
            return serving.refuse(error, endpoint)
        return await serving.create_completion(parsed, request.headers.get("x-tokenopt-user"), started)

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
            feedback = FeedbackRequest.model_validate(await read_json(request))
            response = await serving.feedback(feedback)
        except RequestError as error:
            return serving.error_response(error)
        # 202: kept for a request another replica served, joined when the logs are read together.
        return JSONResponse(response.model_dump(), status_code=202 if response.arm is None else 200)

    @app.get("/metrics")
    async def get_metrics(request: Request) -> Response:
        try:
            check_key(request)
        except RequestError as error:
            return serving.error_response(error)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def get_models(request: Request) -> Response:
        # Many OpenAI clients and UIs list the models first.
        try:
            check_key(request)
        except RequestError as error:
            return serving.error_response(error)
        if not state.ready:
            return serving.error_response(serving.not_ready())
        models = ModelList(data=[ModelCard(id=serving.engine.name, created=state.started)])
        return JSONResponse(models.model_dump())

    @app.get("/healthz")
    async def get_healthz() -> Response:
        return PlainTextResponse("ok")

    @app.get("/readyz")
    async def get_readyz() -> Response:
        policies = {name: arm.policy.policy_id for name, arm in state.arms.items()}
        status = 200 if state.ready else 503
        backend = None if state.engine is None else state.engine.name
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
            return serving.error_response(error)
        return JSONResponse({"reloaded": True, "policies": policies})

    return app
