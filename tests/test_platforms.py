"""The core repairs with only the APIs Windows and macOS have, simulated on Linux.

Each kernel here starts with a ``sitecustomize.py`` of ours first on its
``PYTHONPATH``: before anything imports them, it takes away what the platform's
Python lacks (Windows: ``select.poll`` and ``epoll``, ``TCP_USER_TIMEOUT``,
``TCP_INFO``, ``signal.pthread_kill``, ``os.dup`` of a socket; macOS: ``epoll``,
``TCP_USER_TIMEOUT``, ``TCP_INFO``, and the keepalive idle time under its macOS
name).  The extension then has to load, repair between cells and before
queries, show ``%dbstatus`` and let the stop button through with what is left.

What the simulation cannot show is the platform's own TCP stack and drivers'
C code: those are Linux's here.  ``docs/platforms.md`` says what holds where.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest
from netfault import Path as NetworkPath
from netfault import nft_available
from test_network import BOUND, established_to

from conftest import (
    DRIVERS,
    HIDE_PSYCOPG,
    PG_HOST,
    PG_PORT,
    PG_USER,
    pg_admin,
    terminate_backends,
    unavailable,
    wait_for,
    wait_until_disconnected,
)
from harness import ROOT, Kernel

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from harness import Cell


def in_kernels(test: Callable[..., None]) -> Callable[..., None]:
    """A test that runs in the simulated platforms' kernels, on PostgreSQL."""
    return pytest.mark.kernel(pytest.mark.postgres(test))  # type: ignore[no-any-return]


# Runs first in the kernel process (sitecustomize): Windows' Python has no
# poll() or epoll, no TCP_USER_TIMEOUT or TCP_INFO and no pthread_kill, and
# os.dup() takes C runtime file descriptors only, which socket handles are not.
WINDOWS = """
import errno, os, select, signal, stat

for _name in [n for n in dir(select) if n in ("poll", "epoll") or n.startswith(("POLL", "EPOLL"))]:
    delattr(select, _name)

import socket  # only now: it imports selectors, which picks what select() offers

for _name in ("TCP_USER_TIMEOUT", "TCP_INFO"):
    delattr(socket, _name)
del signal.pthread_kill

_dup = os.dup


def _dup_no_socket(fd):
    if stat.S_ISSOCK(os.fstat(fd).st_mode):
        raise OSError(errno.EBADF, "Bad file descriptor (a socket handle is no C file descriptor)")
    return _dup(fd)


os.dup = _dup_no_socket
"""

# macOS: poll() but no epoll; no TCP_USER_TIMEOUT or TCP_INFO; the keepalive
# idle time is TCP_KEEPALIVE there (0x10), not TCP_KEEPIDLE.  Linux would refuse
# 0x10, so it stands here for Linux's TCP_KEEPIDLE: the option really lands.
MACOS = """
import select

for _name in [n for n in dir(select) if n == "epoll" or n.startswith("EPOLL")]:
    delattr(select, _name)

import socket  # only now: it imports selectors, which picks what select() offers

for _name in ("TCP_USER_TIMEOUT", "TCP_INFO"):
    delattr(socket, _name)
socket.TCP_KEEPALIVE = socket.TCP_KEEPIDLE
del socket.TCP_KEEPIDLE
"""

SURFACES = {"windows": WINDOWS, "macos": MACOS}

# What the kernel must see missing (or present) once its sitecustomize ran.
SURFACE_CHECK = """
import os, select, signal, socket
(
    hasattr(select, "poll"),
    hasattr(select, "epoll"),
    hasattr(socket, "TCP_USER_TIMEOUT"),
    hasattr(socket, "TCP_INFO"),
    hasattr(socket, "TCP_KEEPIDLE"),
    hasattr(signal, "pthread_kill"),
)
"""
EXPECTED = {
    "windows": (False, False, False, False, True, False),
    "macos": (True, False, False, False, False, True),
}

# Runs in the kernel: end this process's own connection as a DBA would, and
# wait until the server no longer lists it (as tests/test_preflight.py does).
HELPERS = """
import time
from django.db import connections

def server_id():
    raw = connections["default"].connection
    return raw.info.backend_pid

def kill(pid):
    s = connections["default"].settings_dict
    admin = connections["default"].Database.connect(
        host=s["HOST"], port=int(s["PORT"]), user=s["USER"], dbname="postgres"
    )
    try:
        admin.autocommit = True
        cursor = admin.cursor()
        cursor.execute("select pg_terminate_backend(%s)", (pid,))
        deadline = time.monotonic() + 10
        while True:
            cursor.execute("select count(*) from pg_stat_activity where pid = %s", (pid,))
            if cursor.fetchone()[0] == 0:
                break
            assert time.monotonic() < deadline, f"the server still lists {pid}"
            time.sleep(0.01)
    finally:
        admin.close()
"""

PG_SLEEP = 10
STOP_BUTTON_SECONDS = 5


@pytest.fixture(scope="module", params=[(s, d) for s in SURFACES for d in DRIVERS], ids=str)
def surface(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(platform, driver): the API surface the kernel gets and the driver Django uses."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def platform_kernel(
    surface: tuple[str, str],
    postgres_db: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Kernel]:
    """One kernel per platform and driver, with the extension loaded; its tests share it."""
    platform, driver = surface
    folder = tmp_path_factory.mktemp(f"surface-{platform}")
    (folder / "sitecustomize.py").write_text(SURFACES[platform])
    url = f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{postgres_db}"
    kernel = Kernel(
        env={
            "PYTHONPATH": f"{folder}:{ROOT}",
            "IPY_DBRESET_DEMO_DB": url,
            "IPY_DBRESET_DEMO_OTHER": str(folder / "other.sqlite3"),
        }
    )
    try:
        assert kernel.ok(SURFACE_CHECK).value() == EXPECTED[platform]
        if driver == "psycopg2":
            kernel.ok(HIDE_PSYCOPG)
        kernel.ok("%load_ext ipy_dbreset")
        kernel.ok("from shop.models import Order\nfrom django.db import connection, transaction")
        shown = kernel.ok("connection.ensure_connection(); type(connection.connection).__module__")
        assert shown.value().split(".")[0] == driver
        kernel.ok(HELPERS)
        yield kernel
    finally:
        kernel.close()


@pytest.fixture
def kernel(platform_kernel: Kernel, postgres_db: str) -> Kernel:
    """The shared kernel, in autocommit, with ``shop_order`` empty and its cells forgotten."""
    platform_kernel.ok("transaction.set_autocommit(True)")
    pg_admin("truncate shop_order", dbname=postgres_db)
    platform_kernel.cells.clear()
    return platform_kernel


def committed(dbname: str) -> list[int]:
    return [n for (n,) in pg_admin("select number from shop_order order by number", dbname=dbname)]


def only_notice(cell: Cell) -> str:
    assert len(cell.notices) == 1, f"expected one notice, got {cell.notices}\n{cell.shown}"
    return cell.notices[0]


@in_kernels
def test_the_extension_loads_and_healthy_cells_show_nothing(kernel):
    cell = kernel.ok("Order.objects.create(number=1); Order.objects.count()")
    assert cell.value() == 1
    assert cell.notices == [], cell.shown
    assert "Error in callback" not in cell.shown


@in_kernels
def test_cell_after_integrity_error_in_manual_transaction_works(kernel, postgres_db):
    kernel.ok("Order.objects.create(number=1)")
    kernel.ok("transaction.set_autocommit(False); Order.objects.create(number=2)")
    failed = kernel.run("Order.objects.create(number=1)")
    assert failed.ename == "IntegrityError", failed.shown
    notice = only_notice(failed)
    assert "rolled back db 'default': a failed statement aborted the transaction" in notice
    assert "lost 1 unsaved write (INSERT shop_order)" in notice, notice
    assert kernel.ok("Order.objects.count()").value() == 1
    kernel.ok("Order.objects.create(number=3); transaction.commit()")
    assert kernel.failed == 1
    assert committed(postgres_db) == [1, 3]


@in_kernels
def test_first_cell_after_terminated_backend_works(kernel, postgres_db):
    kernel.ok("Order.objects.create(number=1); x = 42")
    assert terminate_backends(postgres_db) >= 1
    wait_until_disconnected(postgres_db)
    cell = kernel.ok("Order.objects.count(), x")
    assert cell.value() == (1, 42)
    assert only_notice(cell) == (
        "ipy_dbreset: closed db 'default': the server closed the connection; "
        "nothing was lost, the next query reconnects"
    )
    assert kernel.failed == 0


@in_kernels
def test_query_after_backend_terminated_mid_cell_works(kernel):
    cell = kernel.ok(
        "first = Order.objects.count()\n"
        "before = server_id()\n"
        "kill(before)\n"
        "first, Order.objects.count(), server_id() != before"
    )
    assert cell.value() == (0, 0, True)
    assert any(n.startswith("ipy_dbreset: reconnected db 'default'") for n in cell.notices), (
        cell.notices
    )
    assert kernel.failed == 0


@in_kernels
def test_dbstatus_shows_the_connection_and_its_keepalive(kernel):
    kernel.ok("Order.objects.count()")
    table = kernel.ok("table = %dbstatus\nprint(table)").stdout
    assert "default" in table and "idle" in table, table
    # The keepalive probes add up to the bound (60 s); no TCP_USER_TIMEOUT here.
    assert "on, after 30s, 3 probes 10s apart" in table, table
    assert "timeout" not in table, table


@in_kernels
def test_stop_button_stops_a_query_and_the_next_cell_works(kernel, surface):
    _, driver = surface
    if driver == "psycopg2":  # psycopg2 waits in C unless asked to wait in Python
        kernel.ok("%config DBReset.interruptible_psycopg2 = True")
    try:
        started = time.monotonic()
        cell = kernel.interrupt_during(
            f"connection.cursor().execute('SELECT pg_sleep({PG_SLEEP})')", 1.0
        )
        took = time.monotonic() - started
    finally:
        if driver == "psycopg2":
            kernel.ok("%config DBReset.interruptible_psycopg2 = False")
    # psycopg 3 raises the interrupt; psycopg2 the server's "canceling statement".
    assert cell.ename in ("KeyboardInterrupt", "OperationalError"), cell.shown
    assert took < 1.0 + STOP_BUTTON_SECONDS, f"took {took:.1f} s"
    assert "Error in callback" not in cell.shown, cell.shown
    assert kernel.ok("Order.objects.count()").value() == 0
    assert kernel.failed == 1


@in_kernels
@pytest.mark.parametrize("platform", SURFACES)
def test_idle_connection_on_a_path_that_forgot_it_is_found_within_the_bound(
    platform, start_kernel, postgres_db, tmp_path
):
    """Keepalive under the platform's own option names: a NAT forgot the flow, no query needed."""
    why = nft_available()
    if why is not None:
        unavailable(why)
    path = NetworkPath(PG_HOST, PG_PORT)
    try:
        (tmp_path / "sitecustomize.py").write_text(SURFACES[platform])
        kernel = start_kernel(
            f"postgresql://{PG_USER}@127.0.0.1:{path.port}/{postgres_db}",
            env={"PYTHONPATH": f"{tmp_path}:{ROOT}"},
        )
        assert kernel.ok(SURFACE_CHECK).value() == EXPECTED[platform]
        kernel.ok(f"%config DBReset.network_timeout = {BOUND}")
        kernel.ok("Order.objects.count()")
        path.freeze()
        path.reset()  # the path forgets the flow; the reset itself is dropped too
        started = time.monotonic()
        wait_for(lambda: not established_to(path.port), "keepalive ended it", 4 * BOUND)
        took = time.monotonic() - started
        print(f"{platform}: keepalive ended the idle connection after {took:.1f} s (bound {BOUND})")
        path.thaw()
        cell = kernel.ok("Order.objects.count()")
        assert cell.value() == 0
        assert any(n.startswith("ipy_dbreset: closed db 'default': ") for n in cell.notices), (
            cell.shown
        )
    finally:
        path.close()


# -- the readiness check without poll and epoll, in this process ---------------------


@pytest.fixture
def without_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """The readiness check as on Windows: select() alone, two sockets per call."""
    from ipy_dbreset.drivers import base

    monkeypatch.setattr(base, "_POLL", None)
    monkeypatch.setattr(base, "_EPOLL", None)
    monkeypatch.setattr(base, "_SELECT_MAX", 2)  # Windows: 500, for its 512-socket limit


def test_select_finds_input_on_any_socket_and_a_hang_up(without_poll):
    import socket

    from ipy_dbreset.drivers import Sockets, readable

    pairs = [socket.socketpair() for _ in range(5)]
    try:
        ours = [a.fileno() for a, _ in pairs]
        watched = Sockets(ours)
        assert not watched.pending()
        assert not any(readable(fd) for fd in ours)
        pairs[4][1].send(b"x")  # beyond the first two select() calls
        assert watched.pending()
        assert readable(ours[4]) and not readable(ours[3])
        pairs[4][0].recv(1)
        assert not watched.pending()
        pairs[2][1].close()  # the other end hung up: readable, as a server's EOF is
        assert watched.pending() and readable(ours[2])
        watched.close()
        assert not watched.pending()
        assert readable(-1)  # libpq dropped its socket: something to look at
    finally:
        for a, b in pairs:
            a.close()
            b.close()


@pytest.mark.parametrize("platform", ["linux", "windows"])
def test_the_question_before_each_cell_finds_input_and_a_hang_up(platform, monkeypatch):
    """Sockets.question, asked before every quiet cell: on Linux without releasing the GIL."""
    import socket

    from ipy_dbreset.drivers import Sockets, base

    if platform == "windows":
        monkeypatch.setattr(base, "_POLL", None)
        monkeypatch.setattr(base, "_EPOLL", None)
    elif base._HELD_QUESTION is None:
        pytest.skip("no epoll here")
    assert Sockets([]).question is None  # nothing to ask: the callbacks skip the call
    pairs = [socket.socketpair() for _ in range(3)]
    watched = Sockets([a.fileno() for a, _ in pairs])
    try:
        ask = watched.question
        assert ask is not None and not ask()
        pairs[1][1].send(b"x")
        assert ask()
        pairs[1][0].recv(1)
        assert not ask()
        pairs[2][1].close()
        assert ask()
    finally:
        watched.close()
        for a, b in pairs:
            a.close()
            b.close()
