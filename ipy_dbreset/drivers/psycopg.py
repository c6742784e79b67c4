"""psycopg 3: libpq's state is exposed directly on ``Connection.pgconn``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import psycopg
from psycopg import pq

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
        severities: list[bytes | None] = []
        previous = pgconn.notice_handler

        def notice(result: pq.abc.PGresult) -> None:
            severities.append(result.error_field(pq.DiagnosticField.SEVERITY_NONLOCALIZED))
            if previous is not None:
                previous(result)

        pgconn.notice_handler = notice
        try:
            # PQconsumeInput never blocks; a server that has gone away shows as
            # EOF.  It may have sent "terminating connection" before closing:
            # parsing it (is_busy) hands that unsolicited error to the notice
            # handler, so it is seen even if the EOF has not arrived yet.
            for _ in range(3):
                try:
                    pgconn.consume_input()
                except psycopg.OperationalError:
                    return Liveness.LOST
                if pgconn.status != pq.ConnStatus.OK:
                    return Liveness.LOST
                pgconn.is_busy()
                if b"FATAL" in severities or b"PANIC" in severities:
                    return Liveness.LOST
                if not readable(pgconn.socket):
                    return Liveness.ALIVE
            return Liveness.ALIVE
        finally:
            pgconn.notice_handler = previous

    def server_closed(self, wrapper: BaseDatabaseWrapper) -> bool:
        raw: psycopg.Connection[object] = wrapper.connection
        if raw.closed or raw.broken or raw.pgconn.status != pq.ConnStatus.OK:
            return True
        # A terminating backend sends "FATAL: terminating connection" and hangs
        # up; unsolicited input may also be harmless (a NOTIFY, a parameter
        # change), hence the closer look, which reads but never sends.
        return readable(raw.pgconn.socket) and self.liveness(wrapper) is Liveness.LOST

    def settle(self, wrapper: BaseDatabaseWrapper) -> bool:
        return False  # libpq has no safe way to drain a query left running

    def fast_check(self, wrapper: BaseDatabaseWrapper) -> FastCheck:
        pgconn = wrapper.connection.pgconn
        usable = frozenset((pq.TransactionStatus.IDLE, pq.TransactionStatus.INTRANS))

        def healthy() -> bool:
            try:
                status = pgconn.transaction_status  # UNKNOWN once the connection is bad
            except psycopg.Error:
                return False
            return status in usable

        return healthy

    def fileno(self, wrapper: BaseDatabaseWrapper) -> int:
        raw = wrapper.connection
        if raw is None or raw.closed:
            return -1
        try:
            return int(raw.pgconn.socket)
        except psycopg.Error:  # libpq has dropped the socket already
            return -1

    def server_id(self, wrapper: BaseDatabaseWrapper) -> int | None:
        raw = wrapper.connection
        if raw is None or raw.closed:
            return None
        return int(raw.pgconn.backend_pid)

    def streaming(self, wrapper: BaseDatabaseWrapper) -> bool:
        # Cursor.stream() (psycopg 3.1 to 3.3) holds the connection's lock from its
        # first row to its last: a generator suspended between cells holds it still.
        # A query interrupted or left by an error has let go of it.
        raw = wrapper.connection
        try:
            active = raw.pgconn.transaction_status == pq.TransactionStatus.ACTIVE
        except psycopg.Error:
            return False
        lock = getattr(raw, "lock", None)
        return bool(active and lock is not None and lock.locked())

    def waiting(self, wrapper: BaseDatabaseWrapper) -> bool:
        raw = wrapper.connection
        try:
            return bool(raw.pgconn.transaction_status == pq.TransactionStatus.ACTIVE)
        except psycopg.Error:
            return False

    def parameter(self, wrapper: BaseDatabaseWrapper, name: str) -> str | None:
        raw = wrapper.connection
        if raw is None or raw.closed:
            return None
        value: str | None = raw.info.parameter_status(name)
        return value
