"""Recovery behind PgBouncer, as teams with a shared server run it.

Each test starts a PgBouncer of its own (session or transaction pooling) in
front of the session's PostgreSQL database, and a real kernel whose Django
connects through it, under each PostgreSQL driver.  Faults are made on the
server (``pg_terminate_backend``) or on the pooler (restarted between
cells); what survived is read back on a direct admin connection.

What the pooler changes: in transaction mode an idle client holds no server
connection, so a server backend terminated while the kernel is idle is
replaced by the pooler and never seen by the kernel.  A backend terminated
while the kernel holds it (session mode, or a transaction in either mode) is
passed on: the pooler closes the kernel's connection, as the server itself
would.  The tests wait on the pooler's admin console until it has noticed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from conftest import DRIVERS, pg_admin, terminate_backends, wait_for, wait_until_disconnected

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import Bouncer
    from harness import Kernel

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.postgres,
    pytest.mark.parametrize("driver", DRIVERS),
    pytest.mark.parametrize("pool_mode", ["session", "transaction"]),
]


@pytest.fixture
def kernel(start_kernel: Callable[..., Kernel], pgbouncer: Bouncer, driver: str) -> Kernel:
    """A kernel whose Django connects through the pooler."""
    return start_kernel(pgbouncer.url, driver)


def committed(dbname: str) -> list[int]:
    """The order numbers committed in ``dbname``, read on a direct connection."""
    return [n for (n,) in pg_admin("select number from shop_order order by number", dbname=dbname)]


def terminate_server_side(bouncer: Bouncer, *, holding: bool) -> None:
    """Terminate the pooler's backends on the server; wait until the pooler knows.

    ``holding``: the kernel's connection is tied to a backend (session mode,
    or a transaction), so the pooler must close the kernel's connection too.
    """
    assert terminate_backends(bouncer.dbname) >= 1
    wait_until_disconnected(bouncer.dbname)
    wait_for(lambda: not bouncer.servers(), "the pooler dropped its dead server connections")
    if holding:
        wait_for(lambda: not bouncer.clients(), "the pooler closed the kernel's connection")


def test_cells_after_server_backend_terminated_behind_pooler_work(kernel, pgbouncer):
    kernel.ok("Order.objects.create(number=1); Order.objects.create(number=2); x = 42")

    # Idle, in autocommit mode.
    terminate_server_side(pgbouncer, holding=pgbouncer.mode == "session")
    idle = kernel.ok("Order.objects.count(), x")
    assert idle.value() == (2, 42)
    if pgbouncer.mode == "session":
        assert len(idle.notices) == 1, idle.notices
        assert "closed db 'default'" in idle.notices[0] and "nothing was lost" in idle.notices[0]
    else:
        # The pooler gave the kernel another server connection: nothing to see.
        assert idle.notices == []

    # In a manual transaction: the pooler passes the loss on in both modes.
    kernel.ok("transaction.set_autocommit(False); Order.objects.create(number=3)")
    terminate_server_side(pgbouncer, holding=True)
    lost = kernel.ok("Order.objects.count()")
    assert lost.value() == 2  # the server discarded row 3 with its transaction
    assert len(lost.notices) == 1
    assert "lost a manual transaction with 1 unsaved write (INSERT shop_order)" in lost.notices[0]
    assert kernel.ok("transaction.get_autocommit()").value() is False
    kernel.ok("Order.objects.create(number=4); transaction.commit()")

    assert kernel.failed == 0
    assert committed(pgbouncer.dbname) == [1, 2, 4]


def test_cells_after_pooler_restart_work(kernel, pgbouncer):
    kernel.ok("Order.objects.create(number=1); x = 42")

    pgbouncer.restart()
    idle = kernel.ok("Order.objects.count(), x")
    assert idle.value() == (1, 42)
    assert len(idle.notices) == 1, idle.notices
    assert "closed db 'default'" in idle.notices[0] and "nothing was lost" in idle.notices[0]

    kernel.ok("transaction.set_autocommit(False); Order.objects.create(number=2)")
    pgbouncer.restart()
    lost = kernel.ok("Order.objects.count()")
    assert lost.value() == 1  # the pooler's server connection took row 2's transaction with it
    assert len(lost.notices) == 1, lost.notices
    assert "lost a manual transaction with 1 unsaved write (INSERT shop_order)" in lost.notices[0]
    assert kernel.ok("transaction.get_autocommit()").value() is False
    kernel.ok("Order.objects.create(number=3); transaction.commit()")

    assert kernel.failed == 0
    assert committed(pgbouncer.dbname) == [1, 3]


def test_cell_after_integrity_error_in_manual_transaction_behind_pooler_works(kernel, pgbouncer):
    kernel.ok("Order.objects.create(number=1)")
    kernel.ok("transaction.set_autocommit(False); Order.objects.create(number=2)")
    failed = kernel.run("Order.objects.create(number=1)")
    assert failed.ename == "IntegrityError"
    assert len(failed.notices) == 1
    said = failed.notices[0]
    assert "rolled back db 'default': a failed statement aborted the transaction" in said
    assert "lost 1 unsaved write (INSERT shop_order)" in failed.notices[0]
    # Still in the user's manual transaction mode; the aborted transaction took row 2 with it.
    assert kernel.ok("Order.objects.count(), transaction.get_autocommit()").value() == (1, False)
    kernel.ok("Order.objects.create(number=3); transaction.commit()")
    assert kernel.failed == 1
    assert committed(pgbouncer.dbname) == [1, 3]
