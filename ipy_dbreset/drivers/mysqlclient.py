"""mysqlclient (MySQLdb): little local state, so a local signal buys one ping."""

from __future__ import annotations

from typing import TYPE_CHECKING

import MySQLdb
from MySQLdb.constants import CR

from ipy_dbreset.drivers.base import FastCheck, Link, Liveness, Transaction, readable

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper


class MySQLClient:
    name = "mysqlclient"

    def link(self, wrapper: BaseDatabaseWrapper) -> Link:
        raw = wrapper.connection
        if not raw.open:
            return Link(closed=True, transaction=Transaction.UNKNOWN, pending=False)
        # The MySQL protocol sends nothing unsolicited to an idle client: any
        # input, or a previous error that may have been "server has gone away",
        # means the connection must be checked.
        return Link(
            closed=False,
            transaction=Transaction.UNKNOWN,
            pending=wrapper.errors_occurred or readable(raw.fileno()),
        )

    def liveness(self, wrapper: BaseDatabaseWrapper) -> Liveness:
        try:
            wrapper.connection.ping()
        except MySQLdb.ProgrammingError as exc:
            # An interrupt between sending a query and reading its result
            # leaves the client "out of sync": libmariadb refuses before
            # sending anything.  The server finished the query; the
            # connection and its transaction are alive.
            if exc.args and exc.args[0] == CR.COMMANDS_OUT_OF_SYNC:
                return Liveness.UNREAD
            return Liveness.LOST
        except MySQLdb.Error:
            return Liveness.LOST
        return Liveness.ALIVE

    def settle(self, wrapper: BaseDatabaseWrapper) -> bool:
        raw = wrapper.connection
        try:
            raw.store_result()
            while raw.next_result() == 0:
                raw.store_result()
            raw.ping()
        except MySQLdb.Error:
            return False
        return True

    def server_closed(self, wrapper: BaseDatabaseWrapper) -> bool:
        raw = wrapper.connection
        if not raw.open:
            return True
        # An idle MySQL connection receives nothing unless the server is leaving
        # (KILL, wait_timeout, shutdown): only then is a ping worth its round trip.
        return readable(raw.fileno()) and self.liveness(wrapper) is Liveness.LOST

    def fast_check(self, wrapper: BaseDatabaseWrapper) -> FastCheck:
        raw = wrapper.connection

        def healthy() -> bool:
            # A previous error may have been "server has gone away": check it.
            return bool(raw.open) and not wrapper.errors_occurred

        return healthy

    def fileno(self, wrapper: BaseDatabaseWrapper) -> int:
        raw = wrapper.connection
        return int(raw.fileno()) if raw is not None and raw.open else -1

    def server_id(self, wrapper: BaseDatabaseWrapper) -> int | None:
        raw = wrapper.connection
        if raw is None or not raw.open:
            return None
        return int(raw.thread_id())

    def streaming(self, wrapper: BaseDatabaseWrapper) -> bool:
        return False

    def waiting(self, wrapper: BaseDatabaseWrapper) -> bool:
        return False  # libmariadb waits in C: a signal handler runs only afterwards

    def parameter(self, wrapper: BaseDatabaseWrapper, name: str) -> str | None:
        return None  # MySQL reports no settings by itself
