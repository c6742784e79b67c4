"""Fixtures: real servers, real kernels, real shells.

Tests that need a server skip when it is not reachable, saying why, except
under CI (``CI=true``), where they fail: a green CI must mean they ran.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from typing import TYPE_CHECKING

import pytest

from harness import DEMO, ROOT, Kernel

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
PG_HOST = os.environ.get("IPY_DBRESET_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("IPY_DBRESET_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("IPY_DBRESET_TEST_PG_USER", "postgres")
MYSQL_HOST = os.environ.get("IPY_DBRESET_TEST_MYSQL_HOST", "127.0.0.1")
MYSQL_PORT = int(os.environ.get("IPY_DBRESET_TEST_MYSQL_PORT", "3306"))
MYSQL_USER = os.environ.get("IPY_DBRESET_TEST_MYSQL_USER", "root")


def unavailable(why: str) -> None:
    """Skip on a laptop without the server; fail under CI."""
    if IN_CI:
        pytest.fail(f"{why} (CI=true: tests that need a server must run)", pytrace=False)
    pytest.skip(why)


def migrate(url: str) -> None:
    env = {**os.environ, "IPY_DBRESET_DEMO_DB": url, "PYTHONPATH": str(ROOT)}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v", "0"], cwd=DEMO, env=env, check=True
    )


# -- PostgreSQL ---------------------------------------------------------------


def pg_admin(sql: str, params: tuple[object, ...] = (), dbname: str = "postgres") -> list[tuple]:
    """Run ``sql`` as the PostgreSQL superuser on its own connection."""
    import psycopg

    with psycopg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=dbname, autocommit=True, connect_timeout=5
    ) as conn:
        cur = conn.execute(sql, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


@pytest.fixture(scope="session")
def postgres_db() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test session; yields its name."""
    try:
        pg_admin("select 1")
    except Exception as exc:
        unavailable(f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT} as {PG_USER}: {exc}")
    name = f"ipy_dbreset_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    pg_admin(f'create database "{name}"')
    try:
        migrate(postgres_url_for(name))
        yield name
    finally:
        pg_admin(f'drop database if exists "{name}" with (force)')


def postgres_url_for(name: str) -> str:
    return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"


@pytest.fixture
def postgres_url(postgres_db: str) -> Iterator[str]:
    """The session database's URL, with an empty ``shop_order`` table."""
    pg_admin("truncate shop_order", dbname=postgres_db)
    yield postgres_url_for(postgres_db)


def terminate_backends(dbname: str) -> int:
    """``pg_terminate_backend`` every connection to ``dbname`` (as a DBA would)."""
    rows = pg_admin(
        "select pg_terminate_backend(pid) from pg_stat_activity "
        "where datname = %s and pid <> pg_backend_pid()",
        (dbname,),
    )
    return len(rows)


# -- MariaDB / MySQL ----------------------------------------------------------


def mysql_admin(sql: str, params: tuple[object, ...] = (), db: str | None = None) -> list[tuple]:
    import MySQLdb

    kwargs = {"db": db} if db else {}
    conn = MySQLdb.connect(
        host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER, connect_timeout=5, **kwargs
    )
    try:
        cur = conn.cursor()
        cur.execute(sql, params or None)
        rows = list(cur.fetchall()) if cur.description else []
        conn.commit()
        return rows
    finally:
        conn.close()


@pytest.fixture(scope="session")
def mysql_db() -> Iterator[str]:
    """A fresh, migrated MariaDB database for this test session; yields its name."""
    try:
        import MySQLdb  # noqa: F401
    except ImportError as exc:
        # mysqlclient is built from source (compiler, libmariadb-dev): the test
        # extra leaves it out, the mysql and dev extras bring it.
        unavailable(f'mysqlclient is not installed (pip install -e ".[test,mysql]"): {exc}')
    try:
        mysql_admin("select 1")
    except Exception as exc:
        unavailable(f"MariaDB/MySQL not reachable at {MYSQL_HOST}:{MYSQL_PORT}: {exc}")
    name = f"ipy_dbreset_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    mysql_admin(f"create database `{name}`")
    try:
        migrate(mysql_url_for(name))
        yield name
    finally:
        mysql_admin(f"drop database if exists `{name}`")


def mysql_url_for(name: str) -> str:
    return f"mysql://{MYSQL_USER}@{MYSQL_HOST}:{MYSQL_PORT}/{name}"


@pytest.fixture
def mysql_url(mysql_db: str) -> Iterator[str]:
    mysql_admin("delete from shop_order", db=mysql_db)
    yield mysql_url_for(mysql_db)


# -- SQLite ---------------------------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    migrate(url)
    return url


# -- kernels --------------------------------------------------------------------

DRIVERS = ("psycopg", "psycopg2")
HIDE_PSYCOPG = "import sys; sys.modules['psycopg'] = None  # Django falls back to psycopg2"


@pytest.fixture
def start_kernel(tmp_path: Path) -> Iterator[Callable[..., Kernel]]:
    """Start real kernels: ``start_kernel(url, driver="psycopg", cwd=DEMO, env={}, load=True)``.

    The kernel runs in the demo project (``notebooks/``) with ``url`` as its
    database.  With ``driver="psycopg2"`` psycopg 3 is hidden first, so Django
    uses psycopg2.  With ``load=True`` the extension is loaded and ``Order``,
    ``connection`` and ``transaction`` are imported.
    """
    kernels: list[Kernel] = []

    def start(
        url: str,
        driver: str = "psycopg",
        cwd: Path = DEMO,
        env: dict[str, str] | None = None,
        load: bool = True,
    ) -> Kernel:
        full_env = {
            "IPY_DBRESET_DEMO_DB": url,
            "IPY_DBRESET_DEMO_OTHER": str(tmp_path / "other.sqlite3"),
            **(env or {}),
        }
        kernel = Kernel(cwd=cwd, env=full_env)
        kernels.append(kernel)
        if driver == "psycopg2":
            kernel.ok(HIDE_PSYCOPG)
        if load:
            kernel.ok("%load_ext ipy_dbreset")
            kernel.ok(
                "from shop.models import Order\nfrom django.db import connection, transaction"
            )
            if url.startswith("postgres"):
                shown = kernel.ok(
                    "connection.ensure_connection(); type(connection.connection).__module__"
                )
                assert shown.value().split(".")[0] == driver
        kernel.cells.clear()
        return kernel

    yield start
    for kernel in kernels:
        kernel.close()
