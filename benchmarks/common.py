"""What the benchmarks share: where things are, the servers, and a shell in a process of its own.

Each benchmark script starts IPython shells as worker processes of itself
(``script --worker SPEC``) and drives them over a pipe, one JSON line each
way; :class:`ShellProcess` is the parent's end of that pipe.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "notebooks"
# --backend: the DB-API module Django must end up using.
DRIVERS = {"postgresql": "psycopg", "psycopg2": "psycopg2", "mysql": "MySQLdb", "sqlite": "sqlite3"}
PG_SERVER = os.environ.get("IPY_DBRESET_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
MYSQL_SERVER = os.environ.get("IPY_DBRESET_BENCH_MYSQL", "mysql://root@127.0.0.1:3306")


class BenchmarkBroken(Exception):
    """The benchmark could not measure (not: a figure is over its goal)."""


def describe(exc: BaseException) -> str:
    """What a worker reports of an exception: the message of a known failure, else the traceback."""
    if isinstance(exc, BenchmarkBroken):
        return str(exc)
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).strip()


def versions(driver: str) -> str:
    """``django 5.2.19, ipython 9.18.1, psycopg 3.3.9, Python 3.11.7``."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    package = {"MySQLdb": "mysqlclient", "psycopg2": "psycopg2-binary"}.get(driver, driver)
    for name in ("django", "ipython", package):
        if name == "sqlite3":
            import sqlite3

            found.append(f"sqlite {sqlite3.sqlite_version}")
            continue
        with contextlib.suppress(PackageNotFoundError):
            found.append(f"{name} {version(name)}")
    return ", ".join(found) + f", Python {sys.version.split()[0]}"


class ShellProcess:
    """A worker process running ``script --worker SPEC``; what it prints goes to a log."""

    def __init__(self, label: str, script: str, spec: dict[str, Any], env: dict[str, str]) -> None:
        self.label = label
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115  # closed in close()
        self.process = subprocess.Popen(
            [sys.executable, script, "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )

    def send(self, request: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()

    def read(self) -> dict[str, Any]:
        """The worker's next reply; BenchmarkBroken if it failed or exited."""
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.log.seek(0)
            raise BenchmarkBroken(f"the {self.label} shell exited:\n{self.log.read()[-3000:]}")
        reply: dict[str, Any] = json.loads(line)
        if not reply.pop("ok"):
            raise BenchmarkBroken(f"the {self.label} shell: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                assert self.process.stdin is not None
                self.process.stdin.write('{"op": "quit"}\n')
                self.process.stdin.close()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
