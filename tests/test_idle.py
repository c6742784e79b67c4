"""On shared servers: idle connections let go, ended threads' connections closed,
transactions left open pointed out."""

from __future__ import annotations

import time

import pytest

from conftest import DRIVERS, pg_admin, pg_sessions, wait_for

pytestmark = [pytest.mark.kernel, pytest.mark.postgres]

IDLE = 1.0  # DBReset.idle_release in these tests, seconds

BACKEND = """
def backend():
    with connection.cursor() as cursor:
        cursor.execute("select pg_backend_pid()")
        return cursor.fetchone()[0]
"""


def backends(dbname: str) -> set[int]:
    return {pid for pid, _, _ in pg_sessions(dbname)}


def stays(pid: int, dbname: str, seconds: float) -> bool:
    """Whether backend ``pid`` is still there after ``seconds`` (a bounded negative check)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pid not in backends(dbname):
            return False
        time.sleep(0.1)
    return True


def released(kernel, postgres_db: str) -> int:
    """Open a fresh connection in the kernel; return its backend's pid."""
    pid = kernel.ok("connection.close(); backend()").value()
    assert pid in backends(postgres_db)
    return pid


@pytest.mark.parametrize("driver", DRIVERS)
def test_idle_connection_is_released_and_the_next_cell_reconnects(
    start_kernel, postgres_url, postgres_db, driver
):
    kernel = start_kernel(postgres_url, driver)
    kernel.ok(BACKEND + f"%config DBReset.idle_release = {IDLE}\n%config DBReset.verbosity = 2")
    pid = released(kernel, postgres_db)
    wait_for(lambda: pid not in backends(postgres_db), "the idle backend closed")
    cell = kernel.ok("Order.objects.create(number=1); backend()")
    assert cell.value() != pid
    said = "closed db 'default': idle for 1 s (idle_release); the next query reconnects"
    assert any(said in n for n in cell.notices), cell.notices
    status = str(kernel.ok("status = %dbstatus\nprint(status)").stdout)
    assert "last repair" in status and "idle for 1 s (idle_release)" in status, status
    # Released again after the next wait, and again the cell after works.
    second = cell.value()
    wait_for(lambda: second not in backends(postgres_db), "the idle backend closed again")
    assert kernel.ok("Order.objects.count()").value() == 1
    assert kernel.failed == 0


def test_connection_opened_before_the_option_is_kept(start_kernel, postgres_url, postgres_db):
    kernel = start_kernel(postgres_url)
    kernel.ok(BACKEND)
    pid = kernel.ok("backend()").value()
    kernel.ok(f"%config DBReset.idle_release = {IDLE}")
    assert stays(pid, postgres_db, 2.5 * IDLE)
    status = kernel.ok("status = %dbstatus\nprint(status)").stdout
    assert "kept open despite idle_release: opened before idle_release was set" in status, status


# Each: what to run (on a fresh connection), then a cell that must find it intact.
KEPT = {
    "SET": (
        "with connection.cursor() as c: c.execute('SET search_path TO pg_catalog, public')",
        "with connection.cursor() as c:\n    c.execute('show search_path')\n"
        "    shown = c.fetchone()[0]\nshown",
        "pg_catalog, public",
    ),
    "temporary table": (
        "with connection.cursor() as c: c.execute('create temp table scratch (n int)')",
        "with connection.cursor() as c:\n    c.execute('select count(*) from scratch')\n"
        "    shown = c.fetchone()[0]\nshown",
        0,
    ),
    "advisory lock": (
        "with connection.cursor() as c: c.execute('select pg_advisory_lock(42)')",
        "with connection.cursor() as c:\n"
        "    c.execute(\"select count(*) from pg_locks where locktype = 'advisory'"
        ' and pid = pg_backend_pid()")\n    shown = c.fetchone()[0]\nshown',
        1,
    ),
    "LISTEN": (
        "with connection.cursor() as c: c.execute('LISTEN orders')",
        "with connection.cursor() as c:\n    c.execute('select pg_listening_channels()')\n"
        "    shown = c.fetchone()[0]\nshown",
        "orders",
    ),
    "server-side cursor": (
        "Order.objects.create(number=1); Order.objects.create(number=2)\n"
        "rows = Order.objects.order_by('number').iterator(chunk_size=1); next(rows).number",
        "[order.number for order in rows]",
        [2],
    ),
    "manual transaction": (
        "transaction.set_autocommit(False); Order.objects.create(number=5)",
        "transaction.commit(); transaction.set_autocommit(True); Order.objects.count()",
        1,
    ),
    "autocommit off, between transactions": (
        "transaction.set_autocommit(False); Order.objects.count(); transaction.commit()",
        "off = not transaction.get_autocommit()\n"
        "transaction.commit(); transaction.set_autocommit(True); off",
        True,
    ),
    "atomic block": (
        "block = transaction.atomic(); block.__enter__(); Order.objects.create(number=5)",
        "block.__exit__(None, None, None); Order.objects.count()",
        1,
    ),
}


REASONS = {
    "SET": "session state (SET search_path TO)",
    "temporary table": "session state (create temp table)",
    "advisory lock": "session state (select pg_advisory_lock(42))",
    "LISTEN": "session state (LISTEN orders)",
    "server-side cursor": "an open server-side cursor",
    "manual transaction": "autocommit is off",
    "autocommit off, between transactions": "autocommit is off",
    "atomic block": "in an atomic block",
}


@pytest.mark.parametrize("kind", list(KEPT))
def test_connection_holding_session_state_or_a_transaction_is_kept(
    start_kernel, postgres_url, postgres_db, kind
):
    kernel = start_kernel(postgres_url)
    kernel.ok(BACKEND + f"%config DBReset.idle_release = {IDLE}")
    setup, check, expected = KEPT[kind]
    pid = released(kernel, postgres_db)
    kernel.ok(setup)
    assert stays(pid, postgres_db, 2.5 * IDLE), f"{kind}: released"
    status = kernel.ok("status = %dbstatus\nprint(status)").stdout
    assert f"kept open despite idle_release: {REASONS[kind]}" in status, status
    assert kernel.ok("backend()").value() == pid
    assert kernel.ok(check).value() == expected
    assert kernel.failed == 0


@pytest.mark.parametrize("driver", DRIVERS)
def test_ended_worker_threads_connection_is_closed(start_kernel, postgres_url, postgres_db, driver):
    kernel = start_kernel(postgres_url, driver)
    kernel.ok(BACKEND + "%config DBReset.verbosity = 2")
    shell_pid = kernel.ok("backend()").value()
    # gc.disable(): only the extension may close it, not a collection by chance.
    cell = kernel.ok(
        "import gc, threading\n"
        "gc.disable()\n"
        "found = []\n"
        "worker = threading.Thread(target=lambda: found.append(backend()), name='worker')\n"
        "worker.start(); worker.join(); found[0]"
    )
    worker_pid = cell.value()
    assert worker_pid != shell_pid
    wait_for(lambda: worker_pid not in backends(postgres_db), "the ended thread's backend closed")
    assert shell_pid in backends(postgres_db)
    notices = cell.notices + kernel.ok("gc.enable(); Order.objects.count()").notices
    assert "ipy_dbreset: closed db 'default' (thread worker): its thread has ended" in notices, (
        notices
    )
    assert kernel.failed == 0


def test_long_transaction_is_pointed_out_once_and_left_alone(
    start_kernel, postgres_url, postgres_db
):
    kernel = start_kernel(postgres_url)
    kernel.ok(BACKEND + "%config DBReset.long_transaction = 1")
    opened = kernel.ok("transaction.set_autocommit(False); Order.objects.create(number=3)")
    assert opened.notices == []
    since = time.monotonic()
    wait_for(lambda: time.monotonic() - since > 1.2, "a second passed")
    cell = kernel.ok("1 + 1")
    assert cell.notices == [
        "ipy_dbreset: still open after 1 s: a manual transaction with 1 write "
        "(INSERT shop_order) on db 'default'; it holds its locks until it ends"
    ], cell.notices
    assert kernel.ok("2 + 2").notices == []
    kernel.ok("transaction.commit(); transaction.set_autocommit(True)")
    rows = pg_admin("select number from shop_order", dbname=postgres_db)
    assert rows == [(3,)]
    # A new transaction is a new one: pointed out again when it is old enough.
    kernel.ok("block = transaction.atomic(); block.__enter__(); Order.objects.create(number=4)")
    since = time.monotonic()
    wait_for(lambda: time.monotonic() - since > 1.2, "a second passed")
    cell = kernel.ok("block.__exit__(None, None, None)")
    assert any(
        "still open after 1 s: an atomic block with 1 write (INSERT shop_order) on db 'default'"
        in n
        for n in cell.notices
    ), cell.notices
    assert kernel.ok("Order.objects.count()").value() == 2
    assert kernel.failed == 0


def test_unload_stops_the_release_and_takes_its_watch_away(start_kernel, postgres_url):
    kernel = start_kernel(postgres_url)
    kernel.ok(f"%config DBReset.idle_release = {IDLE}")
    kernel.ok("connection.close(); Order.objects.count()")
    state = (
        "import threading\n"
        "(sorted(t.name for t in threading.enumerate() if t.name.startswith('ipy_dbreset')),"
        " [(type(w).__name__, type(getattr(w, 'watch', None)).__name__)"
        "  for w in connection.execute_wrappers])"
    )
    # One execute wrapper per connection: the mark, which runs each query through the watch.
    watched = (["ipy_dbreset-idle-release"], [("Mark", "Watch")])
    assert kernel.ok(state).value() == watched
    kernel.ok("%reload_ext ipy_dbreset")
    kernel.ok("connection.close(); Order.objects.count()")
    assert kernel.ok(state).value() == watched
    kernel.ok("%unload_ext ipy_dbreset")
    assert kernel.ok(state).value() == ([], [])
    assert kernel.failed == 0


@pytest.mark.parametrize("driver", DRIVERS)
def test_async_orm_threads_idle_connection_is_released(
    start_kernel, postgres_url, postgres_db, driver
):
    """asgiref's executor thread waits for work between cells: its connection is let go too."""
    kernel = start_kernel(postgres_url, driver)
    kernel.ok(
        BACKEND
        + "from asgiref.sync import sync_to_async\n"
        + f"%config DBReset.idle_release = {IDLE}\n%config DBReset.verbosity = 2"
    )
    shell_pid = released(kernel, postgres_db)
    pid = kernel.ok("await sync_to_async(backend)()").value()
    assert pid != shell_pid
    status = kernel.ok("status = %dbstatus\nprint(status)").stdout
    assert "opened before idle_release was set" not in status, status
    wait_for(lambda: pid not in backends(postgres_db), "the async ORM's idle backend closed")
    wait_for(lambda: shell_pid not in backends(postgres_db), "the shell's idle backend closed")
    cell = kernel.ok("await Order.objects.acount()")
    assert cell.value() == 0
    assert any(
        "closed db 'default' (thread ThreadPoolExecutor-" in n
        and "idle for 1 s (idle_release); the next query reconnects" in n
        for n in cell.notices
    ), cell.notices
    assert kernel.ok("await sync_to_async(backend)()").value() != pid
    assert kernel.failed == 0


def test_running_threads_idle_connection_is_kept_and_says_why(
    start_kernel, postgres_url, postgres_db
):
    """A thread running code of its own may use its connection any moment: it is kept."""
    kernel = start_kernel(postgres_url)
    kernel.ok(BACKEND + f"%config DBReset.idle_release = {IDLE}")
    cell = kernel.ok(
        "import threading\n"
        "found, done = [], threading.Event()\n"
        "def work():\n"
        "    found.append(backend())\n"
        "    done.wait(60)\n"
        "    found.append(backend())\n"
        "worker = threading.Thread(target=work, name='worker')\n"
        "worker.start()\n"
        "while not found: done.wait(0.01)\n"
        "found[0]"
    )
    pid = cell.value()
    assert stays(pid, postgres_db, 2.5 * IDLE)
    status = kernel.ok("status = %dbstatus\nprint(status)").stdout
    assert "kept open despite idle_release: its thread is running" in status, status
    assert kernel.ok("done.set(); worker.join(); found[1]").value() == pid
    assert kernel.failed == 0


def test_users_error_shows_no_frame_of_the_release(start_kernel, postgres_url):
    """The release's watch on each query stays out of the user's traceback."""
    kernel = start_kernel(postgres_url)
    kernel.ok(f"%config DBReset.idle_release = {IDLE}")
    kernel.ok("connection.close(); Order.objects.create(number=1)")
    assert kernel.ok("type(connection.execute_wrappers[0].watch).__name__").value() == "Watch"
    failed = kernel.run("Order.objects.create(number=1)")
    assert failed.ename == "IntegrityError", failed.shown
    assert "Order.objects.create" in failed.traceback, failed.traceback
    assert "ipy_dbreset" not in failed.traceback, failed.traceback
