"""A PostgreSQL server restart between cells costs no failed cell and no committed row.

These tests restart the real server: every other connection to it is dropped.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import DRIVERS, IN_CI, pg_admin, unavailable

pytestmark = [pytest.mark.kernel, pytest.mark.postgres, pytest.mark.restart]


def restart_postgres() -> None:
    if not (IN_CI or os.environ.get("IPY_DBRESET_TEST_RESTART")):
        pytest.skip(
            "restarts the local PostgreSQL server, dropping every connection to it: "
            "set IPY_DBRESET_TEST_RESTART=1 to run it (CI always does)"
        )
    clusters = Path("/etc/postgresql")
    if not clusters.is_dir():
        unavailable("no local PostgreSQL cluster to restart (/etc/postgresql is missing)")
    version = sorted(p.name for p in clusters.iterdir())[-1]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart", "-m", "fast"],
        check=True,
        capture_output=True,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            pg_admin("select 1")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.parametrize("driver", DRIVERS)
def test_first_cell_after_server_restart_works(start_kernel, postgres_url, driver):
    kernel = start_kernel(postgres_url, driver)
    kernel.ok("Order.objects.create(number=1)")
    kernel.ok("transaction.set_autocommit(False); Order.objects.create(number=2)")
    restart_postgres()
    cell = kernel.ok("Order.objects.count()")
    assert cell.value() == 1  # the uncommitted row went with the server's transaction
    lost = "lost a manual transaction with 1 unsaved write (INSERT shop_order)"
    assert any(lost in n for n in cell.notices), cell.notices
    # The user had turned autocommit off; the new connection keeps it off.
    assert kernel.ok("transaction.get_autocommit()").value() is False
    assert kernel.failed == 0
