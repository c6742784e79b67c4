"""Loaded when the kernel starts, the extension behaves as when loaded in a cell.

A kernel loads start-up extensions (``--ext`` in its argv, as the kernel spec
``shell_plus --notebook/--lab`` writes does, or ``extensions`` in
``ipython_config.py``) before its event loop runs, so Django's connection
handler (an asgiref ``Local``) keeps what start-up creates apart from what the
cells use.  Whatever way it was loaded:

- ``%dbstatus`` shows one row per real connection, and a repair is shown on
  the row of the connection repaired;
- what the extension said while starting up ("Django set up ...", the
  ``DJANGO_ALLOW_ASYNC_UNSAFE`` notice) is shown with the first cell's output,
  where a notebook shows it, not sent out before any cell exists.
"""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING

import pytest
from test_shells import Project, SpecKernel, Terminal, run_shell_plus_server

from conftest import terminate_backends, wait_until_disconnected
from harness import DEMO, Kernel

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

FIRST_CELL = "from shop.models import Order\nfrom django.db import connection"
EXEC_LINES_QUERY = (
    'c.InteractiveShellApp.exec_lines = ["from django.db import connection", '
    '"connection.ensure_connection()"]\n'
)


@pytest.fixture
def kernels() -> Iterator[list[Kernel]]:
    started: list[Kernel] = []
    yield started
    for kernel in started:
        kernel.close()


def start(way: str, project: Project, kernels: list[Kernel]) -> tuple[Kernel, list[str]]:
    """A kernel with the extension loaded ``way``; what its first cell showed."""
    config = project.profile / "ipython_config.py"
    if way == "shell_plus":
        env = project.env(**project.shell_plus_settings(["--ext", "ipy_dbreset"]))
        server = run_shell_plus_server(project, "--lab", env)
        kernel_env = {**env, "DJANGO_SETTINGS_MODULE": server["DJANGO_SETTINGS_MODULE"]}
        kernel: Kernel = SpecKernel(server["kernels"], "django_extensions", DEMO, kernel_env)
    else:
        if way.startswith("config"):
            project.ipython_config(extension=True)
            if way == "config, querying at start-up":
                config.write_text(config.read_text() + EXEC_LINES_QUERY)
        kernel = Kernel(
            cwd=DEMO,
            env=project.env(),
            extra_arguments=["--ext", "ipy_dbreset"] if way == "argv" else [],
        )
    kernels.append(kernel)
    if way == "load_ext":
        first = kernel.ok("%load_ext ipy_dbreset")
        kernel.ok(FIRST_CELL)
    else:
        first = kernel.ok(FIRST_CELL)
    loaded = kernel.ok("'dbstatus' in get_ipython().magics_manager.magics['line']")
    assert loaded.value() is True, f"ipy_dbreset was not loaded ({way})"
    return kernel, first.notices


def default_rows(kernel: Kernel) -> list[str]:
    """The ``default`` rows of ``%dbstatus`` (connections of the shell's own thread),
    each with the detail lines under it."""
    table = kernel.ok("%dbstatus").texts[-1]
    rows: list[str] = []
    for line in table.splitlines():
        if re.match(r"default\s{2}", line):
            rows.append(line)
        elif line.startswith("    ") and rows:
            rows[-1] += "\n" + line
    return rows


WAYS = ["load_ext", "argv", "config", "config, querying at start-up", "shell_plus"]


@pytest.mark.kernel
@pytest.mark.postgres
@pytest.mark.parametrize("way", WAYS)
def test_dbstatus_has_one_row_per_connection_and_the_repair_on_it(
    way: str, tmp_path: Path, postgres_url: str, postgres_db: str, kernels: list[Kernel]
) -> None:
    kernel, _ = start(way, Project(tmp_path, postgres_url), kernels)
    assert kernel.ok("Order.objects.count()").value() == 0
    rows = default_rows(kernel)
    assert len(rows) == 1, rows
    assert re.fullmatch(r"default\s+psycopg2?\s+\S+\s+\d+\s+idle", rows[0]), rows

    assert terminate_backends(postgres_db) >= 1
    wait_until_disconnected(postgres_db)
    repaired = kernel.ok("Order.objects.count()")
    closed = "closed db 'default': the server closed the connection; nothing was lost"
    assert any(closed in n for n in repaired.notices), repaired.notices
    rows = default_rows(kernel)
    assert len(rows) == 1, rows
    assert re.fullmatch(
        r"default\s+psycopg2?\s+\S+\s+\d+\s+idle\n"
        r"    last repair at \d\d:\d\d:\d\d, closed db 'default': the server closed .*",
        rows[0],
    ), rows
    assert kernel.failed == 0


@pytest.mark.kernel
@pytest.mark.postgres
@pytest.mark.parametrize("way", WAYS)
def test_start_up_notices_are_shown_with_the_first_cell(
    way: str, tmp_path: Path, postgres_url: str, kernels: list[Kernel]
) -> None:
    kernel, notices = start(way, Project(tmp_path, postgres_url), kernels)
    if way == "shell_plus":  # the server passes its DJANGO_SETTINGS_MODULE on
        setup = (
            "ipy_dbreset: Django set up with 'shell_plus_settings' (from DJANGO_SETTINGS_MODULE)"
        )
    else:  # a statement of what was done, not an order to the user
        setup = (
            f"ipy_dbreset: Django set up with 'demo.settings' (found in {DEMO / 'manage.py'}); "
            "DJANGO_SETTINGS_MODULE was set to it"
        )
    # One block for one start-up, a line for each thing done.
    assert len(notices) == 1, notices
    lines = notices[0].splitlines()
    assert setup in lines, lines
    assert any("DJANGO_ALLOW_ASYNC_UNSAFE" in n for n in lines), lines
    # Said once, in the first cell only.
    later = kernel.ok("1 + 1")
    assert later.notices == [], later.notices


def test_terminal_ipython_shows_start_up_notices_as_it_starts(tmp_path: Path, sqlite_url: str):
    project = Project(tmp_path, sqlite_url)
    project.ipython_config(extension=False)
    argv = [sys.executable, "-m", "IPython", "--no-banner", "--ext", "ipy_dbreset"]
    shell = Terminal(argv, DEMO, project.env())
    try:
        assert "ipy_dbreset: Django set up with 'demo.settings' (found in" in shell.banner
        assert shell.type("1 + 1").strip() == "Out[1]: 2"  # said once, at start-up
    finally:
        shell.close()
