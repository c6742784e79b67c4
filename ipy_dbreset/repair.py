"""Repairing a broken Django connection without losing what could still be committed.

The rule: clean up only what the database has already lost.

* A lost connection (or one with a query left running) is closed; Django
  reconnects on the next query.  Its transaction was gone with it.
* An aborted PostgreSQL transaction inside atomic blocks is unwound from the
  innermost block outwards, exactly as Django does when an exception leaves a
  block (roll back to the block's savepoint, or mark the enclosing one), and
  stops as soon as the transaction is usable again, so outer work survives.
* An aborted manual transaction (``set_autocommit(False)``) is rolled back, or
  left to the user when asked to.
* An atomic block that Django marked for rollback while the database still
  holds a usable transaction (SQLite, MySQL, a non-database error) keeps all
  its work: only the mark is cleared.

Every function here works on a wrapper of any thread; the caller decides
whether touching it is safe (see :mod:`ipy_dbreset.tracking`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from django.db import Error

from ipy_dbreset.display import repair_line
from ipy_dbreset.drivers import Transaction, driver_for
from ipy_dbreset.health import Problem, Verdict, judge, open_work
from ipy_dbreset.ledger import kept, ledger_of, lost, tally_of

if TYPE_CHECKING:
    from collections.abc import Iterator

    from django.db.backends.base.base import BaseDatabaseWrapper

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Repair:
    """What was done to one connection, and what (if anything) was lost."""

    alias: str
    action: str
    """What was done, verb first; the connection follows it: ``rolled back``."""
    reason: str
    """Why (empty: asked for): ``a failed statement aborted the transaction``."""
    lost: str | None = None
    """What was lost or kept: ``lost an atomic block with 2 unsaved writes (...)``."""
    thread: str | None = None
    hint: str | None = None
    """What the user needs to know next: ``the next query reconnects``."""
    when: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    keep_manual: bool = False
    """The connection was in manual-transaction mode: reconnect with autocommit off."""

    def describe(self) -> str:
        """One line, without a prefix: ``'rolled back db 'default': ...; lost ...'``."""
        return repair_line(self)


def _transaction(wrapper: BaseDatabaseWrapper) -> Transaction:
    if wrapper.connection is None:
        return Transaction.UNKNOWN
    return driver_for(wrapper.connection).link(wrapper).transaction


def _leave_innermost_atomic_block(wrapper: BaseDatabaseWrapper) -> None:
    """Leave the innermost atomic block as if an exception had propagated out of it.

    This mirrors ``django.db.transaction.Atomic.__exit__`` on its error path
    (``exc_type`` set) as Django 4.2 to 5.2 write it, compared line by line
    with 5.2: an upgrade of Django should compare it again.  It works on a
    given wrapper (``Atomic`` looks the connection up in the current thread,
    which is not always the owner here).
    """
    if wrapper.in_atomic_block:
        wrapper.atomic_blocks.pop()
    sid = None
    if wrapper.savepoint_ids:
        sid = wrapper.savepoint_ids.pop()
    else:
        wrapper.in_atomic_block = False
    try:
        if wrapper.closed_in_transaction:
            pass  # the server rolls back by itself; wait for the outermost block
        else:
            wrapper.needs_rollback = False
            if wrapper.in_atomic_block:
                if sid is None:
                    wrapper.needs_rollback = True
                else:
                    try:
                        wrapper.savepoint_rollback(sid)
                        wrapper.savepoint_commit(sid)
                    except Error:
                        wrapper.needs_rollback = True
            else:
                try:
                    wrapper.rollback()
                except Error:
                    wrapper.close()
    finally:
        if not wrapper.in_atomic_block:
            if wrapper.closed_in_transaction:
                wrapper.connection = None
            else:
                wrapper.set_autocommit(True)
        elif not wrapper.savepoint_ids and not wrapper.commit_on_exit:
            if wrapper.closed_in_transaction:
                wrapper.connection = None
            else:
                wrapper.in_atomic_block = False


class _Expected(logging.Filter):
    """Hide the pool's warnings about connections we are knowingly discarding."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("discarding closed", "discarding broken"))


@contextlib.contextmanager
def _quiet_pool() -> Iterator[None]:
    pool_log = logging.getLogger("psycopg.pool")
    expected = _Expected()
    pool_log.addFilter(expected)
    try:
        yield
    finally:
        pool_log.removeFilter(expected)


def _pool(wrapper: BaseDatabaseWrapper) -> Any:
    """The wrapper's connection pool (Django 5.1+ PostgreSQL with psycopg 3), if it uses one."""
    if "pool" not in wrapper.settings_dict.get("OPTIONS", {}):
        return None
    return getattr(wrapper, "pool", None)


def _drop(wrapper: BaseDatabaseWrapper) -> None:
    """Close a connection that cannot be used again and forget its transaction."""
    raw = wrapper.connection
    if raw is not None:
        # Close the driver connection first so that a pool (Django 5.1+) sees
        # it closed and discards it instead of handing it out again.  Closing a
        # dead connection may fail in the driver or on the socket: it is
        # being discarded either way (as Django's db/utils.py narrows
        # through the backend's own Database.Error).
        driver_error: type[Exception] = wrapper.Database.Error  # type: ignore[attr-defined]
        with contextlib.suppress(driver_error, OSError):
            raw.close()
    with _quiet_pool(), contextlib.suppress(Error):
        wrapper.close()
    if wrapper.in_atomic_block:
        wrapper.closed_in_transaction = True
        while wrapper.in_atomic_block:
            _leave_innermost_atomic_block(wrapper)
    wrapper.connection = None
    ledger = ledger_of(wrapper)
    if ledger is not None:
        ledger.clear()  # its transaction went with the connection


def repair(
    wrapper: BaseDatabaseWrapper,
    verdict: Verdict,
    *,
    thread: str | None = None,
    leave_manual_transactions: bool = False,
) -> Repair:
    """Repair ``wrapper`` according to ``verdict`` and say what was done.

    Run it where touching ``wrapper`` is allowed (:func:`ipy_dbreset.tracking.touching`).
    """
    done = _repair(wrapper, verdict, thread, leave_manual_transactions)
    log.info("ipy_dbreset: %s", done.describe())
    return done


def _repair(
    wrapper: BaseDatabaseWrapper,
    verdict: Verdict,
    thread: str | None,
    leave_manual: bool,
) -> Repair:
    alias = wrapper.alias
    reason = verdict.reason
    if verdict.problem is Problem.STUCK and driver_for(wrapper.connection).settle(wrapper):
        return Repair(
            alias,
            "dropped an interrupted query's unread result on",
            "the query had run to its end on the server",
            thread=thread,
            hint="the transaction is kept",
        )
    if verdict.problem in (Problem.LOST, Problem.STUCK):
        work = open_work(wrapper)
        tally = tally_of(wrapper)
        manual = wrapper.connection is not None and not wrapper.autocommit
        manual = manual and not wrapper.in_atomic_block
        _drop(wrapper)
        pool = _pool(wrapper)
        if pool is not None and not pool.closed:
            # Whatever killed this connection (a server restart, a DBA) most
            # likely killed its idle siblings in the pool too: check them now,
            # so that the next query does not get one of them.
            with _quiet_pool():
                pool.check()
        return Repair(
            alias,
            "closed",
            reason,
            lost=lost(work, tally) if work else None,
            thread=thread,
            hint=_next_query(manual, lost=None if work else "nothing was lost"),
            keep_manual=manual,
        )
    if verdict.problem is Problem.ABORTED and not wrapper.in_atomic_block:
        if leave_manual:
            return Repair(
                alias,
                "did not roll back",
                reason,
                thread=thread,
                hint="run transaction.rollback() (or %dbreset) to continue",
            )
        tally = tally_of(wrapper)
        wrapper.rollback()
        return Repair(
            alias,
            "rolled back",
            reason,
            lost=lost(None, tally),
            thread=thread,
            # The user turned autocommit off (Django's flag, outside atomic blocks).
            hint=None
            if wrapper.get_autocommit()
            else "autocommit is still off, so the next query opens a new transaction",
        )
    if verdict.problem is Problem.ABORTED:
        depth = len(wrapper.atomic_blocks)
        before = tally_of(wrapper)
        while wrapper.in_atomic_block and (
            wrapper.needs_rollback or _transaction(wrapper) is Transaction.INERROR
        ):
            _leave_innermost_atomic_block(wrapper)
        left = depth - len(wrapper.atomic_blocks)
        # The ledger saw the unwinding's ROLLBACK TO SAVEPOINT: what it still
        # holds is the outer blocks' work.
        after = tally_of(wrapper) if wrapper.in_atomic_block else None
        gone = before if before is None or after is None else before - after
        if not wrapper.in_atomic_block:
            return Repair(
                alias,
                "rolled back",
                reason,
                lost=lost(_blocks(left), gone),
                thread=thread,
            )
        outer = len(wrapper.atomic_blocks)
        return Repair(
            alias,
            f"rolled back {_blocks(left, inner=True)} on",
            reason,
            lost=f"{lost(None, gone)}; {kept(_blocks(outer, outer=True, noun='block'), after)}",
            thread=thread,
        )
    # Problem.MARKED: the database still holds a usable transaction.
    wrapper.needs_rollback = False
    return Repair(
        alias,
        "cleared Django's rollback mark on",
        reason,
        lost=kept(_blocks(len(wrapper.atomic_blocks), noun="block"), tally_of(wrapper)),
        thread=thread,
        hint="%dbreset discards them",
    )


def _next_query(manual: bool, *, lost: str | None) -> str:
    """``nothing was lost, the next query reconnects (with autocommit off, as you had it)``."""
    text = "the next query reconnects"
    if manual:
        text += " with autocommit off, as you had it"
    return text if lost is None else f"{lost}, {text}"


def _blocks(n: int, *, inner: bool = False, outer: bool = False, noun: str = "atomic block") -> str:
    """``the atomic block``, ``the inner atomic block``, ``2 outer blocks``.

    ``noun="block"`` once the notice has said "atomic block" already.
    """
    kind = "inner " if inner else "outer " if outer else ""
    return f"the {kind}{noun}" if n == 1 else f"{n} {kind}{noun}s"


def reset(wrapper: BaseDatabaseWrapper, *, thread: str | None = None) -> Repair | None:
    """Roll back whatever ``wrapper`` holds and close it, on the user's request.

    Returns ``None`` when there was nothing to reset (not connected).  Run it
    where touching ``wrapper`` is allowed (:func:`ipy_dbreset.tracking.touching`).
    """
    if wrapper.connection is None and not wrapper.in_atomic_block:
        return None
    work = open_work(wrapper)
    tally = tally_of(wrapper)
    # The user's mode, from Django's own flags: autocommit off outside atomic
    # blocks, or an outermost block entered with it off (Atomic then leaves
    # commit_on_exit False and autocommit alone).
    manual = wrapper.connection is not None and not wrapper.autocommit
    manual = manual and (not wrapper.in_atomic_block or not wrapper.commit_on_exit)
    if wrapper.connection is None or judge(wrapper) is not None:
        # Nothing in it can be committed any more; do not try.
        _drop(wrapper)
    else:
        if not wrapper.in_atomic_block and _transaction(wrapper) is Transaction.IDLE:
            work = None
        while wrapper.in_atomic_block:
            wrapper.needs_rollback = True
            _leave_innermost_atomic_block(wrapper)
        if not wrapper.get_autocommit():
            wrapper.rollback()
        # A healthy connection goes back to its pool, if it has one.
        wrapper.close()
    done = Repair(
        wrapper.alias,
        "reset",
        "",
        lost=lost(work, tally, verb="rolled back") if work else None,
        thread=thread,
        hint=_next_query(manual, lost=None if work else "nothing was open"),
        keep_manual=manual,
    )
    log.info("ipy_dbreset: %s", done.describe())
    return done
