"""Which Django connections exist, in every thread, and when each may be touched.

How a connection of another thread, or of a kernel cell's context, is found and
when touching it is safe: ``docs/internals.md`` (Which connections exist).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sys
import threading
import weakref
from concurrent.futures import thread as futures_thread
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

from django.db import connections
from django.db.backends.signals import connection_created
from django.utils.connection import ConnectionDoesNotExist

from ipy_dbreset.ledger import Ledger
from ipy_dbreset.project import ASYNC_UNSAFE_VARIABLE
from ipy_dbreset.records import Calm, Repair

if TYPE_CHECKING:
    from collections import deque
    from collections.abc import Callable, Iterator

    from django.db.backends.base.base import BaseDatabaseWrapper

T = TypeVar("T")


# The loop a ``ThreadPoolExecutor`` worker waits for jobs in (Python 3.10 to
# 3.14).  It waits on a queue written in C, so while it waits this loop is the
# thread's innermost Python frame.  Should a Python version rename it, no
# worker counts as waiting, and their transactions are left alone as before.
_POOL_WORKER_LOOP = getattr(getattr(futures_thread, "_worker", None), "__code__", None)


def waiting_for_work(thread: threading.Thread) -> bool:
    """Whether ``thread`` is a pool worker waiting for a job, running none of its own code."""
    frame = sys._current_frames().get(thread.ident or -1)
    return frame is not None and frame.f_code is _POOL_WORKER_LOOP


def in_event_loop() -> bool:
    """Whether code here runs inside an event loop, as cells do in a Jupyter kernel."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@contextlib.contextmanager
def borrowed(wrapper: BaseDatabaseWrapper) -> Iterator[None]:
    """Allow this thread to use ``wrapper`` (of any thread) while the block runs."""
    wrapper.inc_thread_sharing()
    try:
        yield
    finally:
        wrapper.dec_thread_sharing()


def outside_event_loop(func: Callable[[], T]) -> T:
    """Run ``func`` where Django's async-safety check lets it run.

    In a Jupyter kernel the cell runs inside an event loop, and Django refuses
    synchronous database calls there unless ``DJANGO_ALLOW_ASYNC_UNSAFE`` is
    set.  Repairs must work even when the user opted out of that, so they run
    in a short-lived thread while this one waits (it is not using the
    connection meanwhile).
    """
    if not in_event_loop() or os.environ.get(ASYNC_UNSAFE_VARIABLE):
        return func()
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(func())
        except BaseException as exc:  # re-raised in the calling thread
            failure.append(exc)

    worker = threading.Thread(target=run, name="ipy_dbreset-repair", daemon=True)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return outcome[0]


def touching(wrapper: BaseDatabaseWrapper, action: Callable[[], T]) -> T:
    """Run ``action`` on ``wrapper`` where Django lets this thread touch it.

    Outside the event loop, with the wrapper borrowed from its thread.  Whether
    its thread may be using it meanwhile is :meth:`ConnectionTracker.hold`'s
    question, asked first.
    """

    def borrowing() -> T:
        with borrowed(wrapper):
            return action()

    return outside_event_loop(borrowing)


class Tracked(NamedTuple):
    """A connection and the thread that owns it (``None``: the shell's own thread)."""

    wrapper: BaseDatabaseWrapper
    thread: threading.Thread | None

    @property
    def thread_name(self) -> str | None:
        return None if self.thread is None else self.thread.name


def _reached(wrapper: BaseDatabaseWrapper, current: dict[str, BaseDatabaseWrapper]) -> bool:
    """Whether ``connections[wrapper.alias]`` is ``wrapper`` in the caller's context.

    ``current`` is what the context holds of the aliases ``DATABASES`` names;
    nothing is created to find out.
    """
    if wrapper.alias in current:
        return current[wrapper.alias] is wrapper
    if wrapper.alias in connections.settings:
        return False  # this context holds none of that alias
    try:  # an alias DATABASES does not name, put in place by hand: finding it creates nothing
        return connections[wrapper.alias] is wrapper
    except ConnectionDoesNotExist:
        return False


class Mark:
    """An ``execute_wrapper`` noting that its connection ran a query since it was last looked at.

    A connection's state (libpq's transaction status, Django's flags) changes
    while it is used; a connection nobody used since it was judged healthy
    needs no second look, only its socket, which :class:`~ipy_dbreset.drivers.Sockets`
    asks about all at once.  So the checkup reads only the connections
    queued here, and per-cell work does not grow with the number of idle ones.
    """

    __slots__ = (
        "__weakref__",
        "_calm",
        "_queue",
        "_told",
        "_unsettled",
        "ledger",
        "used",
        "watch",
        "wrapper",
    )

    def __init__(
        self,
        wrapper: BaseDatabaseWrapper,
        queue: list[Mark],
        *,
        calm: Calm,
        fresh: bool = True,
        unsettled: list[Mark] | None = None,
        told: Callable[[BaseDatabaseWrapper, Repair], None] | None = None,
    ) -> None:
        self._queue = queue
        self._calm = calm  # set false once this is queued: the callbacks have work
        self._unsettled = unsettled
        self._told = told  # for what the next check is to say of an interrupted query
        self.used = False
        """Queued and not yet taken: a further query need not queue it again."""

        def gone(ref: weakref.ref[BaseDatabaseWrapper]) -> None:
            self._note()  # its thread has ended: let the checkup drop what it keeps

        self.wrapper: weakref.ref[BaseDatabaseWrapper] = weakref.ref(wrapper, gone)
        """Weak: another thread's connection goes with its thread."""
        # Fresh (just connected, or in autocommit outside atomic blocks): the
        # ledger sees its transactions from their start.
        self.ledger = Ledger(known=fresh)
        """What the connection's open transaction holds (:mod:`ipy_dbreset.ledger`)."""
        self.ledger.install(wrapper, None if unsettled is None else self._report)
        self.watch: Callable[..., Any] | None = None
        """What the idle keeper wraps each query in, while ``idle_release`` is on."""

    def _note(self) -> None:
        if not self.used:
            self.used = True
            self._queue.append(self)  # atomic: other threads append too
            self._calm.quiet = False

    def _report(self) -> None:
        # A COMMIT that did not answer: for the next check to ask the server about.
        if self._unsettled is not None:
            self._unsettled.append(self)
            self._calm.quiet = False

    def __call__(
        self, execute: Callable[..., Any], sql: Any, params: Any, many: bool, context: Any
    ) -> Any:
        __tracebackhide__ = True  # not the user's error: IPython leaves this frame out
        watch = self.watch
        try:
            if watch is None:
                result = execute(sql, params, many, context)
            else:
                result = watch(execute, sql, params, many, context)
        except KeyboardInterrupt:
            if self._told is not None:
                _interrupted(context["connection"], self._told)
            raise
        finally:
            # After the query, not before: a look taken while it runs is
            # followed by another once it is over.
            self._note()
        self.ledger.note(context["connection"], sql, params, many, context["cursor"])
        return result


class GuardedMark(Mark):
    """The :class:`Mark` of another thread's connection, which also holds a lock while a
    query runs: :meth:`ConnectionTracker.hold` tries it before touching the connection."""

    __slots__ = ("lock",)

    def __init__(self, wrapper: BaseDatabaseWrapper, queue: list[Mark], **kwargs: Any) -> None:
        super().__init__(wrapper, queue, **kwargs)
        self.lock = threading.RLock()

    def __call__(
        self, execute: Callable[..., Any], sql: Any, params: Any, many: bool, context: Any
    ) -> Any:
        __tracebackhide__ = True  # not the user's error: IPython leaves this frame out
        with self.lock:
            return Mark.__call__(self, execute, sql, params, many, context)


def _interrupted(
    wrapper: BaseDatabaseWrapper, told: Callable[[BaseDatabaseWrapper, Repair], None]
) -> None:
    """Say what became of a query interrupted outside any transaction (psycopg 3).

    psycopg 3 sends the server a cancel on Ctrl-C and the stop button, waits for
    the query's end, and raises a bare ``KeyboardInterrupt`` either way.  libpq
    keeps the error of the last command until the next one is sent: set, the
    server cancelled the query; empty, the query had ended before the cancel
    reached it, and what it did stands.  Inside a transaction the check's own
    repair tells what the interrupt cost.
    """
    pgconn = getattr(wrapper.connection, "pgconn", None)
    if pgconn is None or wrapper.in_atomic_block or not wrapper.autocommit:
        return
    try:
        if pgconn.transaction_status != 0:  # psycopg.pq.TransactionStatus.IDLE
            return  # still busy, or the connection is gone: the check's business
        cancelled = bool(pgconn.error_message)
    except Exception:  # a connection psycopg has let go of: nothing known here
        return
    if cancelled:
        done = Repair(
            wrapper.alias,
            "the server cancelled a query on",
            "it was interrupted",
            lost="no transaction was open, nothing else was lost",
        )
    else:
        done = Repair(
            wrapper.alias,
            "a query had ended on",
            "before its interrupt reached the server",
            lost="no transaction was open: what it did stands, its result was dropped",
        )
    told(wrapper, done)


class Lookout(Protocol):
    """What looks at each tracked connection before its queries (:mod:`ipy_dbreset.preflight`).

    Given by whoever starts the tracker, so that the registry of connections
    knows nothing of the repairs.
    """

    found: deque[tuple[BaseDatabaseWrapper, Repair]]
    """What was done or seen between checks, for the next check to say."""

    def install(
        self,
        wrapper: BaseDatabaseWrapper,
        *,
        thread: str | None = None,
        lock: threading.RLock | None = None,
    ) -> None: ...

    def remove(self, wrapper: BaseDatabaseWrapper) -> None: ...

    def remove_all(self) -> None: ...

    def drain(self) -> list[tuple[BaseDatabaseWrapper, Repair]]: ...


class ConnectionTracker:
    """Every Django connection of this process that is known to be in use.

    Parameters
    ----------
    lookout
        Put on every tracked connection, taken off when it is forgotten.
    home
        The thread the shell runs cells in; its connections are listed directly.
    """

    def __init__(self, lookout: Lookout, calm: Calm, home: threading.Thread | None = None) -> None:
        self.home_thread = home or threading.current_thread()
        """The shell's thread: its connections are the ones cells use."""
        # Other threads' connections, with their thread and their mark.  Held
        # until forget(): once its thread has ended, a connection is closed
        # (and what it lost told) by whoever lists them, not at the garbage
        # collector's whim, which would keep a pooled connection from its pool
        # and say nothing.
        self._others: dict[BaseDatabaseWrapper, tuple[threading.Thread, GuardedMark]] = {}
        self._uid = f"ipy_dbreset-{id(self)}"  # our receiver of connection_created
        self.version = 0
        """Bumped whenever a connection is opened, so that cached views can notice."""
        self._lock = threading.Lock()  # other threads add to _others while we list it
        # The home thread's connections that have connected (see home).
        self._home: weakref.WeakSet[BaseDatabaseWrapper] = weakref.WeakSet()
        # What to run, once, when a wrapper next connects (when_connected).
        self._on_connect: weakref.WeakKeyDictionary[
            BaseDatabaseWrapper, Callable[[BaseDatabaseWrapper], None]
        ] = weakref.WeakKeyDictionary()
        self._marks: weakref.WeakKeyDictionary[BaseDatabaseWrapper, Mark] = (
            weakref.WeakKeyDictionary()
        )  # every tracked connection's Mark, in every thread
        self.used: list[Mark] = []
        """Marks of the connections that ran a query since :meth:`take_used`; any thread appends."""
        self.unsettled: list[Mark] = []
        """Marks of the connections whose COMMIT did not answer (:mod:`ipy_dbreset.commits`),
        for the next check to ask the server about; any thread appends."""
        self.preflight = lookout
        """Looks at every tracked connection before its queries."""
        self.calm = calm
        """Set false by whatever is queued above, or a connection opened or forgotten."""
        self.on_created: list[Callable[[BaseDatabaseWrapper], None]] = []
        """Called with every connection opened while watching, in the thread that opened it."""

    def start(self) -> None:
        """Watch new connections; adopt the home thread's open ones."""
        connection_created.connect(self._created, weak=False, dispatch_uid=self._uid)
        # A wrapper that never connected is not in use (Django's setup creates
        # one, unconnected); it is adopted by the signal if it ever connects.
        opened = [w for w in connections.all(initialized_only=True) if w.connection is not None]
        self._home.update(opened)
        for wrapper in self._home:
            self.mark(wrapper, fresh=wrapper.autocommit and not wrapper.in_atomic_block)
            self.preflight.install(wrapper)
        self.version += 1
        self.calm.quiet = False

    def stop(self) -> None:
        connection_created.disconnect(dispatch_uid=self._uid)
        self.preflight.remove_all()
        self._on_connect.clear()
        self._home.clear()
        with self._lock:
            for wrapper, mark in list(self._marks.items()):
                if mark in wrapper.execute_wrappers:
                    wrapper.execute_wrappers.remove(mark)
                mark.ledger.remove(wrapper)
            self._marks.clear()
            self._others.clear()
        self.used.clear()
        self.unsettled.clear()
        self.calm.quiet = False

    def when_connected(
        self, wrapper: BaseDatabaseWrapper, action: Callable[[BaseDatabaseWrapper], None]
    ) -> None:
        """Run ``action`` (once) right after ``wrapper`` next opens a connection."""
        self._on_connect[wrapper] = action

    def _created(self, sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
        self.version += 1
        for hook in self.on_created:
            hook(connection)
        action = self._on_connect.pop(connection, None)
        if action is not None:
            action(connection)
        thread = threading.current_thread()
        home = thread is self.home_thread
        mark = self.mark(connection)
        if home:
            self._home.add(connection)
            self.preflight.install(connection)
        else:
            with self._lock:
                if connection not in self._others and isinstance(mark, GuardedMark):
                    self._others[connection] = (thread, mark)
                    self.preflight.install(connection, thread=thread.name, lock=mark.lock)
        self.calm.quiet = False

    def mark(self, wrapper: BaseDatabaseWrapper, *, fresh: bool = True) -> Mark:
        """The wrapper's mark, put on it first if it has none (guarded: another thread's).

        Called in the thread that uses ``wrapper``.
        """
        with self._lock:
            mark = self._marks.get(wrapper)
            if mark is None:
                home = threading.current_thread() is self.home_thread
                kind = Mark if home else GuardedMark
                mark = self._marks[wrapper] = kind(
                    wrapper,
                    self.used,
                    calm=self.calm,
                    fresh=fresh,
                    unsettled=self.unsettled,
                    told=self._tell,
                )
                # First, so outermost: it sees every query, and Django's
                # execute_wrapper() context manager, which pops the last
                # one on exit, never removes it instead of the user's own.
                wrapper.execute_wrappers.insert(0, mark)
            return mark

    def _tell(self, wrapper: BaseDatabaseWrapper, done: Repair) -> None:
        """Leave ``done`` for the next check to say (any thread)."""
        thread = threading.current_thread()
        if thread is not self.home_thread:
            done = dataclasses.replace(done, thread=thread.name)
        self.preflight.found.append((wrapper, done))
        self.calm.quiet = False

    def forget(self, wrapper: BaseDatabaseWrapper) -> None:
        """Stop tracking another thread's connection (its thread has ended): take
        everything put on it away, so that it is freed with its thread's other objects."""
        with self._lock:
            self._others.pop(wrapper, None)
            mark = self._marks.pop(wrapper, None)
        if mark is not None:
            if mark in wrapper.execute_wrappers:
                wrapper.execute_wrappers.remove(mark)
            mark.ledger.remove(wrapper)
        self.preflight.remove(wrapper)
        self._on_connect.pop(wrapper, None)
        self.version += 1  # what the checkup keeps of it must go too
        self.calm.quiet = False

    def mark_of(self, wrapper: BaseDatabaseWrapper) -> Mark | None:
        return self._marks.get(wrapper)

    def take_used(self) -> list[Mark]:
        """Empty :attr:`used`; a connection used from now on is queued again."""
        used = self.used
        taken = []
        while used:
            mark = used.pop()
            mark.used = False  # before its state is read: a later query queues it again
            taken.append(mark)
        return taken

    @property
    def home(self) -> list[BaseDatabaseWrapper]:
        """The home thread's connections that have connected at least once, and
        that the caller's context reaches.

        Known from the signal; ``connections.all()`` only tells which of them
        the caller's context can still reach (in a kernel, one connected while
        the kernel started up cannot be reached by any cell).
        """
        if not self._home:
            return []
        current = {w.alias: w for w in connections.all(initialized_only=True)}
        return [w for w in self._home if _reached(w, current)]

    def is_home(self, wrapper: BaseDatabaseWrapper) -> bool:
        """Whether ``wrapper`` connected in the home thread (reachable from here or not)."""
        return wrapper in self._home

    def has_others(self) -> bool:
        return bool(self._others)

    def others(self) -> list[Tracked]:
        """Other threads' connections: those of live threads, and those of ended
        threads still connected (closing them is :mod:`ipy_dbreset.idle`'s).

        The connections of ended threads that are closed are forgotten here.
        """
        with self._lock:
            found = [(wrapper, thread) for wrapper, (thread, _) in self._others.items()]
        live = []
        for wrapper, thread in found:
            if wrapper.connection is None and not thread.is_alive():
                self.forget(wrapper)  # nobody can use it again
            else:
                live.append(Tracked(wrapper, thread))
        return live

    def __iter__(self) -> Iterator[Tracked]:
        """Every connection in use: the home thread's first, then other threads'.

        Only valid when called from the home thread.
        """
        for wrapper in self.home:
            yield Tracked(wrapper, None)
        yield from self.others()

    @contextlib.contextmanager
    def hold(self, tracked: Tracked, *, idle: bool = False) -> Iterator[bool]:
        """Hold ``tracked`` still while the block runs; yield whether it may be touched.

        ``False``: its thread is running one of its queries, or is somewhere
        between two queries of its transaction (only that thread may end it).
        ``idle``: touched only if its thread runs none of its own code (it has
        ended, or is a pool worker waiting for a job), transaction or not, as
        closing a healthy connection its thread may be about to use asks.
        """
        thread = tracked.thread
        if thread is None or not thread.is_alive():
            yield True
            return
        wrapper = tracked.wrapper
        entry = self._others.get(wrapper)
        if entry is None:  # not (or no longer) tracked: nothing holds it still
            yield False
            return
        lock = entry[1].lock  # held by its mark around each query
        held = lock.acquire(blocking=False)
        if (
            held
            and (idle or wrapper.in_atomic_block or not wrapper.autocommit)
            and not waiting_for_work(thread)
        ):
            lock.release()
            held = False
        try:
            yield held
        finally:
            if held:
                lock.release()
