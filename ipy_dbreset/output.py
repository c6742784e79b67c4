"""What the user sees of the extension in the shell: notices, and what ``%dbreset`` returns.

:class:`Output` shows a notice if the verbosity asks for it, holds back what a
kernel says while it starts up (no cell could show it yet) for the first cell,
and keeps ``%dbreset``'s :class:`ResetResult` from showing again as the cell's
``Out[n]`` once its notice is said.  What a notice says is
:mod:`ipy_dbreset.display`'s; when to say it, the magics'.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import weakref
from typing import TYPE_CHECKING, Any, TypeVar

from IPython.display import display

from ipy_dbreset.display import (
    LEVELS,
    Notice,
    Table,
    failure_notice,
    repair_notice,
    skipped_notice,
    still_open_line,
)
from ipy_dbreset.records import StillOpen

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from types import TracebackType

    from IPython.core.displayhook import DisplayHook
    from IPython.core.interactiveshell import ExecutionInfo, InteractiveShell

    from ipy_dbreset.checkup import Outcome
    from ipy_dbreset.idle import Said
    from ipy_dbreset.records import Repair

log = logging.getLogger(__name__)

Shown = TypeVar("Shown", Notice, Table)


class ResetResult(list["Repair"]):
    """What ``%dbreset`` did: one :class:`~ipy_dbreset.repair.Repair` per connection reset.

    ``.left``: (alias, thread) of the connections left alone because their
    thread was using them; ``.failed``: those that could not be reset, with the
    database's error.  Shown later (``result`` alone in a cell), it shows the
    notice; the cell that ran the magic does not show it as its output.
    """

    def __init__(self, outcome: Outcome, notice: Notice) -> None:
        super().__init__(outcome.repairs)
        self.notice = notice
        self.left = list(outcome.skipped)
        self.failed = list(outcome.failures)

    def _ipython_display_(self) -> None:
        display(self.notice)


class Output:
    """Notices for ``shell``, at the verbosity asked for, shown where a cell can show them.

    Parameters
    ----------
    shell
        The shell the notices are for (``None``: shown as they are said).
    verbosity
        The highest level of notice shown; the owner keeps it in step with
        its option.
    at_cell_end
        Where :meth:`not_as_output` leaves what undoes it; the caller runs
        it as the cell ends.
    """

    def __init__(
        self,
        shell: InteractiveShell | None,
        *,
        verbosity: int = 1,
        at_cell_end: list[Callable[[], None]],
    ) -> None:
        self.shell = shell  # where notices go; its kernel, if any, decides when
        # 0: only what the user must know (a failed repair), 1: one line per
        # repair, 2: also setup details and the connections left alone.
        self.verbosity = verbosity
        # Said while a kernel started up, before any cell could show it: shown
        # with the first cell's output.
        self.held: list[Notice] = []
        # The displayhook that not_as_output set aside for the rest of its
        # cell, and the results it keeps from showing as Out[n].
        self._displayhook: DisplayHook | None = None
        self._hidden: list[ResetResult] = []
        self._at_cell_end = at_cell_end  # the caller's, run as the cell ends
        # A cell's KeyboardInterrupt shown without our frames, from start() to stop().
        self._tracebacks = None if shell is None else InterruptTracebacks(shell)
        # The project's handlers that write to this shell's screen, which we
        # asked to skip the records of notices shown there (see _log).
        self._quieted: weakref.WeakSet[logging.Handler] = weakref.WeakSet()
        # While start-up says its lines (together()): they are shown as one block.
        self._gathered: list[Notice] | None = None

    def start(self) -> None:
        """Once Django is set up: our loggers working, our frames out of interrupts."""
        enable_our_loggers()
        if self._tracebacks is not None:
            self._tracebacks.install()

    def stop(self) -> None:
        if self._tracebacks is not None:
            self._tracebacks.remove()
        for handler in list(self._quieted):
            handler.removeFilter(SHOWN_HERE)
        self._quieted.clear()

    def say(self, notice: Notice | str, level: int = 1, *, kind: str = "info") -> None:
        """Log ``notice`` and show it if ``verbosity`` is at least ``level`` (0: always).

        A string is a notice of ``kind``.  Each line is a log record of
        ``ipy_dbreset.output``, at its kind's level, whatever the verbosity.
        """
        if isinstance(notice, str):
            notice = Notice(notice, kind)
        shown = self.verbosity >= level
        # What verbosity 1 leaves out (details, what was done at no cost) is
        # DEBUG in the log when nothing was lost, as Django logs its own details.
        self._log(notice, shown=shown, details=level >= 2)
        if not shown:
            return
        if self._gathered is not None:
            self._gathered.append(notice)
        else:
            self._show(notice)

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Show what is said in the block as one notice, at its end (start-up's lines)."""
        gathered: list[Notice] = []
        self._gathered = gathered
        try:
            yield
        finally:
            self._gathered = None
            if gathered:
                notice = gathered[0]
                for more in gathered[1:]:
                    notice += more
                self._show(notice)

    def _show(self, notice: Notice) -> None:
        if getattr(self.shell, "kernel", None) is not None and not ran_a_cell(self.shell):
            # Sent now, it would belong to no cell and no notebook would show it.
            # A terminal shows it as it is printed.
            self.held.append(notice)
        else:
            display(self.fitted(notice))

    def _log(self, notice: Notice, *, shown: bool, details: bool = False) -> None:
        """One record per line, at its kind's level; ``shown``: the user sees the notice.

        A record of a notice shown here carries ``ipy_dbreset_shown``: a handler
        of the project's that writes to this same screen (a console handler on
        the root logger, as many projects' LOGGING has at INFO) skips it, or the
        user would read every line twice.  Every other handler (a file, an
        error tracker, one on the ``ipy_dbreset`` logger) gets every record.
        """
        if shown:
            self._quiet_screen_handlers()
        extra = {SHOWN: shown}
        for kind, line in notice.pairs:
            level = LEVELS.get(kind, logging.INFO)
            if details and level == logging.INFO:
                level = logging.DEBUG
            log.log(level, "ipy_dbreset: %s", line, extra=extra)

    def _quiet_screen_handlers(self) -> None:
        in_kernel = getattr(self.shell, "kernel", None) is not None
        logger: logging.Logger | None = log
        while logger is not None:
            for handler in logger.handlers:
                if handler not in self._quieted and _writes_to_screen(handler, in_kernel):
                    handler.addFilter(SHOWN_HERE)
                    self._quieted.add(handler)
            logger = logger.parent if logger.propagate else None

    def say_all(self, said: Sequence[Said]) -> None:
        """Say each (level, record) the checkup has to say as a cell starts or ends."""
        for level, what in said:
            self.say(
                still_open_line(what) if isinstance(what, StillOpen) else repair_notice([what]),
                level,
            )

    def checked(self, outcome: Outcome) -> None:
        """Say what a check did: a failure always, a repair, the connections left alone."""
        if outcome.failures:
            self.say(failure_notice(outcome), 0)
        elif outcome.repairs:
            self.say(repair_notice(outcome.repairs))
        if outcome.skipped:
            self.say(skipped_notice(outcome), 2)

    def fitted(self, shown: Shown) -> Shown:
        """``shown`` wrapped, as text, to the width of the terminal the shell prints to.

        A terminal wraps a long line wherever its last column falls, mid-word;
        a notebook or a kernel's other front ends wrap it themselves.
        """
        shown.width = terminal_width(self.shell)
        return shown

    def show_held(self, info: ExecutionInfo) -> None:
        """Show what was held back, with the cell ``info`` if it is the user's first."""
        if ran_a_cell(self.shell, info):  # exec_lines at start-up run as cells: not yet
            held, self.held = self.held, []
            for notice in held:
                display(notice)

    def not_as_output(self, result: ResetResult) -> None:
        """Keep this cell from showing ``result`` as its output if it ends with the magic.

        The notice is said already (or unwanted, ``-q``).  Even a result that
        displays nothing gets an empty ``Out[n]:`` line in a terminal: the
        displayhook writes the prompt before it formats.  So, for the rest of
        the cell, ``sys.displayhook`` skips ``result`` and passes every other
        value on (the cell's display trap puts the shell's own back after it).
        """
        if getattr(sys.displayhook, "__self__", None) is self:
            self._hidden.append(result)  # another %dbreset in the same cell
        elif self.shell is not None and sys.displayhook is self.shell.displayhook:
            # (otherwise not in a cell: there is no Out[n] to keep quiet)
            self._displayhook, self._hidden = self.shell.displayhook, [result]
            sys.displayhook = self._display_unless_hidden
            self._at_cell_end.append(self._put_back_displayhook)

    def _display_unless_hidden(self, value: object) -> None:
        hook = self._displayhook
        if hook is None:  # the cell is over; only a stray reference calls this
            sys.__displayhook__(value)
        elif value is None or not any(value is hidden for hidden in self._hidden):
            hook(value)
        elif not hook.quiet():
            # What DisplayHook.__call__ (IPython 8, 9) does besides showing the
            # value: _, Out[n] and the cell's result stay as usual.
            hook.update_user_ns(value)
            hook.fill_exec_result(value)

    def _put_back_displayhook(self) -> None:
        hook, self._displayhook, self._hidden = self._displayhook, None, []
        if hook is not None and getattr(sys.displayhook, "__self__", None) is self:
            sys.displayhook = hook  # (unless the cell put it back already)


# -- the log -------------------------------------------------------------------------

SHOWN = "ipy_dbreset_shown"
"""The attribute of a record whose notice the shell shows (see :meth:`Output._log`)."""


class _ShownHere(logging.Filter):
    """On a handler that writes to the shell's screen: skips the records of notices shown there."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, SHOWN, False)


SHOWN_HERE = _ShownHere()


def _writes_to_screen(handler: logging.Handler, in_kernel: bool) -> bool:
    """Whether ``handler`` writes where the shell shows its notices.

    The shell's own output streams: in a kernel, those it sends to the
    notebook; in a terminal, the terminal, whichever stream reaches it.  A
    file, or a kernel's own stderr (the terminal that started Jupyter), is
    somewhere else.
    """
    if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
        return False
    stream = handler.stream
    if stream is sys.stdout or stream is sys.stderr:
        return True
    if in_kernel:
        return False
    try:
        return bool(stream.isatty()) and bool(sys.stdout.isatty())
    except (AttributeError, ValueError):  # a stand-in stream, or a closed one
        return False


def enable_our_loggers() -> None:
    """Enable the ``ipy_dbreset`` loggers that a logging configuration disabled.

    ``dictConfig`` with ``disable_existing_loggers`` (Django's LOGGING
    default) disables every logger that exists then and that it does not
    name, as ours do when the extension sets Django up.  A configuration that
    names ours configures them: it leaves them enabled.
    """
    for name, logger in list(logging.root.manager.loggerDict.items()):
        ours = name == "ipy_dbreset" or name.startswith("ipy_dbreset.")
        if ours and isinstance(logger, logging.Logger) and logger.disabled:
            logger.disabled = False
            log.debug("ipy_dbreset: logger %s enabled again after logging was configured", name)


# -- the user's tracebacks ----------------------------------------------------------

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep  # every module of ours is below


def _ours(entry: TracebackType) -> bool:
    return entry.tb_frame.f_code.co_filename.startswith(_PACKAGE)


def leave_out_our_frames(error: BaseException) -> None:
    """Unlink the extension's frames from ``error``'s traceback, and its causes', in place.

    In place, so that ``%tb``, ``%debug`` and ``sys.last_traceback`` see the
    same.  A traceback made of our frames alone is the extension's own error:
    it is left whole.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        kept = []
        entry = current.__traceback__
        while entry is not None:
            if not _ours(entry):
                kept.append(entry)
            entry = entry.tb_next
        if kept:
            for one, following in zip(kept, [*kept[1:], None], strict=True):
                one.tb_next = following
            current.__traceback__ = kept[0]
        pending += [current.__cause__, current.__context__]


class InterruptTracebacks:
    """Shows a cell's KeyboardInterrupt without the extension's frames.

    The stop button reaches a running cell through the extension's SIGINT
    handler (:class:`~ipy_dbreset.network.InterruptGuard`), so the handler's
    frames end the interrupt's traceback.  Every other frame of ours that can
    stand between the user's code and an error sets ``__tracebackhide__``, which
    IPython's tracebacks (``%xmode`` Context, Verbose, Docs) leave out, but never
    the innermost frame, where the error was raised.  For KeyboardInterrupt,
    IPython's hook for exceptions a shell shows its own way
    (``set_custom_exc``) takes our frames out of the traceback and shows it as
    IPython would; exceptions another handler was set for stay its own.
    """

    def __init__(self, shell: InteractiveShell) -> None:
        self.shell = shell
        # The shell's custom exceptions and handler before ours (IPython's: none).
        self._theirs: tuple[tuple[type[BaseException], ...], Any] = ((), None)
        self._handler: Any = None  # ours, as the shell holds it, while installed

    def install(self) -> None:
        shell = self.shell
        if self._handler is not None and shell.CustomTB is self._handler:
            return
        self._theirs = (tuple(shell.custom_exceptions), shell.CustomTB)
        shell.set_custom_exc((*self._theirs[0], KeyboardInterrupt), self._show)
        self._handler = shell.CustomTB

    def remove(self) -> None:
        """Put the shell's handler back, unless another replaced ours meanwhile."""
        shell = self.shell
        if self._handler is not None and shell.CustomTB is self._handler:
            shell.custom_exceptions, shell.CustomTB = self._theirs
        self._handler = None

    def _show(
        self,
        shell: InteractiveShell,
        etype: type[BaseException],
        value: BaseException,
        tb: TracebackType | None,
        tb_offset: int | None = None,
    ) -> Any:
        types, theirs = self._theirs
        if types and isinstance(value, types):
            return theirs(etype, value, tb, tb_offset=tb_offset)
        leave_out_our_frames(value)
        shell.showtraceback(
            (etype, value, value.__traceback__), tb_offset=tb_offset, running_compiled_code=True
        )
        return None


def terminal_width(shell: InteractiveShell | None) -> int | None:
    """The columns of the terminal ``shell`` prints to; ``None`` if it prints to none.

    A terminal IPython whose output goes to a file or a pipe is left alone,
    as a kernel is.  ``COLUMNS``, if set, is the width, as for IPython's own
    tracebacks.
    """
    # Not imported here: a kernel never loads the terminal shell (prompt_toolkit).
    terminal = sys.modules.get("IPython.terminal.interactiveshell")
    if terminal is None or not isinstance(shell, terminal.TerminalInteractiveShell):
        return None
    try:
        if not sys.stdout.isatty():
            return None
    except (AttributeError, ValueError):  # a stand-in stream, or a closed one
        return None
    # A pseudo-terminal whose size nobody set reports 0 columns: Python 3.11+
    # then falls back to 80, 3.10 returns the 0.  Either way: 80.
    return shutil.get_terminal_size().columns or 80


def ran_a_cell(shell: InteractiveShell | None, info: ExecutionInfo | None = None) -> bool:
    """Whether a cell of the user's has started (exec_lines at start-up are not: they
    are not kept in the history).

    ``info``: the cell that is starting, as ``pre_run_cell`` gets it.
    """
    if shell is None:
        return False
    if info is None:  # within a cell: the one running, if any (unset before pre_run_cell)
        running = shell.displayhook.exec_result
        info = None if running is None else running.info
    if info is not None and info.store_history:
        return True
    # IPython 9 counts a cell as it starts, IPython 8 as it ends.
    return shell.execution_count > 1
