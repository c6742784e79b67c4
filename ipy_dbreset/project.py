"""Finding the Django project and setting it up, without running the user's ``manage.py``.

Settings are looked for in this order:

1. an explicit settings module (``c.DBReset.settings_module``);
2. the ``DJANGO_SETTINGS_MODULE`` environment variable;
3. what the nearest ``manage.py``, found by walking up from the working
   directory, sets when it runs as ``manage.py shell``: read with :mod:`ast`
   (honouring a PEP 263 coding line), never executed.  Statements count in the
   order they would run (the module body, the ``__main__`` block, ``main()``);
   conditions on ``sys.argv`` are decided for ``manage.py shell``; a value that
   only running the file would tell is a :class:`ProjectError` that says so.

An explicit choice (1 or 2) is taken as it is: ``manage.py`` is then not read.
The folder holding ``manage.py`` is put on ``sys.path`` either way, so that a
notebook in ``myproject/notebooks/`` can import the project's apps.
"""

from __future__ import annotations

import ast
import logging
import operator
import os
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)

SETTINGS_VARIABLE = "DJANGO_SETTINGS_MODULE"
CONFIGURATION_VARIABLE = "DJANGO_CONFIGURATION"
ASYNC_UNSAFE_VARIABLE = "DJANGO_ALLOW_ASYNC_UNSAFE"

_CHOOSE = (
    f"Choose the settings with %env {SETTINGS_VARIABLE}=mysite.settings or "
    "c.DBReset.settings_module in ipython_config.py (then manage.py is not read)."
)


class ProjectError(Exception):
    """The Django project could not be found or set up; the message says how to fix it."""


# ``manage.py shell`` runs manage.py as __main__ with this argv: conditions on
# either are decided as they would be there.
SHELL_ARGV = ("manage.py", "shell")
_VARIABLES = (SETTINGS_VARIABLE, CONFIGURATION_VARIABLE)


class ManagePy(NamedTuple):
    """What a ``manage.py`` sets when it runs as ``manage.py shell``, read without running it."""

    path: Path
    values: dict[str, str]
    """The variables it sets (``DJANGO_SETTINGS_MODULE``, ``DJANGO_CONFIGURATION``)."""
    unknown: dict[str, str]
    """The variables whose value only running it would tell, with the reason."""

    def default(self, name: str) -> str | None:
        """The value ``manage.py shell`` gives ``name``; ProjectError if that cannot be known."""
        if name in self.unknown:
            raise ProjectError(self.unknown[name])
        return self.values.get(name)


class Source(Enum):
    """Where the settings of a :class:`Setup` came from (the value names it in messages)."""

    ALREADY_SET_UP = "already set up"
    """Django was set up before the extension was loaded: nothing was done."""
    CONFIGURED = "configured"
    """Settings were configured (``settings.configure()``, or read) but Django not set up."""
    OPTION = "option"
    """``c.DBReset.settings_module``."""
    ENVIRONMENT = SETTINGS_VARIABLE
    """The ``DJANGO_SETTINGS_MODULE`` environment variable."""
    MANAGE_PY = "manage.py"
    """What the nearest ``manage.py`` sets for ``manage.py shell`` (:attr:`Setup.manage_py`)."""


class Setup(NamedTuple):
    """How Django came to be set up."""

    settings_module: str
    source: Source
    manage_py: Path | None = None
    """The ``manage.py`` read for the settings (only with :attr:`Source.MANAGE_PY`)."""
    environment: tuple[str, ...] = ()
    """The environment variables this setup wrote."""

    def describe(self) -> str:
        """What was done, as a statement: ``Django set up with 'mysite.settings' (found in
        /src/mysite/manage.py); DJANGO_SETTINGS_MODULE was set to it``."""
        origin = {
            Source.MANAGE_PY: f"found in {self.manage_py}",
            Source.ENVIRONMENT: f"from {SETTINGS_VARIABLE}",
            Source.OPTION: "from c.DBReset.settings_module",
            Source.CONFIGURED: "its settings were already configured",
        }.get(self.source, self.source.value)
        # Quoted: a module named ``settings`` would read as the word.
        text = f"Django set up with {self.settings_module!r} ({origin})"
        for name in self.environment:
            if name == SETTINGS_VARIABLE:
                text += f"; {name} was set to it"
            else:  # only ever a default that manage.py gives
                text += f"; {name} was set to manage.py's default"
        return text


class _RunTime(NamedTuple):
    """A value that only running manage.py would tell."""

    line: int
    source: str


# What a variable may be when manage.py has run that far: None is "not set".
_Value = str | None | _RunTime
_State = dict[str, frozenset[_Value]]


class _Unknown:
    """A condition that cannot be decided without running manage.py."""


_UNKNOWN = _Unknown()

_COMPARISONS: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}


def _evaluate(node: ast.expr) -> Any:
    """The value of a condition in ``manage.py shell``, or _UNKNOWN.

    Only what is known before the file runs: constants, ``__name__``,
    ``sys.argv`` and ``len``, compared and combined.
    """
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id == "__name__":
        return "__main__"
    if (
        isinstance(node, ast.Attribute)
        and node.attr == "argv"
        and isinstance(node.value, ast.Name)
        and node.value.id == "sys"
    ):
        return list(SHELL_ARGV)
    if isinstance(node, ast.Slice):
        parts = [None if p is None else _evaluate(p) for p in (node.lower, node.upper, node.step)]
        return _UNKNOWN if _UNKNOWN in parts else slice(*parts)
    if isinstance(node, ast.Subscript):
        base, index = _evaluate(node.value), _evaluate(node.slice)
        if base is _UNKNOWN or index is _UNKNOWN:
            return _UNKNOWN
        try:
            return base[index]
        except (IndexError, KeyError, TypeError):  # it would raise there: not a value
            return _UNKNOWN
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "len"
        and len(node.args) == 1
        and not node.keywords
    ):
        value = _evaluate(node.args[0])
        return len(value) if isinstance(value, (str, list)) else _UNKNOWN
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        value = _evaluate(node.operand)
        return value if value is _UNKNOWN else not value
    if isinstance(node, ast.BoolOp):
        # One decisive operand decides, whatever the unknown ones are.
        decisive = isinstance(node.op, ast.Or)
        values = [_evaluate(v) for v in node.values]
        if any(v is not _UNKNOWN and bool(v) is decisive for v in values):
            return decisive
        return _UNKNOWN if _UNKNOWN in values else not decisive
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = _evaluate(right_node)
            compare = _COMPARISONS.get(type(op))
            if left is _UNKNOWN or right is _UNKNOWN or compare is None:
                return _UNKNOWN
            try:
                if not compare(left, right):
                    return False
            except TypeError:
                return _UNKNOWN
            left = right
        return True
    return _UNKNOWN


def _environ_key(node: ast.expr) -> str | None:
    """``NAME`` when ``node`` is ``os.environ["NAME"]`` (or ``environ["NAME"]``) for our names."""
    if (
        isinstance(node, ast.Subscript)
        and _is_environ(node.value)
        and isinstance(node.slice, ast.Constant)
        and node.slice.value in _VARIABLES
    ):
        return str(node.slice.value)
    return None


def _is_environ(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id == "environ") or (
        isinstance(node, ast.Attribute) and node.attr == "environ"
    )


def _value(node: ast.expr) -> str | _RunTime:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return _RunTime(node.lineno, ast.unparse(node))


def _describe(node: ast.stmt | ast.excepthandler) -> str:
    """``line 5: if sys.argv[2] == 'x'``: the head of a block, for messages."""
    head = ast.unparse(node).splitlines()[0].rstrip(":")
    if len(head) > 60:
        head = head[:57] + "..."
    return f"line {node.lineno}: {head}"


class _Reader:
    """Follows manage.py as ``manage.py shell`` would run it, tracking our variables.

    Statements run in order: the module body, the ``if __name__ ==
    "__main__":`` block, and the module's own functions where they are called
    (``main()``).  A condition that cannot be decided runs both ways, and a
    variable that comes out different is one that only running the file
    would tell.
    """

    def __init__(self, tree: ast.Module) -> None:
        # The module's functions, run only where they are called.
        self.functions = {
            node.name: node
            for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        }
        # The functions being run, so that recursion runs each once.
        self.running: set[str] = set()
        # Per variable, the undecidable conditions its value depends on.
        self.depends: dict[str, list[str]] = {name: [] for name in _VARIABLES}

    def run(self, body: list[ast.stmt], state: _State) -> _State:
        for node in body:
            state = self.statement(node, state)
        return state

    def either(self, node: ast.stmt | ast.excepthandler, one: _State, other: _State) -> _State:
        merged = {}
        for name in _VARIABLES:
            merged[name] = one[name] | other[name]
            if one[name] != other[name]:
                self.depends[name].append(_describe(node))
        return merged

    def statement(self, node: ast.stmt, state: _State) -> _State:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return state  # runs only when called
        if isinstance(node, (ast.If, ast.While)):
            test = _evaluate(node.test)
            if isinstance(node, ast.While) or test is _UNKNOWN:
                return self.either(node, self.run(node.body, state), self.run(node.orelse, state))
            return self.run(node.body if test else node.orelse, state)
        if isinstance(node, (ast.For, ast.AsyncFor)):  # the body may run or not
            return self.either(node, self.run(node.body + node.orelse, state), state)
        if isinstance(node, (ast.With, ast.AsyncWith)):
            return self.run(node.body, state)
        if isinstance(node, ast.Try):
            done = self.run(node.body + node.orelse, state)
            for handler in node.handlers:  # runs only if the body failed
                done = self.either(handler, done, self.run(handler.body, state))
            return self.run(node.finalbody, done)
        for call in ast.walk(node):
            if isinstance(call, ast.Call):
                state = self.call(call, state)
        if isinstance(node, ast.Assign):
            for target in node.targets:
                name = _environ_key(target)
                if name is not None:
                    state = {**state, name: frozenset([_value(node.value)])}
        return state

    def call(self, node: ast.Call, state: _State) -> _State:
        func = node.func
        if isinstance(func, ast.Name) and func.id in self.functions:
            if func.id in self.running:
                return state
            self.running.add(func.id)
            try:
                return self.run(self.functions[func.id].body, state)
            finally:
                self.running.discard(func.id)
        if not (isinstance(func, ast.Attribute) and _is_environ(func.value)):
            return state
        if func.attr == "setdefault" and len(node.args) == 2:
            name, value = node.args
            if isinstance(name, ast.Constant) and name.value in _VARIABLES:
                default = _value(value)
                old = state[name.value]
                return {**state, name.value: frozenset(default if v is None else v for v in old)}
        if func.attr == "update":
            pairs: list[tuple[object, ast.expr]] = [(k.arg, k.value) for k in node.keywords]
            if node.args and isinstance(node.args[0], ast.Dict):
                literal = node.args[0]
                pairs += [
                    (key.value, value)
                    for key, value in zip(literal.keys, literal.values, strict=True)
                    if isinstance(key, ast.Constant)
                ]
            for key, value in pairs:
                if key in _VARIABLES:
                    state = {**state, str(key): frozenset([_value(value)])}
        return state


def _explain(path: Path, name: str, values: frozenset[_Value], depends: list[str]) -> str:
    reasons = [f"it depends on {', '.join(dict.fromkeys(depends))}"] if depends else []
    reasons += [
        f"line {v.line} computes it at run time ({v.source})"
        for v in values
        if isinstance(v, _RunTime)
    ]
    candidates = sorted(v for v in values if isinstance(v, str))
    found = ", ".join(map(repr, candidates)) or "none"
    if None in values:
        found += " (or not set)"
    example = candidates[0] if candidates else "mysite.settings"
    choose = f"%env {name}={example}"
    if name == SETTINGS_VARIABLE:
        choose += " or set c.DBReset.settings_module in ipython_config.py"
    return (
        f"cannot tell which {name} {path} sets for 'manage.py shell' without running it: "
        f"{'; '.join(reasons)}. Candidates found: {found}. Choose with {choose}."
    )


def read_manage_py(path: Path) -> ManagePy:
    """Read what ``manage.py shell`` would set, without running it.

    The bytes go to :func:`ast.parse`, which honours a PEP 263 coding line.
    """
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except OSError as exc:
        raise ProjectError(f"could not read {path}: {exc.strerror or exc}. {_CHOOSE}") from None
    except (SyntaxError, ValueError) as exc:
        raise ProjectError(f"could not read {path}: {exc}. {_CHOOSE}") from None
    reader = _Reader(tree)
    state = reader.run(tree.body, {name: frozenset([None]) for name in _VARIABLES})
    values, unknown = {}, {}
    for name, possible in state.items():
        only = next(iter(possible)) if len(possible) == 1 else _UNKNOWN
        if isinstance(only, str):
            values[name] = only
        elif only is not None:
            unknown[name] = _explain(path, name, possible, reader.depends[name])
    return ManagePy(path, values, unknown)


def find_manage_py(start: Path) -> Path | None:
    """The nearest ``manage.py`` in ``start`` or one of its parents; it is not read."""
    for folder in (start, *start.parents):
        candidate = folder / "manage.py"
        try:
            if candidate.is_file():
                return candidate
        except OSError as exc:  # e.g. a folder on the way that this user cannot search
            raise ProjectError(
                f"could not look for manage.py in {folder}: {exc.strerror or exc}. {_CHOOSE}"
            ) from None
    return None


def _apps_ready() -> bool:
    from django.apps import apps

    return apps.ready


def _half_set_up() -> bool:
    """A django.setup() that raised while importing apps leaves the registry stuck."""
    from django.apps import apps

    return apps.loading and not apps.ready


def setup_django(settings_module: str | None = None) -> Setup:
    """Set up Django for an interactive session, or report how it already was.

    Parameters
    ----------
    settings_module
        An explicit settings module; wins over everything else.

    Raises
    ------
    ProjectError
        No settings were found or they failed to import.  ``sys.path`` and the
        environment are left as they were.
    """
    import django
    from django.conf import settings

    env = os.environ
    if _apps_ready():
        return Setup(
            str(getattr(settings, "SETTINGS_MODULE", None) or "settings"), Source.ALREADY_SET_UP
        )
    if settings.configured:
        # settings.configure() was called, or settings were read, but no setup():
        # finish what was started rather than second-guessing it.
        return _finish_configured()

    module, source, manage_path, configuration = _choose(settings_module)
    read = manage_path if source is Source.MANAGE_PY else None
    path_entry = None
    if manage_path is not None:
        project = str(manage_path.parent)
        if project not in sys.path:
            sys.path.insert(0, project)
            path_entry = project
            log.debug("ipy_dbreset: %s added to sys.path, as manage.py would have it", project)

    written: dict[str, str | None] = {}

    def write(name: str, value: str) -> None:
        if env.get(name) != value:
            written[name] = env.get(name)
            env[name] = value

    write(SETTINGS_VARIABLE, module)
    if configuration:
        write(CONFIGURATION_VARIABLE, configuration)
    try:
        if env.get(CONFIGURATION_VARIABLE):
            _setup_configurations()
        else:
            django.setup()
    except Exception as exc:
        for name, old in written.items():
            if old is None:
                env.pop(name, None)
            else:
                env[name] = old
        if path_entry is not None and path_entry in sys.path:
            sys.path.remove(path_entry)
        if isinstance(exc, ProjectError):
            raise
        # The message keeps the error's first line; the rest is for the log.
        log.debug("ipy_dbreset: Django's setup with %s failed", module, exc_info=True)
        raise ProjectError(_failed_message(module, _origin(source, read), exc)) from None
    return Setup(module, source, read, tuple(written))


def _origin(source: Source, manage_py: Path | None) -> str:
    """Where the settings came from, in an error message: ``from /src/mysite/manage.py``."""
    return f"from {manage_py}" if source is Source.MANAGE_PY else source.value


def _choose(settings_module: str | None) -> tuple[str, Source, Path | None, str | None]:
    """The settings module, where it came from, manage.py's path and its configuration."""
    env = os.environ
    start = Path.cwd()
    if settings_module or env.get(SETTINGS_VARIABLE):
        # An explicit choice is not second-guessed: manage.py is not read, and
        # is looked for only to put its folder on sys.path.
        try:
            manage_path = find_manage_py(start)
        except ProjectError:  # the settings may well be importable as things are
            manage_path = None
        if settings_module:
            return settings_module, Source.OPTION, manage_path, None
        return env[SETTINGS_VARIABLE], Source.ENVIRONMENT, manage_path, None
    manage_path = find_manage_py(start)
    manage = None if manage_path is None else read_manage_py(manage_path)
    module = None if manage is None else manage.default(SETTINGS_VARIABLE)
    if manage is None or not module:
        raise ProjectError(_not_found_message(start, manage_path))
    configuration = None
    if not env.get(CONFIGURATION_VARIABLE):
        configuration = manage.default(CONFIGURATION_VARIABLE)
    return module, Source.MANAGE_PY, manage_path, configuration


def _finish_configured() -> Setup:
    import django
    from django.conf import settings

    module = str(getattr(settings, "SETTINGS_MODULE", None) or "settings")
    if _half_set_up():
        raise ProjectError(
            f"Django's setup with settings {module!r} failed part-way earlier in this "
            "process and cannot be retried: fix what it reported, then restart the shell "
            "(or kernel) and load ipy_dbreset again."
        )
    try:
        django.setup()
    except Exception as exc:
        log.debug("ipy_dbreset: Django's setup with %s failed", module, exc_info=True)
        raise ProjectError(_failed_message(module, Source.CONFIGURED.value, exc)) from None
    return Setup(module, Source.CONFIGURED)


def _setup_configurations() -> None:
    """django-configurations needs its own importer before Django reads settings."""
    try:
        import configurations
    except ImportError:
        raise ProjectError(
            f"{CONFIGURATION_VARIABLE} is set (by the environment or manage.py), so the project "
            "uses django-configurations, which is not installed: "
            "pip install django-configurations"
        ) from None
    configurations.setup()


def _not_found_message(start: Path, manage_path: Path | None) -> str:
    if manage_path is not None:
        looked = f"{manage_path} sets no {SETTINGS_VARIABLE} for 'manage.py shell'"
    else:
        looked = f"no manage.py in {start} or its parents"
    return (
        f"no Django settings found: no explicit settings module, {SETTINGS_VARIABLE} "
        f"is not set, and {looked}. Start from a folder inside the project, run "
        f"%env {SETTINGS_VARIABLE}=mysite.settings, or set "
        "c.DBReset.settings_module in ipython_config.py."
    )


def _failed_message(module: str, source: str, exc: BaseException) -> str:
    detail = f"{type(exc).__name__}: {exc}".splitlines()[0]
    text = f"could not set up Django with settings {module!r} ({source}): {detail}. "
    missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
    if missing is not None and (module == missing or module.startswith(f"{missing}.")):
        # The settings module itself (or its package) is not importable from here.
        text += f"Check that it is importable from {Path.cwd()}"
    else:
        text += "Fix the error in the settings"
    text += f", or set {SETTINGS_VARIABLE} / c.DBReset.settings_module to another module."
    if _half_set_up():
        text += (
            " Django cannot retry a failed setup in this process: restart the shell (or kernel)."
        )
    return text


def allow_async_unsafe(on: bool) -> bool:
    """Set ``DJANGO_ALLOW_ASYNC_UNSAFE=true`` (``on``) or remove it again.

    In a Jupyter kernel cells run inside an event loop, where Django refuses
    ORM calls unless this variable is set.  Returns whether this call changed
    the environment; a value already set is left as it is.  The caller
    removes only what it set, and says so: the process environment is the
    user's.
    """
    if on:
        if os.environ.get(ASYNC_UNSAFE_VARIABLE):
            return False
        os.environ[ASYNC_UNSAFE_VARIABLE] = "true"
        return True
    return os.environ.pop(ASYNC_UNSAFE_VARIABLE, None) is not None
