"""One client for OpenAI-compatible completions servers (vLLM, TGI, llama.cpp's server, tokenopt serve).

Collection (:class:`tokenopt.lm.upstream.UpstreamLM`) and the proxy
(:class:`tokenopt.serve.backends.UpstreamBackend`) both reach their upstream through
:class:`OpenAIClient`, so the two agree on everything but what they ask:

- the base URL, with or without ``/v1``, is normalised to end in ``/v1``;
- every request carries ``X-Tokenopt-Bypass: 1`` (another ``tokenopt serve`` upstream
  then serves plain completions; other servers ignore the header) and, given a key,
  ``Authorization: Bearer <key>``;
- connection errors, timeouts, 429 and 5xx are retried with exponential backoff
  (``backoff_s``, then twice as long each time); any other 4xx fails at once, as a
  retry would get the same answer;
- a 200 must carry a completions body (``choices``: a non-empty list of objects with a
  ``text``), else the request fails with the reason;
- every failure is an :class:`UpstreamError` (the proxy answers it with 502);
- :class:`RequestStats` counts requests, retries and the tokens the server reports,
  read from ``usage`` by :func:`read_usage`, the one rule both callers bill by.

The callers choose the retry settings: collection retries 5 times from 0.5 s (a run
of hours rides out a server restart), the proxy twice from 0.2 s (a client is waiting
for the answer, within the server's own timeout).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import TracebackType
from typing import Any

__all__ = ["OpenAIClient", "RequestStats", "UpstreamError", "Usage", "read_usage"]

BYPASS_HEADER = "X-Tokenopt-Bypass"
"""Sent on every request: a tokenopt server upstream serves it as a plain completion."""


class UpstreamError(RuntimeError):
    """The upstream server is unreachable, failed past the retries, or answered something unusable."""


@dataclass
class RequestStats:
    """Work counters of one client: requests answered, retries, and tokens the server processed."""

    requests: int = 0
    """Requests answered with a valid completions body."""
    retries: int = 0
    """Requests retried after a connection error, a timeout, a 429 or a 5xx."""
    forward_tokens: int = 0
    """Prompt and completion tokens of every answered request (before any prefix caching)."""


@dataclass(frozen=True)
class Usage:
    """The tokens a completions response says it processed (0 where the server does not say)."""

    prompt_tokens: int
    completion_tokens: int


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def read_usage(data: dict[str, Any]) -> Usage:
    """The ``usage`` of a completions response; a missing or malformed count reads as 0."""
    usage = data.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    return Usage(_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")))


def _httpx() -> Any:
    try:
        import httpx
    except ImportError:
        raise ImportError("an OpenAI-compatible upstream needs httpx: pip install 'tokenopt[serve]'") from None
    return httpx


class OpenAIClient:
    """An OpenAI-compatible ``/v1/completions`` and ``/v1/models`` client with one retry policy.

    The HTTP connection pool opens on the first request and closes with :meth:`aclose`
    (or at the end of ``async with client:``); the next request opens a new one, so
    one client serves several event loops one after the other (collection runs one
    ``asyncio.run`` per mode).

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8001`` (``/v1`` optional).
        api_key: bearer token of the server (None: no ``Authorization`` header).
        retries: retries of a request after a connection error, a timeout, a 429 or a 5xx.
        backoff_s: the first retry's wait; each next one waits twice as long.
        timeout_s: seconds per request.
        max_connections: most requests in flight at once (None: httpx's pool limits
            and no queue in front of them).
        http_client: an ``httpx.AsyncClient`` to send with instead of one of this
            client's own (tests pass one with a transport); it is closed by :meth:`aclose`.

    Raises:
        ValueError: a negative retry count or backoff, a non-positive timeout or
            connection limit.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        retries: int,
        backoff_s: float,
        timeout_s: float,
        max_connections: int | None = None,
        http_client: Any = None,
    ) -> None:
        if retries < 0 or backoff_s < 0:
            raise ValueError(f"retries and backoff must be >= 0; got {retries} and {backoff_s}")
        if timeout_s <= 0:
            raise ValueError(f"the upstream timeout must be > 0 seconds; got {timeout_s}")
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"max_connections must be >= 1; got {max_connections}")
        base = url.rstrip("/")
        self.url = base if base.endswith("/v1") else f"{base}/v1"
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.headers = {BYPASS_HEADER: "1"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.stats = RequestStats()
        self._given = http_client
        self._http: Any = http_client
        self._slots: asyncio.Semaphore | None = None

    # -- the connection pool ----------------------------------------------------------

    def _open(self) -> Any:
        if self._http is None:
            httpx = _httpx()
            limits = httpx.Limits()
            if self.max_connections is not None:
                limits = httpx.Limits(
                    max_connections=self.max_connections, max_keepalive_connections=self.max_connections
                )
            self._http = httpx.AsyncClient(headers=self.headers, timeout=self.timeout_s, limits=limits)
        if self._slots is None and self.max_connections is not None:
            self._slots = asyncio.Semaphore(self.max_connections)
        return self._http

    async def aclose(self) -> None:
        """Close the connection pool (the next request opens a new one, unless it was given)."""
        http, self._http, self._slots = self._http, None, None
        if http is not None:
            await http.aclose()

    async def __aenter__(self) -> OpenAIClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- requests -------------------------------------------------------------------------

    def list_models(self) -> list[dict[str, Any]]:
        """The entries of ``/v1/models`` (``[]`` from a server without the route).

        One attempt, not retried: it runs when a run starts, where a server that is not
        up should fail the command at once with the fix rather than after the backoff.

        Raises:
            UpstreamError: the server cannot be reached or refuses the key.
        """
        httpx = _httpx()
        try:
            response = httpx.get(f"{self.url}/models", headers=self.headers, timeout=min(self.timeout_s, 30.0))
        except httpx.HTTPError as error:
            raise UpstreamError(
                f"cannot reach the upstream {self.url}: {type(error).__name__}: {error}; start the server "
                "(e.g. `vllm serve MODEL --port 8001 --enable-prefix-caching`) or fix --upstream"
            ) from None
        if response.status_code in (401, 403):
            raise UpstreamError(
                f"the upstream {self.url} refused the API key ({response.status_code}); "
                "set --upstream-api-key or TOKENOPT_UPSTREAM_API_KEY"
            )
        if response.status_code != 200:
            return []  # servers without /v1/models (tokenopt serve): the model name comes from --upstream-model
        try:
            data = response.json().get("data", [])
        except (ValueError, AttributeError):
            return []
        return [entry for entry in data if isinstance(entry, dict)] if isinstance(data, list) else []

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` (with its ``model``) to ``/v1/completions``; the validated response.

        Raises:
            UpstreamError: a 4xx other than 429, the retries ran out, or a 200 without a
                completions body.
        """
        httpx = _httpx()
        http = self._open()
        delay = self.backoff_s
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats.retries += 1
                await asyncio.sleep(delay)
                delay *= 2
            try:
                if self._slots is not None:
                    async with self._slots:
                        response = await http.post(f"{self.url}/completions", json=body, headers=self.headers)
                else:
                    response = await http.post(f"{self.url}/completions", json=body, headers=self.headers)
            except httpx.HTTPError as error:  # connection errors and timeouts
                problem = f"upstream {self.url} unreachable: {type(error).__name__}: {error}"
                continue
            if response.status_code == 200:
                data = self._validated(response)
                usage = read_usage(data)
                self.stats.requests += 1
                self.stats.forward_tokens += usage.prompt_tokens + usage.completion_tokens
                return data
            problem = f"upstream {self.url} answered {response.status_code}: {response.text[:300]!r}"
            if response.status_code != 429 and response.status_code < 500:
                raise UpstreamError(problem)
        raise UpstreamError(f"{problem} (after {self.retries} retries)")

    def _validated(self, response: Any) -> dict[str, Any]:
        """A 200's JSON body, if it is a completions body."""
        try:
            data = response.json()
        except ValueError:
            raise UpstreamError(
                f"upstream {self.url} answered 200 with malformed JSON: {response.text[:200]!r}"
            ) from None
        choices = data.get("choices") if isinstance(data, dict) else None
        if (
            not isinstance(choices, list)
            or not choices
            or not all(isinstance(choice, dict) and isinstance(choice.get("text"), str) for choice in choices)
        ):
            raise UpstreamError(
                f"upstream {self.url} answered 200 without a completions body (`choices`, a non-empty list of "
                f"objects with a `text`): {response.text[:200]!r}"
            )
        return data
