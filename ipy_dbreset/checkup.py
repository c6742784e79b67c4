"""Checking every connection in use and repairing the broken ones.

This is the engine behind the IPython callbacks; it knows nothing of IPython
and can be driven from any code that runs between units of work.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from django.db import Error

from ipy_dbreset.health import Problem, Verdict, judge
from ipy_dbreset.repair import Repair, repair, reset

if TYPE_CHECKING:
    from collections.abc import Iterable

    from django.db.backends.base.base import BaseDatabaseWrapper

    from ipy_dbreset.tracking import ConnectionTracker, Tracked

log = logging.getLogger(__name__)


def _manual_transactions(wrapper: BaseDatabaseWrapper) -> None:
    """Put a reconnected wrapper back in the mode the user chose (autocommit off)."""
    wrapper.set_autocommit(False)


class RepairFailed(Exception):
    """A repair itself failed (the database refused even a rollback or close)."""


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
        self.last: dict[tuple[str, str | None], Repair] = {}
        self._told: set[tuple[str, str | None]] = set()
        self.skipped: list[tuple[str, str | None]] = []
        """Connections the last run left alone because their thread was using them."""

    def run(self, *, suspect: bool = False) -> list[Repair]:
        """Repair what is broken and return what was done (empty when all is well).

        ``suspect`` asks for a liveness check of the shell thread's connections
        even when nothing local hints at trouble (after an interrupt).
        """
        done: list[Repair] = []
        if self.skipped:
            self.skipped = []
        # The hot path, before and after every cell: the shell thread's own
        # connections, judged with no object built and no lock taken.
        for wrapper in self.tracker.home:
            if wrapper.connection is None and not wrapper.in_atomic_block:
                continue
            verdict = judge(wrapper, suspect=suspect)
            if verdict is not None:
                self._fix(wrapper, None, verdict, done)
            elif self._told:
                self._told.discard((wrapper.alias, None))
        if self.tracker.has_others():
            for tracked in self.tracker.others():
                wrapper = tracked.wrapper
                if wrapper.connection is None and not wrapper.in_atomic_block:
                    continue
                with self.tracker.hold(tracked) as hold:
                    if not hold.free:
                        self.skipped.append((wrapper.alias, tracked.thread_name))
                        log.debug(
                            "ipy_dbreset: %s in %s is in use; not checked",
                            wrapper.alias,
                            tracked.thread_name,
                        )
                        continue
                    verdict = judge(wrapper)
                    if verdict is not None:
                        self._fix(wrapper, tracked.thread_name, verdict, done)
        return done

    def _fix(
        self, wrapper: BaseDatabaseWrapper, thread: str | None, verdict: Verdict, done: list[Repair]
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
            raise RepairFailed(f"{key[0]}: {type(exc).__name__}: {exc}") from exc
        if result.keep_manual:
            self.tracker.when_connected(wrapper, _manual_transactions)
        if leave:
            self._told.add(key)
        self.last[key] = result
        done.append(result)

    def reset(self, aliases: Iterable[str] | None = None) -> list[Repair]:
        """Roll back and close the connections of ``aliases`` (default: all in use)."""
        wanted = None if aliases is None else set(aliases)
        done: list[Repair] = []
        for tracked in self.tracker:
            wrapper = tracked.wrapper
            if wanted is not None and wrapper.alias not in wanted:
                continue
            key = (wrapper.alias, tracked.thread_name)
            with self.tracker.hold(tracked) as hold:
                if not hold.free:
                    log.info("ipy_dbreset: %s in thread %s is in use; not reset", *key)
                    continue
                try:
                    result = reset(wrapper, thread=tracked.thread_name)
                except Error as exc:
                    raise RepairFailed(f"{key[0]}: {type(exc).__name__}: {exc}") from exc
            if result is not None:
                self._told.discard(key)
                self.last[key] = result
                done.append(result)
        return done

    def tracked(self) -> list[Tracked]:
        return list(self.tracker)
