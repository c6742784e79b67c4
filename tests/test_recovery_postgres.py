"""Recovery on PostgreSQL in real kernels, under psycopg 3 and psycopg2.

The fault matrix for PostgreSQL: a fault between cells costs no failed cell,
a fault inside a cell fails that cell only, and in both cases no committed row
is lost and no transaction that could still be committed is discarded.  What
was committed is always read back from a separate admin connection.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

import IPython
import pytest
from ipykernel import zmqshell

from conftest import DRIVERS, pg_admin, terminate_backends, wait_until_disconnected

# ipykernel 7 marks a cell failed when showing its result raised (zmqshell's
# _last_traceback_during_displayhook), whatever IPython did.
DISPLAY_ERROR_FAILS_CELL = "_last_traceback_during_displayhook" in Path(
    zmqshell.__file__
).read_text(encoding="utf-8")

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from harness import Cell, Kernel

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.postgres,
    pytest.mark.parametrize("driver", DRIVERS),
]


@pytest.fixture
def kernel(start_kernel: Callable[..., Kernel], postgres_url: str, driver: str) -> Kernel:
    """A kernel on the session's PostgreSQL database, with ``shop_order`` empty."""
    return start_kernel(postgres_url, driver)


def committed(dbname: str) -> list[int]:
    """The order numbers committed in ``dbname``, as another client sees them."""
    return [n for (n,) in pg_admin("select number from shop_order order by number", dbname=dbname)]


def terminate(dbname: str) -> None:
    """Terminate the kernel's backend as a DBA would, and wait until it is gone."""
    assert terminate_backends(dbname) >= 1
    wait_until_disconnected(dbname)


@contextlib.contextmanager
def database_setting(dbname: str, name: str, value: str) -> Iterator[None]:
    """``ALTER DATABASE ... SET name = value`` for new sessions, undone afterwards."""
    pg_admin(f"alter database \"{dbname}\" set {name} = '{value}'")
    try:
        yield
    finally:
        pg_admin(f'alter database "{dbname}" reset {name}')


def only_notice(cell: Cell) -> str:
    """The single ipy_dbreset line a cell showed."""
    assert len(cell.notices) == 1, f"expected one notice, got {cell.notices}\n{cell.shown}"
    return cell.notices[0]


def quiet(cell: Cell) -> bool:
    """Whether ipy_dbreset showed nothing at all in this cell."""
    return (
        not cell.notices
        and "ipy_dbreset" not in cell.shown
        and not any("ipy-dbreset" in h for h in cell.htmls)
    )


# -- faults between cells: no cell fails -----------------------------------------


def test_first_cell_after_terminated_backend_works(kernel, postgres_db):
    kernel.ok("Order.objects.create(number=1); Order.objects.create(number=2); x = 42")
    terminate(postgres_db)
    cell = kernel.ok("Order.objects.count(), x")
    assert cell.value() == (2, 42)
    notice = only_notice(cell)
    assert notice == (
        "ipy_dbreset: closed db 'default': the server closed the connection; "
        "nothing was lost, the next query reconnects"
    )
    assert kernel.failed == 0
    assert committed(postgres_db) == [1, 2]


def test_first_cell_after_terminated_backend_in_manual_transaction_works(kernel, postgres_db):
    kernel.ok("Order.objects.create(number=1)")
    kernel.ok("transaction.set_autocommit(False); Order.objects.create(number=2)")
    terminate(postgres_db)
    cell = kernel.ok("Order.objects.count()")
    assert cell.value() == 1  # the server discarded the uncommitted row with its transaction
    notice = only_notice(cell)
    assert "closed db 'default': the server closed the connection" in notice, notice
    assert "lost a manual transaction with 1 unsaved write (INSERT shop_order)" in notice, notice
    assert "the next query reconnects with autocommit off, as you had it" in notice, notice
    # The user is still in manual transaction mode, on a fresh connection.
    assert kernel.ok("transaction.get_autocommit()").value() is False
    kernel.ok("Order.objects.create(number=3); transaction.commit()")
    assert kernel.failed == 0
    assert committed(postgres_db) == [1, 3]


def test_first_cell_after_idle_session_timeout_works(
    start_kernel, postgres_url, postgres_db, driver
):
    with database_setting(postgres_db, "idle_session_timeout", "1s"):
        kernel = start_kernel(postgres_url, driver)
        kernel.ok("Order.objects.create(number=1); x = 42")
        wait_until_disconnected(postgres_db)  # the server gives up after 1s of idleness
        cell = kernel.ok("Order.objects.count(), x")
    assert cell.value() == (1, 42)
    assert only_notice(cell).startswith("ipy_dbreset: closed db 'default': the server closed")
    assert kernel.failed == 0
    assert committed(postgres_db) == [1]


def test_first_cell_after_idle_in_transaction_timeout_works(
    start_kernel, postgres_url, postgres_db, driver
):
    with database_setting(postgres_db, "idle_in_transaction_session_timeout", "1s"):
        kernel = start_kernel(postgres_url, driver)
        kernel.ok("Order.objects.create(number=1)")
        kernel.ok("transaction.set_autocommit(False); Order.objects.create(number=2)")
        wait_until_disconnected(postgres_db)
        cell = kernel.ok("Order.objects.count()")
    assert cell.value() == 1
    assert "lost a manual transaction with 1 unsaved write (INSERT shop_order)" in only_notice(cell)
    assert kernel.failed == 0
    assert committed(postgres_db) == [1]


# -- faults inside a cell: that cell fails, the next one works ---------------------


def test_cell_after_integrity_error_in_manual_transaction_works(kernel, postgres_db):
    kernel.ok("Order.objects.create(number=1)")
    kernel.ok("transaction.set_autocommit(False); Order.objects.create(number=2)")
    failed = kernel.run("Order.objects.create(number=1)")
    assert failed.ename == "IntegrityError"
    notice = only_notice(failed)
    assert "rolled back db 'default': a failed statement aborted the transaction" in notice
    assert "lost 1 unsaved write (INSERT shop_order)" in notice, notice
    # Still in the user's manual transaction mode; the aborted transaction took row 2 with it.
    assert kernel.ok("Order.objects.count()").value() == 1
    kernel.ok("Order.objects.create(number=3); transaction.commit()")
    assert kernel.failed == 1
    assert committed(postgres_db) == [1, 3]


def test_cell_after_error_in_open_atomic_block_works(kernel, postgres_db):
    kernel.ok("Order.objects.create(number=1)")
    kernel.ok("a = transaction.atomic(); a.__enter__(); Order.objects.create(number=2)")
    failed = kernel.run("Order.objects.create(number=1)")
    assert failed.ename == "IntegrityError"
    notice = only_notice(failed)
    assert "rolled back db 'default': a failed statement aborted the transaction" in notice
    assert "lost the atomic block with 1 unsaved write (INSERT shop_order)" in notice, notice
    assert kernel.ok("Order.objects.count(), connection.in_atomic_block").value() == (1, False)
    assert kernel.failed == 1
    assert committed(postgres_db) == [1]


def test_error_in_nested_atomic_block_keeps_outer_block(kernel, postgres_db):
    kernel.ok("Order.objects.create(number=1)")
    kernel.ok("outer = transaction.atomic(); outer.__enter__(); Order.objects.create(number=2)")
    kernel.ok("inner = transaction.atomic(); inner.__enter__(); Order.objects.create(number=3)")
    failed = kernel.run("Order.objects.create(number=1)")
    assert failed.ename == "IntegrityError"
    notice = only_notice(failed)
    assert "rolled back the inner atomic block on db 'default'" in notice, notice
    lost = "lost 1 unsaved write (INSERT shop_order)"
    assert f"{lost}; kept the outer block with 1 write (INSERT shop_order)" in notice
    shown = kernel.ok("sorted(Order.objects.values_list('number', flat=True))")
    assert shown.value() == [1, 2]
    assert kernel.ok("connection.in_atomic_block").value() is True
    assert committed(postgres_db) == [1]  # the outer block is not committed yet ...
    kernel.ok("outer.__exit__(None, None, None)")
    assert committed(postgres_db) == [1, 2]  # ... and commits when the user leaves it
    assert kernel.ok("connection.in_atomic_block").value() is False
    assert kernel.failed == 1


def test_cell_after_error_while_displaying_result_works(kernel, postgres_db):
    kernel.ok("Order.objects.create(number=1)")
    kernel.ok("transaction.set_autocommit(False); Order.objects.create(number=2)")
    # The query runs only when IPython shows the QuerySet, after the cell's code.
    shown = kernel.run('Order.objects.extra(where=["no_such_column = 1"])')
    assert shown.ename == "ProgrammingError" and "no_such_column" in (shown.evalue or "")
    assert "rolled back db 'default': a failed statement aborted" in only_notice(shown)
    assert kernel.ok("Order.objects.count()").value() == 1
    # IPython 9 reports a cell whose result failed to display as failed, and so
    # does ipykernel 7 whatever the IPython; IPython 8 in ipykernel 6 as ok.
    assert kernel.failed == (1 if IPython.version_info >= (9,) or DISPLAY_ERROR_FAILS_CELL else 0)
    assert committed(postgres_db) == [1]


def test_cell_after_caught_integrity_error_in_manual_transaction_works(kernel, postgres_db):
    kernel.ok("Order.objects.create(number=1)")
    kernel.ok("transaction.set_autocommit(False); Order.objects.create(number=2)")
    caught = kernel.ok(
        "from django.db import IntegrityError\n"
        "try:\n"
        "    Order.objects.create(number=1)\n"
        "except IntegrityError:\n"
        "    print('duplicate')\n"
    )
    assert "duplicate" in caught.stdout
    assert "rolled back db 'default': a failed statement aborted" in only_notice(caught)
    assert kernel.ok("Order.objects.count()").value() == 1
    assert kernel.failed == 0
    assert committed(postgres_db) == [1]


# -- what must not be touched ------------------------------------------------------


def test_manual_transaction_survives_non_database_error(kernel, postgres_db):
    kernel.ok("Order.objects.create(number=1)")
    kernel.ok("transaction.set_autocommit(False); Order.objects.create(number=2)")
    failed = kernel.run("1/0")
    assert failed.ename == "ZeroDivisionError"
    assert quiet(failed)
    after = kernel.ok("Order.objects.count()")
    assert after.value() == 2 and quiet(after)
    assert committed(postgres_db) == [1]
    assert quiet(kernel.ok("transaction.commit()"))
    assert committed(postgres_db) == [1, 2]
    assert kernel.failed == 1


def test_open_atomic_block_survives_non_database_error(kernel, postgres_db):
    kernel.ok("Order.objects.create(number=1)")
    kernel.ok("a = transaction.atomic(); a.__enter__(); Order.objects.create(number=2)")
    failed = kernel.run("1/0")
    assert failed.ename == "ZeroDivisionError"
    assert quiet(failed)
    after = kernel.ok("Order.objects.count(), connection.in_atomic_block")
    assert after.value() == (2, True) and quiet(after)
    assert committed(postgres_db) == [1]
    assert quiet(kernel.ok("a.__exit__(None, None, None)"))
    assert committed(postgres_db) == [1, 2]
    assert kernel.failed == 1


def test_healthy_cells_show_nothing(kernel, postgres_db):
    cells = [
        kernel.ok("Order.objects.create(number=1)"),
        kernel.ok("Order.objects.count()"),
        kernel.ok(
            "transaction.set_autocommit(False)\n"
            "Order.objects.create(number=2)\n"
            "transaction.commit()\n"
            "transaction.set_autocommit(True)"
        ),
        kernel.ok("with transaction.atomic():\n    Order.objects.create(number=3)"),
        kernel.ok("a = transaction.atomic(); a.__enter__(); Order.objects.create(number=4)"),
        kernel.ok("Order.objects.count()"),
        kernel.ok("a.__exit__(None, None, None)"),
        kernel.ok("x = 1"),
    ]
    for cell in cells:
        assert quiet(cell), f"ipy_dbreset spoke after a healthy cell:\n{cell.code}\n{cell.shown}"
    assert committed(postgres_db) == [1, 2, 3, 4]


# -- leaving aborted manual transactions to the user ---------------------------------


def test_aborted_manual_transaction_left_to_user_when_asked(kernel, postgres_db):
    kernel.ok("%config DBReset.aborted_manual_transactions = 'leave'")
    kernel.ok("Order.objects.create(number=1)")
    kernel.ok("transaction.set_autocommit(False); Order.objects.create(number=2)")
    failed = kernel.run("Order.objects.create(number=1)")
    assert failed.ename == "IntegrityError"
    notice = only_notice(failed)
    assert "did not roll back db 'default': a failed statement aborted the transaction" in notice
    assert "run transaction.rollback() (or %dbreset) to continue" in notice
    status = kernel.ok("%dbstatus")
    assert "aborted" in status.texts[-1]  # not rolled back behind the user's back
    assert not status.notices
    assert quiet(kernel.ok("x = 1"))  # the hint is not repeated on every cell
    assert quiet(kernel.ok("transaction.rollback()"))
    after = kernel.ok("Order.objects.count()")
    assert after.value() == 1 and quiet(after)
    assert kernel.failed == 1
    assert committed(postgres_db) == [1]


TERMINATE_AT_THE_VERY_END = """
import psycopg2
transaction.set_autocommit(False)
Order.objects.create(number={number})
with connection.cursor() as cursor:
    cursor.execute("select pg_backend_pid()")
    (pid,) = cursor.fetchone()
settings = connection.settings_dict
dba = psycopg2.connect(
    host=settings["HOST"], port=settings["PORT"], user=settings["USER"], dbname="postgres"
)
dba.autocommit = True
with dba.cursor() as cursor:
    cursor.execute("select pg_terminate_backend(%s)", [pid])
    while True:
        cursor.execute("select 1 from pg_stat_activity where pid = %s", [pid])
        if not cursor.fetchone():
            break
dba.close()
"""


def test_cell_after_termination_at_the_very_end_of_a_cell_works(kernel, postgres_db):
    """The check may run between the server's FATAL message and its closing the socket."""
    for attempt in range(20):
        terminated = kernel.ok(TERMINATE_AT_THE_VERY_END.format(number=100 + attempt))
        after = kernel.ok("Order.objects.count()")
        said = terminated.notices + after.notices
        assert any("lost a manual transaction with" in n for n in said), said
        assert after.value() == 0
        kernel.ok("transaction.rollback(); transaction.set_autocommit(True)")
    assert kernel.failed == 0
