"""OpenAI compatibility at the edges: /v1/models, error shapes of unknown routes, API pages behind the key."""

from __future__ import annotations

import httpx
import openai
import pytest
from serving import running_server

from tokenopt.serve import ServeConfig


def _config(tmp_path, policy, **overrides) -> ServeConfig:
    return ServeConfig(policy=policy, log=tmp_path / "decisions.sqlite", device="cpu", port=0, **overrides)


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_policy):
    with running_server(_config(tmp_path_factory.mktemp("openai"), demo_policy)) as (url, app):
        yield url


def test_models_lists_the_served_model_for_the_openai_client(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    models = client.models.list()
    assert [model.id for model in models.data] == ["demo"]
    assert models.data[0].owned_by == "tokenopt"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/v1/nowhere", 404), ("POST", "/v2/completions", 404), ("GET", "/v1/completions", 405)],
)
def test_unknown_routes_and_methods_answer_in_openais_error_shape(server, method, path, status):
    response = httpx.request(method, f"{server}{path}")
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == status and path in error["message"] and error["type"].endswith("_error")
    metrics = httpx.get(f"{server}/metrics").text
    assert f'tokenopt_errors_total{{kind="{status}"}}' in metrics


def test_model_must_be_a_string(server):
    response = httpx.post(f"{server}/v1/completions", json={"prompt": "M 1 2?", "model": 12345})
    assert response.status_code == 422 and response.json()["error"]["param"] == "model"


def test_api_pages_need_the_key_when_one_is_set(tmp_path, demo_policy):
    with running_server(_config(tmp_path, demo_policy, api_key="k")) as (url, _):
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(f"{url}{path}").status_code == 401, path
            assert httpx.get(f"{url}{path}", headers={"Authorization": "Bearer wrong"}).status_code == 401, path
            assert httpx.get(f"{url}{path}", headers={"Authorization": "Bearer k"}).status_code == 200, path
        spec = httpx.get(f"{url}/openapi.json", headers={"Authorization": "Bearer k"}).json()
        assert "/v1/completions" in spec["paths"] and "/v1/models" in spec["paths"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        assert [model.id for model in client.models.list().data] == ["demo"]
        assert httpx.get(f"{url}/v1/models").status_code == 401


@pytest.mark.parametrize(
    ("extra", "status", "param"),
    [
        ({"top_p": 0.5}, 422, "top_p"),
        ({"frequency_penalty": 1.0}, 422, "frequency_penalty"),
        ({"best_of": True}, 422, "best_of"),
        ({"frobnicate": 1}, 422, "frobnicate"),
        ({"logprobs": 1}, 422, "logprobs"),
        ({"top_p": 1, "presence_penalty": 0, "echo": False, "suffix": None}, 200, None),
    ],
)
def test_unsupported_parameters_are_refused_by_name_unless_neutral(server, extra, status, param):
    response = httpx.post(f"{server}/v1/completions", json={"prompt": "M 1 2?", **extra})
    assert response.status_code == status, response.text
    if param is not None:
        error = response.json()["error"]
        assert error["param"] == param and param in error["message"]
