"""What the commands share: progress bars, the error exit, list parsing, and options generated from configs.

A command's options are declared once, by the config dataclass it fills. :class:`ConfigOptions`
names the dataclass (``"module:Class"``) and the fields the command exposes; :func:`config_options`
turns each field into a typer option: ``--kebab-case`` of the field's name, the type of its
annotation, its default, and its docstring (the string literal after the field) as the help. A
:class:`Flag` says where a flag differs from its field (``--chat-template`` for
``use_chat_template``, a repeatable ``--split`` for ``splits``, ``--set key=value`` for
``hyperparams``). List and tuple fields are comma-separated (``--budgets 0,4,8``).

The fields are read from the module's source with :mod:`ast`, not by importing it: the dataclasses
live beside torch, Stable-Baselines3 and FastAPI, and ``tokenopt --help`` must neither wait for
them nor fail where the serve extra is not installed.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = [
    "REQUIRED",
    "ConfigField",
    "ConfigOptions",
    "Flag",
    "config_fields",
    "config_options",
    "console",
    "fail",
    "parse_overrides",
    "progress",
    "split_list",
]

console = Console(stderr=True)


def progress() -> Progress:
    """A progress bar on stderr: description, bar, done/total, elapsed time and ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def fail(error: Exception) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with code 2 (bad input)."""
    console.print(f"[red]error:[/red] {escape(str(error))}")
    raise typer.Exit(code=2)


def split_list(text: str, kind: type, option: str) -> list[Any]:
    """The items of a comma-separated option value, each converted to ``kind``.

    Raises:
        ValueError: an item that is not a ``kind``, named with the option.
    """
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        return [kind(part) for part in parts]
    except ValueError:
        raise ValueError(f"{option} {text!r}: every item must be {kind.__name__}") from None


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs as a dict, each value read as YAML (``3``, ``0.02``, ``[64, 64]``).

    Raises:
        ValueError: a pair without ``=``.
    """
    import yaml

    overrides: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} is not key=value (e.g. --set ent_coef=0.02)")
        key, value = pair.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


# --- options generated from config dataclasses -------------------------------------


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


REQUIRED: Any = _Sentinel("REQUIRED")
"""The default of a field (or :class:`Flag`) that has none: the flag must be given."""
_UNRESOLVED: Any = _Sentinel("UNRESOLVED")  # a default the source computes (e.g. ``str(CONFIG_DIR / "ppo.yml")``)
_UNSET: Any = _Sentinel("UNSET")

_SCALARS: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool, "Path": Path}
_FACTORIES: dict[str, Callable[[], Any]] = {"list": list, "dict": dict, "tuple": tuple, "set": set}


@dataclass(frozen=True)
class ConfigField:
    """One field of a config dataclass, as its source declares it."""

    name: str
    annotation: ast.expr
    default: Any
    """The default value; :data:`REQUIRED` if there is none, a private sentinel if the source computes it."""
    doc: str
    """The docstring after the field, whitespace collapsed."""


def _module_path(module: str) -> Path:
    """The source file of ``module``, found without importing it or its package.

    ``importlib.util.find_spec`` imports a module's parent package, and ``tokenopt.serve``
    imports FastAPI: only ``tokenopt.<package>`` goes through the import system (which maps
    ``tokenopt.agents`` to ``agents/`` in an editable install), or ``tokenopt`` where that
    package is unavailable; below it, the path follows the names.
    """
    parts = module.split(".")
    for depth in range(min(2, len(parts)), 0, -1):
        try:
            spec = importlib.util.find_spec(".".join(parts[:depth]))
        except (ImportError, ValueError):
            spec = None
        if spec is None or spec.origin is None:
            continue
        if depth == len(parts):
            return Path(spec.origin)
        for location in spec.submodule_search_locations or []:
            base = Path(location).joinpath(*parts[depth:])
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    return candidate
    raise ModuleNotFoundError(f"no source file of {module!r}")


@functools.cache
def _module_tree(module: str) -> ast.Module:
    path = _module_path(module)
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _resolve_name(module: str, name: str) -> tuple[str, ast.stmt]:
    """Where a top-level ``name`` of ``module`` is defined: the module and the defining statement.

    Follows ``from x import name`` (absolute or relative) to the module that defines it.
    """
    tree = _module_tree(module)
    for statement in tree.body:
        if isinstance(statement, ast.ClassDef) and statement.name == name:
            return module, statement
        if isinstance(statement, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == name for target in statement.targets
        ):
            return module, statement
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            if statement.target.id == name:
                return module, statement
        if isinstance(statement, ast.ImportFrom) and any((a.asname or a.name) == name for a in statement.names):
            original = next(a.name for a in statement.names if (a.asname or a.name) == name)
            source = statement.module or ""
            if statement.level:
                package = module.split(".")[: -statement.level]
                source = ".".join([*package, source] if source else package)
            return _resolve_name(source, original)
    raise LookupError(f"{name!r} is not defined at the top level of {module}")


def _static_value(node: ast.expr, module: str) -> Any:
    """The value of a default expression, if the source states it (a literal, ``Path(...)``, a constant)."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        keywords = {keyword.arg: keyword.value for keyword in node.keywords}
        if node.func.id == "field":
            if "default" in keywords:
                return _static_value(keywords["default"], module)
            factory = keywords.get("default_factory")
            if isinstance(factory, ast.Lambda):
                return _static_value(factory.body, module)
            if isinstance(factory, ast.Name) and factory.id in _FACTORIES:
                return _FACTORIES[factory.id]()
        if node.func.id == "Path" and len(node.args) == 1 and not keywords:
            text = _static_value(node.args[0], module)
            return Path(text) if isinstance(text, str) else _UNRESOLVED
    if isinstance(node, ast.Name):
        try:
            where, statement = _resolve_name(module, node.id)
        except LookupError:
            return _UNRESOLVED
        if isinstance(statement, ast.Assign | ast.AnnAssign) and statement.value is not None:
            return _static_value(statement.value, where)
    return _UNRESOLVED


@functools.cache
def config_fields(reference: str) -> tuple[ConfigField, ...]:
    """The fields of a config dataclass, inherited ones first, read from its module's source.

    Args:
        reference: ``"module:Class"``, e.g. ``"tokenopt.collect.config:CollectConfig"``.

    Raises:
        LookupError: no such class in the module.
    """
    module, _, name = reference.partition(":")
    where, statement = _resolve_name(module, name)
    if not isinstance(statement, ast.ClassDef):
        raise LookupError(f"{reference}: {name} is not a class")
    fields: dict[str, ConfigField] = {}
    for base in statement.bases:
        if isinstance(base, ast.Name):
            base_module, _ = _resolve_name(where, base.id)
            fields.update((f.name, f) for f in config_fields(f"{base_module}:{base.id}"))
    body = statement.body
    for index, item in enumerate(body):
        if not isinstance(item, ast.AnnAssign) or not isinstance(item.target, ast.Name):
            continue
        if ast.unparse(item.annotation).startswith(("ClassVar", "typing.ClassVar")):
            continue
        following = body[index + 1] if index + 1 < len(body) else None
        doc = ""
        if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
            if isinstance(following.value.value, str):
                doc = " ".join(following.value.value.split())
        default = REQUIRED if item.value is None else _static_value(item.value, where)
        fields[item.target.id] = ConfigField(item.target.id, item.annotation, default, doc)
    return tuple(fields.values())


@dataclass(frozen=True)
class Flag:
    """How a field appears on the command line, where that differs from what its declaration gives."""

    name: str | None = None
    """The flag, e.g. ``--chat-template``; default: ``--`` and the field's name in kebab case."""
    kind: Any = None
    """The option's type, e.g. ``list[str] | None`` for a repeatable option; default: from the annotation."""
    default: Any = _UNSET
    """The option's default (:data:`REQUIRED`: none); default: the field's."""
    help: str | None = None
    """The help text; default: the field's docstring."""
    envvar: str | None = None
    """An environment variable the value may come from."""
    argument: bool = False
    """A positional argument instead of an option."""
    parse: Callable[[Any], Any] | None = None
    """The option's value -> the field's value (may raise ValueError); default: from the annotation."""


@dataclass(frozen=True)
class _Option:
    field_name: str
    parameter: inspect.Parameter
    parse: Callable[[Any], Any]
    field_default: Any


def _annotation_parts(annotation: ast.expr) -> tuple[type | None, bool, type | None, type | None]:
    """(scalar type, optional, container, element type) of an annotation; None where it is none of these."""
    optional = False
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
        sides = [annotation.left, annotation.right]
        nones = [side for side in sides if isinstance(side, ast.Constant) and side.value is None]
        if len(nones) != 1:
            return None, False, None, None
        optional = True
        annotation = next(side for side in sides if side not in nones)
    if isinstance(annotation, ast.Name):
        return _SCALARS.get(annotation.id), optional, None, None
    if isinstance(annotation, ast.Subscript) and isinstance(annotation.value, ast.Name):
        container = {"list": list, "tuple": tuple}.get(annotation.value.id)
        items = annotation.slice
        if container is tuple and isinstance(items, ast.Tuple) and len(items.elts) == 2:
            if isinstance(items.elts[1], ast.Constant) and items.elts[1].value is Ellipsis:
                items = items.elts[0]
        if container is not None and isinstance(items, ast.Name) and items.id in _SCALARS:
            return None, optional, container, _SCALARS[items.id]
    return None, False, None, None


def _help_text(text: str) -> str:
    # Typer renders help as rich markup: escape it, or "[serve]" in "tokenopt[serve]" vanishes.
    return escape(text.replace("``", "`"))


def _parse_sequence(container: type, element: type, flag: str, text: str | None) -> Any:
    return None if text is None else container(split_list(text, element, flag))


def _to_field(scalar: type | None, parse: Callable[[Any], Any] | None, value: Any) -> Any:
    value = parse(value) if parse is not None else value
    return str(value) if scalar is str and isinstance(value, Path) else value


@dataclass(frozen=True)
class ConfigOptions:
    """The options a command takes from one config dataclass."""

    config: str
    """``"module:Class"`` of the dataclass."""
    fields: Sequence[str] | None = None
    """The fields exposed, in this order; None: every field, in declaration order."""
    flags: dict[str, Flag] = field(default_factory=dict)
    """Field name -> how its flag differs from the generated one."""
    paths: Sequence[str] = ()
    """``str`` fields that hold a file or folder: typed ``Path`` on the command line (shown as a path)."""
    help_prefix: str = ""
    """Put before every generated help text, e.g. ``"With --from-log: "``."""

    def options(self) -> list[_Option]:
        """One typer parameter per exposed field.

        Raises:
            TypeError: a field whose flag cannot be generated (no docstring, an annotation or a
                default the generator does not read) and has no :class:`Flag` saying how.
        """
        return _build_options(self)


def _build_options(group: ConfigOptions) -> list[_Option]:
    declared = {f.name: f for f in config_fields(group.config)}
    names = list(declared) if group.fields is None else list(group.fields)
    unknown = [name for name in [*names, *group.flags, *group.paths] if name not in declared]
    if unknown:
        raise TypeError(f"{group.config} has no fields {unknown}; it has {list(declared)}")
    return [_build_option(group, declared[name], group.flags.get(name, Flag())) for name in names]


def _build_option(group: ConfigOptions, config_field: ConfigField, flag: Flag) -> _Option:
    where = f"{group.config} field {config_field.name!r}"
    scalar, optional, container, element = _annotation_parts(config_field.annotation)
    flag_name = flag.name or "--" + config_field.name.replace("_", "-")
    default = config_field.default if flag.default is _UNSET else flag.default
    kind, parse = flag.kind, flag.parse
    if container is not None and element is not None:  # a comma-separated list: --budgets 0,4,8
        if flag.default is _UNSET and isinstance(default, list | tuple):
            default = ",".join(str(item) for item in default)
        kind = kind or (str | None if optional or default is None else str)
        parse = parse or functools.partial(_parse_sequence, container, element, flag_name)
    elif kind is None:
        if scalar is None:
            raise TypeError(f"{where}: no option is generated for `{ast.unparse(config_field.annotation)}`")
        if scalar is str and config_field.name in group.paths:
            kind = Path
        else:
            kind = scalar
        kind = kind | None if optional else kind
    if isinstance(default, str) and kind in (Path, Path | None):
        default = Path(default)
    if default is _UNRESOLVED:
        raise TypeError(f"{where}: its default is computed in the source; give its Flag a default")
    help_text = flag.help
    if help_text is None:
        if not config_field.doc:
            raise TypeError(f"{where} has no docstring to use as help; write one or give its Flag a help")
        doc = config_field.doc
        if group.help_prefix and doc[1:2].islower():  # "With --ray: passes ..." but "With --ray: LM actors ..."
            doc = doc[0].lower() + doc[1:]
        help_text = group.help_prefix + doc
        if default is None and config_field.default not in (None, "", REQUIRED, _UNRESOLVED):
            help_text += f" Default: {config_field.default}."
        if container is not None:
            help_text += " Comma-separated."
    info_default = ... if default is REQUIRED else default
    info: Any
    if flag.argument:
        info = typer.Argument(info_default, help=_help_text(help_text), envvar=flag.envvar)
        parameter_name = config_field.name
    else:
        info = typer.Option(info_default, help=_help_text(help_text), envvar=flag.envvar)
        # typer derives the flag from the parameter's name (and adds --no-X to a bool flag).
        parameter_name = flag_name.removeprefix("--").replace("-", "_")
        if not parameter_name.isidentifier() or "--" + parameter_name.replace("_", "-") != flag_name:
            raise TypeError(f"{where}: {flag_name!r} is not a flag typer can derive from a parameter name")
    parameter = inspect.Parameter(parameter_name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=kind)
    return _Option(config_field.name, parameter, functools.partial(_to_field, scalar, parse), config_field.default)


def config_options(**groups: ConfigOptions) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Replace a command's parameters named by ``groups`` with the options generated for them.

    The command then receives, for each group, a dict from field name to value, ready for
    ``Config(**values)``. A flag left at None where its field's default is not None is left
    out of the dict, so the dataclass's own default applies.

    Example::

        @config_options(settings=ConfigOptions("tokenopt.collect.config:CollectConfig"))
        def collect_command(*, settings: dict[str, Any], ray: bool = False) -> None:
            config = CollectConfig(**settings)

    A value the flag cannot turn into the field's (``--budgets 0,x``) exits with code 2.

    Raises:
        TypeError: two options with one name, or a group that names no parameter of the command.
    """

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command, eval_str=True)
        missing = [name for name in groups if name not in signature.parameters]
        if missing:
            raise TypeError(f"{command.__name__} has no parameters {missing} to generate options for")
        parameters: list[inspect.Parameter] = []
        generated: dict[str, list[_Option]] = {}
        for parameter in signature.parameters.values():
            if parameter.name in groups:
                generated[parameter.name] = groups[parameter.name].options()
                parameters += [option.parameter for option in generated[parameter.name]]
            else:
                parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))
        names = [parameter.name for parameter in parameters]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise TypeError(f"{command.__name__}: more than one option named {repeated}")

        @functools.wraps(command)
        def run(**values: Any) -> Any:
            for group_name, options in generated.items():
                fields: dict[str, Any] = {}
                for option in options:
                    value = values.pop(option.parameter.name)
                    if value is None and option.field_default is not None:
                        continue  # not given: the dataclass's default applies
                    try:
                        fields[option.field_name] = option.parse(value)
                    except ValueError as error:
                        fail(error)
                values[group_name] = fields
            return command(**values)

        run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
        return run

    return decorate
