"""Finding the Django project and setting it up, without running the user's ``manage.py``.

Settings are looked for in this order:

1. an explicit settings module (``c.DBReset.settings_module``);
2. the ``DJANGO_SETTINGS_MODULE`` environment variable;
3. the ``DJANGO_SETTINGS_MODULE`` default in the nearest ``manage.py`` found by
   walking up from the working directory (read with :mod:`ast`, never executed).

The folder holding that ``manage.py`` is put on ``sys.path`` so that a notebook
in ``myproject/notebooks/`` can import the project's apps.
"""

from __future__ import annotations

import ast
import os
import sys
from dataclasses import dataclass
from pathlib import Path

SETTINGS_VARIABLE = "DJANGO_SETTINGS_MODULE"
CONFIGURATION_VARIABLE = "DJANGO_CONFIGURATION"
ASYNC_UNSAFE_VARIABLE = "DJANGO_ALLOW_ASYNC_UNSAFE"


class ProjectError(Exception):
    """The Django project could not be found or set up; the message says how to fix it."""


@dataclass(frozen=True)
class ManagePy:
    """What a ``manage.py`` says about its project, read without executing it."""

    path: Path
    settings_module: str | None
    configuration: str | None  # django-configurations' DJANGO_CONFIGURATION default


@dataclass(frozen=True)
class Setup:
    """How Django came to be set up."""

    settings_module: str
    source: str
    """``"already set up"``, ``"option"``, ``"environment"`` or the manage.py path."""
    added_to_path: str | None = None
    environment: tuple[str, ...] = ()
    """The environment variables this setup wrote."""

    def describe(self) -> str:
        text = f"Django set up with {self.settings_module} ({self.source})"
        if self.environment:
            text += f"; set {', '.join(self.environment)}"
        return text


def _environ_defaults(tree: ast.AST) -> dict[str, str]:
    """``os.environ.setdefault("NAME", "value")`` and ``os.environ["NAME"] = "value"`` calls."""
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "setdefault"
            and len(node.args) == 2
            and all(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in node.args)
        ):
            name, value = (a.value for a in node.args)  # type: ignore[attr-defined]
            found.setdefault(name, value)
        elif (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Subscript)
            and isinstance(node.targets[0].slice, ast.Constant)
            and isinstance(node.targets[0].slice.value, str)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            found.setdefault(node.targets[0].slice.value, node.value.value)
    return found


def read_manage_py(path: Path) -> ManagePy:
    """Read the settings default from a ``manage.py`` without running it."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, ValueError) as exc:
        raise ProjectError(f"could not read {path}: {exc}") from None
    defaults = _environ_defaults(tree)
    return ManagePy(path, defaults.get(SETTINGS_VARIABLE), defaults.get(CONFIGURATION_VARIABLE))


def find_manage_py(start: Path) -> ManagePy | None:
    """The nearest ``manage.py`` in ``start`` or one of its parents."""
    for folder in (start, *start.parents):
        candidate = folder / "manage.py"
        if candidate.is_file():
            return read_manage_py(candidate)
    return None


def _apps_ready() -> bool:
    from django.apps import apps

    return apps.ready


def _half_set_up() -> bool:
    """A django.setup() that raised while importing apps leaves the registry stuck."""
    from django.apps import apps

    return apps.loading and not apps.ready


def setup_django(
    settings_module: str | None = None,
    *,
    cwd: Path | None = None,
    environ: dict[str, str] | None = None,
) -> Setup:
    """Set up Django for an interactive session, or report how it already was.

    Parameters
    ----------
    settings_module
        An explicit settings module; wins over everything else.
    cwd
        Where to start looking for ``manage.py`` (default: the working directory).
    environ
        The environment to read and write (default: ``os.environ``).

    Raises
    ------
    ProjectError
        No settings were found or they failed to import.  ``sys.path`` and the
        environment are left as they were.
    """
    import django
    from django.conf import settings

    env = os.environ if environ is None else environ
    if _apps_ready():
        return Setup(
            str(getattr(settings, "SETTINGS_MODULE", None) or "settings"), "already set up"
        )
    if settings.configured:
        # settings.configure() was called, or settings were read, but no setup():
        # finish what was started rather than second-guessing it.
        return _finish_configured()

    start = Path.cwd() if cwd is None else cwd
    manage = find_manage_py(start)
    if settings_module:
        module, source = settings_module, "option"
    elif env.get(SETTINGS_VARIABLE):
        module, source = env[SETTINGS_VARIABLE], f"{SETTINGS_VARIABLE}"
    elif manage is not None and manage.settings_module:
        module, source = manage.settings_module, f"from {manage.path}"
    else:
        raise ProjectError(_not_found_message(start, manage))

    path_entry = None
    if manage is not None:
        project = str(manage.path.parent)
        if project not in sys.path:
            sys.path.insert(0, project)
            path_entry = project

    written: dict[str, str | None] = {}

    def write(name: str, value: str) -> None:
        if env.get(name) != value:
            written[name] = env.get(name)
            env[name] = value

    write(SETTINGS_VARIABLE, module)
    if manage is not None and manage.configuration and not env.get(CONFIGURATION_VARIABLE):
        write(CONFIGURATION_VARIABLE, manage.configuration)
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
        raise ProjectError(_failed_message(module, source, exc)) from None
    return Setup(module, source, path_entry, tuple(written))


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
        raise ProjectError(_failed_message(module, "configured", exc)) from None
    return Setup(module, "configured")


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


def _not_found_message(start: Path, manage: ManagePy | None) -> str:
    if manage is not None:
        looked = f"{manage.path} sets no {SETTINGS_VARIABLE} default"
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


def in_event_loop() -> bool:
    """Whether code here runs inside an event loop, as cells do in a Jupyter kernel."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
