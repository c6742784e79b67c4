"""Memory and connections stay bounded: short-lived threads leave nothing behind.

A notebook that runs a fresh thread pool in every cell (``ThreadPoolExecutor``
around ORM queries) makes a Django connection wrapper per thread.  Once the
threads have ended, their wrappers must be freed as they are without the
extension, their server connections closed, and ``%dbstatus`` must list only
the connections still in use.
"""

from __future__ import annotations

import pytest

from conftest import DRIVERS, pg_sessions, wait_for

CELLS = 30
THREADS = 8

SETUP = """
import gc
from concurrent.futures import ThreadPoolExecutor
from django.db.backends.base.base import BaseDatabaseWrapper

def wrappers():
    gc.collect()
    return sum(isinstance(o, BaseDatabaseWrapper) for o in gc.get_objects())

def query(_):
    return Order.objects.count()
"""

# Every task in a thread of its own: each waits until all have started.
POOL = f"""
import threading
started = threading.Barrier({THREADS}, timeout=30)
def one(n):
    started.wait()
    return query(n)
with ThreadPoolExecutor({THREADS}) as pool:
    counts = list(pool.map(one, range({THREADS})))
counts == [0] * {THREADS}
"""

# The thread of each connection %dbstatus lists ('': the shell's own).
LISTED = """
status = %dbstatus
column = status.columns.index("thread") if "thread" in status.columns else None
sorted("" if column is None else row[column] for row in status.rows)
"""


def run_pools(kernel) -> tuple[int, int]:
    """Run a pool in each of :data:`CELLS` cells; the wrappers alive after the first, the last."""
    kernel.ok(SETUP)
    kernel.ok("Order.objects.count()")  # the shell thread's own connection
    assert kernel.ok(POOL).value() is True
    after_one = kernel.ok("wrappers()").value()
    for _ in range(CELLS - 1):
        assert kernel.ok(POOL).value() is True
    return after_one, kernel.ok("wrappers()").value()


def without_extension(start_kernel, url: str, driver: str | None = None) -> int:
    """The wrappers alive after the same cells in a kernel without the extension."""
    kernel = start_kernel(url, driver, load=False)
    kernel.ok(
        "import os, django\n"
        "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'demo.settings')\n"
        "os.environ['DJANGO_ALLOW_ASYNC_UNSAFE'] = 'true'\n"
        "django.setup()\n"
        "from shop.models import Order"
    )
    kernel.ok(SETUP)
    kernel.ok("Order.objects.count()")
    # gc.collect() after each cell: without the extension, only the collector
    # closes an ended thread's connection, and the shared server must not fill up.
    for _ in range(3):
        kernel.ok(POOL + "\nwrappers()")
    alive = kernel.ok("wrappers()").value()
    kernel.close()  # and its connections with it
    return alive


@pytest.mark.kernel
@pytest.mark.postgres
@pytest.mark.parametrize("driver", DRIVERS)
def test_wrappers_of_ended_threads_are_freed_and_their_connections_closed(
    start_kernel, postgres_url, postgres_db, driver
):
    baseline = without_extension(start_kernel, postgres_url, driver)
    wait_for(lambda: not pg_sessions(postgres_db), "the kernel without the extension let go")
    kernel = start_kernel(postgres_url, driver)
    after_one, after_all = run_pools(kernel)
    assert after_all <= after_one, (after_one, after_all)  # no growth with the cells
    assert after_all <= baseline + 1, (baseline, after_all)  # near the figure without us
    # Only the shell thread's connection is left on the server, and in %dbstatus.
    wait_for(lambda: len(pg_sessions(postgres_db)) == 1, "the ended threads' backends closed")
    assert kernel.ok(LISTED).value() == [""]
    assert kernel.failed == 0


@pytest.mark.kernel
def test_sqlite_wrappers_of_ended_threads_are_freed(start_kernel, sqlite_url):
    baseline = without_extension(start_kernel, sqlite_url)
    kernel = start_kernel(sqlite_url)
    after_one, after_all = run_pools(kernel)
    assert after_all <= after_one, (after_one, after_all)
    assert after_all <= baseline + 1, (baseline, after_all)
    assert kernel.ok(LISTED).value() == [""]
    assert kernel.failed == 0


@pytest.mark.kernel
@pytest.mark.postgres
@pytest.mark.parametrize("driver", DRIVERS)
def test_ended_thread_inside_an_atomic_block_is_told_and_freed(
    start_kernel, postgres_url, postgres_db, driver
):
    """What an ended thread's connection lost is told, whatever the collector does meanwhile."""
    kernel = start_kernel(postgres_url, driver)
    kernel.ok(SETUP)
    kernel.ok("Order.objects.count()")
    before = kernel.ok("wrappers()").value()
    cell = kernel.ok(
        "import threading\n"
        "def left_open():\n"
        "    transaction.atomic().__enter__()\n"
        "    Order.objects.create(number=1)\n"
        "worker = threading.Thread(target=left_open, name='worker')\n"
        "worker.start(); worker.join(); gc.collect()"
    )
    assert any(
        "closed db 'default' (thread worker): its thread has ended" in n
        and "lost an atomic block with 1 unsaved write (INSERT shop_order)" in n
        for n in cell.notices
    ), cell.notices
    assert kernel.ok("wrappers()").value() == before
    wait_for(lambda: len(pg_sessions(postgres_db)) == 1, "the ended thread's backend closed")
    assert kernel.ok("Order.objects.count()").value() == 0
    assert kernel.failed == 0
