"""What the server must hold after each cell of a random walk, and what the notices must say.

The model is PostgreSQL's view of one Django connection: the rows committed,
and the open transaction as a stack of levels, one per savepoint (Django's
atomic blocks and the user's own ``transaction.savepoint()``) above the
transaction's base.  Each operation of the walk is a cell (or a fault between
cells) with a precondition on this state; :meth:`Model.step` applies it and
returns what the cell must show: whether it succeeds, what a repair must say
it lost and kept, what a read returns.

The product's promises, as the model reads them:

* A failed statement (an ``IntegrityError``, a cancelled query) aborts the
  transaction; the repair rolls back to the innermost savepoint, the point at
  which the transaction is usable again, whether an atomic block or the user
  made it.  What came before is kept, and the notice says so; an atomic block
  whose savepoint that was is left, as Django leaves a block an exception
  propagates out of.  Without a savepoint the whole transaction goes.
* A connection the server ends (terminated, ``idle_in_transaction_session_timeout``,
  mid-cell, during ``COMMIT``) loses exactly the open transaction's writes;
  the user's mode (autocommit off) stays.
* ``%dbreset`` rolls back everything open; the mode stays.
* Every count is of rows written (a statement that changed nothing is not a
  write), exactly, once per event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

SLOW = 1_000_000
"""Order numbers from here on make ``COMMIT`` wait (a deferred trigger sleeps)."""

DUPLICATE = 0
"""The order number committed before every walk: writing it again is an IntegrityError."""


class Op(NamedTuple):
    """One step of a walk: a cell, or a fault between cells."""

    name: str
    arg: int | str | None = None

    def __str__(self) -> str:
        return self.name if self.arg is None else f"{self.name}({self.arg!r})"


@dataclass(eq=False)  # compared by identity: two empty levels are not the same savepoint
class Level:
    """The writes since one savepoint (``kind`` "atomic" or "user"), or since BEGIN ("base")."""

    kind: str
    label: str | None = None  # the user's savepoint, by the walk's name for it
    rows: list[int] = field(default_factory=list)


@dataclass(eq=False)
class Block:
    """An atomic block the user entered and has not left."""

    level: Level | None  # its savepoint; None: the outermost block in autocommit mode


@dataclass
class Expect:
    """What one cell must show."""

    ok: bool | None = True
    """Whether the cell succeeds; ``None``: either."""
    errors: tuple[str, ...] = ()
    """The exception names allowed when it fails."""
    lost: int = 0
    """Rows a repair in this cell must say were lost (0: it must not claim a loss)."""
    kept: int = 0
    """Rows a repair that lost something must say it kept (0: it must not claim any)."""
    told: bool = False
    """A repair must say what was lost (when ``lost`` is 0: that nothing was)."""
    value: list[int] | None = None
    """What the cell's result must be (a read)."""
    after_fault: bool = False
    """A fault came between the last cell and this one (the cell must not fail for it)."""
    django: tuple[int, bool] | None = None
    """Atomic blocks open and whether in a transaction, as Django must see them after the
    cell, when not as the model is now (the server ends the connection only later)."""


FAILED_QUERY = ("OperationalError", "InterfaceError", "DatabaseError")
INTERRUPTED = ("KeyboardInterrupt", "OperationalError", "QueryCanceled", "DatabaseError")

# name: (weight, is it a fault injected by the walk)
OPS: dict[str, tuple[int, bool]] = {
    "write": (14, False),
    "read": (3, False),
    "atomic_enter": (5, False),
    "atomic_exit": (4, False),
    "atomic_fail": (1, False),
    "manual_on": (4, False),
    "manual_off": (2, False),
    "commit": (3, False),
    "rollback": (1, False),
    "savepoint": (3, False),
    "sp_rollback": (2, False),
    "sp_release": (1, False),
    "duplicate": (3, False),
    "duplicate_caught": (2, False),
    "terminate": (3, True),
    "kill_mid_cell": (2, True),
    "idle_timeout": (1, True),
    "stop": (2, True),
    "dbreset": (1, False),
    "commit_kill": (1, True),
    "commit_stop": (1, True),
    "bulk_write": (2, False),
    "update_nothing": (1, False),
}

CELLS = {
    "write": "Order.objects.create(number={arg})",
    "bulk_write": "Order.objects.bulk_create([Order(number={arg}), Order(number={arg} + 1)])",
    "update_nothing": "Order.objects.filter(number=-1).update(customer='nobody')",
    "read": "sorted(Order.objects.values_list('number', flat=True))",
    "atomic_enter": "transaction.atomic().__enter__()",
    "atomic_exit": "connection.atomic_blocks[-1].__exit__(None, None, None)",
    "atomic_fail": "connection.atomic_blocks[-1].__exit__(ValueError, ValueError('walk'), None)",
    "manual_on": "transaction.set_autocommit(False)",
    "manual_off": "transaction.commit()\ntransaction.set_autocommit(True)",
    "commit": "transaction.commit()",
    "rollback": "transaction.rollback()",
    "savepoint": "_walk_sids[{arg!r}] = transaction.savepoint()",
    "sp_rollback": "transaction.savepoint_rollback(_walk_sids[{arg!r}])",
    "sp_release": "transaction.savepoint_commit(_walk_sids[{arg!r}])",
    "duplicate": f"Order.objects.create(number={DUPLICATE})",
    "duplicate_caught": (
        f"try:\n    Order.objects.create(number={DUPLICATE})\nexcept IntegrityError:\n    pass"
    ),
    "kill_mid_cell": "_walk_kill()\nOrder.objects.create(number={arg})",
    "idle_timeout": (
        "with connection.cursor() as _c:\n"
        "    _c.execute('set local idle_in_transaction_session_timeout = 100')"
    ),
    "stop": "with connection.cursor() as _c:\n    _c.execute('select pg_sleep(60)')",
    "dbreset": "%dbreset",
    "commit_kill": "Order.objects.create(number={arg})\n{end}",
    "commit_stop": "Order.objects.create(number={arg})\n{end}",
}

STOP_QUERY = "select pg_sleep(60)"


class Model:
    """The state the server and Django must be in, and the rules that move it."""

    def __init__(self) -> None:
        self.committed: set[int] = {DUPLICATE}
        self.manual = False  # the user's set_autocommit(False)
        self.levels: list[Level] = [Level("base")]  # the open transaction, base first
        self.blocks: list[Block] = []  # the atomic blocks entered, outermost first
        # The server ended the connection after the last cell: what the next
        # cell's first callback must say (the state is the repaired one already).
        self.ended: Expect | None = None

    # -- reading --------------------------------------------------------------

    def pending(self) -> list[int]:
        return [n for level in self.levels for n in level.rows]

    @property
    def in_transaction(self) -> bool:
        """Whether a statement now runs inside a transaction (not committed at once)."""
        return self.manual or bool(self.blocks)

    def user_savepoints(self) -> list[str]:
        """The user's savepoints still alive that the current atomic block may use."""
        usable: list[str] = []
        for level in reversed(self.levels):
            if level.kind != "user":
                break
            assert level.label is not None
            usable.append(level.label)
        return usable

    def allowed(self, op: Op) -> bool:
        name, blocks = op.name, self.blocks
        if name in ("atomic_enter",):
            return len(blocks) < 3
        if name in ("atomic_exit", "atomic_fail"):
            return bool(blocks)
        if name == "manual_on":
            return not self.manual and not blocks
        if name in ("manual_off", "commit", "rollback"):
            return self.manual and not blocks
        if name == "savepoint":
            labels = sum(level.kind == "user" for level in self.levels)
            return self.in_transaction and labels < 3
        if name in ("sp_rollback", "sp_release"):
            return op.arg in self.user_savepoints()
        if name == "idle_timeout":
            return self.in_transaction
        if name in ("commit_kill", "commit_stop"):
            return (self.manual and not blocks) or (
                not self.manual and len(blocks) == 1 and blocks[0].level is None
            )
        return True

    def cell(self, op: Op) -> str | None:
        """The code of ``op``'s cell (``None``: a fault between cells, no cell)."""
        if op.name == "terminate":
            return None
        template = CELLS[op.name]
        end = "transaction.commit()" if self.manual else CELLS["atomic_exit"]
        return template.format(arg=op.arg, end=end)

    # -- moving ---------------------------------------------------------------

    def step(self, op: Op, ok: bool) -> Expect:
        """Apply ``op`` (its cell ended with ``ok``); return what the cell had to show."""
        if op.name == "terminate":  # between cells: the next cell says it, with any before it
            return self._terminate(op, ok)
        before, self.ended = self.ended, None
        expect: Expect = getattr(self, f"_{op.name}")(op, ok)
        if before is not None:
            expect.lost += before.lost
            expect.told = expect.told or before.told
            expect.after_fault = True
        return expect

    def _write_rows(self, rows: list[int]) -> None:
        if self.in_transaction:
            self.levels[-1].rows.extend(rows)
        else:
            self.committed.update(rows)

    def _write(self, op: Op, ok: bool) -> Expect:
        assert isinstance(op.arg, int)
        self._write_rows([op.arg])
        return Expect()

    def _bulk_write(self, op: Op, ok: bool) -> Expect:
        assert isinstance(op.arg, int)
        self._write_rows([op.arg, op.arg + 1])
        return Expect()

    def _update_nothing(self, op: Op, ok: bool) -> Expect:
        return Expect()

    def _read(self, op: Op, ok: bool) -> Expect:
        return Expect(value=sorted(self.committed | set(self.pending())))

    def _atomic_enter(self, op: Op, ok: bool) -> Expect:
        if not self.in_transaction:
            self.blocks.append(Block(None))  # BEGIN: the block is the transaction's base
        else:
            level = Level("atomic")
            self.levels.append(level)
            self.blocks.append(Block(level))
        return Expect()

    def _atomic_exit(self, op: Op, ok: bool) -> Expect:
        block = self.blocks.pop()
        if block.level is None:
            self._commit_all()
        else:
            self._release(self.levels.index(block.level))
        return Expect()

    def _atomic_fail(self, op: Op, ok: bool) -> Expect:
        block = self.blocks.pop()
        if block.level is None:
            self._end()
        else:
            del self.levels[self.levels.index(block.level) :]
        return Expect()

    def _manual_on(self, op: Op, ok: bool) -> Expect:
        self.manual = True
        return Expect()

    def _manual_off(self, op: Op, ok: bool) -> Expect:
        self._commit_all()
        self.manual = False
        return Expect()

    def _commit(self, op: Op, ok: bool) -> Expect:
        self._commit_all()
        return Expect()

    def _rollback(self, op: Op, ok: bool) -> Expect:
        self._end()
        return Expect()

    def _savepoint(self, op: Op, ok: bool) -> Expect:
        assert isinstance(op.arg, str)
        self.levels.append(Level("user", op.arg))
        return Expect()

    def _sp_rollback(self, op: Op, ok: bool) -> Expect:
        index = self._user_level(op.arg)
        del self.levels[index + 1 :]
        self.levels[index].rows.clear()
        return Expect()

    def _sp_release(self, op: Op, ok: bool) -> Expect:
        self._release(self._user_level(op.arg))
        return Expect()

    def _duplicate(self, op: Op, ok: bool) -> Expect:
        return self._failed_statement(Expect(ok=False, errors=("IntegrityError",)))

    def _duplicate_caught(self, op: Op, ok: bool) -> Expect:
        return self._failed_statement(Expect())

    def _stop(self, op: Op, ok: bool) -> Expect:
        return self._failed_statement(Expect(ok=False, errors=INTERRUPTED))

    def _terminate(self, op: Op, ok: bool) -> Expect:
        self._ended()
        return Expect()

    def _idle_timeout(self, op: Op, ok: bool) -> Expect:
        # Once the cell is over, the server ends the idle transaction; Django
        # still holds it as the cell left it.
        expect = Expect(django=(len(self.blocks), self.in_transaction))
        self._ended()
        return expect

    def _ended(self) -> None:
        """The server ends the connection between cells (again, maybe: the losses add up)."""
        lost = self._connection_lost(Expect())
        if self.ended is not None:
            lost.lost += self.ended.lost
            lost.told = lost.told or self.ended.told
        self.ended = lost

    def _kill_mid_cell(self, op: Op, ok: bool) -> Expect:
        assert isinstance(op.arg, int)
        if not self.in_transaction:
            # The look before the query finds the connection closed and reconnects.
            self.committed.add(op.arg)
            return Expect(after_fault=True)
        if self.manual and not self.blocks and not self.pending():
            # Nothing open yet that the loss could cost: reconnecting would be right,
            # and so is failing the query, as inside a transaction.
            expect = self._connection_lost(Expect(ok=None, errors=FAILED_QUERY))
            if ok:
                self.levels[-1].rows.append(op.arg)
            return expect
        return self._connection_lost(Expect(ok=False, errors=FAILED_QUERY))

    def _dbreset(self, op: Op, ok: bool) -> Expect:
        lost = len(self.pending())
        self._end()
        return Expect(lost=lost, told=lost > 0)

    def _commit_kill(self, op: Op, ok: bool) -> Expect:
        assert isinstance(op.arg, int)
        self.levels[-1].rows.append(op.arg)  # the slow row; COMMIT never ends
        manual = self.manual and not self.blocks
        expect = self._connection_lost(Expect(ok=False, errors=FAILED_QUERY))
        # Django's Atomic.__exit__ closes a connection whose COMMIT failed and
        # reconnects at once: the extension may never see the dead one.
        expect.told = expect.told and manual
        return expect

    def _commit_stop(self, op: Op, ok: bool) -> Expect:
        assert isinstance(op.arg, int)
        self.levels[-1].rows.append(op.arg)
        lost = len(self.pending())
        self._end()  # the cancelled COMMIT rolled back; the user saw it fail
        # A notice need not say so; one that does says all of it.
        return Expect(ok=False, errors=INTERRUPTED, lost=lost)

    # -- the rules --------------------------------------------------------------

    def _user_level(self, label: int | str | None) -> int:
        return next(i for i, level in enumerate(self.levels) if level.label == label)

    def _release(self, index: int) -> None:
        """RELEASE SAVEPOINT: its level and every later one merge into the one below."""
        below = self.levels[index - 1]
        for level in self.levels[index:]:
            below.rows.extend(level.rows)
        del self.levels[index:]

    def _commit_all(self) -> None:
        self.committed.update(self.pending())
        self._end()

    def _end(self) -> None:
        """The transaction is over (committed or rolled back): nothing open remains."""
        self.levels = [Level("base")]
        self.blocks.clear()

    def _connection_lost(self, expect: Expect) -> Expect:
        """The server ended the connection: the open transaction's writes are gone."""
        lost = len(self.pending())
        self._end()
        expect.lost, expect.told = lost, lost > 0
        return expect

    def _failed_statement(self, expect: Expect) -> Expect:
        """A statement failed: roll back to the innermost savepoint, or all."""
        if not self.in_transaction:
            return expect  # autocommit: only the statement failed
        expect.told = True
        if len(self.levels) > 1:
            top = self.levels[-1]
            expect.lost = len(top.rows)
            top.rows.clear()
            if top.kind == "atomic":  # the block is left, as Django leaves it on an error
                self.levels.pop()
                block = self.blocks.pop()
                assert block.level is top
            expect.kept = len(self.pending())
            return expect
        expect.lost = len(self.pending())
        self._end()
        return expect

    def closing(self) -> list[Op]:
        """The cells that end the walk with everything committed or rolled back."""
        ops = [Op("atomic_exit") for _ in self.blocks]
        if self.manual:
            ops.append(Op("manual_off"))
        return ops
