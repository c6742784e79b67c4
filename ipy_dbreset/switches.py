"""Process-wide switches the extension turns for the user, says so, and turns back.

Two of the extension's changes belong to the whole process, not to one shell:
``DJANGO_ALLOW_ASYNC_UNSAFE`` (without it Django refuses ORM calls in a
kernel's event loop; :func:`~ipy_dbreset.project.allow_async_unsafe`) and
psycopg2's wait callback (without it the stop button cannot cancel a psycopg2
query; :func:`~ipy_dbreset.drivers.psycopg2.make_interruptible`).  Each is
turned as the options ask and said in one line; only what the extension
turned is turned back, so what the user set stays as they set it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipy_dbreset.project import ASYNC_UNSAFE_VARIABLE, allow_async_unsafe

if TYPE_CHECKING:
    from collections.abc import Callable


class Switches:
    """The process-wide switches of one loaded extension.

    Parameters
    ----------
    say
        Tells the user what was switched, in one line.
    """

    def __init__(self, say: Callable[[str], None]) -> None:
        self._say = say  # one line to the user for each switch turned
        self._async_unsafe = False  # DJANGO_ALLOW_ASYNC_UNSAFE is ours to remove
        self._wait_callback = False  # psycopg2's wait callback is ours to remove

    def async_unsafe(self, allow: bool, *, in_kernel: bool) -> None:
        """Let ORM calls work in a kernel's event loop (``allow``), or stop doing so."""
        if allow:
            if in_kernel and allow_async_unsafe(True):
                self._async_unsafe = True
                self._say(
                    f"{ASYNC_UNSAFE_VARIABLE} is now true, so ORM calls work in this "
                    "kernel's event loop (opt out: %config DBReset.allow_async_unsafe = False)"
                )
        elif self._async_unsafe:
            allow_async_unsafe(False)
            self._async_unsafe = False
            self._say(f"{ASYNC_UNSAFE_VARIABLE} removed")

    def interruptible_psycopg2(self, on: bool) -> None:
        """Let the stop button cancel psycopg2 queries (``on``), or stop doing so."""
        if self._wait_callback_to(on):
            self._say(f"the stop button {'can' if on else 'cannot'} cancel psycopg2 queries now")

    def undo(self) -> list[str]:
        """Turn back what was turned, as the extension unloads; what was undone, in words."""
        undone = []
        if self._async_unsafe:
            allow_async_unsafe(False)
            self._async_unsafe = False
            undone.append(
                f"{ASYNC_UNSAFE_VARIABLE} removed, so ORM calls in cells raise "
                "SynchronousOnlyOperation again"
            )
        if self._wait_callback_to(False):
            undone.append("psycopg2's wait callback removed: the stop button waits for queries")
        return undone

    def _wait_callback_to(self, on: bool) -> bool:
        """Set or remove psycopg2's wait callback (only ours); whether anything changed."""
        if on == self._wait_callback:
            # Nothing to do: importing psycopg2 to find that out would cost most of
            # the start-up of a psycopg 3 or SQLite project.
            return False
        try:
            from ipy_dbreset.drivers.psycopg2 import make_interruptible
        except ImportError:  # psycopg2 is not installed: nothing to make interruptible
            return False
        changed = make_interruptible(on)
        if changed:
            self._wait_callback = on
        return changed
