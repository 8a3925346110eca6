"""README claims of `tokenopt collect --upstream`, checked against a scripted server on loopback.

The fake upstream is a real HTTP server (stdlib ``http.server`` in a thread) that speaks
OpenAI's ``/v1/models`` and ``/v1/completions`` with token log-probabilities. Its "LM" is
character-level and scripted: the question ``Q<k> <answer>?`` makes it reason ``k``
characters (``abcd...``), write the cue and the answer, then stop (EOS); a prompt that
ends with the cue is answered right when at least ``k`` reasoning characters precede the
cue, else ``0``. Every request is recorded (time, path, headers, body, status), and a
test may script failures per request body or make the server count prompt tokens with
another tokenisation than the one it generates with.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tokenopt.collect import CollectConfig, collect
from tokenopt.lm.upstream import UpstreamError, UpstreamLM
from tokenopt.prompt import PromptFormat

REASONING = "abcdefghijklmnopqrstuvwxyz"
BUDGETS = [0, 2, 4, 8]
MAX_ANSWER_TOKENS = 8
TRACE_MAX_TOKENS = BUDGETS[-1] + MAX_ANSWER_TOKENS


@dataclass
class Seen:
    """One request as the fake upstream received it."""

    at: float
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    status: int = 200

    @property
    def key(self) -> str:
        """The request body without the model name: the same request on every attempt."""
        return json.dumps({k: v for k, v in self.body.items() if k != "model"}, sort_keys=True)


@dataclass
class FakeUpstream:
    """A scripted OpenAI-compatible completions server (see the module docstring)."""

    cue: str = "="
    models: tuple[str, ...] = ("fake-lm",)
    merge: str | None = None
    """A pair of characters the server's prompt tokeniser counts as one token (it generates them apart)."""
    api_key: str | None = None
    """When set, requests without ``Authorization: Bearer <api_key>`` get 401."""
    fail: Callable[[dict[str, Any], int], int | None] | None = None
    """``fail(body, earlier_attempts)``: a status to answer instead of the completion, or None."""
    seen: list[Seen] = field(default_factory=list)
    url: str = ""

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    # -- the scripted LM -----------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return len(text) - (text.count(self.merge) if self.merge else 0)

    def complete(self, prompt: str, max_tokens: int) -> tuple[list[str], str]:
        question, mark, rest = prompt.partition("?")
        assert mark and question.startswith("Q"), prompt
        steps, answer = question[1:].split(" ")
        needed = int(steps)
        if rest.endswith(self.cue):  # a forced answer: right only after enough reasoning
            trace = rest[: -len(self.cue)]
            return ([answer if len(trace) >= needed else "0"], "stop")
        script = list(REASONING[:needed]) + list(self.cue) + [answer]
        assert "".join(script).startswith(rest), (prompt, script)
        remaining = script[len(rest) :]
        tokens = remaining[:max_tokens]
        return tokens, "length" if len(remaining) > max_tokens else "stop"

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        tokens, finish = self.complete(str(body["prompt"]), int(body["max_tokens"]))
        logprobs = {"tokens": tokens, "token_logprobs": [-0.25] * len(tokens)} if body.get("logprobs") else None
        prompt_tokens = self.count_tokens(str(body["prompt"]))
        return {
            "id": "cmpl-fake",
            "object": "text_completion",
            "model": body.get("model"),
            "choices": [{"index": 0, "text": "".join(tokens), "logprobs": logprobs, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens),
                "total_tokens": prompt_tokens + len(tokens),
            },
        }

    # -- the HTTP server -------------------------------------------------------------

    def _answer(self, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, dict[str, Any]]:
        body = json.loads(raw) if raw else {}
        with self._lock:
            record = Seen(time.monotonic(), path, headers, body)
            earlier = sum(1 for seen in self.seen if seen.path == path and seen.key == record.key)
            self.seen.append(record)
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            record.status = 401
            return 401, {"error": {"message": "bad key"}}
        if path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": name, "object": "model"} for name in self.models]}
        if path != "/v1/completions":
            record.status = 404
            return 404, {"error": {"message": f"no route {path}"}}
        status = self.fail(body, earlier) if self.fail is not None else None
        if status is not None:
            record.status = status
            return status, {"error": {"message": f"scripted {status}"}}
        return 200, self.completion(body)

    @contextlib.contextmanager
    def running(self) -> Iterator[FakeUpstream]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, raw: bytes) -> None:
                headers = {name.lower(): value for name, value in self.headers.items()}
                status, payload = fake._answer(self.path, headers, raw)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                self._reply(b"")

            def do_POST(self) -> None:  # noqa: N802
                self._reply(self.rfile.read(int(self.headers.get("Content-Length", 0))))

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)

    def completions(self) -> list[Seen]:
        return [seen for seen in self.seen if seen.path == "/v1/completions"]


def _write_questions(path: Path, steps: list[int]) -> Path:
    with path.open("w") as handle:
        for index, needed in enumerate(steps):
            answer = str(index % 9 + 1)
            line = {"id": f"q{index:02d}", "question": f"Q{needed} {answer}?", "answers": [answer], "split": "train"}
            handle.write(json.dumps(line) + "\n")
    return path


def _config(out: Path, data: Path, url: str, **overrides: Any) -> CollectConfig:
    settings: dict[str, Any] = {
        "out": str(out),
        "data": str(data),
        "budgets": BUDGETS,
        "modes": ["greedy"],
        "max_answer_tokens": MAX_ANSWER_TOKENS,
        "upstream": url,
        "concurrency": 8,
    }
    settings.update(overrides)
    return CollectConfig(**settings)


def _rows(table: Path) -> list[dict[str, Any]]:
    rows = [
        {k: v for k, v in row.items() if k != "latency_ms"} for row in pq.read_table(table / "outcomes").to_pylist()
    ]
    return sorted(rows, key=lambda row: (row["id"], row["budget"]))


def _is_trace(body: dict[str, Any]) -> bool:
    return body.get("max_tokens") == TRACE_MAX_TOKENS


def _is_branch(body: dict[str, Any], cue: str = "=") -> bool:
    return str(body.get("prompt", "")).endswith(cue)


# -- 1. 429 and 5xx are retried with exponential backoff ---------------------------------------


def test_429_and_5xx_are_retried_with_backoff_and_the_table_is_the_clean_one(tmp_path):
    questions = _write_questions(tmp_path / "q.jsonl", [3, 6, 10, 1])
    with FakeUpstream().running() as clean:
        collect(_config(tmp_path / "clean", questions, clean.url))

    def fail(body: dict[str, Any], earlier: int) -> int | None:
        if _is_trace(body):
            return [429, 503][earlier] if earlier < 2 else None
        if _is_branch(body):
            return 500 if earlier == 0 else None
        return 502 if earlier == 0 else None  # the prompt-length requests

    with FakeUpstream(fail=fail).running() as flaky:
        summary = collect(_config(tmp_path / "flaky", questions, flaky.url))
    assert summary.shards_written == 1 and summary.rows == 4 * len(BUDGETS)
    assert _rows(tmp_path / "flaky") == _rows(tmp_path / "clean")
    assert {row["em"] for row in _rows(tmp_path / "clean")} == {True, False}  # a table worth comparing

    attempts: dict[str, list[Seen]] = {}
    for seen in flaky.completions():
        attempts.setdefault(seen.key, []).append(seen)
    traces = [tries for tries in attempts.values() if _is_trace(tries[0].body)]
    branches = [tries for tries in attempts.values() if _is_branch(tries[0].body)]
    assert len(traces) == 4 and branches
    # Every request was retried until it succeeded, once, and never again after.
    for tries in attempts.values():
        statuses = [seen.status for seen in tries]
        assert statuses[-1] == 200 and statuses.count(200) == 1, statuses
    for tries in traces:
        assert [seen.status for seen in tries] == [429, 503, 200]
        # Backoff: the client waits 0.5 s (UpstreamLM's default) before the first retry, twice
        # as long before the second. Lower bounds only: a sleep never ends early.
        first_wait, second_wait = tries[1].at - tries[0].at, tries[2].at - tries[1].at
        assert first_wait >= 0.45 and second_wait >= 0.95, (first_wait, second_wait)
    for tries in branches:
        assert [seen.status for seen in tries] == [500, 200]


def test_a_4xx_is_not_retried_and_retries_run_out_with_the_reason(tmp_path):
    def bad_request(body: dict[str, Any], earlier: int) -> int | None:
        return 400 if _is_trace(body) else None

    questions = _write_questions(tmp_path / "q.jsonl", [3, 6])
    out = tmp_path / "bad"
    with FakeUpstream(fail=bad_request).running() as fake:
        with pytest.raises(UpstreamError, match="answered 400"):
            collect(_config(out, questions, fake.url))
    # Each trace request that got its 400 was sent once (the run stops at the first 400).
    traces = [seen.key for seen in fake.completions() if _is_trace(seen.body)]
    assert traces and len(traces) == len(set(traces))
    assert not list(out.glob("outcomes/*"))

    def always_503(body: dict[str, Any], earlier: int) -> int | None:
        return 503

    with FakeUpstream(fail=always_503).running() as fake:
        lm = UpstreamLM(fake.url, retries=2, backoff_s=0.01)
        with pytest.raises(UpstreamError, match=r"answered 503.*after 2 retries"):
            lm.encode_prompts(["Q3 7?"])
    assert [seen.status for seen in fake.completions()] == [503, 503, 503]


# -- 2. a server that re-tokenises the trace differently stops the run ---------------------------


def test_a_server_that_retokenises_the_trace_stops_the_run_and_keeps_only_whole_shards(tmp_path):
    # The server generates "c" and "d" as two tokens but counts "cd" in a prompt as one: a
    # branch request whose cut trace holds "cd" comes back one token short. The first shard's
    # traces are cut before "cd" (k <= 3); the second shard's are not.
    questions = _write_questions(tmp_path / "q.jsonl", [3, 2, 1, 3, 10, 12, 9, 10])
    out = tmp_path / "merged"
    with FakeUpstream(merge="cd").running() as fake:
        with pytest.raises(UpstreamError, match="tokenises the trace differently") as caught:
            collect(_config(out, questions, fake.url, shard_size=4))
    assert fake.url in str(caught.value)
    assert sorted(path.name for path in (out / "outcomes").iterdir()) == ["part-00000.parquet"]
    written = pq.read_table(out / "outcomes" / "part-00000.parquet").to_pylist()
    assert sorted({row["id"] for row in written}) == ["q00", "q01", "q02", "q03"]


# -- 3. --upstream-model defaults to the first model of /v1/models ------------------------------


def test_the_model_defaults_to_the_first_listed_one(tmp_path):
    questions = _write_questions(tmp_path / "q.jsonl", [3, 10])
    with FakeUpstream(models=("first-model", "second-model")).running() as fake:
        collect(_config(tmp_path / "default", questions, fake.url))
        default_requests = len(fake.completions())
        collect(_config(tmp_path / "named", questions, fake.url, upstream_model="second-model"))
    models = [seen.body["model"] for seen in fake.completions()]
    assert default_requests > 0 and len(models) > default_requests
    assert set(models[:default_requests]) == {"first-model"}
    assert set(models[default_requests:]) == {"second-model"}
    manifest = json.loads((tmp_path / "default" / "manifest.json").read_text())
    assert manifest["backend"]["model"] == "first-model"
    assert json.loads((tmp_path / "named" / "manifest.json").read_text())["backend"]["model"] == "second-model"


# -- 4. the API key is sent as a bearer token ---------------------------------------------------


def test_the_api_key_is_sent_as_a_bearer_token_on_every_request(tmp_path):
    questions = _write_questions(tmp_path / "q.jsonl", [3, 10])
    with FakeUpstream(api_key="k-python").running() as fake:
        collect(_config(tmp_path / "keyed", questions, fake.url, upstream_api_key="k-python"))
        with pytest.raises(UpstreamError, match="refused the API key"):
            collect(_config(tmp_path / "keyless", questions, fake.url))
    keyed = [seen for seen in fake.seen if seen.status == 200]
    assert {seen.path for seen in keyed} == {"/v1/models", "/v1/completions"}
    assert {seen.headers.get("authorization") for seen in keyed} == {"Bearer k-python"}
    assert [seen.headers.get("authorization") for seen in fake.seen if seen.status == 401] == [None]


@pytest.mark.parametrize("how", ["env", "flag"])
def test_the_cli_sends_the_api_key_and_takes_the_first_model(tmp_path, how):
    """`tokenopt collect --upstream` without --upstream-model, the key from the env or the flag."""
    key = f"secret-{how}"
    questions = _write_questions(tmp_path / "q.jsonl", [3, 10])
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "tokenopt.cli", "collect", "--out", str(out), "--data", str(questions)]
    command += ["--modes", "greedy", "--budgets", "0,2,4,8", "--concurrency", "4"]
    env = {k: v for k, v in os.environ.items() if k != "TOKENOPT_UPSTREAM_API_KEY"}
    if how == "env":
        env["TOKENOPT_UPSTREAM_API_KEY"] = key
    else:
        command += ["--upstream-api-key", key]
    with FakeUpstream(models=("first-model", "second-model"), api_key=key).running() as fake:
        result = subprocess.run(
            [*command, "--upstream", fake.url], capture_output=True, text=True, timeout=300, env=env
        )
    assert result.returncode == 0, result.stderr
    assert len(pq.read_table(out / "outcomes")) == 2 * len(BUDGETS)
    assert {seen.headers.get("authorization") for seen in fake.seen} == {f"Bearer {key}"}
    assert {seen.status for seen in fake.seen} == {200}
    assert {seen.body["model"] for seen in fake.completions()} == {"first-model"}
    assert key not in (out / "command.txt").read_text()
    assert key not in (out / "manifest.json").read_text()


def test_without_a_key_no_authorization_header_is_sent(tmp_path):
    with FakeUpstream().running() as fake:
        lm = UpstreamLM(fake.url, prompt_format=PromptFormat())
        lm.encode_prompts(["Q3 7?"])
    assert fake.seen and all("authorization" not in seen.headers for seen in fake.seen)
