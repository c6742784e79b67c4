"""Connections owned by other threads recover too: the async ORM's and worker threads'."""

from __future__ import annotations

import pytest

from conftest import (
    DRIVERS,
    pg_admin,
    pg_sessions,
    terminate_backends,
    wait_for,
    wait_until_disconnected,
)

pytestmark = [pytest.mark.kernel, pytest.mark.postgres]

WORKER = """
from concurrent.futures import ThreadPoolExecutor
pool = ThreadPoolExecutor(1, thread_name_prefix="worker")
def count():
    return Order.objects.count()
"""

BUSY_WORKER = (
    WORKER
    + """
import threading
from django.db import transaction
holding, go = threading.Event(), threading.Event()
def hold_transaction():
    # A worker in the middle of its own transaction, between two queries.
    with transaction.atomic():
        Order.objects.create(number=7)
        holding.set()
        go.wait(30)
        Order.objects.create(number=8)
job = pool.submit(hold_transaction)
holding.wait(30)
"""
)
# The worker is inside its transaction, and still there (not done, not failed).
WORKER_BUSY = "holding.wait(30) and not job.done()"


def worker_in_transaction(dbname: str) -> int:
    """The pid of the one session on ``dbname`` that is idle inside a transaction."""
    pids = [pid for pid, state, _ in pg_sessions(dbname) if state == "idle in transaction"]
    assert len(pids) == 1, pg_sessions(dbname)
    return pids[0]


# The async ORM runs in asgiref's single-thread executor; an atomic block left
# open there stays open between cells, as one left open in the shell's thread.
ASYNC_BLOCK = """
from asgiref.sync import sync_to_async
def open_block():
    global block
    block = transaction.atomic()
    block.__enter__()
    Order.objects.create(number=1)
def close_block():
    block.__exit__(None, None, None)
def backend_pid():
    with connection.cursor() as cursor:
        cursor.execute("select pg_backend_pid()")
        return cursor.fetchone()[0]
"""
EXECUTOR = "db 'default' (thread ThreadPoolExecutor-"


def sleeping(dbname: str) -> bool:
    rows = pg_admin(
        "select 1 from pg_stat_activity where datname = %s and state = 'active'"
        " and query like 'select pg_sleep%%'",
        (dbname,),
    )
    return bool(rows)


def committed(dbname: str) -> list[int]:
    return [n for (n,) in pg_admin("select number from shop_order order by number", dbname=dbname)]


@pytest.mark.parametrize("driver", DRIVERS)
def test_async_orm_atomic_block_after_terminated_backend_is_repaired(
    start_kernel, postgres_url, postgres_db, driver
):
    kernel = start_kernel(postgres_url, driver)
    kernel.ok(ASYNC_BLOCK)
    kernel.ok("await sync_to_async(open_block)()")
    assert terminate_backends(postgres_db) >= 2  # the shell's and the executor's
    wait_until_disconnected(postgres_db)
    cell = kernel.ok("await Order.objects.acount()")
    assert cell.value() == 0  # the block's row went with the server's session
    assert any(
        f"closed {EXECUTOR}" in n and "lost an atomic block with 1 unsaved write" in n
        for n in cell.notices
    ), cell.notices
    cell = kernel.ok("await Order.objects.acount()")
    assert cell.value() == 0
    assert cell.notices == []
    assert kernel.ok("Order.objects.count()").value() == 0
    assert kernel.failed == 0


@pytest.mark.parametrize("driver", DRIVERS)
def test_async_orm_atomic_block_after_duplicate_key_is_repaired(
    start_kernel, postgres_url, postgres_db, driver
):
    kernel = start_kernel(postgres_url, driver)
    kernel.ok(ASYNC_BLOCK)
    kernel.ok("await sync_to_async(open_block)()")
    failed = kernel.run("await Order.objects.acreate(number=1)")
    assert failed.ename == "IntegrityError"
    cell = kernel.ok("await Order.objects.acount()")
    assert cell.value() == 0
    # Said after the failing cell, or before the next one if the executor was
    # still on its way back to waiting for work when the first check ran.
    notices = failed.notices + cell.notices
    assert any(
        f"rolled back {EXECUTOR}" in n and "lost the atomic block with 1 unsaved write" in n
        for n in notices
    ), notices
    assert (
        kernel.ok("await Order.objects.acreate(number=2); await Order.objects.acount()").value()
        == 1
    )
    assert committed(postgres_db) == [2]


@pytest.mark.parametrize("driver", DRIVERS)
def test_healthy_atomic_block_in_async_orm_thread_survives_an_error(
    start_kernel, postgres_url, postgres_db, driver
):
    """Nothing is lost that could still be committed, in the executor's thread too."""
    kernel = start_kernel(postgres_url, driver)
    kernel.ok(ASYNC_BLOCK)
    kernel.ok("await sync_to_async(open_block)()")
    failed = kernel.run("1/0")
    assert failed.ename == "ZeroDivisionError"
    cell = kernel.ok("await Order.objects.acount()")
    assert cell.value() == 1  # its own uncommitted row, in its still open block
    assert failed.notices == cell.notices == []
    kernel.ok("await sync_to_async(close_block)()")
    assert committed(postgres_db) == [1]


@pytest.mark.parametrize("driver", DRIVERS)
def test_dbreset_resets_async_orm_thread_and_names_busy_worker(
    start_kernel, postgres_url, postgres_db, driver
):
    kernel = start_kernel(postgres_url, driver)
    kernel.ok(ASYNC_BLOCK + WORKER)
    kernel.ok("await sync_to_async(open_block)()")
    kernel.ok(
        "def nap():\n"
        "    with connection.cursor() as cursor:\n"
        "        cursor.execute('select pg_sleep(60)')\n"
        "job = pool.submit(nap)"
    )
    wait_for(lambda: sleeping(postgres_db), "sleeping")
    cell = kernel.ok("result = %dbreset")
    [notice] = cell.notices
    assert f"reset {EXECUTOR}0_0): rolled back an atomic block with 1 unsaved write" in notice
    assert "left, in use by their thread: db 'default' (thread worker_0)" in notice
    assert kernel.ok("result.left").value() == [("default", "worker_0")]
    assert kernel.ok("sorted(r.thread or '' for r in result)").value() == [
        "",
        "ThreadPoolExecutor-0_0",
    ]
    pg_admin(
        "select pg_cancel_backend(pid) from pg_stat_activity where datname = %s"
        " and query like 'select pg_sleep%%'",
        (postgres_db,),
    )
    assert kernel.ok("type(job.exception(30)).__name__").value() == "OperationalError"
    assert kernel.ok("await Order.objects.acount()").value() == 0
    assert kernel.ok("pool.submit(count).result()").value() == 0
    assert committed(postgres_db) == []
    assert kernel.failed == 0


@pytest.mark.parametrize("driver", DRIVERS)
def test_async_orm_call_after_terminated_backend_works(
    start_kernel, postgres_url, postgres_db, driver
):
    kernel = start_kernel(postgres_url, driver)
    kernel.ok("await Order.objects.acreate(number=1)")
    assert kernel.ok("await Order.objects.acount()").value() == 1
    terminate_backends(postgres_db)
    wait_until_disconnected(postgres_db)
    cell = kernel.ok("await Order.objects.acount()")
    assert cell.value() == 1
    assert any(
        "closed db 'default' (thread " in n and "nothing was lost" in n for n in cell.notices
    ), cell.notices
    assert kernel.failed == 0


@pytest.mark.parametrize("driver", DRIVERS)
def test_worker_thread_query_after_terminated_backend_works(
    start_kernel, postgres_url, postgres_db, driver
):
    kernel = start_kernel(postgres_url, driver)
    kernel.ok(WORKER)
    kernel.ok("Order.objects.create(number=1)")
    assert kernel.ok("pool.submit(count).result()").value() == 1
    terminate_backends(postgres_db)
    wait_until_disconnected(postgres_db)
    assert kernel.ok("pool.submit(count).result()").value() == 1
    assert kernel.ok("Order.objects.count()").value() == 1
    assert kernel.failed == 0


def test_busy_worker_connection_is_left_alone(start_kernel, postgres_url, postgres_db):
    """A thread in the middle of a transaction keeps its connection; only it may end it."""
    kernel = start_kernel(postgres_url)
    kernel.ok(BUSY_WORKER)
    assert kernel.ok(WORKER_BUSY).value() is True
    busy = worker_in_transaction(postgres_db)
    cell = kernel.ok("Order.objects.count()")
    assert cell.value() == 0  # not committed yet, and not touched
    assert cell.notices == []
    # The checks around that cell left the worker's session as it was, mid-transaction.
    assert worker_in_transaction(postgres_db) == busy
    assert kernel.ok(WORKER_BUSY).value() is True
    kernel.ok("go.set(); job.result()")
    assert kernel.ok("Order.objects.count()").value() == 2


@pytest.mark.parametrize("driver", DRIVERS)
def test_running_worker_keeps_its_lost_transaction_to_itself(
    start_kernel, postgres_url, postgres_db, driver
):
    """Its atomic block is not unwound under it: its next write fails, none is autocommitted."""
    kernel = start_kernel(postgres_url, driver)
    kernel.ok(BUSY_WORKER)
    assert terminate_backends(postgres_db) >= 2  # the shell's and the worker's
    wait_until_disconnected(postgres_db)
    cell = kernel.ok("Order.objects.count()")
    assert cell.value() == 0
    assert not any("worker" in n for n in cell.notices), cell.notices
    failure = kernel.ok("go.set(); type(job.exception(30)).__name__").value()
    assert failure in ("OperationalError", "InterfaceError")
    assert committed(postgres_db) == []
    assert kernel.ok("pool.submit(count).result()").value() == 0


def test_verbose_mode_names_connections_left_alone(start_kernel, postgres_url):
    kernel = start_kernel(postgres_url)
    kernel.ok(BUSY_WORKER)
    assert kernel.ok(WORKER_BUSY).value() is True
    kernel.ok("%config DBReset.verbosity = 2")
    cell = kernel.ok("Order.objects.count()")
    assert any(
        "not checked, in use by their thread: db 'default' (thread worker" in n
        for n in cell.notices
    )
    kernel.ok("go.set(); job.result()")
    assert not any("not checked" in n for n in kernel.ok("Order.objects.count()").notices)
