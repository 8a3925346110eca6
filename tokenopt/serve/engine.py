"""What the serving layer needs from a backend, as a typed interface.

:class:`Engine` is everything :mod:`tokenopt.serve.serving` calls: generation with
budget forcing, plain generation, whether tokens stream as they are chosen, the room
an answer takes, and closing. The two backends of :mod:`tokenopt.serve.backends` are
served through thin adapters that declare what each one can do, so the serving layer
never asks a backend what it has.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from tokenopt.serve.backends import Generation, LocalBackend, UpstreamBackend

if TYPE_CHECKING:
    from tokenopt.serve.config import ServeConfig

__all__ = ["Engine", "EngineInputError", "LocalEngine", "UpstreamEngine", "as_engine", "build_backend"]


class EngineInputError(ValueError):
    """The engine refused a request's values: too long for the context, or a mode it cannot serve."""


class Engine(Protocol):
    """The generation engine behind the server."""

    name: str
    """The model name responses carry."""
    answer_cue: str
    """The text that makes the LM answer."""
    max_answer_tokens: int
    """Most tokens an answer may have."""
    streams_tokens: bool
    """Whether greedy generations report their tokens as the LM chooses them (``on_token``)."""
    provides_hidden: bool
    """Whether :meth:`prompt_hidden` works (the LM runs here), as ``lm-hidden`` policies need."""

    @property
    def answer_room(self) -> int:
        """Tokens the cue and the longest answer take after the reasoning."""
        ...

    def decode(self, token_ids: list[int]) -> str:
        """The text of some generated tokens (streaming engines only)."""
        ...

    def token_texts(self, token_ids: list[int]) -> list[str] | None:
        """Each generated token decoded alone (None: the engine has no tokenizer)."""
        ...

    async def generate(
        self,
        question: str,
        budget: int,
        mode: str,
        seed: int = 0,
        answer_cap: int | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> Generation:
        """Serve a question at (budget, mode) with budget forcing.

        Raises:
            EngineInputError: the request does not fit the model's context, or the mode is refused.
        """
        ...

    async def prompt_hidden(self, question: str, layer: int) -> np.ndarray:
        """The LM's hidden state of the question's prompt at prefill: the mean over its tokens of ``layer``.

        Raises:
            EngineInputError: the engine cannot compute it (an upstream), or the prompt does not fit.
        """
        ...

    async def generate_plain(
        self, prompt: str, max_tokens: int, n: int, temperature: float, seed: int, stop: list[str]
    ) -> list[tuple[int, Any]]:
        """Plain generation of a raw prompt: (prompt tokens, result) per sample.

        Raises:
            EngineInputError: the request does not fit the model's context.
        """
        ...

    async def aclose(self) -> None:
        """Release the engine (stop its worker, close its connections)."""
        ...


class _Adapter:
    """What both adapters share: the backend's name, cue and answer room, and plain generation."""

    def __init__(self, backend: LocalBackend | UpstreamBackend) -> None:
        self.backend = backend
        self.name = str(backend.name)
        self.answer_cue = backend.answer_cue
        self.max_answer_tokens = int(backend.max_answer_tokens)

    @property
    def answer_room(self) -> int:
        """Tokens the cue and the longest answer take after the reasoning."""
        return int(self.backend.answer_room)

    async def generate_plain(
        self, prompt: str, max_tokens: int, n: int, temperature: float, seed: int, stop: list[str]
    ) -> list[tuple[int, Any]]:
        """Plain generation of a raw prompt (a request that bypasses the policy)."""
        try:
            return list(await self.backend.generate_plain(prompt, max_tokens, n, temperature, seed, stop))
        except ValueError as error:
            raise EngineInputError(str(error)) from None


class LocalEngine(_Adapter):
    """A :class:`LocalBackend` as an :class:`Engine`: it streams, decodes and closes synchronously."""

    streams_tokens = True
    provides_hidden = True

    def __init__(self, backend: LocalBackend) -> None:
        super().__init__(backend)
        self.backend: LocalBackend = backend

    def decode(self, token_ids: list[int]) -> str:
        """The text of some generated tokens."""
        return self.backend.decode(token_ids)

    def token_texts(self, token_ids: list[int]) -> list[str] | None:
        """Each generated token decoded alone (their concatenation is the text)."""
        tokenizer = self.backend.lm.tokenizer
        return [str(tokenizer.decode([token])) for token in token_ids]

    async def generate(
        self,
        question: str,
        budget: int,
        mode: str,
        seed: int = 0,
        answer_cap: int | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> Generation:
        """Serve a question at (budget, mode) with budget forcing, on the LM's worker thread."""
        try:
            return await self.backend.generate(
                question, budget, mode, seed=seed, answer_cap=answer_cap, on_token=on_token
            )
        except ValueError as error:
            raise EngineInputError(str(error)) from None

    async def prompt_hidden(self, question: str, layer: int) -> np.ndarray:
        """The hidden state at prefill, on the LM's worker thread (batched with concurrent requests)."""
        try:
            return np.asarray(await self.backend.prompt_hidden(question, layer))
        except ValueError as error:
            raise EngineInputError(str(error)) from None

    async def aclose(self) -> None:
        """Stop the worker after the jobs already queued."""
        self.backend.close()


class UpstreamEngine(_Adapter):
    """An :class:`UpstreamBackend` as an :class:`Engine`: whole responses only, no tokenizer."""

    streams_tokens = False
    provides_hidden = False

    def __init__(self, backend: UpstreamBackend) -> None:
        super().__init__(backend)
        self.backend: UpstreamBackend = backend

    def decode(self, token_ids: list[int]) -> str:
        """The upstream sends text, not tokens: never called (``streams_tokens`` is False)."""
        raise NotImplementedError("an upstream engine does not stream tokens")

    def token_texts(self, token_ids: list[int]) -> list[str] | None:
        """Unknown: the upstream's tokenizer is not here."""
        return None

    async def generate(
        self,
        question: str,
        budget: int,
        mode: str,
        seed: int = 0,
        answer_cap: int | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> Generation:
        """Serve a question at (budget, mode) through the upstream, with budget forcing."""
        if on_token is not None:
            raise EngineInputError("an upstream engine does not stream tokens as they are chosen")
        try:
            return await self.backend.generate(question, budget, mode, seed=seed, answer_cap=answer_cap)
        except ValueError as error:
            raise EngineInputError(str(error)) from None

    async def prompt_hidden(self, question: str, layer: int) -> np.ndarray:
        """Never available: an OpenAI-compatible server returns text and log-probabilities, not hidden states."""
        raise EngineInputError("an upstream server cannot return the LM's hidden states (lm-hidden features)")

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self.backend.aclose()


Backend = LocalBackend | UpstreamBackend | Engine
"""What ``create_app`` accepts: one of the two backends, or anything that is an :class:`Engine`."""


def as_engine(backend: Backend) -> Engine:
    """The engine serving a backend (an :class:`Engine` is served as it is)."""
    if isinstance(backend, LocalBackend):
        return LocalEngine(backend)
    if isinstance(backend, UpstreamBackend):
        return UpstreamEngine(backend)
    return backend


def build_backend(config: ServeConfig) -> LocalBackend | UpstreamBackend:
    """The backend a config asks for: the upstream, a local LM folder, or the demo LM."""
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
