"""Naming what a repair discarded: how many writes, of which kind, on which table.

When a repair throws a transaction away (an aborted manual transaction, atomic
blocks unwound, a connection that died with a transaction open), its notice
counts the data-changing statements lost and names their kind and table;
when the transaction only read, it says that nothing written was lost.
``%dbstatus`` shows what an open transaction holds and for how long.  A
value (a parameter, or a literal in raw SQL) never appears anywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from conftest import (
    DRIVERS,
    mysql_admin,
    terminate_backends,
    wait_until_disconnected,
    wait_until_mysql_gone,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from harness import Cell, Kernel

pytestmark = [pytest.mark.kernel]

SECRET = "s3cret-Value"
RAW_SECRET = "raw-L1teral"

# Two inserts and an update, once with a parameter and once with a literal in raw SQL.
WRITES = (
    "Order.objects.create(number=2); Order.objects.create(number=3)\n"
    f"Order.objects.filter(number=2).update(customer={SECRET!r})\n"
    "with connection.cursor() as c:\n"
    f"    c.execute(\"update shop_order set customer = '{RAW_SECRET}' where number = 3\")\n"
)


def only_notice(cell: Cell) -> str:
    assert len(cell.notices) == 1, f"expected one notice, got {cell.notices}\n{cell.shown}"
    return cell.notices[0]


def no_secret(*cells: Cell) -> None:
    for cell in cells:
        shown = cell.shown + "".join(cell.htmls)
        assert SECRET not in shown and RAW_SECRET not in shown, shown


@pytest.fixture(params=DRIVERS)
def pg_kernel(
    request: pytest.FixtureRequest, start_kernel: Callable[..., Kernel], postgres_url: str
) -> Kernel:
    """A kernel on the session's PostgreSQL database, ``shop_order`` holding number 1."""
    kernel = start_kernel(postgres_url, request.param)
    kernel.ok("Order.objects.create(number=1)")
    return kernel


@pytest.mark.postgres
def test_integrity_error_in_manual_transaction_names_the_lost_writes(pg_kernel):
    status = pg_kernel.ok(f"transaction.set_autocommit(False)\n{WRITES}%dbstatus")
    assert "4 writes, open" in status.shown, status.shown
    failed = pg_kernel.run("Order.objects.create(number=1)")
    assert failed.ename == "IntegrityError"
    notice = only_notice(failed)
    assert "lost: the aborted transaction" in notice
    assert "4 unsaved writes (INSERT shop_order x2, UPDATE shop_order x2)" in notice, notice
    after = pg_kernel.ok("%dbstatus")
    assert "writes, open" not in after.shown  # the transaction is over
    no_secret(status, failed, after)


@pytest.mark.postgres
def test_only_the_writes_since_the_last_commit_are_named(pg_kernel):
    pg_kernel.ok("transaction.set_autocommit(False); Order.objects.create(number=2)")
    pg_kernel.ok("transaction.commit(); Order.objects.filter(number=2).delete()")
    failed = pg_kernel.run("Order.objects.create(number=1)")
    assert failed.ename == "IntegrityError"
    assert "lost" in only_notice(failed)
    assert "1 unsaved write (DELETE shop_order)" in only_notice(failed)


@pytest.mark.postgres
def test_aborted_transaction_that_only_read_lost_nothing_written(pg_kernel):
    pg_kernel.ok("transaction.set_autocommit(False); Order.objects.count()")
    failed = pg_kernel.run('Order.objects.extra(where=["no_such_column = 1"]).count()')
    assert failed.ename == "ProgrammingError"
    notice = only_notice(failed)
    assert "lost: the aborted transaction" in notice and "nothing written was lost" in notice


@pytest.mark.postgres
def test_terminated_backend_in_atomic_block_names_the_lost_writes(pg_kernel, postgres_db):
    status = pg_kernel.ok(f"a = transaction.atomic(); a.__enter__()\n{WRITES}%dbstatus")
    assert "4 writes, open" in status.shown, status.shown
    assert terminate_backends(postgres_db) >= 1
    wait_until_disconnected(postgres_db)
    cell = pg_kernel.run("Order.objects.count()")
    notice = cell.notices[0]
    assert "lost: an atomic block" in notice
    assert "4 unsaved writes (INSERT shop_order x2, UPDATE shop_order x2)" in notice, notice
    no_secret(status, cell)


@pytest.mark.postgres
def test_unwound_inner_block_names_its_writes_and_keeps_the_outer_ones(pg_kernel):
    pg_kernel.ok("outer = transaction.atomic(); outer.__enter__(); Order.objects.create(number=2)")
    pg_kernel.ok(
        "inner = transaction.atomic(); inner.__enter__()\n"
        "Order.objects.create(number=3); Order.objects.filter(number=3).delete()"
    )
    failed = pg_kernel.run("Order.objects.create(number=1)")
    assert failed.ename == "IntegrityError"
    notice = only_notice(failed)
    assert "rolled back to a savepoint" in notice
    assert "2 unsaved writes (INSERT shop_order, DELETE shop_order)" in notice, notice
    assert "kept: 1 write (INSERT shop_order) in the outer block" in notice, notice
    status = pg_kernel.ok("%dbstatus")
    assert "1 write, open" in status.shown, status.shown


@pytest.mark.mysql
def test_killed_connection_in_manual_transaction_names_the_lost_writes(
    start_kernel, mysql_url, mysql_db
):
    kernel = start_kernel(mysql_url)
    kernel.ok("Order.objects.create(number=1)")
    status = kernel.ok(f"transaction.set_autocommit(False)\n{WRITES}%dbstatus")
    assert "4 writes, open" in status.shown, status.shown
    thread = int(kernel.ok("connection.connection.thread_id()").value())
    mysql_admin(f"KILL {thread}")
    wait_until_mysql_gone(thread)
    cell = kernel.ok("Order.objects.count()")
    assert cell.value() == 1
    notice = only_notice(cell)
    assert "lost: a manual transaction" in notice
    assert "4 unsaved writes (INSERT shop_order x2, UPDATE shop_order x2)" in notice, notice
    no_secret(status, cell)


def test_reset_names_the_writes_it_discards_on_sqlite(start_kernel, sqlite_url):
    kernel = start_kernel(sqlite_url)
    kernel.ok("Order.objects.create(number=1)")
    status = kernel.ok(f"a = transaction.atomic(); a.__enter__()\n{WRITES}%dbstatus")
    assert "4 writes, open" in status.shown, status.shown
    reset = kernel.ok("%dbreset")
    notice = only_notice(reset)
    assert "reset" in notice and "lost: an atomic block (rolled back)" in notice
    assert "4 unsaved writes (INSERT shop_order x2, UPDATE shop_order x2)" in notice, notice
    no_secret(status, reset)
