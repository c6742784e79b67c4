"""Letting go of idle connections on shared servers, and of ended threads' connections.

What is released when, what is kept, and how a release never overlaps a cell:
``docs/internals.md`` (Idle connections on shared servers).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import weakref
from functools import partial
from typing import TYPE_CHECKING, Any

from django.db import Error
from django.db.backends.signals import connection_created

from ipy_dbreset import ledger
from ipy_dbreset.drivers import Transaction, driver_for
from ipy_dbreset.health import judge, open_work
from ipy_dbreset.records import Repair, StillOpen
from ipy_dbreset.repair import drop
from ipy_dbreset.tracking import Tracked, borrowed, outside_event_loop, waiting_for_work

if TYPE_CHECKING:
    from collections.abc import Callable, MutableMapping, Sequence

    from django.db.backends.base.base import BaseDatabaseWrapper

    from ipy_dbreset.tracking import ConnectionTracker

log = logging.getLogger(__name__)

_SERVERS = frozenset({"postgresql", "mysql"})
"""Vendors whose connections hold something on a server; closing an SQLite
connection frees nothing there (and would lose an in-memory database)."""

# Statements whose effect outlives their transaction, in the session: a new
# connection would not have it.  Transaction-scoped forms (SET LOCAL, SET
# TRANSACTION, SET CONSTRAINTS, pg_advisory_xact_lock) are not among them.
_SESSION_STATEMENT = re.compile(
    r"\s*(?:set\s+(?!local\b|transaction\b|constraints\b)"
    r"|create\s+(?:(?:global|local)\s+)?temp(?:orary)?\b"
    r"|listen\b|prepare\b|declare\b|lock\s+tables\b)",
    re.IGNORECASE,
)
_SESSION_CALL = re.compile(
    r"\b(?:pg_(?:try_)?advisory_lock(?:_shared)?|get_lock|set_config)\s*\(", re.IGNORECASE
)


def _session_call(sql: str) -> bool:
    # Searching every ORM query for these calls would cost microseconds;
    # the substring tests first cost tens of nanoseconds.
    return ("ock" in sql or "OCK" in sql or "onfig" in sql or "ONFIG" in sql) and bool(
        _SESSION_CALL.search(sql)
    )


class Watch:
    """What a connection's session holds, seen query by query while ``idle_release`` is on.

    The connection's :class:`~ipy_dbreset.tracking.Mark` runs each query
    through it.  It holds a lock while the query runs, so that the release never
    closes a connection under a query (code the shell's event loop runs between
    cells may use the shell thread's connections too).
    """

    __slots__ = ("cursors", "kept", "last", "lock", "thread", "watched")

    def __init__(self, thread: threading.Thread | None = None) -> None:
        self.thread = thread
        """The thread that owns the connection (``None``: the shell's)."""
        self.lock = threading.RLock()  # held while a query runs
        self.watched = False
        """Whether it has seen every statement since the connection opened."""
        self.kept: str | None = None
        """The first statement seen that left state in the session (None: none yet)."""
        self.cursors: list[weakref.ref[Any]] = []
        """Server-side cursors opened (``QuerySet.iterator()``): open ones hold the session."""
        self.last = 0.0
        """``time.monotonic()`` when its last query ended (another thread's may run any time)."""

    def opened(self) -> None:
        """The connection is new: nothing of the old session's is left."""
        self.watched, self.kept, self.cursors = True, None, []
        self.last = time.monotonic()  # its thread is about to use it

    def __call__(
        self, execute: Callable[..., Any], sql: Any, params: Any, many: bool, context: Any
    ) -> Any:
        __tracebackhide__ = True  # not the user's error: IPython leaves this frame out
        with self.lock:
            if self.kept is None:
                self._see(sql, context)
            try:
                return execute(sql, params, many, context)
            finally:
                self.last = time.monotonic()

    def _see(self, sql: Any, context: Any) -> None:
        if not isinstance(sql, str):  # a composed statement (psycopg.sql): no telling
            self.kept = "a statement not given as text"
        elif _SESSION_STATEMENT.match(sql) or _session_call(sql):
            self.kept = " ".join(sql.split()[:3])
        else:
            raw = getattr(context.get("cursor"), "cursor", None)
            if getattr(raw, "name", None):  # psycopg's and psycopg2's named cursors
                self.cursors.append(weakref.ref(raw))

    def holds(self) -> str | None:
        """What a reconnect would lose, or ``None``."""
        if not self.watched:
            return "opened before idle_release was set"
        if self.kept is not None:
            return f"session state ({self.kept})"
        self.cursors = [ref for ref in self.cursors if _open_cursor(ref)]
        return "an open server-side cursor" if self.cursors else None


def _open_cursor(ref: weakref.ref[Any]) -> bool:
    cursor = ref()
    return cursor is not None and not getattr(cursor, "closed", True)


def in_transaction(wrapper: BaseDatabaseWrapper) -> bool:
    """Whether ``wrapper`` holds a transaction (or the user's manual mode), from local state."""
    raw = wrapper.connection
    if raw is None:
        return False
    if wrapper.in_atomic_block:
        return True
    if wrapper.autocommit:
        return False
    # Autocommit off: a transaction is open once a query ran since the last commit.
    return driver_for(raw).link(wrapper).transaction is not Transaction.IDLE


Said = tuple[int, "Repair | StillOpen"]
"""What to tell the user (a repair, a transaction left open), from which verbosity on."""


class IdleKeeper:
    """Releases idle connections, closes those of ended threads, points out long transactions.

    Parameters
    ----------
    tracker
        Where the connections come from.
    last
        Each connection's last repair, as ``%dbstatus`` shows it: releases are noted there too.
    """

    def __init__(
        self,
        tracker: ConnectionTracker,
        last: MutableMapping[BaseDatabaseWrapper, Repair],
    ) -> None:
        self.tracker = tracker
        self._last = last
        self.release_after = 0.0
        """Seconds the shell waits for input before idle connections are closed; 0: never."""
        self.long_transaction = 0.0
        """Seconds a transaction may stay open between cells before it is pointed out; 0: never."""
        # When either changes, a thread may have ended: the number of threads, or
        # the tracker's version (a thread that opened a connection and ended
        # within one cell leaves the number as it was).
        self._threads = threading.active_count()
        self._version = tracker.version
        # Shell-thread connections in a transaction: when first seen so after a
        # cell, and whether that was said.  Empty (one test per cell) while none
        # is.  A plain dict: the shell thread's wrappers live as long as the shell.
        self._open: dict[BaseDatabaseWrapper, list[Any]] = {}
        # The release, when on: its thread and what it shares with the shell's.
        self._cond = threading.Condition(threading.Lock())
        self._releasing = False  # the thread runs and connections are watched
        self._running = True  # a cell runs (or none ended since the release was turned on)
        self._deadline: float | None = None  # monotonic time of the next release
        self._parked = False  # the thread waits for a cell's end, not for a time
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._watches: weakref.WeakKeyDictionary[BaseDatabaseWrapper, Watch] = (
            weakref.WeakKeyDictionary()
        )
        self._released: list[Said] = []  # said by the release thread, for the next cell
        self._uid = f"ipy_dbreset-idle-{id(self)}"

    # -- configuration -------------------------------------------------------

    def configure(self, *, release_after: float, long_transaction: float) -> None:
        self.long_transaction = long_transaction
        if not long_transaction:
            self._open.clear()
        if release_after and not self._releasing:
            self._start_releasing()
        elif not release_after and self._releasing:
            self._stop_releasing()
        with self._cond:
            self.release_after = release_after
            self._cond.notify()  # a shorter wait may be over already

    def stop(self) -> None:
        """Undo everything: no thread, no watch left on any connection."""
        if self._releasing:
            self._stop_releasing()
        self._open.clear()

    def _start_releasing(self) -> None:
        connection_created.connect(self._created, weak=False, dispatch_uid=self._uid)
        self._stopping, self._releasing = False, True
        self._thread = threading.Thread(
            target=self._run, name="ipy_dbreset-idle-release", daemon=True
        )
        self._thread.start()

    def _stop_releasing(self) -> None:
        connection_created.disconnect(dispatch_uid=self._uid)
        with self._cond:
            self._stopping, self._releasing = True, False
            self._cond.notify()
            for wrapper, watch in list(self._watches.items()):
                mark = self.tracker.mark_of(wrapper)
                if mark is not None and mark.watch is watch:
                    mark.watch = None
            self._watches.clear()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _created(self, sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
        # Django's own statements at connect (time zone, role) ran before this
        # signal and run again on reconnect: only what comes after counts.
        if connection.vendor not in _SERVERS:
            return
        thread = threading.current_thread()
        with self._cond:
            watch = self._watches.get(connection)
            if watch is None:
                owner = None if thread is self.tracker.home_thread else thread
                watch = self._watches[connection] = Watch(owner)
                # Run by the connection's one execute_wrapper, the tracker's mark.
                self.tracker.mark(connection).watch = watch
            watch.opened()

    # -- around cells --------------------------------------------------------

    # Both run around every cell: while there is nothing to do, they read a
    # few attributes and return the same empty tuple.

    def quiet(self) -> bool:
        """Whether the next cell's before_cell() and after_cell() have nothing to do."""
        return not (self._releasing or self._open or self._released) and (
            self._version == self.tracker.version
        )

    def before_cell(self) -> Sequence[Said]:
        """A cell starts: stop the release; say what happened since the last cell."""
        if self._releasing:
            with self._cond:  # waits for a release under way to finish
                self._running = True
        if not (self._open or self._released):
            return ()
        said: list[Said] = []
        if self._open:
            self._long_transactions(said)
        if self._released:
            with self._cond:
                said += self._released
                self._released = []
        return said

    def after_cell(self) -> Sequence[Said]:
        """A cell ended: note transactions it opened, close ended threads' connections,
        count the idle time from now.

        A thread that ends between cells is noticed after the next one.
        """
        if self.long_transaction and self.tracker.used:
            self._note_transactions()
        said: Sequence[Said] = ()
        # Only another thread's connection can outlive its thread; counting
        # threads is the dearest part of a cell with none.
        tracker = self.tracker
        if tracker.version != self._version or (
            tracker.has_others() and threading.active_count() != self._threads
        ):
            said = self._close_ended()
        if self._releasing:
            with self._cond:
                self._running = False
                self._deadline = time.monotonic() + self.release_after
                if self._parked:
                    self._cond.notify()
        return said

    # -- transactions left open ------------------------------------------------

    def _note_transactions(self) -> None:
        # A transaction starts with a query; every query queues its
        # connection's mark, and the checkup takes them only after this.  So
        # only the connections this cell used are looked at.
        now = time.monotonic()
        for mark in list(self.tracker.used):
            wrapper = mark.wrapper()
            if wrapper is None or wrapper in self._open or not self.tracker.is_home(wrapper):
                continue
            if in_transaction(wrapper):
                self._open[wrapper] = [now, False]

    def _long_transactions(self, said: list[Said]) -> None:
        now = time.monotonic()
        for wrapper, seen in list(self._open.items()):
            if not in_transaction(wrapper):
                del self._open[wrapper]
            elif not seen[1] and now - seen[0] >= self.long_transaction:
                seen[1] = True
                what = open_work(wrapper) or "a transaction"
                tally = ledger.tally_of(wrapper)
                if tally is not None and tally.writes:
                    what += f" with {ledger.writes_text(tally, unsaved=False)}"
                said.append((1, StillOpen(wrapper.alias, now - seen[0], what)))

    # -- ended threads ---------------------------------------------------------

    def _close_ended(self) -> list[Said]:
        """Close the connections of ended threads, and forget them."""
        said: list[Said] = []
        tracker = self.tracker
        # (others() forgets those of ended threads that are closed already.)
        for tracked in tracker.others() if tracker.has_others() else ():
            wrapper, thread = tracked.wrapper, tracked.thread
            if thread is None or thread.is_alive():
                continue
            # An ended thread cannot be using it, nor end what it holds.
            work = open_work(wrapper)
            tally = ledger.tally_of(wrapper)
            try:
                outside_event_loop(partial(_close, wrapper, lost=work))
            except Error as exc:
                log.warning(
                    "ipy_dbreset: could not close %s of ended thread %s: %s",
                    wrapper.alias,
                    thread.name,
                    exc,
                )
                continue
            finally:
                # Nobody can use it again; what the driver did not close goes with it.
                tracker.forget(wrapper)
            done = Repair(
                wrapper.alias,
                "closed",
                "its thread has ended",
                lost=ledger.lost(work, tally) if work else None,
                thread=thread.name,
            )
            self._last[wrapper] = done
            log.debug("ipy_dbreset: %r", done)  # the notice logs it in words, at its level
            said.append((1 if work else 2, done))
        # After forgetting, which counts as a change: the next cell need not look again.
        self._threads, self._version = threading.active_count(), tracker.version
        return said

    # -- the release thread ----------------------------------------------------

    def _run(self) -> None:
        cond = self._cond
        with cond:
            while not self._stopping:
                if self._running or self._deadline is None:
                    self._parked = True
                    cond.wait()
                    self._parked = False
                    continue
                delay = self._deadline - time.monotonic()
                if delay > 0:
                    cond.wait(delay)
                    continue
                self._deadline = self._release()

    def _release(self) -> float | None:
        """Close every watched connection a reconnect would lose nothing of (lock held).

        Returns when to look again at another thread's connection that was used
        since the shell became idle (``None``: not before the next cell ends).
        """
        again = None
        for wrapper, watch in list(self._watches.items()):
            if wrapper.connection is None or watch.holds() is not None:
                continue
            thread = watch.thread
            if thread is None:
                released = self._release_one(wrapper, watch)
            elif not thread.is_alive():
                continue  # closed, and its loss told, after the next cell (_close_ended)
            elif time.monotonic() - watch.last < self.release_after:
                # Its thread used it since the shell became idle (and may be
                # using it right now): not idle for long enough yet.
                later = watch.last + self.release_after
                again = later if again is None else min(again, later)
                continue
            else:
                # Only while its thread waits for its next job, and no query runs:
                # a thread running its own code may be about to use it.
                with self.tracker.hold(Tracked(wrapper, thread), idle=True) as free:
                    released = free and self._release_one(wrapper, watch)
            if not released:
                continue
            # Closed without a query: the checkup's fast path must look again.
            self.tracker.version += 1
            done = Repair(
                wrapper.alias,
                "closed",
                f"idle for {ledger.duration(self.release_after)} (idle_release)",
                thread=None if thread is None else thread.name,
                hint="the next query reconnects",
            )
            self._last[wrapper] = done
            log.debug("ipy_dbreset: %r", done)  # the notice logs it in words, at its level
            self._released.append((2, done))
        return again

    @staticmethod
    def _release_one(wrapper: BaseDatabaseWrapper, watch: Watch) -> bool:
        """Close ``wrapper`` if it holds nothing a reconnect would lose; whether it did."""
        if not wrapper.autocommit or wrapper.in_atomic_block or judge(wrapper) is not None:
            # Open work, or the user's manual mode (a reconnect turns autocommit
            # back on), or broken: the checkup's business at the next cell.
            return False
        state = driver_for(wrapper.connection).link(wrapper).transaction
        if state not in (Transaction.IDLE, Transaction.UNKNOWN):
            return False  # (mysqlclient's is UNKNOWN: with autocommit on, none stays open)
        if not watch.lock.acquire(blocking=False):
            return False  # a query of code the event loop runs is under way
        try:
            with borrowed(wrapper):
                wrapper.close()
        except Error as exc:
            log.warning("ipy_dbreset: could not release %s: %s", wrapper.alias, exc)
            return False
        finally:
            watch.lock.release()
        return True

    def kept(self, wrapper: BaseDatabaseWrapper) -> str | None:
        """Why an idle ``wrapper`` would not be released (``None``: it would be)."""
        if not self._releasing or wrapper.vendor not in _SERVERS:
            return None
        watch = self._watches.get(wrapper)
        if watch is None:
            return "opened before idle_release was set"
        if wrapper.in_atomic_block:
            return f"in {open_work(wrapper)}"
        if not wrapper.autocommit:
            return "autocommit is off (a new connection would have it on)"
        thread = watch.thread
        if thread is not None and thread.is_alive() and not waiting_for_work(thread):
            return "its thread is running (only a thread pool's idle worker is let go)"
        return watch.holds()


def _close(wrapper: BaseDatabaseWrapper, *, lost: str | None) -> None:
    with borrowed(wrapper):
        if lost is None:
            wrapper.close()  # a healthy connection goes back to its pool, if it has one
        else:
            drop(wrapper)
