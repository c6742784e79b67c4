"""A network path of the tests' own, on loopback, that can pass, freeze and reset.

:class:`Path` listens on a free loopback port and forwards every connection to
a real server (PostgreSQL, MariaDB).  Clients that connect through it can be
cut off the way real networks cut them off:

* :meth:`Path.freeze`: the path stops delivering packets and closes nothing
  (a laptop slept, a VPN dropped, a NAT gateway forgot the flow).  Packets to
  and from the proxy's port are dropped on the loopback by an nftables rule of
  our own table, so the client's kernel sees no acknowledgement and no
  keepalive answer, exactly as on a dead path.  A proxy that merely stopped
  forwarding would not do: its own TCP stack would still acknowledge data.
* :meth:`Path.thaw`: packets flow again.
* :meth:`Path.reset`: every forwarded connection is closed with a reset.
* :meth:`Path.mute_after`: once a client sends a given statement (``COMMIT``),
  nothing the server sends back reaches that client: the server did the work,
  its answer is lost on the way.

Only the proxy's own port is ever dropped, never the server's.
"""

from __future__ import annotations

import contextlib
import pathlib
import random
import selectors
import shutil
import socket
import struct
import subprocess
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

PORT_RANGE = pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range")
TABLE = "ipy_dbreset_tests"  # one table per proxy port: TABLE_<port>


def nft_available() -> str | None:
    """``None`` if nftables rules can be added here, else why not."""
    if shutil.which("nft") is None:
        return "nft (nftables) is not installed: apt-get install nftables"
    probe = subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True, check=False, timeout=10
    )
    if probe.returncode != 0:
        return f"nft cannot list tables here: {probe.stderr.strip()}"
    return None


def _listen_below_ephemeral() -> socket.socket:
    """A loopback listener on a free port below the kernel's ephemeral range.

    The freeze drops every loopback packet of the proxy's port.  Were that
    port an ephemeral one, a table left behind by a test process that was
    killed mid-freeze would one day drop an unrelated client's connection
    that the kernel gave the same source port (to 5432, say); below the
    range no client gets it.
    """
    try:
        low = int(PORT_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        try:
            return socket.create_server(("127.0.0.1", port))
        except OSError:
            continue
    raise OSError(f"no free loopback port below {low}")


def _nft(script: str) -> None:
    subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True, timeout=10)


class Path:
    """A TCP proxy from a free loopback port to ``(host, port)``."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._listener = _listen_below_ephemeral()
        self.port: int = self._listener.getsockname()[1]
        self._table = f"{TABLE}_{self.port}"
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        # Held while the forwarding thread handles events, and by reset(), which
        # closes that thread's sockets: it must also forget them in its selector,
        # or a new connection that reuses a closed descriptor cannot be registered.
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._peers: dict[socket.socket, socket.socket] = {}
        self._stop = threading.Event()
        self._frozen = False
        self._mute_after: bytes | None = None
        self._muted: set[socket.socket] = set()  # server sides whose answers are dropped
        self._thread = threading.Thread(target=self._serve, name=f"path-{self.port}", daemon=True)
        self._thread.start()

    # -- faults ---------------------------------------------------------------

    def freeze(self) -> None:
        """Drop every packet to or from the proxy's port; close nothing."""
        if self._frozen:
            return
        table, port = self._table, self.port
        _nft(
            f"add table inet {table}\n"
            f"add chain inet {table} input "
            "{ type filter hook input priority -10 ; policy accept ; }\n"
            f"add chain inet {table} output "
            "{ type filter hook output priority -10 ; policy accept ; }\n"
            f"add rule inet {table} input iif lo tcp dport {port} drop\n"
            f"add rule inet {table} input iif lo tcp sport {port} drop\n"
            f"add rule inet {table} output oif lo tcp dport {port} drop\n"
            f"add rule inet {table} output oif lo tcp sport {port} drop\n"
        )
        self._frozen = True

    def thaw(self) -> None:
        """Let packets through again."""
        if not self._frozen:
            return
        _nft(f"delete table inet {self._table}\n")
        self._frozen = False

    def reset(self) -> None:
        """Close every forwarded connection with a TCP reset, both ways."""
        linger = struct.pack("ii", 1, 0)  # SO_LINGER 0: close() sends RST
        with self._lock:
            pairs, self._pairs = self._pairs, []
            for pair in pairs:
                for sock in pair:
                    self._forget(sock)
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    sock.close()

    def mute_after(self, statement: bytes | None) -> None:
        """Drop every answer to a client once it has sent ``statement`` (``None``: no more)."""
        with self._lock:
            self._mute_after = statement
            if statement is None:
                self._muted.clear()

    def muted(self) -> bool:
        """Whether some client's answers are being dropped."""
        return bool(self._muted)

    def _forget(self, sock: socket.socket) -> None:
        self._muted.discard(sock)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(sock)
        self._peers.pop(sock, None)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        self.freeze()
        try:
            yield
        finally:
            self.thaw()

    def close(self) -> None:
        self.thaw()
        self._stop.set()
        self.reset()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._thread.join(timeout=5)

    # -- forwarding -------------------------------------------------------------

    def _serve(self) -> None:
        selector = self._selector
        selector.register(self._listener, selectors.EVENT_READ, None)
        while not self._stop.is_set():
            try:
                events = selector.select(timeout=0.2)
            except (OSError, ValueError):
                break
            with self._lock:
                self._handle(events)
        selector.close()

    def _handle(self, events: list[tuple[selectors.SelectorKey, int]]) -> None:
        selector, peers = self._selector, self._peers
        for key, _ in events:
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock.fileno() < 0 or (sock is not self._listener and sock not in peers):
                continue  # closed by reset() after select() returned
            if sock is self._listener:
                try:
                    client, _ = self._listener.accept()
                    server = socket.create_connection(self.target, timeout=10)
                except OSError:
                    continue
                server.settimeout(None)
                peers[client], peers[server] = server, client
                self._pairs.append((client, server))
                selector.register(client, selectors.EVENT_READ, None)
                selector.register(server, selectors.EVENT_READ, None)
                continue
            other = peers.get(sock)
            try:
                data = sock.recv(65536)
                muting = self._mute_after
                from_client = any(sock is client for client, _ in self._pairs)
                if data and muting is not None and muting in data and from_client:
                    self._muted.add(other)  # the server's side of this client
                if data and other is not None and sock not in self._muted:
                    other.sendall(data)
            except OSError:
                data = b""
            if not data:
                for end in (sock, other):
                    if end is None:
                        continue
                    self._forget(end)
                    with contextlib.suppress(OSError):
                        end.close()
