"""MariaDB / MySQL (mysqlclient) faults: no cell fails for what broke between cells.

Each case counts the cells that failed (0 when the fault happened between
cells, 1 when a cell itself raised) and checks, from a separate admin
connection, that no committed row was lost and that no transaction that could
still have been committed was thrown away.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest

from conftest import mysql_admin, wait_until_mysql_gone

if TYPE_CHECKING:
    from harness import Kernel

pytestmark = [pytest.mark.kernel, pytest.mark.mysql]


def committed(db: str) -> list[int]:
    """The order numbers another client sees: what is committed."""
    return [row[0] for row in mysql_admin("select number from shop_order order by number", db=db)]


THREAD_ID = "connection.ensure_connection(); connection.connection.thread_id()"


def thread_id(kernel: Kernel) -> int:
    """The server's id of the kernel's connection (what ``SHOW PROCESSLIST`` calls Id)."""
    return int(kernel.ok(THREAD_ID).value())


def kill(kernel: Kernel) -> None:
    """``KILL`` the kernel's connection, as a DBA would, and wait until the server closed it."""
    thread = thread_id(kernel)
    mysql_admin(f"KILL {thread}")
    wait_until_mysql_gone(thread)


def closed_notice(notices: list[str]) -> bool:
    """Whether a notice says the connection the server dropped was closed."""
    return any(n.startswith("ipy_dbreset: closed db 'default': ") for n in notices)


# -- the server drops the connection between cells ------------------------------


def test_first_cell_after_kill_works(start_kernel, mysql_url, mysql_db):
    kernel = start_kernel(mysql_url)
    kernel.ok("Order.objects.create(number=1)")
    kill(kernel)
    cell = kernel.ok("Order.objects.count()")
    assert cell.value() == 1
    assert closed_notice(cell.notices), cell.notices
    assert kernel.failed == 0
    assert committed(mysql_db) == [1]


def test_first_cell_after_wait_timeout_works(start_kernel, mysql_url, mysql_db):
    kernel = start_kernel(mysql_url)
    kernel.ok("Order.objects.create(number=1)")
    thread = thread_id(kernel)
    kernel.ok("connection.cursor().execute('SET SESSION wait_timeout=1')")
    wait_until_mysql_gone(thread)  # the user reads for a while; the server gives up on it
    cell = kernel.ok("Order.objects.count()")
    assert cell.value() == 1
    assert closed_notice(cell.notices), cell.notices
    # The new connection has the server's default timeout again.
    assert kernel.ok("Order.objects.count()").value() == 1
    assert kernel.failed == 0
    assert committed(mysql_db) == [1]


def test_kill_during_manual_transaction_says_the_transaction_was_lost(
    start_kernel, mysql_url, mysql_db
):
    kernel = start_kernel(mysql_url)
    kernel.ok("Order.objects.create(number=1)")
    kernel.ok("transaction.set_autocommit(False); Order.objects.create(number=2)")
    kill(kernel)
    cell = kernel.ok("Order.objects.count()")
    assert cell.value() == 1  # the server rolled number 2 back when it dropped the connection
    lost = "lost a manual transaction with 1 unsaved write (INSERT shop_order)"
    assert any(lost in n for n in cell.notices), cell.notices
    # The user's choice of manual transactions survives the reconnection.
    assert kernel.ok("connection.get_autocommit()").value() is False
    kernel.ok("Order.objects.create(number=3); transaction.commit()")
    assert kernel.failed == 0
    assert committed(mysql_db) == [1, 3]


# -- errors inside a cell --------------------------------------------------------


def test_integrity_error_in_manual_transaction_keeps_earlier_writes(
    start_kernel, mysql_url, mysql_db
):
    """MySQL rolls back only the failed statement: the transaction stays usable."""
    kernel = start_kernel(mysql_url)
    kernel.ok("transaction.set_autocommit(False); Order.objects.create(number=1)")
    cell = kernel.run("Order.objects.create(number=1)")
    assert cell.ename == "IntegrityError"
    assert cell.notices == []  # nothing to repair, nothing lost
    assert kernel.ok("Order.objects.count()").value() == 1
    kernel.ok("Order.objects.create(number=2); transaction.commit()")
    assert kernel.failed == 1
    assert committed(mysql_db) == [1, 2]


def test_integrity_error_in_leaked_atomic_block_keeps_writes(start_kernel, mysql_url, mysql_db):
    """A block entered by hand and never left: Django marks it, MySQL still holds the work."""
    kernel = start_kernel(mysql_url)
    kernel.ok("block = transaction.atomic(); block.__enter__(); Order.objects.create(number=1)")
    cell = kernel.run("Order.objects.create(number=1)")
    assert cell.ename == "IntegrityError"
    kept = "kept the block with 1 write (INSERT shop_order)"
    assert any("rollback mark on db 'default'" in n and kept in n for n in cell.notices), (
        cell.notices
    )
    cell = kernel.ok("Order.objects.create(number=2); Order.objects.count()")
    assert cell.value() == 2
    assert committed(mysql_db) == []  # still inside the block
    kernel.ok("block.__exit__(None, None, None)")
    assert kernel.failed == 1
    assert committed(mysql_db) == [1, 2]


OPEN = {
    "manual transaction": ("transaction.set_autocommit(False)", "transaction.commit()"),
    "atomic block": (
        "block = transaction.atomic(); block.__enter__()",
        "block.__exit__(None, None, None)",
    ),
}


@pytest.mark.parametrize("kind", OPEN)
def test_healthy_open_transaction_survives_a_python_error(start_kernel, mysql_url, mysql_db, kind):
    begin, end = OPEN[kind]
    kernel = start_kernel(mysql_url)
    kernel.ok(f"{begin}; Order.objects.create(number=1)")
    cell = kernel.run("1/0")
    assert cell.ename == "ZeroDivisionError"
    assert cell.notices == []
    kernel.ok("Order.objects.create(number=2)")
    kernel.ok(end)
    assert kernel.failed == 1
    assert committed(mysql_db) == [1, 2]


# -- a healthy cell costs nothing -----------------------------------------------


def last_command(thread: int) -> tuple[int, float]:
    """The server's view of a connection: id of its last command, ms since it arrived.

    ``QUERY_ID`` changes with every command the client sends, pings included,
    so an unchanged value proves that nothing at all was sent.
    """
    rows = mysql_admin(
        "select QUERY_ID, TIME_MS from information_schema.PROCESSLIST where ID = %s", (thread,)
    )
    assert rows, f"connection {thread} is gone"
    return int(rows[0][0]), float(rows[0][1])


HEALTHY_CELLS = ["x = 1", "x + 1", "print('hello')", "[n * 2 for n in range(10)]", "%dbstatus"]


@pytest.mark.parametrize("kind", ["idle", "in a manual transaction"])
def test_healthy_cells_send_nothing_to_the_server(start_kernel, mysql_url, kind):
    kernel = start_kernel(mysql_url)
    if kind == "in a manual transaction":
        kernel.ok("transaction.set_autocommit(False); Order.objects.create(number=1)")
    thread = thread_id(kernel)
    before, _ = last_command(thread)
    started = time.monotonic()
    for code in HEALTHY_CELLS:
        kernel.ok(code)
    elapsed_ms = (time.monotonic() - started) * 1000
    after, idle_ms = last_command(thread)
    assert after == before, "the extension sent a command (a query or a ping) to the server"
    assert idle_ms >= elapsed_ms * 0.9
    assert kernel.failed == 0


QUESTIONS = (
    "cursor = connection.cursor(); cursor.execute(\"SHOW SESSION STATUS LIKE 'Questions'\"); "
    "int(cursor.fetchone()[1])"
)


def test_healthy_orm_cells_cost_no_extra_statements(start_kernel, mysql_url):
    """Counted by the server for this connection alone, so other clients cannot disturb it."""
    kernel = start_kernel(mysql_url)
    kernel.ok("Order.objects.count()")
    first = kernel.ok(QUESTIONS).value()
    second = kernel.ok(QUESTIONS).value()
    monitoring = second - first  # what one look at the counter costs
    cells = ["Order.objects.count()", "Order.objects.create(number=1)", "list(Order.objects.all())"]
    for code in cells:
        kernel.ok(code)
    after = kernel.ok(QUESTIONS).value()
    assert after - second - monitoring == len(cells)
    assert kernel.failed == 0
