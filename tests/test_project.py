"""Finding the Django project: option, environment, nearest ``manage.py``; and clear failures.

``django.setup()`` happens once per process, so every case here runs a fresh
IPython shell in its own process, in a folder and environment of its own
(see :func:`run_shell`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from harness import ROOT, clean_env, run_shell

if TYPE_CHECKING:
    from pathlib import Path

    from harness import Cell, Session

# -- a tmp Django project -------------------------------------------------------

MANAGE_PY = """\
#!/usr/bin/env python
import os
import sys

print("MANAGE.PY WAS EXECUTED")
raise SystemExit("manage.py must only be read, never run")

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "{settings}")
    {extra}
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
"""

SETTINGS = """\
SECRET_KEY = "test-only"
INSTALLED_APPS = ["django.contrib.contenttypes", "myapp"]
USE_TZ = True
DATABASES = {{"default": {{"ENGINE": "django.db.backends.sqlite3", "NAME": {db!r}}}}}
MARK = {mark!r}
"""


def make_project(root: Path, *, settings: str = "mysite.settings", extra: str = "") -> Path:
    """``root/myproject`` with manage.py, mysite/settings.py, an app, and notebooks/."""
    project = root / "myproject"
    (project / "mysite").mkdir(parents=True)
    (project / "myapp").mkdir()
    (project / "notebooks" / "deeper").mkdir(parents=True)
    (project / "manage.py").write_text(MANAGE_PY.format(settings=settings, extra=extra))
    (project / "mysite" / "__init__.py").write_text("")
    (project / "myapp" / "__init__.py").write_text("")
    for name in ("settings", "other_settings", "option_settings"):
        write_settings(project, name)
    return project


def write_settings(project: Path, name: str, body: str | None = None) -> None:
    db = str(project / f"{name}.sqlite3")
    text = SETTINGS.format(db=db, mark=name) if body is None else body
    (project / "mysite" / f"{name}.py").write_text(text)


WHICH = (
    "from django.conf import settings\n"
    "from django.db import connection\n"
    "connection.ensure_connection()\n"
    "print('MARK', settings.MARK)"
)


def mark(cell: Cell) -> str:
    """Which settings module the shell ended up with (each one has its own MARK)."""
    assert cell.ok, cell.shown
    return cell.stdout.split("MARK", 1)[1].strip()


def assert_loaded(cell: Cell) -> None:
    assert cell.ok, cell.shown
    state = cell.state
    assert state["magics"] == ["dbreset", "dbstatus"]
    assert state["callbacks"] == {"pre_run_cell": 1, "post_run_cell": 1}
    assert state["configurables"] == 1
    assert state["loaded"]


SETTINGS_HINTS = ("DJANGO_SETTINGS_MODULE", "c.DBReset.settings_module")


def assert_clear_failure(
    session: Session, cell: Cell, *words: str, hints: tuple[str, ...] = SETTINGS_HINTS
) -> None:
    """One short UsageError naming the fix; nothing registered, nothing changed."""
    assert cell.ename == "UsageError", cell.shown
    shown = cell.shown.strip()
    assert "Traceback" not in shown
    assert len(shown) < 700 and len(shown.splitlines()) == 1, shown
    assert shown.startswith("UsageError: ipy_dbreset:"), shown
    for word in (*hints, *words):
        assert word in shown, shown
    state = cell.state
    assert state["magics"] == []
    assert state["callbacks"] == {"pre_run_cell": 0, "post_run_cell": 0}
    assert state["configurables"] == 0
    assert not state["loaded"]
    assert state["env"] == session.before["env"]
    assert state["path"] == session.before["path"]
    assert "MANAGE.PY WAS EXECUTED" not in session.output + cell.shown


# -- discovery order ------------------------------------------------------------


def test_notebook_in_a_project_subfolder_finds_the_nearest_manage_py(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    session = run_shell(
        ["%load_ext ipy_dbreset", WHICH, "import myapp; print(myapp.__file__)"],
        project / "notebooks" / "deeper",
        tmp_path=tmp_path,
    )
    load, which, app = session.cells
    assert_loaded(load)
    assert "MANAGE.PY WAS EXECUTED" not in session.output + load.shown
    assert mark(which) == "settings"
    # The project folder is importable (its apps are), and the shell says what it set.
    assert app.stdout.strip() == str(project / "myapp" / "__init__.py")
    assert load.state["path"][0] == str(project)
    assert load.state["env"]["DJANGO_SETTINGS_MODULE"] == "mysite.settings"
    assert any(
        str(project / "manage.py") in t and "DJANGO_SETTINGS_MODULE" in t for t in load.texts
    )


def test_quiet_setup_still_goes_to_the_log(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    session = run_shell(
        [
            "import logging, sys\nlogging.basicConfig(level=logging.INFO, stream=sys.__stderr__)",
            "%load_ext ipy_dbreset",
        ],
        project / "notebooks",
        config={"DBReset": {"verbosity": 0}},
        tmp_path=tmp_path,
    )
    assert_loaded(session[1])
    assert session[1].texts == []
    assert "ipy_dbreset: Django set up with mysite.settings" in session.output
    assert "set DJANGO_SETTINGS_MODULE" in session.output


def test_manage_py_that_assigns_the_variable_is_read_too(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    (project / "manage.py").write_text(
        'import os\nraise SystemExit("never run")\n'
        'os.environ["DJANGO_SETTINGS_MODULE"] = "mysite.other_settings"\n'
    )
    session = run_shell(["%load_ext ipy_dbreset", WHICH], project / "notebooks", tmp_path=tmp_path)
    assert_loaded(session[0])
    assert mark(session[1]) == "other_settings"


def test_environment_variable_wins_over_manage_py(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    session = run_shell(
        ["%load_ext ipy_dbreset", WHICH],
        project / "notebooks",
        env={"DJANGO_SETTINGS_MODULE": "mysite.other_settings"},
        tmp_path=tmp_path,
    )
    assert_loaded(session[0])
    assert mark(session[1]) == "other_settings"
    # The project folder from manage.py still goes on sys.path: that is how it imports.
    assert session[0].state["path"][0] == str(project)


def test_explicit_option_wins_over_environment_and_manage_py(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    session = run_shell(
        ["%load_ext ipy_dbreset", WHICH],
        project / "notebooks",
        env={"DJANGO_SETTINGS_MODULE": "mysite.other_settings"},
        config={"DBReset": {"settings_module": "mysite.option_settings"}},
        tmp_path=tmp_path,
    )
    assert_loaded(session[0])
    assert mark(session[1]) == "option_settings"
    assert session[0].state["env"]["DJANGO_SETTINGS_MODULE"] == "mysite.option_settings"


def test_option_works_without_any_manage_py(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    (project / "manage.py").unlink()
    session = run_shell(
        ["%load_ext ipy_dbreset", WHICH],
        tmp_path,
        env={"PYTHONPATH": f"{ROOT}{os.pathsep}{project}"},
        config={"DBReset": {"settings_module": "mysite.option_settings"}},
        tmp_path=tmp_path,
    )
    assert_loaded(session[0])
    assert mark(session[1]) == "option_settings"
    assert session[0].state["path"] == session.before["path"]


# -- django-configurations ------------------------------------------------------

CONFIGURATIONS_SETTINGS = """\
from configurations import Configuration


class Dev(Configuration):
    SECRET_KEY = "test-only"
    INSTALLED_APPS = ["django.contrib.contenttypes", "myapp"]
    DATABASES = {{"default": {{"ENGINE": "django.db.backends.sqlite3", "NAME": {db!r}}}}}
    MARK = "configurations Dev"
"""


def configurations_project(tmp_path: Path) -> Path:
    project = make_project(
        tmp_path,
        settings="mysite.config_settings",
        extra='os.environ.setdefault("DJANGO_CONFIGURATION", "Dev")',
    )
    write_settings(
        project,
        "config_settings",
        CONFIGURATIONS_SETTINGS.format(db=str(tmp_path / "config.sqlite3")),
    )
    return project


def test_django_configurations_project_is_set_up_with_its_configuration(tmp_path: Path) -> None:
    pytest.importorskip("configurations")
    project = configurations_project(tmp_path)
    session = run_shell(["%load_ext ipy_dbreset", WHICH], project / "notebooks", tmp_path=tmp_path)
    assert_loaded(session[0])
    assert mark(session[1]) == "configurations Dev"
    assert session[0].state["env"]["DJANGO_CONFIGURATION"] == "Dev"


def test_django_configurations_missing_is_a_clear_error(tmp_path: Path) -> None:
    project = configurations_project(tmp_path)
    hide = "import sys; sys.modules['configurations'] = None  # not installed"
    session = run_shell([hide, "%load_ext ipy_dbreset"], project / "notebooks", tmp_path=tmp_path)
    cell = session[1]
    assert_clear_failure(
        session, cell, hints=("DJANGO_CONFIGURATION", "pip install django-configurations")
    )
    assert "DJANGO_CONFIGURATION" not in cell.state["env"]


# -- no project, broken settings ------------------------------------------------


def test_no_project_found_says_what_was_looked_for(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    nowhere = tmp_path / "nowhere"
    nowhere.mkdir()
    session = run_shell(
        [
            "%load_ext ipy_dbreset",
            # The fix the message suggests, then loading again, works.
            "%env DJANGO_SETTINGS_MODULE=mysite.other_settings",
            f"import sys; sys.path.insert(0, {str(project)!r})",
            "%load_ext ipy_dbreset",
            WHICH,
        ],
        nowhere,
        tmp_path=tmp_path,
    )
    assert_clear_failure(session, session[0], "no Django settings found", str(nowhere))
    assert_loaded(session[3])
    assert mark(session[4]) == "other_settings"


def test_settings_module_that_does_not_exist(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    session = run_shell(
        ["%load_ext ipy_dbreset", "%load_ext ipy_dbreset", WHICH],
        project / "notebooks",
        env={"DJANGO_SETTINGS_MODULE": "mysite.no_such_settings"},
        tmp_path=tmp_path,
    )
    assert_clear_failure(
        session, session[0], "mysite.no_such_settings", "ModuleNotFoundError", "importable"
    )
    # Trying again gives the same clear message, not a different error.
    assert_clear_failure(session, session[1], "mysite.no_such_settings")


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ("import no_such_package\n", ("No module named 'no_such_package'",)),
        ("SECRET_KEY = 'x'\nraise RuntimeError('boom in settings')\n", ("boom in settings",)),
        ("SECRET_KEY = 'x'\nDEBUG = (\n", ("SyntaxError",)),
    ],
    ids=["import-error", "exception", "syntax-error"],
)
def test_settings_that_fail_to_import_then_fixed(tmp_path: Path, body: str, words: tuple) -> None:
    project = make_project(tmp_path)
    write_settings(project, "settings", body)
    fixed = SETTINGS.format(db=str(project / "fixed.sqlite3"), mark="fixed")
    fix = f"open({str(project / 'mysite' / 'settings.py')!r}, 'w').write({fixed!r})"
    session = run_shell(
        ["%load_ext ipy_dbreset", fix, "%load_ext ipy_dbreset", WHICH],
        project / "notebooks",
        tmp_path=tmp_path,
    )
    assert_clear_failure(session, session[0], "mysite.settings", *words)
    assert_loaded(session[2])
    assert mark(session[3]) == "fixed"


def test_settings_with_an_app_that_fails_to_import(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    write_settings(
        project,
        "settings",
        SETTINGS.format(db=str(project / "db.sqlite3"), mark="x").replace(
            '"myapp"', '"myapp", "missing_app"'
        ),
    )
    session = run_shell(
        ["%load_ext ipy_dbreset", "%load_ext ipy_dbreset"], project / "notebooks", tmp_path=tmp_path
    )
    # Django cannot retry a half-done setup in the same process; say so, both times.
    assert_clear_failure(session, session[0], "No module named 'missing_app'", "restart")
    assert_clear_failure(session, session[1], "failed part-way", "restart", hints=())


def test_failed_load_leaves_no_half_registered_extension(tmp_path: Path) -> None:
    """After a failure, nothing of ours answers: no magic, no callback, no signal receiver."""
    nowhere = tmp_path / "nowhere"
    nowhere.mkdir()
    session = run_shell(
        [
            "import django.db.backends.signals",
            "%load_ext ipy_dbreset",
            "%dbstatus",
            "%unload_ext ipy_dbreset",
        ],
        nowhere,
        tmp_path=tmp_path,
    )
    imported, load, status, unload = session.cells
    assert load.ename == "UsageError"
    assert load.state["receivers"] == imported.state["receivers"]
    assert status.ename == "UsageError" and "not found" in status.shown
    assert unload.ok, unload.shown
    assert "not loaded" in unload.shown


def test_start_up_extension_without_a_project_says_so_in_one_message(tmp_path: Path) -> None:
    """`ipython --ext ipy_dbreset` outside a project: the message, no traceback, a way back."""
    project = make_project(tmp_path)
    nowhere = tmp_path / "nowhere"
    nowhere.mkdir()
    env = clean_env(IPYTHONDIR=str(tmp_path / "ipython"))
    cells = (
        "print('callbacks', len(get_ipython().events.callbacks['pre_run_cell']))\n"
        "%env DJANGO_SETTINGS_MODULE=mysite.settings\n"
        f"import sys; sys.path.insert(0, {str(project)!r})\n"
        "%reload_ext ipy_dbreset\n"
        "print('callbacks', len(get_ipython().events.callbacks['pre_run_cell']))\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "IPython",
            "--no-banner",
            "--colors=NoColor",
            "--ext",
            "ipy_dbreset",
            "-c",
            cells,
        ],
        cwd=nowhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Traceback" not in output
    assert "no Django settings found" in output
    assert "Once that is fixed: %reload_ext ipy_dbreset" in output
    assert "callbacks 0" in output  # nothing half-registered
    assert "callbacks 1" in output  # and the way back works
