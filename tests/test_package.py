import importlib
import subprocess
import sys

import pytest


def test_subpackages_import_under_the_tokenopt_namespace():
    envs = importlib.import_module("tokenopt.envs")
    agents = importlib.import_module("tokenopt.agents")
    assert envs.__name__ == "tokenopt.envs"
    assert agents.__name__ == "tokenopt.agents"


@pytest.mark.parametrize("generic_name", ["envs", "agents", "suites"])
def test_no_generic_top_level_package_is_installed(tmp_path, generic_name):
    # Run from an empty folder so the checkout itself is not on sys.path.
    result = subprocess.run(
        [sys.executable, "-c", f"import importlib.util; print(importlib.util.find_spec('{generic_name}'))"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "None"


def test_demo_lm_ships_inside_the_package():
    from tokenopt.demo import DEMO_MODEL_DIR

    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (DEMO_MODEL_DIR / name).is_file(), name


@pytest.mark.parametrize("command", [[], ["collect"], ["demo-lm"], ["demo-lm", "build"], ["demo-lm", "check"]])
def test_every_command_explains_its_options(command):
    result = subprocess.run(
        [sys.executable, "-m", "tokenopt.cli", *command, "--help"],
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", "PATH": "", "TERM": "dumb"},
    )
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout
    if command == ["collect"]:
        for option in ("--data", "--model", "--budgets", "--modes", "--answer-cue", "--strict", "--seed"):
            assert option in result.stdout
        assert "0,4,8,16,32" in result.stdout


def test_ci_runs_the_readme_quick_start():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.strip() for line in block.strip().splitlines()]
    assert len(commands) == 2
    ci_lines = [line.strip() for line in (root / ".ci" / "run").read_text().splitlines()]
    for command in commands:
        assert command in ci_lines, command


def test_every_source_folder_is_a_listed_package():
    # A folder left out of pyproject's package list installs without its modules outside editable mode.
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"tokenopt": root / "tokenopt", "tokenopt.envs": root / "envs", "tokenopt.agents": root / "agents"}
    found = set()
    for package, folder in folders.items():
        for source in folder.rglob("*.py"):
            relative = source.parent.relative_to(folder)
            name = ".".join([package, *relative.parts])
            assert (source.parent / "__init__.py").is_file(), f"{source.parent} has modules but no __init__.py"
            found.add(name)
    assert found <= listed, sorted(found - listed)
