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
    pg_admin,
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
    assert "rolled back db 'default': a failed statement aborted the transaction; lost " in notice
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
    assert "lost 1 unsaved write (DELETE shop_order)" in only_notice(failed)


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("before", "failing", "error"),
    [
        ("Order.objects.count()", 'Order.objects.extra(where=["x=1"]).count()', "ProgrammingError"),
        # The failed statement is the transaction's first: the ledger saw it from its
        # start, so it says "nothing written", not "lost its work".
        ("pass", "Order.objects.create(number=1)", "IntegrityError"),
    ],
)
def test_aborted_transaction_that_only_read_lost_nothing_written(pg_kernel, before, failing, error):
    pg_kernel.ok(f"transaction.set_autocommit(False); {before}")
    failed = pg_kernel.run(failing)
    assert failed.ename == error
    notice = only_notice(failed)
    assert "rolled back db 'default': a failed statement aborted" in notice
    assert "nothing written was lost (it only read)" in notice, notice
    assert "its work" not in notice, notice


@pytest.mark.postgres
def test_terminated_backend_in_atomic_block_names_the_lost_writes(pg_kernel, postgres_db):
    status = pg_kernel.ok(f"a = transaction.atomic(); a.__enter__()\n{WRITES}%dbstatus")
    assert "4 writes, open" in status.shown, status.shown
    assert terminate_backends(postgres_db) >= 1
    wait_until_disconnected(postgres_db)
    cell = pg_kernel.run("Order.objects.count()")
    notice = cell.notices[0]
    assert "closed db 'default': the server closed the connection" in notice
    assert (
        "lost an atomic block with 4 unsaved writes (INSERT shop_order x2, UPDATE shop_order x2)"
        in notice
    ), notice
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
    assert "rolled back the inner atomic block on db 'default'" in notice
    assert "lost 2 unsaved writes (INSERT shop_order, DELETE shop_order)" in notice, notice
    assert "kept the outer block with 1 write (INSERT shop_order)" in notice, notice
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
    assert "lost a manual transaction with 4 unsaved writes (INSERT shop_order x2, " in notice
    assert "4 unsaved writes (INSERT shop_order x2, UPDATE shop_order x2)" in notice, notice
    no_secret(status, cell)


def test_reset_names_the_writes_it_discards_on_sqlite(start_kernel, sqlite_url):
    kernel = start_kernel(sqlite_url)
    kernel.ok("Order.objects.create(number=1)")
    status = kernel.ok(f"a = transaction.atomic(); a.__enter__()\n{WRITES}%dbstatus")
    assert "4 writes, open" in status.shown, status.shown
    reset = kernel.ok("%dbreset")
    notice = only_notice(reset)
    assert notice.startswith("ipy_dbreset: reset db 'default': rolled back an atomic block with")
    assert "4 unsaved writes (INSERT shop_order x2, UPDATE shop_order x2)" in notice, notice
    no_secret(status, reset)


@pytest.mark.postgres
def test_counts_are_rows_as_the_driver_reports_them(pg_kernel):
    """A bulk_create of 500 is one statement writing 500 rows; an UPDATE of nothing no write."""
    status = pg_kernel.ok(
        "transaction.set_autocommit(False)\n"
        "Order.objects.bulk_create([Order(number=n) for n in range(1000, 1500)])\n"
        "Order.objects.filter(number__gte=1000).update(customer='x')\n"
        "Order.objects.filter(number=-1).update(customer='y')\n"  # matches nothing
        "Order.objects.filter(number=-1).delete()\n"
        "%dbstatus"
    )
    assert "2 writes (1,000 rows), open" in status.shown, status.shown
    failed = pg_kernel.run("Order.objects.create(number=1)")
    assert failed.ename == "IntegrityError"
    notice = only_notice(failed)
    assert (
        "; lost 2 unsaved statements writing 1,000 rows "
        "(INSERT shop_order 500, UPDATE shop_order 500); "
    ) in notice, notice
    assert pg_kernel.ok("transaction.rollback(); Order.objects.count()").value() == 1


@pytest.mark.postgres
def test_a_transaction_whose_statements_changed_nothing_lost_nothing(pg_kernel):
    pg_kernel.ok(
        "transaction.set_autocommit(False)\n"
        "Order.objects.filter(number=-1).update(customer='y')\n"
        "Order.objects.filter(number=-1).delete()"
    )
    failed = pg_kernel.run("Order.objects.create(number=1)")
    assert failed.ename == "IntegrityError"
    notice = only_notice(failed)
    assert "nothing written was lost (it changed no row)" in notice, notice
    assert "unsaved" not in notice, notice
    pg_kernel.ok("transaction.rollback(); transaction.set_autocommit(True)")


@pytest.mark.postgres
def test_a_stream_left_open_across_cells_keeps_its_transaction(pg_kernel, postgres_db):
    """psycopg 3's ``cursor.stream()``: the connection is busy between cells, not stuck."""
    if "psycopg2" in pg_kernel.ok("print(connection.Database.__name__)").shown:
        pytest.skip("psycopg2 has no stream()")
    pg_kernel.ok("transaction.set_autocommit(False); Order.objects.create(number=2)")
    # More rows than the socket buffers hold: the server is still sending between cells.
    started = pg_kernel.ok(
        "rows = connection.connection.cursor().stream('select generate_series(1, 300000)')\n"
        "first = next(rows)"
    )
    assert not started.notices, started.shown
    status = pg_kernel.ok("%dbstatus")
    assert "streaming a result" in status.shown, status.shown
    between = pg_kernel.ok("Order  # a cell that does not touch the database")
    assert not between.notices, between.shown
    finished = pg_kernel.ok("1 + sum(1 for _ in rows)")
    assert finished.value() == 300000 and not finished.notices, finished.shown
    committed = pg_kernel.ok("transaction.commit(); transaction.set_autocommit(True)")
    assert not committed.notices, committed.shown
    (count,) = pg_admin("select count(*) from shop_order where number = 2", dbname=postgres_db)
    assert count == (1,)
