"""Failover: reconnects bounded in time, and leaving a server that became a standby.

With several hosts in ``HOST`` (libpq tries each in turn) or a DNS name that
moves, a host that died without a word holds every connection attempt until
TCP gives up (about 130 s on Linux): :class:`ConnectBound` gives each alias a
``connect_timeout`` unless its ``OPTIONS`` choose one.  A connection that
outlived a failover may sit on a server that is now a read-only hot standby,
whose every write fails (SQLSTATE 25006) until it reconnects and finds the new
primary: :class:`Standbys` tells such a connection from one that is read-only
by design, with what PostgreSQL 14+ reports by itself (``in_hot_standby``),
so without a round trip.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from django.db import connections

from ipy_dbreset.drivers import driver_for

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_RANGE = (2, 10)
"""Seconds a connection attempt may wait for a host: a sixth of network_timeout, within these."""

BECAME_STANDBY = "the server is now a read-only standby, probably after a failover"
"""Why a connection :meth:`Standbys.became_standby` is closed."""

_READ_ONLY_TRANSACTION = "25006"  # SQLSTATE read_only_sql_transaction
# target_session_attrs asking for a standby: a read-only server is what the user wants.
_WANTS_STANDBY = frozenset({"read-only", "standby", "prefer-standby"})


def connect_timeout(network_timeout: int) -> int | None:
    """The ``connect_timeout`` derived from ``network_timeout`` (0: none, no bound)."""
    if network_timeout <= 0:
        return None
    low, high = CONNECT_TIMEOUT_RANGE
    return max(low, min(high, network_timeout // 6))


def _bounded_vendor(engine: str) -> bool:
    # Django's PostgreSQL and MySQL backends and those built on them (PostGIS, ...);
    # both pass OPTIONS on to the driver's connect(), where connect_timeout is known.
    return any(name in engine for name in ("postgresql", "postgis", "mysql"))


class ConnectBound:
    """A default ``connect_timeout`` in the ``OPTIONS`` of every alias that sets none."""

    def __init__(self) -> None:
        self._ours: dict[str, int] = {}  # alias: the value put in its OPTIONS, to take back

    def apply(self, seconds: int | None) -> list[str]:
        """Bound every alias's connection attempts at ``seconds``; the aliases bounded.

        ``OPTIONS`` are Django's settings dict, shared by every thread's
        wrapper of the alias: a value set here holds for their next connect.
        """
        self.remove()
        if seconds is None:
            return []
        for alias, settings in connections.settings.items():
            if not _bounded_vendor(str(settings.get("ENGINE", ""))):
                continue
            options = settings.setdefault("OPTIONS", {})
            if "connect_timeout" not in options:  # else the user's own choice
                options["connect_timeout"] = seconds
                self._ours[alias] = seconds
        log.debug("ipy_dbreset: connect_timeout %s s given to %s", seconds, list(self._ours))
        return list(self._ours)

    def remove(self) -> None:
        """Take back exactly the values :meth:`apply` set (not one the user set since)."""
        for alias, seconds in self._ours.items():
            options = connections.settings.get(alias, {}).get("OPTIONS", {})
            if options.get("connect_timeout") == seconds:
                del options["connect_timeout"]
        self._ours.clear()


def refused_as_read_only(error: BaseException | None) -> bool:
    """Whether a cell failed because PostgreSQL refused a write in a read-only transaction."""
    return any(
        _READ_ONLY_TRANSACTION in (getattr(e, "pgcode", None), getattr(e, "sqlstate", None))
        for e in (error, getattr(error, "__cause__", None))
        if e is not None
    )


class Standbys:
    """Which connections came to sit on a standby, rather than on one chosen by design."""

    def __init__(self) -> None:
        # Per alias: whether its first connection seen was on a hot standby
        # already (a replica by design).  Later connections of the alias that
        # land on one (the old primary, back as a standby after a failover)
        # are not what the user asked for.
        self._first_on_standby: dict[str, bool] = {}

    def created(self, wrapper: BaseDatabaseWrapper) -> None:
        """``connection_created`` hook, in the thread that connects: no round trip."""
        if wrapper.vendor == "postgresql" and wrapper.alias not in self._first_on_standby:
            self._first_on_standby[wrapper.alias] = _on_standby(wrapper)

    def became_standby(self, wrapper: BaseDatabaseWrapper) -> bool:
        """Whether ``wrapper`` now sits on a hot standby its alias did not choose."""
        if wrapper.vendor != "postgresql" or wrapper.connection is None:
            return False
        options = wrapper.settings_dict.get("OPTIONS") or {}
        if options.get("target_session_attrs") in _WANTS_STANDBY:
            return False
        if self._first_on_standby.get(wrapper.alias, True):
            return False  # on a standby from the first (or never seen connecting): by design
        return _on_standby(wrapper)


def _on_standby(wrapper: BaseDatabaseWrapper) -> bool:
    # Not reported (PostgreSQL before 14, a pooler in between): not known, so no.
    return driver_for(wrapper.connection).parameter(wrapper, "in_hot_standby") == "on"
