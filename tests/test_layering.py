"""The layering contract: which parts of tokenopt may import which (fails the build on a violation).

Every ``import`` and ``from ... import`` in the source, at module level or inside a
function, is read with ``ast`` and checked against the rules below. ``envs/`` and
``agents/`` are installed as ``tokenopt.envs`` and ``tokenopt.agents``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"tokenopt": ROOT / "tokenopt", "tokenopt.envs": ROOT / "envs", "tokenopt.agents": ROOT / "agents"}

NUMPY_ONLY = (
    "tokenopt.runtime",
    "tokenopt.features",
    "tokenopt.probe",
    "tokenopt.scoring",
    "tokenopt.prompt",
    "tokenopt.cost",
)
"""What a server loads to decide: numpy and the standard library (and each other) only."""
NUMPY_ONLY += ("tokenopt.serve.budget",)  # the spend controller: on every budgeted request's path


@dataclass(frozen=True)
class Rule:
    """Modules under ``source`` never import modules under any of ``forbidden``."""

    source: str
    forbidden: tuple[str, ...]
    why: str


RULES = [
    Rule("tokenopt.envs", ("tokenopt.agents", "tokenopt.serve", "tokenopt.cli"), "envs never import agents"),
    Rule("tokenopt.agents", ("tokenopt.serve", "fastapi", "uvicorn", "prometheus_client"), "agents never import serve"),
    Rule(
        "tokenopt.lm",
        ("tokenopt.envs", "tokenopt.agents", "tokenopt.serve", "tokenopt.cli"),
        "lm never imports envs or agents",
    ),
    Rule(
        "tokenopt.table",
        ("tokenopt.collect", "tokenopt.lm", "tokenopt.envs", "tokenopt.agents"),
        "the table reader never imports collect",
    ),
    Rule("tokenopt.decisions", ("tokenopt.serve", "fastapi"), "the decision log is read without the serve extra"),
]


def _is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def module_name(path: Path, packages: dict[str, Path]) -> str | None:
    """The dotted name of a source file, by the installed package it lies in."""
    for package, folder in sorted(packages.items(), key=lambda item: -len(item[0])):
        try:
            relative = path.relative_to(folder)
        except ValueError:
            continue
        parts = [package, *relative.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        return ".".join(parts)
    return None


def imports_of(path: Path, name: str) -> list[tuple[int, str]]:
    """(line, imported module) of every import in a file, relative imports resolved.

    ``from X import Y`` gives X and X.Y (Y may be a submodule).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def _stdlib_or_allowed(imported: str) -> bool:
    top = imported.split(".")[0]
    if top == "tokenopt":
        return any(_is_under(imported, allowed) for allowed in NUMPY_ONLY) or imported == "tokenopt"
    return top == "numpy" or top in sys.stdlib_module_names or top == "__future__"


def violations(packages: dict[str, Path]) -> list[str]:
    """Every import that breaks a rule, as ``file:line: module imports X (rule)``."""
    found = []
    for folder in packages.values():
        for path in sorted(folder.rglob("*.py")):
            name = module_name(path, packages)
            if name is None:
                continue
            for line, imported in imports_of(path, name):
                where = f"{path.relative_to(folder.parent)}:{line}: {name} imports {imported}"
                for rule in RULES:
                    if _is_under(name, rule.source) and any(_is_under(imported, f) for f in rule.forbidden):
                        found.append((line, rule.why, where))
                if any(_is_under(name, module) for module in NUMPY_ONLY) and not _stdlib_or_allowed(imported):
                    found.append(
                        (
                            line,
                            "runtime, features, probe, scoring, prompt and cost import numpy and the stdlib only",
                            where,
                        )
                    )
    # One report per (file line, rule): the first module named there.
    first: dict[tuple[str, int, str], str] = {}
    for line, why, where in found:
        first.setdefault((where.split(":")[0], line, why), f"{where} ({why})")
    return list(first.values())


def test_the_source_keeps_the_layers():
    assert violations(PACKAGES) == []


def test_a_violation_fails_the_contract(tmp_path):
    # A copy of two real modules, one of them changed to import what its layer must not.
    envs, agents = tmp_path / "envs", tmp_path / "agents"
    envs.mkdir()
    agents.mkdir()
    (envs / "budget.py").write_text(
        (ROOT / "envs" / "budget.py").read_text() + "\nfrom tokenopt.agents import export\n"
    )
    (agents / "export.py").write_text("def f():\n    from tokenopt.serve.app import create_app\n")
    runtime = tmp_path / "tokenopt"
    runtime.mkdir()
    (runtime / "runtime.py").write_text("import numpy\nimport torch\nfrom tokenopt.probe import PROBE_INPUTS\n")
    found = violations({"tokenopt": runtime, "tokenopt.envs": envs, "tokenopt.agents": agents})
    assert len(found) == 3, found
    assert any("tokenopt.envs.budget imports tokenopt.agents" in line for line in found)
    assert any("tokenopt.agents.export imports tokenopt.serve.app" in line for line in found)
    assert any("tokenopt.runtime imports torch" in line for line in found)


def test_ab_report_runs_without_the_serve_extra(tmp_path):
    # Block the serve extra's packages as if they were not installed, then run ab-report's import path.
    script = (
        "import sys\n"
        "for name in ('fastapi', 'uvicorn', 'prometheus_client', 'httpx', 'tokenopt.serve'):\n"
        "    sys.modules[name] = None\n"
        "from tokenopt.agents.evaluation.ab_test import ab_report\n"
        "from tokenopt.agents.from_log import refine_from_log\n"
        "from tokenopt.cli import app\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
