"""The command line: flags generated from the config dataclasses, kept from before the split into tokenopt/cli/."""

import dataclasses
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from tokenopt.cli import app
from tokenopt.cli.collect import COLLECT_OPTIONS, RAY_OPTIONS
from tokenopt.cli.common import REQUIRED, ConfigOptions, config_fields, config_options
from tokenopt.cli.cv import CV_TRAIN_OPTIONS
from tokenopt.cli.demo import DEMO_LM_OPTIONS
from tokenopt.cli.eval import SCOREBOARD_OPTIONS
from tokenopt.cli.gate import GATE_OPTIONS
from tokenopt.cli.serve import SERVE_OPTIONS
from tokenopt.cli.train import FROM_LOG_OPTIONS, TRAIN_OPTIONS
from tokenopt.cli.tune import TUNE_OPTIONS
from tokenopt.collect import CollectConfig
from tokenopt.serve import ServeConfig

runner = CliRunner(env={"COLUMNS": "2000"})

RENAMED = {"use_chat_template": "--chat-template", "splits": "--split"}
"""The config fields whose flag is not ``--`` and the field's name in kebab case."""

FLAGS_BEFORE_THE_SPLIT: dict[str, dict[str, Any]] = {
    "collect": {
        "--out": "runs/collect", "--data": None, "--model": None, "--budgets": "0,4,8,16,32",
        "--modes": "greedy,sc5,beam3", "--prompt-template": "{question}", "--answer-cue": "=", "--answer-regex": None,
        "--max-answer-tokens": 8, "--chat-template/--no-chat-template": False, "--temperature": 1.0,
        "--device": "auto", "--dtype": "auto", "--batch-size": 32, "--shard-size": 256, "--seed": 0,
        "--strict/--no-strict": False, "--split": None, "--upstream": None, "--upstream-model": None,
        "--upstream-api-key": None, "--concurrency": 16, "--ray/--no-ray": False, "--ray-workers": 2,
        "--cpus-per-worker": 0.5, "--gpus-per-worker": 0.0,
    },
    "train": {
        "--table": None, "--out": "runs/train", "--config": None, "--env": "budget", "--algo": "ppo",
        "--total-timesteps": None, "--cost-weight": 0.01, "--em-floor": None, "--token-target": None, "--seed": 0,
        "--eval-freq": 4096, "--patience": 6, "--set": None, "--export/--no-export": True, "--seeds": 1,
        "--ensemble/--no-ensemble": False, "--init-from": None, "--init-lr-scale": 0.3, "--from-log": None,
        "--arm": "A", "--epochs": None, "--clip": None,
    },
    "export": {"--onnx/--no-onnx": False},
    "eval": {
        "--table": REQUIRED, "--split": "test", "--out": "runs/eval",
        "--cost-weights": "0.0025,0.005,0.01,0.02,0.04,0.08,0.16", "--total-timesteps": None, "--seed": 0,
        "--sweep-dir": None, "--probe-run": None,
    },
    "demo": {"--out": "runs/demo", "--total-timesteps": None, "--seed": 0},
    "gate": {
        "--table": REQUIRED, "--split": "test", "--cost-weight": 0.01, "--max-em-drop": 1.0, "--reward-margin": 0.0,
        "--confidence": 0.95, "--resamples": 2000, "--seed": 0, "--json": None,
    },
    "cv": {
        "--table": REQUIRED, "--folds": REQUIRED, "--out": "runs/cv", "--seed": 0, "--timesteps": None,
        "--cost-weight": 0.01, "--eval-freq": 4096, "--patience": 6, "--config": None, "--set": None,
    },
    "tune": {
        "--table": REQUIRED, "--sampler": "tpe", "--trials": 20, "--study-name": "tokenopt-tune", "--storage": None,
        "--out": "runs/tune", "--timesteps": None, "--objective": "reward", "--em-floor": None, "--seed": 0,
        "--cost-weight": 0.01, "--eval-freq": 4096, "--config": None, "--set": None,
    },
    "ab-report": {"--json": False, "--alpha": 0.05},
    "serve": {
        "--policy": REQUIRED, "--model": None, "--upstream": None, "--upstream-model": "default",
        "--upstream-api-key": None, "--host": "127.0.0.1", "--port": 8000, "--api-key": None,
        "--insecure/--no-insecure": False, "--policy-b": None, "--split": 0.5, "--log": "runs/serve/decisions.sqlite",
        "--log-prompts/--no-log-prompts": False, "--explore": 0.0, "--max-concurrency": 64, "--max-queue": 256,
        "--timeout": 60.0, "--max-prompt-chars": 32000, "--max-batch": 32, "--device": "auto", "--dtype": "auto",
        # Unset prompt flags take the format the policy records (tokenopt.serve.app.resolve_prompt_format).
        "--prompt-template": None, "--answer-cue": None, "--answer-regex": None, "--max-answer-tokens": None,
        "--chat-template/--no-chat-template": None, "--threads": 0,
    },
    "demo-lm build": {"--out": REQUIRED, "--steps": 2000, "--seed": 0, "--threads": 2, "--check/--no-check": True},
    "demo-lm check": {"--model": None, "--work-dir": "runs/demo-check"},
}  # fmt: skip
"""Every option of every command before the CLI was split into one module per command, with its default."""

ARGUMENTS_BEFORE_THE_SPLIT = {
    "collect": ["ray_address"], "export": ["run"], "eval": ["policy"], "gate": ["new", "old"], "ab-report": ["log"],
}  # fmt: skip

ENV_VARS = {
    ("collect", "--upstream-api-key"): "TOKENOPT_UPSTREAM_API_KEY",
    ("serve", "--upstream-api-key"): "TOKENOPT_UPSTREAM_API_KEY",
    ("serve", "--api-key"): "TOKENOPT_API_KEY",
}

ALL_OPTIONS = {
    "collect": COLLECT_OPTIONS, "ray": RAY_OPTIONS, "serve": SERVE_OPTIONS, "train": TRAIN_OPTIONS,
    "from-log": FROM_LOG_OPTIONS, "cv": CV_TRAIN_OPTIONS, "gate": GATE_OPTIONS, "tune": TUNE_OPTIONS,
    "eval": SCOREBOARD_OPTIONS, "demo-lm": DEMO_LM_OPTIONS,
}  # fmt: skip


def _commands() -> dict[str, Any]:
    found = {}

    def walk(command, path):
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                walk(sub, [*path, name])
        elif path:
            found[" ".join(path)] = command

    walk(typer.main.get_command(app), [])
    return found


def _help(*command: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "tokenopt.cli", *command, "--help"],
        capture_output=True,
        text=True,
        env={"COLUMNS": "250", "PATH": "", "TERM": "dumb", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _has_flag(text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


@pytest.mark.parametrize(("command", "config"), [("collect", CollectConfig), ("serve", ServeConfig)])
def test_every_config_field_has_a_flag_in_help(command, config):
    text = _help(command)
    missing = [
        field.name
        for field in dataclasses.fields(config)
        if not _has_flag(text, RENAMED.get(field.name, "--" + field.name.replace("_", "-")))
    ]
    assert missing == [], f"{config.__name__} fields without a flag in `tokenopt {command} --help`: {missing}"


def test_serve_help_names_the_serve_extra_literally():
    assert "pip install 'tokenopt[serve]'" in " ".join(_help("serve").split())


def test_every_flag_and_default_from_before_the_split_is_kept():
    commands = _commands()
    assert set(FLAGS_BEFORE_THE_SPLIT) <= set(commands)
    for name, expected in FLAGS_BEFORE_THE_SPLIT.items():
        params = commands[name].params
        options = {"/".join(p.opts + p.secondary_opts): p for p in params if type(p).__name__ == "TyperOption"}
        arguments = [p.name for p in params if type(p).__name__ == "TyperArgument"]
        assert arguments == ARGUMENTS_BEFORE_THE_SPLIT.get(name, []), name
        missing = sorted(set(expected) - set(options))
        assert missing == [], f"tokenopt {name} lost {missing}"
        for flag, default in expected.items():
            option = options[flag]
            actual = REQUIRED if option.required else option.default
            actual = str(actual) if isinstance(actual, Path) else actual
            assert actual == default, f"tokenopt {name} {flag}: default {actual!r}, was {default!r}"
            assert option.envvar == ENV_VARS.get((name, flag)), f"tokenopt {name} {flag}"


def test_serve_has_the_flags_that_had_drifted():
    options = {opt for p in _commands()["serve"].params for opt in p.opts}
    assert {"--temperature", "--seed", "--batch-wait-ms", "--default-max-tokens", "--max-body-bytes"} <= options


@pytest.mark.parametrize("name", sorted(ALL_OPTIONS))
def test_fields_read_from_the_source_match_the_dataclass(name):
    # The generator reads the fields with ast (so --help imports neither torch nor FastAPI): check it
    # against what the imported dataclass says.
    import importlib

    reference = ALL_OPTIONS[name].config
    module, _, class_name = reference.partition(":")
    config = getattr(importlib.import_module(module), class_name)
    read = config_fields(reference)
    assert [f.name for f in read] == [f.name for f in dataclasses.fields(config)]
    for static, field in zip(read, dataclasses.fields(config), strict=True):
        if field.default is not dataclasses.MISSING:
            expected = field.default
        elif field.default_factory is not dataclasses.MISSING:
            expected = field.default_factory()
        else:
            expected = REQUIRED
        if repr(static.default) != "UNRESOLVED":  # computed in the source (the generator then needs a Flag default)
            assert static.default == expected, f"{reference}.{field.name}"


def test_serve_flags_reach_the_serve_config(monkeypatch, tmp_path):
    import tokenopt.serve

    seen = {}

    def create_app(config, **options):
        seen["config"] = config
        raise ValueError("stop before binding")

    monkeypatch.setattr(tokenopt.serve, "create_app", create_app)
    result = runner.invoke(
        app,
        ["serve", "--policy", str(tmp_path), "--temperature", "0.3", "--seed", "7", "--batch-wait-ms", "5",
         "--default-max-tokens", "16", "--max-body-bytes", "2048", "--threads", "3", "--split", "0.25"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "stop before binding" in result.output
    config = seen["config"]
    assert (config.temperature, config.seed, config.batch_wait_ms) == (0.3, 7, 5.0)
    assert (config.default_max_tokens, config.max_body_bytes, config.threads, config.split) == (16, 2048, 3, 0.25)
    assert config.policy == tmp_path


def test_the_local_lm_samples_at_the_served_temperature(tmp_path):
    from tokenopt.serve.app import build_backend

    backend = build_backend(ServeConfig(policy=tmp_path, device="cpu", temperature=0.3))
    assert backend.lm.temperature == 0.3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["collect", "--budgets", "0,x"], "--budgets '0,x': every item must be int"),
        (["eval", "run", "--table", "t", "--cost-weights", "0.1,a"], "--cost-weights '0.1,a': every item must be"),
        (["train", "--table", "t", "--set", "ent_coef"], "is not key=value"),
        (["train"], "give --table"),
        (["train", "--table", "t", "--epochs", "3"], "['--epochs'] apply only with --from-log LOG"),
        (["train", "--from-log", "log.db", "--table", "t"], "['--table'] train PPO on an outcome table"),
        (["train", "--from-log", "log.db"], "--init-from POLICY_DIR"),
        (["serve", "--policy", "p", "--split", "2"], "split must be in [0, 1]; got 2.0"),
    ],
)
def test_bad_input_exits_2_with_the_reason(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_every_command_has_help():
    for name in _commands():
        result = runner.invoke(app, [*name.split(), "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage" in result.output


def test_help_works_without_the_serve_extra(tmp_path):
    script = (
        "import sys\n"
        "for name in ('fastapi', 'uvicorn', 'prometheus_client', 'httpx', 'tokenopt.serve'):\n"
        "    sys.modules[name] = None\n"
        "from tokenopt.cli import app\n"
        "app(['serve', '--help'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env={"COLUMNS": "250"}
    )
    assert result.returncode == 0, result.stderr
    assert _has_flag(result.stdout, "--max-body-bytes")


# --- the generator on a config of its own -----------------------------------------------

TOY_MODULE = '''
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_RATE = 0.5


@dataclass
class ToySettings:
    """Settings of a toy command."""

    out: str = "runs/toy"
    """Output folder."""
    budgets: list[int] = field(default_factory=lambda: [0, 4])
    """Budgets, increasing."""
    rate: float = DEFAULT_RATE
    """A rate, from a [module] constant."""
    name: str | None = None
    """A name."""
    fast: bool = False
    """Go fast."""
    log: Path = Path("runs/toy.log")
    """The log."""


@dataclass
class Undocumented:
    """A field without a docstring."""

    count: int = 1


@dataclass
class Unsupported:
    """A field the generator has no option for."""

    table: dict[str, int] = field(default_factory=dict)
    """A mapping."""
'''


@pytest.fixture
def toy_module(tmp_path, monkeypatch):
    name = f"toy_settings_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(TOY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _toy_app(options: ConfigOptions) -> typer.Typer:
    toy = typer.Typer()

    @toy.command()
    @config_options(settings=options)
    def run(*, settings: dict[str, Any], verbose: bool = False) -> None:
        typer.echo(json.dumps(settings, default=str))

    return toy


def test_generated_options_take_name_type_default_and_help_from_the_fields(toy_module):
    toy = _toy_app(ConfigOptions(f"{toy_module}:ToySettings", paths=("out",)))
    result = runner.invoke(toy, [])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "out": "runs/toy", "budgets": [0, 4], "rate": 0.5, "name": None, "fast": False, "log": "runs/toy.log",
    }  # fmt: skip
    result = runner.invoke(toy, ["--out", "x", "--budgets", "1, 2", "--rate", "0.25", "--name", "n", "--fast"])
    assert result.exit_code == 0, result.output
    values = json.loads(result.output)
    assert values == {"out": "x", "budgets": [1, 2], "rate": 0.25, "name": "n", "fast": True, "log": "runs/toy.log"}
    text = " ".join(runner.invoke(toy, ["--help"]).output.split())
    assert "Budgets, increasing. Comma-separated." in text
    assert "A rate, from a [module] constant." in text  # escaped, not eaten as rich markup
    assert "--no-fast" in text


def test_a_bad_list_item_exits_2_naming_the_flag(toy_module):
    result = runner.invoke(_toy_app(ConfigOptions(f"{toy_module}:ToySettings")), ["--budgets", "1,x"])
    assert result.exit_code == 2
    assert "--budgets '1,x': every item must be int" in result.output


@pytest.mark.parametrize(
    ("class_name", "message"),
    [("Undocumented", "'count' has no docstring"), ("Unsupported", "no option is generated for `dict[str, int]`")],
)
def test_a_field_the_generator_cannot_handle_fails_at_definition(toy_module, class_name, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        _toy_app(ConfigOptions(f"{toy_module}:{class_name}"))
