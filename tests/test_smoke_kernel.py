"""The cell after a terminated PostgreSQL backend works (a first end-to-end check)."""

from __future__ import annotations

import time

import pytest

from conftest import DRIVERS, terminate_backends


@pytest.mark.kernel
@pytest.mark.postgres
@pytest.mark.parametrize("driver", DRIVERS)
def test_first_cell_after_terminated_backend_works(start_kernel, postgres_url, postgres_db, driver):
    kernel = start_kernel(postgres_url, driver)
    kernel.ok("Order.objects.create(number=1); Order.objects.count()")
    assert terminate_backends(postgres_db) >= 1
    time.sleep(0.2)
    cell = kernel.ok("Order.objects.count()")
    assert cell.value() == 1
    assert any("lost" in n for n in cell.notices)
    assert kernel.failed == 0
