"""What an open transaction holds: how many writes, of which kind, on which table.

Only a statement's kind and table are kept, never a parameter or a literal.
What is counted, how savepoints and transaction boundaries are followed and
what it costs: ``docs/internals.md`` (What an open transaction holds).
"""

from __future__ import annotations

import functools
import re
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from django.db import Error

from ipy_dbreset import commits
from ipy_dbreset.patches import patch, unpatch

if TYPE_CHECKING:
    import weakref
    from collections.abc import Callable

    from django.db.backends.base.base import BaseDatabaseWrapper


PREFIX = 120
"""Characters of a statement's SQL that are read to classify it."""

ENTRIES = 8
"""Distinct (kind, table) pairs kept per savepoint level; further writes are only counted."""

_CACHE_SIZE = 512

# What a statement does, as far as the ledger cares.
_READ = 0
_WRITE = 1
_BEGIN = 2  # a transaction starts (raw BEGIN / START TRANSACTION)
_END = 3  # the transaction ends (raw COMMIT / ROLLBACK / END / ABORT)
_SAVEPOINT = 4
_ROLLBACK_TO = 5
_RELEASE = 6

Action = tuple[int, str, "str | None"]
"""(what, kind or savepoint name, table)."""

_NOT_WRITES = frozenset(
    {
        *("SELECT", "SHOW", "EXPLAIN", "VALUES", "TABLE", "PRAGMA", "SET", "RESET"),
        *("DESCRIBE", "DESC", "FETCH", "MOVE", "CLOSE", "DECLARE", "LISTEN", "UNLISTEN"),
        *("NOTIFY", "PREPARE", "EXECUTE", "DEALLOCATE", "DISCARD", "LOCK", "HANDLER"),
        *("USE", "ANALYZE", "CHECKPOINT"),
    }
)
"""First keywords of statements that change no data (``SELECT ... FOR UPDATE`` included)."""

_CONTROL = {
    "BEGIN": _BEGIN,
    "START": _BEGIN,
    "COMMIT": _END,
    "END": _END,
    "ABORT": _END,
    "SAVEPOINT": _SAVEPOINT,
    "RELEASE": _RELEASE,
}

# Leading blanks, comments and parentheses, then the first keyword.
_HEAD = re.compile(r"(?:\s+|/\*.*?\*/|--[^\n]*\n|\()*([A-Za-z]+)", re.S)
_PART = r"""(?:"(?:[^"]|"")+"|`[^`]+`|\[[^\]]+\]|[A-Za-z_][\w$]*)"""  # an identifier, quoted or not
_NAME = rf"({_PART}(?:\.{_PART})*)"  # a table name, maybe schema-qualified
_MODIFIERS = r"(?:(?:LOW_PRIORITY|HIGH_PRIORITY|DELAYED|QUICK|IGNORE|ONLY|OR\s+[A-Za-z]+)\s+)*"
_TABLE_PATTERNS = {
    "INSERT": rf"\s*{_MODIFIERS}INTO\s+{_NAME}",
    "REPLACE": rf"\s*{_MODIFIERS}INTO\s+{_NAME}",
    "UPDATE": rf"\s*{_MODIFIERS}{_NAME}",
    "DELETE": rf"\s*{_MODIFIERS}FROM\s+{_MODIFIERS}{_NAME}",
    "MERGE": rf"\s*INTO\s+{_NAME}",
    "TRUNCATE": rf"\s*(?:TABLE\s+)?{_MODIFIERS}{_NAME}",
    "COPY": rf"\s*{_NAME}",
    "CREATE": (
        rf"\s*(?:(?:OR\s+REPLACE|TEMPORARY|TEMP|UNLOGGED)\s+)*"
        rf"TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?{_NAME}"
    ),
    "ALTER": rf"\s*TABLE\s+(?:IF\s+EXISTS\s+)?{_MODIFIERS}{_NAME}",
    "DROP": rf"\s*(?:TEMPORARY\s+)?TABLE\s+(?:IF\s+EXISTS\s+)?{_NAME}",
    "SAVEPOINT": rf"\s+(?:TO\s+)?(?:SAVEPOINT\s+)?{_NAME}",
}


def _savepoint_name(sql: str, start: int) -> re.Match[str] | None:
    pattern = _pattern("SAVEPOINT")
    assert pattern is not None
    return pattern.match(sql, start, PREFIX)


@functools.cache
def _pattern(kind: str) -> re.Pattern[str] | None:
    """The pattern that finds the table (or savepoint) after ``kind``'s keyword.

    Compiled when first needed: compiling them all costs more than the rest
    of ``%load_ext``, and a session that never writes in a transaction needs none.
    """
    pattern = _TABLE_PATTERNS.get(kind)
    return None if pattern is None else re.compile(pattern, re.I)


_WITH_WRITE = re.compile(r"\b(INSERT|UPDATE|DELETE|MERGE)\b", re.I)

_cache: dict[Any, Action] = {}
"""Classification by statement prefix; never holds a prefix with a string literal."""


def _unquote(name: str) -> str:
    parts = re.findall(r'"((?:[^"]|"")+)"|`([^`]+)`|\[([^\]]+)\]|([^."`\[\]]+)', name)
    return ".".join(next(p for p in part if p).replace('""', '"') for part in parts)[:63]


def classify(sql: object) -> Action:
    """What a statement does: its kind, and the table it writes to when it is known."""
    if isinstance(sql, bytes):
        sql = sql[:PREFIX].decode("utf-8", "replace")
    if not isinstance(sql, str):
        return (_WRITE, "SQL", None)  # composed SQL: it may write; what, we cannot tell
    head = _HEAD.match(sql, 0, PREFIX)
    if head is None:
        return (_WRITE, "SQL", None)
    kind = head.group(1).upper()
    rest = head.end()
    if kind in _NOT_WRITES:
        return (_READ, kind, None)
    if kind == "WITH":
        found = _WITH_WRITE.search(sql)  # the whole statement: the write comes after the CTEs
        return (_WRITE, found.group(1).upper(), None) if found else (_READ, kind, None)
    if kind == "ROLLBACK":
        name = _savepoint_name(sql, rest)
        if name is None or sql[rest : name.start(1)].strip().upper() in ("", "WORK"):
            return (_END, kind, None)
        return (_ROLLBACK_TO, _unquote(name.group(1)), None)
    control = _CONTROL.get(kind)
    if control in (_SAVEPOINT, _RELEASE):
        name = _savepoint_name(sql, rest)
        return (control, _unquote(name.group(1)) if name else "", None)
    if control is not None:
        return (control, kind, None)
    table_pattern = _pattern(kind)
    table = table_pattern.match(sql, rest, PREFIX) if table_pattern else None
    return (_WRITE, kind, _unquote(table.group(1)) if table else None)


class Tally(NamedTuple):
    """Writes of a transaction (or part of one): counted, and itemised by kind and table."""

    writes: int
    """Data-changing statements that changed rows (or may have: see :attr:`unknown`);
    each row of an ``executemany`` counts as one."""
    entries: tuple[tuple[str, str | None, int, int], ...] = ()
    """(kind, table, statements, rows), in the order first seen; at most :data:`ENTRIES`
    per level.  ``rows`` counts what the driver reported (``cursor.rowcount``)."""
    since: float | None = None
    """``time.monotonic()`` when the transaction's first statement was seen."""
    rows: int = 0
    """Rows the driver reported written, over every statement of :attr:`writes`."""
    unknown: int = 0
    """Statements of :attr:`writes` for which the driver reports no row count (DDL)."""
    idle: int = 0
    """Data-changing statements that changed no row (not writes)."""

    @property
    def itemised(self) -> int:
        return sum(n for _, _, n, _ in self.entries)

    @property
    def row_by_row(self) -> bool:
        """Every statement whose rows are known wrote exactly one: count statements."""
        return self.rows == self.writes - self.unknown

    def __sub__(self, other: Tally) -> Tally:
        left = {(kind, table): [n, r] for kind, table, n, r in self.entries}
        for kind, table, n, r in other.entries:
            if (kind, table) in left:
                left[(kind, table)][0] -= n
                left[(kind, table)][1] -= r
        entries = tuple((k, t, n, max(r, 0)) for (k, t), (n, r) in left.items() if n > 0)
        return Tally(
            max(self.writes - other.writes, 0),
            entries,
            self.since,
            max(self.rows - other.rows, 0),
            max(self.unknown - other.unknown, 0),
            max(self.idle - other.idle, 0),
        )

    def items(self) -> str:
        """``INSERT shop_order x2, UPDATE shop_order`` (``+3 more`` for the unitemised);
        by rows when a statement wrote more or fewer than one: ``INSERT shop_order 500``."""
        by_rows = not self.row_by_row
        parts = []
        for kind, table, n, rows in self.entries:
            part = f"{kind} {table}" if table else kind
            if by_rows:
                part += f" {rows:,}" if rows else ""
            elif n > 1:
                part += f" x{n}"
            parts.append(part)
        more = self.writes - self.itemised
        if more > 0:
            parts.append(f"+{more} more")
        return ", ".join(parts)


class InFlight(NamedTuple):
    """A COMMIT whose outcome its connection could not tell."""

    tally: Tally
    """What the transaction wrote."""
    xid: int | None
    """Its transaction id (PostgreSQL), if it could be noted."""
    interrupted: bool
    """Stopped by the user (the connection lived on), not lost with its connection."""
    refused: str | None = None
    """Why the server refused it (``its COMMIT was cancelled``): it rolled back, no doubt."""


def _writes(n: int) -> str:
    return f"{n} write" if n == 1 else f"{n} writes"


def _count(tally: Tally, unsaved: str) -> str:
    """``2 unsaved writes``; ``2 unsaved statements writing 1,000 rows``."""
    if tally.row_by_row:
        return f"{tally.writes} {unsaved}{'write' if tally.writes == 1 else 'writes'}"
    statements = "statement" if tally.writes == 1 else "statements"
    rows = "row" if tally.rows == 1 and not tally.unknown else "rows"
    least = "at least " if tally.unknown else ""
    return f"{tally.writes} {unsaved}{statements} writing {least}{tally.rows:,} {rows}"


def writes_text(tally: Tally, *, unsaved: bool = True) -> str:
    """``2 unsaved writes (INSERT shop_order x2)``; ``1 write (DELETE shop_order)``;
    ``2 unsaved statements writing 1,000 rows (INSERT shop_order 500, UPDATE shop_order 500)``."""
    return f"{_count(tally, 'unsaved ' if unsaved else '')} ({tally.items()})"


def duration(seconds: float) -> str:
    """``under 1 s``, ``90 s``, ``45 min``, ``2 h 5 min``."""
    if seconds < 1:
        return "under 1 s"  # not "open 0 s": it is open
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes = int(seconds // 60)
    if minutes < 120:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


def status_text(tally: Tally | None) -> str:
    """``2 writes, open 12 s`` for ``%dbstatus``; empty when no transaction is known."""
    if tally is None or tally.since is None:
        return ""
    count = _writes(tally.writes)
    if not tally.row_by_row:
        count += f" ({'at least ' if tally.unknown else ''}{tally.rows:,} rows)"
    return f"{count}, open {duration(time.monotonic() - tally.since)}"


class _Level:
    """The writes since one savepoint (or since the transaction began: ``name`` None)."""

    __slots__ = ("counts", "idle", "name", "rows", "unknown", "writes")

    def __init__(self, name: str | None) -> None:
        self.name = name
        # (kind, table) -> [statements, rows]; at most ENTRIES keys
        self.counts: dict[tuple[str, str | None], list[int]] = {}
        self.writes = 0  # every write, itemised in counts or not
        self.rows = 0  # rows the driver reported, over every write
        self.unknown = 0  # writes whose rows the driver does not report
        self.idle = 0  # data-changing statements that changed no row

    def add(self, key: tuple[str, str | None], n: int, rows: int) -> None:
        """``n`` statements of ``key`` wrote ``rows`` rows (negative: not reported)."""
        self.writes += n
        if rows < 0:
            self.unknown += n
            rows = 0
        self.rows += rows
        counts = self.counts
        if key in counts:
            entry = counts[key]
            entry[0] += n
            entry[1] += rows
        elif len(counts) < ENTRIES:
            counts[key] = [n, rows]

    def absorb(self, other: _Level) -> None:
        """Add every write of ``other``, itemised as far as :data:`ENTRIES` allows."""
        items = [(key, list(entry)) for key, entry in list(other.counts.items())]  # a copy
        self.writes += other.writes - sum(n for _, (n, _) in items)
        self.rows += other.rows - sum(r for _, (_, r) in items)
        self.unknown += other.unknown
        self.idle += other.idle
        for key, (n, rows) in items:
            self.writes += n
            self.rows += rows
            counts = self.counts
            if key in counts:
                counts[key][0] += n
                counts[key][1] += rows
            elif len(counts) < ENTRIES:
                counts[key] = [n, rows]


def _counted_later(wrapper: BaseDatabaseWrapper, sql: Any) -> bool:
    """Whether a row count of 0 only means "not counted yet": sqlite3 counts the rows
    of a statement with ``RETURNING`` (Django's INSERT) as they are fetched."""
    return wrapper.vendor == "sqlite" and (not isinstance(sql, str) or "RETURNING" in sql.upper())


def _rowcount(cursor: Any) -> int:
    """Rows the statement just run changed, as the driver reports it (-1: not reported)."""
    try:
        rows = cursor.cursor.rowcount  # Django's CursorWrapper, then the driver's cursor
    except Exception:  # a driver that cannot tell: not known
        return -1
    return rows if isinstance(rows, int) else -1


_HOOKED = (
    "commit",
    "rollback",
    "set_autocommit",
    "connect",
    "savepoint_rollback",
    "savepoint_commit",
)


class Ledger:
    """The writes of one connection's open transaction, per savepoint level."""

    __slots__ = ("_hooks", "_levels", "_report", "in_flight", "known", "outcome", "since")

    def __init__(self, *, known: bool = True) -> None:
        self._levels: list[_Level] = []
        """The transaction's base level, then one per open savepoint; empty: none known."""
        self.since: float | None = None
        """``time.monotonic()`` when the transaction's first statement was seen."""
        self.known = known
        """Every statement of the open transaction (if any) was seen: an empty ledger
        means nothing was written.  False for a connection tracked mid-transaction,
        until its transaction ends."""
        self.in_flight: InFlight | None = None
        """A COMMIT of this connection's that wrote and did not go through as asked
        (:mod:`ipy_dbreset.commits`)."""
        self.outcome: str | None = None
        """What the server said became of :attr:`in_flight`, for the next notice to tell."""
        self._report: Callable[[], None] | None = None
        # Ours, to take exactly them away; weakly, as the wrapper holds them and
        # they hold the wrapper: the ledger must not keep its connection alive.
        self._hooks: dict[str, weakref.ref[Callable[..., Any]]] = {}

    # -- recording: on the owner's thread, after each successful statement ----

    def note(
        self, wrapper: BaseDatabaseWrapper, sql: Any, params: Any, many: bool, cursor: Any
    ) -> None:
        """Record a statement that succeeded on ``wrapper`` (called by the execute wrapper,
        with Django's cursor, whose driver cursor tells the rows it changed)."""
        if wrapper.autocommit and not wrapper.in_atomic_block:
            if self._levels:
                self.clear()  # committed at once; what came before has ended too
            return
        try:
            action = _cache[sql[:PREFIX]]
        except (KeyError, TypeError):
            action = self._classify(sql)
        what = action[0]
        levels = self._levels
        if not levels:
            levels.append(_Level(None))
            self.since = time.monotonic()
        if what == _WRITE:
            rows = _rowcount(cursor)
            if rows == 0:
                if not _counted_later(wrapper, sql):
                    levels[-1].idle += 1  # an UPDATE or DELETE that matched nothing wrote nothing
                    return
                rows = -1
            n = len(params) if many and hasattr(params, "__len__") else 1
            levels[-1].add((action[1], action[2]), n, rows)
        elif what != _READ:
            self._control(what, action[1])

    def unname(self, sid: str) -> None:
        """Releasing or rolling back to savepoint ``sid`` failed: it is no longer one
        anybody holds; its writes still count, one level down.

        Django's atomic exit forgets its block's savepoint even when rolling back
        to it fails (the connection died in the block): without this, that
        savepoint would look like one the user made.
        """
        if len(self._levels) > 1:
            self._control(_RELEASE, sid)

    @staticmethod
    def _classify(sql: Any) -> Action:
        action = classify(sql)
        if isinstance(sql, str) and action[1] != "WITH":
            key = sql[:PREFIX]
            if "'" not in key:  # a string literal may hold a secret: not kept
                if len(_cache) >= _CACHE_SIZE:
                    _cache.clear()
                _cache[key] = action
        return action

    def _control(self, what: int, name: str) -> None:
        levels = self._levels
        if what in (_BEGIN, _END):
            self.clear()
            if what == _BEGIN:
                levels.append(_Level(None))
                self.since = time.monotonic()
            return
        if what == _SAVEPOINT:
            levels.append(_Level(name))
            return
        found = next((i for i in range(len(levels) - 1, 0, -1) if levels[i].name == name), None)
        if found is None:
            return  # a savepoint from before the ledger knew the transaction
        if what == _ROLLBACK_TO:
            del levels[found + 1 :]
            levels[found] = _Level(name)  # the savepoint stays, emptied
        elif what == _RELEASE:
            for level in levels[found:]:
                levels[found - 1].absorb(level)
            del levels[found:]

    def clear(self) -> None:
        self._levels.clear()
        self.since = None
        self.known = True  # the transaction is over: the next one is seen from its start

    # -- reading: by the owner, or while the connection is held still ----------

    def tally(self) -> Tally | None:
        """What the open transaction holds, or ``None`` when none is known."""
        levels = list(self._levels)  # a copy: another thread may be recording
        if not levels:
            return Tally(0) if self.known else None
        total = _Level(None)
        for level in levels:
            total.absorb(level)
        entries = tuple((k, t, n, r) for (k, t), (n, r) in total.counts.items())
        return Tally(total.writes, entries, self.since, total.rows, total.unknown, total.idle)

    def savepoints(self) -> tuple[str, ...]:
        """The savepoints open in the transaction, outermost first: Django's and the user's."""
        return tuple(level.name for level in list(self._levels)[1:] if level.name)

    # -- hooks on the transaction boundaries that bypass execute wrappers -------

    def install(
        self, wrapper: BaseDatabaseWrapper, report: Callable[[], None] | None = None
    ) -> None:
        """Empty the ledger whenever ``wrapper`` commits, rolls back, or changes connection.

        ``report`` is called (from the committing thread) when a COMMIT did
        not answer and the server is to be asked what became of it.
        """
        self._report = report
        for name in _HOOKED:
            if name not in self._hooks:
                self._hooks[name] = patch(wrapper, name, self._hook(wrapper, name))

    def remove(self, wrapper: BaseDatabaseWrapper) -> None:
        """Take exactly our hooks away (not one another extension put over them)."""
        for name, ref in self._hooks.items():
            unpatch(wrapper, name, ref)
        self._hooks.clear()
        self.clear()
        self._report = None

    def _hook(self, wrapper: BaseDatabaseWrapper, name: str) -> Callable[..., Any]:
        # Django's method or the backend's override; looked up now, on the instance's class.
        original: Callable[..., Any] = getattr(wrapper, name)
        clear = self.clear

        if name == "set_autocommit":

            def set_autocommit(*args: Any, **kwargs: Any) -> Any:
                __tracebackhide__ = True  # not the user's error: IPython leaves this frame out
                before = wrapper.autocommit
                result = original(*args, **kwargs)
                if wrapper.autocommit != before:  # entering or leaving a transaction
                    clear()
                return result

            return set_autocommit

        if name == "connect":

            def connect(*args: Any, **kwargs: Any) -> Any:
                __tracebackhide__ = True  # not the user's error: IPython leaves this frame out
                clear()  # whatever the old connection held is gone
                return original(*args, **kwargs)

            return connect

        if name in ("savepoint_rollback", "savepoint_commit"):

            def leave_savepoint(sid: str, *args: Any, **kwargs: Any) -> Any:
                __tracebackhide__ = True  # not the user's error: IPython leaves this frame out
                try:
                    return original(sid, *args, **kwargs)
                except Error:
                    self.unname(sid)
                    raise

            return leave_savepoint

        if name == "commit":

            def commit(*args: Any, **kwargs: Any) -> Any:
                __tracebackhide__ = True  # not the user's error: IPython leaves this frame out
                tally = self.tally()
                wrote = tally is not None and tally.writes > 0
                xid = commits.transaction_id(wrapper) if wrote else None
                try:
                    result = original(*args, **kwargs)
                except BaseException as exc:
                    clear()  # committed or not, this transaction is over
                    if wrote:
                        assert tally is not None
                        interrupted = not isinstance(exc, Error)
                        refused = commits.refused(wrapper, exc)
                        if xid == commits.LOST_BEFORE:
                            xid, refused = None, "the connection was lost before its COMMIT"
                        self.in_flight = InFlight(tally, xid, interrupted, refused)
                        if self._report is not None:
                            self._report()
                    raise
                clear()
                return result

            return commit

        def end(*args: Any, **kwargs: Any) -> Any:
            __tracebackhide__ = True  # not the user's error: IPython leaves this frame out
            try:
                result = original(*args, **kwargs)
            except Error:
                clear()  # the database failed to end it: the transaction is over all the same
                raise
            clear()
            return result

        end.__name__ = name
        return end


def outcome(wrapper: BaseDatabaseWrapper, flight: InFlight) -> str:
    """What became of ``flight``, asked of the server: the notice's clause.

    ``it rolled back: lost 2 unsaved writes (...)``, ``it committed: 2 writes
    (...) are saved``, or why it cannot be known.
    """
    if flight.refused:
        return f"it rolled back: lost {writes_text(flight.tally)}"
    status = None if flight.xid is None else commits.ask(wrapper, flight.xid)
    if status == "aborted":
        return f"it rolled back: lost {writes_text(flight.tally)}"
    if status == "committed":
        verb = "is" if flight.tally.writes == 1 else "are"
        return f"it committed: {writes_text(flight.tally, unsaved=False)} {verb} saved"
    if wrapper.vendor != "postgresql":
        why = f"{wrapper.display_name} cannot say"
    elif flight.xid is None:
        why = "its transaction id could not be noted"
    else:
        why = "the server could not be asked"
    return (
        f"whether it committed cannot be known ({why}): check for its "
        f"{writes_text(flight.tally, unsaved=False)}"
    )


def ledger_of(wrapper: BaseDatabaseWrapper) -> Ledger | None:
    """The ledger of a tracked connection (held by its execute wrapper), if any."""
    for execute_wrapper in wrapper.execute_wrappers:
        ledger = getattr(execute_wrapper, "ledger", None)
        if isinstance(ledger, Ledger):
            return ledger
    return None


def tally_of(wrapper: BaseDatabaseWrapper) -> Tally | None:
    """What ``wrapper``'s open transaction holds, if it is tracked and in one."""
    ledger = ledger_of(wrapper)
    return None if ledger is None else ledger.tally()


def lost(work: str | None, tally: Tally | None, *, verb: str = "lost") -> str:
    """What a repair discarded: ``lost an atomic block with 2 unsaved writes (...)``.

    ``work`` names what was discarded (``None``: the transaction the notice
    already named); ``tally`` is what it held (``None``: not known, the
    connection is not tracked); ``verb`` is ``rolled back`` for a reset the
    user asked for.
    """
    if tally is None:
        return f"{verb} {work or 'its work'}"
    if not tally.writes:
        did = "changed no row" if tally.idle else "only read"
        return f"nothing written was lost ({work or 'it'} {did})"
    return f"{verb} {f'{work} with ' if work else ''}{writes_text(tally)}"


def kept(work: str, tally: Tally | None) -> str:
    """What a repair left in place: ``kept the outer block with 1 write (...)``."""
    if tally is None or not tally.writes:
        return f"kept {work}"
    return f"kept {work} with {writes_text(tally, unsaved=False)}"
