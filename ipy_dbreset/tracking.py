"""Knowing every Django connection in use, in every thread, and when it is safe to touch.

Django keeps one connection per alias *per thread*.  The cell's thread can list
its own with ``connections.all(initialized_only=True)``; connections of other
threads (the async ORM's executor thread in Jupyter, worker threads) are only
seen when they are created, through Django's ``connection_created`` signal.

A connection owned by another thread is touched only when that thread cannot
be using it: the thread has ended, or it holds no transaction and is not
running a query.  The latter is made race-free by a lock that an
``execute_wrapper`` holds around each of that connection's queries.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.db import connections
from django.db.backends.signals import connection_created

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from django.db.backends.base.base import BaseDatabaseWrapper


@dataclass(frozen=True)
class Tracked:
    """A connection and the thread that owns it (``None``: the shell's own thread)."""

    wrapper: BaseDatabaseWrapper
    thread: threading.Thread | None

    @property
    def thread_name(self) -> str | None:
        return None if self.thread is None else self.thread.name


class _Guard:
    """An ``execute_wrapper`` that holds a lock while a query runs."""

    def __init__(self) -> None:
        self.lock = threading.RLock()

    def __call__(
        self, execute: Callable[..., Any], sql: Any, params: Any, many: bool, context: Any
    ) -> Any:
        with self.lock:
            return execute(sql, params, many, context)


class ConnectionTracker:
    """Every Django connection of this process that is known to be in use.

    Parameters
    ----------
    home
        The thread the shell runs cells in; its connections are listed directly.
    """

    def __init__(self, home: threading.Thread | None = None) -> None:
        self.home_thread = home or threading.current_thread()
        self._others: weakref.WeakKeyDictionary[
            BaseDatabaseWrapper, tuple[threading.Thread, _Guard]
        ] = weakref.WeakKeyDictionary()
        self._uid = f"ipy_dbreset-{id(self)}"
        self.version = 0
        """Bumped whenever a connection is opened, so that cached views can notice."""
        self._lock = threading.Lock()  # other threads add to _others while we list it
        self._home: weakref.WeakSet[BaseDatabaseWrapper] = weakref.WeakSet()
        self._on_connect: weakref.WeakKeyDictionary[
            BaseDatabaseWrapper, Callable[[BaseDatabaseWrapper], None]
        ] = weakref.WeakKeyDictionary()
        self.on_created: list[Callable[[BaseDatabaseWrapper], None]] = []
        """Called with every connection opened while watching, in the thread that opened it."""

    def start(self) -> None:
        """Watch new connections; adopt the home thread's existing ones."""
        connection_created.connect(self._created, weak=False, dispatch_uid=self._uid)
        self._home.update(connections.all(initialized_only=True))
        self.version += 1

    def stop(self) -> None:
        connection_created.disconnect(dispatch_uid=self._uid)
        self._on_connect.clear()
        self._home.clear()
        with self._lock:
            for wrapper, (_, guard) in list(self._others.items()):
                if guard in wrapper.execute_wrappers:
                    wrapper.execute_wrappers.remove(guard)
            self._others.clear()

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
        if thread is self.home_thread:
            self._home.add(connection)
            return
        with self._lock:
            if connection not in self._others:
                guard = _Guard()
                connection.execute_wrappers.append(guard)
                self._others[connection] = (thread, guard)

    @property
    def home(self) -> weakref.WeakSet[BaseDatabaseWrapper]:
        """The home thread's connections that have connected at least once.

        Kept from the signal: listing them with ``connections.all()`` before
        every cell would cost more than judging them.
        """
        return self._home

    def has_others(self) -> bool:
        return bool(self._others)

    def others(self) -> list[Tracked]:
        """Other threads' connections."""
        with self._lock:
            return [Tracked(wrapper, thread) for wrapper, (thread, _) in self._others.items()]

    def __iter__(self) -> Iterator[Tracked]:
        """Every connection in use: the home thread's first, then other threads'.

        Only valid when called from the home thread.
        """
        for wrapper in self._home:
            yield Tracked(wrapper, None)
        yield from self.others()

    def hold(self, tracked: Tracked) -> _Hold:
        """A context manager that holds ``tracked`` still, or reports it busy."""
        if tracked.thread is None or not tracked.thread.is_alive():
            return _Hold(None)
        _, guard = self._others[tracked.wrapper]
        return _Hold(guard.lock, tracked.wrapper)


class _Hold:
    """Holds another thread's connection still while it is repaired."""

    def __init__(self, lock: threading.RLock | None, wrapper: BaseDatabaseWrapper | None = None):
        self._lock = lock
        self._wrapper = wrapper
        self.free = True

    def __enter__(self) -> _Hold:
        if self._lock is None or self._wrapper is None:
            return self
        # Between queries, the owner may still be in the middle of its own
        # transaction: then only the owner may end it.
        if self._wrapper.in_atomic_block or not self._wrapper.autocommit:
            self.free = False
            return self
        self.free = self._lock.acquire(blocking=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None and self.free and self._wrapper is not None:
            self._lock.release()
