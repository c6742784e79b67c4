"""Loading, reloading and unloading the extension in real IPython shells.

Loading is tested the three ways users do it (``%load_ext``, ``ipython --ext``,
``ipython_config.py``) in fresh ``ipython`` processes; the life cycle of one
shell (load twice, reload, unload) in IPython's test shell in this process.
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import TYPE_CHECKING

import pytest

from conftest import DRIVERS
from harness import DEMO, SHELL_DEFAULTS, clean_env, imports_notice, run, run_ipython, run_shell

if TYPE_CHECKING:
    from pathlib import Path

    from IPython.core.interactiveshell import InteractiveShell

# Prints what the extension registered, as the last line of output.
COUNTS = (
    "ip = get_ipython()\n"
    "ours = lambda cb: getattr(cb, '__qualname__', '').startswith('DBReset.')\n"
    "print('COUNTS', sum(map(ours, ip.events.callbacks['pre_run_cell'])),"
    " sum(map(ours, ip.events.callbacks['post_run_cell'])),"
    " sum(type(c).__name__ == 'DBReset' for c in ip.configurables),"
    " ip.find_line_magic('dbreset') is not None)\n"
)
ORM = "from shop.models import Order\nprint('ORDERS', Order.objects.count())\n"


def ipython(args: list[str], code: str, *, env: dict[str, str], tmp_path: Path) -> str:
    """Run ``ipython ARGS -c CODE`` in the demo project; return everything it printed."""
    (tmp_path / "ipython").mkdir(exist_ok=True)
    options = [f"--ipython-dir={tmp_path / 'ipython'}", "--HistoryManager.hist_file=:memory:"]
    done = run_ipython([*options, *args], code, cwd=DEMO, env=clean_env(**env))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Traceback" not in output and "Error" not in output, output
    return output


def demo_env(sqlite_url: str, tmp_path: Path) -> dict[str, str]:
    return {"IPY_DBRESET_DEMO_DB": sqlite_url, "IPY_DBRESET_DEMO_OTHER": str(tmp_path / "o.db")}


SETUP_NOTICE = "ipy_dbreset: Django set up with 'demo.settings'"


# -- three ways to load -----------------------------------------------------------


def test_load_ext_in_ipython(sqlite_url: str, tmp_path: Path) -> None:
    output = ipython(
        [],
        "%load_ext ipy_dbreset\n%load_ext ipy_dbreset\n" + ORM + COUNTS,
        env=demo_env(sqlite_url, tmp_path),
        tmp_path=tmp_path,
    )
    assert output.count(SETUP_NOTICE) == 1
    assert "ORDERS 0" in output
    assert "COUNTS 1 1 1 True" in output


def test_ipython_ext_option(sqlite_url: str, tmp_path: Path) -> None:
    output = ipython(
        ["--ext", "ipy_dbreset"],
        "%load_ext ipy_dbreset\n" + ORM + COUNTS,
        env=demo_env(sqlite_url, tmp_path),
        tmp_path=tmp_path,
    )
    assert output.count(SETUP_NOTICE) == 1
    assert "ORDERS 0" in output
    assert "COUNTS 1 1 1 True" in output


def test_extensions_in_ipython_config(sqlite_url: str, tmp_path: Path) -> None:
    profile = tmp_path / "ipython" / "profile_default"
    profile.mkdir(parents=True)
    (profile / "ipython_config.py").write_text(
        'c.InteractiveShellApp.extensions = ["ipy_dbreset"]\n'
        "c.DBReset.auto_repair = False\n"
        'c.DBReset.aborted_manual_transactions = "leave"\n'
    )
    magics = "get_ipython().find_line_magic('dbreset').__self__"
    output = ipython(
        [],
        ORM
        + COUNTS
        + f"print('OPTIONS', {magics}.auto_repair, {magics}.aborted_manual_transactions)",
        env=demo_env(sqlite_url, tmp_path),
        tmp_path=tmp_path,
    )
    assert output.count(SETUP_NOTICE) == 1
    assert "ORDERS 0" in output
    assert "COUNTS 1 1 1 True" in output
    assert "OPTIONS False leave" in output


# -- Django set up before the extension is loaded ---------------------------------


def configure_cell(db: str) -> str:
    """A cell that configures Django's settings by hand, as a script or shell_plus may."""
    return (
        "import django\n"
        "from django.conf import settings\n"
        "settings.configure(\n"
        "    DATABASES={'default': {\n"
        f"        'ENGINE': 'django.db.backends.sqlite3', 'NAME': {db!r}}}}},\n"
        "    INSTALLED_APPS=['django.contrib.contenttypes'],\n"
        ")\n"
    )


WHERE = (
    "from django.db import connection\n"
    "connection.ensure_connection()\n"
    "print('NAME', connection.settings_dict['NAME'])"
)


def test_django_already_set_up_is_used_as_is(tmp_path: Path) -> None:
    """As in ``manage.py shell``: the shell's own settings win over the manage.py nearby."""
    db = str(tmp_path / "configured.sqlite3")
    session = run_shell(
        [
            configure_cell(db) + "django.setup()",
            "%load_ext ipy_dbreset",
            WHERE,
            "%dbstatus",
        ],
        DEMO,  # a manage.py is right here, and must not be used
        tmp_path=tmp_path,
    )
    configure, load, where, status = session.cells
    assert configure.ok and load.ok, load.shown
    # Nothing to say of the set-up, done by the user; only the names of manage.py shell.
    # settings: the user's own, the same object.
    defaults = tuple(name for name in SHELL_DEFAULTS if name != "settings")
    assert re.fullmatch(imports_notice("ContentType", defaults=defaults), load.shown.strip())
    assert load.state["magics"] == ["dbreset", "dbstatus"]
    assert load.state["env"] == configure.state["env"] == {}
    assert load.state["path"] == configure.state["path"]
    assert where.stdout.strip() == f"NAME {db}"
    assert status.ok and "default" in status.shown


def test_settings_configured_but_not_set_up_is_finished(tmp_path: Path) -> None:
    db = str(tmp_path / "configured.sqlite3")
    session = run_shell(
        [configure_cell(db), "%load_ext ipy_dbreset", WHERE],
        DEMO,
        tmp_path=tmp_path,
    )
    configure, load, where = session.cells
    assert configure.ok and load.ok, load.shown
    assert load.state["magics"] == ["dbreset", "dbstatus"]
    assert load.state["env"] == {}
    assert where.stdout.strip() == f"NAME {db}"


def test_settings_from_the_environment_already_set_up(tmp_path: Path, sqlite_url: str) -> None:
    session = run_shell(
        [
            f"import sys; sys.path.insert(0, {str(DEMO)!r})\nimport django; django.setup()",
            "%load_ext ipy_dbreset",
            ORM,
        ],
        tmp_path,
        env={"DJANGO_SETTINGS_MODULE": "demo.settings", **demo_env(sqlite_url, tmp_path)},
        tmp_path=tmp_path,
    )
    setup, load, orm = session.cells
    assert setup.ok and load.ok, load.shown
    assert re.fullmatch(imports_notice("Order", "ContentType"), load.shown.strip())
    assert load.state["env"] == setup.state["env"] == {"DJANGO_SETTINGS_MODULE": "demo.settings"}
    assert "ORDERS 0" in orm.stdout


# -- the life cycle of one shell ----------------------------------------------------


def registered(shell: InteractiveShell) -> tuple[int, int, int, bool, bool]:
    """Callbacks (pre, post), configurables, and whether the magics answer."""

    def ours(callback: object) -> bool:
        return getattr(callback, "__qualname__", "").startswith("DBReset.")

    return (
        sum(map(ours, shell.events.callbacks["pre_run_cell"])),
        sum(map(ours, shell.events.callbacks["post_run_cell"])),
        sum(type(c).__name__ == "DBReset" for c in shell.configurables),
        shell.find_line_magic("dbreset") is not None,
        shell.find_line_magic("dbstatus") is not None,
    )


def receivers() -> int:
    from django.db.backends.signals import connection_created

    return len(connection_created.receivers)


def the_magics(shell: InteractiveShell) -> object:
    (magics,) = [c for c in shell.configurables if type(c).__name__ == "DBReset"]
    return magics


def test_loading_twice_registers_nothing_twice(bare_shell: InteractiveShell) -> None:
    import ipy_dbreset

    before = receivers()
    assert run(bare_shell, "%load_ext ipy_dbreset").ok
    assert run(bare_shell, "%load_ext ipy_dbreset").ok
    ipy_dbreset.load_ipython_extension(bare_shell)  # bypassing IPython's own bookkeeping
    assert registered(bare_shell) == (1, 1, 1, True, True)
    assert receivers() == before + 1
    assert bare_shell.find_line_magic("dbreset").__self__ is the_magics(bare_shell)


def test_reload_leaves_exactly_one_set(bare_shell: InteractiveShell) -> None:
    before = receivers()
    assert run(bare_shell, "%load_ext ipy_dbreset").ok
    assert run(bare_shell, "%config DBReset.verbosity = 0").ok
    first = the_magics(bare_shell)
    for _ in range(2):
        ran = run(bare_shell, "%reload_ext ipy_dbreset")
        assert ran.ok, ran.shown
    assert registered(bare_shell) == (1, 1, 1, True, True)
    assert receivers() == before + 1
    current = the_magics(bare_shell)
    assert current is not first
    assert bare_shell.find_line_magic("dbreset").__self__ is current
    assert bare_shell.find_line_magic("dbstatus").__self__ is current
    assert current.verbosity == 0  # what %config set survives the reload
    assert run(bare_shell, "%dbstatus").ok


def test_unload_removes_everything_and_loading_again_works(bare_shell: InteractiveShell) -> None:
    callbacks = {event: list(cbs) for event, cbs in bare_shell.events.callbacks.items()}
    configurables = list(bare_shell.configurables)
    before = receivers()
    assert run(bare_shell, "%load_ext ipy_dbreset").ok
    ran = run(bare_shell, "%unload_ext ipy_dbreset")
    assert ran.ok, ran.shown
    assert registered(bare_shell) == (0, 0, 0, False, False)
    assert {e: list(c) for e, c in bare_shell.events.callbacks.items()} == callbacks
    assert bare_shell.configurables == configurables
    assert "DBReset" not in bare_shell.magics_manager.registry
    assert receivers() == before
    for magic in ("%dbreset", "%dbstatus", "%config DBReset"):
        gone = run(bare_shell, magic)
        assert gone.exception is not None or "not found" in gone.shown, (magic, gone.shown)
    assert run(bare_shell, "%load_ext ipy_dbreset").ok
    assert registered(bare_shell) == (1, 1, 1, True, True)


def run_in_event_loop(shell: InteractiveShell, code: str = "%load_ext ipy_dbreset") -> None:
    """Run a cell as a Jupyter kernel does: inside a running event loop."""

    async def cell() -> None:
        result = await shell.run_cell_async(code, transformed_cell=shell.transform_cell(code))
        assert result.success, result

    asyncio.run(cell())


def test_async_unsafe_set_in_an_event_loop_and_removed_on_unload(
    bare_shell: InteractiveShell, monkeypatch: pytest.MonkeyPatch
) -> None:
    from IPython.utils.capture import capture_output

    monkeypatch.delenv("DJANGO_ALLOW_ASYNC_UNSAFE", raising=False)
    with capture_output() as shown:
        run_in_event_loop(bare_shell)
    assert os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE") == "true"
    said = [o.data["text/plain"] for o in shown.outputs]
    assert any("DJANGO_ALLOW_ASYNC_UNSAFE" in s and "allow_async_unsafe" in s for s in said), said
    assert run(bare_shell, "%unload_ext ipy_dbreset").ok
    assert "DJANGO_ALLOW_ASYNC_UNSAFE" not in os.environ


def test_async_unsafe_of_the_user_is_left_alone(
    bare_shell: InteractiveShell, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "yes")
    run_in_event_loop(bare_shell)
    assert run(bare_shell, "%unload_ext ipy_dbreset").ok
    assert os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] == "yes"


def test_async_unsafe_opt_out(
    bare_shell: InteractiveShell, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DJANGO_ALLOW_ASYNC_UNSAFE", raising=False)
    bare_shell.config.DBReset.allow_async_unsafe = False
    run_in_event_loop(bare_shell)
    assert "DJANGO_ALLOW_ASYNC_UNSAFE" not in os.environ
    # Opting in later sets it; opting out again takes it back.
    run_in_event_loop(bare_shell, "%config DBReset.allow_async_unsafe = True")
    assert os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE") == "true"
    run_in_event_loop(bare_shell, "%config DBReset.allow_async_unsafe = False")
    assert "DJANGO_ALLOW_ASYNC_UNSAFE" not in os.environ


@pytest.mark.kernel
@pytest.mark.postgres
def test_unload_in_a_kernel_says_what_it_undid(start_kernel, postgres_url) -> None:
    kernel = start_kernel(postgres_url, "psycopg2")
    kernel.ok("%config DBReset.interruptible_psycopg2 = True")
    unloaded = kernel.ok("%unload_ext ipy_dbreset")
    assert len(unloaded.notices) == 1, unloaded.shown
    said = unloaded.notices[0]
    assert said.startswith("ipy_dbreset: unloaded; DJANGO_ALLOW_ASYNC_UNSAFE removed"), said
    assert "SynchronousOnlyOperation" in said and "wait callback" in said, said
    # ... which is what the next ORM call meets.
    assert kernel.run("Order.objects.count()").ename == "SynchronousOnlyOperation"
    # Loading again puts it back, and unloading says so once more.
    kernel.ok("%load_ext ipy_dbreset")
    assert kernel.ok("Order.objects.count()").value() == 0
    assert "DJANGO_ALLOW_ASYNC_UNSAFE" in kernel.ok("%unload_ext ipy_dbreset").notices[0]


def test_unload_in_a_terminal_says_nothing(sqlite_url: str, tmp_path: Path) -> None:
    output = ipython(
        [],
        "%load_ext ipy_dbreset\n%unload_ext ipy_dbreset\nprint('DONE')",
        env=demo_env(sqlite_url, tmp_path),
        tmp_path=tmp_path,
    )
    assert "unloaded" not in output and "DONE" in output, output


# -- a lean start-up -------------------------------------------------------------

DRIVERS_LOADED = "import sys\nprint('DRIVERS', 'psycopg2' in sys.modules, 'psycopg' in sys.modules)"


@pytest.mark.skipif("psycopg" not in DRIVERS, reason="psycopg 3 is not installed")
def test_psycopg3_project_never_imports_psycopg2(postgres_url: str, tmp_path: Path) -> None:
    """psycopg2, installed alongside, stays unimported: nothing in the session needs it."""
    session = run_shell(
        [
            "%load_ext ipy_dbreset",
            "from shop.models import Order\nfrom django.db import connection",
            "Order.objects.count()",
            "print(type(connection.connection).__module__.split('.')[0])",
            "1 / 0",  # a failed cell: every connection is judged in full
            DRIVERS_LOADED,
        ],
        DEMO,
        env=demo_env(postgres_url, tmp_path),
        tmp_path=tmp_path,
    )
    assert [c.ename for c in session.cells] == [None, None, None, None, "ZeroDivisionError", None]
    assert session[3].stdout.strip() == "psycopg"
    assert "DRIVERS False True" in session[5].stdout


def test_sqlite_project_imports_no_postgres_driver(sqlite_url: str, tmp_path: Path) -> None:
    session = run_shell(
        ["%load_ext ipy_dbreset", ORM, "1 / 0", DRIVERS_LOADED],
        DEMO,
        env=demo_env(sqlite_url, tmp_path),
        tmp_path=tmp_path,
    )
    assert "ORDERS 0" in session[1].stdout
    assert "DRIVERS False False" in session[3].stdout
