"""Rendering notices and connection status, as plain text and as HTML for notebooks.

What a check, a reset or ``%dbstatus`` found is turned into words here;
nothing here knows IPython or touches a connection.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from ipy_dbreset.checkup import Outcome, Status
    from ipy_dbreset.repair import Repair

PREFIX = "ipy_dbreset"

_STYLE = (
    "font-family:var(--jp-code-font-family,monospace);font-size:0.9em;"
    "padding:2px 8px;border-left:3px solid {color};background:{background};"
)
_KINDS = {
    "repair": ("#d08700", "rgba(208,135,0,0.08)"),
    "info": ("#1f77b4", "rgba(31,119,180,0.06)"),
    "error": ("#c0392b", "rgba(192,57,43,0.08)"),
}


@dataclass(frozen=True)
class Notice:
    """One line for the user, in both worlds."""

    text: str
    kind: str = "repair"

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, str]:
        return {"text/plain": f"{PREFIX}: {self.text}", "text/html": self.html()}

    def html(self) -> str:
        color, background = _KINDS.get(self.kind, _KINDS["info"])
        style = _STYLE.format(color=color, background=background)
        return (
            f'<div class="ipy-dbreset-notice" style="{style}">'
            f"<b>{PREFIX}</b>: {html.escape(self.text)}</div>"
        )

    def __str__(self) -> str:
        return f"{PREFIX}: {self.text}"


def repair_notice(repairs: Sequence[Repair]) -> Notice:
    """One notice for all repairs of a check: ``default: ...; other: ...``."""
    return Notice("; ".join(r.describe() for r in repairs))


def threads(connections: Iterable[tuple[str, str | None]]) -> str:
    """``default (thread worker_0), other (thread worker_0)``."""
    return ", ".join(f"{alias} (thread {thread})" for alias, thread in connections)


def failure_notice(outcome: Outcome) -> Notice:
    """What a check repaired and which repairs failed, in one line."""
    parts = [r.describe() for r in outcome.repairs]
    parts += [f"could not repair {f.describe()}" for f in outcome.failures]
    return Notice(f"{'; '.join(parts)}; run %dbreset", "error")


def skipped_notice(outcome: Outcome) -> Notice:
    return Notice(f"not checked, in use by their thread: {threads(outcome.skipped)}", "info")


def reset_notice(outcome: Outcome, aliases: Sequence[str] | None) -> Notice:
    """What ``%dbreset`` did, left alone and could not do, in one line."""
    parts = [r.describe() for r in outcome.repairs]
    parts += [f"could not reset {f.describe()}" for f in outcome.failures]
    if outcome.skipped:
        parts.append(f"left, in use by their thread: {threads(outcome.skipped)}")
    if outcome.failures:
        return Notice("; ".join(parts), "error")
    if outcome.repairs:
        return Notice("; ".join(parts))
    if outcome.skipped:
        return Notice("; ".join(parts), "info")
    which = ", ".join(aliases) if aliases else "any alias"
    return Notice(f"nothing to reset: no open connection for {which}", "info")


STATUS_COLUMNS = (
    "alias",
    "thread",
    "vendor / driver",
    "database",
    "connected",
    "server id",
    "transaction",
    "uncommitted",
    "autocommit",
    "keepalive",
    "last repair",
)


def status_table(statuses: Iterable[Status]) -> Table:
    """``%dbstatus``: one row per connection; never a password."""
    rows = []
    for status in statuses:
        snap, last = status.snapshot, status.last
        transaction = snap.transaction
        if status.kept is not None and transaction == "idle":
            transaction = f"idle; kept open: {status.kept}"
        rows.append(
            [
                snap.alias,
                status.thread or "",
                f"{snap.vendor} / {snap.driver}",
                snap.database,
                "yes" if snap.connected else "no",
                "" if snap.server_id is None else str(snap.server_id),
                transaction,
                snap.holds,
                "" if snap.autocommit is None else ("on" if snap.autocommit else "off"),
                "" if status.keepalive is None else status.keepalive.describe(),
                "" if last is None else f"{last.when:%H:%M:%S} {last.action} ({last.reason})",
            ]
        )
    return Table(STATUS_COLUMNS, rows, "no database connection in use")


class Table:
    """A small table shown as aligned text in a terminal and as HTML in a notebook."""

    def __init__(self, columns: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> None:
        self.columns = list(columns)
        self.rows = [list(row) for row in rows]  # of strings, one per column
        self.empty = empty  # said instead of a table without rows

    def __str__(self) -> str:
        if not self.rows:
            return f"{PREFIX}: {self.empty}"
        widths = [
            max(len(str(c)), *(len(row[i]) for row in self.rows))
            for i, c in enumerate(self.columns)
        ]
        lines = ["  ".join(c.ljust(w) for c, w in zip(self.columns, widths, strict=False)).rstrip()]
        lines.append("  ".join("-" * w for w in widths))
        lines += [
            "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)).rstrip()
            for row in self.rows
        ]
        return "\n".join(lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))

    def _repr_html_(self) -> str:
        if not self.rows:
            return Notice(self.empty, "info").html()
        head = "".join(f"<th style='text-align:left'>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>"
            + "".join(f"<td style='text-align:left'>{html.escape(v)}</td>" for v in row)
            + "</tr>"
            for row in self.rows
        )
        return (
            f'<table class="ipy-dbreset-status"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>"
        )
