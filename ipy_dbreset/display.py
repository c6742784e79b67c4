"""Rendering notices and connection status, as plain text and as HTML for notebooks.

A notice is one line per thing done, verb first::

    ipy_dbreset: rolled back db 'default': a failed statement aborted the transaction; ...

``%dbstatus`` is a table whose rows hold the essentials (about 100 columns in
a terminal); what is long (the last repair, why an idle connection is kept
open, keepalive settings that differ) goes on a detail line under its row, or
once under the table when every connection shares it.  Nothing here knows IPython or
touches a connection: the functions work on plain data (repairs, statuses).
"""

from __future__ import annotations

import html
import logging
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from datetime import datetime, tzinfo

    from ipy_dbreset.checkup import Outcome, Status, Switched
    from ipy_dbreset.names import Imported
    from ipy_dbreset.records import Failure, Repair, StillOpen

PREFIX = "ipy_dbreset"

# JupyterLab's theme variables (light and dark), with fallbacks for other front ends.
_STYLE = (
    "font-family:var(--jp-code-font-family,monospace);font-size:0.9em;line-height:1.5;"
    "color:var(--jp-content-font-color1,inherit);"
    "padding:2px 8px;margin:6px 0 2px 0;border-left:3px solid {color};background:{background};"
)
# A notice's kind says what happened, and sets its colour and its log level alike:
# "info", nothing was lost; "lost", work was discarded (or can no longer be
# committed); "error", a repair failed and the connection may still be broken.
# The tints are translucent, so they read on a light and a dark theme.
_KINDS = {
    "info": ("var(--jp-info-color1,#1f77b4)", "rgba(31,119,180,0.10)"),
    "lost": ("var(--jp-warn-color1,#d08700)", "rgba(208,135,0,0.14)"),
    "error": ("var(--jp-error-color1,#c0392b)", "rgba(192,57,43,0.14)"),
}
LEVELS = {"info": logging.INFO, "lost": logging.WARNING, "error": logging.ERROR}
"""The log level of each kind of notice line."""


class Notice:
    """What was done, for the user: one line per thing, in both worlds.

    A plain class, not a named tuple: IPython's text formatter would show a
    tuple's fields instead of the notice.
    """

    __slots__ = ("kind", "kinds", "text", "width")

    def __init__(self, text: str, kind: str = "info", *, kinds: Sequence[str] = ()) -> None:
        self.text = text  # one line per thing done or found
        # Each line's kind ("info", "lost", "error"; see _KINDS): its log level.
        self.kinds = list(kinds) or [kind] * len(self.lines)
        # The most serious of them: the colour the notice is shown in.
        self.kind = max(self.kinds, key=lambda k: LEVELS.get(k, logging.INFO), default=kind)
        # The terminal's columns, which the text wraps to (None: a line per line,
        # for a front end that wraps it itself); the shell's side sets it.
        self.width: int | None = None

    def __repr__(self) -> str:
        return f"Notice({self.text!r}, kinds={self.kinds!r})"

    @property
    def lines(self) -> list[str]:
        return self.text.splitlines() or [""]

    @classmethod
    def of(cls, lines: Iterable[tuple[str, str]]) -> Notice:
        """A notice of (kind, line) pairs, one line each."""
        pairs = list(lines)
        return cls("\n".join(line for _, line in pairs), kinds=[kind for kind, _ in pairs])

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """(kind, line) for each line."""
        kinds = self.kinds + [self.kind] * (len(self.lines) - len(self.kinds))
        return list(zip(kinds, self.lines, strict=False))

    def __add__(self, other: Notice) -> Notice:
        """Both notices as one block, each line keeping its kind."""
        return Notice.of([*self.pairs, *other.pairs])

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, str]:
        return {"text/plain": str(self), "text/html": self.html()}

    def html(self) -> str:
        color, background = _KINDS.get(self.kind, _KINDS["info"])
        style = _STYLE.format(color=color, background=background)
        first, *more = (breakable(line) for line in self.lines)
        # A hanging indent: a line that wraps is told from the next line.
        hang = "padding-left:1.5em;text-indent:-1.5em"
        rest = "".join(f'<div style="{hang}">{line}</div>' for line in more)
        return (
            f'<div class="ipy-dbreset-notice" style="{style}">'
            f'<div style="{hang}"><b>{PREFIX}</b>: {first}</div>{rest}</div>'
        )

    def __str__(self) -> str:
        # Wrapped, a line hangs under its text: a new line starts with the prefix.
        start = f"{PREFIX}: "
        hang = " " * len(start)
        return "\n".join(
            part for line in self.lines for part in _hung(line, start, hang, self.width)
        )


# -- fitting a width --------------------------------------------------------------

# Where a word may break besides its spaces: before a dot that starts a name's
# next part (a host's ``.eu-west-1``, a file's ``.sqlite3``), after a slash,
# before a port (``:5432``); never in a number or a time (``11:43:34``).
_INSIDE = re.compile(r"(?<=\w)(?=\.[^\W\d_])|(?<=/)(?=.)|(?<=[^\W\d_])(?=:\d)")


def _words(text: str) -> list[list[str]]:
    """``text``'s words, each as the parts it may break into.

    A number keeps the word after it, and a bare number the word before it
    unless a comma or colon ends that one: ``open 12 s``, but ``block:`` |
    ``2 writes``.
    """
    words: list[str] = []
    for word in text.split():
        if words and (words[-1][-1].isdigit() or (word.isdigit() and words[-1][-1].isalpha())):
            words[-1] += f" {word}"
        else:
            words.append(word)
    return [_INSIDE.split(word) for word in words]


def fill(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` characters, broken between words.

    A word longer than a line breaks where :func:`_words` allows (a host
    name at its dots), and one that cannot break stays whole: never cut
    mid-word.
    """
    lines, line = [], ""
    for parts in _words(text):
        word = "".join(parts)
        if line and len(line) + 1 + len(word) <= width:
            line += f" {word}"
            continue
        if line:
            lines.append(line)
            line = ""
        for part in parts:  # on a line of its own: broken only if longer than the line
            if line and len(line) + len(part) > width:
                lines.append(line)
                line = ""
            line += part
    return [*lines, line]


def _narrowest(text: str) -> int:
    """The width under which :func:`fill` cannot keep ``text`` in its lines."""
    return max((len(part) for parts in _words(text) for part in parts), default=0)


def _part(part: str) -> str:
    # A browser breaks after a hyphen too (``eu-`` | ``west-1``); the text itself
    # stays as it is, for a copy and paste.
    if " " in part or "-" in part:
        return f'<span style="white-space:nowrap">{html.escape(part)}</span>'
    return html.escape(part)


def breakable(text: str) -> str:
    """``text`` as HTML that wraps where :func:`fill` would break it, and only there."""
    return " ".join("<wbr>".join(_part(part) for part in parts) for parts in _words(text))


# -- what was done ---------------------------------------------------------------


def where(alias: str, thread: str | None = None) -> str:
    """``db 'default'``, or ``db 'default' (thread worker_0)`` for another thread's."""
    return f"db {alias!r}" if thread is None else f"db {alias!r} (thread {thread})"


def failure_line(failure: Failure) -> str:
    """``db 'default': <the database's error>``, for a repair or reset that failed."""
    return f"{where(failure.alias, failure.thread)}: {failure.error}"


def still_open_line(still: StillOpen) -> str:
    """``still open after 10 min: a manual transaction with 2 writes (...) on db 'default'; ...``.

    Said once, as a cell starts, of a transaction open longer than ``long_transaction``.
    """
    from ipy_dbreset.ledger import duration

    return (
        f"still open after {duration(still.seconds)}: {still.what} on {where(still.alias)}; "
        "it holds its locks until it ends"
    )


def _why(repair: Repair) -> str:
    """``<why>; lost 2 unsaved writes (...); <what next>``, each part only if there is one."""
    n = repair.dropped_on_commit
    dropped = f"{n} on_commit callback{'' if n == 1 else 's'} dropped" if n else None
    sids = repair.gone_savepoints
    gone = (
        f"your savepoint{'' if len(sids) == 1 else 's'} {', '.join(map(repr, sids))} went with it"
        if sids
        else None
    )
    parts = (repair.reason, repair.lost, dropped, gone, repair.hint)
    return "; ".join(part for part in parts if part)


def repair_line(repair: Repair) -> str:
    """``rolled back db 'default': <why>; lost 2 unsaved writes (...); <what next>``."""
    text = f"{repair.action} {where(repair.alias, repair.thread)}"
    said = _why(repair)
    return f"{text}: {said}" if said else text


def kind_of(repair: Repair) -> str:
    """``"lost"`` if the repair discarded work or found it lost, ``"info"`` if nothing was.

    What a repair lost is worded by the ledger, verb first (``lost 2 unsaved
    writes``); a transaction left aborted (``did not roll back``) cannot be
    committed any more either.  A reset rolls back what the user asked to.
    """
    lost = repair.lost or ""
    if (
        lost.startswith(("lost", "it rolled back", "whether"))
        or repair.dropped_on_commit
        or repair.gone_savepoints
    ):
        return "lost"
    return "lost" if repair.action == "did not roll back" else "info"


def repair_notice(repairs: Sequence[Repair]) -> Notice:
    """One line per repair of a check."""
    return Notice.of((kind_of(r), repair_line(r)) for r in repairs)


def threads(connections: Iterable[tuple[str, str | None]]) -> str:
    """``db 'default' (thread worker_0), db 'other' (thread worker_0)``."""
    return ", ".join(where(alias, thread) for alias, thread in connections)


def failure_notice(outcome: Outcome) -> Notice:
    """What a check repaired and which repairs failed, one line each."""
    lines = [(kind_of(r), repair_line(r)) for r in outcome.repairs]
    lines += [
        ("error", f"could not repair {failure_line(f)}; run %dbreset") for f in outcome.failures
    ]
    return Notice.of(lines)


def skipped_notice(outcome: Outcome) -> Notice:
    return Notice(f"not checked, in use by their thread: {threads(outcome.skipped)}", "info")


def reset_notice(outcome: Outcome, aliases: Sequence[str] | None) -> Notice:
    """What ``%dbreset`` did, left alone and could not do, one line each."""
    # What a reset rolls back is what the user asked it to: nothing is lost unawares.
    lines = [("info", repair_line(r)) for r in outcome.repairs]
    lines += [("error", f"could not reset {failure_line(f)}") for f in outcome.failures]
    if outcome.skipped:
        lines.append(("info", f"left, in use by their thread: {threads(outcome.skipped)}"))
    if lines:
        return Notice.of(lines)
    which = ", ".join(aliases) if aliases else "any alias"
    return Notice(f"nothing to reset: no open connection for {which}", "info")


# -- times -------------------------------------------------------------------------


def _machine_zone() -> tzinfo | None:
    """The machine's time zone.

    Not the process's: Django sets ``TZ`` to its ``TIME_ZONE`` when its
    settings load (on systems with ``time.tzset``), and the user reads a
    clock on the wall, not the project's settings.
    """
    from zoneinfo import ZoneInfo

    try:
        with open("/etc/localtime", "rb") as zone_file:
            return ZoneInfo.from_file(zone_file)
    except (OSError, ValueError):
        return None  # no zone file (Windows, where Django leaves TZ alone): the process's


def clock(when: datetime) -> str:
    """``HH:MM:SS`` in the machine's local time."""
    if when.tzinfo is None:
        return f"{when:%H:%M:%S}"
    zone = _machine_zone()
    return f"{(when.astimezone(zone) if zone is not None else when.astimezone()):%H:%M:%S}"


# -- %dbstatus -----------------------------------------------------------------------


def _state(status: Status) -> str:
    """``in an atomic block: 2 writes, open 12 s``; ``idle; autocommit off``."""
    snap = status.snapshot
    text = snap.transaction
    if snap.autocommit is False and text == "in a transaction":
        text = "manual transaction"  # what autocommit off outside atomic blocks opens
    elif snap.autocommit is False and "atomic block" not in text:  # (always off in one)
        text += "; autocommit off"
    if snap.holds:
        text += f": {snap.holds}"
    return text


def _last(repair: Repair) -> str:
    # One colon only, the line's own: "last repair 10:01:31: rolled back" stumbles.
    return f"last repair at {clock(repair.when)}, {repair_line(repair)}"


def status_table(statuses: Sequence[Status]) -> Table:
    """``%dbstatus``: a row of essentials per connection, the long things under it.

    The thread column appears only when another thread's connection is listed,
    the server pid only when a connection has one (SQLite has none);
    keepalive settings that every connection shares are said once, under the
    table; those that differ go under their row.
    """
    keepalives = {s.keepalive.describe() for s in statuses if s.keepalive is not None}
    shared = len(keepalives) == 1 and all(
        s.keepalive is not None for s in statuses if s.snapshot.connected
    )
    with_thread = any(s.thread for s in statuses)
    with_pid = any(s.snapshot.server_id is not None for s in statuses)  # none for SQLite
    columns = ["alias", *(["thread"] if with_thread else []), "driver", "database"]
    columns += [*(["server pid"] if with_pid else []), "state"]
    rows, details = [], []
    for status in statuses:
        snap = status.snapshot
        row = [snap.alias, *([status.thread or ""] if with_thread else []), snap.driver]
        row.append(snap.database)
        if with_pid:
            row.append("" if snap.server_id is None else str(snap.server_id))
        rows.append([*row, _state(status)])
        detail = []
        if status.kept is not None:
            detail.append(f"kept open despite idle_release: {status.kept}")
        if status.keepalive is not None and not shared:
            detail.append(f"keepalive {status.keepalive.describe()}")
        if status.last is not None:
            detail.append(_last(status.last))
        details.append(detail)
    notes = [f"every connection's keepalive: {keepalives.pop()}"] if shared else []
    return Table(columns, rows, "no database connection in use", details=details, notes=notes)


def history_table(repairs: Sequence[Repair]) -> Table:
    """``%dbstatus --history``: the session's repairs, newest first, with what was lost.

    A row says when, on which connection, what was done; the line under it
    why, and what was lost or kept.
    """
    rows, details = [], []
    for repair in reversed(repairs):
        done = repair.action.removesuffix(" on")  # "rolled back the inner atomic block on"
        # The alias alone: "db 'default'" on every row says nothing the column does not.
        alias = repair.alias if repair.thread is None else f"{repair.alias} ({repair.thread})"
        rows.append([clock(repair.when), alias, done])
        said = _why(repair)
        details.append([said] if said else [])
    columns = ["time", "alias", "done"]
    return Table(columns, rows, "no repair in this session yet", details=details)


# -- tables --------------------------------------------------------------------------

# Cells wrap between words and where breakable() lets a long name break, so that
# a table fits a notebook beside its file browser (about 550 px); the detail
# rows span every column, so that no column is squeezed by them.
_TABLE = "margin:0;table-layout:auto;border-collapse:collapse;"
_CELL = (
    "text-align:left;vertical-align:top;padding:2px 10px 2px 0;"
    "white-space:normal;overflow-wrap:break-word;"
)
# A connection's row and its detail row are one group: JupyterLab's stripes,
# row by row, would pair a detail with the next connection; a rule between
# groups instead.
_ROW = "background:transparent;"
_HANG = "padding-left:1.5em;text-indent:-1.5em;"  # a detail line that wraps hangs
_FIRST = "border-top:1px solid var(--jp-border-color2,#e0e0e0);"
_DETAIL = (
    "text-align:left;padding:0 10px 4px 1.5em;font-size:0.9em;"
    "color:var(--jp-content-font-color2,#666);white-space:normal;overflow-wrap:break-word;"
)


def _shrunk(columns: Sequence[Sequence[str]], room: int) -> list[int]:
    """Widths for ``columns`` (each a column's cells) that fit ``room``, if they can.

    The widest column narrows first, each time to what its cells, filled
    one character narrower, really take; none below its longest word.
    """
    widths = [max(len(cell) for cell in cells) for cells in columns]
    floors = [max(_narrowest(cell) for cell in cells) for cells in columns]
    while sum(widths) > room:
        widest = max(range(len(widths)), key=lambda i: (widths[i] > floors[i], widths[i]))
        if widths[widest] <= floors[widest]:
            break  # as narrow as the columns go: the terminal wraps what is left
        narrower = widths[widest] - 1
        widths[widest] = max(len(line) for cell in columns[widest] for line in fill(cell, narrower))
    return widths


def _hung(text: str, indent: str, hang: str, width: int | None) -> list[str]:
    """``text`` after ``indent``, wrapped to ``width`` with its further lines after ``hang``."""
    if width is None:
        return [indent + text]
    lines = fill(text, max(width - len(hang), 1))
    return [indent + lines[0], *(hang + line for line in lines[1:])]


class Table:
    """A small table shown as aligned text in a terminal and as HTML in a notebook.

    A row may carry detail lines: under the row in a terminal, in a row
    spanning every column in a notebook, so that no column is squeezed.
    """

    def __init__(
        self,
        columns: Sequence[str],
        rows: Sequence[Sequence[str]],
        empty: str,
        *,
        details: Sequence[Sequence[str]] | None = None,
        notes: Sequence[str] = (),
    ) -> None:
        self.columns = list(columns)
        self.rows = [list(row) for row in rows]  # of strings, one per column
        self.details = [list(d) for d in details] if details else [[] for _ in self.rows]
        """Lines under each row (the long things: last repair, why kept open)."""
        self.notes = list(notes)
        """Lines under the table, for what every row shares."""
        self.empty = empty  # said instead of a table without rows
        # The terminal's columns, which cells and lines wrap to (None: each
        # row on one line); the shell's side sets it.
        self.width: int | None = None

    def __str__(self) -> str:
        width = self.width
        if not self.rows:
            notice = Notice(self.empty, "info")
            notice.width = width
            return str(notice)
        table = [self.columns, *self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(self.columns))]
        if width is not None:
            columns = [[row[i] for row in table] for i in range(len(widths))]
            widths = _shrunk(columns, width - 2 * (len(widths) - 1))

        def lines(values: Sequence[str]) -> list[str]:
            """A row as the lines its wrapped cells take, side by side."""
            cells = [
                [v] if width is None else fill(v, w) for v, w in zip(values, widths, strict=False)
            ]
            return [
                "  ".join(
                    (cell[n] if n < len(cell) else "").ljust(w)
                    for cell, w in zip(cells, widths, strict=False)
                ).rstrip()
                for n in range(max(len(cell) for cell in cells))
            ]

        text = [*lines(self.columns), "  ".join("-" * w for w in widths)]
        for row, detail in zip(self.rows, self.details, strict=False):
            text += lines(row)
            text += [line for d in detail for line in _hung(d, "    ", "      ", width)]
        text += [line for n in self.notes for line in _hung(n, "", "  ", width)]
        return "\n".join(text)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))

    def _repr_html_(self) -> str:
        if not self.rows:
            return Notice(self.empty, "info").html()
        head = "".join(f"<th style='{_CELL}'>{breakable(c)}</th>" for c in self.columns)
        body = []
        for n, (row, detail) in enumerate(zip(self.rows, self.details, strict=False)):
            cell = _CELL + (_FIRST if n else "")
            cells = "".join(f"<td style='{cell}'>{breakable(v)}</td>" for v in row)
            body.append(f"<tr style='{_ROW}'>{cells}</tr>")
            if detail:
                lines = "".join(f"<div style='{_HANG}'>{breakable(d)}</div>" for d in detail)
                body.append(
                    f"<tr class='ipy-dbreset-detail' style='{_ROW}'>"
                    f"<td colspan='{len(self.columns)}' style='{_DETAIL}'>{lines}</td></tr>"
                )
        notes = "".join(
            f"<div style='{_DETAIL}padding-left:0'>{breakable(n)}</div>" for n in self.notes
        )
        return (
            f'<div class="ipy-dbreset-status"><table style="{_TABLE}">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{notes}</div>"
        )


_NAMES_SHOWN = 8


def imports_line(imported: Imported) -> str | None:
    """``imported 6 names as manage.py shell does: Order, ...; kept your own User``.

    ``None`` when nothing was added or kept back: the shell had them all.
    """
    added, skipped = list(imported.added), imported.skipped
    if not added and not skipped:
        return None
    shown = ", ".join(added[:_NAMES_SHOWN])
    if len(added) > _NAMES_SHOWN:
        shown += f" and {len(added) - _NAMES_SHOWN} more"
    how = "the installed models" if imported.source == "models" else "as manage.py shell does"
    text = f"imported {_count(len(added), 'name')} ({how})"
    if added:
        text += f": {shown}"
    if skipped:
        text += f"; kept your own {', '.join(skipped)}"
    return text


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


_READ_ONLY_OFF = "%config DBReset.read_only = False"
READ_ONLY_NOTE = f"read-only mode: every connection refuses writes ({_READ_ONLY_OFF} to stop)"


def read_only_line(switched: Switched | None) -> str:
    """What read-only mode did; ``None``: the server refused a write because of it."""
    if switched is None:
        return f"read-only mode refused this write; {_READ_ONLY_OFF} allows writes again"
    if not switched.on:
        text = "read-only mode off: writes are allowed from each connection's next transaction"
    else:
        text = f"read-only mode on: every connection refuses writes ({_READ_ONLY_OFF} to stop)"
    if switched.busy:
        text += f"; not yet on {threads(switched.busy)}, in use by their threads"
    return text
