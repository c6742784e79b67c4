"""Real shells for the tests: start one, run cells, read what they show.

Three kinds of shell, one :class:`Cell` to describe what a cell did:

* :class:`Kernel`, a real ipykernel in its own process;
* :func:`run`, a cell in IPython's test shell in this process;
* :func:`run_shell`, cells in a fresh ``InteractiveShell`` process, with the
  state the extension left registered after each.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import django
from jupyter_client.manager import KernelManager

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")  # colours and cursor moves
DEMO = ROOT / "notebooks"

# What Django 6's shell imports before the models (its get_auto_imports() defaults).
SHELL_DEFAULTS: tuple[str, ...] = (
    ("settings", "connection", "models", "reset_queries", "functions", "timezone")
    if django.VERSION >= (6, 0)
    else ()
)


def imports_notice(*names: str, defaults: tuple[str, ...] = SHELL_DEFAULTS) -> str:
    """The pattern of the line ``%load_ext`` prints for ``defaults`` then ``names``.

    Fewer than eight names are shown in full; the rest are counted.
    """
    every = [*defaults, *names]
    count = f"{len(every)} name" + ("" if len(every) == 1 else "s")
    shown = ", ".join(every[:8]) + (f" and {len(every) - 8} more" if len(every) > 8 else "")
    return rf"ipy_dbreset: imported {count} \(.*\): {re.escape(shown)}"


@dataclass
class Cell:
    """What a cell did: its status, error, and everything it showed."""

    code: str
    status: str = ""
    """``"ok"`` or ``"error"``, as a kernel's execute reply says."""
    ename: str | None = None
    """The class name of the exception the cell raised."""
    evalue: str | None = None
    """Its message."""
    stdout: str = ""
    stderr: str = ""
    texts: list[str] = field(default_factory=list)
    htmls: list[str] = field(default_factory=list)
    error_shown: str = ""
    """The error as a kernel shows it, apart from the streams (a shell prints it to stdout)."""
    traceback: str = ""
    """The error's traceback as a kernel sends it to the notebook, without colours."""
    result: Any = None
    """The cell's value itself, when the shell runs in this process."""
    exception: BaseException | None = None
    """The exception itself, when the shell runs in this process."""
    state: dict[str, Any] = field(default_factory=dict)
    """What the extension left registered after the cell (:func:`run_shell` only)."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def shown(self) -> str:
        """Everything the user saw, as text."""
        return "\n".join([self.stdout, self.stderr, *self.texts, self.error_shown])

    @property
    def notices(self) -> list[str]:
        return [t for t in self.texts + self.stdout.splitlines() if t.startswith("ipy_dbreset:")]

    def take(self, msg: dict[str, Any]) -> None:
        """Note what one IOPub message of this cell showed."""
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            if content["name"] == "stdout":
                self.stdout += content["text"]
            else:
                self.stderr += content["text"]
        elif kind in ("execute_result", "display_data"):
            data = content["data"]
            if "text/plain" in data:
                self.texts.append(data["text/plain"])
            if "text/html" in data:
                self.htmls.append(data["text/html"])
        elif kind == "error":
            self.ename, self.evalue = content["ename"], content["evalue"]
            self.error_shown = f"{self.ename}: {self.evalue}"
            self.traceback = ANSI.sub("", "\n".join(content.get("traceback", [])))

    def replied(self, reply: dict[str, Any]) -> None:
        """Note the kernel's execute_reply: the status, and an error no IOPub message named."""
        self.status = reply["content"]["status"]
        if self.status == "error" and self.ename is None:
            self.ename = reply["content"].get("ename")
            self.evalue = reply["content"].get("evalue")
            self.error_shown = f"{self.ename}: {self.evalue}"

    def value(self) -> Any:
        """The cell's result, evaluated from its text/plain repr."""
        import ast

        results = [t for t in self.texts if not t.startswith("ipy_dbreset:")]
        assert results, f"cell showed no result: {self}"
        return ast.literal_eval(results[-1])


def run(shell: InteractiveShell, code: str) -> Cell:
    """Run ``code`` as a cell of a shell in this process (callbacks and all)."""
    from IPython.utils.capture import capture_output

    with capture_output() as shown:
        result = shell.run_cell(code, store_history=True)
    error = result.error_in_exec or result.error_before_exec
    return Cell(
        code,
        status="ok" if error is None else "error",
        ename=None if error is None else type(error).__name__,
        evalue=None if error is None else str(error),
        stdout=shown.stdout,
        stderr=shown.stderr,
        texts=[o.data.get("text/plain", "") for o in shown.outputs],
        htmls=[o.data.get("text/html", "") for o in shown.outputs],
        result=result.result,
        exception=error,
    )


class Kernel:
    """A real ipykernel started in ``cwd`` with ``env``.

    ``extra_arguments`` are appended to the kernel's command line, as a kernel
    spec's ``argv`` would have them (``["--ext", "ipy_dbreset"]``).
    """

    def __init__(
        self,
        cwd: Path = DEMO,
        env: dict[str, str] | None = None,
        extra_arguments: list[str] | None = None,
    ) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
        full_env.update(env or {})
        full_env.setdefault("PYTHONPATH", str(ROOT))
        # Unix sockets rather than TCP ports: kernels started at once (other tests,
        # other suites on the machine) cannot race each other for a free port.
        self._sockets = tempfile.mkdtemp(prefix="ipy_dbreset_kernel_")
        self.manager = KernelManager(kernel_name="python3", transport="ipc")
        self.manager.ip = os.path.join(self._sockets, "kernel")
        self.manager.kernel_spec.argv[0] = sys.executable
        self.manager.kernel_spec.argv.extend(extra_arguments or [])
        self.manager.start_kernel(cwd=str(cwd), env=full_env)
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)
        self.cells: list[Cell] = []

    def run(self, code: str, timeout: float = 60) -> Cell:
        cell = Cell(code)
        reply = self.client.execute_interactive(code, output_hook=cell.take, timeout=timeout)
        cell.replied(reply)
        self.cells.append(cell)
        return cell

    def ok(self, code: str, timeout: float = 60) -> Cell:
        """Run a cell that must succeed."""
        cell = self.run(code, timeout)
        assert cell.ok, f"cell failed: {cell.ename}: {cell.evalue}\n{code}\n{cell.shown}"
        return cell

    def interrupt_during(self, code: str, after: float = 1.0, timeout: float = 60) -> Cell:
        """Run ``code`` and interrupt the kernel (as the stop button does) after ``after`` s."""
        timer = threading.Timer(after, self.manager.interrupt_kernel)
        timer.start()
        try:
            return self.run(code, timeout)
        finally:
            timer.cancel()

    @property
    def failed(self) -> int:
        return sum(1 for c in self.cells if not c.ok)

    def close(self) -> None:
        try:
            self.client.stop_channels()
            self.manager.shutdown_kernel(now=True)
        except Exception:  # best effort at teardown
            if self.manager.has_kernel and self.manager.provisioner:
                pid = getattr(self.manager.provisioner, "pid", None)
                if pid:
                    os.kill(pid, signal.SIGKILL)
        sockets = getattr(self, "_sockets", None)  # a subclass may start its kernel its own way
        if sockets is not None:
            shutil.rmtree(sockets, ignore_errors=True)


# -- fresh IPython shell processes ----------------------------------------------

# Runs in the child process: an in-process IPython shell that runs the cells it
# is given and writes, after each cell, what it showed and what the extension
# left registered in the shell and the process.
SHELL_SCRIPT = r"""
import json, os, sys
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from traitlets.config import Config

spec = json.loads(sys.argv[1])
config = Config(spec["config"])
config.HistoryManager.hist_file = ":memory:"
shell = InteractiveShell.instance(config=config)


def ours(callback):
    return getattr(callback, "__qualname__", "").startswith("DBReset.")


def state():
    receivers = None
    if "django.db.backends.signals" in sys.modules:
        from django.db.backends.signals import connection_created

        receivers = len(connection_created.receivers)
    return {
        "callbacks": {
            event: sum(map(ours, shell.events.callbacks[event]))
            for event in ("pre_run_cell", "post_run_cell")
        },
        "configurables": sum(type(c).__name__ == "DBReset" for c in shell.configurables),
        "magics": sorted(n for n in ("dbreset", "dbstatus") if shell.find_line_magic(n)),
        "env": {k: v for k, v in os.environ.items() if k.startswith("DJANGO_")},
        "path": list(sys.path),
        "loaded": "ipy_dbreset" in shell.extension_manager.loaded,
        "receivers": receivers,
    }


report = {"before": state(), "cells": []}
for code in spec["cells"]:
    with capture_output() as shown:
        result = shell.run_cell(code, store_history=True)
    error = result.error_in_exec or result.error_before_exec
    report["cells"].append(
        {
            "code": code,
            "status": "ok" if error is None else "error",
            "ename": None if error is None else type(error).__name__,
            "evalue": None if error is None else str(error),
            "stdout": shown.stdout,
            "stderr": shown.stderr,
            "texts": [o.data.get("text/plain", "") for o in shown.outputs],
            "htmls": [o.data.get("text/html", "") for o in shown.outputs],
            "state": state(),
        }
    )
with open(spec["report"], "w") as out:
    json.dump(report, out)
"""


@dataclass
class Session:
    """A finished child shell: its state before the first cell, and each cell."""

    before: dict[str, Any]
    cells: list[Cell] = field(default_factory=list)
    output: str = ""

    def __getitem__(self, index: int) -> Cell:
        return self.cells[index]


AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--")


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without Django's variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
    env.update(PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env


def run_ipython(
    args: list[str], code: str, *, cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run a terminal ``ipython --no-banner --colors=NoColor ARGS -c CODE`` in ``cwd``."""
    return subprocess.run(
        [sys.executable, "-m", "IPython", "--no-banner", "--colors=NoColor", *args, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def run_shell(
    cells: list[str],
    cwd: Path,
    *,
    env: dict[str, str] | None = None,
    config: dict[str, dict[str, Any]] | None = None,
    tmp_path: Path,
    unprivileged: bool = False,
) -> Session:
    """Run ``cells`` in a fresh IPython shell process started in ``cwd``.

    ``unprivileged``: as the ``nobody`` user, for whom permission bits count
    (``tmp_path`` must then be writable by it).
    """
    report = tmp_path / f"report-{len(list(tmp_path.glob('report-*')))}.json"
    spec = {"cells": cells, "config": config or {}, "report": str(report)}
    full_env = clean_env(IPYTHONDIR=str(tmp_path / "ipython"))
    full_env.update(env or {})
    command = [sys.executable, "-c", SHELL_SCRIPT, json.dumps(spec)]
    if unprivileged:
        command = [*AS_NOBODY, *command]
        # IPython follows the virtualenv's python symlink, maybe into root's home.
        full_env.pop("VIRTUAL_ENV", None)
    done = subprocess.run(
        command,
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0 and report.exists(), output
    data = json.loads(report.read_text())
    return Session(data["before"], [Cell(**c) for c in data["cells"]], output)


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
