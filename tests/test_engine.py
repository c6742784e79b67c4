"""The engine without a shell: ``judge``, ``repair``, ``reset`` and ``Checkup``, in this process.

Each fault is made for real on the real servers, then the engine is called
directly on the Django connection, so that a failure here names the layer
(health, repair, checkup) rather than "the next cell failed".  Each test takes
milliseconds and closes its connections.

Django is set up once in this process (the ``demo_django`` fixture); the
connections under test are extra wrappers built from Django's backends for the
session's databases and registered under their own alias.

Django's PostgreSQL backend chooses its driver once, when
``django.db.backends.postgresql.base`` is imported: psycopg 3 if importable,
else psycopg2.  :func:`postgresql_backend` imports a private copy of the
backend package for each driver, with psycopg 3 hidden for psycopg2 exactly as
a project without psycopg 3 would have it, and puts ``sys.modules`` back as it
was, so the rest of the process keeps Django's own choice.
"""

from __future__ import annotations

import contextlib
import importlib
import sqlite3
import sys
from typing import TYPE_CHECKING

import pytest

from conftest import (
    DRIVERS,
    mysql_admin,
    pg_admin,
    terminate_backends,
    wait_until_disconnected,
    wait_until_mysql_gone,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path
    from types import ModuleType

    from django.db.backends.base.base import BaseDatabaseWrapper

    from ipy_dbreset.checkup import Checkup, Outcome
    from ipy_dbreset.health import Problem
    from ipy_dbreset.records import Repair

pytestmark = pytest.mark.usefixtures("demo_django")

ALIAS = "engine"
BACKEND = "django.db.backends.postgresql"
_backends: dict[str, ModuleType] = {}


def _postgresql_modules() -> dict[str, ModuleType]:
    return {
        name: module
        for name, module in sys.modules.items()
        if name == BACKEND or name.startswith(BACKEND + ".")
    }


def postgresql_backend(driver: str) -> ModuleType:
    """``django.db.backends.postgresql.base`` as imported where ``driver`` is what Django finds."""
    if driver in _backends:
        return _backends[driver]
    saved = _postgresql_modules()
    hidden = {
        name: module
        for name, module in sys.modules.items()
        if name == "psycopg" or name.startswith("psycopg.")
    }
    for name in saved:
        del sys.modules[name]
    if driver == "psycopg2":
        for name in hidden:
            del sys.modules[name]
        sys.modules["psycopg"] = None  # type: ignore[assignment]  # import psycopg fails
    try:
        base = importlib.import_module(BACKEND + ".base")
    finally:
        for name in _postgresql_modules():
            del sys.modules[name]
        if driver == "psycopg2":
            del sys.modules["psycopg"]
            sys.modules.update(hidden)
        sys.modules.update(saved)
    assert base.Database.__name__ == driver
    _backends[driver] = base
    return base


@pytest.fixture
def connect(demo_django: None) -> Iterator[Callable[..., BaseDatabaseWrapper]]:
    """``connect(url, driver=None)``: a Django connection to ``url`` under the alias ``engine``.

    Not connected yet; registered in ``django.db.connections`` so that
    ``transaction.atomic(using="engine")`` finds it.  Closed afterwards.
    """
    from demo.settings import database
    from django.db import connections
    from django.db.utils import ConnectionHandler, load_backend

    made: list[BaseDatabaseWrapper] = []

    def make(url: str, driver: str | None = None) -> BaseDatabaseWrapper:
        # ConnectionHandler fills in Django's defaults (AUTOCOMMIT, OPTIONS, TIME_ZONE, ...).
        settings = ConnectionHandler({"default": database(url)}).settings["default"]
        backend = postgresql_backend(driver) if driver else load_backend(settings["ENGINE"])
        wrapper = backend.DatabaseWrapper(settings, ALIAS)
        connections[ALIAS] = wrapper
        made.append(wrapper)
        return wrapper

    yield make
    for wrapper in made:
        if wrapper.connection is not None:
            wrapper.connection.close()  # whatever state it was left in
            wrapper.connection = None
    with contextlib.suppress(AttributeError):
        del connections[ALIAS]


@pytest.fixture
def checkup(demo_django: None) -> Iterator[Callable[..., Checkup]]:
    """``checkup(**options)``: a started Checkup of this thread, stopped afterwards."""
    from ipy_dbreset.checkup import Checkup

    started: list[Checkup] = []

    def make(**options: bool) -> Checkup:
        engine = Checkup(**options)
        engine.start()
        started.append(engine)
        return engine

    yield make
    for engine in started:
        engine.stop()


# Why a repair was done, as its notice says it, for each problem judge() finds.
CAUSES = {
    "LOST": (
        "the connection was closed mid-transaction",
        "the driver found the connection closed",
        "the server closed the connection",
    ),
    "STUCK": ("an interrupted query left its result unread", "a query was left running"),
    "ABORTED": (
        "a failed statement aborted the transaction",
        "a cancelled query aborted the transaction",
    ),
    "MARKED": ("a query failed inside the atomic block",),
}


def check(engine: Checkup, *, listen: bool = True) -> Outcome:
    """What the shell does around a cell: the fast path, and the full check if it finds anything."""
    from ipy_dbreset.checkup import HEALTHY

    return HEALTHY if engine.healthy(listen, False) else engine.check_all()


def problem_of(repair: Repair) -> Problem:
    """The problem a repair was for, from the reason its notice gives."""
    from ipy_dbreset.health import Problem

    (found,) = [Problem[name] for name, causes in CAUSES.items() if repair.reason in causes]
    return found


def insert(wrapper: BaseDatabaseWrapper, number: int) -> None:
    with wrapper.cursor() as cursor:
        cursor.execute("insert into shop_order (number, customer) values (%s, 'x')", [number])


def numbers(wrapper: BaseDatabaseWrapper) -> list[int]:
    with wrapper.cursor() as cursor:
        cursor.execute("select number from shop_order order by number")
        return [n for (n,) in cursor.fetchall()]


def insert_twice(wrapper: BaseDatabaseWrapper, number: int) -> None:
    """Insert ``number`` again: the unique constraint fails the statement."""
    from django.db import IntegrityError

    with pytest.raises(IntegrityError):
        insert(wrapper, number)


# -- PostgreSQL ---------------------------------------------------------------------


@pytest.fixture
def pg(
    connect: Callable[..., BaseDatabaseWrapper], postgres_url: str, postgres_db: str, driver: str
) -> Iterator[BaseDatabaseWrapper]:
    """A connection to the session's PostgreSQL database through ``driver``; no orders yet."""
    wrapper = connect(postgres_url, driver)
    yield wrapper
    if wrapper.connection is not None:
        wrapper.connection.close()
        wrapper.connection = None
    wait_until_disconnected(postgres_db)  # nothing of this test is left on the server


def pg_committed(dbname: str) -> list[int]:
    return [n for (n,) in pg_admin("select number from shop_order order by number", dbname=dbname)]


def pg_last_statement(pid: int, dbname: str) -> tuple[object, ...]:
    """What the server last saw from session ``pid``: any statement or ping changes it."""
    rows = pg_admin(
        "select query, query_start, state_change from pg_stat_activity where pid = %s", (pid,)
    )
    assert rows, f"session {pid} on {dbname} is gone"
    return rows[0]


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.postgres
def test_the_backend_copy_uses_the_asked_driver(pg, driver):
    pg.ensure_connection()
    assert type(pg.connection).__module__.split(".")[0] == driver
    # A private copy: the process's own postgresql backend (if any) is untouched.
    assert sys.modules.get(BACKEND + ".base") is not postgresql_backend(driver)


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.postgres
def test_healthy_postgres_connection_gets_no_verdict_and_no_round_trip(
    pg, postgres_db, checkup, driver
):
    from ipy_dbreset.checkup import HEALTHY
    from ipy_dbreset.health import judge

    engine = checkup()
    pg.set_autocommit(False)  # an open transaction is healthy too
    insert(pg, 1)
    pid = pg.connection.info.backend_pid
    before = pg_last_statement(pid, postgres_db)
    assert pg in [t.wrapper for t in engine.tracked()]
    assert judge(pg) is None
    assert check(engine) == HEALTHY  # the full path
    assert check(engine) == HEALTHY  # the fast path
    assert check(engine, listen=False) == HEALTHY
    assert pg_last_statement(pid, postgres_db) == before
    pg.rollback()


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.postgres
def test_terminated_postgres_connection_is_lost_and_closed(pg, postgres_db, driver):
    from ipy_dbreset.health import Problem, judge
    from ipy_dbreset.repair import repair

    insert(pg, 1)
    assert terminate_backends(postgres_db) == 1
    wait_until_disconnected(postgres_db)
    verdict = judge(pg)
    assert verdict is not None and verdict.problem is Problem.LOST, verdict
    done = repair(pg, verdict)
    assert problem_of(done) is Problem.LOST and done.lost is None, done
    assert pg.connection is None
    assert numbers(pg) == [1]  # Django reconnects
    assert judge(pg) is None


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.postgres
def test_checkup_reconnects_a_terminated_manual_transaction_in_manual_mode(
    pg, postgres_db, checkup, driver
):
    from ipy_dbreset.checkup import HEALTHY
    from ipy_dbreset.health import Problem

    engine = checkup()
    insert(pg, 1)
    pg.set_autocommit(False)
    insert(pg, 2)
    assert check(engine) == HEALTHY
    assert terminate_backends(postgres_db) == 1
    wait_until_disconnected(postgres_db)
    outcome = check(engine)
    assert not outcome.failures, outcome
    assert [problem_of(r) for r in outcome.repairs] == [Problem.LOST], outcome
    assert "manual transaction" in (outcome.repairs[0].lost or "")
    assert numbers(pg) == [1]  # the server discarded 2 with its transaction
    assert pg.get_autocommit() is False  # as the user had it
    insert(pg, 3)
    pg.commit()
    assert check(engine) == HEALTHY
    assert pg_committed(postgres_db) == [1, 3]


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.postgres
def test_aborted_manual_transaction_is_rolled_back(pg, postgres_db, driver):
    from ipy_dbreset.drivers import Transaction, driver_for
    from ipy_dbreset.health import Problem, judge
    from ipy_dbreset.repair import repair

    pg.set_autocommit(False)
    insert(pg, 1)
    pg.commit()
    insert(pg, 2)
    insert_twice(pg, 1)
    verdict = judge(pg)
    assert verdict is not None and verdict.problem is Problem.ABORTED, verdict
    assert driver_for(pg.connection).link(pg).transaction is Transaction.INERROR
    done = repair(pg, verdict)
    assert done.action == "rolled back" and done.lost == "lost its work", done
    assert done.reason == "a failed statement aborted the transaction", done
    assert done.hint == "autocommit is still off, so the next query opens a new transaction"
    assert judge(pg) is None
    assert pg.get_autocommit() is False
    insert(pg, 3)
    pg.commit()
    assert pg_committed(postgres_db) == [1, 3]


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.postgres
def test_aborted_manual_transaction_is_left_to_the_user_when_asked(pg, checkup, driver):
    from ipy_dbreset.checkup import HEALTHY, Outcome
    from ipy_dbreset.health import Problem, judge

    engine = checkup(leave_manual_transactions=True)
    pg.set_autocommit(False)
    insert(pg, 1)
    insert_twice(pg, 1)
    outcome = check(engine)
    assert not outcome.failures, outcome
    assert [r.action for r in outcome.repairs] == ["did not roll back"], outcome
    # Told once; still broken, so not taken as healthy.
    assert check(engine) == Outcome(healthy=False)
    verdict = judge(pg)
    assert verdict is not None and verdict.problem is Problem.ABORTED
    pg.rollback()
    assert check(engine) == HEALTHY


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.postgres
def test_error_in_nested_atomic_block_unwinds_inner_and_keeps_outer(pg, postgres_db, driver):
    from django.db import transaction

    from ipy_dbreset.health import Problem, judge
    from ipy_dbreset.repair import repair

    outer = transaction.atomic(using=ALIAS)
    outer.__enter__()
    insert(pg, 1)
    inner = transaction.atomic(using=ALIAS)
    inner.__enter__()
    insert(pg, 2)
    insert_twice(pg, 1)  # the inner block's savepoint is aborted; left open, as in a cell
    verdict = judge(pg)
    assert verdict is not None and verdict.problem is Problem.ABORTED, verdict
    done = repair(pg, verdict)
    assert done.action == "rolled back the inner atomic block on", done
    assert done.lost == "lost its work; kept the outer block", done
    assert pg.in_atomic_block and len(pg.atomic_blocks) == 1
    assert judge(pg) is None
    insert(pg, 3)
    outer.__exit__(None, None, None)
    assert pg_committed(postgres_db) == [1, 3]


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.postgres
def test_reset_rolls_back_an_open_atomic_block(pg, postgres_db, driver):
    from django.db import transaction

    from ipy_dbreset.repair import reset

    insert(pg, 1)
    transaction.atomic(using=ALIAS).__enter__()
    insert(pg, 2)
    done = reset(pg)
    assert done is not None and done.lost == "rolled back an atomic block", done
    assert not pg.in_atomic_block and pg.connection is None
    assert reset(pg) is None  # nothing left to reset
    assert pg_committed(postgres_db) == [1]


# -- SQLite ---------------------------------------------------------------------------


@pytest.fixture
def lite(connect: Callable[..., BaseDatabaseWrapper], tmp_path: Path) -> BaseDatabaseWrapper:
    wrapper = connect(f"sqlite:///{tmp_path / 'engine.sqlite3'}")
    with wrapper.cursor() as cursor:
        cursor.execute(
            "create table shop_order (id integer primary key, number integer unique, customer text)"
        )
    return wrapper


def sqlite_committed(wrapper: BaseDatabaseWrapper) -> list[int]:
    with contextlib.closing(sqlite3.connect(wrapper.settings_dict["NAME"])) as other:
        return [n for (n,) in other.execute("select number from shop_order order by number")]


def test_marked_atomic_block_on_sqlite_keeps_its_writes(lite):
    """SQLite undoes only the failed statement: Django's mark is all there is to clear."""
    from django.db import IntegrityError, transaction

    from ipy_dbreset.health import Problem, judge
    from ipy_dbreset.repair import repair

    block = transaction.atomic(using=ALIAS)
    block.__enter__()
    insert(lite, 1)
    with pytest.raises(IntegrityError), transaction.mark_for_rollback_on_error(ALIAS):
        insert(lite, 1)  # as the ORM's save() does
    assert lite.needs_rollback
    verdict = judge(lite)
    assert verdict is not None and verdict.problem is Problem.MARKED, verdict
    done = repair(lite, verdict)
    assert done.lost == "kept the block" and done.hint == "%dbreset discards them", done
    assert lite.in_atomic_block and not lite.needs_rollback
    assert judge(lite) is None
    insert(lite, 2)
    assert sqlite_committed(lite) == []  # still inside the block
    block.__exit__(None, None, None)
    assert sqlite_committed(lite) == [1, 2]


def test_healthy_sqlite_connection_gets_no_verdict(lite, checkup):
    from ipy_dbreset.checkup import HEALTHY
    from ipy_dbreset.health import judge

    lite.close()  # connected before the tracker started, to create the table
    engine = checkup()
    insert(lite, 2)
    assert lite in [t.wrapper for t in engine.tracked()]
    assert judge(lite) is None
    assert check(engine) == HEALTHY
    assert check(engine) == HEALTHY


# -- MariaDB / MySQL ----------------------------------------------------------------------


@pytest.fixture
def my(
    connect: Callable[..., BaseDatabaseWrapper], mysql_url: str
) -> Iterator[BaseDatabaseWrapper]:
    wrapper = connect(mysql_url)
    yield wrapper
    if wrapper.connection is not None and wrapper.connection.open:
        thread = int(wrapper.connection.thread_id())
        wrapper.connection.close()
        wrapper.connection = None
        wait_until_mysql_gone(thread)  # nothing of this test is left on the server


def mysql_committed(db: str) -> list[int]:
    return [n for (n,) in mysql_admin("select number from shop_order order by number", db=db)]


def mysql_last_command(thread: int) -> int:
    """The id of the last command the server got on ``thread``: a ping changes it too."""
    rows = mysql_admin(
        "select QUERY_ID from information_schema.PROCESSLIST where ID = %s", (thread,)
    )
    assert rows, f"connection {thread} is gone"
    return int(rows[0][0])


@pytest.mark.mysql
def test_healthy_mysql_connection_gets_no_verdict_and_no_round_trip(my, checkup):
    from ipy_dbreset.checkup import HEALTHY
    from ipy_dbreset.health import judge

    engine = checkup()
    my.set_autocommit(False)
    insert(my, 1)
    thread = int(my.connection.thread_id())
    before = mysql_last_command(thread)
    assert my in [t.wrapper for t in engine.tracked()]
    assert judge(my) is None
    assert check(engine) == HEALTHY
    assert check(engine) == HEALTHY
    assert mysql_last_command(thread) == before
    my.rollback()


@pytest.mark.mysql
def test_killed_mysql_connection_is_lost_and_closed(my, mysql_db):
    from ipy_dbreset.health import Problem, judge
    from ipy_dbreset.repair import repair

    insert(my, 1)
    thread = int(my.connection.thread_id())
    mysql_admin(f"KILL {thread}")
    wait_until_mysql_gone(thread)
    verdict = judge(my)
    assert verdict is not None and verdict.problem is Problem.LOST, verdict
    repair(my, verdict)
    assert my.connection is None
    assert numbers(my) == [1]
    assert mysql_committed(mysql_db) == [1]


@pytest.mark.mysql
def test_unread_mysql_result_is_read_and_the_transaction_kept(my, mysql_db):
    """An interrupt between sending a query and reading its result, as ``query()`` leaves it."""
    from ipy_dbreset.health import Problem, judge
    from ipy_dbreset.repair import repair

    my.set_autocommit(False)
    insert(my, 1)
    # What Django's cursor.execute() does up to the point where Ctrl-C lands:
    # the query was sent and answered, its result never read.
    my.connection.query("select number from shop_order")
    verdict = judge(my, suspect=True)
    assert verdict is not None and verdict.problem is Problem.STUCK, verdict
    done = repair(my, verdict)
    assert done.hint == "the transaction is kept" and "unread result" in done.action, done
    assert judge(my, suspect=True) is None
    insert(my, 2)
    my.commit()
    assert mysql_committed(mysql_db) == [1, 2]
