"""Read-only mode: every Django connection refuses writes at the server.

For looking at a production database without fear of a stray ``save()``.
Each backend's own session switch is set on every connection as it connects
(and on the open ones when the mode is turned on or off); the server then
refuses a write with its own error.  A guard against mistakes, not against a
user who ``SET``s it back: a database role that may only read is real safety.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

log = logging.getLogger(__name__)

# vendor: (statement turning it off, statement turning it on).  PostgreSQL and
# MySQL apply theirs from the session's next transaction on.
_SWITCHES = {
    "postgresql": (
        "SET default_transaction_read_only = off",
        "SET default_transaction_read_only = on",
    ),
    "mysql": ("SET SESSION TRANSACTION READ WRITE", "SET SESSION TRANSACTION READ ONLY"),
    "sqlite": ("PRAGMA query_only = OFF", "PRAGMA query_only = ON"),
}

# How each server says it refused a write for that reason.
_PG_READ_ONLY = "25006"  # read_only_sql_transaction
_MYSQL_READ_ONLY = 1792  # ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION
_SQLITE_READ_ONLY = "attempt to write a readonly database"


def supported(wrapper: BaseDatabaseWrapper) -> bool:
    return wrapper.vendor in _SWITCHES


def switch(wrapper: BaseDatabaseWrapper, *, on: bool) -> bool:
    """Set ``wrapper``'s session to refuse writes (or accept them again), if it is connected.

    Run through the driver's own cursor: it is not the user's query, and goes
    through none of Django's execute wrappers.  ``False`` when it could not be
    set (not connected, another backend, a connection that just died: the
    mode is set again when it reconnects).
    """
    statements = _SWITCHES.get(wrapper.vendor)
    raw = wrapper.connection
    if statements is None or raw is None:
        return False
    driver_error: type[Exception] = wrapper.Database.Error  # type: ignore[attr-defined]
    try:
        with contextlib.closing(raw.cursor()) as cursor:
            cursor.execute(statements[on])
    except (driver_error, OSError) as exc:
        log.debug("ipy_dbreset: read-only mode not switched on %s: %s", wrapper.alias, exc)
        return False
    return True


def refused(error: BaseException | None) -> bool:
    """Whether ``error`` is a server refusing a write because its session is read-only."""
    for found in (error, getattr(error, "__cause__", None)):
        if found is None:
            continue
        if _PG_READ_ONLY in (getattr(found, "pgcode", None), getattr(found, "sqlstate", None)):
            return True
        args = getattr(found, "args", ())
        if args and args[0] == _MYSQL_READ_ONLY:
            return True
        if _SQLITE_READ_ONLY in str(found):
            return True
    return False


class ReadOnly:
    """Whether read-only mode is on; sets it on each connection as it connects."""

    def __init__(self) -> None:
        self.on = False  # new connections are switched while True

    def created(self, wrapper: BaseDatabaseWrapper) -> None:
        """``connection_created`` hook, in the thread that connects."""
        if self.on:
            switch(wrapper, on=True)
