"""psycopg2: libpq's state through the connection's own methods."""

from __future__ import annotations

from typing import TYPE_CHECKING

import psycopg2

from ipy_dbreset.drivers import Link, Liveness, Transaction, libpq_transaction, readable

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper


class Psycopg2:
    name = "psycopg2"

    def link(self, wrapper: BaseDatabaseWrapper) -> Link:
        raw = wrapper.connection
        if raw.closed:
            return Link(closed=True, transaction=Transaction.UNKNOWN, pending=False)
        return Link(
            closed=False,
            transaction=libpq_transaction(raw.get_transaction_status()),
            pending=readable(raw.fileno()),
        )

    def liveness(self, wrapper: BaseDatabaseWrapper) -> Liveness:
        raw = wrapper.connection
        # poll() reads what the server sent without sending anything; on EOF it
        # raises and marks the connection closed.
        for _ in range(3):
            try:
                raw.poll()
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                return Liveness.LOST
            if raw.closed:
                return Liveness.LOST
            if not readable(raw.fileno()):
                return Liveness.ALIVE
        return Liveness.ALIVE

    def settle(self, wrapper: BaseDatabaseWrapper) -> bool:
        return False  # libpq has no safe way to drain a query left running

    def server_id(self, wrapper: BaseDatabaseWrapper) -> int | None:
        raw = wrapper.connection
        if raw is None or raw.closed:
            return None
        return int(raw.info.backend_pid)
