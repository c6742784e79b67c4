"""Drivers with nothing to probe: sqlite3 (a file cannot hang up) and unknown ones."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipy_dbreset.drivers.base import FastCheck, Link, Liveness, Transaction, always_healthy

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper


class Generic:
    def __init__(self, name: str) -> None:
        self.name = name

    def link(self, wrapper: BaseDatabaseWrapper) -> Link:
        in_transaction = getattr(wrapper.connection, "in_transaction", None)
        if in_transaction is None:
            transaction = Transaction.UNKNOWN
        else:
            transaction = Transaction.INTRANS if in_transaction else Transaction.IDLE
        return Link(closed=False, transaction=transaction, pending=False)

    def liveness(self, wrapper: BaseDatabaseWrapper) -> Liveness:
        return Liveness.ALIVE

    def settle(self, wrapper: BaseDatabaseWrapper) -> bool:
        return False

    def server_id(self, wrapper: BaseDatabaseWrapper) -> int | None:
        return None

    def server_closed(self, wrapper: BaseDatabaseWrapper) -> bool:
        return False

    def fast_check(self, wrapper: BaseDatabaseWrapper) -> FastCheck:
        return always_healthy  # only Django's own flags can say otherwise

    def fileno(self, wrapper: BaseDatabaseWrapper) -> int:
        return -1  # a file (sqlite3) cannot hang up; an unknown driver is not looked into

    def streaming(self, wrapper: BaseDatabaseWrapper) -> bool:
        return False

    def waiting(self, wrapper: BaseDatabaseWrapper) -> bool:
        return False

    def parameter(self, wrapper: BaseDatabaseWrapper, name: str) -> str | None:
        return None
