"""What the user sees of the extension in the shell: notices, and what ``%dbreset`` returns.

:class:`Output` shows a notice if the verbosity asks for it, holds back what a
kernel says while it starts up (no cell could show it yet) for the first cell,
and keeps ``%dbreset``'s :class:`ResetResult` from showing again as the cell's
``Out[n]`` once its notice is said.  What a notice says is
:mod:`ipy_dbreset.display`'s; when to say it, the magics'.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

from IPython.display import display

from ipy_dbreset.display import Notice, failure_notice, repair_notice, skipped_notice

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from IPython.core.displayhook import DisplayHook
    from IPython.core.interactiveshell import ExecutionInfo, InteractiveShell

    from ipy_dbreset.checkup import Outcome
    from ipy_dbreset.idle import Said
    from ipy_dbreset.repair import Repair

log = logging.getLogger(__name__)


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

    def say(
        self, notice: Notice | str, level: int = 1, *, kind: str = "info", logged: bool = False
    ) -> None:
        """Show ``notice`` if ``verbosity`` is at least ``level`` (0: always).

        A string is a notice of ``kind``.  ``logged``: also in the log,
        whatever the verbosity (for what changed the process).
        """
        if isinstance(notice, str):
            notice = Notice(notice, kind)
        if logged:
            log.info("ipy_dbreset: %s", notice.text)
        if self.verbosity < level:
            return
        if getattr(self.shell, "kernel", None) is not None and not ran_a_cell(self.shell):
            # Sent now, it would belong to no cell and no notebook would show it.
            # A terminal shows it as it is printed.
            self.held.append(notice)
        else:
            display(notice)

    def say_all(self, said: Sequence[Said]) -> None:
        """Say each (level, line) the checkup has to say as a cell starts or ends."""
        for level, text in said:
            self.say(text, level)

    def checked(self, outcome: Outcome) -> None:
        """Say what a check did: a failure always, a repair, the connections left alone."""
        if outcome.failures:
            failures = "; ".join(f.describe() for f in outcome.failures)
            log.warning("ipy_dbreset: repair failed: %s", failures)
            self.say(failure_notice(outcome), 0)
        elif outcome.repairs:
            self.say(repair_notice(outcome.repairs))
        if outcome.skipped:
            self.say(skipped_notice(outcome), 2)

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
