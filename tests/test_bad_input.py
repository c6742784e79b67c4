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

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

from conftest import release_connections
from harness import run

if TYPE_CHECKING:
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
    from ipy_dbreset.magics import ResetResult

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
