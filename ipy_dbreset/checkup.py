"""Checking every connection in use and repairing the broken ones.

This is the engine behind the IPython callbacks; it knows nothing of IPython
and can be driven from any code that runs between units of work.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from django.db import Error

from ipy_dbreset.drivers import Sockets, driver_for
from ipy_dbreset.health import Problem, Verdict, judge
from ipy_dbreset.repair import Repair, repair, reset
from ipy_dbreset.tracking import touching

if TYPE_CHECKING:
    from collections.abc import Iterable

    from django.db.backends.base.base import BaseDatabaseWrapper

    from ipy_dbreset.drivers import FastCheck
    from ipy_dbreset.tracking import ConnectionTracker, Mark, Tracked

log = logging.getLogger(__name__)


def _manual_transactions(wrapper: BaseDatabaseWrapper) -> None:
    """Put a reconnected wrapper back in the mode the user chose (autocommit off)."""
    wrapper.set_autocommit(False)


@dataclass(frozen=True)
class Failure:
    """A connection whose repair (or reset) itself failed, and the database's error."""

    alias: str
    thread: str | None
    error: str

    def describe(self) -> str:
        where = self.alias if self.thread is None else f"{self.alias} (thread {self.thread})"
        return f"{where}: {self.error}"


class RepairFailed(Exception):
    """Some repairs (or resets) failed; every other connection was still seen to.

    Raised at the end of a run, so that one connection the database refuses
    to roll back or close does not keep the others broken.
    """

    def __init__(self, failures: list[Failure], done: list[Repair]) -> None:
        super().__init__("; ".join(f.describe() for f in failures))
        self.failures = failures
        """One per connection whose repair failed."""
        self.done = done
        """What was repaired (or reset) all the same."""


def _error(exc: Error) -> str:
    """The error on one line (libpq's messages span several)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


class Checkup:
    """Judge and repair every connection a :class:`ConnectionTracker` knows.

    Parameters
    ----------
    tracker
        Where the connections come from.
    leave_manual_transactions
        Leave an aborted manual transaction (``set_autocommit(False)``) to the
        user, with a hint, instead of rolling it back.
    """

    def __init__(self, tracker: ConnectionTracker, *, leave_manual_transactions: bool = False):
        self.tracker = tracker
        self.leave_manual_transactions = leave_manual_transactions
        self.last: weakref.WeakKeyDictionary[BaseDatabaseWrapper, Repair] = (
            weakref.WeakKeyDictionary()
        )
        """The last repair or reset of each connection (not of its alias: a thread
        can hold more than one wrapper of an alias, and one of them may not be in use)."""
        self._told: set[tuple[str, str | None]] = set()
        self.skipped: list[tuple[str, str | None]] = []
        """Connections the last run (or reset) left alone because their thread was using them."""
        # The shell thread's connections live as long as the shell: kept as they
        # are.  Other threads' are kept by weak reference.
        self._fast: list[tuple[BaseDatabaseWrapper, Any, FastCheck]] = []
        self._fast_others: list[tuple[weakref.ref[BaseDatabaseWrapper], Any, FastCheck]] = []
        self._fast_version = -1
        # The fast path's baseline, taken from the two lists above after a
        # clean full run: each healthy connection's driver connection and check,
        # by the Mark its queries set, and all their sockets in one set.
        self._watched: dict[Mark, tuple[Any, FastCheck]] = {}
        self._sockets = Sockets(())

    def run(
        self, suspect: bool = False, listen: bool = True, failed: bool = False
    ) -> list[Repair] | None:
        """Repair what is broken and return what was done.

        ``None`` means every connection was healthy and nothing was left out;
        a list (perhaps empty, see :attr:`skipped`) means there is something to say.

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
        if not suspect and self.healthy(listen, failed):
            return None
        return self.check_all(suspect)

    def healthy(self, listen: bool = True, failed: bool = False) -> bool:
        """The fast path alone: whether every connection is as healthy as last time.

        ``False`` means there is something to look at: call :meth:`check_all`
        (not :meth:`run`: this call has consumed the marks of the connections
        used since).  A caller that must prepare for a repair (the shell holds
        back interrupts) does so only then.
        """
        tracker = self.tracker
        # What the look before each query did (ipy_dbreset.preflight) is for check_all to say.
        if tracker.preflight.found:
            return False
        return self._fast_version == tracker.version and self._unchanged(listen, failed)

    def check_all(self, suspect: bool = False) -> list[Repair] | None:
        """Judge every connection in full and repair the broken ones; see :meth:`run`."""
        tracker = self.tracker
        if tracker.used:
            tracker.take_used()  # the full run reads them all anyway
        done = self._full_run(suspect)
        if self._fast_version == tracker.version:
            self._watch()
        elif self._watched:  # no baseline until a clean run: keep nothing of the old one
            self._watched = {}
            self._sockets.close()
        return self._with_preflight(done) if tracker.preflight.found else done

    def _unchanged(self, listen: bool, failed: bool) -> bool:
        """Whether every connection of the baseline is still as healthy as it was."""
        if self.tracker.used and not self._still_healthy(self.tracker.take_used()):
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
            mark = self.tracker.mark_of(wrapper)
            if mark is None:  # not watched for queries: only the full path can judge it
                self._fast_version = -1
                return
            watched[mark] = (raw, check)
            filenos.append(driver_for(raw).fileno(wrapper))
        for ref, raw, check in self._fast_others:
            other = ref()
            mark = None if other is None else self.tracker.mark_of(other)
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

    def _full_run(self, suspect: bool) -> list[Repair] | None:
        done: list[Repair] = []
        failed: list[Failure] = []
        fast: list[tuple[BaseDatabaseWrapper, Any, FastCheck]] = []
        fast_others: list[tuple[weakref.ref[BaseDatabaseWrapper], Any, FastCheck]] = []
        version = self.tracker.version
        clean = True
        if self.skipped:
            self.skipped = []
        for wrapper in self.tracker.home:
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
        if self.tracker.has_others():
            for tracked in self.tracker.others():
                wrapper = tracked.wrapper
                if wrapper.connection is None and not wrapper.in_atomic_block:
                    continue
                with self.tracker.hold(tracked) as free:
                    if not free:
                        clean = False
                        self.skipped.append((wrapper.alias, tracked.thread_name))
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
        if failed:
            raise RepairFailed(failed, done)
        return None if clean else done

    def _with_preflight(self, repairs: list[Repair] | None) -> list[Repair]:
        """Add what was done or seen just before queries since the last check.

        A connection this check repaired itself gets only the check's own
        notice, which names the same loss.
        """
        done = repairs or []
        repaired = {(r.alias, r.thread) for r in done}
        early: dict[tuple[tuple[str, str | None], str], Repair] = {}
        for wrapper, record in self.tracker.preflight.drain():
            key = (record.alias, record.thread)
            if key not in repaired:
                early[key, record.action] = record  # once per connection and kind
                self.last[wrapper] = record
        return [*early.values(), *done]

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
            self.tracker.when_connected(wrapper, _manual_transactions)
        if leave:
            self._told.add(key)
        self.last[wrapper] = result
        done.append(result)

    def reset(self, aliases: Iterable[str] | None = None) -> list[Repair]:
        """Roll back and close the connections of ``aliases`` (default: all in use).

        Those whose thread is using them are left, in :attr:`skipped`; if some
        could not be reset, :class:`RepairFailed` is raised once all the
        others were.
        """
        wanted = None if aliases is None else set(aliases)
        done: list[Repair] = []
        failed: list[Failure] = []
        self.skipped = []
        # A reset rolls back and closes without running a query, so no mark
        # tells the fast path; one that failed may leave a connection broken.
        # The next check reads every connection again.
        self._fast_version = -1
        for tracked in self.tracker:
            wrapper = tracked.wrapper
            if wanted is not None and wrapper.alias not in wanted:
                continue
            key = (wrapper.alias, tracked.thread_name)
            with self.tracker.hold(tracked) as free:
                if not free:
                    log.info("ipy_dbreset: %s in thread %s is in use; not reset", *key)
                    self.skipped.append(key)
                    continue
                try:
                    result = touching(wrapper, partial(reset, wrapper, thread=tracked.thread_name))
                except Error as exc:
                    log.warning("ipy_dbreset: could not reset %s in thread %s", *key, exc_info=True)
                    failed.append(Failure(*key, _error(exc)))
                    continue
            if result is not None:
                if result.keep_manual:
                    self.tracker.when_connected(wrapper, _manual_transactions)
                self._told.discard(key)
                self.last[wrapper] = result
                done.append(result)
        if failed:
            raise RepairFailed(failed, done)
        return done

    def tracked(self) -> list[Tracked]:
        return list(self.tracker)
