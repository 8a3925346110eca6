"""tokenopt train --from-log: off-policy refinement of an exported policy from a decision log with feedback."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from tokenopt.agents.export import export_run
from tokenopt.agents.from_log import (
    FromLogConfig,
    PolicyNetwork,
    greedy_snips,
    refine_from_log,
    snips_gain_interval,
)
from tokenopt.agents.ppo.train import TrainConfig, train
from tokenopt.cli import app
from tokenopt.decisions import DecisionLog, DecisionRecord
from tokenopt.runtime import BudgetPolicy
from tokenopt.table import OutcomeMatrix

runner = CliRunner(env={"COLUMNS": "2000"})  # rich wraps error messages at the console width
TARGET_FAMILY = "chain"
"""The family whose feedback is rewritten: the cheap action always right, the policy's choice wrong."""
CHEAP_ACTION = "b0/greedy"


def _output(result):
    return " ".join(result.output.split())


def write_served_log(path, policy_dir, table, *, explore, requests_per_query, seed, families=None, feedback=True,
                     prices=None):  # fmt: skip
    """A decision log as a server exploring with ``explore`` would write it for the table's queries.

    ``prices``: a (low, high) range from which each request of a price-conditioned policy draws the lambda
    it is decided at (log-uniformly), as a budgeted server's moving price would; it is logged with the row.

    Each query is served ``requests_per_query`` times: features from the policy's own extractor, the
    action drawn from ``(1 - explore) * onehot(argmax) + explore * uniform`` and billed tokens from the
    outcome table. The feedback says the policy's choice is right and every other action wrong, except on
    ``TARGET_FAMILY``, where ``CHEAP_ACTION`` is right and every other action (the policy's choice too) wrong.
    A bypassed request and a failed one (which the refinement must leave out) close the log.
    """
    rng = np.random.default_rng(seed)
    policy = BudgetPolicy.load(policy_dir)
    names = [str(action["name"]) for action in policy.actions]
    queries = pq.read_table(Path(table) / "queries.parquet").to_pandas()
    if families is not None:
        queries = queries[queries.family.isin(families)]
    matrix = OutcomeMatrix.from_table(table)
    row_of = {query_id: i for i, query_id in enumerate(matrix.ids)}
    column = [list(matrix.actions).index(name) for name in names]
    features = policy.features.batch(list(queries.question))
    description = {"policy_id": policy.policy_id, "path": str(policy_dir), "actions": names,
                   "feature_spec": policy.spec["feature_spec"], "extra_inputs": policy.extra_inputs}  # fmt: skip
    log = DecisionLog(path, {"A": description})

    def record(k, index, propensity, **changes):
        table_row, table_column = row_of[queries.id.iloc[k]], column[index]
        fields = dict(
            id=f"cmpl-{log.count():06d}", arm="A", policy_id=policy.policy_id, endpoint="completions",
            bypass=False, action=names[index], action_index=index, budget=int(policy.actions[index]["budget"]),
            mode=str(policy.actions[index]["mode"]), propensity=propensity, features=features[k].tobytes(),
            billed_tokens=int(matrix.billed_tokens[table_row, table_column]), created=float(log.count() + 1),
        )  # fmt: skip
        return DecisionRecord(**(fields | changes))

    for _ in range(requests_per_query):
        weights = None if prices is None else np.exp(rng.uniform(*np.log(prices), size=len(queries)))
        greedy = policy.decision_probabilities(features.astype(np.float64), weights).argmax(axis=1)
        for k, family in enumerate(queries.family):
            serving = np.full(len(names), explore / len(names))
            serving[greedy[k]] += 1.0 - explore
            action = int(rng.choice(len(names), p=serving))
            row = record(k, action, float(serving[action]), cost_weight=None if weights is None else float(weights[k]))
            log.append(row)
            if feedback:
                correct = names[action] == CHEAP_ACTION if family == TARGET_FAMILY else action == greedy[k]
                log.attach_feedback(row.id, correct, None)
    for changes in ({"bypass": True, "policy_id": "bypass", "action_index": -1, "action": "bypass"}, {"status": 500}):
        row = record(0, 0, 1.0, **changes)
        log.append(row)
        log.attach_feedback(row.id, True, None)
    log.close()
    return path


@pytest.fixture(scope="module")
def served_policy(tmp_path_factory, demo_table):
    """A policy trained for 20,480 steps (it picks b32/greedy on chain), exported."""
    run = tmp_path_factory.mktemp("served") / "run"
    train(TrainConfig(table=str(demo_table), out=str(run), total_timesteps=20_480, eval_freq=4096))
    return export_run(run)


@pytest.fixture(scope="module")
def questions(demo_table):
    return pq.read_table(demo_table / "queries.parquet", columns=["question", "family"]).to_pandas()


@pytest.fixture(scope="module")
def refined(tmp_path_factory, served_policy, demo_table):
    """The served policy refined on 3,000 logged requests (exploration 0.2) with constructed feedback."""
    root = tmp_path_factory.mktemp("refined")
    log = write_served_log(root / "log.db", served_policy, demo_table, explore=0.2, requests_per_query=2, seed=0)
    return log, refine_from_log(FromLogConfig(log=str(log), init_from=str(served_policy), out=str(root / "run")))


def test_the_torch_network_computes_the_runtime_probabilities(served_policy, questions):
    from tokenopt.agents.from_log import _normalize

    policy = BudgetPolicy.load(served_policy)
    features = policy.features.batch(list(questions.question[:300]))
    network = PolicyNetwork(policy.members[0])
    with torch.no_grad():
        probabilities = torch.softmax(network(torch.as_tensor(_normalize(policy, features))), dim=1).numpy()
    np.testing.assert_allclose(probabilities, policy.probabilities(features), atol=1e-12)


def test_refinement_learns_the_cheap_action_where_feedback_says_so(refined, served_policy, questions):
    _, result = refined
    old, new = BudgetPolicy.load(served_policy), BudgetPolicy.load(result.policy_dir)
    features = old.features.batch(list(questions.question))
    before, after = old.probabilities(features), new.probabilities(features)
    cheap = [str(action["name"]) for action in old.actions].index(CHEAP_ACTION)
    target = (questions.family == TARGET_FAMILY).to_numpy()
    assert before[target, cheap].mean() < 0.05, "precondition: the served policy rarely picks the cheap action"
    assert after[target, cheap].mean() > 0.5
    assert (after[target].argmax(axis=1) == cheap).mean() > 0.5
    # elsewhere the feedback confirms the policy's choices: they stay, where the policy was not near a tie
    unrelated = ~target
    kept = before[unrelated].argmax(axis=1) == after[unrelated].argmax(axis=1)
    ranked = np.sort(before[unrelated], axis=1)
    confident = ranked[:, -1] - ranked[:, -2] >= 0.1
    assert kept.mean() >= 0.85
    assert kept[confident].mean() >= 0.95
    # the held-out estimate sees the gain; the rows left out are counted
    assert result.holdout_new["reward"] > result.holdout_old["reward"] + 0.1
    assert result.verdict == "better" and result.holdout_gain_interval is not None
    assert 0 < result.holdout_gain_interval[0] < result.holdout_gain < result.holdout_gain_interval[1]
    assert result.rows == {"arm": 3002, "decided": 3000, "capped": 0, "with_feedback": 3000, "train": 2400,
                           "holdout": 600}  # fmt: skip
    assert result.stochastic_share == 1.0 and 0.1 < result.off_greedy_share < 0.3
    # the new choices on chain rest on the few explored rows there: the estimate says so
    assert len(result.warnings) == 1 and "effective rows" in result.warnings[0] and "A/B test" in result.warnings[0]


def test_the_refined_policy_is_exported_in_the_runtime_format(refined, served_policy, questions):
    _, result = refined
    old_spec = json.loads((Path(served_policy) / "policy.json").read_text())
    spec = json.loads((Path(result.policy_dir) / "policy.json").read_text())
    for key in ("format", "format_version", "feature_spec", "actions", "normalization", "env_id", "answer_tokens"):
        assert spec[key] == old_spec[key], key
    assert spec["policy_id"] == result.policy_id != old_spec["policy_id"]
    assert spec["metadata"]["init_policy_id"] == old_spec["policy_id"]
    old, new = BudgetPolicy.load(served_policy), BudgetPolicy.load(result.policy_dir)  # checks the sha256 too
    np.testing.assert_array_equal(new.obs_mean, old.obs_mean)
    np.testing.assert_array_equal(new.obs_var, old.obs_var)
    decision = new.decide(questions.question[0])
    assert decision.action in [action["name"] for action in new.actions]
    figures = json.loads((Path(result.policy_dir).parent / "from_log.json").read_text())
    assert figures["holdout_new"]["reward"] == result.holdout_new["reward"]
    assert len(figures["epochs"]) == 30


def test_greedy_snips_weights_matching_rows_by_their_propensity():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    actions = np.array([0, 0, 0])
    propensity = np.array([0.5, 0.5, 0.25])
    result = greedy_snips(probabilities, actions, propensity, {"reward": np.array([1.0, 0.0, 0.4])})
    # rows 0 and 2 match the greedy action, with weights 2 and 4
    assert result["matched_rows"] == 2
    assert result["reward"] == pytest.approx((2 * 1.0 + 4 * 0.4) / 6)
    assert result["effective_rows"] == pytest.approx(36 / 20)
    assert greedy_snips(probabilities, np.array([1, 0, 1]), propensity, {"reward": np.ones(3)})["reward"] is None


def test_the_gain_interval_brackets_a_clear_difference_and_is_seeded():
    rng = np.random.default_rng(0)
    rows = 400
    actions = rng.integers(0, 2, size=rows)
    propensity = np.full(rows, 0.5)
    rewards = np.where(actions == 1, 0.9, 0.3) + rng.normal(0, 0.05, size=rows)
    old = np.tile([0.9, 0.1], (rows, 1))  # greedy action 0 (worth 0.3)
    new = np.tile([0.1, 0.9], (rows, 1))  # greedy action 1 (worth 0.9)
    low, high = snips_gain_interval(old, new, actions, propensity, rewards, seed=3)
    assert 0.5 < low < 0.6 < high < 0.7
    assert snips_gain_interval(old, new, actions, propensity, rewards, seed=3) == (low, high)
    assert snips_gain_interval(old, new, np.zeros(rows, dtype=int), propensity, rewards) is None


def test_seeded_refinement_is_deterministic_and_the_cli_writes_the_run(served_policy, demo_table, tmp_path):
    log = write_served_log(tmp_path / "log.db", served_policy, demo_table, explore=0.3, requests_per_query=1, seed=1,
                           families=["chain", "max"])  # fmt: skip
    first = refine_from_log(FromLogConfig(log=str(log), init_from=str(served_policy), out=str(tmp_path / "a"),
                                          epochs=3))  # fmt: skip
    command = ["train", "--from-log", str(log), "--init-from", str(served_policy), "--out", str(tmp_path / "b"),
               "--epochs", "3", "--clip", "0.2", "--set", "learning_rate=2e-3"]  # fmt: skip
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    assert "held-out rows" in _output(result) and "old: reward" in _output(result)
    for name in ("policy/policy.json", "from_log.json", "config.yml", "command.txt"):
        assert (tmp_path / "b" / name).is_file(), name
    with np.load(Path(first.policy_dir) / "policy.npz") as a, np.load(tmp_path / "b" / "policy" / "policy.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])


def test_a_log_without_exploration_is_warned_about(served_policy, demo_table, tmp_path):
    log = write_served_log(tmp_path / "log.db", served_policy, demo_table, explore=0.0, requests_per_query=1, seed=2,
                           families=["chain", "swap"])  # fmt: skip
    result = refine_from_log(FromLogConfig(log=str(log), init_from=str(served_policy), out=str(tmp_path / "run"),
                                           epochs=2))  # fmt: skip
    assert result.stochastic_share == 0.0 and result.off_greedy_share == 0.0
    assert any("did not explore" in warning and "--explore" in warning for warning in result.warnings)
    assert set(result.single_action_regions) >= {"b32/greedy"}
    cli = runner.invoke(app, ["train", "--from-log", str(log), "--init-from", str(served_policy),
                              "--out", str(tmp_path / "cli"), "--epochs", "1"])  # fmt: skip
    assert cli.exit_code == 0, cli.output
    assert "warning:" in _output(cli) and "--explore EPS" in _output(cli)


def test_bad_logs_and_policies_are_refused_with_the_reason(served_policy, demo_table, tmp_path):
    silent = write_served_log(tmp_path / "silent.db", served_policy, demo_table, explore=0.2, requests_per_query=1,
                              seed=3, families=["max"], feedback=False)  # fmt: skip
    settings = FromLogConfig(log=str(silent), init_from=str(served_policy), out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"none of them has feedback|0 of them with feedback"):
        refine_from_log(settings)
    result = runner.invoke(app, ["train", "--from-log", str(silent), "--init-from", str(served_policy)])
    assert result.exit_code == 2 and "POST /v1/feedback" in _output(result)

    log = write_served_log(tmp_path / "log.db", served_policy, demo_table, explore=0.2, requests_per_query=1, seed=3,
                           families=["max"])  # fmt: skip
    other = tmp_path / "other"
    shutil.copytree(served_policy, other)
    spec = json.loads((other / "policy.json").read_text())
    spec["actions"][-1]["name"] = "b64/beam3"
    spec["policy_id"] = "other-policy"
    (other / "policy.json").write_text(json.dumps(spec))
    result = runner.invoke(app, ["train", "--from-log", str(log), "--init-from", str(other), "--out", str(tmp_path)])
    assert result.exit_code == 2
    message = _output(result)
    served_id = BudgetPolicy.load(served_policy).policy_id
    assert "action table" in message and "b64/beam3" in message and "b32/beam3" in message
    assert repr(served_id) in message and "'other-policy'" in message
    spec["actions"][-1]["name"] = "b32/beam3"
    spec["feature_spec"]["alphabet"] = spec["feature_spec"]["alphabet"][::-1]
    (other / "policy.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"feature spec of arm A .* differs from that of the policy .* \['alphabet'\]"):
        refine_from_log(FromLogConfig(log=str(log), init_from=str(other), out=str(tmp_path / "run")))

    with pytest.raises(ValueError, match=r"has no arm 'B' \(its arms: \['A'\]\)"):
        refine_from_log(FromLogConfig(log=str(log), init_from=str(served_policy), out=str(tmp_path), arm="B"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        refine_from_log(FromLogConfig(log=str(tmp_path / "none.db"), init_from=str(served_policy)))
    with pytest.raises(ValueError, match=r"--clip must be in \(0, 1\)"):
        refine_from_log(FromLogConfig(log=str(log), init_from=str(served_policy), clip=1.5))
    with pytest.raises(ValueError, match="unknown --from-log setting 'learnig_rate'; did you mean 'learning_rate'"):
        FromLogConfig().with_overrides({"learnig_rate": 0.1})
    result = runner.invoke(app, ["train", "--from-log", str(log), "--init-from", str(served_policy),
                                 "--table", str(demo_table)])  # fmt: skip
    assert result.exit_code == 2 and "['--table'] train PPO on an outcome table" in _output(result)
    result = runner.invoke(app, ["train", "--table", str(demo_table), "--epochs", "3"])
    assert result.exit_code == 2 and "['--epochs'] apply only with --from-log" in _output(result)


def test_a_price_conditioned_policy_is_refined_at_each_row_s_logged_price(conditioned_policy, demo_table, tmp_path):
    # Do no harm fell back to the dearest action above lambda 0.03 (a fallback written as `tokenopt train` writes
    # one): the refinement keeps it there, and learns the network from the rows at every logged price.
    served = tmp_path / "served"
    shutil.copytree(conditioned_policy, served)
    spec = json.loads((served / "policy.json").read_text())
    low, high = spec["cost_weight_range"]
    spec["price_fallback"] = [{"low": 0.03, "high": high, "action": "b32/beam3"}]
    (served / "policy.json").write_text(json.dumps(spec))
    log = write_served_log(tmp_path / "log.db", served, demo_table, explore=0.2, requests_per_query=2, seed=0,
                           prices=(low, high))  # fmt: skip
    result = refine_from_log(FromLogConfig(log=str(log), init_from=str(served), out=str(tmp_path / "run")))
    old, new = BudgetPolicy.load(served), BudgetPolicy.load(result.policy_dir)
    assert new.cost_weight_range == old.cost_weight_range and new.cost_weight == old.cost_weight
    assert new.price_fallback == old.price_fallback and new.prompt_format == old.prompt_format
    questions = pq.read_table(demo_table / "queries.parquet", columns=["question", "family"]).to_pandas()
    chain = list(questions.question[questions.family == TARGET_FAMILY])
    assert [d.action for d in new.decide_batch(chain, cost_weight=0.04)] == ["b32/beam3"] * len(chain)
    # Below the fallback the feedback (the cheap action right on chain) moved the decisions, at low and high prices.
    for weight in (0.004, 0.02):
        before = np.mean([d.action == CHEAP_ACTION for d in old.decide_batch(chain, cost_weight=weight)])
        after = np.mean([d.action == CHEAP_ACTION for d in new.decide_batch(chain, cost_weight=weight)])
        assert before < 0.2 and after > 0.5, (weight, before, after)
    assert result.verdict == "better" and result.holdout_new["reward"] > result.holdout_old["reward"]

    # Rows without a lambda (a log written before it was recorded) cannot be priced: refused, naming the row.
    unpriced = write_served_log(tmp_path / "unpriced.db", served, demo_table, explore=0.2, requests_per_query=1,
                                seed=1, families=["max"])  # fmt: skip
    with pytest.raises(ValueError, match=r"row 'cmpl-000000' was decided at cost_weight nan, outside .* 0\.003:0\.05"):
        refine_from_log(FromLogConfig(log=str(unpriced), init_from=str(served), out=str(tmp_path / "run2")))
