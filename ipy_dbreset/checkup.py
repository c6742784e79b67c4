"""Checking every connection in use and repairing the broken ones.

This is the engine behind the IPython callbacks; it knows nothing of IPython
and can be driven from any code that runs between units of work.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections import deque
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

from django.db import Error, connections

from ipy_dbreset.drivers import Sockets, driver_for
from ipy_dbreset.failover import BECAME_STANDBY, Standbys
from ipy_dbreset.health import Problem, Snapshot, Verdict, judge, snapshot
from ipy_dbreset.idle import IdleKeeper
from ipy_dbreset.ledger import outcome
from ipy_dbreset.network import Network, SocketState
from ipy_dbreset.preflight import Preflight
from ipy_dbreset.readonly import ReadOnly, supported, switch
from ipy_dbreset.records import Calm, Failure, Repair
from ipy_dbreset.repair import repair, reset
from ipy_dbreset.tracking import ConnectionTracker, touching

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from django.db.backends.base.base import BaseDatabaseWrapper

    from ipy_dbreset.drivers import FastCheck
    from ipy_dbreset.tracking import Mark, Tracked

log = logging.getLogger(__name__)

HISTORY = 200
"""Repairs kept for ``%dbstatus --history``."""


def _manual_transactions(wrapper: BaseDatabaseWrapper) -> None:
    """Put a reconnected wrapper back in the mode the user chose (autocommit off)."""
    wrapper.set_autocommit(False)


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


class Switched(NamedTuple):
    """What :meth:`Checkup.read_only` did to the open connections."""

    on: bool
    switched: tuple[tuple[str, str | None], ...]
    """(alias, thread) of the open connections switched now."""
    busy: tuple[tuple[str, str | None], ...]
    """Those whose thread was using them: left as they were."""


class Checkup:
    """Judge and repair every Django connection in use, in every thread.

    It watches connections between :meth:`start` and :meth:`stop` (through a
    :class:`~ipy_dbreset.tracking.ConnectionTracker` of its own); :meth:`healthy`
    says whether anything changed, :meth:`check_all` repairs what is broken,
    :meth:`reset` resets on request, :meth:`status` describes each connection.

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
        self.calm = Calm()
        """Whether the callbacks around the next cell have nothing to do; see :meth:`quiet`."""
        self._tracker = ConnectionTracker(Preflight(self.calm), self.calm, home)
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
        # Read-only mode: off until read_only(True); sets each new connection.
        self._read_only = ReadOnly()
        # Threads other than the home one that run cells of their own
        # (ipykernel 7 subshells), each with a lock it holds while a cell runs:
        # another thread touches their connections only while it is free.
        self._cell_locks: weakref.WeakKeyDictionary[threading.Thread, threading.RLock] = (
            weakref.WeakKeyDictionary()
        )
        # Which aliases began on a standby, to tell a failover's standby from a replica.
        self._standbys = Standbys()
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
        self._tracker.on_created.append(self._read_only.created)
        self._tracker.on_created.append(self._standbys.created)
        self._tracker.start()
        if on_created is not None:
            for tracked in self._tracker:  # opened before
                on_created(tracked.wrapper)

    def read_only(self, on: bool) -> Switched:
        """Turn read-only mode on or off: for every connection opened from now on, and now
        for the open ones whose thread is not using them.
        """
        self._read_only.on = on
        self.calm.quiet = False
        switched: list[tuple[str, str | None]] = []
        busy: list[tuple[str, str | None]] = []
        for tracked in self._tracker:
            wrapper = tracked.wrapper
            if wrapper.connection is None or not supported(wrapper):
                continue
            key = (wrapper.alias, tracked.thread_name)
            with self._may_touch(tracked) as free:
                if not free:
                    busy.append(key)
                elif touching(wrapper, partial(switch, wrapper, on=on)):
                    switched.append(key)
        return Switched(on, tuple(switched), tuple(busy))

    def leave_standbys(self) -> Outcome:
        """Close the shell thread's connections that now sit on a hot standby not chosen.

        For after a cell whose write the server refused as read-only
        (:func:`~ipy_dbreset.failover.refused_as_read_only`): the next query
        reconnects, and finds the new primary where the settings lead to it.
        """
        done: list[Repair] = []
        failed: list[Failure] = []
        for tracked in self._tracker:
            if tracked.thread is None and self._standbys.became_standby(tracked.wrapper):
                verdict = Verdict(Problem.LOST, BECAME_STANDBY)
                self._fix(tracked.wrapper, None, verdict, done, failed)
        if done or failed:
            self._fast_version = -1  # closed without a query: the next check reads them all
            self.calm.quiet = False
        return Outcome(tuple(done), tuple(failed))

    @property
    def is_read_only(self) -> bool:
        return self._read_only.on

    def configure_idle(self, *, release_after: float, long_transaction: float) -> None:
        """Seconds before idle connections are released, and a transaction pointed out."""
        self._idle.configure(release_after=release_after, long_transaction=long_transaction)
        self.calm.quiet = False

    def stop(self) -> None:
        """Stop watching; leave every connection as Django made it."""
        self._idle.stop()
        self._tracker.stop()
        self._tracker.on_created.clear()
        self._fast, self._fast_others, self._fast_version = [], [], -1
        self.calm.quiet = False
        self._watched = {}
        self._listen(Sockets(()))

    def quiet(self) -> bool:
        """Whether nothing is left for the next cell's checks but listening to the
        sockets (:attr:`Calm.pending`): nothing used, found or unsettled since, a
        baseline for every connection, no other thread's connection and nothing
        for the idle keeper.

        The shell sets :attr:`calm` true before asking, and false if the
        answer is no: from then on whatever gives the checks work sets it false.
        """
        tracker = self._tracker
        return (
            not (tracker.used or tracker.unsettled or tracker.preflight.found)
            and self._fast_version == tracker.version
            and not tracker.has_others()
            and self._idle.quiet()
        )

    def healthy(self, listen: bool, failed: bool) -> bool:
        """The hot path, before and after every cell: whether every connection is
        as healthy as the full run last found it.

        A connection's state changes while it is used, and every query queues
        its connection's mark: only those are read again, each with a function
        built for it.  What the server sent, to any connection, is one system
        call (``listen=False`` leaves that to the next check: right after a
        cell that raised nothing).  ``failed`` (the cell raised) re-reads every
        connection, used or not: an exception can mark an atomic block for
        rollback without a query.  So a cell costs the same with one
        connection or a hundred.

        ``False`` means there is something to look at: call :meth:`check_all`,
        which this call has left the marks of the connections used since.  A
        caller that must prepare for a repair (the shell holds back
        interrupts) does so only then.
        """
        tracker = self._tracker
        # What the look before each query did (ipy_dbreset.preflight) is for check_all to say.
        if tracker.preflight.found or tracker.unsettled or self._fast_version != tracker.version:
            return False
        if tracker.used and not self._still_healthy(tracker.take_used()):
            return False
        if failed and not self._still_healthy(self._watched):
            return False
        return not (listen and self._sockets.pending())

    def check_all(self, *, suspect: bool = False) -> Outcome:
        """Judge every connection in full and repair the broken ones.

        ``suspect`` asks for a liveness check of the shell thread's connections
        even when nothing local hints at trouble (after an interrupt).
        """
        tracker = self._tracker
        if tracker.used:
            tracker.take_used()  # the full run reads them all anyway
        asked = self._settle() if tracker.unsettled else []
        done = self._full_run(suspect=suspect)
        if asked:
            done = self._told_commits(asked, done)
        if self._fast_version == tracker.version:
            self._watch()
        elif self._watched:  # no baseline until a clean run: keep nothing of the old one
            self._watched = {}
            self._listen(Sockets(()))
        return self._with_preflight(done) if tracker.preflight.found else done

    def _settle(self) -> list[tuple[BaseDatabaseWrapper, Mark, str | None, str, str]]:
        """Ask the server what became of each COMMIT that did not answer.

        The outcome waits on the ledger for the repair of its connection, if
        this check makes one (its notice then says it); :meth:`_told_commits`
        tells the others.
        """
        asked = []
        unsettled = self._tracker.unsettled
        while unsettled:
            mark = unsettled.pop()
            wrapper, flight = mark.wrapper(), mark.ledger.in_flight
            if wrapper is None or flight is None:
                continue
            mark.ledger.in_flight = None
            mark.ledger.outcome = outcome(wrapper, flight)
            thread = None if self._tracker.is_home(wrapper) else self._thread_of(wrapper)
            if flight.refused:
                action, why = "noted a failed COMMIT on", flight.refused
            else:
                action = "asked the server about a COMMIT on"
                why = (
                    "its COMMIT was interrupted"
                    if flight.interrupted
                    else "the connection was lost during its COMMIT"
                )
            asked.append((wrapper, mark, thread, action, why))
        return asked

    def _thread_of(self, wrapper: BaseDatabaseWrapper) -> str | None:
        return next((t.thread_name for t in self._tracker.others() if t.wrapper is wrapper), None)

    def _told_commits(
        self, asked: list[tuple[BaseDatabaseWrapper, Mark, str | None, str, str]], outcome_: Outcome
    ) -> Outcome:
        """A notice for each COMMIT asked about whose connection no repair told it."""
        told = []
        for wrapper, mark, thread, action, why in asked:
            said, mark.ledger.outcome = mark.ledger.outcome, None
            if said is None:
                continue  # the repair of its connection said it
            record = Repair(wrapper.alias, action, why, lost=said, thread=thread)
            self._last[wrapper] = record
            told.append(record)
        if not told:
            return outcome_
        return outcome_._replace(repairs=(*told, *outcome_.repairs), healthy=False)

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
                self.calm.quiet = False
                return
            watched[mark] = (raw, check)
            filenos.append(driver_for(raw).fileno(wrapper))
        for ref, raw, check in self._fast_others:
            other = ref()
            mark = None if other is None else self._tracker.mark_of(other)
            if other is None or mark is None:
                self._fast_version = -1
                self.calm.quiet = False
                return
            watched[mark] = (raw, check)
            filenos.append(driver_for(raw).fileno(other))
        # Kept by mark only, so that another thread's connection is let go
        # with its wrapper (see Mark.wrapper).
        self._fast, self._fast_others = [], []
        self._watched = watched
        self._listen(Sockets(filenos))

    def _listen(self, sockets: Sockets) -> None:
        """Take ``sockets`` as the fast path's, closing the old ones."""
        self._sockets.close()
        self._sockets = sockets
        self.calm.pending = sockets.question

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
                with self._may_touch(tracked) as free:
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

    # -- cells run in threads of their own (ipykernel 7 subshells) ---------------

    def own_cell_starts(self, *, check: bool) -> Outcome:
        """A cell starts in this thread, which is not the home thread (a subshell's).

        Until :meth:`own_cell_ends`, no other thread touches this thread's
        connections; with ``check``, those broken since its last cell are
        repaired first.  Only this thread's own connections are looked at: the
        home thread's, and other threads', may be running a query meanwhile.
        """
        me = threading.current_thread()
        lock = self._cell_locks.get(me)
        if lock is None:
            lock = self._cell_locks[me] = threading.RLock()  # only this thread adds its own
        lock.acquire()  # a reset from another thread finishes first
        return self._check_own(me, suspect=False) if check else HEALTHY

    def own_cell_ends(self, *, check: bool, suspect: bool = False) -> Outcome:
        """The cell :meth:`own_cell_starts` announced is over: repair what it broke.

        ``suspect`` as for :meth:`check_all`.
        """
        me = threading.current_thread()
        try:
            return self._check_own(me, suspect=suspect) if check else HEALTHY
        finally:
            lock = self._cell_locks.get(me)
            if lock is not None:
                with contextlib.suppress(RuntimeError):  # a cell end with no start
                    lock.release()

    def _check_own(self, thread: threading.Thread, *, suspect: bool) -> Outcome:
        """Judge and repair ``thread``'s connections, from ``thread`` itself, between its cells."""
        name = thread.name
        done: list[Repair] = []
        failed: list[Failure] = []
        for tracked in self._tracker.others():
            wrapper = tracked.wrapper
            if tracked.thread is not thread:
                continue
            if wrapper.connection is None and not wrapper.in_atomic_block:
                continue
            verdict = judge(wrapper, suspect=suspect)
            if verdict is None:
                self._told.discard((wrapper.alias, name))
            else:
                self._fix(wrapper, name, verdict, done, failed)
        early = self._own_preflight(name, {r.alias for r in done})
        if not (done or failed or early):
            return HEALTHY
        return Outcome((*early, *done), tuple(failed))

    def _own_preflight(self, name: str, repaired: set[str]) -> list[Repair]:
        """Take what the look before queries did to ``name``'s connections; leave the rest.

        Once per connection and kind, and not for one this check repaired itself
        (its notice names the same loss), as :meth:`_with_preflight` does.
        """
        found = self._tracker.preflight.found
        early: dict[tuple[str, str], Repair] = {}
        for _ in range(len(found)):
            try:
                wrapper, record = found.popleft()
            except IndexError:  # the home thread's check drained it meanwhile
                break
            if record.thread != name:
                found.append((wrapper, record))  # another thread's, for its check
                continue
            if record.alias not in repaired:
                early[record.alias, record.action] = record
                self._last[wrapper] = record
        return list(early.values())

    @contextlib.contextmanager
    def _may_touch(self, tracked: Tracked) -> Iterator[bool]:
        """Hold ``tracked`` still while the block runs; yield whether this thread may touch it.

        Its own thread may, always (it runs this, not a query); a thread that
        runs cells of its own may not while one runs; else as
        :meth:`ConnectionTracker.hold` says.
        """
        thread = tracked.thread
        if thread is threading.current_thread():
            yield True
            return
        lock = None if thread is None else self._cell_locks.get(thread)
        if lock is not None and not lock.acquire(blocking=False):
            yield False
            return
        try:
            with self._tracker.hold(tracked) as free:
                yield free
        finally:
            if lock is not None:
                lock.release()

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
            # The notice says it and logs it as an error; the traceback is for debugging.
            log.debug("ipy_dbreset: could not repair %s in thread %s", *key, exc_info=True)
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
        self.calm.quiet = False
        for tracked in self._tracker:
            wrapper = tracked.wrapper
            if wanted is not None and wrapper.alias not in wanted:
                continue
            key = (wrapper.alias, tracked.thread_name)
            with self._may_touch(tracked) as free:
                if not free:
                    log.debug("ipy_dbreset: %s in thread %s is in use; not reset", *key)
                    skipped.append(key)
                    continue
                try:
                    result = touching(wrapper, partial(reset, wrapper, thread=tracked.thread_name))
                except Error as exc:
                    log.debug("ipy_dbreset: could not reset %s in thread %s", *key, exc_info=True)
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
