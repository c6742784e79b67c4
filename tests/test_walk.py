"""Nothing lost in combinations: seeded random walks through transactions and faults.

Each walk drives a real shell (an ``InteractiveShell``, or a real Jupyter
kernel) against real PostgreSQL, with psycopg 3 and with psycopg2, through a
random sequence of committed writes, atomic blocks left open, manual
transactions, commits, rollbacks, the user's savepoints, IntegrityErrors,
backends terminated between cells and mid-cell, ``idle_in_transaction_session_timeout``,
the stop button during ``pg_sleep`` and during ``COMMIT``, a backend
terminated during ``COMMIT``, and ``%dbreset``.  After every cell it checks,
against the server and the model (:mod:`walk_model`): a cell after a fault
between cells never fails, the server holds exactly what was committed,
every repair's counts of rows lost and kept are the model's, no callback
raises, no cell hangs.  A failing walk prints the shortest sequence of its
steps that still fails the same way.

CI runs a few seeds; a longer run is one command::

    pytest tests/test_walk.py -m "not restart" --walk-seeds 100 --walk-steps 300
    pytest tests/test_walk.py --walk-seeds 7 --walk-kernel-seeds 0      # one seed again
    pytest tests/test_walk.py --walk-ops all --walk-tolerate none       # all, strictly
"""

from __future__ import annotations

import os
import time
import uuid
from typing import TYPE_CHECKING

import pytest
from walk import Chooser, KernelDriver, Server, ShellDriver, Walker, describe_steps, shrink
from walk_model import OPS, SLOW

from conftest import (
    DRIVERS,
    PG_HOST,
    PG_PORT,
    PG_USER,
    WALK_FIGURES,
    migrate,
    pg_admin,
    postgres_url_for,
    unavailable,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.postgres

CI_OPS = frozenset(OPS)
"""The operations CI's walks draw from: all of them."""

CI_TOLERATE: tuple[str, ...] = ()
"""Kinds of violation CI's walks count and walk past (``--walk-tolerate ci``): none."""


def seeds(text: str) -> list[int]:
    """``"3"``: 1 to 3; ``"4-6"``; ``"2,9"``; ``"0"``: none."""
    text = text.strip()
    if "," in text:
        return [int(part) for part in text.split(",") if part.strip()]
    if "-" in text:
        first, last = (int(part) for part in text.split("-"))
        return list(range(first, last + 1))
    return list(range(1, int(text) + 1))


def chosen_ops(text: str) -> frozenset[str]:
    """``ci``, ``all``, ``write,read`` (those alone), ``ci,+bulk_write``, ``all,-stop``."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bare = bool(parts) and parts[0] not in ("ci", "all") and parts[0][0] not in "+-"
    ops = set() if bare else set(CI_OPS)
    for part in parts:
        if part == "ci":
            ops |= CI_OPS
        elif part == "all":
            ops |= set(OPS)
        else:
            name = part.lstrip("+-")
            if name not in OPS:
                raise pytest.UsageError(f"--walk-ops: no operation {name!r} ({', '.join(OPS)})")
            if part.startswith("-"):
                ops.discard(name)
            else:
                ops.add(name)
    return frozenset(ops)


def tolerated(text: str) -> list[str]:
    """``ci``: :data:`CI_TOLERATE`; ``none``; or a comma list of kinds (prefixes)."""
    kinds: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if part == "ci":
            kinds += CI_TOLERATE
        elif part and part != "none":
            kinds.append(part)
    return kinds


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "walk_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    cases = []
    for kind, option in (("shell", "--walk-seeds"), ("kernel", "--walk-kernel-seeds")):
        marks = [pytest.mark.kernel] if kind == "kernel" else []
        for seed in seeds(config.getoption(option)):
            for driver in DRIVERS:
                cases.append(
                    pytest.param((kind, driver, seed), id=f"{kind}-{driver}-{seed}", marks=marks)
                )
    metafunc.parametrize("walk_case", cases)


@pytest.fixture(scope="session")
def walk_db() -> Iterator[str]:
    """A database of the walks' own (their faults terminate every session on it)."""
    try:
        pg_admin("select 1")
    except Exception as exc:
        unavailable(f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT} as {PG_USER}: {exc}")
    name = f"ipy_dbreset_walk_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    pg_admin(f'create database "{name}"')
    try:
        migrate(postgres_url_for(name))
        pg_admin(SLOW_COMMIT, dbname=name)
        yield name
    finally:
        pg_admin(f'drop database if exists "{name}" with (force)')


SLOW_COMMIT = f"""
create function walk_slow_commit() returns trigger language plpgsql as $$
begin
    if new.number >= {SLOW} then
        perform pg_sleep(60);
    end if;
    return null;
end $$;
create constraint trigger walk_slow_commit after insert on shop_order
    deferrable initially deferred for each row execute function walk_slow_commit();
"""
"""A COMMIT of an order numbered from SLOW on waits for the walk's fault (or a minute)."""


@pytest.fixture
def server(walk_db: str) -> Iterator[Server]:
    import psycopg

    def connect() -> psycopg.Connection:
        return psycopg.connect(
            host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=walk_db, autocommit=True
        )

    server = Server(connect, walk_db)
    yield server
    server.close()


def test_walk(walk_case: tuple[str, str, int], server: Server, request: pytest.FixtureRequest):
    kind, driver, seed = walk_case
    config = request.config
    ops = chosen_ops(config.getoption("--walk-ops"))
    steps = config.getoption("--walk-steps")
    url = postgres_url_for(server.dbname)
    make = ShellDriver if kind == "shell" else KernelDriver
    tolerate = tolerated(config.getoption("--walk-tolerate"))
    walker = Walker(lambda: make(url, driver), server, tolerate)
    started = time.monotonic()
    violation, figures = walker.walk(Chooser(seed, steps, ops))
    seconds = time.monotonic() - started
    line = (
        f"{kind:6} {driver:8} seed {seed:3}: {len(figures.steps)} steps, {figures.cells} cells, "
        f"{figures.faults} faults, {figures.failed_statements} IntegrityErrors, "
        f"{figures.repairs} repairs, {'1 violation' if violation else 'no violation'}"
        f"{f' ({len(figures.tolerated)} tolerated)' if figures.tolerated else ''}, "
        f"{seconds:.1f}s"
    )
    config.stash.setdefault(WALK_FIGURES, []).append(
        line + (f": {violation.kind}" if violation else "")
    )
    if violation is None:
        return
    trace = [op for op, _ in figures.steps[: violation.step]]
    shortest, again, replayed, tries = shrink(
        walker, trace, violation.kind, config.getoption("--walk-shrink-seconds")
    )
    shown = [
        f"walk {kind} {driver} seed {seed}: {violation}",
        f"the shortest sequence found ({len(shortest)} of {violation.step} steps, "
        f"{tries} walks tried) that breaks it again:",
    ]
    if again is not None and replayed is not None:
        shown += [*describe_steps(replayed.steps[: again.step]), f"  -> {again}"]
    else:
        shown += [
            "  (it did not fail again when replayed: a race?)",
            *describe_steps(figures.steps[: violation.step]),
        ]
    pytest.fail("\n".join(shown), pytrace=False)


DJANGO_ONLY = frozenset(
    {
        *("write", "bulk_write", "update_nothing", "read", "manual_on", "manual_off"),
        *("commit", "rollback", "atomic_enter", "atomic_exit", "atomic_fail"),
        *("savepoint", "sp_rollback", "sp_release"),
    }
)
"""The operations Django and PostgreSQL alone handle: no fault, no failed statement."""


@pytest.mark.parametrize("driver", DRIVERS)
def test_the_model_is_djangos_own(driver: str, server: Server):
    """Without the extension, walks with no fault hold what the model says: its rules are
    Django's and PostgreSQL's, so what a walk finds with the extension is the extension's."""
    url = postgres_url_for(server.dbname)
    walker = Walker(lambda: ShellDriver(url, driver, load=False), server)
    for seed in (1, 2):
        violation, figures = walker.walk(Chooser(seed, 150, DJANGO_ONLY))
        assert violation is None, "\n".join([str(violation), *describe_steps(figures.steps)])
