"""What ipy_dbreset costs per cell while nothing is wrong, and how fast it repairs.

Run it from the repository root (it creates and drops its own database)::

    .venv/bin/python benchmarks/percell.py                        # PostgreSQL, psycopg 3
    .venv/bin/python benchmarks/percell.py --backend psycopg2     # PostgreSQL, psycopg2
    .venv/bin/python benchmarks/percell.py --backend mysql        # MariaDB / MySQL
    .venv/bin/python benchmarks/percell.py --backend sqlite
    .venv/bin/python benchmarks/percell.py --quick                # a few seconds, for CI

Three measurements, each in a real :class:`~IPython.core.interactiveshell.InteractiveShell`
running cells with ``shell.run_cell`` in the demo project (``notebooks/``), with an open
Django connection:

1. **Overhead of an empty cell** (``pass``): two shells in two processes, identical but
   for ``%load_ext ipy_dbreset``, run ``--cells`` cells per round, rounds alternating
   between them (ABBA order).  Each round gives its median cell time; the table shows
   the median and the best round of each shell, their ratio (target <= 1.05x) and the
   extra microseconds, plus the extension's two callbacks timed directly.  Then the
   same in a real ipykernel (``kernel.py``): empty cells sent as execute requests,
   timed inside the kernel, the extension unloaded and loaded in turn (target
   <= 1.03x, both callbacks <= 3 µs), since a kernel changes the SIGINT handler
   around every cell and a terminal shell does not.
2. **Server round trips per healthy cell**, counted by the server: after every empty
   cell another connection reads what the server knows of the shell's connection
   (see :meth:`Monitor.marker`), idle and inside an open transaction.  Target 0.
3. **First query after a repair**: the server terminates the shell's connection between
   cells; the next cell's first ORM query (the extension repaired the connection just
   before) is timed against the same query after ``connection.close()``.
   Target <= 1.5x.

Servers: PostgreSQL at ``IPY_DBRESET_BENCH_PG`` (default
``postgresql://postgres@127.0.0.1:5432``), MariaDB at ``IPY_DBRESET_BENCH_MYSQL``
(default ``mysql://root@127.0.0.1:3306``).  The exit code is 0 whatever the figures
(timings are no assertion); it is 1 when the benchmark itself could not measure (a
cell failed, a control was not detected, a server went away: run it again).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import kernel
from common import (
    DEMO,
    DRIVERS,
    MYSQL_SERVER,
    PG_SERVER,
    ROOT,
    BenchmarkBroken,
    ShellProcess,
    describe,
    versions,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


OVERHEAD_TARGET = 1.05
KERNEL_TARGET = 1.03
CALLBACKS_TARGET_US = 3.0  # both callbacks, timed in the kernel that runs them
REPAIR_TARGET = 1.5

# The cell whose first ORM query is timed; ``_clock`` is put in the namespace at start.
TIMED_QUERY = "_t0 = _clock()\nOrder.objects.exists()\n_query_ns = _clock() - _t0"


def tcp_sent(fd: int | None) -> tuple[int, int] | None:
    """(data segments, bytes) this socket has sent, from the kernel's ``TCP_INFO``.

    Read locally with ``getsockopt``: nothing goes over the wire.  ``None`` off Linux
    or on a Unix socket.
    """
    if fd is None or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as sock:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return None
    # struct tcp_info (linux/tcp.h): __u32 tcpi_data_segs_out at 156, __u64 tcpi_bytes_sent
    # at 200 (Linux 4.19+).
    if len(info) < 208:
        return None
    return struct.unpack_from("I", info, 156)[0], struct.unpack_from("Q", info, 200)[0]


# linux/tcp_states.h: the peer has closed its side (FIN), or reset the connection.
TCP_HUNG_UP = (8, 7)  # TCP_CLOSE_WAIT, TCP_CLOSE


def tcp_state(fd: int) -> int | None:
    """The kernel's TCP state of this socket (first byte of ``TCP_INFO``)."""
    try:
        with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as sock:
            return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except (OSError, AttributeError):
        return None


class Worker:
    """The shell side: set up Django, maybe load the extension, then obey commands."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.shown = io.StringIO()
        sys.stdout = self.shown  # what the shell displays (notices) is read back from here
        if spec["driver"] == "psycopg2":
            sys.modules["psycopg"] = None  # type: ignore[assignment]  # Django uses psycopg2
        os.chdir(DEMO)
        sys.path.insert(0, str(DEMO))
        os.environ["DJANGO_SETTINGS_MODULE"] = "demo.settings"
        # Django is set up the same way in both shells; %load_ext then finds it set up.
        import django
        from django.conf import settings

        # Scaling mode: more aliases pointing to the same database (read before setup).
        self.aliases = ["default"] + [f"alias{i}" for i in range(1, spec.get("aliases", 1))]
        for alias in self.aliases[1:]:
            settings.DATABASES[alias] = dict(settings.DATABASES["default"])
        django.setup()
        from IPython.core.interactiveshell import InteractiveShell
        from traitlets.config import Config

        config = Config()
        config.HistoryManager.hist_file = ":memory:"
        self.shell = InteractiveShell.instance(config=config)
        self.shell.user_ns["_clock"] = time.perf_counter_ns
        if spec["load"]:
            self.must("%load_ext ipy_dbreset")
        self.must("from shop.models import Order\nfrom django.db import connection")
        self.must("Order.objects.exists()")
        from django.db import connection, connections

        for alias in self.aliases[1:]:
            connections[alias].ensure_connection()
        self.holders = self._hold_connections(spec.get("threads", 0))
        self.must("pass")  # the extension takes every connection as its baseline

        self.connection = connection
        self.statements = 0  # SQLite: statements the engine ran (see op_trace)

    # -- helpers -------------------------------------------------------------

    def _hold_connections(self, n: int) -> list[Any]:
        """Start ``n`` threads that each open a connection and keep it while they live."""
        import threading

        from django.db import connection

        stop = threading.Event()
        opened = threading.Semaphore(0)

        def hold() -> None:
            connection.ensure_connection()
            opened.release()
            stop.wait()
            connection.close()

        threads = [threading.Thread(target=hold, name=f"holder-{i}") for i in range(n)]
        for thread in threads:
            thread.start()
        for _ in threads:
            if not opened.acquire(timeout=60):
                raise BenchmarkBroken("a thread could not open its connection")
        return [stop, threads]

    def must(self, code: str) -> Any:
        result = self.shell.run_cell(code, store_history=True)
        if not result.success:
            error = result.error_in_exec or result.error_before_exec
            raise BenchmarkBroken(f"cell {code!r} failed: {type(error).__name__}: {error}")
        return result

    def fd(self) -> int | None:
        raw = self.connection.connection
        if raw is None or self.connection.vendor == "sqlite":
            return None
        if hasattr(raw, "pgconn"):
            return int(raw.pgconn.socket)
        return int(raw.fileno())

    def server_id(self) -> int | None:
        raw = self.connection.connection
        if raw is None:
            return None
        if hasattr(raw, "pgconn"):
            return int(raw.pgconn.backend_pid)
        if hasattr(raw, "get_backend_pid"):
            return int(raw.info.backend_pid)
        if hasattr(raw, "thread_id"):
            return int(raw.thread_id())
        return None

    def _traced(self, statement: str) -> None:
        self.statements += 1

    # -- commands --------------------------------------------------------------

    def op_state(self) -> dict[str, Any]:
        raw = self.connection.connection
        return {
            "server_id": self.server_id(),
            "driver": type(raw).__module__.split(".")[0] if raw is not None else None,
            "tcp": tcp_sent(self.fd()),
            "statements": self.statements,
        }

    def op_trace(self) -> dict[str, Any]:
        """SQLite has no server: let the engine itself count the statements it runs."""
        self.connection.connection.set_trace_callback(self._traced)
        return {}

    def op_cells(self, code: str, n: int) -> dict[str, Any]:
        """Run ``code`` as ``n`` cells; the median and best cell time in ns."""
        run = self.shell.run_cell
        clock = time.perf_counter_ns
        times = [0] * n
        gc.collect()
        for i in range(n):
            start = clock()
            result = run(code, store_history=True)
            times[i] = clock() - start
            if not result.success:
                error = result.error_in_exec or result.error_before_exec
                raise BenchmarkBroken(f"cell {code!r} failed: {type(error).__name__}: {error}")
        return {"median": statistics.median(times), "min": min(times)}

    def op_cell(self, code: str) -> dict[str, Any]:
        """Run one cell; its time, what it showed, and the connection's state after it."""
        self.shown.seek(0)
        self.shown.truncate()
        self.shell.user_ns.pop("_query_ns", None)
        start = time.perf_counter_ns()
        result = self.shell.run_cell(code, store_history=True)
        elapsed = time.perf_counter_ns() - start
        error = result.error_in_exec or result.error_before_exec
        return {
            "success": result.success,
            "error": None if error is None else f"{type(error).__name__}: {error}",
            "ns": elapsed,
            "query_ns": self.shell.user_ns.get("_query_ns"),
            "shown": self.shown.getvalue(),
            **self.op_state(),
        }

    def op_extension(self, load: bool) -> dict[str, Any]:
        """Load or unload the extension in this same shell."""
        self.must(f"%{'load' if load else 'unload'}_ext ipy_dbreset")
        return {}

    def op_wait_closed(self, timeout: float) -> dict[str, Any]:
        """Wait, reading nothing, until the server has hung up (its FIN reached the socket).

        A user takes longer than that between two cells; the benchmark must wait for it
        explicitly, since the server's goodbye message arrives a few ms before the FIN.
        """
        fd = self.fd()
        deadline = time.monotonic() + timeout
        while fd is not None and time.monotonic() < deadline:
            if tcp_state(fd) in TCP_HUNG_UP:
                return {"closed": True}
            time.sleep(0.0005)
        return {"closed": False}

    def op_percell(self, n: int) -> dict[str, Any]:
        """Both callbacks, as around one healthy empty cell, in ns (median of 7 hot loops)."""
        magics = next(c for c in self.shell.configurables if type(c).__name__ == "DBReset")
        result = self.must("pass")
        pre, post = magics.callbacks["pre_run_cell"], magics.callbacks["post_run_cell"]
        clock = time.perf_counter_ns
        loops = []
        for _ in range(7):
            start = clock()
            for _ in range(n):
                pre(None)
                post(result)
            loops.append((clock() - start) / n)
        # What the extension sees: a check that the connections are really there.
        tracked = sum(t.wrapper.connection is not None for t in magics.checkup.tracked())
        return {"ns": statistics.median(loops), "tracked": tracked}

    def op_callbacks(self, n: int) -> dict[str, Any]:
        """The extension's per-cell code timed directly, in ns per call (best of 5).

        The two callbacks are IPython's contract; the layers below them are looked up
        by name and left out if the engine no longer has them.
        """
        from django.db import connections

        magics = next(c for c in self.shell.configurables if type(c).__name__ == "DBReset")
        result = self.must("pass")
        parts: dict[str, Callable[[], object]] = {
            "pre_run_cell": lambda: magics.callbacks["pre_run_cell"](None),
            "post_run_cell": lambda: magics.callbacks["post_run_cell"](result),
        }
        wrapper = connections["default"]  # the wrapper itself, not django.db.connection's proxy
        fd = self.fd()
        with contextlib.suppress(ImportError, AttributeError):
            from ipy_dbreset import drivers, health

            driver = drivers.driver_for(wrapper.connection)
            parts["Checkup.healthy"] = lambda: magics.checkup.healthy(True, False)
            parts["judge"] = lambda: health.judge(wrapper)
            parts["driver.link"] = lambda: driver.link(wrapper)
            if fd is not None:
                parts["readable(fd)"] = lambda: drivers.readable(fd)
        timed = {}
        for name, call in parts.items():
            best = None
            for _ in range(5):
                start = time.perf_counter_ns()
                for _ in range(n):
                    call()
                per_call = (time.perf_counter_ns() - start) / n
                best = per_call if best is None else min(best, per_call)
            timed[name] = best
        return timed


def worker_main(spec: dict[str, Any]) -> None:
    # The pipe to the parent is the original stdout; anything else written to fd 1
    # (by C code, say) goes to stderr instead of corrupting the protocol.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def reply(payload: dict[str, Any]) -> None:
        out.write(json.dumps(payload) + "\n")

    try:
        worker = Worker(spec)
        reply({"ok": True, **worker.op_state()})
    except BaseException as exc:
        reply({"ok": False, "error": describe(exc)})
        return
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        if op == "quit":
            break
        try:
            reply({"ok": True, **getattr(worker, f"op_{op}")(**request)})
        except BaseException as exc:
            reply({"ok": False, "error": describe(exc)})


# =============================================================================
# The parent: databases, monitors, shells, measurements, the table.
# =============================================================================


class Shell(ShellProcess):
    """A worker process with one IPython shell, with or without the extension."""

    def __init__(self, label: str, spec: dict[str, Any], env: dict[str, str]) -> None:
        super().__init__(label, __file__, spec, env)
        self.ready: dict[str, Any] | None = None

    def wait_ready(self) -> dict[str, Any]:
        if self.ready is None:
            self.ready = self.read()
        return self.ready

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        self.wait_ready()
        self.send({"op": op, **args})
        return self.read()

    def cell(self, code: str, *, must: bool = True) -> dict[str, Any]:
        reply = self.call("cell", code=code)
        if must and not reply["success"]:
            raise BenchmarkBroken(f"the {self.label} shell: cell {code!r}: {reply['error']}")
        return reply


class Monitor:
    """The benchmark's own view of the server, over a separate connection.

    This base class serves SQLite, which has no server: there, the shell counts the
    statements the engine runs instead (see ``Worker.op_trace``).
    """

    vendor = "sqlite"
    url = ""

    def create(self, name: str) -> None: ...
    def drop(self) -> None: ...

    def marker(self, server_id: int) -> object:
        """What the server knows of that connection's last activity (see subclasses)."""
        return None

    def terminate(self, server_id: int) -> None:
        raise NotImplementedError

    def close(self) -> None: ...


class PostgresMonitor(Monitor):
    vendor = "postgresql"

    def __init__(self) -> None:
        import psycopg

        parts = urlsplit(PG_SERVER)
        self.server: dict[str, Any] = {
            "host": parts.hostname or "127.0.0.1",
            "port": parts.port or 5432,
            "user": parts.username or "postgres",
        }
        if parts.password:
            self.server["password"] = parts.password
        # Connected to the "postgres" database: nothing it does touches the bench database.
        self.admin = psycopg.connect(
            **self.server, dbname="postgres", autocommit=True, connect_timeout=5
        )
        if self.admin.execute("show track_activities").fetchone() != ("on",):
            raise BenchmarkBroken("track_activities is off: the server cannot be watched")
        self.name: str | None = None

    def create(self, name: str) -> None:
        self.admin.execute(f'create database "{name}"')
        self.name = name
        server = self.server
        credentials = server["user"] + (":" + server["password"] if "password" in server else "")
        self.url = f"postgresql://{credentials}@{server['host']}:{server['port']}/{name}"

    def drop(self) -> None:
        if self.name is not None:
            self.admin.execute(f'drop database if exists "{self.name}" with (force)')
            self.name = None

    def marker(self, server_id: int) -> object:
        # Every message that reaches a backend moves its pg_stat_activity row: a query
        # (simple or extended protocol, even an empty one, as a ping sends) sets
        # query_start and the state to active; the ReadyForQuery that ends any exchange,
        # a bare Sync included, sets the state to idle and stamps state_change (in
        # microseconds).  If both are unchanged after a cell, the server heard nothing
        # from that connection during it.  Each read is its own transaction, so it sees
        # a fresh snapshot; the monitor's own queries run on another backend, so there
        # is nothing to subtract.
        row = self.admin.execute(
            "select query_start, state_change, state from pg_stat_activity where pid = %s",
            (server_id,),
        ).fetchone()
        if row is None:
            raise BenchmarkBroken(f"backend {server_id} is gone (was the server restarted?)")
        return (str(row[0]), str(row[1]), row[2])

    def terminate(self, server_id: int) -> None:
        self.admin.execute("select pg_terminate_backend(%s)", (server_id,))
        deadline = time.monotonic() + 5
        while self.admin.execute(
            "select 1 from pg_stat_activity where pid = %s", (server_id,)
        ).fetchone():
            if time.monotonic() > deadline:
                raise BenchmarkBroken(f"backend {server_id} survived pg_terminate_backend")
            time.sleep(0.002)

    def close(self) -> None:
        self.admin.close()


class MariaDBMonitor(Monitor):
    vendor = "mysql"

    def __init__(self) -> None:
        import MySQLdb

        parts = urlsplit(MYSQL_SERVER)
        self.server: dict[str, Any] = {
            "host": parts.hostname or "127.0.0.1",
            "port": parts.port or 3306,
            "user": parts.username or "root",
        }
        if parts.password:
            self.server["password"] = parts.password
        self.admin = MySQLdb.connect(**self.server, connect_timeout=5)
        self.admin.autocommit(True)
        self.name: str | None = None

    def _query(self, sql: str, params: tuple[object, ...] | None = None) -> list[tuple[Any, ...]]:
        cursor = self.admin.cursor()
        try:
            cursor.execute(sql, params)
            return list(cursor.fetchall()) if cursor.description else []
        finally:
            cursor.close()

    def create(self, name: str) -> None:
        self._query(f"create database `{name}`")
        self.name = name
        server = self.server
        credentials = server["user"] + (":" + server["password"] if "password" in server else "")
        self.url = f"mysql://{credentials}@{server['host']}:{server['port']}/{name}"

    def drop(self) -> None:
        if self.name is not None:
            self._query(f"drop database if exists `{self.name}`")
            self.name = None

    def marker(self, server_id: int) -> object:
        # performance_schema is usually off and the global counters (Questions, Com_*)
        # count every client of the server.  The process list does it per connection:
        # QUERY_ID is that connection's last command's id, taken from a server-wide
        # counter at every command it receives, COM_PING included; so an unchanged
        # QUERY_ID means the server received no command from it.
        rows = self._query(
            "select QUERY_ID, COMMAND from information_schema.PROCESSLIST where ID = %s",
            (server_id,),
        )
        if not rows:
            raise BenchmarkBroken(f"connection {server_id} is gone (was the server restarted?)")
        return rows[0]

    def terminate(self, server_id: int) -> None:
        self._query(f"kill connection {int(server_id)}")
        deadline = time.monotonic() + 5
        while self._query(
            "select 1 from information_schema.PROCESSLIST where ID = %s and COMMAND <> 'Killed'",
            (server_id,),
        ):
            if time.monotonic() > deadline:
                raise BenchmarkBroken(f"connection {server_id} survived KILL")
            time.sleep(0.002)

    def close(self) -> None:
        self.admin.close()


def migrate(env: dict[str, str]) -> None:
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v", "0"], cwd=DEMO, env=env, check=True
    )


# -- the measurements ----------------------------------------------------------


@dataclass
class Row:
    """One line of the table."""

    label: str
    without: str = ""
    with_: str = ""
    result: str = ""
    target: str = ""
    verdict: str = ""
    notes: list[str] = field(default_factory=list)


def us(ns: float) -> str:
    return f"{ns / 1000:.1f}"


def ms(ns: float) -> str:
    return f"{ns / 1e6:.2f}"


def judged(value: float, target: float) -> str:
    return "PASS" if value <= target else "over target"


def _interleaved(
    steps: list[tuple[str, Callable[[], dict[str, float]]]], rounds: int
) -> dict[str, list[dict[str, float]]]:
    """Run each step once per round, flipping the order every other round (ABBA)."""
    results: dict[str, list[dict[str, float]]] = {key: [] for key, _ in steps}
    for i in range(rounds):
        for key, step in steps if i % 2 == 0 else reversed(steps):
            results[key].append(step())
    return results


def _ratio_row(label: str, base: float, other: float, target: float | None = None) -> Row:
    ratio = other / base
    return Row(
        label,
        us(base),
        us(other),
        f"{ratio:.3f}x",
        "" if target is None else f"<= {target}x",
        "" if target is None else judged(ratio, target),
    )


def measure_overhead(bare: Shell, loaded: Shell, cells: int, rounds: int) -> list[Row]:
    # Each round is `cells` empty cells; a round's figure is its median cell.  The two
    # shells take turns (never run at once) and the order flips every other round, so
    # drift in the machine's load favours neither.  One warm-up round each is dropped.
    def empty_cells(shell: Shell) -> Callable[[], dict[str, float]]:
        return lambda: shell.call("cells", code="pass", n=cells)

    for shell in (bare, loaded):
        empty_cells(shell)()
    results = _interleaved([("bare", empty_cells(bare)), ("loaded", empty_cells(loaded))], rounds)
    median = {k: statistics.median(r["median"] for r in v) for k, v in results.items()}
    best = {k: min(r["median"] for r in v) for k, v in results.items()}
    fastest = {k: min(r["min"] for r in v) for k, v in results.items()}
    extra = median["loaded"] - median["bare"]
    rows = [
        _ratio_row(
            "1 empty cell, median round (µs)", median["bare"], median["loaded"], OVERHEAD_TARGET
        ),
        _ratio_row("  empty cell, best round (µs)", best["bare"], best["loaded"], OVERHEAD_TARGET),
        _ratio_row("  fastest single cell (µs)", fastest["bare"], fastest["loaded"]),
        Row("  extra per cell, median round (µs)", result=f"{extra / 1000:+.1f}"),
    ]

    # The same comparison inside one process (%unload_ext / %load_ext between rounds):
    # immune to whatever differs between two processes, such as memory layout.
    def toggled(load: bool) -> Callable[[], dict[str, float]]:
        def step() -> dict[str, float]:
            loaded.call("extension", load=load)
            return loaded.call("cells", code="pass", n=cells)

        return step

    results = _interleaved([("bare", toggled(False)), ("loaded", toggled(True))], rounds)
    loaded.call("extension", load=True)
    same = {k: statistics.median(r["median"] for r in v) for k, v in results.items()}
    rows.append(
        _ratio_row(
            "  same process, unloaded/loaded (µs)", same["bare"], same["loaded"], OVERHEAD_TARGET
        )
    )

    # Where the time goes.  Timed in a hot loop (warm caches), so these underestimate
    # what the same calls cost between two real cells.
    parts = loaded.call("callbacks", n=max(1000, cells))
    direct = parts["pre_run_cell"] + parts["post_run_cell"]
    rows.append(
        Row(
            "  both callbacks, hot loop (µs)",
            with_=us(direct),
            result=f"{direct / median['bare'] * 100:.1f}% of a cell",
            notes=["per call (µs): " + ", ".join(f"{k} {v / 1000:.2f}" for k, v in parts.items())],
        )
    )
    return rows


def measure_kernel(env: dict[str, str], driver: str, cells: int, rounds: int) -> list[Row]:
    """The same empty cells in a real ipykernel, where the SIGINT handler changes per cell."""
    got = kernel.measure(env, driver=driver, cells=cells, rounds=rounds)
    # The kernel's own hooks run outside the cell; the extension puts the
    # guard in front in theirs instead of in a callback: what they cost more
    # (or less) is the extension's too.
    hooks = got["hooks loaded"] - got["hooks bare"]
    ours = got["callbacks"] + hooks
    return [
        _ratio_row(
            "kernel: empty cell, median round (µs)", got["bare"], got["loaded"], KERNEL_TARGET
        ),
        Row("  kernel: extra per cell (µs)", result=f"{(got['loaded'] - got['bare']) / 1000:+.1f}"),
        Row(
            "  kernel: both callbacks, per cell (µs)",
            with_=us(got["callbacks"]),
            result=f"{got['callbacks'] / got['bare'] * 100:.1f}% of a cell",
        ),
        Row(
            "  kernel: its SIGINT hooks, per request (µs)",
            us(got["hooks bare"]),
            us(got["hooks loaded"]),
            result=f"{hooks / 1000:+.1f}",
        ),
        Row(
            "  kernel: callbacks + hooks' difference (µs)",
            with_=us(ours),
            result=f"{ours / got['bare'] * 100:.1f}% of a cell",
            target=f"<= {CALLBACKS_TARGET_US} µs",
            verdict=judged(ours / 1000, CALLBACKS_TARGET_US),
        ),
    ]


def measure_round_trips(shell: Shell, monitor: Monitor, cells: int) -> list[Row]:
    """Empty cells, idle and in a transaction: what the server (or SQLite) saw of them."""
    sqlite = monitor.vendor == "sqlite"
    if sqlite:
        shell.call("trace")
    rows = []
    for label, enter, leave in (
        ("2 round trips per healthy cell", None, None),
        (
            "  ... inside an open transaction",
            "connection.set_autocommit(False)\nOrder.objects.exists()",
            "connection.rollback()\nconnection.set_autocommit(True)",
        ),
    ):
        if enter:
            shell.cell(enter)
        state = shell.call("state")
        server_id = state["server_id"]
        active = 0
        marker = monitor.marker(server_id)
        for _ in range(cells):
            after = shell.cell("pass")
            if after["server_id"] != server_id:
                raise BenchmarkBroken("the connection changed during healthy cells")
            now = monitor.marker(server_id)
            if now != marker:
                active += 1
            marker = now
        end = shell.call("state")
        _controls(shell, monitor, server_id)
        if leave:
            shell.cell(leave)
        if sqlite:
            seen = end["statements"] - state["statements"]
            rows.append(
                Row(
                    label,
                    "",
                    f"{seen} statements",
                    f"{seen / cells:.2f}",
                    "0",
                    judged(seen, 0),
                    notes=[f"{cells} cells; counted by SQLite's trace callback"],
                )
            )
            continue
        segments = None
        if state["tcp"] and end["tcp"]:
            segments = end["tcp"][0] - state["tcp"][0]
        note = f"{active} of {cells} cells reached the server"
        if segments is not None:
            note += f"; the client socket sent {segments} data segments"
        trips = max(active, segments or 0)
        rows.append(
            Row(
                label,
                "",
                f"{active}/{cells} cells",
                f"{trips / cells:.2f}",
                "0",
                judged(trips, 0),
                notes=[note],
            )
        )
    return rows


def _controls(shell: Shell, monitor: Monitor, server_id: int) -> None:
    """Prove the counting sees the smallest exchanges: a query, and Django's liveness check."""
    controls = ["Order.objects.exists()"]
    if monitor.vendor != "sqlite":
        controls.append("connection.is_usable()")  # what pool_pre_ping-style checks pay
    for code in controls:
        before = shell.call("state")
        marker = monitor.marker(server_id)
        after = shell.cell(code)
        seen = (
            after["statements"] > before["statements"]
            if monitor.vendor == "sqlite"
            else monitor.marker(server_id) != marker
        )
        if not seen:
            raise BenchmarkBroken(f"control cell {code!r} was not seen by the server")
        if before["tcp"] and after["tcp"] and after["tcp"][0] <= before["tcp"][0]:
            raise BenchmarkBroken(f"control cell {code!r} sent nothing on the socket")


def measure_repair(shell: Shell, monitor: Monitor, rounds: int) -> list[Row]:
    """First query after the server killed the connection (repaired) vs after close()."""
    if monitor.vendor == "sqlite":
        return [
            Row(
                "3 first query after repair",
                verdict="n/a",
                notes=["SQLite has no server that could drop the connection"],
            )
        ]
    times: dict[str, list[tuple[int, int]]] = {"fresh": [], "repaired": []}

    def repaired() -> None:
        shell.cell("Order.objects.exists()")
        old = shell.call("state")["server_id"]
        monitor.terminate(old)
        if not shell.call("wait_closed", timeout=5)["closed"]:
            raise BenchmarkBroken("the client never saw the server close the connection")
        cell = shell.cell(TIMED_QUERY, must=False)
        if not cell["success"]:
            raise BenchmarkBroken(
                f"the first cell after the server killed the connection failed: {cell['error']}"
            )
        if cell["server_id"] == old or "ipy_dbreset:" not in cell["shown"]:
            raise BenchmarkBroken(f"no repair was reported: {cell['shown']!r}")
        times["repaired"].append((cell["query_ns"], cell["ns"]))

    def fresh() -> None:
        shell.cell("Order.objects.exists()")
        shell.cell("connection.close()")
        cell = shell.cell(TIMED_QUERY)
        times["fresh"].append((cell["query_ns"], cell["ns"]))

    repaired()  # warm-up of both paths, not counted
    fresh()
    times = {"fresh": [], "repaired": []}
    for i in range(rounds):
        for step in (repaired, fresh) if i % 2 == 0 else (fresh, repaired):
            step()
    query = {k: statistics.median(q for q, _ in v) for k, v in times.items()}
    whole = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    ratio = query["repaired"] / query["fresh"]
    cell_ratio = whole["repaired"] / whole["fresh"]
    return [
        Row(
            "3 first query: fresh vs repaired (ms)",
            ms(query["fresh"]),
            ms(query["repaired"]),
            f"{ratio:.2f}x",
            f"<= {REPAIR_TARGET}x",
            judged(ratio, REPAIR_TARGET),
            notes=[f"median of {rounds} rounds each; the query opens a new connection"],
        ),
        Row(
            "  whole cell incl. repair (ms)",
            ms(whole["fresh"]),
            ms(whole["repaired"]),
            f"{cell_ratio:.2f}x",
            f"<= {REPAIR_TARGET}x",
            judged(cell_ratio, REPAIR_TARGET),
        ),
    ]


SCALING_TARGET_US = 5.0  # both callbacks per cell, whatever the number of connections
SCALING_RATIO_TARGET = 2.0  # the largest N against N = 1


def measure_scaling(
    env: dict[str, str], spec: dict[str, Any], counts: list[int], cells: int, rounds: int
) -> list[Row]:
    """Per-cell cost with N connections (aliases, then live threads) against N = 1.

    The N = 1 shell lives throughout; each larger N gets its own shell, which takes
    turns with it (ABBA) and is closed before the next, so that at most 1 + N + 1
    connections are open at once.  Figures are medians over the rounds.
    """
    rows = []
    for mode in ("aliases", "threads"):
        base = Shell(f"{mode}=1", {**spec, "load": True, mode: 1}, env)
        try:
            for n in counts:
                other = base if n == 1 else Shell(f"{mode}={n}", {**spec, mode: n}, env)
                try:
                    rows += _scaling_pair(mode, base, other, n=n, cells=cells, rounds=rounds)
                finally:
                    if other is not base:
                        other.close()
        finally:
            base.close()
    return rows


def _scaling_pair(
    mode: str, base: Shell, other: Shell, *, n: int, cells: int, rounds: int
) -> list[Row]:
    def step(shell: Shell) -> Callable[[], dict[str, float]]:
        def measure() -> dict[str, float]:
            cell = shell.call("cells", code="pass", n=cells)["median"]
            timed = shell.call("percell", n=cells)
            return {"cell": cell, "callbacks": timed["ns"], "tracked": timed["tracked"]}

        return measure

    steps = [("1", step(base))] + ([] if other is base else [(str(n), step(other))])
    for _, measure in steps:
        measure()  # warm-up
    results = _interleaved(steps, rounds)
    median = {
        k: {
            part: statistics.median(r[part] for r in v) for part in ("cell", "callbacks", "tracked")
        }
        for k, v in results.items()
    }
    mine = median[str(n)] if n != 1 else median["1"]
    what = "alias" if mode == "aliases" else "live thread"
    label = f"{n} {what}{'es' if mode == 'aliases' and n != 1 else ''}"
    if mode == "threads":
        label = f"{n} live thread{'s' if n != 1 else ''} (+ the shell's own)"
    ratio = mine["callbacks"] / median["1"]["callbacks"]
    over_us = mine["callbacks"] / 1000 > SCALING_TARGET_US
    verdict = judged(ratio, SCALING_RATIO_TARGET) if n != 1 else ""
    if over_us:
        verdict = f"over {SCALING_TARGET_US} us"
    return [
        Row(
            f"4 {label}: callbacks / cell (µs)",
            us(median["1"]["callbacks"]),
            us(mine["callbacks"]),
            f"{ratio:.2f}x",
            f"<= {SCALING_RATIO_TARGET}x, <= {SCALING_TARGET_US} us",
            verdict or "PASS",
            notes=[
                f"whole empty cell: {us(median['1']['cell'])} µs with 1, "
                f"{us(mine['cell'])} µs with {n} "
                f"({mine['cell'] / median['1']['cell']:.2f}x); "
                f"{mine['tracked']:.0f} open connections tracked"
            ],
        )
    ]


def print_table(title: list[str], rows: list[Row], columns: tuple[str, str]) -> None:
    header = Row("measure", *columns, "ratio", "target", "")
    widths = [
        max(len(getattr(r, a)) for r in [header, *rows])
        for a in ("label", "without", "with_", "result", "target")
    ]
    for line in title:
        print(line)
    print()
    for row in [header, *rows]:
        cells = [row.label, row.without, row.with_, row.result, row.target]
        text = "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        print(f"{text}  {row.verdict}".rstrip())
        for note in row.notes:
            print(f"{'':{widths[0] + 2}}{note}")
    print()


# -- putting it together -----------------------------------------------------------


@contextlib.contextmanager
def database(backend: str, scratch: Path) -> Iterator[Monitor]:
    """A fresh, migrated database for this run, dropped at the end."""
    monitor: Monitor
    if backend == "sqlite":
        monitor = Monitor()
        monitor.url = f"sqlite:///{scratch / 'bench.sqlite3'}"
    elif backend == "mysql":
        monitor = MariaDBMonitor()
    else:
        monitor = PostgresMonitor()
    try:
        monitor.create(f"ipy_dbreset_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}")
        yield monitor
    finally:
        try:
            monitor.drop()
        finally:
            monitor.close()


def run_scaling(args: argparse.Namespace) -> list[Row]:
    counts = sorted(set([1, *args.connections]))
    cells = args.cells or (200 if args.quick else 1000)
    rounds = args.rounds or (2 if args.quick else 6)
    driver = DRIVERS[args.backend]
    scratch = Path(tempfile.mkdtemp(prefix="ipy_dbreset_bench_"))
    try:
        with database(args.backend, scratch) as monitor:
            env = _environment(monitor, scratch)
            migrate(env)
            rows = measure_scaling(env, {"driver": driver, "load": True}, counts, cells, rounds)
            print_table(
                [
                    f"ipy_dbreset per-cell cost vs connections: {args.backend} "
                    f"({versions(driver)})",
                    f"both callbacks around a healthy empty cell (hot loop, median of 7) and "
                    f"the whole cell; {cells} cells x {rounds} rounds, interleaved with N = 1",
                ],
                rows,
                ("N = 1", "N"),
            )
            return rows
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _environment(monitor: Monitor, scratch: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
    env.update(
        IPY_DBRESET_DEMO_DB=monitor.url,
        IPY_DBRESET_DEMO_OTHER=str(scratch / "other.sqlite3"),
        IPYTHONDIR=str(scratch / "ipython"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    env.pop("IPY_DBRESET_DEMO_POOL", None)
    return env


def run(args: argparse.Namespace) -> list[Row]:
    quick = args.quick
    cells = args.cells or (200 if quick else 2000)
    rounds = args.rounds or (3 if quick else 12)
    checked = min(cells, 20 if quick else 200)
    repairs = 3 if quick else 10
    driver = DRIVERS[args.backend]
    scratch = Path(tempfile.mkdtemp(prefix="ipy_dbreset_bench_"))
    shells: list[Shell] = []
    try:
        with database(args.backend, scratch) as monitor:
            env = _environment(monitor, scratch)
            migrate(env)
            spec = {"driver": driver, "load": False}
            bare = Shell("bare", spec, env)
            shells.append(bare)
            loaded = Shell("loaded", {**spec, "load": True}, env)
            shells.append(loaded)
            for shell in shells:
                used = shell.wait_ready()["driver"]
                if used != driver:
                    raise BenchmarkBroken(f"the {shell.label} shell uses {used}, not {driver}")
            rows = measure_overhead(bare, loaded, cells, rounds)
            bare.close()
            rows += measure_kernel(env, driver, cells, rounds)
            rows += measure_round_trips(loaded, monitor, checked)
            rows += measure_repair(loaded, monitor, repairs)
            found = versions(driver)
            print_table(
                [
                    f"ipy_dbreset per-cell benchmark: {args.backend} ({found})",
                    f"InteractiveShell.run_cell, {cells} cells x {rounds} rounds per shell, "
                    f"interleaved; {checked} cells watched by the server; "
                    f"{repairs} repairs",
                ],
                rows,
                ("without", "with"),
            )
            return rows
    finally:
        for shell in shells:
            shell.close()
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Measure what ipy_dbreset costs per cell while nothing is wrong.",
        epilog="Exit code 0 whatever the figures; 1 if the benchmark could not measure.",
    )
    parser.add_argument("--backend", choices=DRIVERS, default="postgresql")
    parser.add_argument("--quick", action="store_true", help="a few seconds in all (for CI)")
    parser.add_argument("--cells", type=int, help="cells per round (default 2000, quick 200)")
    parser.add_argument("--rounds", type=int, help="rounds per shell (default 12, quick 3)")
    parser.add_argument(
        "--connections",
        type=lambda text: [int(n) for n in text.split(",")],
        metavar="N[,N...]",
        help=(
            "scaling mode: per-cell cost with N connections (aliases, then live threads) "
            "against 1, e.g. 16,32 (each N opens N+2 connections at once)"
        ),
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    if (args.cells is not None and args.cells < 1) or (args.rounds is not None and args.rounds < 1):
        parser.error("--cells and --rounds must be at least 1")
    started = time.monotonic()
    if args.connections is not None and min(args.connections) < 1:
        parser.error("--connections takes counts of at least 1")
    try:
        if args.connections is not None:
            run_scaling(args)
        else:
            run(args)
    except BenchmarkBroken as exc:
        print(f"benchmark broken: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a server went away, a driver failed: report it, exit 1
        traceback.print_exc()
        print(f"benchmark broken: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
