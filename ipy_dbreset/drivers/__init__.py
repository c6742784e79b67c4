"""What each database driver can tell us about a connection without asking the server.

Django offers no portable way to ask "is this connection still alive?" short of
``is_usable()``, which costs a round trip.  Each driver module here reads the
driver's own local state instead (libpq's transaction status, whether the
server has sent anything unsolicited on the socket) and only goes further when
that local state says something happened.
"""

from __future__ import annotations

from typing import Any

from ipy_dbreset.drivers.base import (
    Driver,
    FastCheck,
    Link,
    Liveness,
    Sockets,
    Transaction,
    always_healthy,
    libpq_transaction,
    readable,
)

__all__ = [
    "Driver",
    "FastCheck",
    "Link",
    "Liveness",
    "Sockets",
    "Transaction",
    "always_healthy",
    "driver_for",
    "libpq_transaction",
    "readable",
]

_cache: dict[type, Driver] = {}


def driver_for(raw: Any) -> Driver:
    """The driver module that knows the class of ``raw`` (a DB-API connection)."""
    kind = type(raw)
    driver = _cache.get(kind)
    if driver is None:
        driver = _cache[kind] = _find(kind)
    return driver


def _find(kind: type) -> Driver:
    package = kind.__module__.split(".", 1)[0]
    if package == "psycopg":
        from ipy_dbreset.drivers.psycopg import Psycopg

        return Psycopg()
    if package == "psycopg2":
        from ipy_dbreset.drivers.psycopg2 import Psycopg2

        return Psycopg2()
    if package in {"MySQLdb", "_mysql"}:
        from ipy_dbreset.drivers.mysqlclient import MySQLClient

        return MySQLClient()
    from ipy_dbreset.drivers.generic import Generic

    return Generic(package)
