"""Bounding how long a connection may wait on a network path that stopped answering.

TCP keepalive and ``TCP_USER_TIMEOUT`` on every new connection (:class:`Network`)
and a SIGINT guard that cuts a frozen path (:class:`InterruptGuard`): see
``docs/internals.md`` (Frozen network paths) and ``docs/platforms.md``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import struct
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, NamedTuple

from ipy_dbreset.drivers import driver_for

# The guard is put in front of the SIGINT handler and taken away again around
# every kernel cell.  ``signal.signal``/``getsignal`` convert each handler to and
# from an enum, which costs about 8 us a pair, more than everything else the
# callbacks do; the C functions below them take and return the handler as it is.
try:
    import _signal  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # an interpreter without CPython's module
    _signal = signal
_getsignal: Callable[[int], Any] = _signal.getsignal
_setsignal: Callable[[int, Any], Any] = _signal.signal
_SIGINT = int(signal.SIGINT)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from types import FrameType

    from django.db.backends.base.base import BaseDatabaseWrapper

log = logging.getLogger(__name__)

# libpq's connection parameters for the same thing: a user who set one of them
# in OPTIONS has chosen, and the socket is left as libpq made it.
USER_OPTIONS = frozenset(
    ("keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout")
)

_TCP = socket.IPPROTO_TCP
# The silence before the first probe: TCP_KEEPIDLE on Linux and Windows,
# TCP_KEEPALIVE on macOS (where TCP_KEEPIDLE does not exist).
_KEEPIDLE = getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None))
_KEEPINTVL = getattr(socket, "TCP_KEEPINTVL", None)
_KEEPCNT = getattr(socket, "TCP_KEEPCNT", None)
# Linux only: without it, keepalive alone bounds the silence (see Keepalive).
_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", None)
_TCP_INFO = getattr(socket, "TCP_INFO", None)
# What the stop button's look at the path needs: the kernel's view of the
# connection, and a way to hand the interrupt back to the main thread.
GUARD_TOOLS = _TCP_INFO is not None and hasattr(signal, "pthread_kill")

# Keepalive while there is no bound: a probe after a minute of silence keeps
# NAT and firewall flows alive; how many unanswered probes end the connection
# is left to the system (Linux: 9 probes 75 s apart).
_UNBOUNDED_IDLE = 60


class Keepalive(NamedTuple):
    """Socket options that end a connection after ``bound`` seconds of network silence.

    Keepalive's probes add up to the bound (``idle + interval * probes``); they
    are sent only while no data waits for an acknowledgement, which
    ``TCP_USER_TIMEOUT`` bounds.  Where that option is missing (macOS,
    Windows), data sent into a silent path waits as long as the system
    retransmits it.
    """

    idle: int
    """Seconds of silence before the first probe."""
    interval: int | None
    """Seconds between probes (``None``: the system's)."""
    probes: int | None
    """Unanswered probes that end the connection (``None``: the system's)."""
    user_timeout: int
    """Milliseconds data may stay unacknowledged before the connection ends (0: no limit)."""

    @classmethod
    def for_bound(cls, bound: int) -> Keepalive:
        if bound <= 0:
            return cls(_UNBOUNDED_IDLE, None, None, 0)
        idle = max(1, bound // 2)
        probes = 3
        interval = max(1, (bound - idle) // probes)
        return cls(idle, interval, probes, bound * 1000)


class SocketState(NamedTuple):
    """The keepalive options a connection's socket has now, as ``%dbstatus`` shows them."""

    keepalive: bool
    idle: int | None
    interval: int | None
    probes: int | None
    user_timeout: int | None
    users: bool
    """The database's ``OPTIONS`` chose them (ours were not applied)."""

    def describe(self) -> str:
        if not self.keepalive:
            text = "off"
        else:
            text = "on"
            if self.idle is not None:
                text += f", after {self.idle}s"
            if self.interval is not None and self.probes is not None:
                text += f", {self.probes} probes {self.interval}s apart"
        if self.user_timeout:
            text += f", timeout {self.user_timeout / 1000:g}s"
        return text + (" (OPTIONS)" if self.users else "")


def tcp_socket(wrapper: BaseDatabaseWrapper) -> int | None:
    """The file descriptor of ``wrapper``'s TCP connection, or ``None`` (none, closed, Unix)."""
    raw = wrapper.connection
    fileno = getattr(raw, "fileno", None)
    if raw is None or fileno is None:  # sqlite3 and other file databases
        return None
    driver_error = wrapper.Database.Error  # type: ignore[attr-defined]  # each backend has it
    try:
        fd = fileno()
    except (driver_error, OSError, ValueError):  # closed
        return None
    if not isinstance(fd, int) or fd < 0:
        return None
    try:
        with _borrowed(fd) as sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                return None  # a Unix-domain socket cannot freeze
    except OSError:  # not a socket after all
        return None
    return fd


def _dup(fd: int) -> socket.socket:
    """The socket behind ``fd`` as a Python object of its own (closing it leaves ``fd`` open)."""
    return socket.socket(fileno=os.dup(fd))


@contextlib.contextmanager
def _borrowed(fd: int) -> Iterator[socket.socket]:
    """The socket behind ``fd`` while the block runs; ``fd`` itself stays the driver's.

    A duplicate where the system can make one; on Windows, whose socket
    handles are no C file descriptors that ``os.dup`` could copy, the handle
    itself, let go again (never closed) when the block ends.
    """
    try:
        sock = _dup(fd)
    except OSError:
        sock = socket.socket(fileno=fd)  # OSError if this is no socket either
        try:
            yield sock
        finally:
            sock.detach()
        return
    with sock:
        yield sock


def _chose_their_own(wrapper: BaseDatabaseWrapper) -> bool:
    options = wrapper.settings_dict.get("OPTIONS") or {}
    return any(name in options for name in USER_OPTIONS)


class Network:
    """Keepalive and a bound on network silence for every connection it is shown.

    Parameters
    ----------
    timeout
        Seconds the network may stay silent before a connection ends with a
        connection error; 0 for no bound (keepalive still keeps idle flows).
    per_cell
        Whoever runs the cells puts its own SIGINT handler back for each one
        (ipykernel does): :class:`InterruptGuard` must stand in front of it
        again every cell, and step back after it.
    kernel
        The ipykernel kernel that runs the cells, which sets its own handler
        before and after each request: the guard is put in front by the
        kernel's own call (:meth:`InterruptGuard.hook`).
    """

    def __init__(self, timeout: int, *, per_cell: bool, kernel: Any = None) -> None:
        self.options = Keepalive.for_bound(timeout)  # what tune() applies
        # The stop button's look at the path.
        self.guard = InterruptGuard(per_cell=per_cell, restored=kernel is not None)
        if kernel is not None:
            self.guard.hook(kernel)

    @property
    def timeout(self) -> int:
        return self.options.user_timeout // 1000

    @timeout.setter
    def timeout(self, seconds: int) -> None:
        self.options = Keepalive.for_bound(seconds)

    def tune(self, wrapper: BaseDatabaseWrapper) -> None:
        """Apply the options to ``wrapper``'s socket; never raises for a socket it cannot tune.

        Called from Django's ``connection_created`` signal, in whatever thread
        connects.
        """
        fd = tcp_socket(wrapper)
        if fd is None:
            return
        if threading.current_thread() is threading.main_thread():
            self.guard.watch(wrapper)
        if _chose_their_own(wrapper):
            return
        options = self.options
        wanted = [
            (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            (_TCP, _KEEPIDLE, options.idle),
            (_TCP, _KEEPINTVL, options.interval),
            (_TCP, _KEEPCNT, options.probes),
            (_TCP, _USER_TIMEOUT, options.user_timeout),
        ]
        try:
            with _borrowed(fd) as sock:
                for level, option, value in wanted:
                    if option is None or value is None:
                        continue  # the platform has no such option, or the system's value
                    try:
                        sock.setsockopt(level, option, value)
                    except OSError as exc:  # refused (older Windows): the others still count
                        log.debug(
                            "ipy_dbreset: %s: socket option %s not set: %s",
                            wrapper.alias,
                            option,
                            exc,
                        )
        except OSError as exc:  # the socket closed under us
            log.debug("ipy_dbreset: keepalive not set on %s: %s", wrapper.alias, exc)

    @staticmethod
    def state(wrapper: BaseDatabaseWrapper) -> SocketState | None:
        """What the socket has now; ``None`` without a TCP connection."""
        fd = tcp_socket(wrapper)
        if fd is None:
            return None

        def get(level: int, option: int | None) -> int | None:
            if option is None:
                return None
            try:
                return int(sock.getsockopt(level, option))
            except OSError:  # an option this system version does not know
                return None

        try:
            with _borrowed(fd) as sock:
                return SocketState(
                    keepalive=bool(get(socket.SOL_SOCKET, socket.SO_KEEPALIVE)),
                    idle=get(_TCP, _KEEPIDLE),
                    interval=get(_TCP, _KEEPINTVL),
                    probes=get(_TCP, _KEEPCNT),
                    user_timeout=get(_TCP, _USER_TIMEOUT),
                    users=_chose_their_own(wrapper),
                )
        except OSError:
            return None


# -- the path of an interrupted query ----------------------------------------------

# struct tcp_info (linux/tcp.h): eight u8 (state, ca_state, retransmits,
# probes, backoff, options, wscales, rate flags), then u32: rto, ato, snd_mss,
# rcv_mss, unacked, sacked, lost, retrans, fackets, last_data_sent,
# last_ack_sent, last_data_recv, last_ack_recv.
_INFO = struct.Struct("8B13I")
_ESTABLISHED = 1
_SILENT_MS = 1000  # no acknowledgement for this long while data or a probe waits: dead
_PROBE_SECONDS = 2.0  # a keepalive probe is sent within 1 s; allow 1 s for its answer


class PathInfo(NamedTuple):
    established: bool
    retransmits: int
    probes: int
    unacked: int
    last_ack_recv: int
    """Milliseconds since the peer last acknowledged anything."""

    @property
    def silent(self) -> bool:
        """The peer has not answered data or a probe for a while: the path is not answering."""
        waiting = (self.unacked and self.retransmits) or self.probes
        return bool(waiting) and self.last_ack_recv >= _SILENT_MS


def path_info(sock: socket.socket) -> PathInfo | None:
    """The kernel's view of a TCP connection (Linux ``TCP_INFO``), or ``None``."""
    if _TCP_INFO is None:
        return None
    try:
        raw = sock.getsockopt(_TCP, _TCP_INFO, _INFO.size)
    except OSError:
        return None
    if len(raw) < _INFO.size:
        return None
    fields = _INFO.unpack(raw)
    return PathInfo(
        established=fields[0] == _ESTABLISHED,
        retransmits=fields[2],
        probes=fields[3],
        unacked=fields[12],
        last_ack_recv=fields[20],
    )


Handler = Any  # what signal.getsignal returns: a callable, SIG_DFL, SIG_IGN or None
_ABSENT = object()  # an attribute that was not there


class InterruptGuard:
    """A SIGINT handler, in front of the shell's while a cell runs, that checks the path first.

    An interrupt while a query waits on a path that does not answer shuts the
    connection's socket down instead of interrupting, so the driver's wait
    ends at once with a connection error rather than trying to send a cancel
    request down a dead path.  When nothing says the path is dead, a keepalive
    probe is sent at once and the interrupt is delivered as soon as the server's
    kernel answers it; if it does not answer within :data:`_PROBE_SECONDS`,
    the socket is shut down.  Only drivers that wait in Python can be helped
    (psycopg 3, psycopg2 with a wait callback): the others run the handler only
    once their wait in C is over.  Without ``TCP_INFO`` and ``pthread_kill``
    (macOS, Windows) it watches nothing and never stands in front: the stop
    button interrupts as it does without the extension.
    """

    def __init__(self, *, per_cell: bool, restored: bool = False) -> None:
        # Installing a handler costs microseconds, as much as checking every
        # connection: where nobody replaces it between cells (a terminal), it
        # stays until disarm(); in a kernel, which does, it goes with each cell.
        self.per_cell = per_cell
        # ipykernel sets its handler again after each request: a second
        # sigaction() per cell would only be overwritten.
        self.restored = restored
        # The main thread's connections with a TCP socket; signals run there.
        self._watched: weakref.WeakSet[BaseDatabaseWrapper] = weakref.WeakSet()
        self.watching = False
        """Whether it ever watched one: then it stands in front around every cell."""
        self._main = threading.main_thread().ident  # signals are set and run there only
        self._handler = self._handle  # one bound method, recognised by identity
        self._previous: Handler = None  # the handler we stand in front of, while armed
        self._cell = 0  # bumped when a cell ends: a probe of an older cell stays quiet
        self._passing = False  # the next SIGINT is one we re-delivered: hand it on
        self._probing = False  # a probe thread is deciding about the last interrupt
        self._handing_on = False  # inside the previous handler: a call back to us ends there
        # While hooked: the kernel, our pre_handler_hook and what it replaced there.
        self._kernel: tuple[Any, Callable[[], None], Any] | None = None

    def watch(self, wrapper: BaseDatabaseWrapper) -> None:
        if GUARD_TOOLS:  # else it never stands in front: the plain interrupt
            self._watched.add(wrapper)
            self.watching = True

    def hook(self, kernel: Any) -> None:
        """Be put in front of SIGINT by ipykernel itself, before each request.

        ``Kernel.pre_handler_hook`` sets ``default_int_handler`` for every
        request and ``post_handler_hook`` puts the kernel's handler back;
        once watching, ours sets the guard instead, in the same one call, so
        that :meth:`arm` finds it in place and a cell costs no system call of
        ours.  Mirrors ``pre_handler_hook`` of ipykernel 6.0 to 7.x.
        """
        original = kernel.pre_handler_hook
        before = kernel.__dict__.get("pre_handler_hook", _ABSENT)

        def pre_handler_hook() -> None:
            if self._kernel is None or not self.watching or threading.get_ident() != self._main:
                original()
                return
            self._previous = signal.default_int_handler
            kernel.saved_sigint_handler = _setsignal(_SIGINT, self._handler)

        kernel.pre_handler_hook = pre_handler_hook
        self._kernel = (kernel, pre_handler_hook, before)

    def unhook(self) -> None:
        """Give the kernel its own ``pre_handler_hook`` back (see :meth:`hook`)."""
        if self._kernel is None:
            return
        kernel, ours, before = self._kernel
        self._kernel = None  # ours, if someone wrapped it meanwhile, now only calls theirs
        if kernel.__dict__.get("pre_handler_hook") is ours:
            if before is _ABSENT:
                del kernel.pre_handler_hook
            else:
                kernel.pre_handler_hook = before

    def arm(self) -> None:
        """Stand in front of the current SIGINT handler (main thread only), before a cell."""
        if not self.watching or (self._previous is not None and not self.per_cell):
            return
        if threading.get_ident() != self._main:
            return
        current = _getsignal(_SIGINT)
        if current is self._handler:
            return
        if not callable(current):
            return  # the default action or ignored: nothing to chain to
        self._previous = current
        _setsignal(_SIGINT, self._handler)

    def cell_over(self) -> None:
        """After a cell: a late probe must not interrupt what comes next."""
        if not self.watching:
            return  # never armed: no probe to silence
        self._cell += 1
        if self.per_cell and self._previous is not None:
            if self.restored:  # ours stays until the kernel puts its own back
                self._previous = None
                self._passing = False
            else:
                self.disarm()

    def disarm(self) -> None:
        """Give the SIGINT handler back, unless someone replaced ours meanwhile."""
        self._cell += 1
        if self._previous is None:
            return
        previous, self._previous = self._previous, None
        self._passing = False
        if threading.get_ident() == self._main and _getsignal(_SIGINT) is self._handler:
            _setsignal(_SIGINT, previous)

    def _hand_on(self, signum: int, frame: FrameType | None) -> None:
        __tracebackhide__ = True  # not the user's error: IPython leaves this frame out
        previous = self._previous
        if previous is None or self._handing_on:
            # A handler that someone put in front of ours and that hands on to
            # ours again: end the loop as Python would.
            signal.default_int_handler(signum, frame)
            return
        self._handing_on = True
        try:
            previous(signum, frame)
        finally:
            self._handing_on = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        __tracebackhide__ = True  # not the user's error: IPython leaves this frame out
        if self._handing_on or self._passing or self._probing:
            # Our own re-delivery, or the user pressing again while we probe.
            self._passing = False
            self._hand_on(signum, frame)
            return
        waiting = []
        for wrapper in list(self._watched):
            raw = wrapper.connection
            if raw is None or not driver_for(raw).waiting(wrapper):
                continue
            fd = tcp_socket(wrapper)
            if fd is not None:
                waiting.append((wrapper.alias, fd))
        if not waiting:
            self._hand_on(signum, frame)
            return
        quiet = []
        cut = False
        for alias, fd in waiting:
            try:
                sock = _dup(fd)
            except OSError:
                continue
            info = path_info(sock)
            if info is not None and info.established and info.silent:
                _cut(sock, alias, info)
                cut = True
            elif info is not None and info.established:
                quiet.append((alias, sock, info.last_ack_recv))
                continue
            sock.close()
        if cut or not quiet:
            for _, sock, _ in quiet:
                sock.close()
            if not cut:
                self._hand_on(signum, frame)
            return  # the driver's wait ends with a connection error
        self._probing = True
        threading.Thread(
            target=self._probe,
            args=(quiet, self._cell),
            name="ipy_dbreset-probe",
            daemon=True,
        ).start()

    def _probe(self, quiet: list[tuple[str, socket.socket, int]], cell: int) -> None:
        """Ask each path for a keepalive answer now; interrupt if they answer, cut if not.

        ``quiet`` holds each socket with the milliseconds since its last
        acknowledgement, as seen by the SIGINT handler.
        """
        started = time.monotonic()
        saved: list[tuple[socket.socket, int, int | None]] = []
        try:
            for _, sock, _ in quiet:
                try:
                    keepalive = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
                    idle = None if _KEEPIDLE is None else sock.getsockopt(_TCP, _KEEPIDLE)
                    saved.append((sock, keepalive, idle))
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                    if _KEEPIDLE is not None:
                        # Linux rearms the keepalive timer at once: a socket
                        # silent for 1 s or more sends its probe now.
                        sock.setsockopt(_TCP, _KEEPIDLE, 1)
                except OSError:
                    continue
            pending = {alias: (sock, before) for alias, sock, before in quiet}
            while pending and time.monotonic() - started < _PROBE_SECONDS:
                time.sleep(0.01)
                waited = (time.monotonic() - started) * 1000
                for alias, (sock, before) in list(pending.items()):
                    info = path_info(sock)
                    # Without a new acknowledgement the time since the last one
                    # grows with the wait (to a jiffy).  The probe leaves once
                    # the socket has been silent for 1 s, so an answer to it
                    # brings that time down by about 1 s.  A connection that is
                    # closing anyway is the driver's to notice.
                    answered = info is not None and info.last_ack_recv < before + waited - 100
                    if info is None or not info.established or answered:
                        del pending[alias]
            for alias, (sock, _) in pending.items():
                info = path_info(sock)
                if info is not None:
                    _cut(sock, alias, info)
        finally:
            for sock, keepalive, idle in saved:
                try:
                    if idle is not None and _KEEPIDLE is not None:
                        sock.setsockopt(_TCP, _KEEPIDLE, idle)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, keepalive)
                except OSError:
                    pass  # cut, or closed by the driver meanwhile: nothing to restore
            for _, sock, _ in quiet:
                sock.close()
            self._probing = False
        if not pending and cell == self._cell:
            # Every path answered: the interrupt goes on to the driver, which
            # cancels the query as usual.
            self._passing = True
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)


def _cut(sock: socket.socket, alias: str, info: PathInfo) -> None:
    log.warning(
        "ipy_dbreset: %s: interrupted while the network did not answer for %.1f s; "
        "closing the connection",
        alias,
        info.last_ack_recv / 1000,
    )
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError as exc:  # already gone
        log.debug("ipy_dbreset: %s: shutdown: %s", alias, exc)
