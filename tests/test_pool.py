"""Django's PostgreSQL pool (Django 5.1+, psycopg 3): a repair never hands back a dead one."""

from __future__ import annotations

import django
import pytest

from conftest import DRIVERS, terminate_backends, wait_until_disconnected

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.postgres,
    pytest.mark.skipif(django.VERSION < (5, 1), reason="connection pools need Django 5.1+"),
    pytest.mark.skipif("psycopg" not in DRIVERS, reason="connection pools need psycopg 3"),
]

POOL = {"IPY_DBRESET_DEMO_POOL": "1"}


def test_first_cell_after_terminated_pooled_backends_works(start_kernel, postgres_url, postgres_db):
    kernel = start_kernel(postgres_url, env=POOL)
    assert kernel.ok("bool(connection.pool)").value() is True
    kernel.ok("Order.objects.create(number=1)")
    # Every connection of the pool dies, the checked-out one and the idle ones.
    assert terminate_backends(postgres_db) >= 1
    wait_until_disconnected(postgres_db)
    for _ in range(5):
        # Each cell checks a connection out of the pool afresh after a reset.
        assert kernel.ok("Order.objects.count()").value() == 1
        kernel.ok("connection.close()")
    assert kernel.failed == 0


def test_aborted_pooled_transaction_is_rolled_back_not_returned(start_kernel, postgres_url):
    kernel = start_kernel(postgres_url, env=POOL)
    kernel.ok("Order.objects.create(number=1)")
    kernel.ok("transaction.set_autocommit(False)")
    cell = kernel.run("Order.objects.create(number=1)")
    assert cell.ename == "IntegrityError"
    assert any("rolled back" in n for n in cell.notices)
    kernel.ok("transaction.set_autocommit(True)")
    kernel.ok("%dbreset -q")  # the connection goes back to the pool
    assert kernel.ok("Order.objects.count()").value() == 1
    assert kernel.failed == 1
