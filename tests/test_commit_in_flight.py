"""A COMMIT whose answer never came: the notice says what the server did, never a guess.

The COMMIT reaches the server; then its answer is lost (the path to the
server dropped it and the connection is reset), its backend is terminated
while the COMMIT waits, or the user presses the stop button.  Each kernel
here reaches PostgreSQL through :class:`netfault.Path`, a proxy of the
tests' own, so that an answer can be lost after the server committed.  A
deferred trigger makes a COMMIT of an order numbered from :data:`SLOW` wait.
"""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING

import pytest
from netfault import Path

from conftest import (
    DRIVERS,
    PG_HOST,
    PG_PORT,
    PG_USER,
    pg_admin,
    terminate_backends,
    wait_for,
    wait_until_running,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from harness import Cell, Kernel

pytestmark = [pytest.mark.kernel, pytest.mark.postgres]

SLOW = 1_000_000

SLOW_COMMIT = f"""
create or replace function in_flight_slow_commit() returns trigger language plpgsql as $$
begin
    if new.number >= {SLOW} then  -- SLOW waits 30 s, SLOW + n waits n s
        perform pg_sleep(case when new.number > {SLOW} then new.number - {SLOW} else 30 end);
    end if;
    return null;
end $$;
create constraint trigger in_flight_slow_commit after insert on shop_order
    deferrable initially deferred for each row execute function in_flight_slow_commit();
"""


def notices(cell: Cell) -> str:
    assert cell.notices, f"no notice:\n{cell.shown}"
    return " | ".join(cell.notices)


def holds_writes(status: Cell) -> bool:
    """Whether ``%dbstatus`` shows an open transaction holding writes."""
    return re.search(r"\b[1-9][\d,]* writes?\b[^,]*, open", status.shown) is not None


def on_server(db: str, number: int) -> int:
    return pg_admin("select count(*) from shop_order where number = %s", (number,), dbname=db)[0][0]


@pytest.fixture
def slow_commits(postgres_db: str) -> Iterator[str]:
    pg_admin(SLOW_COMMIT, dbname=postgres_db)
    try:
        yield postgres_db
    finally:
        terminate_backends(postgres_db)  # a kernel's open transaction would hold the drop up
        pg_admin(
            "drop trigger if exists in_flight_slow_commit on shop_order; "
            "drop function if exists in_flight_slow_commit()",
            dbname=postgres_db,
        )


@pytest.fixture
def through_path(
    start_kernel: Callable[..., Kernel], postgres_db: str
) -> Iterator[Callable[[str], tuple[Kernel, Path]]]:
    paths: list[Path] = []

    def start(driver: str) -> tuple[Kernel, Path]:
        pg_admin("truncate shop_order", dbname=postgres_db)
        path = Path(PG_HOST, PG_PORT)  # no packet is dropped: no nftables needed
        paths.append(path)
        kernel = start_kernel(f"postgresql://{PG_USER}@127.0.0.1:{path.port}/{postgres_db}", driver)
        return kernel, path

    yield start
    for path in paths:
        path.close()


def commit_losing_its_answer(kernel: Kernel, path: Path, db: str, code: str, number: int) -> str:
    """Run ``code``, whose COMMIT commits order ``number``, and lose the COMMIT's answer.

    Once the server holds the order committed, the connection is reset; the
    cell fails.  Returns what its notices say.
    """

    def lose() -> None:
        wait_for(lambda: on_server(db, number) == 1, f"order {number} committed", 20)
        path.reset()

    path.mute_after(b"COMMIT")
    loser = threading.Thread(target=lose, daemon=True)
    loser.start()
    try:
        failed = kernel.run(code)
    finally:
        loser.join(30)
        path.mute_after(None)
    assert not failed.ok, failed.shown
    return notices(failed)


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_commit_that_committed_but_whose_answer_was_lost_is_told_saved(
    through_path, postgres_db, driver
):
    kernel, path = through_path(driver)
    kernel.ok(
        "transaction.set_autocommit(False)\n"
        "Order.objects.bulk_create([Order(number=n) for n in range(10, 15)])\n"
        "Order.objects.create(number=5)"
    )
    said = commit_losing_its_answer(kernel, path, postgres_db, "transaction.commit()", 5)
    assert "closed db 'default': " in said and "during its COMMIT" in said, said
    assert "it committed: 2 statements writing 6 rows (INSERT shop_order 6) are saved" in said, said
    assert "lost" not in said, said
    # The next cell works, and finds what the notice said is saved.
    assert kernel.ok("Order.objects.count()").value() == 6
    assert not holds_writes(kernel.ok("%dbstatus"))


@pytest.mark.parametrize("driver", DRIVERS)
def test_an_atomic_blocks_commit_whose_answer_was_lost_is_told_saved(
    through_path, postgres_db, driver
):
    """Django's Atomic closes the connection itself: the notice comes all the same."""
    kernel, path = through_path(driver)
    code = "with transaction.atomic():\n    Order.objects.create(number=7)"
    said = commit_losing_its_answer(kernel, path, postgres_db, code, 7)
    assert "asked the server about a COMMIT on db 'default'" in said, said
    assert "it committed: 1 write (INSERT shop_order) is saved" in said, said
    assert kernel.ok("Order.objects.filter(number=7).count()").value() == 1


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_commit_whose_backend_was_terminated_is_told_rolled_back_with_its_rows(
    start_kernel, postgres_url, slow_commits, driver
):
    kernel = start_kernel(postgres_url, driver)
    kernel.ok(
        "transaction.set_autocommit(False)\n"
        "Order.objects.bulk_create([Order(number=n) for n in range(10, 510)])\n"
        f"Order.objects.create(number={SLOW})"
    )
    cell: list[Cell] = []
    running = threading.Thread(target=lambda: cell.append(kernel.run("transaction.commit()")))
    running.start()
    wait_until_running(slow_commits, "COMMIT")
    assert terminate_backends(slow_commits) >= 1
    running.join(60)
    (failed,) = cell
    assert not failed.ok
    said = notices(failed)
    assert "closed db 'default': the " in said and " during its COMMIT; " in said, said
    assert (
        "it rolled back: lost 2 unsaved statements writing 501 rows (INSERT shop_order 501)" in said
    ), said
    assert kernel.ok("Order.objects.count()").value() == 0
    status = kernel.ok("%dbstatus")
    assert not holds_writes(status), status.shown


@pytest.mark.parametrize("driver", DRIVERS)
def test_the_stop_button_during_commit_settles_the_count(
    start_kernel, postgres_url, slow_commits, driver
):
    """Stopped during COMMIT: told once what became of it, and never counted again."""
    kernel = start_kernel(postgres_url, driver)
    if driver == "psycopg2":
        kernel.ok("%config DBReset.interruptible_psycopg2 = True")
    kernel.ok(
        "transaction.set_autocommit(False)\n"
        "Order.objects.create(number=2)\n"
        f"Order.objects.create(number={SLOW})"
    )
    stopped = kernel.interrupt_during("transaction.commit()", after=1.5)
    assert not stopped.ok
    said = notices(stopped)
    # psycopg 3 asks the server; psycopg2's cancel reached the COMMIT: refused, no doubt.
    assert "its COMMIT was interrupted; " in said or "its COMMIT was cancelled; " in said, said
    assert "; it rolled back: lost 2 unsaved writes (INSERT shop_order x2)" in said, said
    assert on_server(slow_commits, 2) == 0
    status = kernel.ok("%dbstatus")
    assert not holds_writes(status), status.shown
    # A later failure in the next transaction counts its own writes alone.
    kernel.ok("Order.objects.create(number=3)")
    failed = kernel.run("Order.objects.create(number=3)")
    assert failed.ename == "IntegrityError"
    assert "lost 1 unsaved write (INSERT shop_order)" in notices(failed), notices(failed)
    kernel.ok("transaction.rollback(); transaction.set_autocommit(True)")


def test_a_commit_that_ends_before_the_interrupt_lands_is_told_saved(
    start_kernel, postgres_url, slow_commits
):
    """psycopg2, not interruptible (the default): Ctrl-C lands once the COMMIT is over."""
    kernel = start_kernel(postgres_url, "psycopg2")
    kernel.ok(
        "transaction.set_autocommit(False)\n"
        "Order.objects.create(number=2)\n"
        f"Order.objects.create(number={SLOW + 3})"
    )
    stopped = kernel.interrupt_during("transaction.commit()", after=1)
    assert stopped.ename == "KeyboardInterrupt", stopped.shown
    said = notices(stopped)
    assert (
        "its COMMIT was interrupted; it committed: 2 writes (INSERT shop_order x2) are saved"
        in said
    ), said
    assert on_server(slow_commits, 2) == 1
    assert not holds_writes(kernel.ok("%dbstatus"))
