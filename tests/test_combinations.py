"""Faults in combinations of transaction states, as a user at a notebook mixes them.

Manual transactions with atomic blocks left open inside them, nested blocks
with and without savepoints, the user's own savepoints, pending ``on_commit``
callbacks; then a failed statement, a cancelled query or a dead connection.
Each test checks what the notice said against what the server holds after
the user commits, read from a separate admin connection, and that no
callback of the extension raised.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import closing
from typing import TYPE_CHECKING

import pytest

from conftest import (
    DRIVERS,
    mysql_admin,
    pg_admin,
    terminate_backends,
    wait_until_disconnected,
    wait_until_mysql_gone,
    wait_until_running,
)
from harness import run

if TYPE_CHECKING:
    from collections.abc import Callable

    from harness import Cell, Kernel

pytestmark = [pytest.mark.kernel]

# A callback the user registers with transaction.on_commit: it says when it runs.
CALLBACK = "def said(what):\n    return lambda: print('ON_COMMIT', what)\n"


@pytest.fixture
def pg(start_kernel: Callable[..., Kernel], postgres_url: str, driver: str) -> Kernel:
    """A kernel on the session's PostgreSQL database (``shop_order`` empty)."""
    kernel = start_kernel(postgres_url, driver)
    kernel.ok(CALLBACK)
    return kernel


@pytest.fixture
def lite(start_kernel: Callable[..., Kernel], sqlite_url: str) -> Kernel:
    """A kernel on a fresh, migrated SQLite file."""
    kernel = start_kernel(sqlite_url)
    kernel.ok(CALLBACK)
    return kernel


def on_server(dbname: str) -> list[int]:
    """The order numbers committed in ``dbname``, as another client sees them."""
    return [n for (n,) in pg_admin("select number from shop_order order by number", dbname=dbname)]


def in_file(sqlite_url: str) -> list[int]:
    with closing(sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))) as db:
        return [n for (n,) in db.execute("select number from shop_order order by number")]


def terminate(dbname: str) -> None:
    """Terminate the kernel's backend as a DBA would, and wait until it is gone."""
    assert terminate_backends(dbname) >= 1
    wait_until_disconnected(dbname)


def no_callback_error(kernel: Kernel) -> None:
    """No callback of the extension raised in any cell so far."""
    for cell in kernel.cells:
        assert "Error in callback" not in cell.shown, f"{cell.code}\n{cell.shown}"


def notice(cell: Cell) -> str:
    """The one line ipy_dbreset showed in this cell."""
    assert len(cell.notices) == 1, f"expected one notice, got {cell.notices}\n{cell.shown}"
    return cell.notices[0]


def never_ran(kernel: Kernel) -> None:
    """No on_commit callback of a rolled-back transaction ran, in any cell."""
    for cell in kernel.cells:
        assert "ON_COMMIT lost" not in cell.shown, f"{cell.code}\n{cell.shown}"


MANUAL_AND_BLOCK = (
    "transaction.set_autocommit(False)\n"
    "Order.objects.create(number=1)\n"
    "a = transaction.atomic(); a.__enter__()\n"
    "Order.objects.create(number=2)\n"
    "transaction.on_commit(said('lost'))\n"
)


# -- the connection dies inside an atomic block of a manual transaction -----------


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.postgres
def test_cell_after_connection_died_in_atomic_block_of_manual_transaction_works(pg, postgres_db):
    pg.ok(MANUAL_AND_BLOCK)
    terminate(postgres_db)
    cell = pg.ok("pass")
    said = notice(cell)
    assert said == (
        "ipy_dbreset: closed db 'default': the server closed the connection; lost a manual "
        "transaction and an atomic block with 2 unsaved writes (INSERT shop_order x2); "
        "1 on_commit callback dropped; "
        "the next query reconnects with autocommit off, as you had it"
    ), said
    state = "connection.in_atomic_block, transaction.get_autocommit(), Order.objects.count()"
    assert pg.ok(state).value() == (False, False, 0)
    pg.ok("transaction.rollback()")
    pg.ok("Order.objects.create(number=3); transaction.commit()")
    assert on_server(postgres_db) == [3]
    reset = pg.ok("%dbreset")
    assert "reset db 'default'" in notice(reset)
    assert pg.ok("Order.objects.count()").value() == 1
    assert pg.failed == 0
    no_callback_error(pg)
    never_ran(pg)


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.postgres
def test_a_dead_connection_says_the_users_savepoints_went_with_it(pg, postgres_db):
    pg.ok("transaction.set_autocommit(False); Order.objects.create(number=1)")
    pg.ok("first = transaction.savepoint(); Order.objects.create(number=2)")
    pg.ok("second = transaction.savepoint()")
    first, second = pg.ok("first, second").value()
    terminate(postgres_db)
    said = notice(pg.ok("pass"))
    assert "lost a manual transaction with 2 unsaved writes (INSERT shop_order x2)" in said, said
    assert f"your savepoints {first!r}, {second!r} went with it" in said, said
    pg.ok("Order.objects.create(number=3); transaction.commit()")
    assert on_server(postgres_db) == [3]
    assert pg.failed == 0
    no_callback_error(pg)


DIE_MID_CELL = """
import psycopg2
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
Order.objects.create(number=9)
"""


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.postgres
def test_cell_after_connection_died_mid_cell_in_nested_blocks_of_manual_transaction_works(
    pg, postgres_db
):
    pg.ok(MANUAL_AND_BLOCK)
    pg.ok("b = transaction.atomic(savepoint=False); b.__enter__(); Order.objects.create(number=3)")
    failed = pg.run(DIE_MID_CELL)
    assert failed.ename in ("OperationalError", "InterfaceError"), failed.shown
    said = notice(failed)
    assert "lost a manual transaction and 2 nested atomic blocks with 3 unsaved writes" in said
    assert "1 on_commit callback dropped" in said
    assert "the next query reconnects with autocommit off, as you had it" in said
    after = pg.ok("Order.objects.count(), connection.in_atomic_block")
    assert after.value() == (0, False)
    assert not after.notices
    pg.ok("Order.objects.create(number=4); transaction.commit()")
    assert on_server(postgres_db) == [4]
    assert pg.failed == 1
    no_callback_error(pg)
    never_ran(pg)


# -- a failed statement loses only what came after the innermost usable point ------


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.postgres
def test_failed_statement_in_atomic_block_keeps_the_manual_transactions_writes(pg, postgres_db):
    pg.ok("Order.objects.create(number=100)")
    pg.ok("transaction.set_autocommit(False); Order.objects.create(number=1)")
    pg.ok("Order.objects.create(number=2)")
    pg.ok("a = transaction.atomic(); a.__enter__(); Order.objects.create(number=3)")
    pg.ok("transaction.on_commit(said('lost'))")
    failed = pg.run("Order.objects.create(number=100)")
    assert failed.ename == "IntegrityError"
    assert notice(failed) == (
        "ipy_dbreset: rolled back the atomic block on db 'default': a failed statement aborted "
        "the transaction; lost 1 unsaved write (INSERT shop_order); kept the manual "
        "transaction with 2 writes (INSERT shop_order x2); 1 on_commit callback dropped"
    )
    pg.ok("transaction.commit()")
    assert on_server(postgres_db) == [1, 2, 100]
    assert pg.ok("transaction.get_autocommit()").value() is False
    assert pg.failed == 1
    no_callback_error(pg)
    never_ran(pg)


def interrupt_when_running(kernel: Kernel, dbname: str, query: str) -> Cell:
    """Run ``query`` in a cell and press the stop button once the server runs it."""

    def press() -> None:
        wait_until_running(dbname, query)
        kernel.manager.interrupt_kernel()

    pressing = threading.Thread(target=press)
    pressing.start()
    try:
        return kernel.run(f"connection.cursor().execute({query!r})")
    finally:
        pressing.join()


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.postgres
def test_cancelled_query_in_atomic_block_keeps_the_manual_transactions_writes(
    pg, postgres_db, driver
):
    if driver == "psycopg2":  # which the stop button cannot interrupt otherwise
        pg.ok("%config DBReset.interruptible_psycopg2 = True")
    pg.ok("transaction.set_autocommit(False); Order.objects.create(number=1)")
    pg.ok("Order.objects.create(number=2)")
    pg.ok("a = transaction.atomic(); a.__enter__(); Order.objects.create(number=3)")
    cancelled = interrupt_when_running(pg, postgres_db, "select pg_sleep(30)")
    assert cancelled.ename in ("KeyboardInterrupt", "OperationalError"), cancelled.shown
    said = [n for n in cancelled.notices if "rolled back" in n]
    assert len(said) == 1, cancelled.shown
    assert "rolled back the atomic block on db 'default': a cancelled query aborted" in said[0]
    assert (
        "lost 1 unsaved write (INSERT shop_order); kept the manual transaction with 2 writes"
        in (said[0])
    )
    pg.ok("transaction.commit()")
    assert on_server(postgres_db) == [1, 2]
    no_callback_error(pg)


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.postgres
def test_failed_statement_after_the_users_savepoint_keeps_the_writes_before_it(pg, postgres_db):
    pg.ok("Order.objects.create(number=100)")
    pg.ok("transaction.set_autocommit(False); Order.objects.create(number=1)")
    pg.ok("sid = transaction.savepoint(); Order.objects.create(number=2)")
    failed = pg.run("Order.objects.create(number=100)")
    assert failed.ename == "IntegrityError"
    sid = pg.ok("sid").value()
    assert notice(failed) == (
        f"ipy_dbreset: rolled back to your savepoint {sid!r} on db 'default': a failed "
        "statement aborted the transaction; lost 1 unsaved write (INSERT shop_order); kept what "
        "came before it with 1 write (INSERT shop_order); the savepoint stays, for "
        "savepoint_rollback() or savepoint_commit()"
    )
    # The user's own plan still works: back to the savepoint, then commit.
    pg.ok("transaction.savepoint_rollback(sid)")
    pg.ok("Order.objects.create(number=3); transaction.savepoint_commit(sid)")
    pg.ok("transaction.commit()")
    assert on_server(postgres_db) == [1, 3, 100]
    assert pg.failed == 1
    no_callback_error(pg)


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.postgres
def test_the_users_savepoint_inside_an_atomic_block_keeps_the_block_open(pg, postgres_db):
    pg.ok("Order.objects.create(number=100)")
    pg.ok("a = transaction.atomic(); a.__enter__(); Order.objects.create(number=1)")
    pg.ok("transaction.on_commit(said('kept'))")
    pg.ok("sid = transaction.savepoint(); Order.objects.create(number=2)")
    failed = pg.run("Order.objects.create(number=100)")
    assert failed.ename == "IntegrityError"
    said = notice(failed)
    assert "rolled back to your savepoint" in said, said
    assert "lost 1 unsaved write (INSERT shop_order); kept what came before it with 1 write" in said
    assert pg.ok("connection.in_atomic_block, connection.needs_rollback").value() == (True, False)
    pg.ok("Order.objects.create(number=3)")
    ran = pg.ok("a.__exit__(None, None, None)")
    assert "ON_COMMIT kept" in ran.stdout  # the callback of the kept work runs on commit
    assert on_server(postgres_db) == [1, 3, 100]
    assert pg.failed == 1
    no_callback_error(pg)


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.postgres
def test_failed_statements_in_nested_blocks_roll_back_one_savepoint_level_at_a_time(
    pg, postgres_db
):
    pg.ok("Order.objects.create(number=100)")
    pg.ok("transaction.set_autocommit(False); Order.objects.create(number=1)")
    pg.ok("a = transaction.atomic(); a.__enter__(); Order.objects.create(number=2)")
    pg.ok("transaction.on_commit(said('lost'))")
    pg.ok("b = transaction.atomic(savepoint=False); b.__enter__(); Order.objects.create(number=3)")
    pg.ok("c = transaction.atomic(); c.__enter__(); Order.objects.create(number=4)")
    pg.ok("transaction.on_commit(said('lost')); transaction.on_commit(said('lost'))")
    # A failure in c: c's savepoint is the innermost point; a and b stay open.
    first = pg.run("Order.objects.create(number=100)")
    assert first.ename == "IntegrityError"
    said = notice(first)
    assert "rolled back the inner atomic block on db 'default'" in said, said
    assert (
        "lost 1 unsaved write (INSERT shop_order); kept the manual transaction and 2 outer " in said
    )
    assert "with 3 writes (INSERT shop_order x3); 2 on_commit callbacks dropped" in said
    assert pg.ok("len(connection.atomic_blocks)").value() == 2
    # A failure in b, which has no savepoint of its own: back to a's.
    second = pg.run("Order.objects.create(number=100)")
    assert second.ename == "IntegrityError"
    said = notice(second)
    assert "rolled back 2 inner atomic blocks on db 'default'" not in said, said
    assert "rolled back 2 atomic blocks on db 'default'" in said, said
    assert (
        "lost 2 unsaved writes (INSERT shop_order x2); kept the manual transaction with 1" in said
    )
    assert "1 on_commit callback dropped" in said
    assert pg.ok("connection.in_atomic_block").value() is False
    pg.ok("transaction.commit()")
    assert on_server(postgres_db) == [1, 100]
    assert pg.failed == 2
    no_callback_error(pg)
    never_ran(pg)


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.postgres
def test_failed_statement_in_autocommit_atomic_blocks_drops_only_the_inner_callbacks(
    pg, postgres_db
):
    pg.ok("Order.objects.create(number=100)")
    pg.ok("a = transaction.atomic(); a.__enter__(); Order.objects.create(number=1)")
    pg.ok("transaction.on_commit(said('kept'))")
    pg.ok("b = transaction.atomic(); b.__enter__(); Order.objects.create(number=2)")
    pg.ok("transaction.on_commit(said('lost'))")
    failed = pg.run("Order.objects.create(number=100)")
    said = notice(failed)
    assert "kept the outer block with 1 write (INSERT shop_order)" in said, said
    assert "1 on_commit callback dropped" in said, said
    ran = pg.ok("a.__exit__(None, None, None)")
    assert "ON_COMMIT kept" in ran.stdout
    assert on_server(postgres_db) == [1, 100]
    no_callback_error(pg)
    never_ran(pg)


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.postgres
def test_failed_statement_in_a_block_without_savepoint_loses_the_whole_manual_transaction(
    pg, postgres_db
):
    pg.ok("Order.objects.create(number=100)")
    pg.ok("transaction.set_autocommit(False); Order.objects.create(number=1)")
    pg.ok("b = transaction.atomic(savepoint=False); b.__enter__(); Order.objects.create(number=2)")
    failed = pg.run("Order.objects.create(number=100)")
    assert failed.ename == "IntegrityError"
    assert notice(failed) == (
        "ipy_dbreset: rolled back db 'default': a failed statement aborted the transaction; "
        "lost the manual transaction and the atomic block with 2 unsaved writes "
        "(INSERT shop_order x2); autocommit is still off, so the next query opens a new "
        "transaction"
    )
    assert pg.ok("connection.in_atomic_block, transaction.get_autocommit()").value() == (
        False,
        False,
    )
    pg.ok("Order.objects.create(number=3); transaction.commit()")
    assert on_server(postgres_db) == [3, 100]
    no_callback_error(pg)


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.postgres
def test_aborted_manual_transaction_left_to_the_user_names_their_savepoint(pg, postgres_db):
    pg.ok("%config DBReset.aborted_manual_transactions = 'leave'")
    pg.ok("Order.objects.create(number=100)")
    pg.ok("transaction.set_autocommit(False); Order.objects.create(number=1)")
    pg.ok("sid = transaction.savepoint(); Order.objects.create(number=2)")
    failed = pg.run("Order.objects.create(number=100)")
    said = notice(failed)
    assert "did not roll back db 'default'" in said, said
    hint = "run transaction.savepoint_rollback() to your savepoint, or transaction.rollback()"
    assert hint in said, said
    pg.ok("transaction.savepoint_rollback(sid); transaction.commit()")
    assert on_server(postgres_db) == [1, 100]
    no_callback_error(pg)


# -- %dbreset in these states ------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.postgres
def test_dbreset_rolls_back_a_manual_transaction_with_blocks_and_savepoints(pg, postgres_db):
    pg.ok(MANUAL_AND_BLOCK)
    pg.ok("sid = transaction.savepoint(); Order.objects.create(number=3)")
    pg.ok("b = transaction.atomic(savepoint=False); b.__enter__()")
    sid = pg.ok("sid").value()
    reset = pg.ok("%dbreset")
    assert notice(reset) == (
        "ipy_dbreset: reset db 'default': rolled back a manual transaction and 2 nested atomic "
        "blocks with 3 unsaved writes (INSERT shop_order x3); 1 on_commit callback dropped; "
        f"your savepoint {sid!r} went with it; "
        "the next query reconnects with autocommit off, as you had it"
    )
    state = "connection.in_atomic_block, transaction.get_autocommit(), Order.objects.count()"
    assert pg.ok(state).value() == (False, False, 0)
    pg.ok("Order.objects.create(number=4); transaction.commit()")
    assert on_server(postgres_db) == [4]
    assert pg.failed == 0
    no_callback_error(pg)
    never_ran(pg)


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.postgres
def test_dbreset_after_a_failed_statement_in_a_block_of_a_manual_transaction(pg, postgres_db):
    pg.ok("Order.objects.create(number=100)")
    pg.ok("%config DBReset.auto_repair = False")
    pg.ok(MANUAL_AND_BLOCK)
    assert pg.run("Order.objects.create(number=100)").ename == "IntegrityError"
    reset = pg.ok("%dbreset")
    assert notice(reset) == (
        "ipy_dbreset: reset db 'default': rolled back a manual transaction and an atomic block "
        "with 2 unsaved writes (INSERT shop_order x2); 1 on_commit callback dropped; "
        "the next query reconnects with autocommit off, as you had it"
    )
    pg.ok("Order.objects.create(number=4); transaction.commit()")
    assert on_server(postgres_db) == [4, 100]
    no_callback_error(pg)
    never_ran(pg)


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.postgres
def test_dbreset_after_the_connection_died_in_a_block_of_a_manual_transaction(pg, postgres_db):
    pg.ok("%config DBReset.auto_repair = False")
    pg.ok(MANUAL_AND_BLOCK)
    terminate(postgres_db)
    reset = pg.ok("%dbreset")
    said = notice(reset)
    assert said.startswith(
        "ipy_dbreset: reset db 'default': rolled back a manual transaction and "
        "an atomic block with 2 unsaved writes"
    ), said
    assert "1 on_commit callback dropped" in said, said
    state = "connection.in_atomic_block, transaction.get_autocommit(), Order.objects.count()"
    assert pg.ok(state).value() == (False, False, 0)
    pg.ok("Order.objects.create(number=4); transaction.commit()")
    assert on_server(postgres_db) == [4]
    assert pg.failed == 0
    no_callback_error(pg)
    never_ran(pg)


# -- SQLite: nothing is aborted, and the connection can still be lost ---------------


def test_sqlite_failed_statement_after_the_users_savepoint_keeps_everything(lite, sqlite_url):
    lite.ok("Order.objects.create(number=100)")
    lite.ok("a = transaction.atomic(); a.__enter__(); Order.objects.create(number=1)")
    lite.ok("sid = transaction.savepoint(); Order.objects.create(number=2)")
    failed = lite.run("Order.objects.create(number=100)")
    assert failed.ename == "IntegrityError"
    assert "kept the block with 2 writes (INSERT shop_order x2)" in notice(failed)
    # SQLite kept the transaction usable: the user's savepoint is theirs to roll back to.
    lite.ok("transaction.savepoint_rollback(sid)")
    lite.ok("a.__exit__(None, None, None)")
    assert in_file(sqlite_url) == [1, 100]
    no_callback_error(lite)


def test_sqlite_dbreset_in_an_atomic_block_of_a_manual_transaction_says_what_it_rolled_back(
    lite, sqlite_url
):
    lite.ok(MANUAL_AND_BLOCK)
    lite.ok("b = transaction.atomic(); b.__enter__(); Order.objects.create(number=3)")
    reset = lite.ok("%dbreset")
    assert notice(reset) == (
        "ipy_dbreset: reset db 'default': rolled back a manual transaction and 2 nested atomic "
        "blocks with 3 unsaved writes (INSERT shop_order x3); 1 on_commit callback dropped; "
        "the next query reconnects with autocommit off, as you had it"
    )
    state = "connection.in_atomic_block, transaction.get_autocommit(), Order.objects.count()"
    assert lite.ok(state).value() == (False, False, 0)
    lite.ok("Order.objects.create(number=4); transaction.commit()")
    assert in_file(sqlite_url) == [4]
    assert lite.failed == 0
    no_callback_error(lite)
    never_ran(lite)


# -- MariaDB: the same dead connection -------------------------------------------------


@pytest.mark.mysql
def test_mysql_cell_after_kill_in_atomic_block_of_manual_transaction_works(
    start_kernel, mysql_url, mysql_db
):
    kernel = start_kernel(mysql_url)
    kernel.ok(CALLBACK)
    kernel.ok(MANUAL_AND_BLOCK)
    thread = int(kernel.ok("connection.connection.thread_id()").value())
    mysql_admin(f"KILL {thread}")
    wait_until_mysql_gone(thread)
    cell = kernel.ok("Order.objects.count(), connection.in_atomic_block")
    assert cell.value() == (0, False)
    said = " ".join(cell.notices)
    assert "lost a manual transaction and an atomic block with 2 unsaved writes" in said, said
    kernel.ok("Order.objects.create(number=3); transaction.commit()")
    assert [n for (n,) in mysql_admin("select number from shop_order", db=mysql_db)] == [3]
    assert kernel.failed == 0
    no_callback_error(kernel)
    never_ran(kernel)


# -- the model itself, in this process -----------------------------------------------


def test_the_model_lists_every_savepoint_innermost_first_with_the_blocks_to_leave(shell):
    from ipy_dbreset.transactions import Point, state_of

    cells = [
        "outer = transaction.atomic(); outer.__enter__()",
        "mine = transaction.savepoint()",
        "inner = transaction.atomic(); inner.__enter__()",
        "bare = transaction.atomic(savepoint=False); bare.__enter__()",
        "last = transaction.savepoint()",
        "state = state_of(connection)",
    ]
    shell.user_ns["state_of"] = state_of
    for code in cells:
        assert run(shell, code).ok, code
    ns = shell.user_ns
    state = ns["state"]
    django = ns["connection"].savepoint_ids[0]
    assert state.points() == (Point(ns["last"], 0), Point(django, 2), Point(ns["mine"], 0))
    assert state.users_savepoints == (ns["mine"], ns["last"])
    assert (state.blocks, state.manual, state.in_transaction) == (3, False, True)
    for code in ("bare.__exit__(None, None, None)", "inner.__exit__(None, None, None)"):
        assert run(shell, code).ok, code
    # Leaving the inner block released its savepoint, and with it the user's last one.
    assert state_of(ns["connection"]).points() == (Point(ns["mine"], 0),)
    assert run(shell, "outer.__exit__(None, None, None)").ok


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.postgres
def test_a_block_whose_connection_died_in_it_is_not_called_your_savepoint(pg, postgres_db):
    """Django's own savepoint of an atomic block is no savepoint of the user's.

    The connection dies inside the block: the block's exit fails to roll back
    to its savepoint, and pops it from Django's list all the same.
    """
    pg.ok("transaction.set_autocommit(False); Order.objects.create(number=1)")
    cell = pg.run(
        "with transaction.atomic():\n"
        "    Order.objects.create(number=2)\n"
        "    connection.cursor().execute('select pg_terminate_backend(pg_backend_pid())')\n"
    )
    assert cell.ename in {"OperationalError", "InterfaceError"}, cell.shown
    said = notice(cell)
    assert "lost a manual transaction" in said and "savepoint" not in said, said
    assert pg.ok("Order.objects.count()").value() == 0
    no_callback_error(pg)
