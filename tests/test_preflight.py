"""A fault inside a cell: the server drops an idle connection between two of its queries.

The cell itself asks the server, through a separate admin connection, to drop
its connection (``pg_terminate_backend``, MariaDB's ``KILL``, an
``idle_session_timeout``), and waits until the server no longer lists it; then
it queries again.  Outside a transaction nothing was lost, and the second
query must run on a new connection; inside one, it fails as before and the
notice says what was lost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from conftest import DRIVERS, mysql_admin, pg_admin

if TYPE_CHECKING:
    from collections.abc import Callable

    from harness import Cell, Kernel

# Runs in the kernel: drop this process's own connection from the server side,
# as a DBA would, and wait (polling, with a deadline) until the server no
# longer lists it.  The admin connection uses the kernel's own DB-API module.
HELPERS = """
import time
from django.db import connections

def _admin(using="default"):
    wrapper = connections[using]
    s = wrapper.settings_dict
    if wrapper.vendor == "postgresql":
        admin = wrapper.Database.connect(
            host=s["HOST"], port=int(s["PORT"]), user=s["USER"], dbname="postgres"
        )
    else:
        admin = wrapper.Database.connect(host=s["HOST"], port=int(s["PORT"]), user=s["USER"])
    admin.autocommit(True) if wrapper.vendor == "mysql" else setattr(admin, "autocommit", True)
    return wrapper.vendor, admin

def server_id(using="default"):
    raw = connections[using].connection
    return raw.thread_id() if hasattr(raw, "thread_id") else raw.info.backend_pid

def listed(vendor, cursor, sid):
    if vendor == "postgresql":
        cursor.execute("select count(*) from pg_stat_activity where pid = %s", (sid,))
    else:
        cursor.execute("select count(*) from information_schema.PROCESSLIST where ID = %s", (sid,))
    return cursor.fetchone()[0] > 0

def wait_gone(sid, using="default"):
    vendor, admin = _admin(using)
    try:
        cursor = admin.cursor()
        deadline = time.monotonic() + 10
        while listed(vendor, cursor, sid):
            assert time.monotonic() < deadline, f"the server still lists {sid}"
            time.sleep(0.01)
    finally:
        admin.close()

def kill(sid, using="default"):
    vendor, admin = _admin(using)
    try:
        cursor = admin.cursor()
        if vendor == "postgresql":
            cursor.execute("select pg_terminate_backend(%s)", (sid,))
        else:
            cursor.execute(f"KILL {int(sid)}")
    finally:
        admin.close()
    wait_gone(sid, using)
"""

# A cell that queries, has its connection dropped by the server, and queries again.
MID_CELL = """
first = Order.objects.count()
before = server_id()
kill(before)
first, Order.objects.count()
"""

IN_ATOMIC = """
with transaction.atomic():
    Order.objects.create(number=2)
    kill(server_id())
    Order.objects.count()
"""

IN_MANUAL = """
transaction.set_autocommit(False)
Order.objects.create(number=2)
kill(server_id())
Order.objects.count()
"""

ASYNC = """
from asgiref.sync import sync_to_async
first = await Order.objects.acount()
kill(await sync_to_async(server_id)())
first, await Order.objects.acount()
"""


def lost(cell: Cell) -> list[str]:
    """The notices that name something lost (not those saying nothing was)."""
    return [n for n in cell.notices if "; lost " in n]


def reconnected(cell: Cell) -> bool:
    return any(n.startswith("ipy_dbreset: reconnected db ") for n in cell.notices)


def committed_pg(dbname: str) -> list[int]:
    return [n for (n,) in pg_admin("select number from shop_order order by number", dbname=dbname)]


def committed_mysql(db: str) -> list[int]:
    return [row[0] for row in mysql_admin("select number from shop_order order by number", db=db)]


@pytest.fixture
def pg_kernel(
    start_kernel: Callable[..., Kernel], postgres_url: str, request: pytest.FixtureRequest
) -> Kernel:
    kernel = start_kernel(postgres_url, getattr(request, "param", None))
    kernel.ok(HELPERS)
    kernel.ok("Order.objects.create(number=1)")
    return kernel


@pytest.fixture
def mysql_kernel(start_kernel: Callable[..., Kernel], mysql_url: str) -> Kernel:
    kernel = start_kernel(mysql_url)
    kernel.ok(HELPERS)
    kernel.ok("Order.objects.create(number=1)")
    return kernel


by_driver = pytest.mark.parametrize("pg_kernel", DRIVERS, indirect=True)


# -- PostgreSQL -------------------------------------------------------------------


@pytest.mark.kernel
@pytest.mark.postgres
@by_driver
def test_query_after_backend_terminated_mid_cell_works(pg_kernel, postgres_db):
    cell = pg_kernel.ok(MID_CELL)
    assert cell.value() == (1, 1)
    assert not lost(cell), cell.notices
    assert reconnected(cell), cell.notices
    assert pg_kernel.ok("server_id() != before").value() is True
    assert pg_kernel.failed == 0
    assert committed_pg(postgres_db) == [1]


@pytest.mark.kernel
@pytest.mark.postgres
@by_driver
def test_query_after_idle_session_timeout_mid_cell_works(pg_kernel, postgres_db):
    code = (
        "connection.cursor().execute(\"SET idle_session_timeout = '200ms'\")\n"
        "before = server_id()\n"
        "wait_gone(before)\n"
        "Order.objects.count()"
    )
    cell = pg_kernel.ok(code)
    assert cell.value() == 1
    assert not lost(cell), cell.notices
    assert pg_kernel.failed == 0


@pytest.mark.kernel
@pytest.mark.postgres
@by_driver
@pytest.mark.parametrize("code", [IN_ATOMIC, IN_MANUAL], ids=["atomic", "manual"])
def test_query_in_transaction_after_termination_fails_and_says_what_was_lost(
    pg_kernel, postgres_db, code
):
    cell = pg_kernel.run(code)
    assert cell.ename in {"OperationalError", "InterfaceError"}, cell.shown
    what = "an atomic block" if code is IN_ATOMIC else "a manual transaction"
    assert len(lost(cell)) == 1, cell.notices
    assert f"lost {what} with 1 unsaved write (INSERT shop_order)" in lost(cell)[0], cell.notices
    assert not reconnected(cell)
    assert "ipy_dbreset" not in cell.stderr, cell.stderr  # told once, as a notice
    assert pg_kernel.ok("Order.objects.count()").value() == 1
    assert pg_kernel.failed == 1
    assert committed_pg(postgres_db) == [1]


# The user catches the failure and queries again, on the same dead connection.
CAUGHT_IN_MANUAL = """
transaction.set_autocommit(False)
Order.objects.create(number=2)
kill(server_id())
for _ in range(2):
    try:
        Order.objects.count()
    except Exception as exc:
        failed = type(exc).__name__
failed
"""

# An atomic block inside a manual transaction: the server lost the whole transaction.
ATOMIC_IN_MANUAL = """
transaction.set_autocommit(False)
Order.objects.create(number=2)
with transaction.atomic():
    Order.objects.create(number=3)
    kill(server_id())
    Order.objects.count()
"""


@pytest.mark.kernel
@pytest.mark.postgres
@by_driver
@pytest.mark.parametrize(
    ("code", "writes"),
    [
        (CAUGHT_IN_MANUAL, "1 unsaved write (INSERT shop_order)"),
        (ATOMIC_IN_MANUAL, "2 unsaved writes (INSERT shop_order x2)"),
    ],
    ids=["caught", "atomic"],
)
def test_transaction_lost_mid_cell_is_told_once_and_not_on_stderr(
    pg_kernel, postgres_db, code, writes
):
    cell = pg_kernel.run(code)
    assert "ipy_dbreset" not in cell.stderr, cell.stderr
    assert len(lost(cell)) == 1, cell.notices
    [notice] = lost(cell)
    assert "lost a manual transaction" in notice and writes in notice, notice
    after = pg_kernel.ok("Order.objects.count()")
    assert after.value() == 1
    assert not lost(after) and "ipy_dbreset" not in after.stderr, after.shown
    assert committed_pg(postgres_db) == [1]


@pytest.mark.kernel
@pytest.mark.postgres
@by_driver
def test_async_orm_query_after_termination_mid_cell_works(pg_kernel):
    cell = pg_kernel.ok(ASYNC)
    assert cell.value() == (1, 1)
    assert not lost(cell), cell.notices
    assert any("reconnected db 'default' (thread " in n for n in cell.notices), cell.notices
    assert pg_kernel.failed == 0


@pytest.mark.kernel
@pytest.mark.postgres
@by_driver
def test_atomic_block_after_termination_mid_cell_starts_on_a_new_connection(pg_kernel, postgres_db):
    """Entering ``atomic()`` is still outside the transaction: nothing was sent yet."""
    code = (
        "kill(server_id())\n"
        "with transaction.atomic():\n"
        "    Order.objects.create(number=2)\n"
        "Order.objects.count()"
    )
    assert pg_kernel.ok(code).value() == 2
    assert committed_pg(postgres_db) == [1, 2]


# -- MariaDB ----------------------------------------------------------------------


@pytest.mark.kernel
@pytest.mark.mysql
def test_query_after_kill_mid_cell_works(mysql_kernel, mysql_db):
    cell = mysql_kernel.ok(MID_CELL)
    assert cell.value() == (1, 1)
    assert not lost(cell), cell.notices
    assert reconnected(cell), cell.notices
    assert mysql_kernel.failed == 0
    assert committed_mysql(mysql_db) == [1]


@pytest.mark.kernel
@pytest.mark.mysql
def test_atomic_block_after_kill_mid_cell_works(mysql_kernel, mysql_db):
    code = (
        "kill(server_id())\n"
        "with transaction.atomic():\n"
        "    Order.objects.create(number=2)\n"
        "Order.objects.count()"
    )
    assert mysql_kernel.ok(code).value() == 2
    assert committed_mysql(mysql_db) == [1, 2]


@pytest.mark.kernel
@pytest.mark.mysql
def test_query_in_atomic_block_after_kill_fails_and_says_what_was_lost(mysql_kernel, mysql_db):
    cell = mysql_kernel.run(IN_ATOMIC)
    assert cell.ename == "OperationalError", cell.shown
    assert len(lost(cell)) == 1 and "lost an atomic block with" in lost(cell)[0], cell.notices
    assert mysql_kernel.ok("Order.objects.count()").value() == 1
    assert committed_mysql(mysql_db) == [1]


# -- load and unload -------------------------------------------------------------

HOOKED = "'close_if_health_check_failed' in connections['default'].__dict__"


@pytest.mark.kernel
@pytest.mark.postgres
def test_unload_takes_the_hook_away_and_reload_puts_one_back(pg_kernel):
    assert pg_kernel.ok(HOOKED).value() is True
    pg_kernel.ok("%unload_ext ipy_dbreset")
    assert pg_kernel.ok(HOOKED).value() is False
    pg_kernel.ok("import os; os.environ['DJANGO_ALLOW_ASYNC_UNSAFE'] = 'true'")  # unload took it
    # Without the extension, the mid-cell fault fails the cell as it always did.
    assert pg_kernel.run(MID_CELL).ename == "OperationalError"
    pg_kernel.ok("%load_ext ipy_dbreset")
    pg_kernel.ok("%reload_ext ipy_dbreset")
    pg_kernel.ok("Order.objects.count()")  # a connection opened since is watched
    assert pg_kernel.ok(HOOKED).value() is True
    assert pg_kernel.ok(MID_CELL).value() == (1, 1)


def test_sqlite_connections_are_left_as_django_made_them(shell):
    from harness import run

    assert run(shell, "Order.objects.count()").ok
    cell = run(shell, HOOKED)
    assert cell.ok and cell.result is False
