"""The probe controller at serving time and on the scoreboard: runtime session, DEER-style rule, eval."""

import hashlib
import json
import math
import pickle
import shutil

import numpy as np
import pytest
from measures import assert_beats, per_query_reward
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


def test_session_and_decide_refuse_what_they_cannot_do(probe_run, per_query_run, tmp_path):
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
    # A per-query policy (TokenBudget-v0) has no session.
    with pytest.raises(ValueError, match=r"start\(\) is for tokenopt/TokenBudgetProbe-v0 controllers"):
        BudgetPolicy.load(per_query_run / "policy").start("C 3+4?")


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

    def rewards(point):
        return per_query_reward(point.exact_match, point.billed_tokens, cost_model.cost_weight)

    controller = probe_controller_point(BudgetPolicy.load(probe_run / "policy"), test, query_questions(demo_table))
    # The learned stop beats each probing rule's setting picked on val, on the same test queries and bill,
    # by more than the split's noise (two standard errors of the per-query reward difference).
    for rule, points in (("DEER-style", deer_points), ("Dynasor-style", dynasor_points)):
        val_rules, test_rules = points(val), points(test)
        picked = max(range(len(val_rules)), key=lambda k: rewards(val_rules[k]).mean())
        picked_rule = test_rules[picked]
        assert_beats(rewards(controller), rewards(picked_rule), f"controller against {rule} {picked_rule.setting}")
    # No controller reasoning in greedy mode can beat its best exit in hindsight.
    oracle = probe_oracle_point(test, "greedy", cost_model)
    assert rewards(controller).mean() <= rewards(oracle).mean() + 1e-9
    assert np.all(rewards(controller) <= rewards(oracle) + 1e-9)


@pytest.fixture(scope="module")
def per_query_run(tmp_path_factory, demo_table):
    run = tmp_path_factory.mktemp("per_query") / "run"
    train(TrainConfig(table=str(demo_table), out=str(run), total_timesteps=4096, eval_freq=4096))
    export_run(run)
    return run


def _best_split_em(settings, tokens):
    """The highest EM that splitting traffic between at most two settings reaches at these mean tokens or fewer."""
    best = max((em for cost, em in settings if cost <= tokens + 1e-9), default=-math.inf)
    for low, low_em in settings:
        for high, high_em in settings:
            if low < tokens < high:
                best = max(best, low_em + (high_em - low_em) * (tokens - low) / (high - low))
    return best


def test_eval_cli_scores_the_probe_controller_and_reuses_its_sweep(tmp_path, per_query_run, probe_run, demo_table):
    from tokenopt.agents.evaluation.scoreboard import ScoreboardConfig, _train_for_weight

    out = tmp_path / "eval"
    args = ["eval", str(per_query_run), "--table", str(demo_table), "--out", str(out), "--probe-run", str(probe_run)]
    result = CliRunner().invoke(app, [*args, "--cost-weights", "0.005,0.01", "--total-timesteps", "4096"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    # Each probing rule's curve on the test split, from the report's operating points.
    rules = ("Dynasor-style", "DEER-style")
    settings = {rule: [(p["tokens"], p["em"]) for p in report["points"] if p["method"] == rule] for rule in rules}
    on_or_above = beating = 0
    for entry in report["per_weight"]:
        methods = [r["method"] for r in entry["rows"]]
        assert "DEER-style" in methods and methods[-1] == "tokenopt probe controller"
        rows = {r["method"]: r for r in entry["rows"]}
        controller, probe = rows["tokenopt probe controller"], entry["probe"]
        # EM minus the best EM a traffic split of the rule's settings reaches at the controller's mean tokens
        # (-inf, reported as None, where the controller is cheaper than every setting of the rule).
        margins = {rule: controller["em"] - _best_split_em(settings[rule], controller["tokens"]) for rule in rules}
        for rule, margin in margins.items():
            reported = probe["margins"][rule]
            assert (reported is None) if math.isinf(margin) else (reported == pytest.approx(margin, abs=1e-9)), rule
        above = all(margin >= -1e-9 for margin in margins.values())
        beats = all(controller["reward"] > rows[rule]["reward"] for rule in rules)
        assert probe["on_or_above_rules"] is above
        differences = {rule: controller["reward"] - rows[rule]["reward"] for rule in rules}
        assert probe["reward_minus_rules"] == pytest.approx(differences)
        assert probe["reward"] <= probe["oracle"]["reward"] + 1e-9
        assert probe["reward_minus_policy"] == pytest.approx(controller["reward"] - entry["rows"][0]["reward"])
        on_or_above += above
        beating += beats
        if entry["cost_weight"] == 0.01:
            # The trained controller (probe_run, lambda 0.01) beats both rules' val-picked settings on reward,
            # as test_learned_controller_beats_the_val_picked_deer_rule shows beyond the noise.
            assert beats, (controller, rows["DEER-style"], rows["Dynasor-style"])
    assert [entry["cost_weight"] for entry in report["per_weight"]] == [0.005, 0.01]
    assert report["bar"]["weights"] == 2
    assert report["bar"]["probe_weights_on_or_above_rules"] == on_or_above
    assert report["bar"]["probe_weights_beating_rules"] == beating
    # The command's summary line states these counts.
    assert f"for {on_or_above} of 2 cost weights, higher reward than both for {beating};" in result.output
    assert "tokenopt probe controller" in report["curves"]
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
        ("same", [0.0, 0.0, 1.0], escalate_to("greedy"), "'greedy' is the reasoning mode itself"),
        ("absent", [0.0, 0.0, 1.0], escalate_to("beam9"), "'beam9' is not in the action table"),
    ):
        folder = _with_head(probe_run / "policy", tmp_path / name, bias, update)
        with pytest.raises(PolicyLoadError, match=message):
            BudgetPolicy.load(folder)
