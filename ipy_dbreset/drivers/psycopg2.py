"""psycopg2: libpq's state through the connection's own methods."""

from __future__ import annotations

from typing import TYPE_CHECKING

import psycopg2
import psycopg2.extensions

from ipy_dbreset.drivers.base import (
    FastCheck,
    Link,
    Liveness,
    Transaction,
    libpq_transaction,
    readable,
)

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper


class Psycopg2:
    name = "psycopg2"

    def link(self, wrapper: BaseDatabaseWrapper) -> Link:
        raw = wrapper.connection
        # libpq may have dropped the socket (fileno -1) before psycopg2 noticed.
        if raw.closed or raw.fileno() < 0:
            return Link(closed=True, transaction=Transaction.UNKNOWN, pending=False)
        return Link(
            closed=False,
            transaction=libpq_transaction(raw.get_transaction_status()),
            pending=readable(raw.fileno()),
        )

    def liveness(self, wrapper: BaseDatabaseWrapper) -> Liveness:
        raw = wrapper.connection
        if raw.closed or raw.fileno() < 0:
            return Liveness.LOST
        before = {id(notice) for notice in raw.notices}
        # poll() reads what the server sent without sending anything; on EOF it
        # raises and marks the connection closed.  The server's "terminating
        # connection" may arrive before its EOF: psycopg2 files it as a notice.
        for _ in range(3):
            try:
                raw.poll()
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                return Liveness.LOST
            if raw.closed:
                return Liveness.LOST
            if any(
                id(notice) not in before and notice.startswith(("FATAL:", "PANIC:"))
                for notice in raw.notices
            ):
                return Liveness.LOST
            if raw.fileno() < 0:
                return Liveness.LOST
            if not readable(raw.fileno()):
                return Liveness.ALIVE
        return Liveness.ALIVE

    def server_closed(self, wrapper: BaseDatabaseWrapper) -> bool:
        raw = wrapper.connection
        if raw.closed or raw.fileno() < 0:
            return True
        # See Psycopg.server_closed: unsolicited input is read, never answered.
        return readable(raw.fileno()) and self.liveness(wrapper) is Liveness.LOST

    def settle(self, wrapper: BaseDatabaseWrapper) -> bool:
        return False  # libpq has no safe way to drain a query left running

    def fast_check(self, wrapper: BaseDatabaseWrapper) -> FastCheck:
        raw = wrapper.connection
        status = raw.get_transaction_status
        usable = frozenset(
            (
                psycopg2.extensions.TRANSACTION_STATUS_IDLE,
                psycopg2.extensions.TRANSACTION_STATUS_INTRANS,
            )
        )

        def healthy() -> bool:
            if raw.closed:
                return False
            return status() in usable

        return healthy

    def fileno(self, wrapper: BaseDatabaseWrapper) -> int:
        raw = wrapper.connection
        return -1 if raw is None or raw.closed else int(raw.fileno())

    def server_id(self, wrapper: BaseDatabaseWrapper) -> int | None:
        raw = wrapper.connection
        if raw is None or raw.closed:
            return None
        return int(raw.info.backend_pid)

    def streaming(self, wrapper: BaseDatabaseWrapper) -> bool:
        return False

    def waiting(self, wrapper: BaseDatabaseWrapper) -> bool:
        raw = wrapper.connection
        # Without a wait callback psycopg2 waits inside libpq, in C.
        if raw.closed or psycopg2.extensions.get_wait_callback() is None:
            return False
        return bool(raw.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_ACTIVE)

    def parameter(self, wrapper: BaseDatabaseWrapper, name: str) -> str | None:
        raw = wrapper.connection
        if raw is None or raw.closed:
            return None
        value = raw.get_parameter_status(name)
        return None if value is None else str(value)


def make_interruptible(on: bool) -> bool:
    """Let Ctrl-C cancel a running psycopg2 query, or stop doing so.

    psycopg2 waits for the server inside libpq, where an interrupt cannot
    reach it; with psycopg2's own ``wait_select`` callback the wait happens in
    Python, and an interrupt sends a cancel request.  The price is psycopg2's
    "green" mode, where COPY and large objects are unavailable, hence opt-in.
    Returns whether this call changed anything; a callback set by someone
    else is never replaced or removed.
    """
    import psycopg2.extensions
    import psycopg2.extras

    current = psycopg2.extensions.get_wait_callback()
    if on and current is None:
        psycopg2.extensions.set_wait_callback(psycopg2.extras.wait_select)
        return True
    if not on and current is psycopg2.extras.wait_select:
        psycopg2.extensions.set_wait_callback(None)
        return True
    return False
