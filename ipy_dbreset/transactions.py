"""What a connection's transaction is made of, read from Django, the driver and the ledger.

Nothing here changes a connection or talks to the server.  Django's bookkeeping
is read as ``Atomic`` and ``BaseDatabaseWrapper`` keep it in Django 4.2, 5.2 and
6.1: compare them again on an upgrade.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, NamedTuple

from ipy_dbreset.drivers import Transaction, driver_for
from ipy_dbreset.ledger import ledger_of

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper


class Point(NamedTuple):
    """A savepoint the transaction can be rolled back to, and what reaching it costs."""

    sid: str
    blocks: int
    """Atomic blocks to leave, innermost first, to roll back to it (0: the user's own)."""

    @property
    def users(self) -> bool:
        """Made by ``transaction.savepoint()``, not by an atomic block: a rollback keeps it."""
        return self.blocks == 0


class TxState(NamedTuple):
    """One connection's transaction, as Django, the driver and the ledger know it."""

    connected: bool
    """``wrapper.connection`` is set (it may be dead: see :attr:`status`)."""
    autocommit: bool
    """Django's flag; Django turns it off inside atomic blocks too."""
    in_atomic_block: bool
    blocks: int
    """Atomic blocks open: ``len(atomic_blocks)``; 0 with ``in_atomic_block`` set is
    the state Django leaves when a manual transaction's connection closed in one."""
    savepoint_ids: tuple[str | None, ...]
    """Django's per-block savepoints, outermost first (``None``: ``savepoint=False``,
    or a block entered while the transaction was marked for rollback)."""
    needs_rollback: bool
    commit_on_exit: bool
    """False: the outermost atomic block was entered with autocommit off (manual mode)."""
    closed_in_transaction: bool
    status: Transaction
    """The driver's transaction status, read locally (``UNKNOWN`` when not connected)."""
    savepoints: tuple[str, ...]
    """Every savepoint open on the server, outermost first, Django's and the user's, as
    the ledger saw them created; Django's alone when the ledger does not know them all."""
    on_commit: int
    """``on_commit`` callbacks waiting for the transaction to commit."""

    @property
    def manual(self) -> bool:
        """The user turned autocommit off (outside atomic blocks, or around the outermost)."""
        if self.in_atomic_block:
            return not self.commit_on_exit
        return self.connected and not self.autocommit

    @property
    def in_transaction(self) -> bool:
        """Something is open that a commit would end: an atomic block or a manual transaction."""
        return self.in_atomic_block or (self.connected and not self.autocommit)

    @property
    def aborted(self) -> bool:
        """The server refuses every statement until a rollback (PostgreSQL)."""
        return self.status is Transaction.INERROR

    @property
    def users_savepoints(self) -> tuple[str, ...]:
        """The savepoints made by ``transaction.savepoint()``, outermost first."""
        django = set(self.savepoint_ids)
        return tuple(sid for sid in self.savepoints if sid not in django)

    def points(self) -> tuple[Point, ...]:
        """Every savepoint the transaction can be rolled back to, innermost first.

        An atomic block's savepoint is reached by leaving that block and every
        block inside it, as an exception leaving them would (``Atomic.__exit__``
        pops ``savepoint_ids`` one per block); the user's is reached directly
        and stays, for their own ``savepoint_rollback()`` or ``savepoint_commit()``.
        """
        depth = {sid: len(self.savepoint_ids) - i for i, sid in enumerate(self.savepoint_ids)}
        return tuple(Point(sid, depth.get(sid, 0)) for sid in reversed(self.savepoints))


def _server_savepoints(
    wrapper: BaseDatabaseWrapper, django: tuple[str | None, ...]
) -> tuple[str, ...]:
    own = tuple(sid for sid in django if sid is not None)
    ledger = ledger_of(wrapper)
    seen = ledger.savepoints() if ledger is not None else ()
    # The ledger's list is whole only if it saw each of Django's savepoints made,
    # in order (it may have started tracking the connection mid-transaction).
    found = iter(seen)
    if all(any(sid == other for other in found) for sid in own):
        return seen
    return own


def state_of(wrapper: BaseDatabaseWrapper) -> TxState:
    """Read ``wrapper``'s transaction state; no I/O, safe on a dead connection."""
    raw = wrapper.connection
    status = Transaction.UNKNOWN
    if raw is not None and not wrapper.closed_in_transaction:  # else closed by Django
        # A connection closed behind Django's back may refuse even to be read
        # (sqlite3), as the backend's own Database.Error.
        driver_error: type[Exception] = wrapper.Database.Error  # type: ignore[attr-defined]
        with contextlib.suppress(driver_error):
            status = driver_for(raw).link(wrapper).transaction
    django = tuple(wrapper.savepoint_ids)
    return TxState(
        connected=raw is not None,
        autocommit=bool(wrapper.autocommit),
        in_atomic_block=wrapper.in_atomic_block,
        blocks=len(wrapper.atomic_blocks),
        savepoint_ids=django,
        needs_rollback=wrapper.needs_rollback,
        commit_on_exit=wrapper.commit_on_exit,
        closed_in_transaction=wrapper.closed_in_transaction,
        status=status,
        savepoints=_server_savepoints(wrapper, django) if raw is not None else (),
        on_commit=len(wrapper.run_on_commit),
    )
