"""What ipy_dbreset costs per query: a cell of 1000 small queries, with and without it.

Run it from the repository root (it creates and drops its own database)::

    .venv/bin/python benchmarks/perquery.py                        # PostgreSQL, psycopg 3
    .venv/bin/python benchmarks/perquery.py --backend psycopg2     # PostgreSQL, psycopg2
    .venv/bin/python benchmarks/perquery.py --backend mysql        # MariaDB / MySQL
    .venv/bin/python benchmarks/perquery.py --backend sqlite
    .venv/bin/python benchmarks/perquery.py --quick                # a few seconds, for CI

Two real :class:`~IPython.core.interactiveshell.InteractiveShell` processes on the demo
project (``notebooks/``), identical but for their setup cells (by default: nothing, and
``%load_ext ipy_dbreset``), run the same cell in rounds that take turns (ABBA order).
Each cell makes ``--queries`` small queries, each on a new cursor as the ORM does; the
table shows, per cell, the median over rounds of each shell's median cell time, their
ratio (goal <= 1.02x) and the extra time per query (goal <= 1 us).

To measure another feature per query, call :func:`compare` with other setup cells, e.g.
``compare("postgresql", {"with": ["%load_ext ipy_dbreset", "%config DBReset.x = True"]})``.

Servers: PostgreSQL at ``IPY_DBRESET_BENCH_PG`` (default
``postgresql://postgres@127.0.0.1:5432``), MariaDB at ``IPY_DBRESET_BENCH_MYSQL``
(default ``mysql://root@127.0.0.1:3306``).  The exit code is 0 whatever the figures;
1 when the benchmark could not measure (a cell failed, a server went away).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

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
    from collections.abc import Iterator


RATIO_GOAL = 1.02
PER_QUERY_GOAL_US = 1.0

# The cells timed: ``{n}`` queries each, every one on a new cursor.
CELLS = {
    "ORM .exists()": "for _ in range({n}):\n    Order.objects.filter(pk=1).exists()",
    "cursor select 1": (
        "for _ in range({n}):\n    with connection.cursor() as _c:\n        _c.execute('select 1')"
    ),
}
VARIANTS = {"without": [], "with": ["%load_ext ipy_dbreset"]}


# =============================================================================
# The worker: one IPython shell in its own process, driven over a pipe.
# =============================================================================


def worker_main(spec: dict[str, Any]) -> None:
    # The pipe to the parent is the original stdout; what the shell prints goes to stderr.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    if spec["driver"] == "psycopg2":
        sys.modules["psycopg"] = None  # type: ignore[assignment]  # Django uses psycopg2
    os.chdir(DEMO)
    sys.path.insert(0, str(DEMO))
    os.environ["DJANGO_SETTINGS_MODULE"] = "demo.settings"
    import django

    django.setup()
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)

    def cell(code: str) -> None:
        result = shell.run_cell(code, store_history=True)
        if not result.success:
            error = result.error_in_exec or result.error_before_exec
            raise BenchmarkBroken(f"cell {code!r} failed: {type(error).__name__}: {error}")

    try:
        for code in [
            *spec["setup"],
            "from shop.models import Order\nfrom django.db import connection",
            "Order.objects.exists()",
        ]:
            cell(code)
        from django.db import connection

        used = type(connection.connection).__module__.split(".")[0]
        out.write(json.dumps({"ok": True, "driver": used}) + "\n")
    except BaseException as exc:
        out.write(json.dumps({"ok": False, "error": describe(exc)}) + "\n")
        return
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "quit":
            break
        if request.get("op") == "hook":
            out.write(json.dumps({"ok": True, **time_hook()}) + "\n")
            continue
        try:
            times = []
            gc.collect()
            for _ in range(request["reps"]):
                start = time.perf_counter_ns()
                cell(request["code"])
                times.append(time.perf_counter_ns() - start)
            out.write(json.dumps({"ok": True, "median": statistics.median(times)}) + "\n")
        except BaseException as exc:
            out.write(json.dumps({"ok": False, "error": describe(exc)}) + "\n")


def time_hook(n: int = 200_000) -> dict[str, float]:
    """What Django runs before each cursor, timed in a hot loop: ns per call (best of 5).

    ``close_if_health_check_failed`` as this shell has it (the extension's look
    before a query, if installed) against Django's own method on the same wrapper.
    A hot loop underestimates (caches are warm); the cells above are the real cost.
    """
    from django.db import connections

    wrapper = connections["default"]
    parts = {
        "hook": getattr(wrapper, "close_if_health_check_failed"),  # noqa: B009  # as Django looks it up
        "django": type(wrapper).close_if_health_check_failed.__get__(wrapper),
    }
    timed = {}
    for name, call in parts.items():
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter_ns()
            for _ in range(n):
                call()
            best = min(best, (time.perf_counter_ns() - start) / n)
        timed[name] = best
    return timed


# =============================================================================
# The parent: a database, two shells, interleaved rounds, the table.
# =============================================================================


class Shell(ShellProcess):
    """A worker process with one IPython shell, set up by its own cells."""

    def __init__(self, label: str, spec: dict[str, Any], env: dict[str, str]) -> None:
        super().__init__(label, __file__, spec, env)
        self.driver = self.read()["driver"]

    def time(self, code: str, reps: int) -> float:
        """The median time of ``reps`` runs of ``code`` as a cell, in ns."""
        self.send({"code": code, "reps": reps})
        return float(self.read()["median"])

    def time_hook(self) -> dict[str, float]:
        self.send({"op": "hook"})
        return self.read()


def _server(url: str, port: int, user: str) -> dict[str, Any]:
    parts = urlsplit(url)
    server: dict[str, Any] = {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or port,
        "user": parts.username or user,
    }
    if parts.password:
        server["password"] = parts.password
    return server


def _url(scheme: str, server: dict[str, Any], name: str) -> str:
    credentials = server["user"] + (":" + server["password"] if "password" in server else "")
    return f"{scheme}://{credentials}@{server['host']}:{server['port']}/{name}"


@contextlib.contextmanager
def database(backend: str, scratch: Path) -> Iterator[str]:
    """A fresh, migrated database for this run, dropped at the end; yields its URL."""
    name = f"ipy_dbreset_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    if backend == "sqlite":
        yield f"sqlite:///{scratch / 'bench.sqlite3'}"
        return
    if backend == "mysql":
        import MySQLdb

        server = _server(MYSQL_SERVER, 3306, "root")
        admin = MySQLdb.connect(**server, connect_timeout=5)
        admin.autocommit(True)
        create, drop = f"create database `{name}`", f"drop database if exists `{name}`"
        url = _url("mysql", server, name)
    else:
        import psycopg

        server = _server(PG_SERVER, 5432, "postgres")
        admin = psycopg.connect(**server, dbname="postgres", autocommit=True, connect_timeout=5)
        create, drop = f'create database "{name}"', f'drop database if exists "{name}" with (force)'
        url = _url("postgresql", server, name)
    try:
        admin.cursor().execute(create)
        try:
            yield url
        finally:
            admin.cursor().execute(drop)
    finally:
        admin.close()


@dataclass
class Result:
    """One timed cell: the median cell time of each variant over the rounds, in ns."""

    cell: str
    queries: int
    medians: dict[str, float]
    hook: dict[str, float] | None = None
    """The ``with`` shell's pre-cursor hook and Django's method, ns per call in a hot loop."""

    def ratio(self, variant: str = "with", base: str = "without") -> float:
        return self.medians[variant] / self.medians[base]

    def extra_us_per_query(self, variant: str = "with", base: str = "without") -> float:
        return (self.medians[variant] - self.medians[base]) / self.queries / 1000


def compare(
    backend: str,
    variants: dict[str, list[str]] | None = None,
    *,
    cells: dict[str, str] | None = None,
    queries: int = 1000,
    rounds: int = 10,
    reps: int = 3,
) -> list[Result]:
    """Time each of ``cells`` in one shell per variant (its setup cells), interleaved.

    Every round runs each cell ``reps`` times in each shell (the order of the shells
    alternates between rounds); each variant's figure is the median over rounds of
    its per-round median.
    """
    variants = variants or VARIANTS
    cells = cells or CELLS
    driver = DRIVERS[backend]
    scratch = Path(tempfile.mkdtemp(prefix="ipy_dbreset_bench_"))
    shells: dict[str, Shell] = {}
    try:
        with database(backend, scratch) as url:
            env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
            env.update(
                IPY_DBRESET_DEMO_DB=url,
                IPY_DBRESET_DEMO_OTHER=str(scratch / "other.sqlite3"),
                IPYTHONDIR=str(scratch / "ipython"),
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
            )
            env.pop("IPY_DBRESET_DEMO_POOL", None)
            subprocess.run(
                [sys.executable, "manage.py", "migrate", "-v", "0"], cwd=DEMO, env=env, check=True
            )
            for label, setup in variants.items():
                shells[label] = Shell(label, {"driver": driver, "setup": setup}, env)
                if shells[label].driver != driver:
                    raise BenchmarkBroken(f"the {label} shell uses {shells[label].driver}")
            results = []
            for name, template in cells.items():
                code = template.format(n=queries)
                for shell in shells.values():
                    shell.time(code, 1)  # warm-up, not counted
                times: dict[str, list[float]] = {label: [] for label in shells}
                order = list(shells.values())
                for i in range(rounds):
                    for shell in order if i % 2 == 0 else reversed(order):
                        times[shell.label].append(shell.time(code, reps))
                medians = {label: statistics.median(t) for label, t in times.items()}
                results.append(Result(name, queries, medians))
            if "with" in shells and results:
                results[0].hook = shells["with"].time_hook()
            return results
    finally:
        for shell in shells.values():
            shell.close()
        shutil.rmtree(scratch, ignore_errors=True)


def print_table(backend: str, results: list[Result], queries: int, rounds: int, reps: int) -> None:
    print(f"ipy_dbreset per-query benchmark: {backend} ({versions(DRIVERS[backend])})")
    print(
        f"a cell of {queries} queries, {reps} cells x {rounds} interleaved rounds per shell; "
        "medians"
    )
    print()
    header = ("cell", "without (ms)", "with (ms)", "ratio", "extra per query", "goal")
    rows = [header]
    for r in results:
        ratio = r.ratio()
        extra = r.extra_us_per_query()
        ok = ratio <= RATIO_GOAL and extra <= PER_QUERY_GOAL_US
        rows.append(
            (
                r.cell,
                f"{r.medians['without'] / 1e6:.2f}",
                f"{r.medians['with'] / 1e6:.2f}",
                f"{ratio:.3f}x",
                f"{extra:+.2f} us",
                f"<= {RATIO_GOAL}x, <= {PER_QUERY_GOAL_US:g} us  {'PASS' if ok else 'over'}",
            )
        )
    hook = results[0].hook if results else None
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    if hook is not None:
        print(
            f"before each cursor, hot loop: close_if_health_check_failed {hook['hook']:.0f} ns "
            f"in the with shell, Django's own {hook['django']:.0f} ns "
            f"({hook['hook'] - hook['django']:+.0f} ns per query)"
        )
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Measure what ipy_dbreset costs per query.",
        epilog="Exit code 0 whatever the figures; 1 if the benchmark could not measure.",
    )
    parser.add_argument("--backend", choices=DRIVERS, default="postgresql")
    parser.add_argument("--quick", action="store_true", help="a few seconds in all (for CI)")
    parser.add_argument("--queries", type=int, help="queries per cell (default 1000, quick 200)")
    parser.add_argument("--rounds", type=int, help="rounds per shell (default 10, quick 3)")
    parser.add_argument("--reps", type=int, help="cells per round (default 3, quick 1)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    queries = args.queries or (200 if args.quick else 1000)
    rounds = args.rounds or (3 if args.quick else 10)
    reps = args.reps or (1 if args.quick else 3)
    if min(queries, rounds, reps) < 1:
        parser.error("--queries, --rounds and --reps must be at least 1")
    started = time.monotonic()
    try:
        results = compare(args.backend, queries=queries, rounds=rounds, reps=reps)
    except BenchmarkBroken as exc:
        print(f"benchmark broken: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a server went away, a driver failed: report it, exit 1
        traceback.print_exc()
        print(f"benchmark broken: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print_table(args.backend, results, queries, rounds, reps)
    print(f"({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
