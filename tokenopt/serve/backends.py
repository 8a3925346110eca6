"""Where the server's tokens come from: a local transformers LM, or an upstream server.

Both backends answer one question: serve this prompt at this (budget, mode) with
budget forcing, and say what it cost. The local backend batches concurrent requests
on one worker thread (the LM is never called from two threads); the upstream backend
forwards to any OpenAI-compatible completions endpoint (vLLM, TGI, llama.cpp's
server, or another ``tokenopt serve --model``) and forces the answer with a second,
short request when the first one stops on length.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tokenopt.actions import Mode, parse_mode
from tokenopt.lm.openai_client import OpenAIClient, UpstreamError, read_usage
from tokenopt.scoring import majority_vote

__all__ = ["BackendError", "Generation", "LocalBackend", "UpstreamBackend", "UpstreamError"]

logger = logging.getLogger(__name__)


PROXY_BACKOFF_S = 0.2
"""The proxy's first retry wait (then twice as long each time): a client is waiting for the answer."""


class BackendError(RuntimeError):
    """The local LM could not serve a request (the server answers 500).

    An upstream's failure is :class:`tokenopt.lm.openai_client.UpstreamError` (502),
    the one error of the client that collection and the proxy share.
    """


@dataclass
class Generation:
    """What one request returned and cost."""

    text: str
    """The completion text: reasoning, cue and answer."""
    answer: str
    """The extracted answer (the vote's winner for ``sc<k>``)."""
    prompt_tokens: int
    reasoning_tokens: int
    answer_tokens: int
    """Cue and answer tokens, over every sequence the mode ran."""
    billed_tokens: int
    """Every generated token of every sequence (and of forcing requests)."""
    forced: bool
    """Whether budget forcing cut the reasoning short."""
    finish_reason: str = "stop"
    mode: str = "greedy"
    """The mode actually served (an upstream serves ``beam<k>`` greedily)."""
    pieces: list[str] = field(default_factory=list)
    """The text split into tokens, for streaming."""
    answer_logprob: float = 0.0
    """Mean log-probability of the returned answer's tokens (0 when the backend cannot tell)."""
    token_logprobs: dict[str, Any] | None = None
    """OpenAI's completions ``logprobs`` object, for plain generations that asked for it."""
    choices: list[tuple[str, str, dict[str, Any] | None]] | None = None
    """Every choice (text, finish reason, logprobs) of a plain request with ``n`` > 1."""


@dataclass
class _Job:
    kind: str
    """``forced`` (budget forcing at a budget) or ``plain`` (no forcing)."""
    key: tuple[Any, ...]
    args: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if self.future.done():
                return  # the request timed out or was cancelled meanwhile
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(settle)


class LocalBackend:
    """A transformers LM behind a micro-batching worker thread.

    Requests that arrive within ``batch_wait_ms`` of each other and share a (mode,
    budget, answer cap) are decoded together in one batch, with the same decoder
    ``tokenopt collect`` uses, so a served outcome is the outcome the policy was
    trained on.

    Args:
        lm: a loaded :class:`tokenopt.lm.local.TransformersLM`.
        max_batch: most requests decoded together.
        batch_wait_ms: how long the worker waits for more requests to join a batch.
    """

    def __init__(self, lm: Any, max_batch: int = 32, batch_wait_ms: float = 2.0) -> None:
        self.lm = lm
        self.name = lm.name
        self.answer_cue = lm.prompt_format.answer_cue
        self.max_answer_tokens = lm.prompt_format.max_answer_tokens
        self.max_context = lm.max_context
        self.max_batch = max_batch
        self.batch_wait = batch_wait_ms / 1000.0
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self.batches = 0
        self.batched_requests = 0
        self._worker = threading.Thread(target=self._run, name="tokenopt-lm", daemon=True)
        self._worker.start()

    streams_tokens = True
    """Greedy requests can report their tokens as the LM chooses them."""

    def decode(self, token_ids: list[int]) -> str:
        """The text of some generated tokens (for streaming)."""
        return str(self.lm.tokenizer.decode(token_ids, skip_special_tokens=True))

    @property
    def answer_room(self) -> int:
        """Tokens the cue and the longest answer take after the reasoning."""
        return len(self.lm.settings.cue_ids) + self.max_answer_tokens

    def count_tokens(self, text: str) -> int:
        """Prompt tokens of a question as this LM formats it."""
        return len(self.lm.encode_prompt(text))

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

        ``on_token`` (greedy only) is called on the LM's worker thread with each token
        of the text as it is chosen.
        """
        if on_token is not None and mode != "greedy":
            raise ValueError(f"only greedy requests stream as they decode; got {mode}")
        prompt = self.lm.encode_prompt(question)
        if not self.lm.fits(prompt, budget):
            raise ValueError(
                f"the prompt has {len(prompt)} tokens; with budget {budget} and the answer it does not fit "
                f"the model's context of {self.max_context} tokens"
            )
        # Greedy and sc<k> rows leave a batch at their own budgets; beams of one batch share one.
        key = ("forced", mode, budget if mode.startswith("beam") else None, answer_cap)
        args = {"prompt": prompt, "seed": seed, "budget": budget, "on_token": on_token}
        return await self._submit("forced", key, args)

    async def prompt_hidden(self, question: str, layer: int) -> Any:
        """The LM's hidden state of the question's prompt at prefill (mean over its tokens of ``layer``).

        Requests that arrive together share one prefill batch, as collection computed it.
        """
        prompt = self.lm.encode_prompt(question)
        if not prompt or len(prompt) > self.max_context:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the model's context is {self.max_context}")
        return await self._submit("hidden", ("hidden", layer), {"prompt": prompt})

    async def generate_plain(
        self, prompt: str, max_tokens: int, n: int, temperature: float, seed: int, stop: list[str]
    ) -> list[Any]:
        """Plain generation of a raw prompt (a client that bypasses the policy)."""
        ids = list(self.lm.tokenizer(prompt)["input_ids"])
        if len(ids) + max_tokens > self.max_context:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; with max_tokens {max_tokens} it exceeds the model's "
                f"context of {self.max_context} tokens"
            )
        args = {"prompt": ids, "max_tokens": max_tokens, "n": n, "temperature": temperature, "seed": seed, "stop": stop}
        results = await self._submit("plain", ("plain",), args)
        return [(len(ids), result) for result in results]

    async def _submit(self, kind: str, key: tuple[Any, ...], args: dict[str, Any]) -> Any:
        loop = asyncio.get_running_loop()
        job = _Job(kind=kind, key=key, args=args, loop=loop, future=loop.create_future())
        self._jobs.put(job)
        return await job.future

    def close(self) -> None:
        """Stop the worker after the jobs already queued."""
        self._jobs.put(None)
        self._worker.join(timeout=30)

    def _run(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                return
            jobs = [first]
            deadline = time.perf_counter() + self.batch_wait
            stop = False
            while len(jobs) < self.max_batch:
                try:
                    job = self._jobs.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
            groups: dict[tuple[Any, ...], list[_Job]] = defaultdict(list)
            for job in jobs:
                if not job.future.done():  # skip requests that already timed out
                    groups[job.key].append(job)
            for key, members in groups.items():
                self._serve(key, members)
            if stop:
                return

    def _serve(self, key: tuple[Any, ...], jobs: list[_Job]) -> None:
        """Decode a group of jobs; a batch that fails is retried job by job, so only the guilty job fails."""
        if key[0] == "plain":
            for job in jobs:
                self._serve_alone(job, None)
            return
        if key[0] == "hidden":
            try:
                vectors = self.lm.prompt_hidden([job.args["prompt"] for job in jobs], key[1], self.max_batch)
            except Exception:  # the worker must survive any request
                self._fail(jobs)
                return
            for job, vector in zip(jobs, vectors, strict=True):
                job.resolve(vector)
            return
        for start in range(0, len(jobs), self.max_batch):
            chunk = jobs[start : start + self.max_batch]
            try:
                self._decode_chunk(key, chunk)
            except Exception:
                if len(chunk) == 1:
                    self._fail(chunk)
                    continue
                logger.warning("a batch of %d requests failed; retrying them one by one", len(chunk))
                for job in chunk:
                    if job.args.get("streamed"):
                        # Its client already has part of the text: a retry would send it twice.
                        self._fail([job])
                    else:
                        self._serve_alone(job, key)

    def _serve_alone(self, job: _Job, key: tuple[Any, ...] | None) -> None:
        """Serve one job (plain when ``key`` is None); its failure fails it alone."""
        try:
            if key is None:
                job.resolve(self.lm.generate_plain(**job.args))
            else:
                self._decode_chunk(key, [job])
        except Exception:  # the worker must survive any request
            self._fail([job])

    def _fail(self, jobs: list[_Job]) -> None:
        error = sys.exc_info()[1]
        logger.exception("the LM failed on a request")
        for job in jobs:
            job.resolve(error=BackendError(f"the LM failed: {error}"))

    def _decode_chunk(self, key: tuple[Any, ...], chunk: list[_Job]) -> None:
        _, mode_name, budget, answer_cap = key
        mode = parse_mode(mode_name)
        listeners = [job.args.get("on_token") for job in chunk]

        def listener(slot: int, token: int) -> None:
            callback = listeners[slot]
            if callback is not None:
                chunk[slot].args["streamed"] = True
                callback(token)

        completions = self.lm.complete(
            [job.args["prompt"] for job in chunk],
            mode,
            budget if budget is not None else [job.args["budget"] for job in chunk],
            seeds=[job.args["seed"] for job in chunk],
            max_answer_tokens=answer_cap,
            listener=listener if any(callback is not None for callback in listeners) else None,
        )
        self.batches += 1
        self.batched_requests += len(chunk)
        generations = [self._generation(completion, mode) for completion in completions]
        for job, generation in zip(chunk, generations, strict=True):
            job.resolve(generation)

    def _generation(self, completion: Any, mode: Mode) -> Generation:
        outcome = completion.outcome
        ids = self.lm.tokenizer(completion.text, add_special_tokens=False)["input_ids"]
        pieces = [str(self.lm.tokenizer.decode([token])) for token in ids]
        return Generation(
            text=completion.text,
            answer=outcome.answer,
            prompt_tokens=completion.prompt_tokens,
            reasoning_tokens=outcome.reasoning_tokens,
            answer_tokens=outcome.cue_tokens + outcome.answer_tokens,
            billed_tokens=outcome.billed_tokens,
            forced=completion.forced,
            finish_reason="stop",
            mode=mode.name,
            pieces=pieces,
            answer_logprob=outcome.answer_logprob,
        )


class UpstreamBackend:
    """An OpenAI-compatible completions server, driven with budget forcing.

    For a (budget, mode): one request with ``max_tokens=budget`` (``n=k`` and the
    sampling temperature for ``sc<k>``). A choice that wrote the cue and a finished
    answer is read as is; any other (stopped on length, or ended without the cue) is
    forced: a second request sends prompt + reasoning + cue with a short
    ``max_tokens`` and a newline stop, greedily. ``sc<k>`` votes on the answers.
    ``beam<k>`` has no portable OpenAI parameter and is served greedily (the response
    says so). Billed tokens are the completion tokens the upstream reports
    (:func:`tokenopt.lm.openai_client.read_usage`).

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8001`` (``/v1`` optional).
        model: the model name to send (``--upstream-model``).
        answer_cue: the text that makes the LM answer.
        max_answer_tokens: ``max_tokens`` of a forcing request.
        answer_extractor: turns an answer text into the answer (the regex of the
            prompt format).
        api_key: bearer token for the upstream.
        timeout: seconds per upstream request.
        retries: retries on connection errors, timeouts, 429 and 5xx, with backoff
            from :data:`PROXY_BACKOFF_S` (:class:`tokenopt.lm.openai_client.OpenAIClient`'s policy).
        temperature: sampling temperature of ``sc<k>``.
        prompt_template: how a question becomes the upstream's prompt (for a chat
            model, write its chat markup into the template, as at collection).
        client: an ``httpx.AsyncClient`` to use (tests pass a transport).
    """

    def __init__(
        self,
        url: str,
        model: str = "default",
        answer_cue: str = "=",
        max_answer_tokens: int = 8,
        answer_extractor: Callable[[str], str] | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 2,
        temperature: float = 1.0,
        prompt_template: str = "{question}",
        client: Any = None,
    ) -> None:
        if "{question}" not in prompt_template:
            raise ValueError(f"prompt template {prompt_template!r} has no {{question}} placeholder")
        self.prompt_template = prompt_template

        self.client = OpenAIClient(
            url, api_key, retries=retries, backoff_s=PROXY_BACKOFF_S, timeout_s=timeout, http_client=client
        )
        self.url = self.client.url
        self.name = model
        self.answer_cue = answer_cue
        self.max_answer_tokens = max_answer_tokens
        self.answer_extractor = answer_extractor or (lambda text: text.strip())
        self.temperature = temperature
        self.answer_room = max_answer_tokens + 1

    def count_tokens(self, text: str) -> int:
        """Unknown before the upstream answers; the response's usage says."""
        return 0

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """A completion of this model (retried and validated by the client)."""
        return await self.client.complete({"model": self.name, **body})

    def _read(self, text: str) -> tuple[str, str | None]:
        """Split a choice's text into reasoning and a finished answer (None if unfinished)."""
        cut = text.find(self.answer_cue)
        if cut < 0:
            return text, None
        after = text[cut + len(self.answer_cue) :]
        end = after.find("\n")
        if end < 0:
            return text[:cut], None
        return text[:cut], after[:end]

    async def generate(
        self, question: str, budget: int, mode: str, seed: int = 0, answer_cap: int | None = None
    ) -> Generation:
        """Serve a question at (budget, mode) through the upstream, with budget forcing."""
        parsed = parse_mode(mode)
        question = self.prompt_template.replace("{question}", question)
        served = parsed.name if parsed.kind != "beam" else "greedy"
        n = parsed.width if parsed.kind == "sc" else 1
        answer_tokens = min(answer_cap or self.max_answer_tokens, self.max_answer_tokens)
        prompt_tokens, reasoning_tokens, forcing_tokens = 0, 0, 0
        texts: list[str] = []
        finishes: list[str] = []
        if budget > 0:
            body: dict[str, Any] = {"prompt": question, "max_tokens": budget, "n": n, "seed": seed}
            body["temperature"] = self.temperature if parsed.kind == "sc" else 0.0
            first = await self._post(body)
            usage = read_usage(first)
            prompt_tokens, reasoning_tokens = usage.prompt_tokens, usage.completion_tokens
            choices = sorted(first["choices"], key=lambda choice: int(choice.get("index", 0)))
            texts = [str(choice.get("text", "")) for choice in choices]
            finishes = [str(choice.get("finish_reason", "length")) for choice in choices]
        else:
            texts, finishes = [""] * n, ["length"] * n
        reasoning: list[str] = []
        answers: list[str | None] = []
        for text, finish in zip(texts, finishes, strict=True):
            trace, answer = self._read(text)
            if answer is None and finish == "stop" and self.answer_cue in text:
                answer = text[text.find(self.answer_cue) + len(self.answer_cue) :]
            reasoning.append(trace)
            answers.append(answer)
        forced = [i for i, answer in enumerate(answers) if answer is None]

        async def force(i: int) -> tuple[int, dict[str, Any]]:
            body = {
                "prompt": question + reasoning[i] + self.answer_cue,
                "max_tokens": answer_tokens,
                "temperature": 0.0,
                "stop": ["\n"],
            }
            return i, await self._post(body)

        for i, data in await asyncio.gather(*(force(i) for i in forced)):
            answers[i] = str(data["choices"][0]["text"])
            usage = read_usage(data)
            forcing_tokens += usage.completion_tokens
            prompt_tokens = prompt_tokens or usage.prompt_tokens
        extracted = [self.answer_extractor(answer or "") for answer in answers]
        chosen = majority_vote(extracted)
        text = f"{reasoning[chosen]}{self.answer_cue}{answers[chosen] or ''}"
        return Generation(
            text=text,
            answer=extracted[chosen],
            prompt_tokens=prompt_tokens,
            reasoning_tokens=reasoning_tokens,
            answer_tokens=forcing_tokens,
            billed_tokens=reasoning_tokens + forcing_tokens,
            forced=bool(forced),
            finish_reason="stop",
            mode=served,
            pieces=[text],
        )

    async def generate_plain(
        self, prompt: str, max_tokens: int, n: int, temperature: float, seed: int, stop: list[str]
    ) -> list[Any]:
        """Forward a bypassed request unchanged (as a plain completion)."""
        body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "n": n, "temperature": temperature}
        body["seed"] = seed
        if stop:
            body["stop"] = stop
        data = await self._post(body)
        from tokenopt.lm.local import PlainCompletion

        usage = read_usage(data)
        share = usage.completion_tokens // len(data["choices"])
        return [
            (
                usage.prompt_tokens,
                PlainCompletion(
                    text=str(choice.get("text", "")),
                    token_ids=[0] * share,
                    token_logprobs=[],
                    finish_reason=str(choice.get("finish_reason", "stop")),
                ),
            )
            for choice in data["choices"]
        ]

    async def aclose(self) -> None:
        """Close the upstream client's connections."""
        await self.client.aclose()
