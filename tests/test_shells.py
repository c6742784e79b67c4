"""The shells people already use, each with the extension enabled the way its users enable it.

- ``manage.py shell_plus --notebook`` / ``--lab`` (django-extensions) with
  ``IPYTHON_ARGUMENTS = ["--ext", "ipy_dbreset"]`` in settings.  shell_plus
  writes a kernel spec and starts a notebook server; here the server is a
  stand-in that only records what shell_plus gave it, and a real kernel is
  started by jupyter_client from exactly the kernel spec shell_plus wrote
  (``--ext ipy_dbreset --ext django_extensions.management.notebook_extension``:
  ours loads first, before shell_plus's own extension sets Django up).
- ``manage.py shell_plus --ipython`` with ``IPYTHON_ARGUMENTS`` or with
  ``ipython_config.py``, and ``manage.py shell -i ipython`` with
  ``ipython_config.py``: a real terminal IPython on a pseudo-terminal, one
  line typed at each prompt.
- A plain ipykernel in a folder inside the project, and a kernel in a
  subfolder of a project that uses django-configurations.

The Django driver is whichever one the environment has: psycopg 3 when it is
installed, psycopg2 otherwise (see the ``psycopg2`` sessions in noxfile.py).
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import termios
import textwrap
import threading
import time
from typing import TYPE_CHECKING

import django
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

from conftest import terminate_backends, wait_until_disconnected, wait_until_running
from harness import DEMO, ROOT, Kernel

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

RECORDING_SERVER = '''
"""Run manage.py shell_plus with a notebook server that records its set-up and serves nothing."""

import json
import os
import runpy
import sys
import types

record, manage, *args = sys.argv[1:]


class RecordingServer:
    """Takes the place of NotebookApp / LabApp: shell_plus configures it, start() records."""

    def __init__(self):
        from jupyter_client.kernelspec import KernelSpecManager

        self.kernel_spec_manager = KernelSpecManager()
        self.argv = []

    @classmethod
    def instance(cls):  # NotebookApp (notebook < 7)
        return cls()

    @classmethod
    def initialize_server(cls, argv=None):  # LabApp (jupyterlab >= 3)
        app = cls()
        app.initialize(argv)
        return app

    def initialize(self, argv=None):
        self.argv = list(argv or [])

    def start(self):
        spec = self.kernel_spec_manager.get_kernel_spec("django_extensions")
        with open(record, "w") as f:
            json.dump(
                {
                    "notebook_arguments": self.argv,
                    "kernels": os.path.dirname(spec.resource_dir),
                    "argv": spec.argv,
                    "env": spec.env,
                    # The server's environment, which its kernels inherit:
                    "DJANGO_SETTINGS_MODULE": os.environ.get("DJANGO_SETTINGS_MODULE"),
                },
                f,
            )


def module(name, **attributes):
    sys.modules[name] = types.ModuleType(name)
    vars(sys.modules[name]).update(attributes)


if args[0] == "--notebook":
    module("notebook")
    module("notebook.notebookapp", NotebookApp=RecordingServer)
else:  # --lab, as with JupyterLab 4, where notebook.notebookapp does not exist
    sys.modules["notebook.notebookapp"] = None
    module("jupyterlab")
    module("jupyterlab.labapp", LabApp=RecordingServer)

sys.path.insert(0, os.path.dirname(manage))  # as `python manage.py` does
sys.argv = [manage, "shell_plus", *args]
runpy.run_path(manage, run_name="__main__")
'''

SHELL_PLUS_SETTINGS = """
from demo.settings import *  # noqa: F403

INSTALLED_APPS = [*INSTALLED_APPS, "django_extensions"]  # noqa: F405
"""

PYTHON3_KERNEL = {
    "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    "display_name": "Python 3 (ipykernel)",
    "language": "python",
}


class Project:
    """The demo project as a user runs it: settings, IPython profile and Jupyter folders in tmp."""

    def __init__(self, tmp_path: Path, url: str) -> None:
        self.tmp = tmp_path
        self.url = url
        self.site = tmp_path / "site"
        self.site.mkdir()
        self.ipython_dir = tmp_path / "ipython"
        self.profile = self.ipython_dir / "profile_default"
        self.profile.mkdir(parents=True)
        kernels = tmp_path / "jupyter" / "kernels" / "python3"
        kernels.mkdir(parents=True)
        (kernels / "kernel.json").write_text(json.dumps(PYTHON3_KERNEL))

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("DJANGO_", "JUPYTER", "IPYTHON"))
        }
        env.update(
            PYTHONPATH=os.pathsep.join([str(ROOT), str(self.site)]),
            IPY_DBRESET_DEMO_DB=self.url,
            IPY_DBRESET_DEMO_OTHER=str(self.tmp / "other.sqlite3"),
            IPYTHONDIR=str(self.ipython_dir),
            JUPYTER_PATH=str(self.tmp / "jupyter"),
            JUPYTER_DATA_DIR=str(self.tmp / "jupyter-data"),
            JUPYTER_CONFIG_DIR=str(self.tmp / "jupyter-config"),
        )
        env.update(extra)
        return env

    def shell_plus_settings(self, ipython_arguments: list[str] | None) -> dict[str, str]:
        """Settings with django_extensions (and IPYTHON_ARGUMENTS); the env that selects them."""
        text = SHELL_PLUS_SETTINGS
        if ipython_arguments is not None:
            text += f"IPYTHON_ARGUMENTS = {ipython_arguments!r}\n"
        (self.site / "shell_plus_settings.py").write_text(text)
        return {"DJANGO_SETTINGS_MODULE": "shell_plus_settings"}

    def ipython_config(self, *, extension: bool) -> None:
        """The user's ipython_config.py; a simple prompt so that lines can be typed at it."""
        lines = [
            "c.TerminalInteractiveShell.simple_prompt = True",
            "c.TerminalInteractiveShell.term_title = False",
            'c.InteractiveShell.colors = "nocolor"',
            'c.InteractiveShell.xmode = "Minimal"',
        ]
        if extension:
            lines.append('c.InteractiveShellApp.extensions = ["ipy_dbreset"]')
        (self.profile / "ipython_config.py").write_text("\n".join(lines) + "\n")


@pytest.fixture
def project(tmp_path: Path, postgres_url: str) -> Project:
    return Project(tmp_path, postgres_url)


# -- shell_plus --notebook / --lab: a kernel from the kernel spec shell_plus writes ------------


class SpecKernel(Kernel):
    """A kernel started by jupyter_client from a kernel spec, as a notebook server starts it."""

    def __init__(self, kernels: str, name: str, cwd: Path, env: dict[str, str]) -> None:
        # Not Kernel.__init__: that one starts the stock python3 kernel spec.
        ksm = KernelSpecManager(kernel_dirs=[kernels])
        self.manager = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
        self.manager.start_kernel(cwd=str(cwd), env=env)
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)
        self.cells = []


def run_shell_plus_server(project: Project, runner: str, env: dict[str, str]) -> dict:
    """``manage.py shell_plus --notebook|--lab`` up to the server's start(); what it set up."""
    script = project.tmp / "recording_server.py"
    script.write_text(RECORDING_SERVER)
    record = project.tmp / "server.json"
    done = subprocess.run(
        [sys.executable, str(script), str(record), str(DEMO / "manage.py"), runner],
        cwd=DEMO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(record.read_text())


@pytest.fixture
def spec_kernels() -> Iterator[list[Kernel]]:
    kernels: list[Kernel] = []
    yield kernels
    for kernel in kernels:
        kernel.close()


def assert_recovers_like_a_plain_kernel(kernel: Kernel, postgres_db: str) -> None:
    """ORM works; a terminated backend and an aborted manual transaction are repaired."""
    kernel.ok("from django.db import connection, transaction")
    assert kernel.ok("Order.objects.create(number=1); Order.objects.count()").value() == 1

    assert terminate_backends(postgres_db) >= 1
    wait_until_disconnected(postgres_db)
    cell = kernel.ok("Order.objects.count()")
    assert cell.value() == 1
    assert any("closed db 'default': the server closed" in n for n in cell.notices), cell.notices

    kernel.ok("transaction.set_autocommit(False)")
    failed = kernel.run("Order.objects.create(number=1)")
    assert failed.ename == "IntegrityError"
    assert any("rolled back db 'default'" in n for n in failed.notices), failed.notices
    assert kernel.ok("Order.objects.count()").value() == 1
    kernel.ok("transaction.commit(); transaction.set_autocommit(True)")

    status = kernel.ok("%dbstatus").texts[-1]
    assert "server pid" in status
    assert re.search(r"^default\s+psycopg2?\s+\S+\s+\d+\s+idle$", status, re.M), status
    assert kernel.failed == 1  # the IntegrityError, and nothing else


@pytest.mark.kernel
@pytest.mark.postgres
@pytest.mark.parametrize("runner", ["--notebook", "--lab"])
def test_shell_plus_notebook_kernel_with_ipython_arguments_recovers(
    project, postgres_db, spec_kernels, runner
):
    env = project.env(**project.shell_plus_settings(["--ext", "ipy_dbreset"]))
    server = run_shell_plus_server(project, runner, env)

    # shell_plus appends its own extension after ours: ours loads before Django is set up.
    ext = server["argv"][server["argv"].index("--ext") :]
    assert ext[:4] == [
        "--ext",
        "ipy_dbreset",
        "--ext",
        "django_extensions.management.notebook_extension",
    ]
    assert str(DEMO) in server["env"]["PYTHONPATH"].split(os.pathsep)
    assert server["DJANGO_SETTINGS_MODULE"] == "shell_plus_settings"

    # The server starts kernels with its own environment plus the kernel spec's.
    kernel_env = {**env, "DJANGO_SETTINGS_MODULE": server["DJANGO_SETTINGS_MODULE"]}
    kernel = SpecKernel(server["kernels"], "django_extensions", DEMO, kernel_env)
    spec_kernels.append(kernel)

    loaded = kernel.ok("'dbstatus' in get_ipython().magics_manager.magics['line']")
    assert loaded.value() is True, "ipy_dbreset was not loaded from IPYTHON_ARGUMENTS"
    # shell_plus's extension ran after ours, on the Django ours set up: models are imported.
    assert kernel.ok("Order.__module__").value() == "shop.models"
    assert kernel.ok("import os; os.environ['DJANGO_ALLOW_ASYNC_UNSAFE']").value() == "true"
    assert_recovers_like_a_plain_kernel(kernel, postgres_db)


# -- terminal IPython: shell_plus --ipython, manage.py shell -i ipython ------------------------

PROMPT = re.compile(r"In \[(\d+)\]: ")
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")


class Terminal:
    """A command that runs terminal IPython, on a pseudo-terminal: type a line, read the reply."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.master, slave = os.openpty()
        attributes = termios.tcgetattr(slave)
        attributes[3] &= ~termios.ECHO  # what is typed is not shown back
        termios.tcsetattr(slave, termios.TCSANOW, attributes)
        self.process = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True
        )
        os.close(slave)
        self.pending = ""
        self.banner = self._until_prompt()

    def _until_prompt(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while (found := PROMPT.search(self.pending)) is None:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no prompt within {timeout}s; the shell showed:\n{self.pending}"
                )
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the shell has exited
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the shell exited; it showed:\n{self.pending}")
                text = chunk.decode("utf-8", "replace").replace("\r\n", "\n")
                self.pending += ANSI.sub("", text)
        shown, self.pending = self.pending[: found.start()], self.pending[found.end() :]
        return shown

    def type(self, line: str) -> str:
        """Type one line at the prompt; everything the shell showed until the next prompt."""
        os.write(self.master, line.encode() + b"\n")
        return self._until_prompt()

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                os.write(self.master, b"exit()\n")
                self.process.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            os.close(self.master)


@pytest.fixture
def terminals() -> Iterator[Callable[..., Terminal]]:
    started: list[Terminal] = []

    def start(*args: str, env: dict[str, str]) -> Terminal:
        terminal = Terminal([sys.executable, "manage.py", *args], DEMO, env)
        started.append(terminal)
        return terminal

    yield start
    for terminal in started:
        terminal.close()


def unwrapped(shown: str) -> str:
    """``shown`` with each notice on one line, as the terminal wrapped it at a word."""
    return re.sub(r"\n {13}(?=\S)", " ", shown)


def assert_terminal_recovers(shell: Terminal, postgres_db: str) -> None:
    """Same story as in a kernel, read off the terminal."""
    # Django was set up already: nothing to say, but on Django 4.2, whose shell imports
    # nothing, the names the extension imported (as a plain shell gets them).
    said = [line for line in shell.banner.splitlines() if "ipy_dbreset" in line]
    if django.VERSION < (5, 2):
        said = [line for line in said if "names (the installed models)" not in line]
    assert not said, shell.banner
    shell.type("from shop.models import Order; from django.db import connection, transaction")
    shown = shell.type("Order.objects.create(number=1); Order.objects.count()")
    assert shown.strip() == "Out[2]: 1"

    status = shell.type("%dbstatus")
    assert "server pid" in status
    assert re.search(r"^default\s+psycopg2?\s+\S+\s+\d+\s+idle\s*$", status, re.M), status

    assert terminate_backends(postgres_db) >= 1
    wait_until_disconnected(postgres_db)
    # A notice wraps to the terminal's width, its further lines under its text.
    shown = unwrapped(shell.type("Order.objects.count()"))
    assert re.search(r"^ipy_dbreset: closed db 'default': .*nothing was lost", shown, re.M), shown
    assert "Out[4]: 1" in shown

    shell.type("transaction.set_autocommit(False)")
    shown = shell.type("Order.objects.create(number=1)")
    assert "IntegrityError" in shown
    assert re.search(r"^ipy_dbreset: rolled back db 'default': ", shown, re.M), shown
    shown = shell.type("Order.objects.count()")
    assert "Out[7]: 1" in shown
    assert "Error" not in shown


@pytest.mark.postgres
def test_shell_plus_ipython_with_ipython_arguments_recovers(project, postgres_db, terminals):
    project.ipython_config(extension=False)
    settings = project.shell_plus_settings(["--ext", "ipy_dbreset"])
    shell = terminals("shell_plus", "--ipython", env=project.env(**settings))
    assert_terminal_recovers(shell, postgres_db)


@pytest.mark.postgres
def test_shell_plus_ipython_with_ipython_config_recovers(project, postgres_db, terminals):
    project.ipython_config(extension=True)
    settings = project.shell_plus_settings(None)
    shell = terminals("shell_plus", "--ipython", env=project.env(**settings))
    assert_terminal_recovers(shell, postgres_db)


@pytest.mark.postgres
def test_manage_py_shell_with_ipython_config_recovers(project, postgres_db, terminals):
    project.ipython_config(extension=True)
    shell = terminals("shell", "-i", "ipython", env=project.env())
    assert_terminal_recovers(shell, postgres_db)


# -- a plain kernel, and django-configurations ---------------------------------------------


@pytest.mark.kernel
def test_plain_kernel_in_a_project_folder_loads_and_queries(start_kernel, sqlite_url):
    kernel = start_kernel(sqlite_url, cwd=DEMO / "shop", load=False)
    loaded = kernel.ok("%load_ext ipy_dbreset")
    assert any("Django set up with 'demo.settings'" in n for n in loaded.notices), loaded.notices
    kernel.ok("from shop.models import Order; Order.objects.create(number=1)")
    assert kernel.ok("Order.objects.count()").value() == 1
    status = kernel.ok("%dbstatus").texts[-1]
    assert re.search(r"^default\s+sqlite3\s+\S+db\.sqlite3\s+idle$", status, re.M), status
    assert kernel.failed == 0


CONFIGURATIONS_MANAGE_PY = """
#!/usr/bin/env python
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "confproj.settings")
    os.environ.setdefault("DJANGO_CONFIGURATION", "Dev")
    from configurations.management import execute_from_command_line

    execute_from_command_line(sys.argv)
"""

CONFIGURATIONS_SETTINGS = """
from configurations import Configuration


class Dev(Configuration):
    SECRET_KEY = "tests-only"
    INSTALLED_APPS = ["django.contrib.contenttypes", "shop"]
    USE_TZ = True
    DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
    DATABASES = {{"default": {{"ENGINE": "django.db.backends.sqlite3", "NAME": {db!r}}}}}
"""


@pytest.mark.kernel
def test_django_configurations_project_kernel_in_a_subfolder(tmp_path):
    pytest.importorskip("configurations")
    root = tmp_path / "confproj"
    (root / "confproj").mkdir(parents=True)
    (root / "notebooks").mkdir()
    (root / "manage.py").write_text(CONFIGURATIONS_MANAGE_PY.lstrip())
    (root / "confproj" / "__init__.py").write_text("")
    settings = CONFIGURATIONS_SETTINGS.format(db=str(tmp_path / "conf.sqlite3"))
    (root / "confproj" / "settings.py").write_text(textwrap.dedent(settings))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(DEMO)])  # the demo's shop app
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v", "0"], cwd=root, env=env, check=True
    )

    kernel = Kernel(cwd=root / "notebooks", env={"PYTHONPATH": env["PYTHONPATH"]})
    try:
        loaded = kernel.ok("%load_ext ipy_dbreset")
        assert any(
            "Django set up with 'confproj.settings'" in n and "DJANGO_CONFIGURATION" in n
            for n in loaded.notices
        ), loaded.notices
        shown = kernel.ok("from django.conf import settings; settings.CONFIGURATION")
        assert shown.value() == "confproj.settings.Dev"
        kernel.ok(
            "from shop.models import Order; from django.db import transaction\n"
            "Order.objects.create(number=1)"
        )
        kernel.ok("transaction.set_autocommit(False)")
        assert kernel.run("Order.objects.create(number=1)").ename == "IntegrityError"
        assert kernel.ok("Order.objects.count()").value() == 1
        kernel.ok("transaction.commit(); transaction.set_autocommit(True)")
        assert kernel.failed == 1
    finally:
        kernel.close()


# -- found while running the compatibility matrix --------------------------------------------


QUERY = "SELECT pg_sleep(10)"


@pytest.mark.kernel
@pytest.mark.postgres
def test_psycopg2_query_interrupted_as_the_server_drops_it_then_next_cell_works(
    start_kernel, postgres_url, postgres_db
):
    kernel = start_kernel(postgres_url, "psycopg2")
    kernel.ok("Order.objects.create(number=1); connection.ensure_connection()")

    def user_presses_stop_and_server_drops_it() -> None:
        wait_until_running(postgres_db, QUERY)
        # psycopg2 keeps waiting: the interrupt stays pending (kill() has queued
        # the signal when this returns) until the server drops the connection.
        kernel.manager.interrupt_kernel()
        terminate_backends(postgres_db)

    dba = threading.Thread(target=user_presses_stop_and_server_drops_it)
    dba.start()
    try:
        cell = kernel.run(f"connection.cursor().execute({QUERY!r})")
    finally:
        dba.join()
    assert cell.ename in {"KeyboardInterrupt", "OperationalError"}, cell.shown
    assert kernel.ok("Order.objects.count()").value() == 1
    assert kernel.failed == 1
