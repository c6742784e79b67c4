"""A COMMIT whose answer never came: asking PostgreSQL whether it committed.

See ``docs/internals.md`` (A COMMIT whose answer never came).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from django.db import Error

from ipy_dbreset.drivers import Transaction, driver_for

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

log = logging.getLogger(__name__)

WAIT = 2.0
"""Seconds to wait for a COMMIT the server is still finishing (its backend ending)."""


LOST_BEFORE = -1
"""What :func:`transaction_id` returns when the connection failed it: no COMMIT can
reach the server after that, and a server that lost its session rolls back."""


def transaction_id(wrapper: BaseDatabaseWrapper) -> int | None:
    """The id of ``wrapper``'s open PostgreSQL transaction, noted before its COMMIT.

    ``None`` on other databases, and whenever it cannot be read (the COMMIT
    goes ahead all the same, untouched); :data:`LOST_BEFORE` when the
    connection failed the question.
    """
    raw = wrapper.connection
    # PostgreSQL itself, not a look-alike on the same backend (CockroachDB's):
    # a function the server lacks would abort the very transaction being committed.
    if wrapper.display_name != "PostgreSQL" or raw is None:
        return None
    driver_error: type[Exception] = wrapper.Database.Error  # type: ignore[attr-defined]
    try:
        if driver_for(raw).link(wrapper).transaction is not Transaction.INTRANS:
            return None  # aborted, or nothing open: the COMMIT cannot write
        with raw.cursor() as cursor:  # the driver's cursor: no execute wrapper sees it
            cursor.execute("SELECT txid_current_if_assigned()")
            row = cursor.fetchone()
    except (driver_error, OSError) as exc:
        log.debug("ipy_dbreset: %s: no transaction id before COMMIT: %s", wrapper.alias, exc)
        try:
            lost = driver_for(raw).link(wrapper).closed
        except (driver_error, OSError):
            lost = True
        return LOST_BEFORE if lost else None
    return None if row is None or row[0] is None else int(row[0])


CANCELLED = "57014"
"""SQLSTATE query_canceled: the stop button's cancel reached the COMMIT in time."""


def refused(wrapper: BaseDatabaseWrapper, exc: BaseException) -> str | None:
    """Why a COMMIT that raised ``exc`` is known to have rolled back, if it is.

    An error answer (not a lost connection, not an interrupt) on a
    connection still idle: the server refused it, and ended the transaction.
    """
    raw = wrapper.connection
    if not isinstance(exc, Error) or raw is None:
        return None
    driver_error: type[Exception] = wrapper.Database.Error  # type: ignore[attr-defined]
    try:
        if driver_for(raw).link(wrapper).transaction is not Transaction.IDLE:
            return None
    except (driver_error, OSError):
        return None
    cause = exc.__cause__ or exc  # Django's error wraps the driver's
    code = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
    if code == CANCELLED:
        return "its COMMIT was cancelled"
    return f"the server refused its COMMIT ({type(exc).__name__})"


def ask(wrapper: BaseDatabaseWrapper, xid: int) -> str | None:
    """``"committed"``, ``"aborted"`` or ``None`` (not known), as the server tells of ``xid``.

    On a connection of its own, made with the wrapper's parameters and closed
    at once: the wrapper's own may be dead, or in the user's next transaction.
    """
    driver_error: type[Exception] = wrapper.Database.Error  # type: ignore[attr-defined]
    deadline = time.monotonic() + WAIT
    try:
        raw: Any = wrapper.Database.connect(**wrapper.get_connection_params())  # type: ignore[attr-defined]
    except (driver_error, OSError) as exc:
        log.debug("ipy_dbreset: %s: could not ask about a COMMIT: %s", wrapper.alias, exc)
        return None
    try:
        while True:
            with raw.cursor() as cursor:
                cursor.execute("SELECT txid_status(%s)", (xid,))
                row = cursor.fetchone()
            raw.rollback()
            status = None if row is None else row[0]
            # "in progress": its backend is still ending; soon it is one of the others.
            if status != "in progress" or time.monotonic() > deadline:
                return status if status in ("committed", "aborted") else None
            time.sleep(0.05)
    except (driver_error, OSError) as exc:
        log.debug("ipy_dbreset: %s: could not ask about a COMMIT: %s", wrapper.alias, exc)
        return None
    finally:
        with contextlib.suppress(driver_error, OSError):
            raw.close()
