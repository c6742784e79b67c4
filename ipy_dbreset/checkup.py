"""Checking every connection in use and repairing the broken ones.

This is the engine behind the IPython callbacks; it knows nothing of IPython
and can be driven from any code that runs between units of work.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.db import Error

from ipy_dbreset.drivers import driver_for
from ipy_dbreset.health import Problem, Verdict, judge
from ipy_dbreset.repair import Repair, repair, reset

if TYPE_CHECKING:
    from collections.abc import Iterable

    from django.db.backends.base.base import BaseDatabaseWrapper

    from ipy_dbreset.drivers import FastCheck
    from ipy_dbreset.tracking import ConnectionTracker, Tracked

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

    def run(self, suspect: bool = False, listen: bool = True) -> list[Repair] | None:
        """Repair what is broken and return what was done.

        ``None`` means every connection was healthy and nothing was left out;
        a list (perhaps empty, see :attr:`skipped`) means there is something to say.

        ``suspect`` asks for a liveness check of the shell thread's connections
        even when nothing local hints at trouble (after an interrupt).
        ``listen=False`` skips looking at the sockets of connections that were
        healthy last time, for a check right after a cell that raised nothing:
        what the server sends meanwhile is the next check's business.
        """
        if not suspect and self.healthy(listen):
            return None
        return self._full_run(suspect)

    def healthy(self, listen: bool = True) -> bool:
        """Whether every connection healthy last time still is, by the cheap checks alone.

        ``False`` means :meth:`run` has something to look at: a caller that
        must prepare for a repair (the shell holds back interrupts) does so
        only then.
        """
        # The hot path, before and after every cell: each connection that was
        # healthy last time is asked one cheap question by a function built for
        # it.  Any other answer, a new or reconnected connection, a busy one
        # left for later, or a suspicion, takes the full path.
        if self._fast_version != self.tracker.version:
            return False
        for wrapper, raw, healthy in self._fast:
            if wrapper.connection is not raw or wrapper.needs_rollback or not healthy(listen):
                return False
        for ref, raw, healthy in self._fast_others:
            other = ref()  # other threads' connections go with their thread
            if other is None or other.connection is not raw:
                return False
            if other.needs_rollback or not healthy(listen):
                return False
        return True

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
                with self.tracker.hold(tracked) as hold:
                    if not hold.free:
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
            result = repair(
                wrapper,
                verdict,
                thread=thread,
                leave_manual_transactions=self.leave_manual_transactions,
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
        for tracked in self.tracker:
            wrapper = tracked.wrapper
            if wanted is not None and wrapper.alias not in wanted:
                continue
            key = (wrapper.alias, tracked.thread_name)
            with self.tracker.hold(tracked) as hold:
                if not hold.free:
                    log.info("ipy_dbreset: %s in thread %s is in use; not reset", *key)
                    self.skipped.append(key)
                    continue
                try:
                    result = reset(wrapper, thread=tracked.thread_name)
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
