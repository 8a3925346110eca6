"""The probe controller at serving time and on the scoreboard: runtime session, DEER-style rule, eval."""

import hashlib
import json
import pickle
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from tokenopt.agents.evaluation.baselines import deer_points, dynasor_points, probe_controller_point, probe_oracle_point
from tokenopt.agents.evaluation.gate import query_questions
from tokenopt.agents.export import export_run
from tokenopt.agents.ppo.train import TrainConfig, train
from tokenopt.cli import app
from tokenopt.cost import CostModel
from tokenopt.envs import TokenBudgetProbeEnv
from tokenopt.probe import ProbeAction
from tokenopt.runtime import ANSWER, CONTINUE, ESCALATE, PROBE_INPUTS, BudgetPolicy, PolicyLoadError
from tokenopt.table import OutcomeMatrix, ReplayTable


@pytest.fixture(scope="module")
def replay(demo_table):
    return ReplayTable.load(demo_table, OutcomeMatrix.from_table(demo_table))


def _probe(session, replay, query, ladder, step):
    """Report the table's probe at a checkpoint, with the tokens billed so far (probe price 1)."""
    column = ladder[step]
    spent = replay.reasoning_tokens[query, column] + replay.probe_tokens[query, ladder[: step + 1]].sum()
    return session.observe(
        replay.answers[query, column], replay.answer_logprob[query, column], spent, replay.natural_stop[query, column]
    )


@pytest.mark.parametrize("split", ["val", "test"])
def test_session_sees_what_the_environment_shows_the_policy(probe_run, replay, demo_table, split):
    from stable_baselines3 import PPO

    policy = BudgetPolicy.load(probe_run / "policy")
    env = TokenBudgetProbeEnv(replay=replay, split=split)
    model = PPO.load(probe_run / "checkpoints" / "best_model.zip", device="cpu")
    with (probe_run / "checkpoints" / "vecnormalize.pkl").open("rb") as handle:
        stats = pickle.load(handle)  # the run's own training checkpoint
    table, ladder = env.replay, env.ladder
    questions = query_questions(demo_table)
    asked = 0
    for query, query_id in enumerate(table.matrix.ids):
        observation, _ = env.reset(options={"query": query})
        session = policy.start(questions[query_id])
        while True:
            assert session.next_budget == table.budgets[ladder[session.checkpoint]]
            decision = _probe(session, table, query, ladder, session.checkpoint)
            # The session computed the features from the question text and the probe inputs from the
            # reported probes: bit for bit what the environment gives the trained agent.
            np.testing.assert_array_equal(session.observation, observation)
            action = int(model.predict(stats.normalize_obs(observation[None, :]), deterministic=True)[0][0])
            if session.probabilities is not None:
                asked += 1
                assert decision == (CONTINUE if action == ProbeAction.CONTINUE else ANSWER)
            observation, _, done, _, info = env.step(action)
            if done and decision == CONTINUE:
                # The environment answered at the next checkpoint by itself (natural stop or the
                # last budget); the session does the same without asking the controller.
                assert _probe(session, table, query, ladder, session.checkpoint) == ANSWER
                assert session.probabilities is None
            if done:
                break
            assert decision == CONTINUE
        assert session.done and session.next_budget is None
        assert session.checkpoint == info["checkpoint"]
    assert asked > len(table.matrix.ids)


def test_eval_replay_bills_what_the_environment_bills(probe_run, replay, demo_table):
    policy = BudgetPolicy.load(probe_run / "policy")
    env = TokenBudgetProbeEnv(replay=replay, split="test")
    point = probe_controller_point(policy, env.replay, query_questions(demo_table))
    for query in range(len(env.replay.matrix.ids)):
        observation, _ = env.reset(options={"query": query})
        while True:
            action = int(np.argmax(policy.probabilities(observation[None, :])[0]))
            observation, _, done, _, info = env.step(action)
            if done:
                break
        assert point.billed_tokens[query] == info["billed_tokens"]
        assert point.exact_match[query] == info["em"]
        assert point.actions[query] == env.ladder[info["checkpoint"]]


def _forced(policy_dir, out, decision):
    """A copy of the controller whose output layer always says ``decision``."""
    shutil.copytree(policy_dir, out)
    spec = json.loads((out / "policy.json").read_text())
    with np.load(out / "policy.npz") as data:
        arrays = dict(data)
    head = spec["members"][0]["layers"][-1]
    arrays[head["weight"]] = np.zeros_like(arrays[head["weight"]])
    arrays[head["bias"]] = np.array([10.0, -10.0] if decision == ANSWER else [-10.0, 10.0], dtype=np.float32)
    np.savez(out / "policy.npz", **arrays)
    spec["weights_sha256"] = hashlib.sha256((out / "policy.npz").read_bytes()).hexdigest()
    (out / "policy.json").write_text(json.dumps(spec))
    return BudgetPolicy.load(out)


def test_session_answers_by_itself_at_a_natural_stop_and_the_last_checkpoint(probe_run, tmp_path):
    eager = _forced(probe_run / "policy", tmp_path / "eager", CONTINUE)
    assert eager.probe.checkpoints == (0, 4, 8, 16, 32) and eager.probe.mode == "greedy"
    session = eager.start("C 3+4*2-5?")
    assert (session.checkpoint, session.next_budget, session.done, session.decision) == (0, 0, False, None)
    for step, budget in enumerate([4, 8, 16, 32]):
        assert session.observe("7", -0.05, 2 + step * 6, stopped=False) == CONTINUE
        assert session.probabilities[1] > 0.99
        assert (session.checkpoint, session.next_budget) == (step + 1, budget)
    # The last checkpoint answers without asking the controller, which would say continue.
    assert session.observe("7", -0.05, 30, stopped=False) == ANSWER
    assert session.done and session.probabilities is None and session.next_budget is None
    assert session.checkpoint == 4
    with pytest.raises(RuntimeError, match=r"already answered at checkpoint 4 \(budget 32\)"):
        session.observe("7", -0.05, 40, False)
    # So does a probe after the LM stopped reasoning by itself.
    session = eager.start("C 3+4*2-5?")
    assert session.observe("7", -0.7, 2, stopped=False) == CONTINUE
    assert session.observe("9", -0.1, 9, stopped=True) == ANSWER
    assert session.checkpoint == 1 and session.probabilities is None
    # The observation is the environment's: features, then the probe inputs.
    probes = dict(zip(PROBE_INPUTS, session.observation[-len(PROBE_INPUTS) :], strict=True))
    assert probes == pytest.approx(
        {
            "tokens_spent_fraction": 9 / 32,
            "checkpoint_fraction": 0.25,
            "probe_logprob": -0.1,
            "agrees_with_last": 0.0,
            "last_three_agree": 0.0,
            "answer_changes_fraction": 1.0,
            "stopped_by_itself": 1.0,
        }  # fmt: skip
    )
    lazy = _forced(probe_run / "policy", tmp_path / "lazy", ANSWER)
    session = lazy.start("C 3+4*2-5?")
    assert session.observe("7", -0.7, 2, stopped=False) == ANSWER
    assert session.probabilities[0] > 0.99 and session.checkpoint == 0


def test_session_and_decide_refuse_what_they_cannot_do(probe_run, tmp_path):
    policy = BudgetPolicy.load(probe_run / "policy")
    session = policy.start("C 3+4*2-5?")
    with pytest.raises(ValueError, match="logprob must be a finite mean log-probability <= 0; got nan"):
        session.observe("7", float("nan"), 2, False)
    with pytest.raises(ValueError, match="logprob must be a finite mean log-probability <= 0; got 0.5"):
        session.observe("7", 0.5, 2, False)
    with pytest.raises(ValueError, match="tokens_spent must be a finite count >= 0"):
        session.observe("7", -0.5, -1, False)
    eager = _forced(probe_run / "policy", tmp_path / "eager", CONTINUE).start("C 3+4?")
    eager.observe("7", -0.5, 10, False)
    with pytest.raises(ValueError, match="tokens_spent must be a finite count >= 10 .*; got 5"):
        eager.observe("7", -0.5, 5, False)
    with pytest.raises(ValueError, match=r"start\(prompt\)"):
        policy.decide("C 3+4?")
    per_query = tmp_path / "per_query"
    shutil.copytree(probe_run / "policy", per_query)
    spec = json.loads((per_query / "policy.json").read_text())
    spec["env_id"] = "tokenopt/TokenBudget-v0"
    (per_query / "policy.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"start\(\) is for tokenopt/TokenBudgetProbe-v0 controllers"):
        BudgetPolicy.load(per_query).start("C 3+4?")


def test_a_probe_export_without_its_settings_is_refused(probe_run, tmp_path):
    spec = json.loads((probe_run / "policy" / "policy.json").read_text())
    assert spec["probe"] == {"mode": "greedy", "checkpoints": [0, 4, 8, 16, 32], "probe_token_price": 1.0}
    assert spec["extra_inputs"] == PROBE_INPUTS
    for name, change, message in (
        ("old", lambda s: s.pop("probe"), "export the run again"),
        ("ladder", lambda s: s["probe"].update(checkpoints=[0, 8, 32]), r"not the budgets \[0, 4, 8, 16, 32\]"),
        ("price", lambda s: s["probe"].update(probe_token_price=-1), "probe_token_price must be a finite"),
    ):
        folder = tmp_path / name
        shutil.copytree(probe_run / "policy", folder)
        edited = json.loads((folder / "policy.json").read_text())
        change(edited)
        (folder / "policy.json").write_text(json.dumps(edited))
        with pytest.raises(PolicyLoadError, match=message):
            BudgetPolicy.load(folder)


def test_deer_rule_at_the_extreme_thresholds(replay):
    test = replay.subset("test")
    rows = np.arange(len(test.matrix.ids))
    never = {p.setting: p for p in deer_points(test, thresholds=(1.0,))}
    always = {p.setting: p for p in deer_points(test, thresholds=(0.0,))}
    for mode in test.mode_names:
        ladder = test.ladder(mode)
        # Threshold 0: every probe is confident, so the first one answers: the budget-0 action, same bill.
        first = always[f"{mode}, from b0, confidence > 0"]
        assert np.all(first.actions == ladder[0])
        np.testing.assert_array_equal(first.billed_tokens, test.matrix.billed_tokens[:, ladder[0]])
        # Threshold 1: never confident, so it reasons to the natural stop or the last budget,
        # paying every probe: exactly what the environment bills for always continuing.
        last = never[f"{mode}, from b0, confidence > 1"]
        stop = [next(k for k, j in enumerate(ladder) if test.natural_stop[i, j] or k == len(ladder) - 1) for i in rows]
        exits = np.asarray(ladder)[stop]
        assert np.array_equal(last.actions, exits)
        np.testing.assert_array_equal(last.exact_match, test.matrix.exact_match[rows, exits])
        expected = [
            test.reasoning_tokens[i, exits[i]] + test.probe_tokens[i, ladder[: stop[i] + 1]].sum() for i in rows
        ]
        np.testing.assert_allclose(last.billed_tokens, expected)
    env = TokenBudgetProbeEnv(replay=replay, split="test")
    for query in range(0, len(rows), 9):
        env.reset(options={"query": query})
        while True:
            *_, done, _, info = env.step(ProbeAction.CONTINUE)
            if done:
                break
        assert info["billed_tokens"] == never["greedy, from b0, confidence > 1"].billed_tokens[query]
    with pytest.raises(ValueError, match=r"confidences in \[0, 1\]; got \[1.5\]"):
        deer_points(test, thresholds=(0.5, 1.5))


def test_learned_controller_beats_the_val_picked_deer_rule(probe_run, replay, demo_table):
    cost_model = CostModel(0.01)
    val, test = replay.subset("val"), replay.subset("test")

    def reward(point):
        return float(cost_model.reward(point.exact_match, point.billed_tokens).mean())

    val_rules, test_rules = deer_points(val), deer_points(test)
    picked = max(range(len(val_rules)), key=lambda k: reward(val_rules[k]))
    controller = probe_controller_point(BudgetPolicy.load(probe_run / "policy"), test, query_questions(demo_table))
    # Measured on the demo table (test split, 284 queries): controller 0.638, DEER-style picked on val
    # (greedy, from b0, confidence > 0.45) 0.616, best Dynasor-style setting 0.561.
    assert reward(controller) > reward(test_rules[picked]) + 0.01
    assert reward(controller) > max(reward(p) for p in dynasor_points(test)) + 0.05
    # No controller reasoning in greedy mode can beat its best exit in hindsight.
    assert reward(controller) <= reward(probe_oracle_point(test, "greedy", cost_model)) + 1e-9


@pytest.fixture(scope="module")
def per_query_run(tmp_path_factory, demo_table):
    run = tmp_path_factory.mktemp("per_query") / "run"
    train(TrainConfig(table=str(demo_table), out=str(run), total_timesteps=4096, eval_freq=4096))
    export_run(run)
    return run


def test_eval_cli_scores_the_probe_controller_and_reuses_its_sweep(tmp_path, per_query_run, probe_run, demo_table):
    from tokenopt.agents.evaluation.scoreboard import ScoreboardConfig, _train_for_weight

    out = tmp_path / "eval"
    args = ["eval", str(per_query_run), "--table", str(demo_table), "--out", str(out), "--probe-run", str(probe_run)]
    result = CliRunner().invoke(app, [*args, "--cost-weights", "0.005,0.01", "--total-timesteps", "4096"])
    assert result.exit_code == 0, result.output
    assert "probe controller on or above the Dynasor- and DEER-style curves" in result.output
    report = json.loads((out / "report.json").read_text())
    for entry in report["per_weight"]:
        methods = [r["method"] for r in entry["rows"]]
        assert "DEER-style" in methods and methods[-1] == "tokenopt probe controller"
        probe = entry["probe"]
        assert set(probe["margins"]) == set(probe["reward_minus_rules"]) == {"Dynasor-style", "DEER-style"}
        assert probe["reward"] <= probe["oracle"]["reward"] + 1e-9
        policy_row = entry["rows"][0]
        assert probe["reward_minus_policy"] == pytest.approx(entry["rows"][-1]["reward"] - policy_row["reward"])
    assert "tokenopt probe controller" in report["curves"]
    assert report["bar"]["probe_weights_on_or_above_rules"] <= 2 and report["bar"]["probe_weights_beating_rules"] <= 2
    assert report["probe_controllers"]["0.01"] == str(probe_run / "policy")
    swept = out / "sweep" / "probe-lambda-0.005" / "policy" / "policy.json"
    assert json.loads(swept.read_text())["env_id"] == "tokenopt/TokenBudgetProbe-v0"
    assert "Probe controller at" in (out / "report.md").read_text()
    # A rerun reuses the sweep's controller instead of training it again.
    before = swept.stat().st_mtime_ns
    config = ScoreboardConfig(policy=str(per_query_run), table=str(demo_table), probe_run=str(probe_run))
    reused = _train_for_weight(probe_run, config, 0.005, swept.parent.parent, env="probe")
    assert reused == swept.parent and swept.stat().st_mtime_ns == before

    result = CliRunner().invoke(app, ["eval", str(per_query_run), "--table", str(demo_table), "--out",
                                      str(tmp_path / "o"), "--probe-run", str(per_query_run)])  # fmt: skip
    assert result.exit_code == 2 and "not a probe controller" in " ".join(result.output.split())


def test_eval_replay_bills_escalation_as_the_environment_does(escalating_probe_training, replay, demo_table):
    run, _ = escalating_probe_training
    policy = BudgetPolicy.load(run / "policy")
    env = TokenBudgetProbeEnv(replay=replay, split="test", escalate_mode="beam3")
    point = probe_controller_point(policy, env.replay, query_questions(demo_table))
    escalated = 0
    for query in range(len(env.replay.matrix.ids)):
        observation, _ = env.reset(options={"query": query})
        while True:
            action = int(np.argmax(policy.probabilities(observation[None, :])[0]))
            observation, _, done, _, info = env.step(action)
            if done:
                break
        assert point.billed_tokens[query] == info["billed_tokens"]
        assert point.exact_match[query] == info["em"]
        column = env.escalate_columns if info["escalated"] else env.ladder
        assert point.actions[query] == column[info["checkpoint"]]
        escalated += info["escalated"]
    assert escalated > 0  # the parity covers escalation, not only answers


def _with_head(policy_dir, out, bias, probe_update=None):
    """A copy of the controller with a constant output layer of ``len(bias)`` outputs."""
    shutil.copytree(policy_dir, out)
    spec = json.loads((out / "policy.json").read_text())
    with np.load(out / "policy.npz") as data:
        arrays = dict(data)
    head = spec["members"][0]["layers"][-1]
    arrays[head["weight"]] = np.zeros((arrays[head["weight"]].shape[0], len(bias)), dtype=np.float32)
    arrays[head["bias"]] = np.array(bias, dtype=np.float32)
    head["shape"] = list(arrays[head["weight"]].shape)
    np.savez(out / "policy.npz", **arrays)
    spec["weights_sha256"] = hashlib.sha256((out / "policy.npz").read_bytes()).hexdigest()
    if probe_update is not None:
        probe_update(spec["probe"])
    (out / "policy.json").write_text(json.dumps(spec))
    return out


def test_escalating_session_and_inconsistent_settings(probe_run, tmp_path):
    def escalate_to(mode):
        return lambda probe: probe.update(escalate_mode=mode)

    escalating = BudgetPolicy.load(
        _with_head(probe_run / "policy", tmp_path / "escalate", [-10.0, -10.0, 10.0], escalate_to("beam3"))
    )
    assert escalating.probe.escalate_mode == "beam3"
    session = escalating.start("C 3+4*2-5?")
    assert session.observe("7", -0.7, 2, stopped=False) == ESCALATE
    assert session.done and session.next_budget is None and session.checkpoint == 0
    # A natural stop answers without asking, as without escalation.
    assert escalating.start("C 3+4?").observe("7", -0.2, 2, stopped=True) == ANSWER
    for name, bias, update, message in (
        ("lost", [0.0, 0.0, 1.0], None, "2 outputs .*got \\[3\\]: its probe settings lack the escalate_mode"),
        ("two", [1.0, 0.0], escalate_to("beam3"), "escalate_mode 'beam3' has 3 outputs .*got \\[2\\]"),
        ("same", [0.0, 0.0, 1.0], escalate_to("greedy"), "a mode other than 'greedy'"),
        ("absent", [0.0, 0.0, 1.0], escalate_to("beam9"), "'beam9' has no action at the checkpoints"),
    ):
        folder = _with_head(probe_run / "policy", tmp_path / name, bias, update)
        with pytest.raises(PolicyLoadError, match=message):
            BudgetPolicy.load(folder)
