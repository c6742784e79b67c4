"""After ``%load_ext``, the names the project's ``manage.py shell`` would give.

In IPython's test shell (the demo project) and in fresh terminal shells of a
tmp project whose own ``shell`` command adds a name, as projects customise it.
"""

from __future__ import annotations

import re
import textwrap
from typing import TYPE_CHECKING

import django
import pytest

from harness import clean_env, imports_notice, make_project, run, run_ipython

if TYPE_CHECKING:
    from pathlib import Path

    from IPython.core.interactiveshell import InteractiveShell

NEEDS_52 = pytest.mark.skipif(
    django.VERSION < (5, 2), reason="Django's shell imports names from 5.2 on"
)


@pytest.fixture
def fresh_namespace(bare_shell: InteractiveShell) -> InteractiveShell:
    for name in ("Order", "ContentType"):
        bare_shell.user_ns.pop(name, None)
    yield bare_shell
    for name in ("Order", "ContentType"):
        bare_shell.user_ns.pop(name, None)


def test_the_models_are_there_after_load_ext_and_it_says_so(fresh_namespace):
    from django.contrib.contenttypes.models import ContentType
    from shop.models import Order

    loaded = run(fresh_namespace, "%load_ext ipy_dbreset")
    assert loaded.ok, loaded.shown
    assert fresh_namespace.user_ns["Order"] is Order
    assert fresh_namespace.user_ns["ContentType"] is ContentType
    lines = [line for line in loaded.shown.splitlines() if "imported" in line]
    assert len(lines) == 1, loaded.shown
    assert "imported 2 names" in lines[0]
    assert "Order" in lines[0]
    assert run(fresh_namespace, "Order.objects.count()").ok


def test_a_name_the_user_already_has_is_never_replaced_and_is_named(fresh_namespace):
    fresh_namespace.user_ns["Order"] = "mine"
    loaded = run(fresh_namespace, "%load_ext ipy_dbreset")
    assert loaded.ok, loaded.shown
    assert fresh_namespace.user_ns["Order"] == "mine"
    assert "kept your own Order" in loaded.shown


def test_nothing_is_said_when_the_shell_has_every_name_already(fresh_namespace):
    assert run(fresh_namespace, "from shop.models import Order").ok
    assert run(fresh_namespace, "from django.contrib.contenttypes.models import ContentType").ok
    loaded = run(fresh_namespace, "%load_ext ipy_dbreset")
    assert loaded.ok, loaded.shown
    assert "imported" not in loaded.shown


def test_auto_imports_false_imports_nothing(fresh_namespace):
    assert run(fresh_namespace, "%config DBReset.auto_imports = False").ok
    loaded = run(fresh_namespace, "%load_ext ipy_dbreset")
    assert loaded.ok, loaded.shown
    assert "Order" not in fresh_namespace.user_ns
    assert "imported" not in loaded.shown


# -- a project with its own shell command ------------------------------------------

SHELL_COMMAND = textwrap.dedent(
    """\
    from django.core.management.commands import shell


    class Command(shell.Command):
        def get_auto_imports(self):
            return [*super().get_auto_imports(), "os.path.join"]
    """
)

MODELS = textwrap.dedent(
    """\
    from django.db import models


    class Gadget(models.Model):
        name = models.CharField(max_length=20)
    """
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    project = make_project(tmp_path)
    (project / "myapp" / "models.py").write_text(MODELS)
    commands = project / "myapp" / "management" / "commands"
    commands.mkdir(parents=True)
    for folder in (commands.parent, commands):
        (folder / "__init__.py").write_text("")
    (commands / "shell.py").write_text(SHELL_COMMAND)
    return project


@NEEDS_52
def test_the_projects_own_shell_command_decides_the_names(project, tmp_path):
    code = "%load_ext ipy_dbreset\nprint('NAMES', Gadget.__name__, join.__module__)"
    done = run_ipython([], code, cwd=project, env=clean_env(IPYTHONDIR=str(tmp_path / "ipy")))
    assert "NAMES Gadget posixpath" in done.stdout, done.stdout + done.stderr
    notice = [line for line in done.stdout.splitlines() if "imported" in line]
    assert len(notice) == 1, done.stdout
    assert re.fullmatch(imports_notice("Gadget", "ContentType", "join"), notice[0].strip())
