"""What the notices and ``%dbstatus`` say, in a real kernel against the real servers.

A notice is read by someone who just saw a cell fail: one line per repair,
verb first, the connection marked as a database alias, what was lost by
statement kind and table, and what to expect next.  ``%dbstatus`` fits a
terminal; the long things sit under their row.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

import pytest

from conftest import (
    DRIVERS,
    terminate_backends,
    wait_until_disconnected,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from harness import Cell, Kernel

pytestmark = [pytest.mark.kernel, pytest.mark.postgres]

# Django's TIME_ZONE in these kernels: not the machine's, so that a time shown
# in the machine's local time can be told from one in Django's.
ZONE = {"IPY_DBRESET_DEMO_TIME_ZONE": "Pacific/Kiritimati"}  # UTC+14, the farthest from any


@pytest.fixture
def pg(start_kernel: Callable[..., Kernel], postgres_url: str) -> Kernel:
    """A kernel on PostgreSQL (psycopg 3 when installed), ``shop_order`` holding number 1."""
    kernel = start_kernel(postgres_url, DRIVERS[0], env=ZONE)
    kernel.ok("Order.objects.create(number=1)")
    return kernel


def only_notice(cell: Cell) -> str:
    assert len(cell.notices) == 1, f"expected one notice, got {cell.notices}\n{cell.shown}"
    return cell.notices[0]


def plain(notice: str) -> None:
    """No log-line habits: no ``(s)`` plurals, no repeated reason, no bare alias."""
    for line in notice.splitlines():
        assert line.startswith("ipy_dbreset: "), notice
        assert "(s)" not in line and "lost:" not in line, notice
        assert "db 'default'" in line or "db 'other'" in line, notice


def test_aborted_manual_transaction_names_the_writes_and_that_autocommit_is_off(pg):
    pg.ok("transaction.set_autocommit(False)\nOrder.objects.create(number=2)")
    pg.ok("Order.objects.create(number=3)")
    failed = pg.run("Order.objects.create(number=1)")
    assert failed.ename == "IntegrityError"
    notice = only_notice(failed)
    plain(notice)
    assert notice == (
        "ipy_dbreset: rolled back db 'default': a failed statement aborted the transaction; "
        "lost 2 unsaved writes (INSERT shop_order x2); "
        "autocommit is still off, so the next query opens a new transaction"
    )
    assert pg.ok("Order.objects.count()").value() == 1


def test_terminated_connection_in_an_atomic_block_says_what_went_with_it(pg, postgres_db):
    pg.ok(
        "a = transaction.atomic(); a.__enter__()\n"
        "Order.objects.create(number=2); Order.objects.filter(number=1).delete()"
    )
    assert terminate_backends(postgres_db) >= 1
    wait_until_disconnected(postgres_db)
    cell = pg.run("Order.objects.count()")
    notice = cell.notices[0]
    plain(notice)
    assert notice == (
        "ipy_dbreset: closed db 'default': the server closed the connection; "
        "lost an atomic block with 2 unsaved writes (INSERT shop_order, DELETE shop_order); "
        "the next query reconnects"
    )


def test_terminated_idle_connection_says_nothing_was_lost_in_one_short_line(pg, postgres_db):
    assert terminate_backends(postgres_db) >= 1
    wait_until_disconnected(postgres_db)
    cell = pg.ok("Order.objects.count()")
    assert cell.value() == 1
    notice = only_notice(cell)
    plain(notice)
    assert "db 'default': the server" in notice and "nothing was lost" in notice, notice
    assert len(notice) <= 115, notice  # about 100: one line in a terminal or a notebook


@pytest.mark.parametrize("driver", DRIVERS)
def test_cancelled_query_is_called_a_cancelled_query(start_kernel, postgres_url, driver):
    pg = start_kernel(postgres_url, driver, env=ZONE)
    pg.ok("Order.objects.create(number=1)")
    if driver == "psycopg2":  # otherwise psycopg2 waits for the server, deaf to the stop button
        pg.ok("%config DBReset.interruptible_psycopg2 = True")
    pg.ok("transaction.set_autocommit(False)\nOrder.objects.create(number=2)")
    query = "SELECT pg_sleep(30)"
    cell = pg.interrupt_during(f"connection.cursor().execute({query!r})", 1.0)
    assert cell.ename in ("KeyboardInterrupt", "OperationalError"), cell.shown
    notice = only_notice(cell)
    plain(notice)
    assert "a cancelled query aborted the transaction" in notice, notice
    assert "failed statement" not in notice, notice
    assert "lost 1 unsaved write (INSERT shop_order)" in notice, notice
    assert pg.ok("Order.objects.count()").value() == 1


def test_unwound_inner_block_counts_blocks_and_names_both_sides(pg):
    pg.ok("outer = transaction.atomic(); outer.__enter__(); Order.objects.create(number=2)")
    pg.ok("inner = transaction.atomic(); inner.__enter__(); Order.objects.create(number=3)")
    failed = pg.run("Order.objects.create(number=1)")
    assert failed.ename == "IntegrityError"
    notice = only_notice(failed)
    plain(notice)
    assert notice == (
        "ipy_dbreset: rolled back the inner atomic block on db 'default': "
        "a failed statement aborted the transaction; "
        "lost 1 unsaved write (INSERT shop_order); "
        "kept the outer block with 1 write (INSERT shop_order)"
    )
    pg.ok("outer.__exit__(None, None, None)")
    assert pg.ok("Order.objects.count()").value() == 2


def test_several_repairs_in_one_check_are_one_line_each(
    start_kernel: Callable[..., Kernel], postgres_url: str, postgres_db: str
):
    kernel = start_kernel(postgres_url, env={**ZONE, "IPY_DBRESET_DEMO_OTHER": postgres_url})
    kernel.ok("from django.db import connections")
    kernel.ok("transaction.set_autocommit(False); Order.objects.create(number=7)")
    kernel.ok("connections['other'].ensure_connection()")
    assert terminate_backends(postgres_db) >= 2
    wait_until_disconnected(postgres_db)
    cell = kernel.ok("Order.objects.count()")
    notice = only_notice(cell)
    plain(notice)
    lines = sorted(notice.splitlines())  # in the order the connections were opened
    assert len(lines) == 2, notice
    assert lines[0].startswith("ipy_dbreset: closed db 'default': the server closed"), notice
    assert "lost a manual transaction with 1 unsaved write (INSERT shop_order)" in lines[0]
    assert "reconnects with autocommit off, as you had it" in lines[0]
    assert lines[1].startswith("ipy_dbreset: closed db 'other': the server closed"), notice
    assert "nothing was lost" in lines[1]
    # In a notebook: the same lines in one styled block, each its own line.
    html = cell.htmls[0]
    assert html.count("text-indent") == 2 and "border-left" in html, html


def test_dbstatus_fits_a_terminal_and_puts_the_last_repair_under_its_row(pg, postgres_db):
    pg.ok("transaction.set_autocommit(False)\nOrder.objects.create(number=2)")
    failed = pg.run("Order.objects.create(number=1)")
    assert failed.ename == "IntegrityError"
    pg.ok("Order.objects.create(number=3)")
    table = pg.ok("status = %dbstatus\nprint(status)").stdout
    lines = table.splitlines()
    header, rule, row, detail = lines[:4]
    assert header.split() == ["alias", "driver", "database", "server", "pid", "state"], table
    assert set(rule) <= {"-", " "}
    # A typical row: the test database's generated name is longer than a real one's.
    extra = len(postgres_db) - len("shop")
    assert max(len(header), len(row)) - extra <= 100, table
    assert row.startswith("default") and DRIVERS[0] in row, table
    assert re.search(r"\s\d+\s+manual transaction: 1 write, open (\d+|under 1) s$", row), table
    # The last repair, in the machine's local time (not Django's TIME_ZONE, far from it).
    found = re.fullmatch(
        r"    last repair at (\d\d:\d\d:\d\d), rolled back db 'default': (.*)", detail
    )
    assert found, table
    assert "lost 1 unsaved write (INSERT shop_order)" in found.group(2), table
    shown = datetime.strptime(found.group(1), "%H:%M:%S").time()
    now = datetime.now(timezone.utc).astimezone()  # this process: the machine's zone
    near = [(now - timedelta(seconds=s)).time().replace(microsecond=0) for s in range(120)]
    assert shown in near, (shown, now)
    assert "\nevery connection's keepalive: on, after" in table, table
    assert "connected" not in header and "last repair" not in header

    # In a notebook the repair is a row spanning every column: no column squeezed.
    html = pg.ok("status").htmls[-1]
    assert "colspan='5'" in html and "last repair" in html, html
    assert "var(--jp-content-font-color2" in html


def test_dbstatus_names_the_driver_before_connecting(start_kernel, postgres_url):
    kernel = start_kernel(postgres_url, DRIVERS[0], env=ZONE)
    kernel.ok("connection.close()")
    table = kernel.ok("status = %dbstatus\nprint(status)").stdout
    row = table.splitlines()[2]
    assert row.split()[:2] == ["default", DRIVERS[0]], table
    assert row.endswith("not connected"), table


def test_dbstatus_history_lists_the_sessions_repairs_newest_first(pg, postgres_db):
    pg.ok("a = transaction.atomic(); a.__enter__(); Order.objects.create(number=2)")
    assert terminate_backends(postgres_db) >= 1
    wait_until_disconnected(postgres_db)
    pg.ok("Order.objects.count()")
    pg.ok("transaction.set_autocommit(False); Order.objects.create(number=3)")
    pg.ok("%dbreset")
    history = pg.ok("h = %dbstatus --history\nprint(h)").stdout
    lines = history.splitlines()
    assert lines[0].split() == ["time", "alias", "done"], history
    assert len(lines) == 6, history  # header, rule, two repairs with a line under each
    newest, why_newest, oldest, why_oldest = lines[2:]
    assert re.fullmatch(r"\d\d:\d\d:\d\d  default\s+reset", newest), history
    rolled_back = "    rolled back a manual transaction with 1 unsaved write"
    assert why_newest.startswith(rolled_back), history
    assert re.fullmatch(r"\d\d:\d\d:\d\d  default\s+closed", oldest), history
    lost = "    the server closed the connection; lost an atomic block with 1 "
    assert why_oldest.startswith(lost), history
    assert "unsaved write (INSERT shop_order)" in why_oldest, history
