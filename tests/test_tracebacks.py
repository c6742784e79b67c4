"""The user's errors are theirs: no frame of the extension in their tracebacks.

Real cells raise real errors (a unique key violated, a connection the server
ends mid-cell, the stop button during a sleep and during a query), in a shell
process, a Jupyter kernel and terminal IPython, on PostgreSQL with both
drivers and on MariaDB; each traceback is read as it is shown (the rendered
text a shell prints, the ``traceback`` field of a kernel's ``error`` message,
a pseudo-terminal's screen) and must name no file of the package.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from typing import TYPE_CHECKING

import pytest
from test_shells import Terminal

from conftest import DRIVERS, HIDE_PSYCOPG, wait_until_running
from harness import ANSI, DEMO, ROOT, run, run_shell

if TYPE_CHECKING:
    from pathlib import Path

    from harness import Cell

OURS = re.compile(r"ipy_dbreset[/\\]\w+")  # a path into the package, in any traceback

IMPORTS = "from shop.models import Order\nfrom django.db import connection, transaction"

# Ctrl-C from a timer: wherever it lands (in the sleep, or in the query, or
# just before it under load), what the user sees must hold no frame of ours.
STOP_SOON = (
    "import os, signal, threading\n"
    "threading.Timer({after}, os.kill, (os.getpid(), signal.SIGINT)).start()"
)


def assert_theirs(cell: Cell, ename: str, shown: str) -> None:
    assert cell.ename == ename, (cell.ename, shown)
    assert "Traceback" in shown or "Cell In[" in shown, shown
    assert not OURS.search(shown), shown


def shell_cells(*, query: str, kill: str) -> list[str]:
    return [
        "%load_ext ipy_dbreset",
        IMPORTS + "\nOrder.objects.create(number=1)",
        "Order.objects.create(number=1)",  # 2: IntegrityError
        "%xmode Verbose",
        "Order.objects.create(number=1)",  # 4: the same, verbose
        "%tb",  # 5: shown again
        "%xmode Context",
        f"with transaction.atomic():\n    Order.objects.count()\n    {kill}",  # 7: lost mid-cell
        STOP_SOON.format(after=0.3) + "\nimport time; time.sleep(30)",  # 8
        "Order.objects.count()",
        STOP_SOON.format(after=0.5) + f"\nconnection.cursor().execute({query!r})",  # 10
        "Order.objects.count()",
    ]


def assert_shell_session(cells: list[Cell], *, lost: str) -> None:
    shown = [ANSI.sub("", c.stdout + c.stderr) for c in cells]
    assert cells[1].ok, shown[1]
    assert_theirs(cells[2], "IntegrityError", shown[2])
    assert_theirs(cells[4], "IntegrityError", shown[4])
    assert "IntegrityError" in shown[5] and not OURS.search(shown[5]), shown[5]
    assert_theirs(cells[7], lost, shown[7])
    assert_theirs(cells[8], "KeyboardInterrupt", shown[8])
    assert "time.sleep(30)" in shown[8], shown[8]
    assert cells[9].ok, shown[9]
    assert_theirs(cells[10], "KeyboardInterrupt", shown[10])
    assert cells[11].ok, shown[11]


@pytest.mark.postgres
@pytest.mark.parametrize("driver", DRIVERS)
def test_postgres_errors_in_a_shell_show_no_frame_of_ours(
    tmp_path: Path, postgres_url: str, driver: str
) -> None:
    cells = shell_cells(
        query="select pg_sleep(2)",
        kill="connection.cursor().execute('select pg_terminate_backend(pg_backend_pid())')",
    )
    if driver == "psycopg2":
        cells.insert(0, HIDE_PSYCOPG)
    session = run_shell(
        cells,
        DEMO,
        env={"IPY_DBRESET_DEMO_DB": postgres_url, "IPY_DBRESET_DEMO_OTHER": str(tmp_path / "o")},
        tmp_path=tmp_path,
    )
    done = session.cells[1:] if driver == "psycopg2" else session.cells
    assert_shell_session(done, lost="OperationalError")


@pytest.mark.mysql
def test_mariadb_errors_in_a_shell_show_no_frame_of_ours(tmp_path: Path, mysql_url: str) -> None:
    kill = "connection.cursor().execute('kill connection_id()')"
    cells = shell_cells(query="select sleep(2)", kill=kill)
    session = run_shell(
        cells,
        DEMO,
        env={"IPY_DBRESET_DEMO_DB": mysql_url, "IPY_DBRESET_DEMO_OTHER": str(tmp_path / "o")},
        tmp_path=tmp_path,
    )
    assert_shell_session(session.cells, lost="OperationalError")


@pytest.mark.kernel
@pytest.mark.postgres
@pytest.mark.parametrize("driver", DRIVERS)
def test_postgres_errors_in_a_kernel_show_no_frame_of_ours(
    start_kernel, postgres_url: str, postgres_db: str, driver: str
) -> None:
    kernel = start_kernel(postgres_url, driver)
    kernel.ok("Order.objects.create(number=1)")
    failed = kernel.run("Order.objects.create(number=1)")
    assert_theirs(failed, "IntegrityError", failed.traceback)

    lost = kernel.run(
        "with transaction.atomic():\n    Order.objects.count()\n"
        "    connection.cursor().execute('select pg_terminate_backend(pg_backend_pid())')"
    )
    assert_theirs(lost, "OperationalError", lost.traceback)

    slept = kernel.interrupt_during("import time; time.sleep(30)", after=0.5)
    assert_theirs(slept, "KeyboardInterrupt", slept.traceback)
    assert "time.sleep(30)" in slept.traceback, slept.traceback

    query = "select pg_sleep(2)"
    pressed = threading.Thread(
        target=lambda: (wait_until_running(postgres_db, query), kernel.manager.interrupt_kernel())
    )
    pressed.start()
    try:
        stopped = kernel.run(f"connection.cursor().execute({query!r})")
    finally:
        pressed.join()
    assert_theirs(stopped, "KeyboardInterrupt", stopped.traceback)
    assert kernel.ok("Order.objects.count()").value() == 1


@pytest.mark.postgres
def test_postgres_errors_in_terminal_ipython_show_no_frame_of_ours(
    tmp_path: Path, postgres_url: str, postgres_db: str
) -> None:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "JUPYTER", "IPYTHON"))
    }
    env.update(
        PYTHONPATH=str(ROOT),
        IPY_DBRESET_DEMO_DB=postgres_url,
        IPY_DBRESET_DEMO_OTHER=str(tmp_path / "other.sqlite3"),
        IPYTHONDIR=str(tmp_path / "ipython"),
    )
    argv = [sys.executable, "-m", "IPython", "--simple-prompt", "--no-banner", "--colors=NoColor"]
    terminal = Terminal([*argv, "--ext=ipy_dbreset"], DEMO, env)
    try:
        terminal.type(IMPORTS.replace("\n", "; "))
        terminal.type("Order.objects.create(number=1)")
        shown = terminal.type("Order.objects.create(number=1)")
        assert "IntegrityError" in shown and not OURS.search(shown), shown

        query = "select pg_sleep(2)"

        def press_stop() -> None:
            wait_until_running(postgres_db, query)
            # What Ctrl-C sends (the pty is not the child's controlling terminal).
            os.kill(terminal.process.pid, signal.SIGINT)

        pressed = threading.Thread(target=press_stop)
        pressed.start()
        try:
            shown = terminal.type(f"connection.cursor().execute({query!r})")
        finally:
            pressed.join()
        assert "KeyboardInterrupt" in shown and not OURS.search(shown), shown
        shown = terminal.type("Order.objects.count()")
        assert "Out[" in shown and "1" in shown, shown
    finally:
        terminal.close()


def test_the_interrupt_hook_is_ipythons_again_after_unload_and_yours_stays_yours(
    bare_shell,
) -> None:
    shell = bare_shell
    seen = []

    def yours(self, etype, value, tb, tb_offset=None):  # a user's handler, for ValueError
        seen.append(value)
        print("shown by yours")

    shell.set_custom_exc((ValueError,), yours)
    theirs = shell.CustomTB
    try:
        assert run(shell, "%load_ext ipy_dbreset").ok
        assert KeyboardInterrupt in shell.custom_exceptions
        cell = run(shell, "raise ValueError('mine')")
        assert "shown by yours" in cell.stdout and len(seen) == 1, cell.stdout
        cell = run(shell, "def f():\n    raise KeyboardInterrupt\nf()")
        assert cell.ename == "KeyboardInterrupt" and "in f()" in ANSI.sub("", cell.stdout)
        assert run(shell, "%reload_ext ipy_dbreset").ok
        assert shell.custom_exceptions.count(KeyboardInterrupt) == 1
        assert run(shell, "%unload_ext ipy_dbreset").ok
        assert shell.custom_exceptions == (ValueError,) and shell.CustomTB is theirs
    finally:
        shell.set_custom_exc((), None)
