"""The IPython side: magics, configuration and cell callbacks.

A short session::

    In [1]: %load_ext ipy_dbreset
    ipy_dbreset: Django set up with 'shop.settings' (found in /src/shop/manage.py);
    DJANGO_SETTINGS_MODULE was set to it
    In [2]: Order.objects.create(number=1)   # IntegrityError: the cell fails ...
    ipy_dbreset: rolled back db 'default': a failed statement aborted the transaction; ...
    In [3]: Order.objects.count()            # ... and the next one works
    In [4]: %dbstatus
    In [5]: %dbreset

Configure it like any IPython extension, with ``%config`` or in
``ipython_config.py``::

    c.DBReset.check_before_cell = True
    c.DBReset.aborted_manual_transactions = "leave"
    c.DBReset.network_timeout = 30   # seconds a frozen network may hold a query

This module holds the engine (one :class:`~ipy_dbreset.checkup.Checkup`) and
connects it to the shell.  The rest of the IPython side: :mod:`~ipy_dbreset.output`
(notices), :mod:`~ipy_dbreset.options`, :mod:`~ipy_dbreset.interrupts`,
:mod:`~ipy_dbreset.switches` (what it changes in the process) and
:mod:`~ipy_dbreset.extension` (load and unload).
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from traitlets import All, Bool, Enum, Int, Unicode, observe

from ipy_dbreset.checkup import Checkup
from ipy_dbreset.display import (
    READ_ONLY_NOTE,
    Table,
    history_table,
    imports_line,
    read_only_line,
    reset_notice,
    status_table,
)
from ipy_dbreset.failover import ConnectBound, connect_timeout, refused_as_read_only
from ipy_dbreset.health import cancelled
from ipy_dbreset.interrupts import (
    in_kernel,
    in_subshell,
    interrupts_held,
    pass_on,
    resets_sigint,
    sigint_kernel,
)
from ipy_dbreset.names import import_into, imported_already
from ipy_dbreset.network import InterruptGuard, Network
from ipy_dbreset.options import Seconds, Verbosity, config_checked, parse
from ipy_dbreset.output import Output, ResetResult
from ipy_dbreset.project import ProjectError, Source, setup_django
from ipy_dbreset.readonly import refused
from ipy_dbreset.switches import Switches

if TYPE_CHECKING:
    from collections.abc import Callable

    from IPython.core.interactiveshell import ExecutionInfo, ExecutionResult, InteractiveShell
    from traitlets.utils.bunch import Bunch

log = logging.getLogger(__name__)

EVENTS = ("pre_run_cell", "post_run_cell")

_thread_id = threading.get_ident  # asked around every cell: one lookup saved

LEAKING_IPYKERNELS = frozenset(("7.0.0", "7.0.1"))
"""ipykernel releases that run every cell in a context of its own."""


def leaking_ipykernel(shell: InteractiveShell | None) -> str | None:
    """The version of the ipykernel running ``shell`` if it is one of :data:`LEAKING_IPYKERNELS`."""
    if getattr(shell, "kernel", None) is None:
        return None
    ipykernel = sys.modules.get("ipykernel")
    version = getattr(ipykernel, "__version__", None)
    return version if version in LEAKING_IPYKERNELS else None


@magics_class
class DBReset(Magics):
    """Repair broken Django database connections between cells."""

    auto_repair = Bool(
        True, help="Judge every connection after each cell and repair the broken ones."
    ).tag(config=True)
    check_before_cell = Bool(
        True,
        help=(
            "Also judge connections before each cell (no server round trip while they are "
            "healthy), so that a connection the server dropped between cells is repaired "
            "before the cell's first query."
        ),
    ).tag(config=True)
    aborted_manual_transactions = Enum(
        ("rollback", "leave"),
        "rollback",
        help=(
            "What to do with an aborted manual transaction (set_autocommit(False)): roll it "
            "back (it cannot be committed anyway), or leave it to you with a hint."
        ),
    ).tag(config=True)
    allow_async_unsafe = Bool(
        True,
        help=(
            "In a Jupyter kernel cells run inside an event loop, where Django refuses ORM "
            "calls; set DJANGO_ALLOW_ASYNC_UNSAFE=true so that they work. ipy_dbreset's own "
            "repairs work either way."
        ),
    ).tag(config=True)
    interruptible_psycopg2 = Bool(
        False,
        help=(
            "Let the stop button / Ctrl-C cancel a running query under psycopg2, which "
            "otherwise cannot be interrupted until the server answers (psycopg 3 can "
            "always). Uses psycopg2's wait_select callback: COPY and large objects are "
            "then unavailable."
        ),
    ).tag(config=True)
    network_timeout = Int(
        60,
        min=0,
        help=(
            "Seconds the network may stay silent (no packet answered) before a connection "
            "ends with a connection error: TCP keepalive and TCP_USER_TIMEOUT on every "
            "connection whose OPTIONS do not set their own. A query that runs long on a "
            "path that answers is never cut. macOS and Windows have no TCP_USER_TIMEOUT: "
            "there the bound is keepalive's, which a query sent into a path that already "
            "froze outlasts. 0: no bound (keepalive still keeps idle connections through "
            "NATs and firewalls)."
        ),
    ).tag(config=True)
    settings_module = Unicode(
        None,
        allow_none=True,
        help=(
            "Django settings module to use when Django is not set up yet; wins over "
            "DJANGO_SETTINGS_MODULE and manage.py."
        ),
    ).tag(config=True)
    idle_release = Seconds(
        0.0,
        help=(
            "Seconds the shell may wait for input before idle connections are closed (the "
            "shell thread's, and those of pool workers waiting for work, as the async ORM's), "
            "to free them on a shared server; the next query reconnects. A "
            "connection holding a transaction or session state (SET, temporary tables, "
            "advisory locks, LISTEN, PREPARE) is kept. 0: never."
        ),
    ).tag(config=True)
    long_transaction = Seconds(
        600.0,
        help=(
            "Seconds a transaction may stay open between cells before it is pointed out "
            "(once, at the next cell; it is left as it is). 0: never."
        ),
    ).tag(config=True)
    read_only = Bool(
        False,
        help=(
            "Make every Django connection refuse writes at the server (PostgreSQL "
            "default_transaction_read_only, MySQL SESSION TRANSACTION READ ONLY, SQLite "
            "query_only), in every thread and after every reconnect; turning it off takes "
            "effect at each connection's next transaction. A guard against mistakes, not "
            "security: use a database role that may only read for that."
        ),
    ).tag(config=True)
    auto_imports = Bool(
        True,
        help=(
            "When %load_ext sets up Django, import the names this project's manage.py shell "
            "would give (Django 5.2+: every model, and what the project's shell command "
            "adds; 4.2: the models), never replacing a name you have. Nothing is imported "
            "in manage.py shell and shell_plus, which do it themselves."
        ),
    ).tag(config=True)
    verbosity = Verbosity(
        1,
        help=(
            "0: say nothing (use logging), 1: one line per repair, 2: also setup details "
            "and the connections left alone because their thread was using them."
        ),
    ).tag(config=True)

    def __init__(self, shell: InteractiveShell, **kwargs: Any) -> None:
        # Before super().__init__: it loads the shell's config, which runs the observers.
        # The engine: watches connections from start() to stop().
        self.checkup = Checkup(threading.current_thread())
        # True while both callbacks have nothing to do (see records.Calm).
        self._calm = self.checkup.calm
        # The shell's own thread; a cell in any other (an ipykernel 7 subshell's)
        # is judged on that thread's own connections only.
        self._home = _thread_id()
        self._running = False  # between start() and stop()
        self.network: Network | None = None  # keepalive and the stop button's path check
        # What lasts only for the running cell (%dbreset's result kept out of
        # Out[n], an interrupt waiting to stop the cell): what undoes each, run
        # as the cell ends.
        self._at_cell_end: list[Callable[[], None]] = []
        # What the user sees: notices at the verbosity asked for (kept in step
        # by _copy_options), held back while a kernel starts up.
        self._output = Output(shell, at_cell_end=self._at_cell_end)
        self._say = self._output.say
        # The process-wide switches (DJANGO_ALLOW_ASYNC_UNSAFE, psycopg2's wait
        # callback) that start() and the options turn, for stop() to turn back.
        self._switches = Switches(self._say)
        # The connect_timeout given to aliases that set none, from network_timeout.
        self._connect_bound = ConnectBound()
        # What the callbacks do, read as plain attributes around every cell
        # (trait reads cost more than judging a healthy connection): whether
        # to check, the checkup's fast path and its full check.
        self._check_before = self._check_after = False
        self._healthy = self.checkup.healthy
        self._check_all = self.checkup.check_all
        self._before_cell, self._after_cell = self.checkup.before_cell, self.checkup.after_cell
        self.callbacks: dict[str, Callable[[Any], None]] = {}
        """What IPython calls around every cell, by event name, once started (see
        _cell_callbacks)."""
        with config_checked(self, shell):  # a refused value: BadOption, in one line
            super().__init__(shell=shell, **kwargs)

    # -- life cycle ----------------------------------------------------------

    def start(self) -> None:
        """Set up Django and start watching connections; raise UsageError if it cannot."""
        if in_subshell(self.shell):
            # Its thread would be taken for the shell's, and the main shell's
            # cells for another thread's.
            raise UsageError(
                "ipy_dbreset: load the extension in the kernel's main shell (the notebook), "
                "not in a subshell; it then covers the subshells' cells too"
            )
        try:
            setup = setup_django(self.settings_module)
        except ProjectError as exc:
            raise UsageError(f"ipy_dbreset: {exc}") from None
        self.network = Network(
            self.network_timeout,
            per_cell=resets_sigint(self.shell),
            kernel=sigint_kernel(self.shell),
        )
        self.checkup.start(on_created=self.network.tune)
        self.callbacks = self._cell_callbacks(self.network.guard)
        self._output.start()
        self._running = True
        self._copy_options()
        self._idle_changed()
        self._connect_bound.apply(connect_timeout(self.network_timeout))
        with self._output.together():  # one block for one %load_ext
            if setup.source is not Source.ALREADY_SET_UP:
                # It may have written DJANGO_SETTINGS_MODULE: say so, at least in the log.
                self._say(setup.describe())
            else:
                self._say(f"using Django as it was set up, with {setup.settings_module!r}", 2)
            self._apply_async_unsafe()
            self._apply_interruptible()
            leaking = leaking_ipykernel(self.shell)
            if leaking is not None:
                self._say(
                    f"ipykernel {leaking} runs each cell in a new context: Django opens a new "
                    "database connection in every cell and leaves the old ones open; "
                    "pip install -U ipykernel",
                    0,
                    kind="error",
                )
            if self.read_only:
                self._read_only_changed()
            if self.auto_imports and self.shell is not None:
                self._import_names(self.shell)

    def _import_names(self, shell: InteractiveShell) -> None:
        if imported_already(getattr(shell.extension_manager, "loaded", ())):
            return
        # They stay when the extension is unloaded: by then they are the user's
        # names as much as ours, and taking one away could break their session.
        try:
            imported = import_into(shell.user_ns)
        except ImportError as exc:  # a model module or a name the project lists is broken
            self._say(f"imported no names as manage.py shell does: {exc}", 0, kind="error")
            return
        said = imports_line(imported)
        if said:
            self._say(said, 1)

    def stop(self) -> None:
        """Stop watching connections and undo what :meth:`start` changed, saying what."""
        if self.network is not None:
            self.network.guard.unhook()
            self.network.guard.disarm()
            self.network = None
        self._connect_bound.remove()
        self._output.stop()
        if self._running:
            self.checkup.stop()
            self._running = False
            self._copy_options()
        while self._at_cell_end:
            self._at_cell_end.pop()()
        undone = self._switches.undo()
        if undone:
            # The process is not as it was while loaded: the next ORM call may fail.
            self._say(f"unloaded; {'; '.join(undone)}")

    @observe("allow_async_unsafe")
    def _apply_async_unsafe(self, change: Bunch | None = None) -> None:
        if self._running:
            self._switches.async_unsafe(self.allow_async_unsafe, in_kernel=in_kernel(self.shell))

    @observe("interruptible_psycopg2")
    def _apply_interruptible(self, change: Bunch | None = None) -> None:
        if self._running:
            self._switches.interruptible_psycopg2(self.interruptible_psycopg2)

    @observe("idle_release", "long_transaction")
    def _idle_changed(self, change: Bunch | None = None) -> None:
        if self._running:
            self.checkup.configure_idle(
                release_after=self.idle_release, long_transaction=self.long_transaction
            )

    @observe("read_only")
    def _read_only_changed(self, change: Bunch | None = None) -> None:
        if self._running:
            self._say(read_only_line(self.checkup.read_only(self.read_only)), 0)

    @observe("network_timeout")
    def _network_timeout_changed(self, change: Bunch) -> None:
        if self._running:
            self._connect_bound.apply(connect_timeout(change["new"]))
        if self.network is not None:
            self.network.timeout = change["new"]
            for tracked in self.checkup.tracked():
                self.network.tune(tracked.wrapper)

    @observe(All)
    def _option_changed(self, change: Bunch) -> None:
        self._calm.quiet = False  # whatever it changes, the next callbacks run in full

    @observe("auto_repair", "check_before_cell", "aborted_manual_transactions", "verbosity")
    def _copy_options(self, change: Bunch | None = None) -> None:
        # Read where a trait would cost too much: around every cell, in each check, per notice.
        self._check_after = self._running and self.auto_repair
        self._check_before = self._check_after and self.check_before_cell
        self.checkup.leave_manual_transactions = self.aborted_manual_transactions == "leave"
        self._output.verbosity = self.verbosity

    # -- callbacks -----------------------------------------------------------

    # The two methods below are the callbacks' full path: they read plain
    # attributes and do nothing else unless the checkup's fast path found something.

    def _cell_callbacks(self, guard: InterruptGuard) -> dict[str, Callable[[Any], None]]:
        """The two callbacks IPython runs around every cell.

        While the checkup has nothing to do (records.Calm) and no socket has
        input, each only stands the stop button's guard in front of SIGINT or
        steps it back; otherwise it calls the method of its name.  Closures,
        not bound methods: a kernel's cell leaves the caches cold, and an
        attribute of a traitlets class is then a walk up a long class
        hierarchy; these read a few slots and their own cells.
        """
        calm, home, at_cell_end = self._calm, self._home, self._at_cell_end
        arm, cell_over = guard.arm, guard.cell_over
        full_pre, full_post = self.pre_run_cell, self.post_run_cell

        def pre_run_cell(info: ExecutionInfo) -> None:
            if calm.quiet and _thread_id() == home:
                pending = calm.pending
                if pending is None or not pending():
                    if guard.watching:
                        arm()
                    return
            full_pre(info)

        def post_run_cell(result: ExecutionResult | None) -> None:
            if (
                calm.quiet
                and _thread_id() == home
                and (result is None or result.error_in_exec is None)
                and not at_cell_end
            ):
                if guard.watching:
                    cell_over()
                return
            full_post(result)

        return {"pre_run_cell": pre_run_cell, "post_run_cell": post_run_cell}

    def pre_run_cell(self, info: ExecutionInfo) -> None:
        """Repair what broke between cells, before this cell's first query."""
        if _thread_id() != self._home:
            self._own_cell_starts()
            return
        if self._output.held:
            self._output.show_held(info)
        if self._running:
            if self.network is not None:
                self.network.guard.arm()
            said = self._before_cell()
            if said:
                self._output.say_all(said)
        if self._check_before:
            try:
                if not self._healthy(True, False):
                    self._check(suspect=False, before_cell=True)
            except KeyboardInterrupt:  # the user stopped the cell as it began
                pass_on(self.shell, before_cell=True, at_cell_end=self._at_cell_end)
        self._settle()

    def post_run_cell(self, result: ExecutionResult | None) -> None:
        """Repair what the cell (or the display of its result) left broken."""
        if _thread_id() != self._home:
            self._own_cell_ends(result)
            return
        if self._running and self.network is not None:
            self.network.guard.cell_over()
        while self._at_cell_end:  # a displayhook set aside, a cell to stop
            self._at_cell_end.pop()()
        error = None if result is None else result.error_in_exec
        if self._running:
            # Before the checkup, which takes the marks of the connections the cell used.
            said = self._after_cell()
            if said:
                self._output.say_all(said)
            if error is not None:
                self._refused(error)
        if self._check_after:
            # A cell that raised nothing can only have left a trace in the
            # driver's and Django's state; the sockets are for the next check.
            # One that raised may have marked a block for rollback without a query.
            failed = error is not None
            suspect = failed and (isinstance(error, KeyboardInterrupt) or cancelled(error))
            try:
                if suspect or not self._healthy(failed, failed):
                    self._check(suspect=suspect, before_cell=False)
            except KeyboardInterrupt:  # the cell is over: nothing left to interrupt
                log.info("ipy_dbreset: interrupt after the cell ignored")
        self._settle()

    def _settle(self) -> None:
        """After a callback's work: whether the next ones have none (records.Calm).

        Only where both run in full by default; otherwise they always do.
        """
        if not self._check_before:
            return
        calm = self._calm
        calm.quiet = True  # first: whatever comes after this sets it false again
        if self._output.held or self._at_cell_end or not self.checkup.quiet():
            calm.quiet = False

    # A subshell's cell: no signal reaches its thread, and what lasts for a
    # cell, the guard and the idle keeper are the shell thread's.

    def _own_cell_starts(self) -> None:
        if self._running:
            self._output.checked(self.checkup.own_cell_starts(check=self._check_before))

    def _own_cell_ends(self, result: ExecutionResult | None) -> None:
        error = None if result is None else result.error_in_exec
        if self.read_only and refused(error):
            self._say(read_only_line(None), 0)
        suspect = error is not None and cancelled(error)
        outcome = self.checkup.own_cell_ends(check=self._check_after, suspect=suspect)
        self._output.checked(outcome)

    def _refused(self, error: BaseException) -> None:
        """A write the server refused: because of read-only mode, or on a standby."""
        if self.read_only:
            if refused(error):
                self._say(read_only_line(None), 0)
        elif refused_as_read_only(error):
            with interrupts_held():
                self._output.checked(self.checkup.leave_standbys())

    def _check(self, *, suspect: bool, before_cell: bool) -> None:
        """Check in full; a repair and its notice are done whole, whatever the user presses."""
        with interrupts_held() as interrupts:
            try:
                outcome = self._check_all(suspect=suspect)
            except KeyboardInterrupt:  # pressed twice: the repair may be half done
                self._say("interrupted before the repair was done; run %dbreset", 0, kind="error")
            else:
                self._output.checked(outcome)
        if interrupts:
            pass_on(self.shell, before_cell=before_cell, at_cell_end=self._at_cell_end)

    # -- magics --------------------------------------------------------------

    @magic_arguments()
    @argument("-q", "--quiet", action="store_true", help="Do not print what was done.")
    @argument(
        "aliases",
        nargs="*",
        metavar="ALIAS",
        help="Database aliases to reset (default: every connection in use).",
    )
    @line_magic
    def dbreset(self, line: str) -> ResetResult:
        """Reset Django database connections now.

        Rolls back whatever each connection holds (open atomic blocks, a manual
        transaction) and closes it; the next query opens a fresh connection.
        Connections owned by another thread are reset only while that thread
        is not using them; those left are named.  Returns the list of what was
        reset, with ``.left`` (alias, thread) of those left and ``.failed``
        those the database would not let go of (shown even with ``-q``).

        Examples
        --------
        ::

            %dbreset                 # every connection in use
            %dbreset default replica
            result = %dbreset -q
        """
        args = parse(self.dbreset, line, self.checkup.aliases)
        outcome = self.checkup.reset(args.aliases)
        result = ResetResult(outcome, reset_notice(outcome, args.aliases))
        if not args.quiet or outcome.failures:  # the connection is still broken: say so
            self._say(result.notice, 0)
        self._output.not_as_output(result)
        return result

    @magic_arguments()
    @argument(
        "--history",
        action="store_true",
        help="Show the session's repairs instead, newest first, with what was lost.",
    )
    @argument(
        "aliases",
        nargs="*",
        metavar="ALIAS",
        help="Database aliases to show (default: every connection in use).",
    )
    @line_magic
    def dbstatus(self, line: str) -> Table:
        """Show every Django connection in use: driver, server pid, transaction state.

        One row per connection (alias, and its thread when it is not this
        one); the state says what an open transaction holds (how many
        writes, open for how long) and whether autocommit is off.  Under a
        row: its last repair and why idle_release keeps it open.  Nothing is
        queried: the table is built from what Django and the driver know
        locally, and never shows a password.

        Examples
        --------
        ::

            %dbstatus
            %dbstatus default
            %dbstatus --history      # what was repaired this session, and lost
        """
        args = parse(self.dbstatus, line, self.checkup.aliases)
        if args.history:
            return self._output.fitted(history_table(self.checkup.history(args.aliases)))
        table = status_table(self.checkup.status(args.aliases))
        if self.checkup.is_read_only:
            table.notes.append(READ_ONLY_NOTE)
        return self._output.fitted(table)
