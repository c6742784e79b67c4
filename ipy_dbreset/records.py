"""What the engine found, did, lost and kept: plain records, for display.py to put in words.

Nothing here imports the rest of the package, so every module may use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Callable


class Calm:
    """Whether the shell's two callbacks have nothing to do around the next cell.

    The one attribute they read first: while it is true they return at once
    (a kernel's cell leaves the processor's caches cold, and every further
    object read costs there).  Whatever could give them work (a query, a new
    connection, a COMMIT that did not answer, a repair made before a query, a
    changed option) sets it false after its own change, from any thread; only
    the shell's callbacks set it true, and before they look at everything
    again, so that nothing set meanwhile is missed.

    What the server sends is not among those: ``pending`` asks every socket
    at once, before each cell (``None``: there is none).
    """

    __slots__ = ("pending", "quiet")

    def __init__(self) -> None:
        self.quiet = False
        self.pending: Callable[[], object] | None = None


@dataclass(frozen=True)
class Repair:
    """What was done to one connection, and what (if anything) was lost."""

    alias: str
    action: str
    """What was done, verb first; the connection follows it: ``rolled back``."""
    reason: str
    """Why (empty: asked for): ``a failed statement aborted the transaction``."""
    lost: str | None = None
    """What was lost or kept: ``lost an atomic block with 2 unsaved writes (...)``."""
    thread: str | None = None
    hint: str | None = None
    """What the user needs to know next: ``the next query reconnects``."""
    when: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    keep_manual: bool = False
    """The connection was in manual-transaction mode: reconnect with autocommit off."""
    dropped_on_commit: int = 0
    """Pending ``transaction.on_commit`` callbacks discarded with the work (never run)."""
    gone_savepoints: tuple[str, ...] = ()
    """The user's own savepoints (``transaction.savepoint()``) that went with the work."""


class Failure(NamedTuple):
    """A connection whose repair (or reset) itself failed, and the database's error."""

    alias: str
    thread: str | None
    error: str


class StillOpen(NamedTuple):
    """A transaction left open longer than ``long_transaction`` (said once)."""

    alias: str
    seconds: float
    """How long it has been open, as far as the idle keeper saw."""
    what: str
    """What is open, with its writes: ``a manual transaction with 2 writes (...)``."""
