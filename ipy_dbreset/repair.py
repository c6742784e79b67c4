"""Repairing a broken connection without losing what could still be committed.

Only what the database has already lost is cleaned up; which repair fits which
transaction state: ``docs/internals.md`` (Repairing without losing work).  The
caller decides whether another thread's wrapper may be touched (``tracking``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

from django.db import Error

from ipy_dbreset.drivers import Transaction, driver_for
from ipy_dbreset.health import Problem, Verdict, judge, open_work
from ipy_dbreset.ledger import kept, ledger_of, lost, tally_of
from ipy_dbreset.records import Repair
from ipy_dbreset.transactions import Point, TxState, state_of

if TYPE_CHECKING:
    from collections.abc import Iterator

    from django.db.backends.base.base import BaseDatabaseWrapper

log = logging.getLogger(__name__)


def _transaction(wrapper: BaseDatabaseWrapper) -> Transaction:
    if wrapper.connection is None:
        return Transaction.UNKNOWN
    return driver_for(wrapper.connection).link(wrapper).transaction


def _leave_innermost_atomic_block(wrapper: BaseDatabaseWrapper) -> None:
    """Leave the innermost atomic block as if an exception had propagated out of it.

    This mirrors ``django.db.transaction.Atomic.__exit__`` on its error path
    (``exc_type`` set) as Django 4.2, 5.2 and 6.1 write it (the same in all
    three, compared line by line): an upgrade of Django should compare it
    again.  It works on a given wrapper (``Atomic`` looks the connection up in
    the current thread, which is not always the owner here), and pops
    ``atomic_blocks`` only when it holds a block: with autocommit off, Django
    can leave ``in_atomic_block`` set with none left.
    """
    if wrapper.in_atomic_block and wrapper.atomic_blocks:
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


def _leave_atomic_blocks(wrapper: BaseDatabaseWrapper, count: int | None = None) -> None:
    """Leave ``count`` atomic blocks (default: all), innermost first, as an exception would.

    Bounded by the blocks Django lists, so that it ends whatever the flags say.
    """
    for _ in range(len(wrapper.atomic_blocks) if count is None else count):
        if not wrapper.in_atomic_block:
            return
        _leave_innermost_atomic_block(wrapper)
    if count is None and wrapper.in_atomic_block and not wrapper.atomic_blocks:
        # In manual mode, with no block left to leave: Atomic.__exit__ of the
        # outermost block would have ended here (``commit_on_exit`` False).
        wrapper.savepoint_ids = []
        wrapper.in_atomic_block = False
        wrapper.needs_rollback = False


def _usable(state: TxState) -> bool:
    return not state.aborted and not (state.in_atomic_block and state.needs_rollback)


def _roll_back_to_usable(wrapper: BaseDatabaseWrapper) -> Point | None:
    """Roll back to the innermost savepoint from which the transaction is usable again.

    The user's own savepoint (``transaction.savepoint()``) is rolled back to
    and stays, the atomic blocks around it open; an atomic block's savepoint
    is reached by leaving that block and those inside it, as an exception
    would.  A savepoint the server refuses to roll back to is passed over for
    the next one out.  With none left, the whole transaction is rolled back
    (autocommit stays off in manual mode).  Returns the savepoint reached, or
    ``None`` when the whole transaction was rolled back.
    """
    tried: set[str] = set()
    reached: Point | None = None
    while not _usable(state := state_of(wrapper)):
        point = next((p for p in state.points() if p.sid not in tried), None)
        if point is None:
            _leave_atomic_blocks(wrapper)
            if not wrapper.in_atomic_block and _transaction(wrapper) is Transaction.INERROR:
                wrapper.rollback()
            return None
        tried.add(point.sid)
        if point.users:
            # What marked the block for rollback came after the savepoint, and
            # Django refuses any statement while the mark is set: cleared first,
            # as Django's documentation has the user do around savepoint_rollback().
            marked, wrapper.needs_rollback = wrapper.needs_rollback, False
            try:
                wrapper.savepoint_rollback(point.sid)
            except Error as exc:
                wrapper.needs_rollback = marked
                log.debug("ipy_dbreset: could not roll back to %s: %s", point.sid, exc)
                continue
        else:
            _leave_atomic_blocks(wrapper, point.blocks)
        reached = point
    return reached


def _forget_transaction(wrapper: BaseDatabaseWrapper) -> None:
    """Forget a transaction that went with its connection, as Django's ``connect()`` does.

    ``BaseDatabaseWrapper.connect()`` (Django 4.2 to 6.1) resets these flags
    "in case the previous connection was closed while in an atomic block";
    unwinding the blocks through ``Atomic.__exit__`` instead would leave, in
    manual mode, ``in_atomic_block`` set and Django refusing to reconnect
    ("Cannot open a new connection in an atomic block").
    """
    wrapper.in_atomic_block = False
    wrapper.savepoint_ids = []
    wrapper.atomic_blocks = []
    wrapper.needs_rollback = False
    wrapper.closed_in_transaction = False
    wrapper.run_on_commit = []  # not run: they were waiting for a commit that cannot come
    wrapper.connection = None


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


def drop(wrapper: BaseDatabaseWrapper) -> int:
    """Close a connection that cannot be used again and forget its transaction.

    Returns how many pending ``on_commit`` callbacks were dropped with it.
    """
    dropped = len(wrapper.run_on_commit)
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
    _forget_transaction(wrapper)
    ledger = ledger_of(wrapper)
    if ledger is not None:
        ledger.clear()  # its transaction went with the connection
    return dropped


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
    log.debug("ipy_dbreset: %r", done)  # the notice logs it in words, at its level
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
    state = state_of(wrapper)
    if verdict.problem in (Problem.LOST, Problem.STUCK):
        work = open_work(wrapper)
        tally = tally_of(wrapper)
        ledger = ledger_of(wrapper)
        said = None if ledger is None else ledger.outcome  # of a COMMIT that did not answer
        dropped = drop(wrapper)
        pool = _pool(wrapper)
        if pool is not None and not pool.closed:
            # Whatever killed this connection (a server restart, a DBA) most
            # likely killed its idle siblings in the pool too: check them now,
            # so that the next query does not get one of them.
            with _quiet_pool():
                pool.check()
        if said is not None:
            assert ledger is not None
            ledger.outcome = None  # told here
            return Repair(
                alias,
                "closed",
                f"{reason} during its COMMIT",
                lost=said,
                thread=thread,
                hint=_next_query(state.manual, lost=None),
                keep_manual=state.manual,
                dropped_on_commit=dropped,
            )
        return Repair(
            alias,
            "closed",
            reason,
            lost=lost(work, tally) if work else None,
            thread=thread,
            hint=_next_query(state.manual, lost=None if work else "nothing was lost"),
            keep_manual=state.manual,
            dropped_on_commit=dropped,
            gone_savepoints=state.users_savepoints,
        )
    if verdict.problem is Problem.ABORTED:
        if leave_manual and not state.in_atomic_block:
            hint = "run transaction.rollback() (or %dbreset) to continue"
            if state.users_savepoints:
                hint = (
                    "run transaction.savepoint_rollback() to your savepoint, or "
                    "transaction.rollback() (or %dbreset), to continue"
                )
            return Repair(alias, "did not roll back", reason, thread=thread, hint=hint)
        return _unabort(wrapper, state, reason, thread)
    # Problem.MARKED: the database still holds a usable transaction.
    wrapper.needs_rollback = False
    return Repair(
        alias,
        "cleared Django's rollback mark on",
        reason,
        lost=kept(_blocks(max(state.blocks, 1), noun="block"), tally_of(wrapper)),
        thread=thread,
        hint="%dbreset discards them",
    )


def _unabort(
    wrapper: BaseDatabaseWrapper, state: TxState, reason: str, thread: str | None
) -> Repair:
    """Roll an aborted transaction back as little as makes it usable, and say what went."""
    before = tally_of(wrapper)
    point = _roll_back_to_usable(wrapper)
    now = state_of(wrapper)
    dropped = max(state.on_commit - now.on_commit, 0)
    left = state.blocks - now.blocks
    gone = tuple(sid for sid in state.users_savepoints if sid not in now.users_savepoints)
    if point is None:
        work = _blocks(left) if left else None
        if work is not None and state.manual:
            work = f"the manual transaction and {work}"
        return Repair(
            wrapper.alias,
            "rolled back",
            reason,
            lost=lost(work, before),
            thread=thread,
            # The user turned autocommit off (Django's flag, outside atomic blocks).
            hint=None
            if wrapper.get_autocommit()
            else "autocommit is still off, so the next query opens a new transaction",
            dropped_on_commit=dropped,
            gone_savepoints=gone,
        )
    # The ledger saw the ROLLBACK TO SAVEPOINT: what it still holds is what was kept.
    after = tally_of(wrapper)
    spent = before if before is None or after is None else before - after
    if point.users:
        return Repair(
            wrapper.alias,
            f"rolled back to your savepoint {point.sid!r} on",
            reason,
            lost=f"{lost(None, spent)}; {kept('what came before it', after)}",
            thread=thread,
            hint="the savepoint stays, for savepoint_rollback() or savepoint_commit()",
            dropped_on_commit=dropped,
            gone_savepoints=gone,
        )
    if now.blocks:
        outer = _blocks(now.blocks, outer=True, noun="block")
        rest = f"the manual transaction and {outer}" if now.manual else outer
    else:
        rest = "the manual transaction"
    return Repair(
        wrapper.alias,
        f"rolled back {_blocks(left, inner=bool(now.blocks))} on",
        reason,
        lost=f"{lost(None, spent)}; {kept(rest, after)}",
        thread=thread,
        dropped_on_commit=dropped,
        gone_savepoints=gone,
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
    state = state_of(wrapper)
    if not state.connected and not state.in_atomic_block:
        return None
    work = open_work(wrapper)
    tally = tally_of(wrapper)
    if not state.connected or judge(wrapper) is not None:
        # Nothing in it can be committed any more; do not try.
        dropped = drop(wrapper)
    else:
        if not state.in_atomic_block and state.status is Transaction.IDLE:
            work = None
        _leave_atomic_blocks(wrapper)
        if not wrapper.get_autocommit():
            wrapper.rollback()
        # A healthy connection goes back to its pool, if it has one.
        wrapper.close()
        dropped = state.on_commit
    done = Repair(
        wrapper.alias,
        "reset",
        "",
        lost=lost(work, tally, verb="rolled back") if work else None,
        thread=thread,
        hint=_next_query(state.manual, lost=None if work else "nothing was open"),
        keep_manual=state.manual,
        dropped_on_commit=dropped,
        gone_savepoints=state.users_savepoints,
    )
    log.debug("ipy_dbreset: %r", done)  # the notice logs it in words, at its level
    return done
