"""A repair that fails on one connection does not keep the others broken.

The fault is a real one: a stateful firewall or NAT between the client and the
server forgets an idle connection (as cloud load balancers do after their idle
timeout) and answers the client's next packet with a reset.  The client cannot
know until it talks: the connection looks healthy, and the rollback that the
repair or ``%dbreset`` sends is the first thing to fail.  Here the ``other``
alias reaches PostgreSQL through such a forwarder, in this test process.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING

import pytest

from conftest import DRIVERS, PG_HOST, PG_PORT, PG_USER, pg_admin

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from harness import Kernel

pytestmark = [pytest.mark.kernel, pytest.mark.postgres]


class Firewall:
    """A TCP forwarder to PostgreSQL that can forget its connections, as a firewall does.

    A forgotten connection gets nothing more from either side; the client's
    next packet is answered with a reset, and the server's side is closed.
    Connections opened after :meth:`forget` are forwarded as usual.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._generation = 0  # connections opened before the current one are forgotten
        self._stopped = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def forget(self) -> None:
        self._generation += 1

    def close(self) -> None:
        self._stopped.set()
        self._listener.close()
        for thread in self._threads:
            thread.join(10)

    def _accept(self) -> None:
        while not self._stopped.is_set():
            ready, _, _ = select.select([self._listener], [], [], 0.2)
            if not ready or self._stopped.is_set():
                continue
            client, _ = self._listener.accept()
            upstream = socket.create_connection((PG_HOST, PG_PORT))
            pump = threading.Thread(
                target=self._pump, args=(client, upstream, self._generation), daemon=True
            )
            self._threads.append(pump)
            pump.start()

    def _pump(self, client: socket.socket, upstream: socket.socket, generation: int) -> None:
        with client, upstream:
            while not self._stopped.is_set():
                ready, _, _ = select.select([client, upstream], [], [], 0.2)
                for source in ready:
                    try:
                        data = source.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    if generation < self._generation:
                        if source is client:
                            # SO_LINGER 0: close with a reset, as the firewall answers.
                            client.setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                            )
                        return
                    try:
                        (upstream if source is client else client).sendall(data)
                    except OSError:
                        return


@pytest.fixture
def firewall() -> Iterator[Firewall]:
    wall = Firewall()
    yield wall
    wall.close()


ASYNC_BLOCK = """
from asgiref.sync import sync_to_async
from django.db import IntegrityError
def open_block():
    global block
    block = transaction.atomic()
    block.__enter__()
    Order.objects.create(number=1)
def backend_pid():
    with connection.cursor() as cursor:
        cursor.execute("select pg_backend_pid()")
        return cursor.fetchone()[0]
"""
EXECUTOR = "db 'default' (thread ThreadPoolExecutor-0_0)"


def wait_until(condition: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"still not {what} after {timeout}s"
        time.sleep(0.05)


def start(
    start_kernel: Callable[..., Kernel],
    postgres_url: str,
    postgres_db: str,
    driver: str,
    firewall: Firewall,
) -> Kernel:
    """A kernel whose ``other`` alias is the same database, behind the firewall."""
    other = f"postgresql://{PG_USER}@127.0.0.1:{firewall.port}/{postgres_db}"
    kernel = start_kernel(postgres_url, driver, env={"IPY_DBRESET_DEMO_OTHER": other})
    kernel.ok(ASYNC_BLOCK)
    kernel.ok("Order.objects.create(number=2)")
    kernel.ok("await sync_to_async(open_block)()")
    return kernel


@pytest.mark.parametrize("driver", DRIVERS)
def test_failed_repair_does_not_stop_the_others(
    start_kernel, postgres_url, postgres_db, driver, firewall
):
    kernel = start(start_kernel, postgres_url, postgres_db, driver, firewall)
    pid = kernel.ok("await sync_to_async(backend_pid)()").value()
    # An aborted manual transaction on `other`, left to the user for now.
    kernel.ok("%config DBReset.aborted_manual_transactions = 'leave'")
    kernel.ok("ROLLBACK = \"DBReset.aborted_manual_transactions = 'rollback'\"")
    kernel.ok("transaction.set_autocommit(False, using='other')")
    left = kernel.run("Order.objects.using('other').create(number=2)")
    assert left.ename == "IntegrityError"
    assert any("did not roll back db 'other'" in n for n in left.notices), left.notices
    firewall.forget()
    # One cell asks for the rollback and loses the executor's connection: the
    # check after it has two connections to repair, and one repair fails.
    cell = kernel.ok(
        "get_ipython().run_line_magic('config', ROLLBACK)\n"
        "import time\n"
        "with connection.cursor() as cursor:\n"
        f"    cursor.execute('select pg_terminate_backend({pid})')\n"
        "    while True:\n"
        f"        cursor.execute('select count(*) from pg_stat_activity where pid = {pid}')\n"
        "        if not cursor.fetchone()[0]:\n"
        "            break\n"
        "        time.sleep(0.05)"
    )
    [notice] = cell.notices
    closed, failed = notice.splitlines()  # one line each
    assert failed.startswith("ipy_dbreset: could not repair db 'other': OperationalError")
    assert closed.startswith(f"ipy_dbreset: closed {EXECUTOR}: the server closed the connection")
    assert "lost an atomic block with 1 unsaved write (INSERT shop_order)" in closed
    assert failed.endswith("; run %dbreset")
    # Both work again.
    assert kernel.ok("await Order.objects.acount()").value() == 1
    assert kernel.ok("Order.objects.using('other').count()").value() == 1
    assert kernel.ok("await Order.objects.acount()").notices == []


@pytest.mark.parametrize("driver", DRIVERS)
def test_failed_reset_does_not_stop_the_others(
    start_kernel, postgres_url, postgres_db, driver, firewall
):
    kernel = start(start_kernel, postgres_url, postgres_db, driver, firewall)
    kernel.ok("transaction.set_autocommit(False, using='other')")
    kernel.ok("Order.objects.using('other').count()")  # a healthy open transaction
    firewall.forget()
    cell = kernel.ok("result = %dbreset")
    # The reset's notice, then the check after the cell closes what it left broken.
    notice, after = cell.notices
    assert after.startswith("ipy_dbreset: closed db 'other': "), after
    lines = notice.splitlines()
    assert len(lines) == 3, notice
    assert any(
        line.startswith("ipy_dbreset: could not reset db 'other': Operational") for line in lines
    )
    assert f"ipy_dbreset: reset {EXECUTOR}: rolled back an atomic block with" in notice
    assert "ipy_dbreset: reset db 'default': nothing was open, the next query reconnects" in lines
    failed = kernel.ok("[(f.alias, f.thread, f.error.split(':')[0]) for f in result.failed]")
    assert failed.value() == [("other", None, "OperationalError")]
    assert kernel.ok("len(result)").value() == 2
    assert kernel.ok("await Order.objects.acount()").value() == 1  # the block was rolled back
    assert kernel.ok("Order.objects.using('other').count()").value() == 1
    assert pg_admin("select number from shop_order", dbname=postgres_db) == [(2,)]
