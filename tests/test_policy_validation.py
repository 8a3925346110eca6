"""A policy is validated whole at load: shapes, dtypes and JSON types; a malformed one is refused, never served."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from serving import running_server

from tokenopt.runtime import BudgetPolicy, PolicyLoadError
from tokenopt.serve import ServeConfig


def _rehash(folder: Path) -> None:
    spec = json.loads((folder / "policy.json").read_text())
    spec["weights_sha256"] = hashlib.sha256((folder / "policy.npz").read_bytes()).hexdigest()
    (folder / "policy.json").write_text(json.dumps(spec))


def _with_arrays(source: Path, out: Path, change: Callable[[dict[str, np.ndarray], dict], None]) -> Path:
    """A copy whose arrays (and spec) ``change`` edits, with a matching sha256: only validation can catch it."""
    shutil.copytree(source, out)
    spec = json.loads((out / "policy.json").read_text())
    with np.load(out / "policy.npz") as data:
        arrays = dict(data)
    change(arrays, spec)
    np.savez(out / "policy.npz", **arrays)
    (out / "policy.json").write_text(json.dumps(spec))
    _rehash(out)
    return out


def _first_layer(spec: dict) -> dict:
    return spec["members"][0]["layers"][0]


def _wrong_weight_shape(arrays: dict[str, np.ndarray], spec: dict) -> None:
    layer = _first_layer(spec)
    weight = arrays[layer["weight"]]
    arrays[layer["weight"]] = np.zeros((weight.shape[0] + 3, weight.shape[1]), dtype=np.float32)
    layer["shape"] = list(arrays[layer["weight"]].shape)  # spec and array agree; the network does not


def _wrong_bias_shape(arrays: dict[str, np.ndarray], spec: dict) -> None:
    layer = _first_layer(spec)
    arrays[layer["bias"]] = np.zeros(arrays[layer["bias"]].shape[0] + 1, dtype=np.float32)


def _string_array(arrays: dict[str, np.ndarray], spec: dict) -> None:
    arrays["obs_mean"] = np.array(["a"] * arrays["obs_mean"].shape[0])


def _not_finite(arrays: dict[str, np.ndarray], spec: dict) -> None:
    arrays["obs_var"] = arrays["obs_var"].copy()
    arrays["obs_var"][0] = np.nan


def _actions_of_wrong_type(arrays: dict[str, np.ndarray], spec: dict) -> None:
    spec["actions"] = 7


def _fewer_actions(arrays: dict[str, np.ndarray], spec: dict) -> None:
    spec["actions"] = spec["actions"][:-1]


def _relu_and_large_logits(arrays: dict[str, np.ndarray], spec: dict) -> None:
    layers = spec["members"][0]["layers"]
    for layer in layers[:-1]:
        layer["activation"] = "relu"
    arrays[layers[-1]["weight"]] = arrays[layers[-1]["weight"]] * 400.0  # logits far beyond exp()'s range


@pytest.mark.parametrize("change", [None, _relu_and_large_logits], ids=["as-exported", "relu-unbounded-logits"])
def test_one_prompt_decides_as_the_batch_does(tmp_path, demo_policy, change):
    """decide() takes a shorter path for one observation; it must give the batch path's probabilities."""
    folder = demo_policy if change is None else _with_arrays(demo_policy, tmp_path / "policy", change)
    policy = BudgetPolicy.load(folder)
    rng = np.random.default_rng(0)
    prompts = ["C " + "+".join(map(str, rng.integers(1, 10, size=int(rng.integers(2, 7))))) + "?" for _ in range(64)]
    batch = policy.probabilities(policy.features.batch(prompts))
    single = np.stack([policy.decide(prompt).probabilities for prompt in prompts])
    assert np.isfinite(single).all()
    np.testing.assert_allclose(single, batch, rtol=0, atol=1e-12)
    assert [policy.decide(prompt).action for prompt in prompts] == [
        policy.actions[k]["name"] for k in batch.argmax(axis=1)
    ]
    if change is not None:  # the large logits make the decisions near one-hot, and not all the same action
        assert batch.max(axis=1).min() > 0.99 and len(set(batch.argmax(axis=1))) > 1


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (_wrong_weight_shape, "takes"),
        (_wrong_bias_shape, "bias"),
        (_string_array, "dtype"),
        (_not_finite, "not finite"),
        (_actions_of_wrong_type, "malformed"),
        (_fewer_actions, "outputs"),
    ],
)
def test_a_malformed_policy_is_refused_at_load(tmp_path, demo_policy, change, needle):
    folder = _with_arrays(demo_policy, tmp_path / "policy", change)
    with pytest.raises(PolicyLoadError, match=needle):
        BudgetPolicy.load(folder)


@pytest.mark.parametrize(
    "content",
    [b"[]", b"\xff\xfe not utf-8", b'{"format": "tokenopt-policy", "format_version": "2"}', b"[" * 5000],
)
def test_a_policy_json_that_is_not_a_policy_is_refused(tmp_path, demo_policy, content):
    folder = tmp_path / "policy"
    shutil.copytree(demo_policy, folder)
    (folder / "policy.json").write_bytes(content)
    with pytest.raises(PolicyLoadError):
        BudgetPolicy.load(folder)


def test_an_object_array_is_refused_without_running_pickle(tmp_path, demo_policy):
    folder = tmp_path / "policy"
    shutil.copytree(demo_policy, folder)
    with np.load(folder / "policy.npz") as data:
        arrays = dict(data)
    arrays["obs_mean"] = np.array([{"not": "numbers"}] * 3, dtype=object)
    np.savez(folder / "policy.npz", **arrays)  # savez pickles object arrays; load must refuse them
    _rehash(folder)
    with pytest.raises(PolicyLoadError, match="without pickle"):
        BudgetPolicy.load(folder)


def test_reload_refuses_a_malformed_policy_with_409_and_keeps_serving_the_old_one(tmp_path, demo_policy):
    live = tmp_path / "live"
    shutil.copytree(demo_policy, live)
    broken = _with_arrays(demo_policy, tmp_path / "broken", _wrong_weight_shape)
    config = ServeConfig(policy=live, log=tmp_path / "decisions.sqlite", device="cpu", port=0)
    with running_server(config) as (url, _):
        before = httpx.post(f"{url}/v1/completions", json={"prompt": "M 1 2?"}).json()["tokenopt"]["action"]
        for name in ("policy.json", "policy.npz"):
            shutil.copy(broken / name, live / name)
        failed = httpx.post(f"{url}/admin/reload")
        assert failed.status_code == 409, failed.text
        assert "takes" in failed.json()["error"]["message"]
        after = httpx.post(f"{url}/v1/completions", json={"prompt": "M 1 2?"})
        assert after.status_code == 200 and after.json()["tokenopt"]["action"] == before
        (live / "policy.json").write_bytes(b"[]")
        assert httpx.post(f"{url}/admin/reload").status_code == 409
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "M 1 2?"}).status_code == 200
