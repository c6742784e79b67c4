"""Connections owned by other threads recover too: the async ORM's and worker threads'."""

from __future__ import annotations

import pytest

from conftest import DRIVERS, pg_sessions, terminate_backends, wait_until_disconnected

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
inside, go = threading.Event(), threading.Event()
def hold_transaction():
    # A worker in the middle of its own transaction, between two queries.
    with transaction.atomic():
        Order.objects.create(number=7)
        inside.set()
        go.wait(30)
job = pool.submit(hold_transaction)
"""
)
# The worker is inside its transaction, and still there (not done, not failed).
WORKER_BUSY = "inside.wait(30) and not job.done()"


def worker_in_transaction(dbname: str) -> int:
    """The pid of the one session on ``dbname`` that is idle inside a transaction."""
    pids = [pid for pid, state, _ in pg_sessions(dbname) if state == "idle in transaction"]
    assert len(pids) == 1, pg_sessions(dbname)
    return pids[0]


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
    assert any("lost" in notice and "thread" in notice for notice in cell.notices)
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
    assert kernel.ok("Order.objects.count()").value() == 1


def test_verbose_mode_names_connections_left_alone(start_kernel, postgres_url):
    kernel = start_kernel(postgres_url)
    kernel.ok(BUSY_WORKER)
    assert kernel.ok(WORKER_BUSY).value() is True
    kernel.ok("%config DBReset.verbosity = 2")
    cell = kernel.ok("Order.objects.count()")
    assert any(
        "not checked, in use by their thread: default (thread worker" in n for n in cell.notices
    )
    kernel.ok("go.set(); job.result()")
    assert not any("not checked" in n for n in kernel.ok("Order.objects.count()").notices)
