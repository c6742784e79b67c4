"""Judging a Django connection's health, from local state only.

The verdict is built from Django's own bookkeeping (``in_atomic_block``,
``needs_rollback``, ``closed_in_transaction``, ``errors_occurred``) and from
what the driver knows without talking to the server (see
:mod:`ipy_dbreset.drivers`).  A healthy connection costs no round trip; only a
local sign of trouble, or an explicit ``suspect=True``, may buy one.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, NamedTuple

from ipy_dbreset.drivers import Liveness, Transaction, driver_for
from ipy_dbreset.ledger import status_text, tally_of
from ipy_dbreset.transactions import state_of

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper


class Problem(Enum):
    """What can be wrong with a connection, in the order they are looked for."""

    LOST = "the connection to the server was lost"
    STUCK = "a query was left unfinished"
    ABORTED = "the transaction was aborted by an error"
    MARKED = "the open atomic block was marked for rollback after an error"


_CLOSED_IN_BLOCK = "the connection was closed mid-transaction"


class Verdict(NamedTuple):
    """A broken connection and why it is judged so."""

    problem: Problem
    reason: str
    """Why, as a notice says it: ``a failed statement aborted the transaction``."""


def judge(wrapper: BaseDatabaseWrapper, *, suspect: bool = False) -> Verdict | None:
    """Return what is wrong with ``wrapper``, or ``None`` if nothing is.

    Parameters
    ----------
    wrapper
        A Django connection (``django.db.connections[alias]``), of any thread.
    suspect
        Something outside the connection (the cell was interrupted) makes a
        silent failure plausible: confirm liveness with the driver even if the
        local state looks fine.  This may cost one round trip.
    """
    raw = wrapper.connection
    if raw is None:
        if wrapper.in_atomic_block:
            return Verdict(Problem.LOST, _CLOSED_IN_BLOCK)
        return None
    if wrapper.closed_in_transaction:
        return Verdict(Problem.LOST, _CLOSED_IN_BLOCK)
    driver = driver_for(raw)
    link = driver.link(wrapper)
    if link.closed:
        return Verdict(Problem.LOST, "the driver found the connection closed")
    if link.pending or suspect:
        liveness = driver.liveness(wrapper)
        if liveness is Liveness.LOST:
            return Verdict(Problem.LOST, "the server closed the connection")
        if liveness is Liveness.UNREAD:
            return Verdict(Problem.STUCK, "an interrupted query left its result unread")
    if link.transaction is Transaction.INERROR:
        # After an interrupt the failed statement is, most likely, the cancelled query.
        cause = "a cancelled query" if suspect else "a failed statement"
        return Verdict(Problem.ABORTED, f"{cause} aborted the transaction")
    if link.transaction is Transaction.ACTIVE and not driver.streaming(wrapper):
        # (A stream() the user still reads from is theirs: finishing it and
        # committing keeps the transaction.)
        return Verdict(Problem.STUCK, "a query was left running")
    if wrapper.in_atomic_block and wrapper.needs_rollback:
        return Verdict(Problem.MARKED, "a query failed inside the atomic block")
    return None


def open_work(wrapper: BaseDatabaseWrapper) -> str | None:
    """Describe the uncommitted work a connection holds, or ``None``.

    Uses only Django's bookkeeping, so it is safe on a dead connection.
    """
    state = state_of(wrapper)
    if state.in_atomic_block:
        blocks = "an atomic block" if state.blocks <= 1 else f"{state.blocks} nested atomic blocks"
        if not state.manual:
            return blocks
        # Autocommit was off around the outermost block; with no block left,
        # Django is still in the user's manual transaction.
        return f"a manual transaction and {blocks}" if state.blocks else "a manual transaction"
    if state.manual:
        return "a manual transaction"
    return None


class Snapshot(NamedTuple):
    """What ``%dbstatus`` shows of a connection; read locally, never connecting."""

    alias: str
    vendor: str
    driver: str
    database: str
    connected: bool
    server_id: int | None
    transaction: str
    autocommit: bool | None
    holds: str = ""
    """What the open transaction holds and for how long: ``2 writes, open 12 s``."""


def _where(settings: dict[str, object]) -> str:
    """Host, port and database name; never the user or password."""
    name = str(settings.get("NAME") or "")
    host = str(settings.get("HOST") or "")
    port = str(settings.get("PORT") or "")
    if not host:
        return name
    return f"{host}:{port}/{name}" if port else f"{host}/{name}"


def settings_driver(wrapper: BaseDatabaseWrapper) -> str:
    """The driver the backend in ``ENGINE`` uses, named as :mod:`ipy_dbreset.drivers` names it.

    Read from the backend's ``Database`` module, so that it is known before
    the first connection (``MySQLdb`` is mysqlclient's).
    """
    module = getattr(getattr(wrapper, "Database", None), "__name__", None)
    if not isinstance(module, str):
        return wrapper.vendor
    package = module.split(".", 1)[0]
    return "mysqlclient" if package in {"MySQLdb", "_mysql"} else package


def snapshot(wrapper: BaseDatabaseWrapper) -> Snapshot:
    raw = wrapper.connection
    driver = driver_for(raw) if raw is not None else None
    if raw is None or driver is None:
        transaction = "not connected"
        if wrapper.in_atomic_block:
            transaction += f", in {open_work(wrapper)}"
        return Snapshot(
            wrapper.alias,
            wrapper.vendor,
            settings_driver(wrapper),
            _where(wrapper.settings_dict),
            False,
            None,
            transaction,
            None,
        )
    link = driver.link(wrapper)
    if link.closed:
        transaction = "closed by the driver"
    elif link.transaction is Transaction.INERROR:
        transaction = "aborted transaction"
    elif link.transaction is Transaction.ACTIVE:
        transaction = "streaming a result" if driver.streaming(wrapper) else "query running"
    elif wrapper.in_atomic_block:
        transaction = f"in {open_work(wrapper)}"
        if wrapper.needs_rollback:
            transaction += ", marked for rollback"
    elif link.transaction is Transaction.INTRANS or (
        link.transaction is Transaction.UNKNOWN and not wrapper.autocommit
    ):
        transaction = "in a transaction"
    else:
        transaction = "idle"
    in_transaction = wrapper.in_atomic_block or not wrapper.autocommit
    return Snapshot(
        wrapper.alias,
        wrapper.vendor,
        driver.name,
        _where(wrapper.settings_dict),
        not link.closed,
        None if link.closed else driver.server_id(wrapper),
        transaction,
        bool(wrapper.autocommit),
        status_text(tally_of(wrapper)) if in_transaction else "",
    )


def cancelled(error: BaseException | None) -> bool:
    """Whether a cell failed because its query was cancelled (the stop button, psycopg2).

    PostgreSQL's SQLSTATE 57014, on the driver's error that Django wraps.
    """
    cause = getattr(error, "__cause__", None)
    return any(
        getattr(e, "pgcode", None) == "57014" or getattr(e, "sqlstate", None) == "57014"
        for e in (error, cause)
    )
