"""Cells run in ipykernel 7 subshells (JupyterLab's subshell consoles), in threads of their own.

A subshell runs its cells in its own thread, where Django gives it connections
of its own.  Its cells are judged and repaired like the main shell's, on its
own connections only: the main shell's connection, which may be running a
query meanwhile, is never touched from there.  The subshells here are real:
created with ``create_subshell_request`` on the control channel, their cells
sent with ``subshell_id`` in the execute request's header.
"""

from __future__ import annotations

import importlib.metadata
from typing import TYPE_CHECKING, Any

import pytest
from test_preflight import HELPERS

from conftest import (
    DRIVERS,
    PG_HOST,
    PG_PORT,
    PG_USER,
    pg_admin,
    terminate_backends,
    wait_until_disconnected,
    wait_until_running,
)
from harness import Cell

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from harness import Kernel

IPYKERNEL_VERSION = importlib.metadata.version("ipykernel")
IPYKERNEL = tuple(int(part) for part in IPYKERNEL_VERSION.split(".")[:2])

pytestmark = [pytest.mark.kernel, pytest.mark.postgres]

needs_subshells = pytest.mark.skipif(
    IPYKERNEL < (7, 0), reason=f"subshells need ipykernel 7 (this is {IPYKERNEL_VERSION})"
)


class Mailbox:
    """A kernel's replies and output, sorted by the request they answer.

    Cells of the main shell and of subshells run at once; each waits for its
    own messages and keeps the others' for whoever asks next.
    """

    def __init__(self, kernel: Kernel) -> None:
        self.client = kernel.client
        self._kept: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def next(self, channel: str, msg_id: str, timeout: float) -> dict[str, Any]:
        """The next message on ``channel`` ("shell", "iopub", "control") for ``msg_id``."""
        kept = self._kept.get((channel, msg_id))
        if kept:
            return kept.pop(0)
        get = getattr(self.client, f"get_{channel}_msg")
        while True:
            msg = get(timeout=timeout)
            parent = msg["parent_header"].get("msg_id", "")
            if parent == msg_id:
                return msg
            self._kept.setdefault((channel, parent), []).append(msg)


class Shell:
    """The main shell of a kernel (``subshell_id`` None) or one of its subshells."""

    def __init__(self, kernel: Kernel, mailbox: Mailbox, subshell_id: str | None = None) -> None:
        self.kernel = kernel
        self.mailbox = mailbox
        self.id = subshell_id
        self.cells: list[Cell] = []

    @classmethod
    def create(cls, kernel: Kernel, mailbox: Mailbox) -> Shell:
        """A new subshell, made as JupyterLab makes one: on the control channel."""
        request = kernel.client.session.msg("create_subshell_request", {})
        kernel.client.control_channel.send(request)
        reply = mailbox.next("control", request["header"]["msg_id"], 30)
        assert reply["content"]["status"] == "ok", reply["content"]
        return cls(kernel, mailbox, reply["content"]["subshell_id"])

    @property
    def thread(self) -> str:
        assert self.id is not None
        return f"subshell-{self.id}"

    def send(self, code: str) -> str:
        """Send ``code`` to run here; the request's id, for :meth:`wait`."""
        client = self.kernel.client
        request = client.session.msg(
            "execute_request",
            {
                "code": code,
                "silent": False,
                "store_history": True,
                "user_expressions": {},
                "allow_stdin": False,
                "stop_on_error": True,
            },
        )
        if self.id is not None:
            request["header"]["subshell_id"] = self.id
        client.shell_channel.send(request)
        return str(request["header"]["msg_id"])

    def wait(self, msg_id: str, timeout: float = 60) -> Cell:
        """What the cell sent as ``msg_id`` did, once the kernel replied."""
        reply = self.mailbox.next("shell", msg_id, timeout)
        cell = Cell("")
        while True:  # its output, up to the shell going idle again
            msg = self.mailbox.next("iopub", msg_id, timeout)
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content["execution_state"] == "idle":
                break
            if kind == "execute_input":
                cell.code = content["code"]
            else:
                cell.take(msg)
        cell.replied(reply)
        self.cells.append(cell)
        return cell

    def run(self, code: str, timeout: float = 60) -> Cell:
        return self.wait(self.send(code), timeout)

    def ok(self, code: str, timeout: float = 60) -> Cell:
        cell = self.run(code, timeout)
        assert cell.ok, f"cell failed in {self.id}: {cell.ename}: {cell.evalue}\n{cell.shown}"
        return cell

    @property
    def failed(self) -> int:
        return sum(1 for c in self.cells if not c.ok)


@pytest.fixture
def kernel(start_kernel: Callable[..., Kernel], postgres_url: str, driver: str) -> Kernel:
    return start_kernel(postgres_url, driver)


@pytest.fixture
def mailbox(kernel: Kernel) -> Mailbox:
    return Mailbox(kernel)


@pytest.fixture
def main(kernel: Kernel, mailbox: Mailbox) -> Shell:
    """The kernel's main shell, whose cells may run while a subshell's do."""
    kernel.ok(HELPERS)  # before the mailbox reads any message: subshells share the namespace
    return Shell(kernel, mailbox)


@pytest.fixture
def subshell(kernel: Kernel, main: Shell, mailbox: Mailbox) -> Shell:
    """A subshell of the kernel, with the ORM imported."""
    sub = Shell.create(kernel, mailbox)
    sub.ok("from shop.models import Order\nfrom django.db import connection, transaction")
    sub.ok("import threading; assert threading.current_thread().name.startswith('subshell-')")
    sub.cells.clear()
    return sub


class Blocker:
    """An advisory lock held by a connection of the test's own: :attr:`query` waits for it.

    A query that runs exactly until the test lets it finish, however loaded the machine.
    """

    def __init__(self, dbname: str) -> None:
        import psycopg

        self.query = "SELECT pg_advisory_lock(16016)"
        self._conn = psycopg.connect(
            host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=dbname, autocommit=True
        )
        self._conn.execute(self.query)

    def release(self) -> None:
        self._conn.close()  # the server lets the lock go with the session


@pytest.fixture
def blocker(postgres_db: str) -> Iterator[Blocker]:
    lock = Blocker(postgres_db)
    yield lock
    lock.release()


def committed(dbname: str) -> list[int]:
    return [n for (n,) in pg_admin("select number from shop_order order by number", dbname=dbname)]


def only_notice(cell: Cell) -> str:
    assert len(cell.notices) == 1, f"expected one notice, got {cell.notices}\n{cell.shown}"
    return cell.notices[0]


def pid_of(shell: Shell) -> int:
    return int(
        shell.ok("connection.ensure_connection(); connection.connection.info.backend_pid").value()
    )


by_driver = pytest.mark.parametrize("driver", DRIVERS)


@needs_subshells
@by_driver
def test_subshell_cell_after_integrity_error_in_manual_transaction_works(subshell, postgres_db):
    subshell.ok("Order.objects.create(number=1)")
    subshell.ok("transaction.set_autocommit(False); Order.objects.create(number=2)")
    failed = subshell.run("Order.objects.create(number=1)")
    assert failed.ename == "IntegrityError", failed.shown
    notice = only_notice(failed)
    assert "rolled back db 'default'" in notice, notice
    assert "a failed statement aborted the transaction" in notice, notice
    assert "lost 1 unsaved write (INSERT shop_order)" in notice, notice
    assert subshell.ok("Order.objects.count()").value() == 1
    assert subshell.ok("transaction.get_autocommit()").value() is False
    subshell.ok("Order.objects.create(number=3); transaction.commit()")
    assert subshell.failed == 1
    assert committed(postgres_db) == [1, 3]


@needs_subshells
@by_driver
def test_first_subshell_cell_after_terminated_backend_works(subshell, postgres_db):
    subshell.ok("Order.objects.create(number=1); x = 42")
    assert terminate_backends(postgres_db) >= 1
    wait_until_disconnected(postgres_db)
    cell = subshell.ok("Order.objects.count(), x")
    assert cell.value() == (1, 42)
    notice = only_notice(cell)
    assert notice.startswith("ipy_dbreset: closed db 'default'"), notice
    assert "the server closed the connection; nothing was lost" in notice, notice
    assert subshell.failed == 0


@needs_subshells
@by_driver
def test_subshell_query_after_backend_terminated_mid_cell_works(subshell):
    cell = subshell.ok(
        "first = Order.objects.count()\n"
        "before = server_id()\n"
        "kill(before)\n"
        "first, Order.objects.count(), server_id() != before"
    )
    assert cell.value() == (0, 0, True)
    assert any(n.startswith("ipy_dbreset: reconnected db 'default'") for n in cell.notices), (
        cell.shown
    )


@needs_subshells
@by_driver
def test_main_shell_query_runs_on_while_a_subshell_cell_is_repaired(
    main, subshell, postgres_db, blocker
):
    main.ok("Order.objects.create(number=1)")
    main.ok("transaction.set_autocommit(False); Order.objects.create(number=2)")
    main_pid = pid_of(main)
    assert pid_of(subshell) != main_pid  # a connection of its own
    running = main.send(f"connection.cursor().execute({blocker.query!r})")
    wait_until_running(postgres_db, blocker.query)
    subshell.ok("transaction.set_autocommit(False)")
    failed = subshell.run("Order.objects.create(number=1)")
    assert failed.ename == "IntegrityError", failed.shown
    assert "rolled back db 'default'" in only_notice(failed)
    assert subshell.ok("Order.objects.count()").value() == 1
    assert wait_until_running(postgres_db, blocker.query) == main_pid  # still running
    blocker.release()
    assert main.wait(running).ok
    # The main shell's transaction went on untouched, on the same connection.
    assert pid_of(main) == main_pid
    main.ok("Order.objects.create(number=3); transaction.commit()")
    assert committed(postgres_db) == [1, 2, 3]


@needs_subshells
@by_driver
def test_subshell_query_runs_on_while_a_main_shell_cell_is_repaired(
    main, subshell, postgres_db, blocker
):
    subshell.ok("Order.objects.create(number=1)")
    subshell.ok("transaction.set_autocommit(False); Order.objects.create(number=2)")
    sub_pid = pid_of(subshell)
    running = subshell.send(f"connection.cursor().execute({blocker.query!r})")
    wait_until_running(postgres_db, blocker.query)
    main.ok("transaction.set_autocommit(False)")
    failed = main.run("Order.objects.create(number=1)")
    assert failed.ename == "IntegrityError", failed.shown
    assert "rolled back db 'default'" in only_notice(failed)
    assert wait_until_running(postgres_db, blocker.query) == sub_pid  # still running
    blocker.release()
    assert subshell.wait(running).ok
    assert pid_of(subshell) == sub_pid
    subshell.ok("transaction.commit()")
    assert committed(postgres_db) == [1, 2]


@needs_subshells
@by_driver
def test_dbstatus_and_dbreset_see_subshell_connections(main, subshell):
    subshell.ok("transaction.set_autocommit(False)")
    failed = subshell.run("Order.objects.create(number=1); Order.objects.create(number=1)")
    assert failed.ename == "IntegrityError", failed.shown
    # The main shell sees the subshell's connection, repaired already.
    table = main.ok("table = %dbstatus\nprint(table)").stdout
    assert subshell.thread in table, table
    assert "aborted transaction" not in table, table
    subshell.ok("Order.objects.create(number=2)")
    # In a transaction, the subshell's own %dbreset rolls it back and closes it ...
    done = subshell.ok("result = %dbreset\nresult.left, len(result)")
    assert done.value() == ([], 1), done.shown
    assert subshell.ok("Order.objects.count(), transaction.get_autocommit()").value() == (0, False)
    # ... and between its cells the main shell's resets its idle connection.
    subshell.ok("transaction.rollback(); transaction.set_autocommit(True); Order.objects.count()")
    done = main.ok("result = %dbreset\nsorted(r.thread or '' for r in result)")
    assert subshell.thread in done.value(), done.shown
    assert subshell.ok("Order.objects.count()").value() == 0


@needs_subshells
def test_loading_in_a_subshell_says_where_to_load_it(start_kernel, postgres_url):
    kernel = start_kernel(postgres_url, load=False)
    sub = Shell.create(kernel, Mailbox(kernel))
    refused = sub.run("%load_ext ipy_dbreset")
    assert refused.ename == "UsageError", refused.shown
    assert "load the extension in the kernel's main shell" in refused.evalue, refused.evalue
    assert "Traceback" not in refused.shown
    main = Shell(kernel, sub.mailbox)
    main.ok("%load_ext ipy_dbreset")
    assert main.ok("from django.db import connection; connection.ensure_connection()").ok
    assert sub.ok("%dbstatus").ok


def test_loading_under_ipykernel_7_0_1_says_what_goes_wrong(start_kernel, postgres_url):
    kernel = start_kernel(postgres_url, load=False)
    kernel.ok("import ipykernel; ipykernel.__version__ = '7.0.1'")
    cell = kernel.ok("%load_ext ipy_dbreset")
    warnings = [n for n in cell.notices if "ipykernel" in n]
    assert len(warnings) == 1, cell.shown
    warning = warnings[0]
    assert "ipykernel 7.0.1 runs each cell in a new context" in warning, warning
    assert "pip install -U ipykernel" in warning, warning
