"""Fixtures: real servers, real kernels, real shells.

Tests that need a server skip when it is not reachable, saying why, except
under CI (``CI=true``), where they fail: a green CI must mean they ran.

Tests wait for conditions (the server no longer lists a session, a query is
running), never for a fixed time: the helpers here poll with a deadline.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

import pytest

from harness import DEMO, ROOT, Kernel, run

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from IPython.core.interactiveshell import InteractiveShell

# The PostgreSQL drivers the project has, hence Django's kernels and shells:
# psycopg 3 is optional (psycopg2 is a dependency).  Decided before the
# fixtures' own copy of psycopg 3 (psycopg2-only nox sessions) joins sys.path,
# which only this process sees.
# IPY_DBRESET_TEST_DRIVERS=psycopg: those alone (a nox session named for one driver).
_CHOSEN = os.environ.get("IPY_DBRESET_TEST_DRIVERS", "psycopg,psycopg2").split(",")
DRIVERS = tuple(
    name for name in ("psycopg", "psycopg2") if name in _CHOSEN and importlib.util.find_spec(name)
)
if os.environ.get("IPY_DBRESET_TEST_FIXTURE_PATH"):
    sys.path.append(os.environ["IPY_DBRESET_TEST_FIXTURE_PATH"])

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
PG_HOST = os.environ.get("IPY_DBRESET_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("IPY_DBRESET_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("IPY_DBRESET_TEST_PG_USER", "postgres")
MYSQL_HOST = os.environ.get("IPY_DBRESET_TEST_MYSQL_HOST", "127.0.0.1")
MYSQL_PORT = int(os.environ.get("IPY_DBRESET_TEST_MYSQL_PORT", "3306"))
MYSQL_USER = os.environ.get("IPY_DBRESET_TEST_MYSQL_USER", "root")
PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"  # Debian puts it in sbin


# -- the random walk's options (tests/test_walk.py) -------------------------------------

WALK_FIGURES = pytest.StashKey[list[str]]()
"""One line of figures per walk run, for the summary at the end."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("walk", "the random walk through transactions and faults")
    group.addoption(
        "--walk-seeds",
        default="1-3",
        help="seeds of the InteractiveShell walks: N (1 to N), A-B, or A,B,C (default 1-3)",
    )
    group.addoption(
        "--walk-kernel-seeds",
        default="1",
        help="seeds of the Jupyter kernel walks, as --walk-seeds (default 1; 0: none)",
    )
    group.addoption("--walk-steps", type=int, default=120, help="steps per walk (default 120)")
    group.addoption(
        "--walk-ops",
        default="ci",
        help=(
            "the operations a walk draws from: ci (those CI runs), all, or a comma list of "
            "names, each maybe +name / -name to add to or take from ci (default ci)"
        ),
    )
    group.addoption(
        "--walk-tolerate",
        default="ci",
        help=(
            "kinds of violation to count and walk past, to see what lies beyond them: ci (those "
            "CI tolerates: none), none, or a comma list of prefixes (notice, stderr, cell failed, "
            "...; default ci)"
        ),
    )
    group.addoption(
        "--walk-shrink-seconds",
        type=float,
        default=240,
        help="seconds a failing walk may spend looking for its shortest sequence (default 240)",
    )


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    lines = config.stash.get(WALK_FIGURES, [])
    if lines:
        terminalreporter.section("random walk figures")
        for line in lines:
            terminalreporter.write_line(line)


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


def wait_for(condition: Callable[[], object], what: str, timeout: float = 10) -> None:
    """Poll ``condition`` until it is true; fail saying ``what`` did not happen in time."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not so after {timeout}s"
        time.sleep(0.02)


def pg_sessions(dbname: str) -> list[tuple]:
    """``(pid, state, query)`` of every client session on ``dbname`` but our own."""
    return pg_admin(
        "select pid, state, query from pg_stat_activity where datname = %s "
        "and backend_type = 'client backend' and pid <> pg_backend_pid()",
        (dbname,),
    )


def wait_until_disconnected(dbname: str, timeout: float = 10) -> None:
    """Wait until the server has closed every session on ``dbname``."""
    wait_for(lambda: not pg_sessions(dbname), f"every session on {dbname} closed", timeout)


def wait_until_running(dbname: str, query: str, timeout: float = 10) -> int:
    """Wait until a session on ``dbname`` is running ``query``; return its pid."""
    found: list[int] = []

    def running() -> bool:
        found[:] = [
            pid for pid, state, text in pg_sessions(dbname) if state == "active" and text == query
        ]
        return bool(found)

    wait_for(running, f"{query!r} running on {dbname}", timeout)
    return found[0]


def terminate_backends(dbname: str) -> int:
    """``pg_terminate_backend`` every connection to ``dbname`` (as a DBA would)."""
    rows = pg_admin(
        "select pg_terminate_backend(pid) from pg_stat_activity "
        "where datname = %s and pid <> pg_backend_pid()",
        (dbname,),
    )
    return len(rows)


# -- PgBouncer ------------------------------------------------------------------

PGBOUNCER_CONFIG = """\
[databases]
{dbname} = host={host} port={port} dbname={dbname}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen}
unix_socket_dir =
auth_type = trust
auth_file = {auth_file}
admin_users = {user}
pool_mode = {mode}
default_pool_size = 2
max_client_conn = 10
logfile =
pidfile =
"""


class Bouncer:
    """A PgBouncer of the test's own, in front of one database of the PostgreSQL server.

    It listens on a free port of its own, in ``mode`` (``"session"`` or
    ``"transaction"``) pooling, and logs to ``pgbouncer.log`` in ``folder``.
    PgBouncer refuses to run as root: as root it is started with ``-u nobody``,
    which drops to that user once the configuration is read.
    """

    def __init__(self, folder: Path, dbname: str, mode: str) -> None:
        self.dbname = dbname
        self.mode = mode
        with socket.socket() as probe:  # a port nobody listens on; kept across restarts
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        auth_file = folder / "pgbouncer-users.txt"
        auth_file.write_text(f'"{PG_USER}" ""\n')
        self.config = folder / "pgbouncer.ini"
        self.config.write_text(
            PGBOUNCER_CONFIG.format(
                dbname=dbname,
                host=PG_HOST,
                port=PG_PORT,
                listen=self.port,
                auth_file=auth_file,
                user=PG_USER,
                mode=mode,
            )
        )
        self.log = folder / "pgbouncer.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The database's URL through the pooler, as the demo settings read it."""
        url = f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{self.dbname}"
        # Django's server-side cursors (iterator()) outlive the transaction that
        # opened them: under transaction pooling they must be off.
        return url + "?disable_server_side_cursors=1" if self.mode == "transaction" else url

    def start(self) -> None:
        assert self.process is None, "PgBouncer is already running"
        as_root = ["-u", "nobody"] if os.geteuid() == 0 else []
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [PGBOUNCER, *as_root, str(self.config)], stdout=log, stderr=log
            )
        wait_for(self._answers, f"PgBouncer listening on port {self.port}")

    def stop(self) -> None:
        """SIGTERM (immediate shutdown: every client is disconnected); wait until it exits."""
        if self.process is None:
            return
        self.process.terminate()
        self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _answers(self) -> bool:
        assert self.process is not None
        assert self.process.poll() is None, f"PgBouncer exited:\n{self.log.read_text()}"
        import psycopg2

        try:
            self.show("version")
        except psycopg2.OperationalError:  # not listening yet
            return False
        return True

    def show(self, what: str) -> list[dict[str, object]]:
        """``SHOW what`` on PgBouncer's admin console, one dict per row."""
        import psycopg2  # the console speaks only the simple query protocol

        conn = psycopg2.connect(
            host="127.0.0.1", port=self.port, user=PG_USER, dbname="pgbouncer", connect_timeout=5
        )
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(f"show {what}")
                names = [column.name for column in cursor.description or ()]
                return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        finally:
            conn.close()

    def clients(self) -> list[dict[str, object]]:
        """The client connections to our database (the admin console's own is not one)."""
        return [row for row in self.show("clients") if row["database"] == self.dbname]

    def servers(self) -> list[dict[str, object]]:
        """The pooler's connections to the PostgreSQL server."""
        return [row for row in self.show("servers") if row["database"] == self.dbname]


@pytest.fixture
def pool_mode() -> str:
    """PgBouncer's pooling mode for :func:`pgbouncer`; tests parametrize it."""
    return "session"


@pytest.fixture
def pgbouncer(
    postgres_url: str, postgres_db: str, tmp_path: Path, pool_mode: str
) -> Iterator[Bouncer]:
    """A running PgBouncer in front of the session's database (``shop_order`` empty).

    ``.url`` is the database's URL through it; it is stopped afterwards.
    """
    if not os.path.exists(PGBOUNCER):
        unavailable(f"PgBouncer is not installed ({PGBOUNCER}; apt-get install pgbouncer)")
    bouncer = Bouncer(tmp_path, postgres_db, pool_mode)
    try:
        bouncer.start()
        yield bouncer
    finally:
        bouncer.stop()


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


def mysql_threads() -> set[int]:
    """The ids of every connection the MariaDB/MySQL server lists."""
    return {int(row[0]) for row in mysql_admin("select ID from information_schema.PROCESSLIST")}


def wait_until_mysql_gone(thread: int, timeout: float = 10) -> None:
    """Wait until the server no longer lists connection ``thread``."""
    wait_for(lambda: thread not in mysql_threads(), f"MySQL connection {thread} gone", timeout)


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

HIDE_PSYCOPG = "import sys; sys.modules['psycopg'] = None  # Django falls back to psycopg2"


@pytest.fixture
def start_kernel(tmp_path: Path) -> Iterator[Callable[..., Kernel]]:
    """Start real kernels: ``start_kernel(url, driver=None, cwd=DEMO, env={}, load=True)``.

    The kernel runs in the demo project (``notebooks/``) with ``url`` as its
    database.  Django uses the first of :data:`DRIVERS` unless ``driver`` says
    which; with ``driver="psycopg2"`` psycopg 3 is hidden first, so Django
    uses psycopg2.  With ``load=True`` the extension is loaded and ``Order``,
    ``connection`` and ``transaction`` are imported.
    """
    kernels: list[Kernel] = []

    def start(
        url: str,
        driver: str | None = None,
        cwd: Path = DEMO,
        env: dict[str, str] | None = None,
        load: bool = True,
    ) -> Kernel:
        full_env = {
            "IPY_DBRESET_DEMO_DB": url,
            "IPY_DBRESET_DEMO_OTHER": str(tmp_path / "other.sqlite3"),
            **(env or {}),
        }
        driver = driver or DRIVERS[0]
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


# -- IPython's test shell and the demo project, in this process ----------------------
# django.setup() happens once per process: every test that needs Django in the
# pytest process itself shares this one (the demo project on SQLite files).


@pytest.fixture(scope="session")
def demo_django(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Django set up once in this process: the demo project on fresh SQLite files."""
    import django
    from django.apps import apps
    from django.core.management import call_command

    if apps.ready:
        if not apps.is_installed("shop"):
            pytest.skip("Django was set up in this process with another project")
        return
    folder = tmp_path_factory.mktemp("demo-db")
    chosen = {
        "DJANGO_SETTINGS_MODULE": "demo.settings",
        "IPY_DBRESET_DEMO_DB": f"sqlite:///{folder / 'db.sqlite3'}",
        "IPY_DBRESET_DEMO_OTHER": str(folder / "other.sqlite3"),
    }
    saved = {name: os.environ.get(name) for name in chosen}
    os.environ.update(chosen)
    for folder in (ROOT, DEMO):  # the package (when not installed) and the demo's apps
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    try:
        django.setup()
        call_command("migrate", verbosity=0)
    finally:
        # Settings are read by now; leave the environment as other tests expect it.
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def release_connections() -> None:
    """Put every connection of this thread back to closed and idle, whatever a test did."""
    from django.db import connections

    for wrapper in connections.all(initialized_only=True):
        wrapper.atomic_blocks.clear()
        wrapper.savepoint_ids.clear()
        wrapper.in_atomic_block = False
        wrapper.needs_rollback = False
        wrapper.closed_in_transaction = False
        wrapper.close()  # SQLite rolls back what was not committed


@pytest.fixture
def bare_shell(demo_django: None) -> Iterator[InteractiveShell]:
    """IPython's test shell without the extension; unloaded and cleaned up afterwards."""
    from IPython.testing import globalipapp

    globalipapp.start_ipython()
    shell = globalipapp.get_ipython()
    release_connections()
    yield shell
    if "ipy_dbreset" in shell.extension_manager.loaded:
        shell.run_line_magic("unload_ext", "ipy_dbreset")
    shell.config.pop("DBReset", None)  # %config writes through to the shell's config
    release_connections()


@pytest.fixture
def shell(bare_shell: InteractiveShell) -> InteractiveShell:
    """The test shell with ``%load_ext ipy_dbreset`` done and the ORM imported."""
    assert run(bare_shell, "%load_ext ipy_dbreset").ok
    assert run(
        bare_shell,
        "from django.db import connection, connections, transaction\nfrom shop.models import Order",
    ).ok
    return bare_shell
