"""Outcome collection against an OpenAI-compatible completions server (vLLM, TGI, llama.cpp, tokenopt serve).

Per (query, mode) sample, the client sends one *trace* request at the largest budget
``B`` with ``max_tokens = B + max_answer_tokens`` and token log-probabilities, then one
short *branch* request per budget that the trace did not answer by itself: the prompt,
the trace cut at that budget and the answer cue, with ``max_tokens = max_answer_tokens``.
A server with prefix caching (``vllm serve --enable-prefix-caching``) reads the shared
prefix of those requests from its cache, which is what makes them cheap.

The rules and the billing are those of :mod:`tokenopt.lm.decoding`:

- the trace wrote the cue within the first ``b`` tokens: the answer that follows it
  in the trace request is the outcome at ``b`` (natural stop); reasoning is counted
  up to the cue;
- the trace ended (EOS, ``finish_reason: stop``) within the first ``b`` tokens: a
  branch with the whole trace and the cue (natural stop);
- otherwise a branch with the trace's first ``b`` tokens and the cue (forced);
- an answer ends at EOS (not billed), at a token holding a newline (billed, not part
  of the answer) or after ``max_answer_tokens`` tokens.

The cue's tokens are what the server's ``usage.prompt_tokens`` of a branch adds to the
prompt and the cut trace. The trace is sent back as text, so the branch equals a local
run when the server tokenises prompt + trace + cue into the same tokens it generated
(true of character-level and most BPE vocabularies at word boundaries).

``greedy`` reproduces :class:`tokenopt.lm.local.TransformersLM`'s outcomes; ``sc<k>``
sends k seeded samples (one request each, since llama.cpp's server and tokenopt's
bypass take ``n=1`` only) with the same billing and vote, but the server's sampler
draws other tokens than the local one; ``beam<k>`` has no portable OpenAI parameter
and is refused.

Requests go through :class:`tokenopt.lm.openai_client.OpenAIClient` (the proxy's
client too), with collection's retry settings: 5 retries from 0.5 s.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

from tokenopt.actions import Mode
from tokenopt.lm.local import ModeOutcome, summarise
from tokenopt.lm.openai_client import OpenAIClient, RequestStats, UpstreamError, read_usage
from tokenopt.prompt import PromptFormat

__all__ = ["UpstreamError", "UpstreamLM", "UpstreamPrompt"]

logger = logging.getLogger(__name__)

COLLECTION_RETRIES = 5
"""Retries of a collection request: a run of hours rides out an upstream restart."""
COLLECTION_BACKOFF_S = 0.5
"""The first retry's wait; each next one waits twice as long (15.5 s in all over 5 retries)."""


@dataclass(frozen=True)
class UpstreamPrompt:
    """A prompt as the upstream sees it: its text and its token count (from the server's usage)."""

    text: str
    tokens: int

    def __len__(self) -> int:
        return self.tokens


@dataclass
class _Completion:
    tokens: list[str]
    logprobs: list[float]
    finish_reason: str
    prompt_tokens: int
    done_ms: float


@dataclass
class _Sequence:
    reasoning_tokens: int
    cue_tokens: int
    answer: str
    answer_logprob: float
    answer_token_count: int
    billed_answer_tokens: int
    natural_stop: bool
    done_ms: float = field(default=0.0, compare=False)


def _sample_seed(query_seed: int, sample: int) -> int:
    digest = hashlib.blake2b(f"{query_seed}:{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (2**31)


class UpstreamLM:
    """Collects outcomes from an OpenAI-compatible ``/v1/completions`` endpoint.

    It has what :func:`tokenopt.collect.collect_shard` and ``collect`` use of an LM
    backend: ``name``, ``max_context``, ``encode_prompts``, ``fits``, ``run`` and ``stats``.

    Args:
        url: the server's base URL (with or without ``/v1``).
        model: the model name to request; None takes the first of ``/v1/models``.
        prompt_format: prompt template, cue and answer rules (no chat template: write
            a chat model's markup into the template).
        temperature: sampling temperature of ``sc<k>``.
        api_key: bearer token of the server.
        concurrency: most requests in flight at once.
        retries: retries of a request after a connection error, a timeout, a 429 or
            a 5xx (:class:`tokenopt.lm.openai_client.OpenAIClient`'s policy).
        backoff_s: the first retry's wait; each next one waits twice as long.
        timeout_s: seconds per request.
        modes: the modes to be collected, checked here so that a beam mode is refused
            before any work.

    Raises:
        ValueError: a chat template, a bad setting or a ``beam<k>`` mode.
        UpstreamError: the server cannot be reached or refuses the key.
    """

    kind = "openai-upstream"

    def __init__(
        self,
        url: str,
        model: str | None = None,
        prompt_format: PromptFormat | None = None,
        temperature: float = 1.0,
        api_key: str | None = None,
        concurrency: int = 16,
        retries: int = COLLECTION_RETRIES,
        backoff_s: float = COLLECTION_BACKOFF_S,
        timeout_s: float = 120.0,
        modes: list[Mode] | None = None,
    ) -> None:

        self.prompt_format = prompt_format or PromptFormat()
        if self.prompt_format.use_chat_template:
            raise ValueError(
                "--chat-template needs a local tokenizer; with --upstream write the chat markup into --prompt-template"
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1; got {concurrency}")
        for mode in modes or []:
            self.check_mode(mode)
        self.client = OpenAIClient(
            url, api_key, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s, max_connections=concurrency
        )
        self.url = self.client.url
        self.temperature = temperature
        self.concurrency = concurrency
        self.max_context: int | None = None
        listed = self.client.list_models()
        if model is None:
            if not listed:
                raise ValueError(f"{self.url}/models lists no model; name one with --upstream-model")
            model = str(listed[0].get("id"))
        for entry in listed:
            if entry.get("id") == model and isinstance(entry.get("max_model_len"), int):
                self.max_context = int(entry["max_model_len"])  # vLLM reports its context here
        self.name = model

    @property
    def stats(self) -> RequestStats:
        """Requests, retries and the tokens the server processed (``forward_tokens``)."""
        return self.client.stats

    def describe(self) -> dict[str, object]:
        """The manifest's ``backend`` entry."""
        return {"kind": self.kind, "url": self.url, "model": self.name, "max_context": self.max_context}

    @staticmethod
    def check_mode(mode: Mode) -> None:
        """Refuse a mode an OpenAI-compatible server cannot run.

        Raises:
            ValueError: a ``beam<k>`` mode.
        """
        if mode.kind == "beam":
            raise ValueError(
                f"mode {mode.name!r}: beam search has no portable OpenAI completions parameter, so --upstream "
                "cannot collect it; drop it from --modes (greedy and sc<k> work) or collect it with a local --model"
            )

    # -- prompts ---------------------------------------------------------------

    def prompt_text(self, question: str) -> str:
        """The prompt text of a question."""
        return self.prompt_format.template.replace("{question}", question)

    def encode_prompts(self, questions: list[str]) -> list[UpstreamPrompt]:
        """Each question's prompt with its token count, read from the server's usage.

        One one-token completion per prompt (which also warms a prefix cache).
        """
        texts = [self.prompt_text(question) for question in questions]

        async def count(text: str) -> UpstreamPrompt:
            data = await self._post({"prompt": text, "max_tokens": 1, "temperature": 0.0})
            return UpstreamPrompt(text, self._prompt_tokens(data))

        async def count_all() -> list[UpstreamPrompt]:
            async with self.client:
                return list(await asyncio.gather(*(count(text) for text in texts)))

        return asyncio.run(count_all()) if texts else []

    def encode_prompt(self, question: str) -> UpstreamPrompt:
        """One question's prompt and its token count."""
        return self.encode_prompts([question])[0]

    def fits(self, prompt: UpstreamPrompt, max_budget: int) -> bool:
        """Whether prompt, largest budget, cue and answer fit the context (True when the server hides it)."""
        if self.max_context is None:
            return True
        return len(prompt) + max_budget + self.prompt_format.max_answer_tokens + 8 <= self.max_context

    # -- HTTP --------------------------------------------------------------------

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """A completion of this model (retried and validated by the client)."""
        return await self.client.complete({"model": self.name, **body})

    def _prompt_tokens(self, data: dict[str, Any]) -> int:
        tokens = read_usage(data).prompt_tokens
        if tokens < 1:
            raise UpstreamError(f"upstream {self.url} answered without usage.prompt_tokens: {str(data)[:200]!r}")
        return tokens

    def _completion(self, data: dict[str, Any], started: float) -> _Completion:
        choice = data["choices"][0]
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        tokens = logprobs.get("tokens") if isinstance(logprobs, dict) else None
        values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
        if not isinstance(tokens, list) or not isinstance(values, list) or len(tokens) != len(values):
            raise UpstreamError(
                f"upstream {self.url} answered without token logprobs (asked with `logprobs: 1`); collection "
                "needs them to cut the trace at each budget: use a server that returns them (vLLM, TGI, "
                "llama.cpp's server, tokenopt serve)"
            )
        finish = str(choice.get("finish_reason") or "length")
        token_texts = [str(token) for token in tokens]
        floats = [float(value) if value is not None else 0.0 for value in values]
        if finish == "stop" and token_texts and token_texts[-1] == "":
            token_texts, floats = token_texts[:-1], floats[:-1]  # an EOS some servers list, decoded to ""
        return _Completion(
            tokens=token_texts,
            logprobs=floats,
            finish_reason=finish,
            prompt_tokens=self._prompt_tokens(data),
            done_ms=(time.perf_counter() - started) * 1000.0,
        )

    # -- collection ----------------------------------------------------------------

    def _read_answer(self, tokens: list[str], logprobs: list[float]) -> tuple[str, float, int, int]:
        """Answer text, its log-probability sum, its token count and its billed tokens.

        The tokens are those after the cue; their end without a newline is EOS or the cap.
        """
        kept: list[str] = []
        logprob = 0.0
        billed = 0
        for token, value in zip(tokens, logprobs, strict=True):
            billed += 1
            if "\n" in token:
                break
            kept.append(token)
            logprob += value
            if billed >= self.prompt_format.max_answer_tokens:
                break
        return self._extract(kept), logprob, len(kept), billed

    def _extract(self, answer_tokens: list[str]) -> str:
        return self.prompt_format.extract_answer("".join(answer_tokens))

    def _find_cue(self, tokens: list[str], limit: int) -> tuple[int, int] | None:
        """(reasoning tokens, cue tokens) where the trace wrote the cue within its first ``limit`` tokens."""
        cue = self.prompt_format.answer_cue
        text = ""
        for end, token in enumerate(tokens[:limit], start=1):
            text += token
            if not text.endswith(cue):
                continue
            # The cue must be whole tokens, as the local decoder matches the cue's token ids.
            tail = ""
            for start in range(end - 1, -1, -1):
                tail = tokens[start] + tail
                if tail == cue:
                    return start, end - start
                if len(tail) >= len(cue):
                    break
        return None

    async def _sample(
        self,
        prompt: UpstreamPrompt,
        budgets: list[int],
        temperature: float,
        seed: int,
        started: float,
    ) -> dict[int, _Sequence]:
        """One sequence's outcome at every budget: a trace request, then the branches it needs."""
        cue = self.prompt_format.answer_cue
        cap = self.prompt_format.max_answer_tokens
        largest = budgets[-1]
        trace = _Completion([], [], "length", len(prompt), 0.0)
        if largest > 0:
            body = {
                "prompt": prompt.text,
                "max_tokens": largest + cap,
                "temperature": temperature,
                "seed": seed,
                "logprobs": 1,
            }
            trace = self._completion(await self._post(body), started)
            if trace.finish_reason != "stop" and len(trace.tokens) < largest + cap:
                raise UpstreamError(
                    f"upstream {self.url} returned {len(trace.tokens)} tokens for max_tokens {largest + cap} "
                    f"with finish_reason {trace.finish_reason!r}"
                )
        found = self._find_cue(trace.tokens, largest)
        natural: _Sequence | None = None
        if found is not None:
            reasoning, cue_tokens = found
            after = reasoning + cue_tokens
            answer, logprob, count, billed = self._read_answer(trace.tokens[after:], trace.logprobs[after:])
            natural = _Sequence(reasoning, cue_tokens, answer, logprob, count, billed, True, trace.done_ms)
            ended_at = after
        elif trace.finish_reason == "stop" and len(trace.tokens) < largest:
            ended_at = len(trace.tokens) + 1  # the EOS is the step that ends the reasoning
        else:
            ended_at = largest + 1  # still reasoning at the largest budget
        cuts = sorted({budget if budget < ended_at else len(trace.tokens) for budget in budgets})
        if natural is not None:
            cuts = [cut for cut in cuts if cut < ended_at]

        async def branch(cut: int) -> tuple[int, _Sequence]:
            body = {
                "prompt": prompt.text + "".join(trace.tokens[:cut]) + cue,
                "max_tokens": cap,
                "temperature": temperature,
                "seed": seed,
                "logprobs": 1,
            }
            forced = self._completion(await self._post(body), started)
            cue_tokens = forced.prompt_tokens - len(prompt) - cut
            if cue_tokens < 1:
                raise UpstreamError(
                    f"upstream {self.url} counted {forced.prompt_tokens} prompt tokens for a prompt of "
                    f"{len(prompt)} tokens + {cut} trace tokens + the cue {cue!r}: it tokenises the trace "
                    "differently from how it generated it"
                )
            answer, logprob, count, billed = self._read_answer(forced.tokens, forced.logprobs)
            return cut, _Sequence(cut, cue_tokens, answer, logprob, count, billed, False, forced.done_ms)

        branches = dict(await asyncio.gather(*(branch(cut) for cut in cuts)))
        outcome: dict[int, _Sequence] = {}
        for budget in budgets:
            if budget < ended_at:
                outcome[budget] = branches[budget]
            elif natural is not None:
                outcome[budget] = natural
            else:
                # The trace ended (EOS) before this budget: the whole trace, then the cue.
                # (The local decoder also feeds the EOS before the cue; a text prompt cannot.)
                outcome[budget] = replace(branches[len(trace.tokens)], natural_stop=True)
        return outcome

    def _summarise(self, sequences: list[_Sequence], mode: Mode) -> ModeOutcome:
        """Bill and vote as the local backend does (:func:`tokenopt.lm.local.summarise`)."""
        return summarise(
            mode,
            answers=[sequence.answer for sequence in sequences],
            mean_logprobs=[s.answer_logprob / max(1, s.answer_token_count) for s in sequences],
            reasoning_tokens=[s.reasoning_tokens for s in sequences],
            cue_tokens=[s.cue_tokens for s in sequences],
            answer_tokens=[s.billed_answer_tokens for s in sequences],
            natural_stops=[s.natural_stop for s in sequences],
            latency_ms=max(s.done_ms for s in sequences),
        )

    def run(
        self, prompts: list[UpstreamPrompt], mode: Mode, budgets: list[int], seeds: list[int] | None = None
    ) -> list[dict[int, ModeOutcome]]:
        """Each prompt's outcome at every budget in one mode (requests run concurrently).

        Raises:
            ValueError: a ``beam<k>`` mode.
            UpstreamError: the server failed past the retries, or answered without
                JSON, choices, usage or token logprobs.
        """
        self.check_mode(mode)
        temperature = self.temperature if mode.kind == "sc" else 0.0
        query_seeds = seeds if seeds is not None else [0] * len(prompts)

        async def one_query(index: int) -> dict[int, ModeOutcome]:
            started = time.perf_counter()
            per_sample = await asyncio.gather(
                *(
                    self._sample(
                        prompts[index],
                        budgets,
                        temperature,
                        _sample_seed(query_seeds[index], sample),
                        started,
                    )
                    for sample in range(mode.width)
                )
            )
            return {budget: self._summarise([s[budget] for s in per_sample], mode) for budget in budgets}

        async def all_queries() -> list[dict[int, ModeOutcome]]:
            async with self.client:
                tasks = [asyncio.ensure_future(one_query(i)) for i in range(len(prompts))]
                try:
                    return list(await asyncio.gather(*tasks))
                finally:
                    for task in tasks:
                        task.cancel()

        return asyncio.run(all_queries()) if prompts else []
