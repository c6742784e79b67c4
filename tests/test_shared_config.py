"""A notebook server shared by many users: the extension configured once for all.

An administrator puts ``c.InteractiveShellApp.extensions = ["ipy_dbreset"]``
in a system-wide ``ipython_config.py``: ``/etc/ipython``, or
``{sys.prefix}/etc/ipython`` for every user of one Python environment.  The
tests use the second, in a throwaway environment over this one's packages,
so nothing outside ``tmp_path`` is written.  Each user's own profile still wins,
and a kernel started outside any Django project works as usual.
"""

from __future__ import annotations

import site
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable

    from harness import Kernel

pytestmark = pytest.mark.kernel

SHARED_CONFIG = """\
c.InteractiveShellApp.extensions = ["ipy_dbreset"]
c.DBReset.verbosity = 0
c.DBReset.aborted_manual_transactions = "leave"
"""

OPTIONS = (
    "dbreset = next(c for c in get_ipython().configurables if type(c).__name__ == 'DBReset')\n"
    "dbreset.verbosity, dbreset.aborted_manual_transactions"
)


@pytest.fixture
def shared_python(tmp_path: Path) -> Path:
    """The interpreter of a new environment whose ``etc/ipython`` loads the extension."""
    env = tmp_path / "shared-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # This environment's packages (ipykernel, Django, the extension) over there too.
    lines = [f"import site; site.addsitedir({folder!r})\n" for folder in site.getsitepackages()]
    (Path(purelib) / "parent-packages.pth").write_text("".join(lines))
    (env / "etc" / "ipython").mkdir(parents=True)
    (env / "etc" / "ipython" / "ipython_config.py").write_text(SHARED_CONFIG)
    return python


@pytest.fixture
def start_shared_kernel(
    start_kernel: Callable[..., Kernel], shared_python: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Kernel]:
    """``start_kernel`` with the shared environment's interpreter, nothing loaded by hand."""

    def start(url: str, **kwargs: object) -> Kernel:
        with monkeypatch.context() as patch:
            patch.setattr(sys, "executable", str(shared_python))  # the kernel spec's argv[0]
            return start_kernel(url, load=False, **kwargs)

    return start


def test_system_wide_config_loads_the_extension_and_a_user_profile_wins(
    start_shared_kernel, sqlite_url, tmp_path
):
    ipython_dir = tmp_path / "user-ipython"
    (ipython_dir / "profile_default").mkdir(parents=True)
    (ipython_dir / "profile_default" / "ipython_config.py").write_text(
        'c.DBReset.aborted_manual_transactions = "rollback"\n'
    )
    kernel = start_shared_kernel(sqlite_url, env={"IPYTHONDIR": str(ipython_dir)})
    assert kernel.ok("import sys; sys.prefix").value() == str(tmp_path / "shared-env")
    assert kernel.ok(OPTIONS).value() == (0, "rollback")
    kernel.ok("from shop.models import Order; Order.objects.create(number=1)")
    assert "sqlite" in kernel.ok("%dbstatus").texts[-1]
    assert kernel.failed == 0


def test_kernel_outside_any_project_starts_as_usual(start_shared_kernel, sqlite_url, tmp_path):
    nowhere = tmp_path / "nowhere"
    nowhere.mkdir()
    kernel = start_shared_kernel(
        sqlite_url, cwd=nowhere, env={"IPYTHONDIR": str(tmp_path / "user-ipython")}
    )
    first = kernel.ok("x = 1 + 1; x")
    assert first.value() == 2 and not first.notices and not first.stderr
    # Nothing registered; %reload_ext says why.
    assert kernel.run("%dbstatus").ename == "UsageError"
    why = kernel.run("%reload_ext ipy_dbreset")
    assert "no Django settings found" in why.shown
    assert kernel.ok("x").value() == 2
