"""Recovery on SQLite in real kernels: never discard what can still be committed.

SQLite keeps a transaction usable after a failed statement, so an
``IntegrityError`` loses nothing but that statement: the writes before it
stay, and commit when the user commits.  What was committed is read back
from a separate sqlite3 connection.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable

    from harness import Cell, Kernel

pytestmark = [pytest.mark.kernel]

OPEN = {
    "manual transaction": "transaction.set_autocommit(False)",
    "atomic block": "a = transaction.atomic(); a.__enter__()",
}
COMMIT = {
    "manual transaction": "transaction.commit()",
    "atomic block": "a.__exit__(None, None, None)",
}


@pytest.fixture
def kernel(start_kernel: Callable[..., Kernel], sqlite_url: str) -> Kernel:
    """A kernel on a fresh, migrated SQLite file."""
    return start_kernel(sqlite_url)


def committed(sqlite_url: str) -> list[int]:
    """The order numbers committed in the file, as another connection sees them."""
    with closing(sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))) as db:
        return [n for (n,) in db.execute("select number from shop_order order by number")]


def quiet(cell: Cell) -> bool:
    """Whether ipy_dbreset showed nothing at all in this cell."""
    return (
        not cell.notices
        and "ipy_dbreset" not in cell.shown
        and not any("ipy-dbreset" in h for h in cell.htmls)
    )


def test_integrity_error_in_manual_transaction_keeps_earlier_writes(kernel, sqlite_url):
    kernel.ok("Order.objects.create(number=1)")
    kernel.ok("transaction.set_autocommit(False); Order.objects.create(number=2)")
    failed = kernel.run("Order.objects.create(number=1)")
    assert failed.ename == "IntegrityError"
    assert quiet(failed)  # nothing to repair: the transaction is still usable
    after = kernel.ok("sorted(Order.objects.values_list('number', flat=True))")
    assert after.value() == [1, 2] and quiet(after)
    assert committed(sqlite_url) == [1]
    kernel.ok("transaction.commit()")
    assert committed(sqlite_url) == [1, 2]
    assert kernel.failed == 1


def test_integrity_error_in_open_atomic_block_keeps_earlier_writes(kernel, sqlite_url):
    kernel.ok("Order.objects.create(number=1)")
    kernel.ok("a = transaction.atomic(); a.__enter__(); Order.objects.create(number=2)")
    failed = kernel.run("Order.objects.create(number=1)")
    assert failed.ename == "IntegrityError"
    assert len(failed.notices) == 1
    notice = failed.notices[0]
    assert notice == (
        "ipy_dbreset: cleared Django's rollback mark on db 'default': a query failed inside the "
        "atomic block; kept the block with 1 write (INSERT shop_order); "
        "%dbreset discards them"
    ), notice
    # Without the repair Django would refuse every query until the block is left.
    after = kernel.ok("sorted(Order.objects.values_list('number', flat=True))")
    assert after.value() == [1, 2] and quiet(after)
    assert kernel.ok("connection.in_atomic_block").value() is True
    assert committed(sqlite_url) == [1]
    kernel.ok("a.__exit__(None, None, None)")
    assert committed(sqlite_url) == [1, 2]
    assert kernel.ok("Order.objects.count()").value() == 2
    assert kernel.failed == 1


@pytest.mark.parametrize("kind", OPEN)
def test_open_transaction_survives_non_database_error(kernel, sqlite_url, kind):
    kernel.ok("Order.objects.create(number=1)")
    kernel.ok(f"{OPEN[kind]}; Order.objects.create(number=2)")
    failed = kernel.run("1/0")
    assert failed.ename == "ZeroDivisionError"
    assert quiet(failed)
    after = kernel.ok("Order.objects.count()")
    assert after.value() == 2 and quiet(after)
    assert committed(sqlite_url) == [1]
    assert quiet(kernel.ok(COMMIT[kind]))
    assert committed(sqlite_url) == [1, 2]
    assert kernel.failed == 1


def test_open_atomic_block_marked_without_a_query_is_repaired(kernel, sqlite_url):
    """An error that marks the block for rollback but runs no query is still seen."""
    kernel.ok("a = transaction.atomic(); a.__enter__(); Order.objects.create(number=1)")
    failed = kernel.run(
        "with transaction.mark_for_rollback_on_error():\n    raise ValueError('not the database')"
    )
    assert failed.ename == "ValueError"
    assert len(failed.notices) == 1 and "cleared Django's rollback mark" in failed.notices[0]
    after = kernel.ok("Order.objects.count()")
    assert after.value() == 1 and quiet(after)
    kernel.ok("a.__exit__(None, None, None)")
    assert committed(sqlite_url) == [1]
    assert kernel.failed == 1
