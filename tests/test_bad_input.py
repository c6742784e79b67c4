"""Whatever is typed after ``%dbreset`` or ``%dbstatus``: success or one UsageError, nothing else.

A property test (hypothesis) over arbitrary argument text, in IPython's test
shell with the demo project on SQLite.  Before each example ``default`` holds
an open atomic block and ``other`` a manual transaction; after a UsageError,
both must be exactly as they were (same connection object, same transaction
state), and ``%dbstatus`` must leave them so whatever it is given.

The magics are called directly rather than through ``run_line_magic``: IPython
expands ``$name`` and ``{expression}`` in a magic's line before the magic sees
it, which would make arbitrary text run arbitrary code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

from conftest import release_connections
from harness import assert_loaded, clean_env, make_project, run, run_ipython, run_shell

if TYPE_CHECKING:
    from pathlib import Path

    from IPython.core.interactiveshell import InteractiveShell

ALIASES = ("default", "other")

# Pieces that reach the interesting corners of the parser: options, their
# spellings, quotes and escapes that do not split, aliases known and not.
TOKENS = st.sampled_from(
    [
        "-q",
        "--quiet",
        "--quiet=1",
        "-qq",
        "-",
        "--",
        "-x",
        "--nope",
        "-h",
        "--help",
        "'",
        '"',
        "\\",
        "'default other'",
        "default",
        "other",
        "nope",
        "DEFAULT",
        "default,other",
        "=",
        "\x00",
        "\n",
        "\t",
        "é",
    ]
)
ARGUMENTS = st.one_of(
    st.text(max_size=30),
    st.lists(st.one_of(TOKENS, st.text(max_size=6)), max_size=5).map(" ".join),
)
SETTINGS = settings(
    max_examples=120,
    database=None,  # no .hypothesis/ folder in the working tree
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def prepare() -> None:
    """``default`` in an open atomic block, ``other`` in a manual transaction."""
    from django.db import connections, transaction

    release_connections()
    transaction.atomic(using="default").__enter__()
    connections["default"].cursor().execute("select 1")
    connections["other"].set_autocommit(False)
    connections["other"].cursor().execute("select 1")


def snapshot() -> list[tuple[object, ...]]:
    from django.db import connections

    return [
        (
            wrapper,
            wrapper.connection,
            wrapper.in_atomic_block,
            len(wrapper.atomic_blocks),
            wrapper.needs_rollback,
            wrapper.autocommit,
            wrapper.get_autocommit() if wrapper.connection is not None else None,
        )
        for wrapper in (connections[alias] for alias in ALIASES)
    ]


def call(shell: InteractiveShell, magic: str, line: str) -> tuple[object, UsageError | None]:
    """Call the magic with ``line``; return its result or the UsageError it raised.

    Any other exception propagates and fails the test.
    """
    function = shell.find_line_magic(magic)
    assert function is not None
    with capture_output():
        try:
            return function(line), None
        except UsageError as error:
            return None, error


@SETTINGS
@given(line=ARGUMENTS)
def test_dbreset_arguments_succeed_or_are_a_usage_error(shell: InteractiveShell, line: str) -> None:
    from ipy_dbreset.output import ResetResult

    prepare()
    before = snapshot()
    result, error = call(shell, "dbreset", line)
    if error is None:
        assert isinstance(result, ResetResult)
    else:
        assert str(error).strip()
        assert snapshot() == before, f"%dbreset {line!r} refused its input but touched something"


@SETTINGS
@given(line=ARGUMENTS)
def test_dbstatus_arguments_succeed_or_are_a_usage_error_and_touch_nothing(
    shell: InteractiveShell, line: str
) -> None:
    from ipy_dbreset.display import Table

    prepare()
    before = snapshot()
    result, error = call(shell, "dbstatus", line)
    if error is None:
        assert isinstance(result, Table)
        assert str(result) and result._repr_html_()  # and it renders
    assert snapshot() == before, f"%dbstatus {line!r} touched a connection"


def test_the_shell_still_works_after_all_that(shell: InteractiveShell) -> None:
    prepare()
    for line in ("'", "-x", "nope", "\x00"):
        ran = run(shell, f"%dbreset {line}")
        assert isinstance(ran.exception, UsageError), ran.shown
        assert "Traceback" not in ran.shown
    assert run(shell, "%dbreset -q").ok
    after = run(shell, "Order.objects.count() >= 0")
    assert after.ok and after.result is True, after.shown


# -- bad configuration values -------------------------------------------------------

BAD_CONFIG = {
    "verbosity-not-a-number": (
        {"DBReset": {"verbosity": "x"}},
        [],
        "c.DBReset.verbosity = 'x' is not valid: expected 0, 1 or 2",
        "%config DBReset.verbosity = 1",
    ),
    "verbosity-out-of-range": (
        {"DBReset": {"verbosity": -1}},
        [],
        "c.DBReset.verbosity = -1 is not valid: expected 0, 1 or 2",
        "%config DBReset.verbosity = 2",
    ),
    "policy-unknown": (
        {"DBReset": {"aborted_manual_transactions": "foo"}},
        [],
        "c.DBReset.aborted_manual_transactions = 'foo' is not valid: "
        "expected 'rollback' or 'leave'",
        '%config DBReset.aborted_manual_transactions = "leave"',
    ),
    "idle-release-negative": (
        {"DBReset": {"idle_release": -1}},
        [],
        "c.DBReset.idle_release = -1 is not valid: expected a number of seconds, 0 or more",
        "%config DBReset.idle_release = 60",
    ),
    "config-magic-before-loading": (
        None,
        ['%config DBReset.verbosity = "x"'],
        "c.DBReset.verbosity = 'x' is not valid: expected 0, 1 or 2",
        "%config DBReset.verbosity = 1",
    ),
}


@pytest.mark.parametrize(
    ("config", "before", "message", "fix"), BAD_CONFIG.values(), ids=BAD_CONFIG.keys()
)
def test_bad_configuration_is_one_line_registers_nothing_and_can_be_fixed(
    tmp_path: Path, config: dict | None, before: list[str], message: str, fix: str
) -> None:
    project = make_project(tmp_path)
    session = run_shell(
        [*before, "%load_ext ipy_dbreset", fix, "%load_ext ipy_dbreset", "%dbstatus"],
        project / "notebooks",
        config=config,
        tmp_path=tmp_path,
    )
    refused, _, loaded, status = session.cells[len(before) :]
    assert refused.ename == "UsageError", refused.shown
    shown = refused.shown.strip()
    assert shown == (
        f"UsageError: ipy_dbreset: {message}; fix it in ipython_config.py or with %config, "
        "then %load_ext ipy_dbreset"
    )
    assert refused.state["magics"] == []
    assert refused.state["callbacks"] == {"pre_run_cell": 0, "post_run_cell": 0}
    assert refused.state["configurables"] == 0
    assert not refused.state["loaded"]
    assert refused.state["env"] == session.before["env"]  # Django was not even looked for
    assert_loaded(loaded)
    assert status.ok, status.shown


def test_bad_verbosity_after_loading_is_one_line_and_keeps_the_old_value(
    tmp_path: Path,
) -> None:
    project = make_project(tmp_path)
    verbosity = (
        "print('verbosity', *[c.verbosity for c in get_ipython().configurables "
        "if type(c).__name__ == 'DBReset'])"
    )
    session = run_shell(
        [
            "%load_ext ipy_dbreset",
            "%config DBReset.verbosity = 5",
            verbosity,
            "%config DBReset.verbosity = 2",
            verbosity,
        ],
        project / "notebooks",
        tmp_path=tmp_path,
    )
    assert_loaded(session[0])
    refused = session[1].shown.strip()  # %config reports it through logging.error
    assert len(refused.splitlines()) == 1, refused
    assert refused.endswith(
        "The 'verbosity' trait of a DBReset instance expected 0, 1 or 2, not the int 5."
    )
    assert session[2].stdout.strip() == "verbosity 1"
    assert session[4].stdout.strip() == "verbosity 2"


@pytest.mark.parametrize("how", ["--ext", "ipython_config.py"])
def test_bad_configuration_at_start_up_is_one_message_with_a_way_back(
    tmp_path: Path, how: str
) -> None:
    """`ipython --ext ipy_dbreset` or configured extensions with a bad value: no traceback."""
    project = make_project(tmp_path)
    ipython_dir = tmp_path / "ipython"
    profile = ipython_dir / "profile_default"
    profile.mkdir(parents=True)
    arguments = ["--DBReset.verbosity=x"]
    if how == "--ext":
        arguments += ["--ext", "ipy_dbreset"]
    else:
        (profile / "ipython_config.py").write_text(
            'c.InteractiveShellApp.extensions = ["ipy_dbreset"]\n'
            'c.DBReset.aborted_manual_transactions = "foo"\n'
        )
        arguments = []
    cells = (
        "print('callbacks', len(get_ipython().events.callbacks['pre_run_cell']))\n"
        "%config DBReset.verbosity = 1\n"
        '%config DBReset.aborted_manual_transactions = "leave"\n'
        "%reload_ext ipy_dbreset\n"
        "print('callbacks', len(get_ipython().events.callbacks['pre_run_cell']))\n"
        "%dbstatus\n"
    )
    done = run_ipython(
        arguments, cells, cwd=project / "notebooks", env=clean_env(IPYTHONDIR=str(ipython_dir))
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Traceback" not in output
    bad = (
        "c.DBReset.verbosity = 'x'"
        if how == "--ext"
        else "c.DBReset.aborted_manual_transactions = 'foo'"
    )
    expected = f"ipy_dbreset: {bad} is not valid: expected "
    lines = [line for line in output.splitlines() if line.startswith(expected)]
    assert len(lines) == 1, output
    assert lines[0].endswith("fix it with %config, then %reload_ext ipy_dbreset"), output
    assert "callbacks 0" in output  # nothing half-registered
    assert "callbacks 1" in output  # and the way back works
    assert "UsageError" not in output


@pytest.mark.parametrize("reraise", [False, True], ids=["default", "reraise"])
def test_start_up_failure_honours_reraise_ipython_extension_failures(
    tmp_path: Path, reraise: bool
) -> None:
    """No Django project at start-up: one message, or IPython's own failure if asked for."""
    nowhere = tmp_path / "nowhere"
    nowhere.mkdir()
    arguments = ["--ext", "ipy_dbreset"]
    if reraise:
        arguments.append("--InteractiveShellApp.reraise_ipython_extension_failures=True")
    done = run_ipython(
        arguments,
        "print('the shell ran')",
        cwd=nowhere,
        env=clean_env(IPYTHONDIR=str(tmp_path / "ipython")),
    )
    output = done.stdout + done.stderr
    said = [line for line in output.splitlines() if "no Django settings found" in line]
    if reraise:  # the user asked IPython to fail on it, with its traceback
        assert done.returncode != 0, output
        assert "the shell ran" not in done.stdout, output
        assert any(line.startswith("IPython.core.error.UsageError: ipy_dbreset:") for line in said)
    else:
        assert done.returncode == 0, output
        assert "the shell ran" in done.stdout, output
        assert "Traceback" not in output
        assert len(said) == 1, output
        assert said[0].startswith("ipy_dbreset: no Django settings found"), output
        assert "Once that is fixed: %reload_ext ipy_dbreset" in output
