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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from datetime import datetime, tzinfo

    from ipy_dbreset.checkup import Outcome, Status
    from ipy_dbreset.repair import Repair

PREFIX = "ipy_dbreset"

# JupyterLab's theme variables (light and dark), with fallbacks for other front ends.
_STYLE = (
    "font-family:var(--jp-code-font-family,monospace);font-size:0.9em;line-height:1.5;"
    "color:var(--jp-content-font-color1,inherit);"
    "padding:2px 8px;margin:6px 0 2px 0;border-left:3px solid {color};background:{background};"
)
_KINDS = {
    "repair": ("var(--jp-warn-color1,#d08700)", "rgba(208,135,0,0.10)"),
    "info": ("var(--jp-info-color1,#1f77b4)", "rgba(31,119,180,0.08)"),
    "error": ("var(--jp-error-color1,#c0392b)", "rgba(192,57,43,0.10)"),
}


class Notice:
    """What was done, for the user: one line per thing, in both worlds.

    A plain class, not a named tuple: IPython's text formatter would show a
    tuple's fields instead of the notice.
    """

    __slots__ = ("kind", "text")

    def __init__(self, text: str, kind: str = "repair") -> None:
        self.text = text  # one line per thing done or found
        self.kind = kind  # "repair", "info" or "error": the colour it is shown in

    def __repr__(self) -> str:
        return f"Notice({self.text!r}, {self.kind!r})"

    @property
    def lines(self) -> list[str]:
        return self.text.splitlines() or [""]

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, str]:
        return {"text/plain": str(self), "text/html": self.html()}

    def html(self) -> str:
        color, background = _KINDS.get(self.kind, _KINDS["info"])
        style = _STYLE.format(color=color, background=background)
        first, *more = (html.escape(line) for line in self.lines)
        # A hanging indent: a line that wraps is told from the next line.
        hang = "padding-left:1.5em;text-indent:-1.5em"
        rest = "".join(f'<div style="{hang}">{line}</div>' for line in more)
        return (
            f'<div class="ipy-dbreset-notice" style="{style}">'
            f'<div style="{hang}"><b>{PREFIX}</b>: {first}</div>{rest}</div>'
        )

    def __str__(self) -> str:
        return "\n".join(f"{PREFIX}: {line}" for line in self.lines)


# -- what was done ---------------------------------------------------------------


def where(alias: str, thread: str | None = None) -> str:
    """``db 'default'``, or ``db 'default' (thread worker_0)`` for another thread's."""
    return f"db {alias!r}" if thread is None else f"db {alias!r} (thread {thread})"


def _why(repair: Repair) -> str:
    """``<why>; lost 2 unsaved writes (...); <what next>``, each part only if there is one."""
    return "; ".join(part for part in (repair.reason, repair.lost, repair.hint) if part)


def repair_line(repair: Repair) -> str:
    """``rolled back db 'default': <why>; lost 2 unsaved writes (...); <what next>``."""
    text = f"{repair.action} {where(repair.alias, repair.thread)}"
    said = _why(repair)
    return f"{text}: {said}" if said else text


def repair_notice(repairs: Sequence[Repair]) -> Notice:
    """One line per repair of a check."""
    return Notice("\n".join(repair_line(r) for r in repairs))


def threads(connections: Iterable[tuple[str, str | None]]) -> str:
    """``db 'default' (thread worker_0), db 'other' (thread worker_0)``."""
    return ", ".join(where(alias, thread) for alias, thread in connections)


def failure_notice(outcome: Outcome) -> Notice:
    """What a check repaired and which repairs failed, one line each."""
    lines = [repair_line(r) for r in outcome.repairs]
    lines += [f"could not repair {f.describe()}; run %dbreset" for f in outcome.failures]
    return Notice("\n".join(lines), "error")


def skipped_notice(outcome: Outcome) -> Notice:
    return Notice(f"not checked, in use by their thread: {threads(outcome.skipped)}", "info")


def reset_notice(outcome: Outcome, aliases: Sequence[str] | None) -> Notice:
    """What ``%dbreset`` did, left alone and could not do, one line each."""
    lines = [repair_line(r) for r in outcome.repairs]
    lines += [f"could not reset {f.describe()}" for f in outcome.failures]
    if outcome.skipped:
        lines.append(f"left, in use by their thread: {threads(outcome.skipped)}")
    if outcome.failures:
        return Notice("\n".join(lines), "error")
    if outcome.repairs:
        return Notice("\n".join(lines))
    if outcome.skipped:
        return Notice("\n".join(lines), "info")
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
    return f"last repair {clock(repair.when)}: {repair_line(repair)}"


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
        rows.append([clock(repair.when), where(repair.alias, repair.thread), done])
        said = _why(repair)
        details.append([said] if said else [])
    columns = ["time", "connection", "done"]
    return Table(columns, rows, "no repair in this session yet", details=details)


# -- tables --------------------------------------------------------------------------

# Row cells stay on one line (the long things are in the detail rows); JupyterLab
# lays tables out fixed, which squeezes a column to a sliver: not this one.
_TABLE = "margin:0;table-layout:auto;"
_CELL = "text-align:left;vertical-align:top;padding:2px 12px 2px 0;white-space:nowrap;"
_DETAIL = (
    "text-align:left;padding:0 10px 4px 1.5em;font-size:0.9em;"
    "color:var(--jp-content-font-color2,#666);white-space:normal;"
)


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

    def __str__(self) -> str:
        if not self.rows:
            return f"{PREFIX}: {self.empty}"
        widths = [
            max(len(str(c)), *(len(row[i]) for row in self.rows))
            for i, c in enumerate(self.columns)
        ]

        def line(values: Sequence[str]) -> str:
            return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=False)).rstrip()

        lines = [line(self.columns), "  ".join("-" * w for w in widths)]
        for row, detail in zip(self.rows, self.details, strict=False):
            lines.append(line(row))
            lines += [f"    {d}" for d in detail]
        lines += self.notes
        return "\n".join(lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))

    def _repr_html_(self) -> str:
        if not self.rows:
            return Notice(self.empty, "info").html()
        head = "".join(f"<th style='{_CELL}'>{html.escape(c)}</th>" for c in self.columns)
        body = []
        for row, detail in zip(self.rows, self.details, strict=False):
            body.append(
                "<tr>"
                + "".join(f"<td style='{_CELL}'>{html.escape(v)}</td>" for v in row)
                + "</tr>"
            )
            if detail:
                lines = "<br>".join(html.escape(d) for d in detail)
                body.append(
                    f"<tr class='ipy-dbreset-detail'>"
                    f"<td colspan='{len(self.columns)}' style='{_DETAIL}'>{lines}</td></tr>"
                )
        notes = "".join(
            f"<div style='{_DETAIL}padding-left:0'>{html.escape(n)}</div>" for n in self.notes
        )
        return (
            f'<div class="ipy-dbreset-status"><table style="{_TABLE}">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{notes}</div>"
        )
