"""Checking every connection in use and repairing the broken ones.

This is the engine behind the IPython callbacks; it knows nothing of IPython
and can be driven from any code that runs between units of work.
"""

from __future__ import annotations

import logging
import weakref
from collections import deque
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

from django.db import Error, connections

from ipy_dbreset.display import where
from ipy_dbreset.drivers import Sockets, driver_for
from ipy_dbreset.health import Problem, Snapshot, Verdict, judge, snapshot
from ipy_dbreset.idle import IdleKeeper
from ipy_dbreset.network import Network, SocketState
from ipy_dbreset.repair import Repair, repair, reset
from ipy_dbreset.tracking import ConnectionTracker, touching

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable, Iterable

    from django.db.backends.base.base import BaseDatabaseWrapper

    from ipy_dbreset.drivers import FastCheck
    from ipy_dbreset.tracking import Mark, Tracked

log = logging.getLogger(__name__)

HISTORY = 200
"""Repairs kept for ``%dbstatus --history``."""


def _manual_transactions(wrapper: BaseDatabaseWrapper) -> None:
    """Put a reconnected wrapper back in the mode the user chose (autocommit off)."""
    wrapper.set_autocommit(False)


class Failure(NamedTuple):
    """A connection whose repair (or reset) itself failed, and the database's error."""

    alias: str
    thread: str | None
    error: str

    def describe(self) -> str:
        return f"{where(self.alias, self.thread)}: {self.error}"


class Repairs(weakref.WeakKeyDictionary["BaseDatabaseWrapper", Repair]):
    """The last repair of each connection, and the session's repairs in order.

    Whoever notes a repair (the checkup, the look before a query, the idle
    keeper) sets it here; ``%dbstatus --history`` reads :attr:`history`.
    """

    def __init__(self, keep: int = HISTORY) -> None:
        super().__init__()
        self.history: deque[Repair] = deque(maxlen=keep)
        """The session's repairs, oldest first; the oldest go beyond ``keep``."""

    def __setitem__(self, wrapper: BaseDatabaseWrapper, repair: Repair) -> None:
        super().__setitem__(wrapper, repair)
        self.history.append(repair)


class Outcome(NamedTuple):
    """What one check (or reset) did: false when there is nothing to tell.

    Failures do not stop a run: one connection the database refuses to roll
    back or close does not keep the others broken.
    """

    repairs: tuple[Repair, ...] = ()
    failures: tuple[Failure, ...] = ()
    """One per connection whose repair (or reset) itself failed."""
    skipped: tuple[tuple[str, str | None], ...] = ()
    """(alias, thread) of the connections left alone because their thread was using them."""
    healthy: bool = False
    """Every connection was judged healthy: nothing was done and none was left out."""

    @property
    def ok(self) -> bool:
        """Whether every repair (or reset) that was tried succeeded."""
        return not self.failures

    def __bool__(self) -> bool:
        return bool(self.repairs or self.failures or self.skipped)


HEALTHY = Outcome(healthy=True)


class Status(NamedTuple):
    """One connection in use, as ``%dbstatus`` shows it; read locally, never connecting."""

    thread: str | None
    snapshot: Snapshot
    last: Repair | None
    """Its last repair, reset or release."""
    keepalive: SocketState | None
    """Its socket's keepalive settings (``None``: not a TCP socket, or not connected)."""
    kept: str | None
    """Why idle_release would keep it open (``None``: it would not, or the release is off)."""


def _error(exc: Error) -> str:
    """The error on one line (libpq's messages span several)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


class Checkup:
    """Judge and repair every Django connection in use, in every thread.

    It watches connections between :meth:`start` and :meth:`stop` (through a
    :class:`~ipy_dbreset.tracking.ConnectionTracker` of its own); :meth:`run`
    repairs what is broken, :meth:`reset` resets on request, :meth:`status`
    describes each connection.

    Parameters
    ----------
    home
        The thread the shell runs cells in (default: this one).
    leave_manual_transactions
        Leave an aborted manual transaction (``set_autocommit(False)``) to the
        user, with a hint, instead of rolling it back.
    """

    def __init__(
        self, home: threading.Thread | None = None, *, leave_manual_transactions: bool = False
    ) -> None:
        # Every connection in use, and the marks their queries set; watching
        # only between start() and stop().
        self._tracker = ConnectionTracker(home)
        self.leave_manual_transactions = leave_manual_transactions
        """Leave an aborted manual transaction to the user; may change between runs."""
        # The last repair or reset of each connection (not of its alias: a
        # thread can hold more than one wrapper of an alias, and one of them
        # may not be in use), for status(); and the session's, for history().
        self._last = Repairs()
        # (alias, thread) of the aborted manual transactions left to the user
        # and already told of: said once, until the connection is healthy again.
        self._told: set[tuple[str, str | None]] = set()
        # What the last full run found healthy, for _watch() to take as the
        # fast path's baseline: the shell thread's connections live as long as
        # the shell and are kept as they are, other threads' by weak reference.
        self._fast: list[tuple[BaseDatabaseWrapper, Any, FastCheck]] = []
        self._fast_others: list[tuple[weakref.ref[BaseDatabaseWrapper], Any, FastCheck]] = []
        # The tracker's version when that run was clean; -1: no baseline, the
        # next check is a full one.
        self._fast_version = -1
        # The fast path's baseline, taken from the two lists above after a
        # clean full run: each healthy connection's driver connection and check,
        # by the Mark its queries set, and all their sockets in one set.
        self._watched: dict[Mark, tuple[Any, FastCheck]] = {}
        self._sockets = Sockets(())
        # Idle connections, ended threads' connections, long transactions; off
        # until configure_idle() turns its parts on.
        self._idle = IdleKeeper(self._tracker, self._last)
        self.before_cell = self._idle.before_cell
        """A cell starts: what happened since the last one, as (verbosity, line) pairs."""
        self.after_cell = self._idle.after_cell
        """A cell ended: close ended threads' connections; what to say, as above."""

    def start(self, *, on_created: Callable[[BaseDatabaseWrapper], None] | None = None) -> None:
        """Watch new connections and adopt the home thread's open ones.

        ``on_created`` is called with every connection in use now and with every
        one opened from now on, in the thread that opens it.
        """
        if on_created is not None:
            self._tracker.on_created.append(on_created)
        self._tracker.start()
        if on_created is not None:
            for tracked in self._tracker:  # opened before
                on_created(tracked.wrapper)

    def configure_idle(self, *, release_after: float, long_transaction: float) -> None:
        """Seconds before idle connections are released, and a transaction pointed out."""
        self._idle.configure(release_after=release_after, long_transaction=long_transaction)

    def stop(self) -> None:
        """Stop watching; leave every connection as Django made it."""
        self._idle.stop()
        self._tracker.stop()
        self._tracker.on_created.clear()
        self._fast, self._fast_others, self._fast_version = [], [], -1
        self._watched = {}
        self._sockets.close()

    def run(self, *, suspect: bool = False, listen: bool = True, failed: bool = False) -> Outcome:
        """Repair what is broken and say what was done.

        ``suspect`` asks for a liveness check of the shell thread's connections
        even when nothing local hints at trouble (after an interrupt).
        ``listen=False`` skips looking at the sockets, for a check right after a
        cell that raised nothing: what the server sends meanwhile is the next
        check's business.  ``failed`` (the cell raised) re-reads every
        connection's local state, used or not: an exception can mark an atomic
        block for rollback without a query.
        """
        # The hot path, before and after every cell.  A connection's state
        # changes while it is used, and every query queues its connection's
        # mark: only those are read again, each with a function built for it.
        # What the server sent, to any connection, is one system call.  So a
        # cell costs the same with one connection or a hundred.  Anything
        # else (new connections, a mark nobody knows, a suspicion) takes the
        # full path below.
        if not suspect and self.healthy(listen=listen, failed=failed):
            return HEALTHY
        return self.check_all(suspect=suspect)

    def healthy(self, *, listen: bool = True, failed: bool = False) -> bool:
        """The fast path alone: whether every connection is as healthy as last time.

        ``False`` means there is something to look at: call :meth:`check_all`
        (not :meth:`run`: this call has consumed the marks of the connections
        used since).  A caller that must prepare for a repair (the shell holds
        back interrupts) does so only then.
        """
        tracker = self._tracker
        # What the look before each query did (ipy_dbreset.preflight) is for check_all to say.
        if tracker.preflight.found:
            return False
        return self._fast_version == tracker.version and self._unchanged(listen, failed)

    def check_all(self, *, suspect: bool = False) -> Outcome:
        """Judge every connection in full and repair the broken ones; see :meth:`run`."""
        tracker = self._tracker
        if tracker.used:
            tracker.take_used()  # the full run reads them all anyway
        done = self._full_run(suspect=suspect)
        if self._fast_version == tracker.version:
            self._watch()
        elif self._watched:  # no baseline until a clean run: keep nothing of the old one
            self._watched = {}
            self._sockets.close()
        return self._with_preflight(done) if tracker.preflight.found else done

    def _unchanged(self, listen: bool, failed: bool) -> bool:
        """Whether every connection of the baseline is still as healthy as it was."""
        if self._tracker.used and not self._still_healthy(self._tracker.take_used()):
            return False
        if failed and not self._still_healthy(self._watched):
            return False
        return not (listen and self._sockets.pending())

    def _still_healthy(self, marks: Iterable[Mark]) -> bool:
        watched = self._watched
        for mark in list(marks):
            wrapper = mark.wrapper()
            if wrapper is None:  # gone with its thread: let its connection go too
                watched.pop(mark, None)
                continue
            entry = watched.get(mark)
            if entry is None:
                return False
            raw, healthy = entry
            if wrapper.connection is not raw or wrapper.needs_rollback or not healthy():
                return False
        return True

    def _watch(self) -> None:
        """Take the connections the full run found healthy as the fast path's baseline."""
        watched: dict[Mark, tuple[Any, FastCheck]] = {}
        filenos = []
        for wrapper, raw, check in self._fast:
            mark = self._tracker.mark_of(wrapper)
            if mark is None:  # not watched for queries: only the full path can judge it
                self._fast_version = -1
                return
            watched[mark] = (raw, check)
            filenos.append(driver_for(raw).fileno(wrapper))
        for ref, raw, check in self._fast_others:
            other = ref()
            mark = None if other is None else self._tracker.mark_of(other)
            if other is None or mark is None:
                self._fast_version = -1
                return
            watched[mark] = (raw, check)
            filenos.append(driver_for(raw).fileno(other))
        # Kept by mark only, so that another thread's connection is let go
        # with its wrapper (see Mark.wrapper).
        self._fast, self._fast_others = [], []
        self._watched = watched
        self._sockets.close()
        self._sockets = Sockets(filenos)

    def _full_run(self, *, suspect: bool) -> Outcome:
        done: list[Repair] = []
        failed: list[Failure] = []
        skipped: list[tuple[str, str | None]] = []
        fast: list[tuple[BaseDatabaseWrapper, Any, FastCheck]] = []
        fast_others: list[tuple[weakref.ref[BaseDatabaseWrapper], Any, FastCheck]] = []
        version = self._tracker.version
        clean = True
        for wrapper in self._tracker.home:
            if wrapper.connection is None and not wrapper.in_atomic_block:
                continue
            verdict = judge(wrapper, suspect=suspect)
            if verdict is not None:
                clean = False
                self._fix(wrapper, None, verdict, done, failed)
            else:
                self._told.discard((wrapper.alias, None))
                raw = wrapper.connection
                fast.append((wrapper, raw, driver_for(raw).fast_check(wrapper)))
        if self._tracker.has_others():
            for tracked in self._tracker.others():
                wrapper = tracked.wrapper
                if wrapper.connection is None and not wrapper.in_atomic_block:
                    continue
                with self._tracker.hold(tracked) as free:
                    if not free:
                        clean = False
                        skipped.append((wrapper.alias, tracked.thread_name))
                        log.debug(
                            "ipy_dbreset: %s in %s is in use; not checked",
                            wrapper.alias,
                            tracked.thread_name,
                        )
                        continue
                    verdict = judge(wrapper)
                    if verdict is not None:
                        clean = False
                        self._fix(wrapper, tracked.thread_name, verdict, done, failed)
                    else:
                        # Reading its state later without the lock is safe: a
                        # busy socket only sends us back here, to the lock.
                        raw = wrapper.connection
                        check = driver_for(raw).fast_check(wrapper)
                        fast_others.append((weakref.ref(wrapper), raw, check))
        # Only a run that found everything healthy may be taken as the baseline:
        # a repaired connection, one left to the user or one left alone for its
        # thread must be judged in full again next time.
        self._fast, self._fast_others = fast, fast_others
        self._fast_version = version if clean else -1
        if clean:
            return HEALTHY
        return Outcome(tuple(done), tuple(failed), tuple(skipped))

    def _with_preflight(self, outcome: Outcome) -> Outcome:
        """Add what was done or seen just before queries since the last check.

        A connection this check repaired itself gets only the check's own
        notice, which names the same loss.
        """
        done = outcome.repairs
        repaired = {(r.alias, r.thread) for r in done}
        early: dict[tuple[tuple[str, str | None], str], Repair] = {}
        for wrapper, record in self._tracker.preflight.drain():
            key = (record.alias, record.thread)
            if key not in repaired:
                early[key, record.action] = record  # once per connection and kind
                self._last[wrapper] = record
        return outcome._replace(repairs=(*early.values(), *done), healthy=False)

    def _fix(
        self,
        wrapper: BaseDatabaseWrapper,
        thread: str | None,
        verdict: Verdict,
        done: list[Repair],
        failed: list[Failure],
    ) -> None:
        key = (wrapper.alias, thread)
        leave = self.leave_manual_transactions and verdict.problem is Problem.ABORTED
        if leave and key in self._told:
            return  # the user was told already; it is theirs to end
        try:
            result = touching(
                wrapper,
                partial(
                    repair,
                    wrapper,
                    verdict,
                    thread=thread,
                    leave_manual_transactions=self.leave_manual_transactions,
                ),
            )
        except Error as exc:
            log.warning("ipy_dbreset: could not repair %s in thread %s", *key, exc_info=True)
            failed.append(Failure(*key, _error(exc)))
            return
        if result.keep_manual:
            self._tracker.when_connected(wrapper, _manual_transactions)
        if leave:
            self._told.add(key)
        self._last[wrapper] = result
        done.append(result)

    def reset(self, aliases: Iterable[str] | None = None) -> Outcome:
        """Roll back and close the connections of ``aliases`` (default: all in use).

        Those whose thread is using them are left alone (:attr:`Outcome.skipped`);
        one that cannot be reset does not keep the others from being reset.
        """
        wanted = None if aliases is None else set(aliases)
        done: list[Repair] = []
        failed: list[Failure] = []
        skipped: list[tuple[str, str | None]] = []
        # A reset rolls back and closes without running a query, so no mark
        # tells the fast path; one that failed may leave a connection broken.
        # The next check reads every connection again.
        self._fast_version = -1
        for tracked in self._tracker:
            wrapper = tracked.wrapper
            if wanted is not None and wrapper.alias not in wanted:
                continue
            key = (wrapper.alias, tracked.thread_name)
            with self._tracker.hold(tracked) as free:
                if not free:
                    log.info("ipy_dbreset: %s in thread %s is in use; not reset", *key)
                    skipped.append(key)
                    continue
                try:
                    result = touching(wrapper, partial(reset, wrapper, thread=tracked.thread_name))
                except Error as exc:
                    log.warning("ipy_dbreset: could not reset %s in thread %s", *key, exc_info=True)
                    failed.append(Failure(*key, _error(exc)))
                    continue
            if result is not None:
                if result.keep_manual:
                    self._tracker.when_connected(wrapper, _manual_transactions)
                self._told.discard(key)
                self._last[wrapper] = result
                done.append(result)
        return Outcome(tuple(done), tuple(failed), tuple(skipped))

    def status(self, aliases: Iterable[str] | None = None) -> list[Status]:
        """Every connection in use (of ``aliases``), the shell thread's first."""
        wanted = None if aliases is None else set(aliases)
        found = []
        for tracked in self._tracker:
            wrapper = tracked.wrapper
            if wanted is not None and wrapper.alias not in wanted:
                continue
            snap = snapshot(wrapper)
            kept = self._idle.kept(wrapper) if snap.connected else None
            found.append(
                Status(
                    tracked.thread_name, snap, self._last.get(wrapper), Network.state(wrapper), kept
                )
            )
        return found

    def aliases(self) -> list[str]:
        """Every alias ``DATABASES`` names (and any put in place by hand)."""
        return list(connections)

    def tracked(self) -> list[Tracked]:
        """Every connection in use and its thread, the shell thread's first."""
        return list(self._tracker)

    def history(self, aliases: Iterable[str] | None = None) -> list[Repair]:
        """The session's repairs, resets and releases (of ``aliases``), oldest first.

        The last :data:`HISTORY` of them.
        """
        wanted = None if aliases is None else set(aliases)
        return [r for r in self._last.history if wanted is None or r.alias in wanted]
