"""No train/serve skew: the policy records its prompt format, and the server reads the question as collection did."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from serving import running_server

from tokenopt.demo.suite import SuiteConfig, generate_suite, write_jsonl
from tokenopt.prompt import PromptFormat
from tokenopt.runtime import BudgetPolicy
from tokenopt.serve import ServeConfig, create_app, read_decisions

TEMPLATE = "Q: {question}\nA:"


def test_question_of_reads_the_question_back_out_of_its_template():
    fmt = PromptFormat(template=TEMPLATE)
    assert fmt.question_of(fmt.prompt_text("C 3+4?")) == "C 3+4?"
    assert fmt.question_of("C 3+4?") == "C 3+4?"  # a bare question stays as it is
    assert fmt.question_of("Q: \nA:") == ""
    assert PromptFormat().question_of("Q: x\nA:") == "Q: x\nA:"  # the plain template strips nothing


def test_the_record_round_trips_and_a_malformed_one_is_refused():
    fmt = PromptFormat(template=TEMPLATE, answer_cue="\nFinal answer:", answer_regex=r"(\d+)", max_answer_tokens=5)
    assert PromptFormat.from_dict(json.loads(json.dumps(fmt.to_dict()))) == fmt
    for broken, field in (({"template": 3}, "template"), ({"max_answer_tokens": True}, "max_answer_tokens")):
        with pytest.raises(ValueError, match=field):
            PromptFormat.from_dict(fmt.to_dict() | broken)
    with pytest.raises(ValueError, match="features_read"):
        PromptFormat.from_dict(fmt.to_dict() | {"features_read": "prompt"})


@pytest.fixture(scope="module")
def templated_policy(tmp_path_factory):
    """A policy trained on a small table collected with a non-trivial prompt template."""
    from tokenopt.agents.export import export_run
    from tokenopt.agents.ppo.train import TrainConfig, train
    from tokenopt.collect import CollectConfig, collect

    root = tmp_path_factory.mktemp("templated")
    questions = write_jsonl(generate_suite(SuiteConfig(n_queries=160, seed=13)), root / "questions.jsonl")
    table = root / "table"
    collect(
        CollectConfig(
            out=str(table), data=str(questions), budgets=[0, 4, 8], modes=["greedy"], prompt_template=TEMPLATE,
            device="cpu",
        )
    )  # fmt: skip
    train(TrainConfig(table=str(table), out=str(root / "run"), total_timesteps=4096, eval_freq=2048))
    return export_run(root / "run"), table


def test_the_policy_records_its_prompt_format_and_the_server_serves_it(tmp_path, templated_policy):
    policy_dir, table = templated_policy
    policy = BudgetPolicy.load(policy_dir)
    assert policy.prompt_format == PromptFormat(template=TEMPLATE)
    config = ServeConfig(policy=policy_dir, log=tmp_path / "decisions.sqlite", device="cpu", port=0)
    questions = [row["question"] for row in map(json.loads, (table.parent / "questions.jsonl").open())][:40]
    with running_server(config) as (url, app):
        assert app.state.tokenopt.config.prompt_template == TEMPLATE  # no flag: the policy's format
        ids = {}
        for question in questions:
            templated = httpx.post(f"{url}/v1/completions", json={"prompt": TEMPLATE.format(question=question)})
            chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": question}]})
            expected = policy.decide(question).action
            for response in (templated, chat):
                assert response.status_code == 200, response.text
                assert response.json()["tokenopt"]["action"] == expected
                ids[response.json()["id"]] = question
    rows = read_decisions(tmp_path / "decisions.sqlite")
    assert len(rows.id) == 2 * len(questions)
    for request_id, features in zip(rows.id, rows.features, strict=True):
        # The features are the bare question's, as at collection, never the templated prompt's.
        assert np.array_equal(features, policy.features(ids[request_id]).astype(np.float32))


def test_a_prompt_flag_that_conflicts_with_the_policy_is_refused_unless_forced(tmp_path, templated_policy):
    policy_dir, _ = templated_policy
    base = {"policy": policy_dir, "log": tmp_path / "decisions.sqlite", "device": "cpu", "port": 0}
    with pytest.raises(ValueError, match="--answer-cue '#' differs from the prompt format"):
        create_app(ServeConfig(**base, answer_cue="#"))
    with pytest.raises(ValueError, match="--prompt-template"):
        create_app(ServeConfig(**base, prompt_template="{question}"))
    forced = create_app(ServeConfig(**base, prompt_template="{question}", force_prompt_format=True))
    assert forced.state.tokenopt.config.prompt_template == "{question}"
    agreeing = create_app(ServeConfig(**base, prompt_template=TEMPLATE, answer_cue="="))
    assert agreeing.state.tokenopt.config.prompt_template == TEMPLATE


def test_a_system_prompt_is_recorded_and_needs_the_chat_template():
    fmt = PromptFormat(template="{question}", use_chat_template=True, system_prompt="Answer briefly.")
    assert PromptFormat.from_dict(json.loads(json.dumps(fmt.to_dict()))) == fmt
    assert fmt.chat_messages("2+2?") == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "2+2?"},
    ]
    assert PromptFormat(use_chat_template=True).chat_messages("2+2?") == [{"role": "user", "content": "2+2?"}]
    # a record written before system prompts existed still loads
    old = {k: v for k, v in PromptFormat().to_dict().items() if k != "system_prompt"}
    assert PromptFormat.from_dict(old).system_prompt is None
    with pytest.raises(ValueError, match="chat template"):
        PromptFormat(system_prompt="Answer briefly.")
    with pytest.raises(ValueError, match="system_prompt"):
        PromptFormat.from_dict(fmt.to_dict() | {"system_prompt": 3})
