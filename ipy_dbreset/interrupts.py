"""Interrupts around the cell callbacks: held back during a repair, passed on after it.

A repair and its notice must be done whole or not started when the user
presses the stop button (Ctrl-C): :func:`interrupts_held` holds SIGINT back
for that long, and :class:`StopCell` lets an interrupt held back before a cell
stop that cell, which a callback cannot do by raising.
"""

from __future__ import annotations

import ast
import signal
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator


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
