"""Read-only mode in real kernels: the server refuses every write, on every connection.

PostgreSQL with each driver, MariaDB and SQLite.  What the server holds is
read by another client, never through the kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from conftest import DRIVERS, mysql_admin, pg_admin

if TYPE_CHECKING:
    from collections.abc import Callable

    from harness import Kernel

pytestmark = pytest.mark.kernel

REFUSED = "read-only mode refused this write"
STORED = "select number from shop_order order by number"
CREATE = "Order.objects.create(number={n}, customer='x')"


def check_refuses_writes_everywhere(kernel: Kernel, stored: Callable[[], list[int]]) -> None:
    assert kernel.ok(CREATE.format(n=1))
    on = kernel.ok("%config DBReset.read_only = True")
    assert "read-only mode on" in on.shown, on.shown

    refused = kernel.run(CREATE.format(n=2))
    assert not refused.ok
    assert REFUSED in refused.shown, refused.shown
    assert "rolled back" not in refused.shown and "closed" not in refused.shown  # no repair
    assert kernel.ok("Order.objects.count()").value() == 1  # reads still work

    # A new connection, as after a repair or a server restart, is read-only too.
    kernel.ok("connection.close()")
    again = kernel.run(CREATE.format(n=3))
    assert not again.ok and REFUSED in again.shown, again.shown

    # The async ORM's thread has connections of its own.
    in_thread = kernel.run("await Order.objects.acreate(number=4, customer='x')")
    assert not in_thread.ok and REFUSED in in_thread.shown, in_thread.shown

    status = kernel.ok("%dbstatus")
    assert "read-only mode" in status.shown, status.shown

    off = kernel.ok("%config DBReset.read_only = False")
    assert "read-only mode off" in off.shown, off.shown
    kernel.ok(CREATE.format(n=5))
    kernel.ok("await Order.objects.acreate(number=6, customer='x')")
    assert stored() == [1, 5, 6]


@pytest.mark.postgres
@pytest.mark.parametrize("driver", DRIVERS)
def test_postgresql_refuses_writes_in_read_only_mode(
    start_kernel, postgres_url, postgres_db, driver
):
    kernel = start_kernel(postgres_url, driver)
    check_refuses_writes_everywhere(
        kernel,
        lambda: [
            n
            for (n,) in pg_admin(
                "select number from shop_order order by number", dbname=postgres_db
            )
        ],
    )


@pytest.mark.mysql
def test_mariadb_refuses_writes_in_read_only_mode(start_kernel, mysql_url, mysql_db):
    kernel = start_kernel(mysql_url)
    check_refuses_writes_everywhere(
        kernel,
        lambda: [
            n for (n,) in mysql_admin("select number from shop_order order by number", db=mysql_db)
        ],
    )


def test_sqlite_refuses_writes_in_read_only_mode(start_kernel, sqlite_url):
    import sqlite3

    kernel = start_kernel(sqlite_url)
    path = sqlite_url.removeprefix("sqlite:///")

    def stored() -> list[int]:
        with sqlite3.connect(path) as db:
            return [n for (n,) in db.execute(STORED)]

    check_refuses_writes_everywhere(kernel, stored)


def test_read_only_set_before_load_applies_from_the_first_query(start_kernel, sqlite_url):
    kernel = start_kernel(sqlite_url, load=False)
    kernel.ok("get_ipython().config.DBReset.read_only = True")  # as ipython_config.py does
    kernel.ok("%load_ext ipy_dbreset")
    refused = kernel.run(
        "from shop.models import Order\nOrder.objects.create(number=1, customer='x')"
    )
    assert not refused.ok and REFUSED in refused.shown, refused.shown
