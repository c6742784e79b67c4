"""Each notice is shown once, whatever the project's LOGGING, and the log gets every repair.

Many projects' ``LOGGING`` sends INFO from every logger to the console through
a handler on the root logger (django-oscar's sandbox, cookiecutter-django).
Such a handler writes where the shell shows its notices: it must not print
them a second time.  And whichever of Django and the extension comes first, a
handler the user puts on the ``ipy_dbreset`` logger receives every repair, at
the level of what happened: INFO when nothing was lost, WARNING when
something was, ERROR when a repair failed.

Real shells on PostgreSQL: a kernel with Django set up before ``%load_ext``
and one where ``%load_ext`` sets it up, ``manage.py shell -i ipython`` and
``shell_plus --ipython`` (Django first), terminal ``ipython --ext`` (the
extension first).
"""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING

import pytest
from test_shells import SHELL_PLUS_SETTINGS, Project, Terminal

from conftest import terminate_backends, wait_until_disconnected
from harness import DEMO, Kernel

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

# django-oscar's sandbox (oscar/sandbox/settings.py), trimmed to what counts here.
OSCAR = """
LOGGING = {
    "version": 1,
    "disable_existing_loggers": True,
    "formatters": {"simple": {"format": "[%(asctime)s] %(message)s"}},
    "root": {"level": "DEBUG", "handlers": ["console"]},
    "handlers": {
        "null": {"level": "DEBUG", "class": "logging.NullHandler"},
        "console": {"level": "INFO", "class": "logging.StreamHandler", "formatter": "simple"},
    },
    "loggers": {
        "oscar": {"level": "DEBUG", "propagate": True},
        "django": {"handlers": ["null"], "propagate": True, "level": "INFO"},
        "django.request": {"handlers": ["console"], "level": "ERROR", "propagate": True},
        "django.db.backends": {"level": "WARNING", "propagate": True},
    },
}
"""

# cookiecutter-django (config/settings/base.py).
COOKIECUTTER = """
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "verbose": {
            "format": "%(levelname)s %(asctime)s %(module)s %(process)d %(thread)d %(message)s"
        }
    },
    "handlers": {
        "console": {"level": "DEBUG", "class": "logging.StreamHandler", "formatter": "verbose"}
    },
    "root": {"level": "INFO", "handlers": ["console"]},
}
"""

LOGGINGS = {"oscar": OSCAR, "cookiecutter": COOKIECUTTER}

# The user's own handler on the extension's logger: what it receives, as (level, message).
COLLECT = """
import logging
class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.got = []
    def emit(self, record):
        self.got.append((record.levelname, record.getMessage()))
collected = Collect()
logging.getLogger("ipy_dbreset").addHandler(collected)
logging.getLogger("ipy_dbreset").setLevel(logging.INFO)
"""

SERVER_CLOSED = "closed db 'default': the server closed the connection"
ROLLED_BACK = "rolled back db 'default': a failed statement aborted the transaction"


def settings(project: Project, logging: str) -> dict[str, str]:
    """A settings module of the demo project with ``logging``; the env that selects it."""
    (project.site / "logging_settings.py").write_text(SHELL_PLUS_SETTINGS + logging)
    return {"DJANGO_SETTINGS_MODULE": "logging_settings"}


def times(text: str, everything: str) -> int:
    """How often ``text`` is shown, wrapped to a terminal's width or not."""
    return " ".join(everything.split()).count(text)


def everything(cell) -> str:
    return "\n".join([cell.stdout, cell.stderr, *cell.texts])


@pytest.fixture
def kernels() -> Iterator[list[Kernel]]:
    started: list[Kernel] = []
    yield started
    for kernel in started:
        kernel.close()


def assert_kernel_says_each_once_and_logs(kernel: Kernel, postgres_db: str) -> None:
    kernel.ok(COLLECT)
    kernel.ok(
        "from django.db import connection, transaction\nfrom shop.models import Order\n"
        "Order.objects.create(number=1)"
    )
    assert terminate_backends(postgres_db) >= 1
    wait_until_disconnected(postgres_db)
    repaired = kernel.ok("Order.objects.count()")
    assert times(SERVER_CLOSED, everything(repaired)) == 1, everything(repaired)

    kernel.ok("transaction.set_autocommit(False); Order.objects.create(number=2)")
    failed = kernel.run("Order.objects.create(number=1)")
    assert failed.ename == "IntegrityError"
    assert times(ROLLED_BACK, everything(failed)) == 1, everything(failed)
    kernel.ok("transaction.set_autocommit(True)")

    got = kernel.ok("collected.got").value()
    closed = [level for level, message in got if SERVER_CLOSED in message]
    lost = [level for level, message in got if ROLLED_BACK in message]
    assert closed == ["INFO"], got  # nothing was lost
    assert lost == ["WARNING"], got  # an unsaved write was


@pytest.mark.kernel
@pytest.mark.postgres
@pytest.mark.parametrize("logging", LOGGINGS)
def test_kernel_with_django_set_up_first_says_each_notice_once(
    tmp_path: Path, postgres_url: str, postgres_db: str, kernels: list[Kernel], logging: str
) -> None:
    project = Project(tmp_path, postgres_url)
    kernel = Kernel(cwd=DEMO, env=project.env(**settings(project, LOGGINGS[logging])))
    kernels.append(kernel)
    kernel.ok("import django; django.setup()")
    loaded = kernel.ok("%load_ext ipy_dbreset")
    assert "Django" not in everything(loaded)  # set up already: a detail, not said
    assert_kernel_says_each_once_and_logs(kernel, postgres_db)


@pytest.mark.kernel
@pytest.mark.postgres
@pytest.mark.parametrize("logging", LOGGINGS)
def test_kernel_where_the_extension_sets_django_up_logs_to_the_users_handler(
    tmp_path: Path, postgres_url: str, postgres_db: str, kernels: list[Kernel], logging: str
) -> None:
    project = Project(tmp_path, postgres_url)
    kernel = Kernel(cwd=DEMO, env=project.env(**settings(project, LOGGINGS[logging])))
    kernels.append(kernel)
    loaded = kernel.ok("%load_ext ipy_dbreset")
    setup = "Django set up with 'logging_settings'"
    assert times(setup, everything(loaded)) == 1, everything(loaded)
    # The project's dictConfig ran inside the extension's setup; its loggers still log.
    disabled = (
        "import logging\n[n for n, l in logging.root.manager.loggerDict.items()"
        " if n.startswith('ipy_dbreset') and getattr(l, 'disabled', False)]"
    )
    assert kernel.ok(disabled).value() == []
    assert_kernel_says_each_once_and_logs(kernel, postgres_db)


@pytest.fixture
def terminals() -> Iterator[Callable[..., Terminal]]:
    started: list[Terminal] = []

    def start(argv: list[str], env: dict[str, str]) -> Terminal:
        terminal = Terminal(argv, DEMO, env)
        started.append(terminal)
        return terminal

    yield start
    for terminal in started:
        terminal.close()


def assert_terminal_says_each_once(shell: Terminal, postgres_db: str) -> None:
    shell.type("from shop.models import Order; from django.db import connection, transaction")
    shell.type("Order.objects.create(number=1)")
    assert terminate_backends(postgres_db) >= 1
    wait_until_disconnected(postgres_db)
    shown = shell.type("Order.objects.count()")
    assert times(SERVER_CLOSED, shown) == 1, shown
    assert re.search(r"^ipy_dbreset: closed db 'default'", shown, re.M), shown
    shell.type("transaction.set_autocommit(False); Order.objects.create(number=2)")
    shown = shell.type("Order.objects.create(number=1)")
    assert "IntegrityError" in shown and times(ROLLED_BACK, shown) == 1, shown


@pytest.mark.postgres
@pytest.mark.parametrize("runner", ["manage.py shell", "shell_plus --ipython"])
def test_django_shells_say_each_notice_once(
    tmp_path: Path, postgres_url: str, postgres_db: str, terminals, runner: str
) -> None:
    project = Project(tmp_path, postgres_url)
    project.ipython_config(extension=True)
    env = project.env(**settings(project, OSCAR))
    command = ["shell", "-i", "ipython"] if runner == "manage.py shell" else runner.split()
    shell = terminals([sys.executable, "manage.py", *command], env)
    assert_terminal_says_each_once(shell, postgres_db)


@pytest.mark.postgres
def test_terminal_ipython_loading_the_extension_first_says_each_notice_once(
    tmp_path: Path, postgres_url: str, postgres_db: str, terminals
) -> None:
    project = Project(tmp_path, postgres_url)
    project.ipython_config(extension=False)
    env = project.env(**settings(project, OSCAR))
    argv = [sys.executable, "-m", "IPython", "--no-banner", "--ext", "ipy_dbreset"]
    shell = terminals([*argv, "--TerminalInteractiveShell.simple_prompt=True"], env)
    assert times("Django set up with 'logging_settings'", shell.banner) == 1, shell.banner
    assert_terminal_says_each_once(shell, postgres_db)
