"""``%dbreset``, ``%dbstatus`` and ``%config DBReset`` in a real IPython shell.

The shell is IPython's own test shell, in this process; Django is set up once
with the demo project (``notebooks/``) on fresh SQLite files, and connections
are broken for real (a connection closed inside an open atomic block).
"""

from __future__ import annotations

import logging
import re
import sys
from typing import TYPE_CHECKING

import pytest

from harness import DEMO, run

if TYPE_CHECKING:
    from pathlib import Path

    from IPython.core.interactiveshell import InteractiveShell

    from harness import Cell


def state(alias: str = "default") -> tuple[object, ...]:
    """What must not change when a magic refuses its input."""
    from django.db import connections

    wrapper = connections[alias]
    return (
        wrapper,
        wrapper.connection,
        wrapper.in_atomic_block,
        len(wrapper.atomic_blocks),
        wrapper.needs_rollback,
        wrapper.autocommit,
    )


def open_atomic_with_a_row(shell: InteractiveShell, number: int) -> None:
    """An atomic block left open by the user, holding an uncommitted row."""
    assert run(
        shell,
        "atomic = transaction.atomic(); atomic.__enter__()\n"
        f"Order.objects.create(number={number}, customer='x')",
    ).ok


# -- help -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("magic", "expected"),
    [
        ("dbreset", ["Reset Django database connections now", "-q, --quiet", "ALIAS"]),
        ("dbstatus", ["Show every Django connection in use", "never shows a password", "ALIAS"]),
    ],
)
def test_magic_help_shows_docstring_and_options(
    shell: InteractiveShell, magic: str, expected: list[str]
) -> None:
    ran = run(shell, f"%{magic}?")
    assert ran.ok, ran.shown
    assert f"%{magic} [" in ran.shown
    for text in expected:
        assert text in ran.shown


# -- %dbreset ---------------------------------------------------------------------


def test_dbreset_returns_what_it_reset_and_q_prints_nothing(shell: InteractiveShell) -> None:
    from ipy_dbreset.output import ResetResult
    from ipy_dbreset.records import Repair

    assert run(shell, "connections['other'].ensure_connection()").ok
    open_atomic_with_a_row(shell, 1001)
    ran = run(shell, "result = %dbreset -q")
    assert ran.ok, ran.shown
    assert (ran.stdout, ran.stderr, ran.texts) == ("", "", [])
    result = shell.user_ns["result"]
    assert isinstance(result, ResetResult)
    assert all(isinstance(repair, Repair) for repair in result)
    assert sorted(repair.alias for repair in result) == ["default", "other"]
    default = next(repair for repair in result if repair.alias == "default")
    assert default.lost is not None and "atomic block" in default.lost
    # The next cell works on a fresh connection; the uncommitted row went with the reset.
    after = run(shell, "Order.objects.filter(number=1001).exists(), connection.in_atomic_block")
    assert after.ok, after.shown
    assert after.result == (False, False)


def test_dbreset_alias_resets_only_that_alias(shell: InteractiveShell) -> None:
    assert run(shell, "connections['other'].ensure_connection()").ok
    open_atomic_with_a_row(shell, 1002)
    before = state("default")
    ran = run(shell, "%dbreset -q other")
    assert ran.ok, ran.shown
    assert [repair.alias for repair in ran.result] == ["other"]
    assert state("default") == before
    assert run(shell, "Order.objects.filter(number=1002).exists()").result is True
    from django.db import connections

    assert connections["other"].connection is None


def test_dbreset_says_once_what_it_did(shell: InteractiveShell) -> None:
    assert run(shell, "connection.ensure_connection()").ok
    ran = run(shell, "%dbreset")
    assert ran.ok, ran.shown
    assert len(ran.notices) == 1, ran.texts
    assert ran.notices[0].startswith("ipy_dbreset: reset db 'default'")
    again = run(shell, "%dbreset")
    assert again.notices == ["ipy_dbreset: nothing to reset: no open connection for any alias"]
    assert list(again.result) == []


@pytest.mark.parametrize("magic", ["dbreset", "dbstatus"])
@pytest.mark.parametrize("line", ["nope", "default nope", "-q nope"])
def test_unknown_alias_is_a_usage_error_that_touches_nothing(
    shell: InteractiveShell, magic: str, line: str
) -> None:
    from IPython.core.error import UsageError

    if magic == "dbstatus" and line.startswith("-q"):
        line = line.removeprefix("-q ")
    open_atomic_with_a_row(shell, 1003)
    before = state("default")
    ran = run(shell, f"%{magic} {line}")
    assert isinstance(ran.exception, UsageError), ran.shown
    assert "'nope'" in str(ran.exception)
    assert "Traceback" not in ran.shown
    assert state("default") == before
    # The user's uncommitted row is still there, in the same transaction.
    assert run(shell, "Order.objects.filter(number=1003).exists()").result is True


@pytest.mark.parametrize("magic", ["dbreset", "dbstatus"])
@pytest.mark.parametrize(
    "line", ["-x", "--nope", "-q=1", "--quiet=yes", "-h", "--help", "'unclosed", 'default "']
)
def test_bad_options_are_usage_errors(shell: InteractiveShell, magic: str, line: str) -> None:
    from IPython.core.error import UsageError

    open_atomic_with_a_row(shell, 1004)
    before = state("default")
    ran = run(shell, f"%{magic} {line}")
    assert isinstance(ran.exception, UsageError), ran.shown
    assert "Traceback" not in ran.shown
    assert f"%{magic}?" in str(ran.exception)  # points to the help
    assert state("default") == before


def test_without_the_extension_the_magics_do_not_exist(bare_shell: InteractiveShell) -> None:
    ran = run(bare_shell, "%dbreset")
    assert ran.exception is not None and "not found" in ran.shown


# -- %dbstatus --------------------------------------------------------------------


def test_dbstatus_shows_a_row_per_connection_without_connecting(shell: InteractiveShell) -> None:
    from django.db import connections

    from ipy_dbreset.display import Table

    idle = run(shell, "%dbstatus")
    assert idle.ok, idle.shown
    assert isinstance(idle.result, Table)
    assert all(row[-1] == "not connected" for row in idle.result.rows)  # the state
    assert connections["default"].connection is None  # reporting opened nothing

    open_atomic_with_a_row(shell, 1005)
    assert run(shell, "connections['other'].ensure_connection()").ok
    table = run(shell, "%dbstatus").result
    assert sorted(row[0] for row in table.rows) == ["default", "other"]
    text = str(table)
    # No thread column (every connection is this thread's), no server pid (SQLite has none).
    assert text.splitlines()[0].split() == ["alias", "driver", "database", "state"]
    assert "sqlite" in text and "atomic" in text
    only = run(shell, "%dbstatus other").result
    assert [row[0] for row in only.rows] == ["other"]


# -- configuration ----------------------------------------------------------------


def test_config_lists_every_option_with_its_help(shell: InteractiveShell) -> None:
    from ipy_dbreset.magics import DBReset

    ran = run(shell, "%config DBReset")
    assert ran.ok, ran.shown
    options = DBReset.class_trait_names(config=True)
    assert "auto_repair" in options  # the list is read from the class, not empty
    for name in options:
        assert f"DBReset.{name}=" in ran.shown
        help_start = DBReset.class_traits()[name].help.split()[:4]
        assert " ".join(help_start) in " ".join(ran.shown.split())


def broken(shell: InteractiveShell) -> Cell:
    """A cell that leaves ``default`` closed inside an open atomic block."""
    return run(
        shell,
        "atomic = transaction.atomic(); atomic.__enter__()\n"
        "Order.objects.create(number=2001, customer='x')\n"
        "connection.close()",
    )


def test_auto_repair_off_stops_repairs_and_on_resumes_them(shell: InteractiveShell) -> None:
    from django.db import connection

    assert run(shell, "%config DBReset.auto_repair = False").ok
    cell = broken(shell)
    assert cell.ok and cell.notices == [], cell.shown
    assert connection.in_atomic_block and connection.closed_in_transaction
    quiet = run(shell, "1 + 1")
    assert quiet.notices == [] and connection.closed_in_transaction

    # Turned back on, the repair happens right after the %config cell, and the next works.
    enable = run(shell, "%config DBReset.auto_repair = True")
    assert enable.ok, enable.shown
    assert len(enable.notices) == 1 and "default" in enable.notices[0], enable.texts
    after = run(shell, "Order.objects.filter(number=2001).exists()")
    assert after.ok, after.shown
    assert after.result is False
    assert not connection.in_atomic_block


def test_verbosity_0_repairs_without_a_word_but_logs(
    shell: InteractiveShell, caplog: pytest.LogCaptureFixture
) -> None:
    from django.db import connection

    assert run(shell, "%config DBReset.verbosity = 0").ok
    with caplog.at_level(logging.INFO, logger="ipy_dbreset"):
        cell = broken(shell)
    assert cell.ok, cell.shown
    assert cell.shown.strip() == ""
    assert not connection.in_atomic_block
    assert any(
        "default" in r.getMessage() for r in caplog.records if r.name.startswith("ipy_dbreset")
    )
    after = run(shell, "Order.objects.filter(number=2001).exists()")
    assert after.ok and after.result is False and "ipy_dbreset" not in after.shown, after.shown


def test_verbosity_1_says_what_was_repaired(shell: InteractiveShell) -> None:
    cell = broken(shell)
    assert cell.ok, cell.shown
    assert len(cell.notices) == 1
    assert cell.notices[0] == (
        "ipy_dbreset: closed db 'default': the connection was closed mid-transaction; "
        "lost an atomic block with 1 unsaved write (INSERT shop_order); the next query reconnects"
    )


# -- no secret in any output ------------------------------------------------------

SECRET = "Sup3r-Secret-pw"


@pytest.mark.kernel
@pytest.mark.postgres
def test_no_output_shows_the_database_password(start_kernel, postgres_url, postgres_db) -> None:
    """PostgreSQL here trusts local users, so a PASSWORD is accepted and must stay unseen."""
    from conftest import terminate_backends, wait_until_disconnected

    url = postgres_url.replace("postgresql://postgres@", f"postgresql://postgres:{SECRET}@")
    kernel = start_kernel(url, load=False)
    kernel.ok("%load_ext ipy_dbreset")
    kernel.ok("from shop.models import Order\nfrom django.db import connection, transaction")
    kernel.ok("from django.conf import settings; assert settings.DATABASES['default']['PASSWORD']")
    kernel.ok("Order.objects.create(number=1, customer='x')")
    kernel.ok("%dbstatus")
    # A fault inside a cell, one between cells, a reset, bad input, the config.
    kernel.run(
        "transaction.set_autocommit(False)\n"
        "Order.objects.create(number=2, customer='x')\n"
        "Order.objects.create(number=2, customer='x')"
    )
    kernel.ok("transaction.set_autocommit(True)")
    assert terminate_backends(postgres_db) >= 1
    wait_until_disconnected(postgres_db)
    kernel.ok("Order.objects.count()")
    kernel.ok("%dbstatus default")
    kernel.ok("%dbreset")
    kernel.run("%dbreset default nope")
    kernel.run("%dbstatus 'unclosed")
    kernel.ok("%config DBReset")
    notices = [notice for cell in kernel.cells for notice in cell.notices]
    assert any("closed db 'default'" in notice for notice in notices), notices  # repairs said
    everything = "\n".join(cell.shown + "\n".join(cell.htmls) for cell in kernel.cells)
    assert "127.0.0.1" in everything  # %dbstatus did show where it connects
    assert SECRET not in everything


# -- %dbreset in a kernel and in a terminal -----------------------------------------


@pytest.mark.kernel
def test_dbreset_says_its_notice_once_and_q_nothing_in_a_kernel(start_kernel, sqlite_url) -> None:
    kernel = start_kernel(sqlite_url)
    kernel.ok("connection.ensure_connection()")
    quiet = kernel.ok("%dbreset -q")
    assert (quiet.stdout, quiet.stderr, quiet.texts) == ("", "", []), quiet.shown
    kernel.ok("connection.ensure_connection()")
    said = kernel.ok("%dbreset")
    assert len(said.texts) == 1 and said.texts[0].startswith("ipy_dbreset: reset db 'default'")
    # The result is still there for code, and shows its notice when asked for.
    kernel.ok("connection.ensure_connection()")
    assert kernel.ok("result = %dbreset -q").texts == []
    assert kernel.ok("[repair.alias for repair in result]").value() == ["default"]
    assert kernel.ok("result").notices[0].startswith("ipy_dbreset: reset db 'default'")


@pytest.mark.kernel
@pytest.mark.postgres
def test_dbreset_keeps_autocommit_off_and_says_so(start_kernel, postgres_url, postgres_db) -> None:
    from conftest import pg_admin

    kernel = start_kernel(postgres_url)
    kernel.ok("transaction.set_autocommit(False); Order.objects.create(number=1)")
    reset = kernel.ok("%dbreset")
    assert len(reset.notices) == 1, reset.shown
    said = reset.notices[0]
    assert "rolled back a manual transaction with 1 unsaved write (INSERT shop_order)" in said
    assert "the next query reconnects with autocommit off, as you had it" in said
    assert kernel.ok("transaction.get_autocommit()").value() is False
    kernel.ok("Order.objects.create(number=2); transaction.commit()")
    rows = pg_admin("select number from shop_order", dbname=postgres_db)
    assert rows == [(2,)]


def test_dbreset_shows_no_empty_out_prompt_in_a_terminal(sqlite_url: str, tmp_path: Path) -> None:
    from test_shells import Project, Terminal

    project = Project(tmp_path, sqlite_url)
    project.ipython_config(extension=True)
    shell = Terminal([sys.executable, "-m", "IPython"], DEMO, project.env())
    try:
        shell.type("from django.db import connection; connection.ensure_connection()")
        shown = shell.type("%dbreset")
        assert shown.strip().startswith("ipy_dbreset: reset db 'default'"), shown
        assert "Out[" not in shown, shown
        shell.type("connection.ensure_connection()")
        assert shell.type("%dbreset -q").strip() == ""
        shell.type("connection.ensure_connection()")
        assert shell.type("result = %dbreset -q").strip() == ""
        shown = shell.type("[repair.alias for repair in result]")
        assert re.fullmatch(r"Out\[\d+\]: \['default'\]", shown.strip()), shown
        # Other values of a cell that ran the magic are shown as usual.
        shown = shell.type("get_ipython().run_line_magic('dbreset', '-q'); 1 + 1")
        assert re.fullmatch(r"Out\[\d+\]: 2", shown.strip()), shown
    finally:
        shell.close()
