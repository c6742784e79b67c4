"""Interrupts around the cell callbacks: held back during a repair, passed on after it.

A repair and its notice must be done whole or not started when the user
presses the stop button (Ctrl-C): :func:`interrupts_held` holds SIGINT back
for that long, and :func:`pass_on` then lets the interrupt stop what it was
meant to: the shell's own handler, or the cell about to run (:class:`StopCell`),
which a callback cannot stop by raising.  :func:`resets_sigint` tells the
shells that put their SIGINT handler back around every cell.
"""

from __future__ import annotations

import ast
import logging
import signal
import sys
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ipy_dbreset.tracking import in_event_loop

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from IPython.core.interactiveshell import InteractiveShell

log = logging.getLogger(__name__)


@contextmanager
def interrupts_held() -> Iterator[list[int]]:
    """Hold back SIGINT (Ctrl-C, the stop button) until the block is done.

    Yields the signals received meanwhile; what they interrupt is the caller's
    choice, once the block is over.  A second SIGINT is not held back: the user
    would rather stop a repair that hangs (a network gone silent) than wait.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received  # Python runs signal handlers in the main thread only
        return

    def hold(signum: int, frame: object) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


class StopCell(ast.NodeTransformer):
    """Turn the next cell into ``raise KeyboardInterrupt`` at its first line.

    How an interrupt held back during the checks before a cell reaches that
    cell: as if it had arrived before the first statement ran.  Raised from a
    ``pre_run_cell`` callback it would be reported as the callback's error
    and the cell would run anyway.
    """

    def __init__(self) -> None:
        self.used = False  # one cell only (a cell may run cells of its own)

    def visit(self, node: ast.AST) -> ast.AST:
        if self.used or not isinstance(node, ast.Module):
            return node
        self.used = True
        stop = ast.Raise(exc=ast.Name(id="KeyboardInterrupt", ctx=ast.Load()), cause=None)
        if node.body:
            ast.copy_location(stop, node.body[0])
        node.body = [stop]
        return ast.fix_missing_locations(node)


def pass_on(
    shell: InteractiveShell | None,
    *,
    before_cell: bool,
    at_cell_end: list[Callable[[], None]],
) -> None:
    """Let an interrupt held back (or caught) in a callback stop what it was meant to.

    Before a cell, that cell: a :class:`StopCell` waits for it, and what
    takes it away again goes to ``at_cell_end``, for the caller to run as the
    cell ends.  After a cell there is nothing left to stop.
    """
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not signal.default_int_handler:
        # Not KeyboardInterrupt: the shell has its own way (ipykernel cancels
        # a cell with top-level await), which only it knows how to finish.
        try:
            handler(signal.SIGINT, None)
            return
        except KeyboardInterrupt:
            pass
    if before_cell and shell is not None:
        stop, running = StopCell(), shell
        running.ast_transformers.append(stop)

        def withdraw() -> None:
            if stop in running.ast_transformers:  # looked up now: the list may be a new one
                running.ast_transformers.remove(stop)

        at_cell_end.append(withdraw)
    else:
        log.info("ipy_dbreset: interrupt after the cell ignored")


def in_kernel(shell: InteractiveShell | None) -> bool:
    """Whether ``shell`` runs its cells as a Jupyter kernel does (in an event loop)."""
    return getattr(shell, "kernel", None) is not None or in_event_loop()


def in_subshell(shell: InteractiveShell | None) -> bool:
    """Whether this code runs in one of an ipykernel 7 kernel's subshells, not its main shell.

    A subshell runs its cells in a thread of its own; the main shell's is the
    one ipykernel's shell channel was started from.
    """
    channel = getattr(getattr(shell, "kernel", None), "shell_channel_thread", None)
    main = getattr(channel, "parent_thread", None)
    return main is not None and main is not threading.current_thread()


def sigint_kernel(shell: InteractiveShell | None) -> Any:
    """The kernel that sets SIGINT's handler around every request, whatever the
    cell left (ipykernel's ``pre_handler_hook`` and ``post_handler_hook``), or None."""
    kernel = getattr(shell, "kernel", None)
    hooks = ("pre_handler_hook", "post_handler_hook")
    if kernel is None or not all(callable(getattr(kernel, name, None)) for name in hooks):
        return None
    return kernel


def resets_sigint(shell: InteractiveShell | None) -> bool:
    """Whether the shell puts its own SIGINT handler back around every cell.

    ipykernel does for each request, prompt_toolkit at each terminal prompt;
    a plain InteractiveShell (embedded, scripted) leaves it alone.
    """
    terminal = sys.modules.get("IPython.terminal.interactiveshell")
    if terminal is not None and isinstance(shell, terminal.TerminalInteractiveShell):
        return True
    return in_kernel(shell)
