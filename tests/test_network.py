"""A network path that stops answering: no query waits forever, the stop button gets out.

Every kernel here reaches its server through :class:`netfault.Path`, a TCP
proxy of the tests' own on loopback that can freeze (drop every packet of its
own port, closing nothing, as a slept laptop, a dropped VPN or a NAT that
forgot the flow would) and reset.  The bound on network silence
(``DBReset.network_timeout``) is set to a few seconds so that the tests stay
fast; what they show holds for the default (60 s) as well.
"""

from __future__ import annotations

import pathlib
import time
from typing import TYPE_CHECKING

import pytest
from netfault import Path, nft_available

from conftest import (
    DRIVERS,
    MYSQL_HOST,
    MYSQL_PORT,
    MYSQL_USER,
    PG_HOST,
    PG_PORT,
    PG_USER,
    mysql_admin,
    pg_admin,
    unavailable,
    wait_for,
    wait_until_running,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from harness import Cell, Kernel

pytestmark = pytest.mark.kernel

BOUND = 3  # seconds of network silence a connection may wait, in these tests
MARGIN = 3  # for a loaded machine: timers, the kernel's own reply, scheduling
STOP_BUTTON_SECONDS = 5  # the promise: out within 5 s of pressing stop
BACKENDS = [*DRIVERS, "mysql"]


@pytest.fixture
def proxy() -> Iterator[Callable[[str, int], Path]]:
    """``proxy(host, port)``: a path of our own to a server, that can freeze and reset."""
    why = nft_available()
    if why is not None:
        unavailable(why)
    paths: list[Path] = []

    def make(host: str, port: int) -> Path:
        path = Path(host, port)
        paths.append(path)
        return path

    yield make
    for path in paths:
        path.close()  # thaws first, then resets: the servers drop their side


@pytest.fixture
def through_path(request, proxy, start_kernel) -> Callable[..., tuple[Kernel, Path]]:
    """``through_path(backend, timeout=BOUND)``: a kernel whose connection goes through a path."""

    def start(backend: str, timeout: int = BOUND) -> tuple[Kernel, Path]:
        if backend == "mysql":
            db = request.getfixturevalue("mysql_db")
            mysql_admin("delete from shop_order", db=db)
            path = proxy(MYSQL_HOST, MYSQL_PORT)
            kernel = start_kernel(f"mysql://{MYSQL_USER}@127.0.0.1:{path.port}/{db}")
        else:
            db = request.getfixturevalue("postgres_db")
            pg_admin("truncate shop_order", dbname=db)
            path = proxy(PG_HOST, PG_PORT)
            kernel = start_kernel(f"postgresql://{PG_USER}@127.0.0.1:{path.port}/{db}", backend)
            if backend == "psycopg2":
                kernel.ok("%config DBReset.interruptible_psycopg2 = True")
        kernel.ok(f"%config DBReset.network_timeout = {timeout}")
        kernel.ok("Order.objects.create(number=1)")
        return kernel, path

    return start


PROC_TCP = pathlib.Path("/proc/net/tcp")


def timed(run: Callable[[], Cell]) -> tuple[Cell, float]:
    started = time.monotonic()
    cell = run()
    return cell, time.monotonic() - started


def established_to(port: int) -> bool:
    """Whether a client connection to loopback ``port`` is still established (``/proc/net/tcp``)."""
    for line in PROC_TCP.read_text().splitlines()[1:]:
        fields = line.split()
        remote, state = fields[2], fields[3]
        if state == "01" and int(remote.split(":")[1], 16) == port:
            return True
    return False


def lost_connection(cell: Cell) -> bool:
    return any(n.startswith("ipy_dbreset: closed db 'default': ") for n in cell.notices)


# -- C. no query waits forever on a dead path -------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_on_a_frozen_path_ends_within_the_bound(through_path, backend):
    kernel, path = through_path(backend)
    with path.frozen():
        cell, took = timed(lambda: kernel.run("Order.objects.count()"))
    print(f"query on a frozen path, bound {BOUND} s, {backend}: failed after {took:.2f} s")
    assert cell.ename == "OperationalError", cell.shown
    assert BOUND - 1 < took < BOUND + MARGIN, f"took {took:.1f} s"
    assert lost_connection(cell), cell.notices
    assert kernel.ok("Order.objects.count()").value() == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_transaction_on_a_frozen_path_fails_and_says_what_was_lost(through_path, backend):
    kernel, path = through_path(backend)
    kernel.ok("transaction.set_autocommit(False); Order.objects.create(number=2)")
    with path.frozen():
        cell, took = timed(lambda: kernel.run("Order.objects.create(number=3)"))
    assert cell.ename == "OperationalError", cell.shown
    assert took < BOUND + MARGIN, f"took {took:.1f} s"
    lost = "lost a manual transaction with 1 unsaved write (INSERT shop_order)"
    assert any(lost in n for n in cell.notices), cell.notices
    # Rows 2 and 3 were never committed; autocommit stays off, as the user had it.
    assert kernel.ok("Order.objects.count()").value() == 1
    assert kernel.ok("transaction.get_autocommit()").value() is False


@pytest.mark.parametrize("backend", BACKENDS)
def test_healthy_query_longer_than_the_bound_completes(through_path, backend):
    kernel, _ = through_path(backend)
    sleep = "pg_sleep" if backend != "mysql" else "SLEEP"
    cell, took = timed(
        lambda: kernel.ok(
            f"cursor = connection.cursor(); cursor.execute('SELECT {sleep}({2 * BOUND})'); "
            "cursor.fetchone() is not None"
        )
    )
    assert took >= 2 * BOUND
    assert cell.notices == []
    assert kernel.ok("Order.objects.count()").value() == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_idle_connection_on_a_path_that_forgot_it_is_replaced_before_the_next_cell(
    through_path, backend
):
    """A NAT forgot the idle flow: keepalive finds out, and the next cell reconnects."""
    kernel, path = through_path(backend)
    path.freeze()
    path.reset()  # the path forgets the flow; the reset itself is dropped too
    # Keepalive gives up after about the bound; no query is needed to find out.
    wait_for(lambda: not established_to(path.port), "keepalive ended the connection", 4 * BOUND)
    path.thaw()
    cell = kernel.ok("Order.objects.count()")
    assert cell.value() == 1
    assert lost_connection(cell), cell.notices


# -- the stop button on a frozen path -------------------------------------------------

INTERRUPT_AFTER = 1.0
COUNT = "Order.objects.count()"


@pytest.mark.parametrize("driver", DRIVERS)
def test_stop_button_gets_out_of_a_query_sent_into_a_frozen_path(through_path, driver):
    # The default bound (60 s) is far away: only the stop button can end the wait.
    kernel, path = through_path(driver, timeout=60)
    with path.frozen():
        cell, took = timed(lambda: kernel.interrupt_during(COUNT, INTERRUPT_AFTER))
    out = took - INTERRUPT_AFTER
    print(f"stop button, query sent into a frozen path, {driver}: out after {out:.2f} s")
    assert cell.ename == "OperationalError", cell.shown
    assert out < STOP_BUTTON_SECONDS, f"{out:.1f} s from the interrupt"
    assert lost_connection(cell), cell.notices
    assert kernel.ok("Order.objects.count()").value() == 1


@pytest.mark.postgres
@pytest.mark.parametrize("driver", DRIVERS)
def test_stop_button_gets_out_of_a_query_whose_path_froze_while_it_ran(
    through_path, postgres_db, driver
):
    kernel, path = through_path(driver, timeout=60)
    query = "SELECT pg_sleep(30)"
    timer = kernel.client.execute(f"connection.cursor().execute({query!r})")
    wait_until_running(postgres_db, query)
    path.freeze()
    try:
        started = time.monotonic()
        kernel.manager.interrupt_kernel()
        reply = kernel.client.get_shell_msg(timeout=30)
        out = time.monotonic() - started
    finally:
        path.thaw()
    print(f"stop button, path froze while the query ran, {driver}: out after {out:.2f} s")
    assert reply["parent_header"]["msg_id"] == timer
    assert reply["content"]["ename"] == "OperationalError", reply["content"]
    assert out < STOP_BUTTON_SECONDS, f"{out:.1f} s from the interrupt"
    assert kernel.ok("Order.objects.count()").value() == 1


@pytest.mark.postgres
@pytest.mark.parametrize("driver", DRIVERS)
def test_stop_button_still_cancels_a_query_on_a_path_that_answers(through_path, driver):
    kernel, _ = through_path(driver, timeout=60)
    cell, took = timed(
        lambda: kernel.interrupt_during("connection.cursor().execute('SELECT pg_sleep(30)')")
    )
    # psycopg 3 raises the interrupt; psycopg2's wait_select cancels and raises
    # the server's "canceling statement due to user request".
    assert cell.ename in ("KeyboardInterrupt", "OperationalError"), cell.shown
    assert "canceling statement" in cell.evalue or cell.ename == "KeyboardInterrupt"
    print(f"stop button on a path that answers, {driver}: out after {took - INTERRUPT_AFTER:.2f} s")
    assert took - INTERRUPT_AFTER < STOP_BUTTON_SECONDS
    assert kernel.ok("Order.objects.count()").value() == 1


@pytest.mark.mysql
def test_stop_button_on_mysql_waits_for_the_bound(through_path):
    """mysqlclient waits in C, where no signal handler runs: the bound ends the wait."""
    kernel, path = through_path("mysql")
    with path.frozen():
        cell, took = timed(lambda: kernel.interrupt_during(COUNT, INTERRUPT_AFTER))
    print(f"stop button on a frozen path, bound {BOUND} s, mysqlclient: out after {took:.2f} s")
    assert cell.ename in ("OperationalError", "KeyboardInterrupt"), cell.shown
    assert took < BOUND + MARGIN, f"took {took:.1f} s"
    assert kernel.ok("Order.objects.count()").value() == 1


# -- B. keepalive is on and shown -------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_dbstatus_shows_keepalive(through_path, backend):
    kernel, _ = through_path(backend, timeout=60)
    table = kernel.ok("table = %dbstatus\nprint(table)").stdout
    assert "on, after 30s, 3 probes 10s apart, timeout 60s" in table, table


# -- the SIGINT handler comes and goes with the extension --------------------------------


@pytest.mark.postgres
def test_sigint_handler_is_ours_only_while_loaded(postgres_url, tmp_path):
    """In a plain shell the guard stays in front between cells; unload gives the handler back."""
    from harness import DEMO, run_shell

    handler = "import signal; print(getattr(signal.getsignal(signal.SIGINT), '__qualname__', None))"
    session = run_shell(
        [
            "%load_ext ipy_dbreset",
            "from django.db import connection; connection.ensure_connection()",
            "x = 1",
            handler,
            "%unload_ext ipy_dbreset",
            handler,
        ],
        DEMO,
        env={"IPY_DBRESET_DEMO_DB": postgres_url},
        tmp_path=tmp_path,
    )
    assert all(cell.ok for cell in session.cells), session.output
    assert session[3].stdout.strip() == "InterruptGuard._handle"
    assert session[5].stdout.strip() == "default_int_handler"


@pytest.mark.postgres
def test_in_a_kernel_the_guard_is_put_in_front_by_the_kernels_own_hook(start_kernel, postgres_url):
    """ipykernel sets SIGINT's handler before every request: ours is set in that same call."""
    kernel = start_kernel(postgres_url)
    kernel.ok("from django.db import connection; connection.ensure_connection()")
    looked = (
        "import signal\n"
        "hook = get_ipython().kernel.__dict__.get('pre_handler_hook')\n"
        "print(getattr(signal.getsignal(signal.SIGINT), '__qualname__', None),\n"
        "      getattr(hook, '__qualname__', None))"
    )
    assert kernel.ok(looked).stdout.split() == [
        "InterruptGuard._handle",
        "InterruptGuard.hook.<locals>.pre_handler_hook",
    ]
    kernel.ok("%unload_ext ipy_dbreset")
    assert kernel.ok(looked).stdout.split() == ["default_int_handler", "None"]
    kernel.ok("%load_ext ipy_dbreset")
    kernel.ok("x = 1")
    assert kernel.ok(looked).stdout.split()[0] == "InterruptGuard._handle"
