"""The notebooks in ``notebooks/`` run top to bottom in real kernels and show the recoveries.

The quickstart runs on a throwaway SQLite database, the others on this
session's PostgreSQL database.  Cells tagged ``raises-exception`` are the
failures the notebooks demonstrate; any other failure fails the test.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tempfile
from typing import TYPE_CHECKING, Any

import nbformat
import pytest

from conftest import DRIVERS
from harness import DEMO, ROOT

if TYPE_CHECKING:
    from pathlib import Path
    from types import ModuleType

pytestmark = pytest.mark.kernel

NOTEBOOKS = sorted(p.name for p in DEMO.glob("*.ipynb"))
EXPECTED_FAILURE = "raises-exception"


def load_run_demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("run_demo", DEMO / "run_demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_demo = load_run_demo()


class Run:
    """An executed notebook, read the way its reader reads it."""

    def __init__(self, name: str, scratch: Path, db_url: str | None = None) -> None:
        self.notebook = nbformat.read(DEMO / name, as_version=4)
        run_demo.execute(self.notebook, scratch, db_url)
        self.code = [c for c in self.notebook.cells if c.cell_type == "code"]

    def cell(self, snippet: str, nth: int = 0) -> Any:
        found = [c for c in self.code if snippet in c.source]
        assert len(found) > nth, f"no cell with {snippet!r}"
        return found[nth]

    def after(self, cell: Any) -> Any:
        return self.code[self.code.index(cell) + 1]

    @staticmethod
    def texts(cell: Any) -> list[str]:
        return [run_demo.output_text(o) for o in cell.outputs]

    @classmethod
    def notices(cls, cell: Any) -> list[str]:
        return [t for t in cls.texts(cell) if t.startswith("ipy_dbreset:")]

    @classmethod
    def result(cls, cell: Any) -> str:
        """The cell's Out[n] value, as text."""
        results = [o for o in cell.outputs if o.output_type == "execute_result"]
        assert results, f"cell showed no result: {cell.source}\n{cls.texts(cell)}"
        return str(results[-1].data["text/plain"])

    @staticmethod
    def error(cell: Any) -> str | None:
        errors = [o for o in cell.outputs if o.output_type == "error"]
        return errors[0].ename if errors else None

    def failed_on_purpose(self) -> list[str]:
        """Every tagged cell failed, and only those: the names of their errors."""
        names = []
        for cell in self.code:
            tagged = EXPECTED_FAILURE in cell.metadata.get("tags", [])
            name = self.error(cell)
            assert (name is not None) == tagged, f"{name} in {cell.source!r} (tagged: {tagged})"
            if name:
                names.append(name)
        return names


# -- the committed notebooks ------------------------------------------------------


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_shows_its_outputs_without_this_machines_paths(name):
    text = (DEMO / name).read_text(encoding="utf-8")
    notebook = nbformat.reads(text, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code), "run it with run_demo.py --save"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert str(ROOT) not in text
    assert tempfile.gettempdir() + "/" not in text


# -- quickstart: SQLite ---------------------------------------------------------------


def test_quickstart_on_sqlite_keeps_what_sqlite_kept_and_resets_on_request(tmp_path):
    run = Run("quickstart.ipynb", tmp_path)
    assert run.failed_on_purpose() == ["IntegrityError", "IntegrityError"]
    assert any("Django set up with 'demo.settings'" in n for n in run.notices(run.code[0]))

    # IntegrityError in a manual transaction: SQLite keeps it usable; nothing done, nothing lost.
    duplicate = run.cell('Order.objects.create(number=3, customer="duplicate")')
    assert run.notices(duplicate) == []
    assert "[1, 2, 3]" in run.texts(run.after(duplicate))

    # An error in a leaked atomic block: the mark is cleared, the block and its write are kept.
    leaked = run.cell("block.__enter__()")
    assert any("cleared Django's rollback mark" in n for n in run.notices(leaked))
    assert run.result(run.after(leaked)) == "4"

    assert "in an atomic block: 1 write" in run.result(run.cell("%dbstatus"))
    reset = run.cell("%dbreset")
    said = (
        "reset db 'default': rolled back an atomic block with 1 unsaved write (INSERT shop_order)"
    )
    assert any(said in n for n in run.notices(reset)), run.notices(reset)
    assert run.result(run.after(reset)) == "3"


def test_demo_command_prints_the_quickstart_and_leaves_no_database_behind():
    before = set(DEMO.rglob("*.sqlite3"))
    done = subprocess.run(
        [sys.executable, "notebooks/run_demo.py"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    transcript = done.stdout
    assert "In [1]: %load_ext ipy_dbreset" in transcript
    assert "IntegrityError: UNIQUE constraint failed" in transcript
    assert "ipy_dbreset: cleared Django's rollback mark on db 'default'" in transcript
    assert "every cell ran as expected (2 failed on purpose)" in transcript
    status = re.search(r"In \[\d+\]: %dbstatus\n(.*?)\n\n", transcript, re.DOTALL)
    assert status, transcript
    assert tempfile.gettempdir() in status[1]  # the database is a throwaway file
    assert set(DEMO.rglob("*.sqlite3")) <= before


# -- PostgreSQL -------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.skipif(
    "psycopg" not in DRIVERS,
    reason="the notebook terminates backends with psycopg 3, which is not installed",
)
def test_recovering_notebook_repairs_each_failure(tmp_path, postgres_url):
    run = Run("recovering.ipynb", tmp_path, postgres_url)
    assert run.failed_on_purpose() == [
        "ZeroDivisionError",
        "IntegrityError",
        "IntegrityError",
        "IntegrityError",
    ]

    # A Python error leaves the open transaction alone; its write is committed afterwards.
    python_error = run.cell("1 / 0")
    assert run.notices(python_error) == []
    assert run.result(run.after(python_error)) == "3"

    # IntegrityError in a manual transaction: rolled back, said so, autocommit still off.
    aborted = run.cell('Order.objects.create(number=4, customer="Barbara")')
    (notice,) = run.notices(aborted)
    assert "rolled back db 'default': a failed statement aborted the transaction" in notice
    assert "autocommit is still off, so the next query opens a new transaction" in notice
    assert run.texts(run.after(aborted)) == ["False", "3"]

    # The same with aborted_manual_transactions = "leave": a hint, and the user rolls back.
    left = run.cell('aborted_manual_transactions = "leave"')
    (notice,) = run.notices(left)
    assert "did not roll back db 'default'" in notice and "transaction.rollback()" in notice
    assert run.result(run.after(left)) == "3"

    # Nested atomic blocks: only the inner one is lost, the outer one commits order 10.
    nested = run.cell("inner.__enter__()")
    (notice,) = run.notices(nested)
    assert "rolled back the inner atomic block on db 'default'" in notice, notice
    assert "kept the outer block with 1 write (INSERT shop_order)" in notice, notice
    assert run.texts(run.after(nested)) == ["[1, 2, 3, 10]", "4"]

    # The backend terminated between cells: reconnected, the lost transaction named.
    terminated = run.cell("pg_terminate_backend")
    following = run.after(terminated)
    notices = run.notices(terminated) + run.notices(following)
    closed = "closed db 'default': the server closed the connection; lost a manual transaction"
    assert any(closed in n for n in notices), notices
    assert [t for t in run.texts(following) if not t.startswith("ipy_dbreset")] == ["False", "4"]

    status = run.result(run.cell("%dbstatus"))
    assert "psycopg" in status and "idle" in status, status
    assert "last repair" in status and "closed db 'default'" in status, status


@pytest.mark.postgres
@pytest.mark.skipif(
    "psycopg" not in DRIVERS,
    reason="the notebook terminates backends with psycopg 3, which is not installed",
)
def test_async_orm_notebook_recovers_the_worker_threads_connection(tmp_path, postgres_url):
    run = Run("async_orm.ipynb", tmp_path, postgres_url)
    assert run.failed_on_purpose() == ["SynchronousOnlyOperation"]

    assert run.result(run.cell("await Order.objects.acount()")) == "2"
    assert run.result(run.cell("async for")) == "['Ada', 'Grace']"
    assert run.result(run.cell("arefresh_from_db")) == "'Grace Hopper'"
    status = run.result(run.cell("%dbstatus"))
    lines = status.splitlines()
    # Header, rule, the shell's and the worker's, and the keepalive they share.
    assert len(lines) == 5 and lines[-1].startswith("every connection's keepalive: on"), status
    assert lines[0].split()[:2] == ["alias", "thread"] and "ThreadPoolExecutor" in lines[3]

    terminated = run.cell("pg_terminate_backend")
    after = run.after(terminated)
    notices = run.notices(terminated) + run.notices(after)
    assert any("(thread " in n and "reconnects" in n for n in notices), notices
    assert run.result(after) == "2"
    assert run.result(run.after(after)) == "2"

    opted_out = run.cell("allow_async_unsafe = False")
    assert run.result(run.after(opted_out)) == "2"
