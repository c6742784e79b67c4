"""What every driver module shares: the records it returns and the socket helpers."""

from __future__ import annotations

import functools
import select
from enum import Enum
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from django.db.backends.base.base import BaseDatabaseWrapper


class Transaction(Enum):
    """The transaction state of a connection, in libpq's words."""

    IDLE = "idle"
    ACTIVE = "active"  # a query is still running
    INTRANS = "in a transaction"
    INERROR = "aborted"
    UNKNOWN = "unknown"


class FastCheck(Protocol):
    def __call__(self) -> bool: ...


class Liveness(Enum):
    """What a closer look at a connection with pending input finds."""

    ALIVE = "alive"
    LOST = "lost"
    UNREAD = "unread"  # alive, but a query's result was never read (an interrupt)


class Link(NamedTuple):
    """A snapshot of a connection as the driver sees it, taken without I/O to the server.

    A named tuple, not a dataclass: it is built for every connection before
    and after every cell.
    """

    closed: bool
    transaction: Transaction
    pending: bool
    """The server sent something we did not ask for (often: it is closing the connection)."""


class Driver(Protocol):
    """The per-driver operations the health checks need."""

    name: str

    def link(self, wrapper: BaseDatabaseWrapper) -> Link:
        """Describe ``wrapper.connection`` from local state only."""

    def liveness(self, wrapper: BaseDatabaseWrapper) -> Liveness:
        """Find out whether a connection with pending input is gone.

        Called only when :meth:`link` reported ``pending`` or something else
        (an interrupt) makes trouble plausible.  It may read what the server
        sent, and on drivers where that says nothing, make one round trip.
        It changes nothing.
        """

    def settle(self, wrapper: BaseDatabaseWrapper) -> bool:
        """Read and drop a result left unread, keeping the transaction; False if it cannot."""

    def server_id(self, wrapper: BaseDatabaseWrapper) -> int | None:
        """The server's process or thread id for this connection, if known locally."""

    def server_closed(self, wrapper: BaseDatabaseWrapper) -> bool:
        """Whether the connection can no longer carry a query: the server (or driver) closed it.

        Asked just before a query would be sent, so it sends nothing itself
        while the socket is quiet: it reads the driver's state and polls the
        socket.  Only input the client did not ask for is looked at closer
        (:meth:`liveness`; on MySQL that is one ping).
        """

    def streaming(self, wrapper: BaseDatabaseWrapper) -> bool:
        """Whether a result is being streamed, row by row, to a generator the user still holds
        (psycopg 3's ``cursor.stream()``): the connection is busy, not stuck.  Local state only."""

    def waiting(self, wrapper: BaseDatabaseWrapper) -> bool:
        """Whether a query on it is waiting for the server in Python, where a signal handler runs.

        Asked from a SIGINT handler: local state only.
        """

    def fast_check(self, wrapper: BaseDatabaseWrapper) -> FastCheck:
        """A function answering "still healthy?" for the current driver connection.

        It runs after a connection was used, so it is built once per connection
        with everything it needs bound, and reads local state only (libpq's
        transaction status): what the server sent is asked of every socket at
        once, through :class:`Sockets` and :meth:`fileno`.  Anything but a
        plain yes sends the caller to :meth:`link` and friends.
        """

    def fileno(self, wrapper: BaseDatabaseWrapper) -> int:
        """The socket of ``wrapper.connection``, or -1 if it has none (or no longer)."""

    def parameter(self, wrapper: BaseDatabaseWrapper, name: str) -> str | None:
        """A setting the server reports by itself (PostgreSQL's ParameterStatus), if known.

        Local state only: ``in_hot_standby``, ``default_transaction_read_only``
        (PostgreSQL 14+).  ``None`` where the server or a pooler does not report it.
        """


# The readiness check.  Linux has epoll and poll, macOS poll, Windows neither:
# there select() asks (it takes sockets only, which is all that is asked here).
_POLL = getattr(select, "poll", None)
_EPOLL = getattr(select, "epoll", None)
# Input, urgent data, hang-up and errors, where poll() exists.
_MASK = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR if _POLL is not None else 0
_SELECT_MAX = 500  # sockets per select() call: Windows' select() takes at most 512


def _held_question() -> Callable[[int], Callable[[], object]] | None:
    """For an epoll set, ``epoll.poll(0)``'s question asked without releasing the GIL
    (libc's ``epoll_wait`` through ctypes), where there is epoll.

    ``select.epoll.poll`` releases it around the system call, even with a zero
    timeout; in a kernel, the thread that takes it then (ZMQ's, sending the
    cell's first messages) keeps it for tens of microseconds.  A zero-timeout
    wait never blocks, so holding the GIL through it costs nothing.
    """
    if _EPOLL is None:
        return None
    try:
        import ctypes

        wait = ctypes.PyDLL(None).epoll_wait
    except (ImportError, OSError, AttributeError):
        return None
    wait.restype = ctypes.c_int
    # Where it writes what it found, never read: room for one event on any architecture.
    events = ctypes.create_string_buffer(32)

    def question(epfd: int) -> Callable[[], object]:
        # At most one event, no timeout: the number found, or -1 on an error
        # (EINTR included); either sends the caller on to look closer.
        return functools.partial(wait, epfd, events, 1, 0)

    return question


_HELD_QUESTION = _held_question()


def _gone(timeout: int) -> list[Any]:
    return [-1]


def _selecting(filenos: list[int]) -> Callable[[int], list[Any]]:
    """``poll``'s question (timeout in ms), asked with ``select()`` where there is no ``poll``.

    A socket ``select()`` refuses (closed meanwhile, or a number beyond
    ``FD_SETSIZE`` on a POSIX system without ``poll``) counts as something to
    look at, as ``POLLNVAL`` does.
    """

    def ask(timeout: int) -> list[Any]:
        try:
            for start in range(0, len(filenos), _SELECT_MAX):
                chunk = filenos[start : start + _SELECT_MAX]
                ready, _, failed = select.select(chunk, (), chunk, timeout / 1000)
                if ready or failed:
                    return [*ready, *failed]
        except (OSError, ValueError):
            return [-1]
        return []

    return ask


def poller(fileno: int) -> Callable[[int], list[Any]]:
    """A question like ``poll.poll`` about ``fileno``: input, hang-up or errors.

    libpq can close its socket before the driver notices (fileno -1): that
    counts as something to look at, never as an error.
    """
    if fileno < 0:
        return _gone
    if _POLL is None:
        return _selecting([fileno])
    watcher = _POLL()
    watcher.register(fileno, _MASK)
    return watcher.poll  # type: ignore[no-any-return]


def always_healthy() -> bool:
    return True


class Sockets:
    """Many sockets asked at once whether the server sent anything or hung up.

    The set is registered with the kernel once (an ``epoll`` set on Linux, a
    ``poll`` set on macOS) and kept: each question is then one system call,
    whatever the number of sockets, and on Linux its cost does not grow with
    it.  An ``epoll`` set forgets a socket that is closed; that happens only
    while the connection is used (the driver reads EOF), which the caller
    watches for otherwise.  Windows has neither: ``select()`` asks there.
    """

    def __init__(self, filenos: Iterable[int]) -> None:
        wanted = sorted({fileno for fileno in filenos if fileno >= 0})
        self._epoll: select.epoll | None = None  # ours to close, on Linux
        self.question: Callable[[], object] | None = None
        """The zero-timeout question, as one call that returns something true if
        any socket has input, has hung up or failed: the epoll set's (asked
        without releasing the GIL where it can be), the poll set's or
        select()'s; ``None`` with no socket, and after :meth:`close`."""
        if not wanted:
            return
        if _EPOLL is not None:
            epoll = _EPOLL()
            try:
                for fileno in wanted:
                    epoll.register(fileno, _MASK)
            except OSError:  # not a pollable file after all: let poll() say so
                epoll.close()
            else:
                self._epoll = epoll
                self.question = (
                    functools.partial(epoll.poll, 0)
                    if _HELD_QUESTION is None
                    else _HELD_QUESTION(epoll.fileno())
                )
                return
        if _POLL is None:
            self.question = functools.partial(_selecting(wanted), 0)
            return
        watcher = _POLL()
        for fileno in wanted:
            watcher.register(fileno, _MASK)
        self.question = functools.partial(watcher.poll, 0)

    def pending(self) -> bool:
        """Whether any socket has input, has hung up or failed (a zero-timeout poll)."""
        question = self.question
        return question is not None and bool(question())

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        self.question = None


def readable(fileno: int) -> bool:
    """Whether the server has sent data on this socket that nobody read yet."""
    return bool(poller(fileno)(0))


_LIBPQ_STATUS = (
    Transaction.IDLE,
    Transaction.ACTIVE,
    Transaction.INTRANS,
    Transaction.INERROR,
    Transaction.UNKNOWN,
)


def libpq_transaction(status: int) -> Transaction:
    """Map libpq's ``PQtransactionStatus`` (shared by psycopg 2 and 3) to :class:`Transaction`."""
    return _LIBPQ_STATUS[status] if 0 <= status < len(_LIBPQ_STATUS) else Transaction.UNKNOWN
