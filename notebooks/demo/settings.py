"""Settings of the demo project the notebooks use.

The database is SQLite (``db.sqlite3`` beside ``manage.py``) unless
``IPY_DBRESET_DEMO_DB`` names another one as a URL, for example::

    IPY_DBRESET_DEMO_DB=postgresql://postgres@127.0.0.1:5432/test
    IPY_DBRESET_DEMO_DB=mysql://root@127.0.0.1:3306/test
    IPY_DBRESET_DEMO_DB=sqlite:////tmp/demo.sqlite3

Several hosts, and driver options, go in the query string:
``postgresql://postgres@/test?host=10.0.0.1,10.0.0.2&port=5432,5432&target_session_attrs=read-write``.

Behind PgBouncer in transaction pooling mode, add
``?disable_server_side_cursors=1`` to a PostgreSQL URL (Django's
``DISABLE_SERVER_SIDE_CURSORS``): a server-side cursor outlives its
transaction, and the pooler may send the next statement to another server
connection.

``IPY_DBRESET_DEMO_POOL=1`` turns on Django's PostgreSQL connection pool
(Django 5.1+ with psycopg 3).  A second alias, ``other``, is SQLite: the file
``IPY_DBRESET_DEMO_OTHER`` names, or any database it gives as a URL.
"""

import os
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = "demo-only-not-secret"  # a demo project
DEBUG = True
ALLOWED_HOSTS: list[str] = []
INSTALLED_APPS = ["django.contrib.contenttypes", "shop"]
USE_TZ = True
TIME_ZONE = os.environ.get("IPY_DBRESET_DEMO_TIME_ZONE", "UTC")  # tests: not the machine's
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

ENGINES = {
    "postgresql": "django.db.backends.postgresql",
    "postgres": "django.db.backends.postgresql",
    "mysql": "django.db.backends.mysql",
    "sqlite": "django.db.backends.sqlite3",
}


def database(url: str) -> dict[str, object]:
    """A DATABASES entry from a URL such as ``postgresql://user:pw@host:5432/name``."""
    parts = urlsplit(url)
    if parts.scheme not in ENGINES:
        raise ValueError(f"IPY_DBRESET_DEMO_DB: unknown scheme {parts.scheme!r}")
    if parts.scheme == "sqlite":
        # sqlite:////abs/path.sqlite3 -> /abs/path.sqlite3
        path = unquote(parts.path)
        return {"ENGINE": ENGINES["sqlite"], "NAME": "/" + path.lstrip("/") if path else ":memory:"}
    entry: dict[str, object] = {
        "ENGINE": ENGINES[parts.scheme],
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
    }
    if parts.scheme == "mysql":
        entry["OPTIONS"] = {"charset": "utf8mb4"}
    if parts.scheme != "mysql" and os.environ.get("IPY_DBRESET_DEMO_POOL"):
        entry["OPTIONS"] = {"pool": {"min_size": 1, "max_size": 4}}
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    if query.pop("disable_server_side_cursors", None) == "1":
        entry["DISABLE_SERVER_SIDE_CURSORS"] = True
    # ?host=a,b&port=p1,p2 for several hosts (libpq tries them in turn); any
    # other parameter is a driver option: ?target_session_attrs=read-write
    for key in ("host", "port"):
        if key in query:
            entry[key.upper()] = query.pop(key)
    if query:
        entry["OPTIONS"] = {**entry.get("OPTIONS", {}), **query}  # type: ignore[dict-item]
    return entry


other_db = os.environ.get("IPY_DBRESET_DEMO_OTHER") or str(BASE_DIR / "other.sqlite3")
DATABASES = {
    "default": database(
        os.environ.get("IPY_DBRESET_DEMO_DB") or f"sqlite:///{BASE_DIR / 'db.sqlite3'}"
    ),
    "other": (
        database(other_db) if "://" in other_db else {"ENGINE": ENGINES["sqlite"], "NAME": other_db}
    ),
}
