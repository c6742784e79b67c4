"""What the engine found, did, lost and kept: plain records, for display.py to put in words.

Nothing here imports the rest of the package, so every module may use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import NamedTuple


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
