"""Never starting a query on a connection the server has already closed.

Replaces ``close_if_health_check_failed()`` on each wrapper's instance (Django
4.1 to 6.x call it before a cursor and in ``set_autocommit``); Django's own
runs after ours.  See ``docs/internals.md`` (Before a query).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING

from ipy_dbreset.drivers import driver_for
from ipy_dbreset.health import open_work
from ipy_dbreset.ledger import lost, tally_of
from ipy_dbreset.patches import patch, unpatch
from ipy_dbreset.records import Calm, Repair
from ipy_dbreset.repair import drop

if TYPE_CHECKING:
    from collections.abc import Callable

    from django.db.backends.base.base import BaseDatabaseWrapper

log = logging.getLogger(__name__)

HOOK = "close_if_health_check_failed"

IDLE = 0.002
"""Seconds since the wrapper's previous cursor before a connection is looked at.

Reading the clock costs tens of nanoseconds; a poll of the socket is a system
call, too much for every query.  Skipping the look for a connection used less
than this long ago only widens a race that no local check can close (the
server may drop the connection between any check and the send) from
microseconds to milliseconds.  The time since the previous cursor bounds the
connection's idle time from above, and what this guards against (idle
timeouts, a DBA's kill, a restart while the user computes) comes after seconds
of idleness, not milliseconds.
"""

_SERVERS = frozenset({"postgresql", "mysql"})
"""Vendors whose connections a server can close; SQLite's cannot hang up."""


class Preflight:
    """Installs the look before each query on connection wrappers, and collects what it did."""

    def __init__(self, calm: Calm) -> None:
        self._calm = calm  # set false when a look found something to say
        self.found: deque[tuple[BaseDatabaseWrapper, Repair]] = deque()
        """What the hooks did or saw, and to which connection, oldest first; appended
        from any thread, drained by the between-cell check (deque appends and pops
        are thread-safe)."""
        # Our hook on each wrapper, so that removal takes exactly ours away;
        # weakly, as the wrapper holds it: the hook holds the wrapper, and a
        # value that holds its own weak key would keep it forever.
        self._hooks: weakref.WeakKeyDictionary[
            BaseDatabaseWrapper, weakref.ref[Callable[[], None]]
        ] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()  # connections of several threads are hooked at once

    def install(
        self,
        wrapper: BaseDatabaseWrapper,
        *,
        thread: str | None = None,
        lock: threading.RLock | None = None,
    ) -> None:
        """Look at ``wrapper``'s connection before each of its queries (once; no-op after).

        ``thread`` names its owner for the notice (``None``: the shell's thread).
        ``lock`` is held while the connection is looked at and replaced, when
        another thread may be repairing it meanwhile (see :mod:`ipy_dbreset.tracking`).
        """
        if wrapper.vendor not in _SERVERS or HOOK in wrapper.__dict__:
            return
        # Django's method, or the backend's override (the PostgreSQL pool's).
        original: Callable[[], None] = getattr(wrapper, HOOK)
        found = self.found
        calm = self._calm
        monotonic = time.monotonic
        last = 0.0  # when a cursor was last asked for; 0: look at the first one
        # The dead connection whose loss was recorded: the queries that still
        # meet it (the user catches the error and queries again, or enters an
        # atomic block) are the same event, told once.
        told: list[object] = [None]

        # A closure over the wrapper: wrappers hold cycles already (ops,
        # features, ... point back at them), so this one costs nothing more.
        def close_if_health_check_failed() -> None:
            __tracebackhide__ = True  # not the user's error: IPython leaves this frame out
            nonlocal last
            now = monotonic()
            if now - last > IDLE and wrapper.connection is not None:
                if lock is None:
                    _look(wrapper, thread, found, told)
                else:
                    with lock:
                        _look(wrapper, thread, found, told)
                if found:
                    calm.quiet = False
            last = now
            original()

        with self._lock:
            if HOOK in wrapper.__dict__:
                return
            self._hooks[wrapper] = patch(wrapper, HOOK, close_if_health_check_failed)

    def remove(self, wrapper: BaseDatabaseWrapper) -> None:
        """Take our hook away from ``wrapper``, leaving it as Django made it."""
        with self._lock:
            ref = self._hooks.pop(wrapper, None)
            if ref is not None:
                unpatch(wrapper, HOOK, ref)

    def remove_all(self) -> None:
        """Take every hook away again, leaving the wrappers as Django made them."""
        for wrapper in list(self._hooks.keys()):
            self.remove(wrapper)
        self.found.clear()

    def drain(self) -> list[tuple[BaseDatabaseWrapper, Repair]]:
        """What the hooks did since the last call, oldest first."""
        done = []
        while self.found:
            done.append(self.found.popleft())
        return done


def _look(
    wrapper: BaseDatabaseWrapper,
    thread: str | None,
    found: deque[tuple[BaseDatabaseWrapper, Repair]],
    told: list[object],
) -> None:
    """Replace ``wrapper``'s connection if the server closed it and no transaction is open.

    ``told[0]`` is the dead connection whose lost transaction was recorded
    already: it is recorded once, however many queries still meet it.
    """
    raw = wrapper.connection
    if raw is None or raw is told[0]:
        return
    told[0] = None
    driver_error: type[Exception] = wrapper.Database.Error  # type: ignore[attr-defined]
    try:
        closed = driver_for(raw).server_closed(wrapper)
    except (driver_error, OSError) as exc:
        # The query itself will meet whatever this was, exactly as without us.
        log.debug("ipy_dbreset: %s: could not look before a query: %s", wrapper.alias, exc)
        return
    if not closed:
        return
    work = open_work(wrapper)
    if work is None:
        drop(wrapper)  # ensure_connection(), right after us, opens a new one
        repair = Repair(
            wrapper.alias,
            "reconnected",
            "the server had closed the connection",
            lost="no transaction was open, nothing was lost",
            thread=thread,
        )
    else:
        # Reconnecting would run the rest of the transaction's queries in
        # autocommit mode, without the work before them: let the query fail.
        repair = Repair(
            wrapper.alias,
            "let a query fail on",
            "the server had closed the connection inside a transaction",
            lost=lost(work, tally_of(wrapper)),
            thread=thread,
        )
        told[0] = raw
    # The user hears of it from the next check's notice, which is also its
    # record at the level of what was lost (ipy_dbreset.output); here for tracing.
    log.debug("ipy_dbreset: %r", repair)
    found.append((wrapper, repair))
