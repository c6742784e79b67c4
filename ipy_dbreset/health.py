"""Judging a Django connection's health, from local state only.

The verdict is built from Django's own bookkeeping (``in_atomic_block``,
``needs_rollback``, ``closed_in_transaction``, ``errors_occurred``) and from
what the driver knows without talking to the server (see
:mod:`ipy_dbreset.drivers`).  A healthy connection costs no round trip; only a
local sign of trouble, or an explicit ``suspect=True``, may buy one.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from ipy_dbreset.drivers import Liveness, Transaction, driver_for
from ipy_dbreset.ledger import status_text, tally_of

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper


class Problem(Enum):
    """What can be wrong with a connection, in the order they are looked for."""

    LOST = "the connection to the server was lost"
    STUCK = "a query was left unfinished"
    ABORTED = "the transaction was aborted by an error"
    MARKED = "the open atomic block was marked for rollback after an error"


@dataclass(frozen=True)
class Verdict:
    """A broken connection and why it is judged so."""

    problem: Problem
    reason: str


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
            return Verdict(Problem.LOST, "closed inside an atomic block")
        return None
    if wrapper.closed_in_transaction:
        return Verdict(Problem.LOST, "closed inside an atomic block")
    driver = driver_for(raw)
    link = driver.link(wrapper)
    if link.closed:
        return Verdict(Problem.LOST, "the driver reports it closed")
    if link.pending or suspect:
        liveness = driver.liveness(wrapper)
        if liveness is Liveness.LOST:
            return Verdict(Problem.LOST, "the server closed it")
        if liveness is Liveness.UNREAD:
            return Verdict(Problem.STUCK, "an interrupted query's result")
    if link.transaction is Transaction.INERROR:
        return Verdict(Problem.ABORTED, "a statement failed")
    if link.transaction is Transaction.ACTIVE:
        return Verdict(Problem.STUCK, "still running")
    if wrapper.in_atomic_block and wrapper.needs_rollback:
        return Verdict(Problem.MARKED, "a query failed inside it")
    return None


def open_work(wrapper: BaseDatabaseWrapper) -> str | None:
    """Describe the uncommitted work a connection holds, or ``None``.

    Uses only Django's bookkeeping, so it is safe on a dead connection.
    """
    if wrapper.in_atomic_block:
        depth = len(wrapper.atomic_blocks)
        return "an atomic block" if depth <= 1 else f"{depth} nested atomic blocks"
    if wrapper.connection is not None and not wrapper.autocommit:
        return "a manual transaction"
    return None


@dataclass(frozen=True)
class Snapshot:
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


def snapshot(wrapper: BaseDatabaseWrapper) -> Snapshot:
    raw = wrapper.connection
    driver = driver_for(raw) if raw is not None else None
    if raw is None or driver is None:
        transaction = "not connected"
        if wrapper.in_atomic_block:
            transaction += f", atomic block depth {len(wrapper.atomic_blocks)}"
        return Snapshot(
            wrapper.alias,
            wrapper.vendor,
            "-",
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
        transaction = "aborted"
    elif link.transaction is Transaction.ACTIVE:
        transaction = "query running"
    elif wrapper.in_atomic_block:
        transaction = f"in atomic block (depth {len(wrapper.atomic_blocks)})"
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
