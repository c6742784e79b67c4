"""Failover with a real primary and a real streaming replica, in real kernels.

The suite makes a PostgreSQL primary and a replica of its own (``initdb``,
``pg_basebackup``) on ports of their own, in a folder it removes afterwards;
the machine's server is never touched.  The settings list both hosts, as
managed PostgreSQL setups do (``HOST: "a,b"``, ``target_session_attrs``).

* The primary's machine dies (its path frozen: no packet answered) and the
  replica is promoted: the next cell reconnects past the dead host within the
  connect bound, not after TCP's two minutes of SYN retries.
* The old primary comes back as a standby of the new one, and the connection
  lands on it: the refused write closes it with a notice, and the next query
  finds the new primary.
"""

from __future__ import annotations

import contextlib
import glob
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path as FsPath
from typing import TYPE_CHECKING

import pytest
from netfault import Path, nft_available

from conftest import DRIVERS, migrate, unavailable, wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator


pytestmark = [pytest.mark.kernel, pytest.mark.postgres]

BINARIES = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
DATABASE = "shop"
STANDBY_NOTICE = "the server is now a read-only standby, probably after a failover"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cluster:
    """A PostgreSQL server of the tests' own, run as the postgres user."""

    def __init__(self, root: FsPath, name: str) -> None:
        self.root = root
        self.data = root / name
        self.port = _free_port()
        self.log = root / f"{name}.log"

    def _run(self, *command: str, timeout: float = 120) -> str:
        done = subprocess.run(
            ["runuser", "-u", "postgres", "--", *command],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"
        return done.stdout

    def _bin(self, name: str) -> str:
        return str(FsPath(BINARIES[-1]) / name)

    def configure(self, **settings: object) -> None:
        lines = [f"{key} = '{value}'" for key, value in settings.items()]
        with (self.data / "postgresql.auto.conf").open("a") as conf:
            conf.write("\n".join(lines) + "\n")

    def init(self) -> None:
        self._run(self._bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self.configure(
            port=self.port,
            listen_addresses="127.0.0.1",
            unix_socket_directories=self.root,
            wal_level="replica",
            max_wal_senders=4,
            hot_standby="on",
            fsync="off",
            max_connections=20,
            shared_buffers="16MB",
        )

    def replica_of(self, primary: Cluster) -> None:
        self._run(
            self._bin("pg_basebackup"),
            *("-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres"),
            *("-D", str(self.data), "-R", "-X", "stream", "-c", "fast"),
        )
        self.configure(port=self.port)

    def createdb(self, name: str) -> None:
        self._run(self._bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), name)

    def start(self) -> None:
        self._run(self._bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "start")

    def stop(self) -> None:
        self._run(self._bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def promote(self) -> None:
        self._run(self._bin("pg_ctl"), "-D", str(self.data), "-w", "promote")

    def query(self, sql: str) -> list[tuple]:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname=DATABASE, connect_timeout=5
        ) as conn:
            cur = conn.execute(sql)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def in_recovery(self) -> bool:
        return bool(self.query("select pg_is_in_recovery()")[0][0])


@pytest.fixture
def clusters() -> Iterator[tuple[Cluster, Cluster]]:
    """A primary with the demo schema, and a streaming replica of it."""
    if not BINARIES or shutil.which("runuser") is None:
        unavailable("PostgreSQL's server binaries (initdb, pg_ctl) are not installed")
    why = nft_available()
    if why is not None:
        unavailable(why)
    root = FsPath(tempfile.mkdtemp(prefix="ipy_dbreset_failover_"))
    shutil.chown(root, "postgres", "postgres")
    primary, replica = Cluster(root, "primary"), Cluster(root, "replica")
    started: list[Cluster] = []
    try:
        primary.init()
        primary.start()
        started.append(primary)
        primary.createdb(DATABASE)
        migrate(f"postgresql://postgres@127.0.0.1:{primary.port}/{DATABASE}")
        replica.replica_of(primary)
        replica.start()
        started.append(replica)
        wait_for(lambda: replica.query("select count(*) from shop_order"), "the replica", 30)
        yield primary, replica
    finally:
        for cluster in started:
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def url(hosts: list[tuple[str, int]], **options: str) -> str:
    """The demo project's database URL for several hosts: ``?host=a,b&port=1,2``."""
    names = ",".join(host for host, _ in hosts)
    ports = ",".join(str(port) for _, port in hosts)
    query = "".join(f"&{k}={v}" for k, v in options.items())
    return f"postgresql://postgres@/{DATABASE}?host={names}&port={ports}{query}"


@pytest.mark.parametrize("driver", DRIVERS)
def test_next_cell_after_a_failover_past_a_dead_host_works_quickly(clusters, start_kernel, driver):
    primary, replica = clusters
    dead = Path("127.0.0.1", primary.port)
    try:
        kernel = start_kernel(
            url(
                [("127.0.0.1", dead.port), ("127.0.0.1", replica.port)],
                target_session_attrs="read-write",
            ),
            driver,
        )
        kernel.ok("%config DBReset.network_timeout = 12")  # connect_timeout: 2 s
        kernel.ok("Order.objects.create(number=1, customer='x')")
        dead.freeze()  # the primary's machine is gone: nothing answers any more
        replica.promote()
        wait_for(lambda: not replica.in_recovery(), "the replica promoted", 30)
        lost = kernel.run("Order.objects.count()", timeout=60)  # waits out the silence
        assert not lost.ok, lost.shown
        started = time.monotonic()
        after = kernel.run("Order.objects.create(number=2, customer='x'); Order.objects.count()")
        took = time.monotonic() - started
        assert after.ok, after.shown
        assert after.value() == 2  # the write made before the failover was replicated
        assert took < 20, f"the reconnect took {took:.1f} s"
    finally:
        dead.close()


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_write_refused_by_a_former_primary_now_standby_reconnects_to_the_new_one(
    clusters, start_kernel, driver
):
    primary, replica = clusters
    # The host name the settings give, as DNS resolves it: a path of our own
    # whose target moves to the new primary once DNS catches up.
    name = Path("127.0.0.1", primary.port)
    try:
        kernel = start_kernel(url([("127.0.0.1", name.port)]), driver)
        kernel.ok("Order.objects.create(number=1, customer='x')")
        # Failover: the primary goes down, the replica is promoted, and the old
        # primary comes back as a standby of the new one (made anew from it).
        primary.stop()
        replica.promote()
        wait_for(lambda: not replica.in_recovery(), "the replica promoted", 30)
        shutil.rmtree(primary.data)
        primary.replica_of(replica)
        primary.configure(port=primary.port)
        primary.start()
        wait_for(primary.in_recovery, "the old primary back as a standby", 30)

        # The name still leads to the old primary: the cell reconnects there, and reads work.
        assert kernel.ok("Order.objects.count()").value() == 1
        name.target = ("127.0.0.1", replica.port)  # DNS has caught up
        refused = kernel.run("Order.objects.create(number=2, customer='x')")
        assert not refused.ok
        assert STANDBY_NOTICE in refused.shown, refused.shown
        assert "the next query reconnects" in refused.shown
        kernel.ok("Order.objects.create(number=2, customer='x')")  # on the new primary
        assert replica.query("select number from shop_order order by number") == [(1,), (2,)]
    finally:
        name.close()


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("attrs", [None, "standby"])
def test_a_replica_by_design_is_never_left(clusters, start_kernel, driver, attrs):
    _, replica = clusters
    hosts = [("127.0.0.1", replica.port)]
    kernel = start_kernel(url(hosts, target_session_attrs=attrs) if attrs else url(hosts), driver)
    assert kernel.ok("Order.objects.count()").value() == 0
    refused = kernel.run("Order.objects.create(number=1, customer='x')")
    assert not refused.ok
    assert "ipy_dbreset" not in refused.shown, refused.shown
    assert kernel.ok("connection.connection is not None").value() is True


@pytest.mark.parametrize("driver", DRIVERS)
def test_read_only_mode_on_a_primary_never_leaves_it(clusters, start_kernel, driver):
    primary, _ = clusters
    kernel = start_kernel(url([("127.0.0.1", primary.port)]), driver)
    kernel.ok("%config DBReset.read_only = True")
    refused = kernel.run("Order.objects.create(number=1, customer='x')")
    assert "read-only mode refused this write" in refused.shown, refused.shown
    assert STANDBY_NOTICE not in refused.shown
