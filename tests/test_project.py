"""Finding the Django project: option, environment, nearest ``manage.py``; and clear failures.

``django.setup()`` happens once per process, so every case here runs a fresh
IPython shell in its own process, in a folder and environment of its own
(see :func:`run_shell`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from harness import (
    AS_NOBODY,
    ROOT,
    SETTINGS,
    WHICH,
    assert_loaded,
    clean_env,
    make_project,
    mark,
    run_ipython,
    run_shell,
    write_settings,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from harness import Cell, Session

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
    assert "ipy_dbreset: Django set up with 'mysite.settings'" in session.output
    assert "DJANGO_SETTINGS_MODULE was set to it" in session.output


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


def test_settings_error_keeps_one_line_and_its_traceback_goes_to_the_debug_log(
    tmp_path: Path,
) -> None:
    project = make_project(tmp_path)
    write_settings(
        project,
        "settings",
        "SECRET_KEY = 'x'\n\ndef deep():\n    raise RuntimeError('boom in settings')\n\ndeep()\n",
    )
    log_file = tmp_path / "debug.log"
    debug_log = (
        "import logging\n"
        f"handler = logging.FileHandler({str(log_file)!r})\n"
        "logging.getLogger('ipy_dbreset').addHandler(handler)\n"
        "logging.getLogger('ipy_dbreset').setLevel(logging.DEBUG)"
    )
    session = run_shell(
        [debug_log, "%load_ext ipy_dbreset"], project / "notebooks", tmp_path=tmp_path
    )
    assert_clear_failure(session, session[1], "mysite.settings", "boom in settings")
    logged = log_file.read_text()
    assert "ipy_dbreset: Django's setup with mysite.settings failed" in logged, logged
    assert "Traceback (most recent call last)" in logged, logged
    assert "in deep" in logged, logged  # the frames the message leaves out


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
    done = run_ipython(["--ext", "ipy_dbreset"], cells, cwd=nowhere, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Traceback" not in output
    assert "no Django settings found" in output
    assert "Once that is fixed: %reload_ext ipy_dbreset" in output
    assert "callbacks 0" in output  # nothing half-registered
    assert "callbacks 1" in output  # and the way back works


# -- an explicit choice does not read manage.py -----------------------------------

BROKEN_MANAGE_PY = {
    "syntax-error": b"import os\nif True\n",
    "not-utf-8": b"import os\nos.environ.setdefault('DJANGO_SETTINGS_MODULE', 'caf\xe9')\n",
    "null-byte": b"import os\x00\n",
}


@pytest.mark.parametrize("how", ["environment", "option"])
@pytest.mark.parametrize("content", BROKEN_MANAGE_PY.values(), ids=BROKEN_MANAGE_PY.keys())
def test_explicit_choice_wins_over_a_manage_py_that_cannot_be_read(
    tmp_path: Path, content: bytes, how: str
) -> None:
    project = make_project(tmp_path)
    (project / "manage.py").write_bytes(content)
    choice = "mysite.other_settings"
    session = run_shell(
        ["%load_ext ipy_dbreset", WHICH],
        project / "notebooks",
        env={"DJANGO_SETTINGS_MODULE": choice} if how == "environment" else None,
        config={"DBReset": {"settings_module": choice}} if how == "option" else None,
        tmp_path=tmp_path,
    )
    assert_loaded(session[0])
    assert mark(session[1]) == "other_settings"
    # Its folder is still found, without reading it, and goes on sys.path.
    assert session[0].state["path"][0] == str(project)


def test_manage_py_that_cannot_be_read_without_a_choice_says_how_to_choose(
    tmp_path: Path,
) -> None:
    project = make_project(tmp_path)
    (project / "manage.py").write_bytes(BROKEN_MANAGE_PY["syntax-error"])
    session = run_shell(["%load_ext ipy_dbreset"], project / "notebooks", tmp_path=tmp_path)
    assert_clear_failure(session, session[0], "could not read", str(project / "manage.py"))


# -- manage.py is read as `manage.py shell` runs it ---------------------------------

NEVER_RUN = 'import os\nimport sys\nraise SystemExit("never run")\n'

SHELL_READINGS = {
    # A branch for `manage.py test` is not taken by `manage.py shell`.
    "test-branch-first": (
        'if len(sys.argv) > 1 and sys.argv[1] == "test":\n'
        '    os.environ["DJANGO_SETTINGS_MODULE"] = "mysite.other_settings"\n'
        'os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")\n',
        "settings",
    ),
    "test-in-argv": (
        'if "test" in sys.argv:\n'
        '    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.other_settings")\n'
        "else:\n"
        '    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")\n',
        "settings",
    ),
    "shell-branch": (
        'if sys.argv[1] == "shell":\n'
        '    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.other_settings")\n'
        'os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")\n',
        "other_settings",
    ),
    # A helper that nobody calls sets nothing.
    "uncalled-helper": (
        "def for_tests():\n"
        '    os.environ["DJANGO_SETTINGS_MODULE"] = "mysite.other_settings"\n'
        'os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")\n',
        "settings",
    ),
    # setdefault after an assignment does nothing.
    "assignment-then-setdefault": (
        'os.environ["DJANGO_SETTINGS_MODULE"] = "mysite.other_settings"\n'
        'os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")\n',
        "other_settings",
    ),
    # Django's own template since 2.0: main() called from the __main__ block.
    "main-function": (
        "def main():\n"
        '    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.other_settings")\n'
        "    from django.core.management import execute_from_command_line\n"
        "    execute_from_command_line(sys.argv)\n"
        "\n"
        'if __name__ == "__main__":\n'
        "    sys.exit(main())\n",
        "other_settings",
    ),
}


@pytest.mark.parametrize(("body", "expected"), SHELL_READINGS.values(), ids=SHELL_READINGS.keys())
def test_manage_py_is_read_as_manage_py_shell_runs_it(
    tmp_path: Path, body: str, expected: str
) -> None:
    project = make_project(tmp_path)
    (project / "manage.py").write_text(NEVER_RUN + body)
    session = run_shell(["%load_ext ipy_dbreset", WHICH], project / "notebooks", tmp_path=tmp_path)
    assert_loaded(session[0])
    assert mark(session[1]) == expected
    assert "MANAGE.PY WAS EXECUTED" not in session.output


UNKNOWABLE = {
    "condition-on-the-environment": (
        'if os.environ.get("STAGE") == "prod":\n'
        '    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.other_settings")\n'
        'os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")\n',
        ("mysite.other_settings", "mysite.settings", "line 4"),
    ),
    "computed-value": (
        'NAME = "mysite"\nos.environ.setdefault("DJANGO_SETTINGS_MODULE", f"{NAME}.settings")\n',
        ("computes it at run time", "f'{NAME}.settings'"),
    ),
}


@pytest.mark.parametrize(("body", "words"), UNKNOWABLE.values(), ids=UNKNOWABLE.keys())
def test_manage_py_that_only_running_would_tell_says_how_to_choose(
    tmp_path: Path, body: str, words: tuple[str, ...]
) -> None:
    project = make_project(tmp_path)
    (project / "manage.py").write_text(NEVER_RUN + body)
    session = run_shell(
        [
            "%load_ext ipy_dbreset",
            "%env DJANGO_SETTINGS_MODULE=mysite.other_settings",
            "%load_ext ipy_dbreset",
            WHICH,
        ],
        project / "notebooks",
        tmp_path=tmp_path,
    )
    assert_clear_failure(session, session[0], "cannot tell", "without running it", *words)
    # The way out the message gives works.
    assert_loaded(session[2])
    assert mark(session[3]) == "other_settings"


def test_manage_py_coding_line_is_honoured(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    (project / "manage.py").write_bytes(
        b"#!/usr/bin/env python\n# -*- coding: latin-1 -*-\nimport os\n"
        b"# Caf\xe9 project\n"
        b"os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'mysite.other_settings')\n"
    )
    session = run_shell(["%load_ext ipy_dbreset", WHICH], project / "notebooks", tmp_path=tmp_path)
    assert_loaded(session[0])
    assert mark(session[1]) == "other_settings"


# -- folders and files this user cannot read --------------------------------------


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder the unprivileged ``nobody`` user can write to (tmp_path is root's only)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the shell as another user")
    # An interpreter under root's home (pyenv's shared libpython) may not start for nobody.
    probe = subprocess.run(
        [*AS_NOBODY, sys.executable, "-c", "import IPython"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"{sys.executable} does not start as nobody: {probe.stderr.decode()[:200]}")
    folder = Path(tempfile.mkdtemp(prefix="ipy_dbreset-"))
    folder.chmod(0o777)
    yield folder
    for path in folder.rglob("*"):  # let rmtree back into what the test locked
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(folder)


def open_to_all(root: Path) -> None:
    for path in (root, *root.rglob("*")):
        path.chmod(0o777 if path.is_dir() else 0o666)


def test_parent_folder_that_cannot_be_searched_is_one_clear_message(shared_tmp: Path) -> None:
    locked = shared_tmp / "locked"
    project = make_project(locked)
    open_to_all(locked)
    locked.chmod(0o700)  # root's: nobody cannot look inside, but is started in a subfolder
    session = run_shell(
        ["%load_ext ipy_dbreset"], project / "notebooks", tmp_path=shared_tmp, unprivileged=True
    )
    assert_clear_failure(session, session[0], "could not look for manage.py", "Permission denied")


def test_unreadable_manage_py(shared_tmp: Path) -> None:
    project = make_project(shared_tmp)
    open_to_all(shared_tmp)
    (project / "manage.py").chmod(0)
    refused = run_shell(
        ["%load_ext ipy_dbreset"], project / "notebooks", tmp_path=shared_tmp, unprivileged=True
    )
    assert_clear_failure(refused, refused[0], "could not read", "Permission denied")
    chosen = run_shell(
        ["%load_ext ipy_dbreset", WHICH],
        project / "notebooks",
        env={"DJANGO_SETTINGS_MODULE": "mysite.other_settings"},
        tmp_path=shared_tmp,
        unprivileged=True,
    )
    assert_loaded(chosen[0])
    assert mark(chosen[1]) == "other_settings"
