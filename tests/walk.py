"""Seeded random walks through transactions and faults, checked against the server per cell.

:class:`Walker` drives one shell (:class:`ShellDriver`, an ``InteractiveShell``
in a process of its own, or :class:`KernelDriver`, a real ipykernel) through
the operations of :mod:`walk_model`, injects the faults (a backend terminated
between cells, mid-cell and during ``COMMIT``, the stop button during
``pg_sleep`` and during ``COMMIT``, ``idle_in_transaction_session_timeout``)
and, after every cell, checks what the server holds, what the cell showed and
what the extension recorded of its repairs (``%dbstatus --history``'s records)
against the model.  A walk is a function of its seed; :func:`shrink` finds the
shortest sequence of its steps that still breaks the same invariant
(delta debugging).
"""

from __future__ import annotations

import ast
import contextlib
import itertools
import json
import os
import random
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from walk_model import CELLS, OPS, SLOW, STOP_QUERY, Expect, Model, Op

from harness import DEMO, ROOT, Kernel

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

CELL_TIMEOUT = 45.0
"""Seconds a cell may take before it counts as hung (no cell of a walk should take 2)."""

# Defined in the shell before the walk: the names its cells use, and the
# record read after each cell (what the extension repaired since the last
# one, and Django's view of the connection).
PROBE = r'''
import json as _walk_json
import time as _walk_time
from django.db import IntegrityError, connection, transaction
from django.db.backends.postgresql.psycopg_any import is_psycopg3 as _walk_psycopg3
from shop.models import Order
_walk_sids = {}
_walk_seen = []


def _walk_kill():
    """End this connection's backend from another session, as a DBA would; wait until gone."""
    import psycopg2
    connection.ensure_connection()
    pid = connection.connection.info.backend_pid
    settings = connection.settings_dict
    dba = psycopg2.connect(
        host=settings["HOST"], port=settings["PORT"], user=settings["USER"], dbname="postgres"
    )
    try:
        dba.autocommit = True
        with dba.cursor() as cursor:
            cursor.execute("select pg_terminate_backend(%s)", [pid])
            while True:
                cursor.execute("select 1 from pg_stat_activity where pid = %s", [pid])
                if not cursor.fetchone():
                    break
                _walk_time.sleep(0.005)
    finally:
        dba.close()


def _walk_repair(repair):
    names = getattr(repair, "__dataclass_fields__", None) or getattr(repair, "_fields", ())
    out = {}
    for name in names:
        value = getattr(repair, name, None)
        ok = isinstance(value, (str, int, float, bool, type(None)))
        out[name] = value if ok else repr(value)
    from ipy_dbreset.display import repair_line

    out["line"] = repair_line(repair)
    return out


def _walk_record():
    magics = get_ipython().magics_manager.registry.get("DBReset")
    history = list(magics.checkup.history()) if magics is not None else []
    seen = {id(r) for r in _walk_seen}
    new = [r for r in history if id(r) not in seen]
    _walk_seen[:] = history  # held, so that no id is reused while compared
    raw = connection.connection
    return _walk_json.dumps({
        "repairs": [_walk_repair(r) for r in new],
        "depth": len(connection.atomic_blocks),
        "in_atomic_block": connection.in_atomic_block,
        "needs_rollback": connection.needs_rollback,
        "connected": raw is not None,
        "autocommit": connection.autocommit,
        "driver": "psycopg" if _walk_psycopg3 else "psycopg2",
    })
'''


@dataclass
class Answer:
    """What one cell did, and the record read after it."""

    status: str
    ename: str | None = None
    evalue: str | None = None
    stdout: str = ""
    stderr: str = ""
    texts: list[str] = field(default_factory=list)
    value: Any = None
    record: dict[str, Any] = field(default_factory=dict)
    stray: int = 0
    """Interrupts that arrived outside any cell."""
    traceback: str = ""
    """The error as a kernel shows it (a shell prints it to stdout)."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def repairs(self) -> list[dict[str, Any]]:
        return list(self.record.get("repairs", ()))


def setup_cells(driver: str, *, load: bool = True) -> list[str]:
    """The cells that prepare a shell for a walk (``load``: with the extension)."""
    if not load:
        return ["import django; django.setup()", PROBE]
    cells = ["%load_ext ipy_dbreset"]
    if driver == "psycopg2":
        # The stop button cancels the query, as it does under psycopg 3.
        cells.append("%config DBReset.interruptible_psycopg2 = True")
    return [*cells, PROBE]


# -- an InteractiveShell in a process of its own -------------------------------

SHELL_CHILD = r"""
import json, os, signal, sys
spec = json.loads(sys.argv[3])
if spec["driver"] == "psycopg2":
    sys.modules["psycopg"] = None  # Django falls back to psycopg2
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from traitlets.config import Config

requests = os.fdopen(int(sys.argv[1]), "r")
answers = os.fdopen(int(sys.argv[2]), "w")
signal.signal(signal.SIGINT, signal.default_int_handler)  # the stop button: KeyboardInterrupt
config = Config()
config.HistoryManager.hist_file = ":memory:"
shell = InteractiveShell.instance(config=config)


def cell(code):
    with capture_output() as shown:
        result = shell.run_cell(code, store_history=True)
    error = result.error_in_exec or result.error_before_exec
    value = result.result
    if not (isinstance(value, list) and all(isinstance(v, int) for v in value)):
        value = None
    record = shell.user_ns["_walk_record"]() if "_walk_record" in shell.user_ns else "{}"
    return {
        "status": "ok" if error is None else "error",
        "ename": None if error is None else type(error).__name__,
        "evalue": None if error is None else str(error),
        "stdout": shown.stdout,
        "stderr": shown.stderr,
        "texts": [o.data.get("text/plain", "") for o in shown.outputs],
        "value": value,
        "record": json.loads(record),
    }


answers.write(json.dumps({"ready": os.getpid()}) + "\n")
answers.flush()
stray = 0
while True:
    try:
        line = requests.readline()
    except KeyboardInterrupt:
        stray += 1
        continue
    if not line:
        break
    try:
        answer = cell(json.loads(line)["code"])
    except KeyboardInterrupt:  # landed in the shell's own code, around the cell
        stray += 1
        answer = {"status": "error", "ename": "KeyboardInterrupt", "evalue": "outside the cell"}
    answer["stray"] = stray
    stray = 0
    answers.write(json.dumps(answer) + "\n")
    answers.flush()
"""


class ShellDriver:
    """IPython's ``InteractiveShell`` in a child process, one cell at a time over a pipe.

    The shell runs in the child's main thread, as in a terminal or a script:
    :meth:`interrupt` sends it a real SIGINT, which Python turns into
    ``KeyboardInterrupt`` in the running cell.
    """

    kind = "shell"

    def __init__(self, url: str, driver: str, *, load: bool = True) -> None:
        self.driver = driver
        request_read, self._requests = os.pipe()
        self._answers, answer_write = os.pipe()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
        self._folder = tempfile.mkdtemp(prefix="ipy_dbreset_walk_")
        env.update(
            IPY_DBRESET_DEMO_DB=url,
            IPY_DBRESET_DEMO_OTHER=os.path.join(self._folder, "other.sqlite3"),
            IPYTHONDIR=os.path.join(self._folder, "ipython"),
            PYTHONPATH=str(ROOT),
        )
        if not load:
            env["DJANGO_SETTINGS_MODULE"] = "demo.settings"
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(DEMO)])
        spec = json.dumps({"driver": driver})
        self._log = open(os.path.join(self._folder, "shell.log"), "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-c", SHELL_CHILD, str(request_read), str(answer_write), spec],
            cwd=DEMO,
            env=env,
            pass_fds=(request_read, answer_write),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        os.close(request_read)
        os.close(answer_write)
        self._buffer = b""
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._answers, selectors.EVENT_READ)
        ready = self._read(60)
        assert ready is not None and "ready" in ready, f"the shell did not start:\n{self.log()}"
        for code in setup_cells(driver, load=load):
            answer = self.run(code)
            assert answer is not None and answer.ok, f"setup cell failed: {code}\n{answer}"

    def log(self) -> str:
        self._log.flush()
        with open(self._log.name, "rb") as shown:
            return shown.read().decode(errors="replace")[-4000:]

    def start(self, code: str) -> None:
        os.write(self._requests, (json.dumps({"code": code}) + "\n").encode())

    def done(self) -> bool:
        return b"\n" in self._buffer or bool(self._selector.select(0))

    def finish(self, timeout: float = CELL_TIMEOUT) -> Answer | None:
        """The cell's answer; ``None`` if it did not finish in ``timeout`` seconds."""
        data = self._read(timeout)
        return None if data is None else Answer(**data)

    def run(self, code: str, timeout: float = CELL_TIMEOUT) -> Answer | None:
        self.start(code)
        return self.finish(timeout)

    def interrupt(self) -> None:
        os.kill(self.process.pid, signal.SIGINT)

    def _read(self, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or (self.process.poll() is not None and not self._selector.select(0)):
                return None
            if self._selector.select(min(left, 1.0)):
                chunk = os.read(self._answers, 1 << 16)
                if not chunk:
                    return None
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        data: dict[str, Any] = json.loads(line)
        return data

    def close(self) -> None:
        self._selector.close()
        for fd in (self._requests, self._answers):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.process.poll() is None:
            self.process.kill()  # the child we started, by its pid
        self.process.wait(timeout=30)
        self._log.close()


# -- a real Jupyter kernel ----------------------------------------------------------


class KernelDriver:
    """A real ipykernel; the stop button is the kernel manager's interrupt (SIGINT)."""

    kind = "kernel"

    def __init__(self, url: str, driver: str) -> None:
        self.driver = driver
        self._folder = tempfile.mkdtemp(prefix="ipy_dbreset_walk_")
        self.kernel = Kernel(
            cwd=DEMO,
            env={
                "IPY_DBRESET_DEMO_DB": url,
                "IPY_DBRESET_DEMO_OTHER": os.path.join(self._folder, "other.sqlite3"),
            },
        )
        self._thread: threading.Thread | None = None
        self._answer: Answer | None = None
        if driver == "psycopg2":
            self.kernel.ok("import sys; sys.modules['psycopg'] = None")
        for code in setup_cells(driver):
            answer = self.run(code)
            assert answer is not None and answer.ok, f"setup cell failed: {code}\n{answer}"

    def start(self, code: str) -> None:
        self._answer = None
        self._thread = threading.Thread(target=self._execute, args=(code,), daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def finish(self, timeout: float = CELL_TIMEOUT) -> Answer | None:
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            return None
        return self._answer

    def run(self, code: str, timeout: float = CELL_TIMEOUT) -> Answer | None:
        self.start(code)
        return self.finish(timeout)

    def interrupt(self) -> None:
        self.kernel.manager.interrupt_kernel()

    def _execute(self, code: str) -> None:
        answer = Answer(status="")

        def hook(msg: dict[str, Any]) -> None:
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                if content["name"] == "stdout":
                    answer.stdout += content["text"]
                else:
                    answer.stderr += content["text"]
            elif kind in ("execute_result", "display_data"):
                answer.texts.append(content["data"].get("text/plain", ""))
            elif kind == "error":
                answer.traceback += "\n".join(content.get("traceback", ()))

        client = self.kernel.client
        try:
            reply = client.execute_interactive(code, output_hook=hook, timeout=CELL_TIMEOUT)
        except TimeoutError:
            return
        content = reply["content"]
        answer.status = content["status"]
        if answer.status != "ok":
            answer.ename, answer.evalue = content.get("ename"), content.get("evalue")
        results = [t for t in answer.texts if not t.startswith("ipy_dbreset:")]
        if results:
            try:
                answer.value = ast.literal_eval(results[-1])
            except (ValueError, SyntaxError):
                answer.value = None
        # Silent: no cell callbacks run, nothing is checked or repaired.
        record = client.execute_interactive(
            "", silent=True, user_expressions={"walk": "_walk_record()"}, timeout=CELL_TIMEOUT
        )
        shown = record["content"].get("user_expressions", {}).get("walk", {})
        if shown.get("status") == "ok":
            answer.record = json.loads(ast.literal_eval(shown["data"]["text/plain"]))
        self._answer = answer

    def close(self) -> None:
        self.kernel.close()


# -- the server, seen from outside ------------------------------------------------


class Server:
    """The walk's own database, seen from an admin connection of its own (autocommit)."""

    def __init__(self, connect: Callable[[], Any], dbname: str) -> None:
        self.dbname = dbname
        self._connect = connect
        self.conn = connect()

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        if self.conn.closed:
            self.conn = self._connect()
        cursor = self.conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else []

    def committed(self) -> set[int]:
        return {n for (n,) in self.query("select number from shop_order")}

    def sessions(self) -> list[tuple[Any, ...]]:
        return self.query(
            "select pid, state, query from pg_stat_activity where datname = %s "
            "and backend_type = 'client backend' and pid <> pg_backend_pid()",
            (self.dbname,),
        )

    def terminate(self) -> int:
        return len(
            self.query(
                "select pg_terminate_backend(pid) from pg_stat_activity "
                "where datname = %s and pid <> pg_backend_pid()",
                (self.dbname,),
            )
        )

    def wait_gone(self, timeout: float = 15) -> bool:
        """Wait until the server lists no session on the database but ours."""
        return self._wait(lambda: not self.sessions(), timeout)

    def wait_running(self, query: str, done: Callable[[], bool], timeout: float = 15) -> bool:
        """Wait until a session runs ``query``; give up if the cell ended (``done``)."""

        def running() -> bool:
            return any(s == "active" and q == query for _, s, q in self.sessions()) or done()

        return self._wait(running, timeout) and not done()

    @staticmethod
    def _wait(condition: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def reset(self) -> None:
        """Every session gone, and ``shop_order`` holding the duplicate's row alone."""
        self.terminate()
        assert self.wait_gone(), f"sessions left on {self.dbname}: {self.sessions()}"
        self.query("truncate shop_order")
        self.query("insert into shop_order (number, customer) values (0, '')")

    def close(self) -> None:
        self.conn.close()


# -- what a notice claims ---------------------------------------------------------------

_ITEMS = re.compile(r"\([^()]*\)")
_ROWS = re.compile(r"writing (?:at least )?([\d,]+) rows?")
_COUNT = re.compile(r"([\d,]+) (?:unsaved )?(?:writes?|rows?|statements?)\b")
_SAVED = re.compile(r"\b(?:is|are) saved\b")


@dataclass
class Claim:
    """What one repair's line says (counts of rows; ``None``: a loss said without a count)."""

    line: str
    lost: int | None = 0
    loses: bool = False
    """It says something was lost (or rolled back)."""
    kept: int = 0
    keeps: bool = False
    in_flight: int = 0
    """Rows of a COMMIT in flight whose outcome a later notice is to tell."""
    settles: bool = False
    """It tells the outcome of a COMMIT whose answer was lost."""
    committed: bool = False
    """It says a COMMIT whose answer was lost committed."""
    unknown: bool = False
    """It says that outcome cannot be known."""


def _count(clause: str) -> int | None:
    text = _ITEMS.sub("", clause)  # "(INSERT shop_order x2)": kinds, not counts
    found = _ROWS.search(text) or _COUNT.search(text)
    return None if found is None else int(found.group(1).replace(",", ""))


def claim(line: str) -> Claim:
    """Read what one repair line claims, clause by clause."""
    said = Claim(line)
    _, _, rest = line.partition(": ")
    for clause in rest.split("; "):
        text = clause.strip().lower()
        if text.startswith("it committed") or _SAVED.search(text):
            said.settles = said.committed = True
        elif "not known" in text or "cannot be known" in text:
            said.settles = said.unknown = True
        elif text.startswith("a commit of") and "in flight" in text:
            said.in_flight += _count(text.partition(" was in flight")[0]) or 0
        elif "nothing" in text and "lost" in text:
            continue
        elif text.startswith("kept"):
            said.keeps = True
            said.kept += _count(text) or 0
        elif text.startswith(("lost", "rolled back", "discarded", "it rolled back")):
            said.settles = said.settles or text.startswith("it rolled back")
            said.loses = True
            count = _count(text)
            said.lost = None if count is None or said.lost is None else said.lost + count
    return said


# -- the walk ---------------------------------------------------------------------


@dataclass
class Violation:
    kind: str
    step: int
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} at step {self.step}: {self.detail}"


@dataclass
class Figures:
    """What a walk did."""

    cells: int = 0
    faults: int = 0
    failed_statements: int = 0
    repairs: int = 0
    tolerated: list[Violation] = field(default_factory=list)
    steps: list[tuple[Op, str | None]] = field(default_factory=list)
    """Each step run, with its cell's code (``None``: a fault between cells)."""


FAULTS = frozenset(name for name, (_, fault) in OPS.items() if fault)


class Chooser:
    """The next step of a walk of ``seed``: a random op the model allows now."""

    def __init__(self, seed: int, steps: int, ops: Iterable[str]) -> None:
        self.rng = random.Random(seed)
        self.steps = steps
        self.ops = [name for name in OPS if name in set(ops)]
        self.weights = [OPS[name][0] for name in self.ops]
        self._numbers = itertools.count(1, 2)  # a bulk write takes two
        self._labels = itertools.count(1)

    def __call__(self, model: Model, index: int) -> Op | None:
        if index >= self.steps:
            return None
        for _ in range(1000):
            (name,) = self.rng.choices(self.ops, self.weights)
            op = self._make(name, model)
            if op is not None and model.allowed(op):
                return op
        return None  # nothing these operations allow (write, for one, is always allowed)

    def _make(self, name: str, model: Model) -> Op | None:
        if name in ("write", "bulk_write", "kill_mid_cell"):
            return Op(name, next(self._numbers))
        if name in ("commit_kill", "commit_stop"):
            return Op(name, SLOW + next(self._numbers))
        if name == "savepoint":
            return Op(name, f"s{next(self._labels)}")
        if name in ("sp_rollback", "sp_release"):
            usable = model.user_savepoints()
            return Op(name, self.rng.choice(usable)) if usable else None
        return Op(name)


def replaying(ops: list[Op]) -> Callable[[Model, int], Op | None]:
    """Steps from a list; the ones the model does not allow at their turn are left out."""
    left = iter(ops)

    def choose(model: Model, index: int) -> Op | None:
        for op in left:
            if model.allowed(op):
                return op
        return None

    return choose


Driver = ShellDriver | KernelDriver


class Walker:
    """Run walks on fresh shells made by ``make``, against ``server``."""

    def __init__(
        self, make: Callable[[], Driver], server: Server, tolerate: Iterable[str] = ()
    ) -> None:
        self.make = make
        self.server = server
        self.tolerate = frozenset(tolerate)
        # Rows of a COMMIT in flight when its connection was lost, which a notice
        # said a later one would tell the outcome of.
        self._in_flight = 0
        """Kinds of violation counted in the figures but walked past (to find what lies beyond)."""

    def walk(self, choose: Callable[[Model, int], Op | None]) -> tuple[Violation | None, Figures]:
        self.server.reset()
        self._in_flight = 0
        driver = self.make()
        try:
            return self._walk(driver, choose)
        finally:
            driver.close()

    def _walk(
        self, driver: Driver, choose: Callable[[Model, int], Op | None]
    ) -> tuple[Violation | None, Figures]:
        model = Model()
        figures = Figures()
        first = driver.run("_walk_record()")  # the setup's own repairs, if any, are not the walk's
        assert first is not None and first.record.get("driver") == driver.driver, first
        for op in self._steps(model, choose):
            violation = self._step(driver, model, op, figures)
            if violation is not None and violation.kind.startswith(tuple(self.tolerate)):
                figures.tolerated.append(violation)
            elif violation is not None:
                return violation, figures
        return None, figures

    @staticmethod
    def _steps(model: Model, choose: Callable[[Model, int], Op | None]) -> Iterator[Op]:
        """The chosen steps, then those that settle what is left open (commit it all)."""
        for index in itertools.count():
            op = choose(model, index)
            if op is None:
                break
            yield op
        while model.closing():
            yield model.closing()[0]

    def _step(self, driver: Driver, model: Model, op: Op, figures: Figures) -> Violation | None:
        code = model.cell(op)
        figures.steps.append((op, code))
        step = len(figures.steps)
        figures.faults += op.name in FAULTS
        figures.failed_statements += op.name in ("duplicate", "duplicate_caught")
        if code is None:  # between cells: every backend terminated
            self.server.terminate()
            model.step(op, True)
            if not self.server.wait_gone():
                return Violation("server", step, "a terminated session is still there")
            return None
        answer = self._cell(driver, op, code)
        figures.cells += 1
        if answer is None:
            return Violation("hang", step, f"{op}: the cell did not end in {CELL_TIMEOUT:.0f}s")
        figures.repairs += len(answer.repairs)
        expect = model.step(op, answer.ok)
        if op.name == "idle_timeout" and not self.server.wait_gone():
            return Violation("server", step, "idle_in_transaction_session_timeout ended nothing")
        return self.check(step, op, expect, answer, model)

    def _cell(self, driver: Driver, op: Op, code: str) -> Answer | None:
        driver.start(code)
        if op.name in ("stop", "commit_stop", "commit_kill"):
            query = STOP_QUERY if op.name == "stop" else "COMMIT"
            if self.server.wait_running(query, driver.done):
                if op.name == "commit_kill":
                    self.server.terminate()
                else:
                    driver.interrupt()
        return driver.finish()

    def check(
        self, step: int, op: Op, expect: Expect, answer: Answer, model: Model
    ) -> Violation | None:
        """The first invariant the cell broke, if any."""
        shown = answer.stdout + answer.stderr

        def broken(kind: str, detail: str) -> Violation:
            return Violation(kind, step, f"{op}: {detail}")

        if "Error in callback" in shown:
            return broken("callback", _tail(shown))
        if answer.stray:
            return broken("stray interrupt", "an interrupt arrived outside the cell")
        if "ipy_dbreset" in answer.stderr:
            return broken("stderr", _tail(answer.stderr))
        error = f"{answer.ename}: {answer.evalue}"
        if expect.ok is True and not answer.ok:
            after = " (after a fault between cells)" if expect.after_fault else ""
            return broken("cell failed", f"{error}{after}")
        if expect.ok is False and answer.ok:
            return broken("cell succeeded", "the model expected it to fail")
        if not answer.ok and expect.errors and answer.ename not in expect.errors:
            return broken("cell failed", f"{error}, not one of {', '.join(expect.errors)}")
        if expect.value is not None and answer.value != expect.value:
            return broken("read", _difference("the cell read", answer.value, expect.value))
        on_server = self.server.committed()
        if on_server != model.committed:
            return broken("server", _difference("the server holds", on_server, model.committed))
        violation = self._notices(expect, answer)
        if violation is not None:
            return broken(*violation)
        return self._django(expect, answer, model, broken)

    def _notices(self, expect: Expect, answer: Answer) -> tuple[str, str] | None:
        claims = [claim(r["line"]) for r in answer.repairs]
        lines = " | ".join(c.line for c in claims) or "no repair"
        if any(c.settles for c in claims) and self._in_flight:
            # A COMMIT whose answer was lost, told now: it rolled back (the walk's do).
            expect.lost += self._in_flight
            expect.told, self._in_flight = True, 0
        if any(c.committed for c in claims):
            return "notice: committed", f"no COMMIT of the walk's can have committed: {lines}"
        if any(c.unknown for c in claims):
            return "notice: outcome unknown", f"the server knows it rolled back: {lines}"
        losing = [c for c in claims if c.loses]
        said = sum(c.lost or 0 for c in losing)
        deferred = sum(c.in_flight for c in claims)
        if any(c.lost is None for c in losing):
            return "notice: uncounted", f"a loss without a count ({expect.lost} rows lost): {lines}"
        if expect.told and expect.lost and not losing and not deferred:
            return "notice: untold", f"{expect.lost} rows lost, not said: {lines}"
        if said + deferred != expect.lost and (losing or deferred or expect.told):
            kind = "notice: phantom loss" if not expect.lost else "notice: count"
            shown = f"said {said}" + (f" and {deferred} in flight" if deferred else "")
            return kind, f"expected {expect.lost} rows lost, {shown}: {lines}"
        self._in_flight += deferred
        kept = sum(c.kept for c in claims)
        if losing and expect.kept and not any(c.keeps for c in claims):
            return "notice: kept", f"{expect.kept} rows kept, not said: {lines}"
        if kept != expect.kept and (losing or kept):
            return "notice: kept", f"expected {expect.kept} rows kept, said {kept}: {lines}"
        return None

    @staticmethod
    def _django(
        expect: Expect, answer: Answer, model: Model, broken: Callable[[str, str], Violation]
    ) -> Violation | None:
        record = answer.record
        if not record:
            return broken("record", "no record after the cell")
        depth, in_transaction = expect.django or (len(model.blocks), model.in_transaction)
        if record["depth"] != depth or bool(record["in_atomic_block"]) != bool(depth):
            return broken(
                "django",
                f"{record['depth']} atomic blocks open (in_atomic_block "
                f"{record['in_atomic_block']}), the model has {depth}",
            )
        if record["connected"] and record["autocommit"] != (not in_transaction):
            mode = "off" if in_transaction else "on"
            return broken("django", f"autocommit is {record['autocommit']}, should be {mode}")
        if record["needs_rollback"]:
            return broken("django", "the connection is still marked for rollback")
        return None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _tail(text: str, lines: int = 6) -> str:
    return "\n".join(_ANSI.sub("", text).strip().splitlines()[-lines:])


def _difference(what: str, actual: Iterable[int] | None, expected: Iterable[int]) -> str:
    if actual is None:
        return f"{what} nothing readable; expected {sorted(expected)}"
    have, want = set(actual), set(expected)
    parts = []
    if want - have:
        parts.append(f"missing {sorted(want - have)}")
    if have - want:
        parts.append(f"should not hold {sorted(have - want)}")
    return f"{what} {sorted(have)}: {', '.join(parts) or 'in another order'}"


# -- shrinking --------------------------------------------------------------------


class OutOfTime(Exception):
    pass


def shrink(
    walker: Walker, steps: list[Op], kind: str, seconds: float
) -> tuple[list[Op], Violation | None, Figures | None, int]:
    """The shortest sublist of ``steps`` found whose walk still breaks ``kind`` (ddmin).

    Returns it, its violation and figures, and how many walks were tried;
    stops improving after ``seconds``.
    """
    deadline = time.monotonic() + seconds
    found: dict[tuple[Op, ...], tuple[Violation, Figures]] = {}
    tries = 0

    def fails(candidate: list[Op], *, timed: bool = True) -> bool:
        nonlocal tries
        if timed and time.monotonic() > deadline:
            raise OutOfTime
        tries += 1
        violation, figures = walker.walk(replaying(candidate))
        if violation is not None and violation.kind == kind:
            found[tuple(candidate)] = (violation, figures)
            return True
        return False

    best = list(steps)
    try:
        best = ddmin(best, fails)
    except OutOfTime:
        if found:
            best = list(min(found, key=len))
    result = found.get(tuple(best))
    if result is None and fails(best, timed=False):  # the whole walk, replayed
        result = found[tuple(best)]
    violation, figures = result if result is not None else (None, None)
    return best, violation, figures, tries


def ddmin(items: list[Op], fails: Callable[[list[Op]], bool]) -> list[Op]:
    """Zeller's delta debugging: a 1-minimal sublist of ``items`` for which ``fails`` holds."""
    n = 2
    while len(items) >= 2:
        size = -(-len(items) // n)
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        for i, chunk in enumerate(chunks):
            if fails(chunk):
                items, n = chunk, 2
                break
            rest = [op for j, c in enumerate(chunks) if j != i for op in c]
            if len(chunks) > 2 and fails(rest):
                items, n = rest, max(n - 1, 2)
                break
        else:
            if n >= len(items):
                break
            n = min(2 * n, len(items))
    return items


def describe_steps(steps: Iterable[tuple[Op, str | None]]) -> Iterator[str]:
    """One line per step: the op, and its cell."""
    for number, (op, code) in enumerate(steps, 1):
        cell = "(between cells: every backend of the database terminated)" if code is None else code
        first, *more = cell.splitlines()
        yield f"  {number:3}. {op!s:22} {first}"
        for line in more:
            yield f"       {'':22} {line}"


__all__ = ["CELLS", "Chooser", "KernelDriver", "Server", "ShellDriver", "Walker", "shrink"]
