"""mysqlclient (MySQLdb): little local state, so a local signal buys one ping."""

from __future__ import annotations

from typing import TYPE_CHECKING

import MySQLdb

from ipy_dbreset.drivers import Link, Transaction, readable

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

    def lost(self, wrapper: BaseDatabaseWrapper) -> bool:
        try:
            wrapper.connection.ping()
        except MySQLdb.Error:
            return True
        return False

    def server_id(self, wrapper: BaseDatabaseWrapper) -> int | None:
        raw = wrapper.connection
        if raw is None or not raw.open:
            return None
        return int(raw.thread_id())
