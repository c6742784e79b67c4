"""psycopg 3: libpq's state is exposed directly on ``Connection.pgconn``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import psycopg
from psycopg import pq

from ipy_dbreset.drivers import Link, Liveness, Transaction, libpq_transaction, readable

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper


class Psycopg:
    name = "psycopg"

    def link(self, wrapper: BaseDatabaseWrapper) -> Link:
        raw: psycopg.Connection[object] = wrapper.connection
        if raw.closed or raw.broken or raw.pgconn.status != pq.ConnStatus.OK:
            return Link(closed=True, transaction=Transaction.UNKNOWN, pending=False)
        return Link(
            closed=False,
            transaction=libpq_transaction(raw.pgconn.transaction_status),
            pending=readable(raw.pgconn.socket),
        )

    def liveness(self, wrapper: BaseDatabaseWrapper) -> Liveness:
        pgconn = wrapper.connection.pgconn
        # PQconsumeInput never blocks; a server that has gone away shows as EOF.
        # The termination notice and the EOF may arrive in two reads.
        for _ in range(3):
            try:
                pgconn.consume_input()
            except psycopg.OperationalError:
                return Liveness.LOST
            if pgconn.status != pq.ConnStatus.OK:
                return Liveness.LOST
            if not readable(pgconn.socket):
                return Liveness.ALIVE
        return Liveness.ALIVE

    def settle(self, wrapper: BaseDatabaseWrapper) -> bool:
        return False  # libpq has no safe way to drain a query left running

    def server_id(self, wrapper: BaseDatabaseWrapper) -> int | None:
        raw = wrapper.connection
        if raw is None or raw.closed:
            return None
        return int(raw.pgconn.backend_pid)
