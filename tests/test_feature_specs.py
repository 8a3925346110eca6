"""Pluggable feature specs: the registry, lm-hidden from collection to the runtime and the server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import openai
import pytest
from serving import running_server

from tokenopt.collect import CollectConfig, add_features, collect
from tokenopt.demo.suite import SuiteConfig, generate_suite
from tokenopt.features import FEATURE_SPECS, Features, FeatureSpec, HiddenProjection, HiddenSource
from tokenopt.runtime import BudgetPolicy, PolicyLoadError
from tokenopt.serve import ServeConfig, create_app, read_decisions
from tokenopt.table import OutcomeMatrix, load_manifest

QUESTIONS = [item["question"] for item in generate_suite(SuiteConfig(n_queries=30, seed=23))]


def _synthetic(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, HiddenSource]:
    rng = np.random.default_rng(seed)
    prompt = rng.random((60, 9), dtype=np.float32)
    scales = np.r_[10.0, np.linspace(1.0, 0.1, 15)].astype(np.float32)  # one direction dominates
    hidden = rng.normal(size=(60, 16)).astype(np.float32) * scales
    train = np.arange(60) < 40
    return prompt, hidden, train, HiddenSource(model="m", layer=2, size=16)


@pytest.mark.parametrize("name", list(FEATURE_SPECS))
def test_every_spec_round_trips_through_its_dict_and_arrays(name):
    _, hidden, train, source = _synthetic()
    prompt_spec = FeatureSpec(alphabet="ab", hash_buckets=0)  # 7 summaries + 2 counts + other = 10 features
    prompt = np.random.default_rng(1).random((60, 10), dtype=np.float32)
    features, vectors = Features.fit(name, prompt, hidden, source, train, dim=4, prompt_spec=prompt_spec)
    assert features.name == name and vectors.shape == (60, features.dim) and len(features.names) == features.dim
    saved = json.loads(json.dumps(features.to_dict()))
    loaded = Features.from_dict(saved, features.arrays())
    assert loaded.to_dict() == features.to_dict() and loaded.needs_hidden == (name != "prompt-text")
    texts = ["ab ba", "b", "aab"]
    if loaded.needs_hidden:
        np.testing.assert_array_equal(loaded.batch(texts, hidden[:3]), features.batch(texts, hidden[:3]))
    else:
        assert saved == prompt_spec.to_dict()  # a prompt-text policy records exactly the dict it always did
        np.testing.assert_array_equal(loaded.batch(texts), features.batch(texts))


def test_the_projection_is_fitted_on_the_train_rows_only():
    _, hidden, train, source = _synthetic()
    hidden[~train] += 100.0  # val and test far away: a fit that saw them would move its mean
    features, vectors = Features.fit("lm-hidden", None, hidden, source, train, dim=3)
    assert features.projection is not None
    np.testing.assert_allclose(features.projection.mean, hidden[train].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(vectors[train].mean(axis=0), 0.0, atol=1e-4)
    assert abs(vectors[~train].mean()) > 1.0
    # The first axis is the direction of largest variance: the first hidden coordinate here.
    assert np.argmax(np.abs(features.projection.components[:, 0])) == 0
    again = HiddenProjection.fit(hidden[train], 3)
    np.testing.assert_array_equal(again.components, features.projection.components)


def test_unknown_specs_and_missing_parts_are_refused_by_name():
    prompt, hidden, train, source = _synthetic()
    with pytest.raises(ValueError, match=r"unknown feature spec 'lm-hiden' \(did you mean 'lm-hidden'\?\)"):
        Features.fit("lm-hiden", prompt, hidden, source, train)
    with pytest.raises(ValueError, match="tokenopt collect --out TABLE --features lm-hidden"):
        Features.fit("lm-hidden", prompt, None, None, train)


@pytest.fixture(scope="module")
def hidden_run(tmp_path_factory, demo_table):
    """The demo table (copied) with lm-hidden added by a prefill pass, and a policy trained on lm-hidden."""
    from tokenopt.agents.export import export_run
    from tokenopt.agents.ppo.train import TrainConfig, train

    root = tmp_path_factory.mktemp("hidden")
    table = root / "table"
    shutil.copytree(demo_table, table)
    before = {path.name: path.read_bytes() for path in (table / "outcomes").iterdir()}
    source = add_features(table, device="cpu")
    after = {path.name: path.read_bytes() for path in (table / "outcomes").iterdir()}
    assert before == after  # the outcome rows are not touched
    run = root / "run"
    train(TrainConfig(table=str(table), out=str(run), total_timesteps=8192, eval_freq=4096, features="lm-hidden"))
    return table, export_run(run), source


def test_a_table_gets_lm_hidden_without_decoding_and_training_uses_it(hidden_run, demo_lm):
    from tokenopt.agents.common.evaluation import check_policy_fits_table, policy_choices, query_questions

    table, policy_dir, source = hidden_run
    assert load_manifest(table)["lm_hidden"] == source.to_dict()
    assert source.layer == demo_lm.default_hidden_layer() and source.size == demo_lm.hidden_size
    matrix = OutcomeMatrix.from_table(table)
    assert matrix.hidden is not None and matrix.hidden.shape == (len(matrix.ids), source.size)
    questions = query_questions(table)
    # The recorded vector is the prompt's own prefill, as a server computes it for one request.
    for row in (0, 7):
        alone = demo_lm.prompt_hidden([demo_lm.encode_prompt(questions[matrix.ids[row]])], source.layer)[0]
        np.testing.assert_allclose(matrix.hidden[row], alone, rtol=1e-4, atol=1e-5)

    policy = BudgetPolicy.load(policy_dir)
    spec = json.loads((policy_dir / "policy.json").read_text())["feature_spec"]
    assert spec["name"] == "lm-hidden" and spec["hidden"] == source.to_dict() and spec["projection"]["dim"] == 32
    with np.load(policy_dir / "policy.npz") as arrays:
        mean = arrays["features_hidden_mean"]
    np.testing.assert_allclose(mean, matrix.hidden[matrix.splits == "train"].mean(axis=0), rtol=1e-5, atol=1e-6)
    check_policy_fits_table(policy, load_manifest(table), "the policy")
    test = matrix.subset("test")
    chosen = policy_choices(policy, test, questions)
    one_by_one = [policy.decide(questions[q], hidden=h).action for q, h in zip(test.ids, test.hidden, strict=True)]
    assert [test.actions[j] for j in chosen] == one_by_one
    assert len(set(one_by_one)) > 1  # the hidden state moves the decision


def test_decide_without_the_hidden_state_is_refused(hidden_run):
    _, policy_dir, source = hidden_run
    policy = BudgetPolicy.load(policy_dir)
    with pytest.raises(ValueError, match=rf"need the LM's hidden state.*layer {source.layer} of 'demo'.*hidden="):
        policy.decide(QUESTIONS[0])
    with pytest.raises(ValueError, match=r"hidden has shape \(3,\); this policy's features take \(128,\)"):
        policy.decide(QUESTIONS[0], hidden=np.zeros(3))
    with pytest.raises(ValueError, match="need the LM's hidden state"):
        policy.decide_batch(QUESTIONS[:2])


def test_the_local_server_decides_with_the_hidden_state_at_prefill(tmp_path, hidden_run, demo_lm):
    _, policy_dir, source = hidden_run
    policy = BudgetPolicy.load(policy_dir)
    config = ServeConfig(policy=policy_dir, log=tmp_path / "decisions.sqlite", device="cpu", port=0)
    with running_server(config) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        served = [
            client.completions.create(model="demo", prompt=q, seed=1).model_extra["tokenopt"]["action"]
            for q in QUESTIONS[:12]
        ]
    hidden = demo_lm.prompt_hidden([demo_lm.encode_prompt(q) for q in QUESTIONS[:12]], source.layer)
    assert served == [policy.decide(q, hidden=h).action for q, h in zip(QUESTIONS[:12], hidden, strict=True)]
    rows = read_decisions(tmp_path / "decisions.sqlite")
    assert rows.features.shape == (12, policy.features.dim)
    np.testing.assert_allclose(rows.features, policy.features.batch(QUESTIONS[:12], hidden), atol=1e-4)


def test_an_upstream_server_refuses_an_lm_hidden_policy_at_start_up(tmp_path, hidden_run):
    _, policy_dir, _ = hidden_run
    config = ServeConfig(policy=policy_dir, log=tmp_path / "log.sqlite", upstream="http://127.0.0.1:9")
    with pytest.raises(PolicyLoadError, match=r"lm-hidden.*an --upstream server cannot return"):
        create_app(config)


def test_upstream_collection_refuses_lm_hidden(tmp_path, demo_questions):
    config = CollectConfig(
        out=str(tmp_path / "t"), data=str(demo_questions), upstream="http://127.0.0.1:9", features="lm-hidden"
    )
    with pytest.raises(ValueError, match=r"--upstream server cannot return"):
        collect(config)
    assert not (Path(config.out) / "manifest.json").exists()


def test_collect_records_lm_hidden_and_a_resumed_collection_keeps_it(tmp_path, demo_questions, demo_lm):
    settings = {"out": str(tmp_path / "t"), "data": str(demo_questions), "budgets": [0, 4], "modes": ["greedy"]}
    collect(CollectConfig(**settings, features="lm-hidden", hidden_layer=1, device="cpu"))
    manifest = load_manifest(tmp_path / "t")
    assert manifest["lm_hidden"] == {"model": "demo", "layer": 1, "size": demo_lm.hidden_size, "pooling": "mean"}
    matrix = OutcomeMatrix.from_table(tmp_path / "t")
    from tokenopt.agents.common.evaluation import query_questions

    questions = query_questions(tmp_path / "t")
    expected = demo_lm.prompt_hidden([demo_lm.encode_prompt(questions[q]) for q in matrix.ids[:5]], 1)
    assert matrix.hidden is not None
    np.testing.assert_allclose(matrix.hidden[:5], expected, rtol=1e-4, atol=1e-5)
    # Run again with the table's settings and the default features: nothing recomputed, nothing lost.
    collect(CollectConfig(**settings, device="cpu"))
    assert load_manifest(tmp_path / "t")["lm_hidden"] == manifest["lm_hidden"]
    np.testing.assert_array_equal(OutcomeMatrix.from_table(tmp_path / "t").hidden, matrix.hidden)


def test_a_server_whose_lm_has_another_hidden_size_refuses_an_lm_hidden_policy(tmp_path, hidden_run):
    import transformers

    from tokenopt.demo import DEMO_MODEL_DIR

    _, policy_dir, source = hidden_run
    narrow = tmp_path / "narrow-lm"  # the demo's tokenizer on a Llama half as wide
    demo_config = transformers.AutoConfig.from_pretrained(DEMO_MODEL_DIR)
    config = transformers.LlamaConfig(
        vocab_size=demo_config.vocab_size, hidden_size=source.size // 2, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, eos_token_id=demo_config.eos_token_id,
        pad_token_id=demo_config.pad_token_id, bos_token_id=demo_config.bos_token_id,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(narrow)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_MODEL_DIR / name, narrow / name)
    serve = ServeConfig(policy=policy_dir, model=str(narrow), log=tmp_path / "log.sqlite", device="cpu", port=0)
    with pytest.raises(
        PolicyLoadError, match=rf"hidden state of size {source.size}.*has hidden size {source.size // 2}"
    ):
        create_app(serve)
    assert not (tmp_path / "log.sqlite").exists() or read_decisions(tmp_path / "log.sqlite").features.shape[0] == 0
