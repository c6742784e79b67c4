"""Compatibility matrix: Django 4.2, 5.2, 6.0 and 6.1 on Python 3.10 to 3.13, psycopg 3 or psycopg2.

::

    nox                                      # the CI selection: one session per Django series
    nox -l                                   # every session, the CI ones marked with *
    nox -s django5.2-py3.13-psycopg          # one session
    nox -t django4.2                         # every session of a Django series (tags: ci,
                                             # django4.2 ... django6.1, py3.10 ... py3.13,
                                             # psycopg, psycopg2)
    nox -s django6.1-py3.13-psycopg -- -k shells -x   # arguments after -- go to pytest

Each session installs the project with its ``test`` and ``mysql`` extras and
one Django series, then runs the test suite against the real servers (PostgreSQL,
MariaDB, SQLite), with ``CI=true`` failing instead of skipping when one is
missing.  Interpreters come from pyenv (``$PYENV_ROOT/versions/3.X.*``) when
it has them, else from ``python3.X`` on the ``PATH``; a session whose Python
is missing is skipped (an error under CI, as nox does there).

``psycopg`` sessions install both drivers, as most projects have them: Django
uses psycopg 3, and the tests run every PostgreSQL scenario with each driver.
``psycopg2`` sessions do not install psycopg 3 at all, so that Django and the
extension run as in a project that only has psycopg2.  The test fixtures
themselves (creating databases, terminating backends) use psycopg 3: it is
installed in a folder that only the pytest process puts on ``sys.path``
(``IPY_DBRESET_TEST_FIXTURE_PATH``, read by ``tests/conftest.py`` after it
has listed the drivers the project has), never the kernels or shells it
starts.  These sessions run the whole suite: every PostgreSQL test runs with
the drivers the project has, here psycopg2 alone.

Django 6.x needs Python 3.12 or newer; Django 4.2 stops at Python 3.12.
The CI sessions also pin ipykernel and IPython (``STACKS``): between them they
run ipykernel 6 and 7 and IPython 8 and 9.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nox

nox.options.error_on_external_run = True

ROOT = Path(__file__).resolve().parent

DJANGO = {
    "4.2": "Django>=4.2,<5.0",
    "5.2": "Django>=5.2,<6.0",
    "6.0": "Django>=6.0,<6.1",
    "6.1": "Django>=6.1,<6.2",
}
PYTHONS = {
    "4.2": ("3.10", "3.11", "3.12"),
    "5.2": ("3.10", "3.11", "3.12", "3.13"),
    "6.0": ("3.12", "3.13"),
    "6.1": ("3.12", "3.13"),
}
DRIVERS = ("psycopg", "psycopg2")

# One session per Django series, spread over the oldest and newest of the rest.
CI = (
    "django4.2-py3.10-psycopg2",
    "django5.2-py3.12-psycopg",
    "django6.1-py3.13-psycopg",
)

# The kernel and shell each CI session pins, so that the selection spans
# ipykernel 6 and 7 and IPython 8 and 9 (IPython 9 needs Python 3.11; subshells
# need ipykernel 7).  Other sessions take the newest the extras allow.
KERNEL_7 = "ipykernel>=7,!=7.0.0,!=7.0.1"
STACKS = {
    "django4.2-py3.10-psycopg2": ("ipykernel>=6,<7", "ipython>=8,<9"),
    "django5.2-py3.12-psycopg": (KERNEL_7, "ipython>=8,<9"),
    "django6.1-py3.13-psycopg": (KERNEL_7, "ipython>=9"),
}

VERSIONS = """
import importlib.metadata as metadata, sys
shown = ["Python " + sys.version.split()[0]]
for name in ("Django", "ipython", "ipykernel", "django-extensions", "django-configurations",
             "psycopg", "psycopg2-binary", "mysqlclient"):
    try:
        shown.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        shown.append(f"no {name}")
print(" | ".join(shown))
"""

NO_PSYCOPG_3 = """
import importlib.util, sys
if importlib.util.find_spec("psycopg"):
    sys.exit("psycopg 3 is installed in a psycopg2-only session")
"""


def interpreter(version: str) -> str:
    """The newest pyenv build of ``version`` if there is one, else ``version`` for nox to find."""
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    builds = []
    for python in root.glob(f"{version}.*/bin/python{version}"):
        patch = re.fullmatch(rf"{re.escape(version)}\.(\d+)", python.parent.parent.name)
        if patch:
            builds.append((int(patch.group(1)), python))
    return str(max(builds)[1]) if builds else version


def test_requirements(driver: str) -> list[str]:
    """``pip install`` arguments: the project (editable) with its ``test`` extra, for ``driver``."""
    extras = nox.project.load_toml(ROOT / "pyproject.toml")["project"]["optional-dependencies"]
    project: list[str] = []
    others: list[str] = []
    for requirement in extras["test"]:
        own = re.fullmatch(r"ipy_dbreset\[(.*)\]", requirement)
        if own is None:
            others.append(requirement)
            continue
        # Each driver is an extra of its own: a psycopg2 session leaves psycopg 3 out.
        wanted = [e.strip() for e in own.group(1).split(",")]
        wanted = [e for e in wanted if not (driver == "psycopg2" and e == "psycopg")]
        # The test extra leaves mysqlclient out (it is built from source); the
        # MySQL tests must run here, CI=true fails them when it is missing.
        wanted.append("mysql")
        project = ["-e", f".[{','.join(wanted)}]"]
    return [*project, *others]


def run_tests(session: nox.Session, django: str, driver: str, stack: tuple[str, ...]) -> None:
    session.install(*test_requirements(driver), DJANGO[django], *stack)
    session.run("python", "-c", VERSIONS)
    pytest_args = ["-p", "no:cacheprovider", *session.posargs]
    if driver == "psycopg":
        # psycopg2 is installed too (the test extra); its tests run in the psycopg2 sessions.
        session.run(
            "python", "-m", "pytest", *pytest_args, env={"IPY_DBRESET_TEST_DRIVERS": "psycopg"}
        )
        return
    session.run("python", "-c", NO_PSYCOPG_3)
    fixtures = Path(session.create_tmp()) / "fixture-driver"
    session.install("--target", str(fixtures), "--upgrade", "psycopg[binary]")
    # The pytest process alone sees the fixtures' psycopg 3 (tests/conftest.py).
    session.run(
        "python",
        "-m",
        "pytest",
        *pytest_args,
        env={"IPY_DBRESET_TEST_FIXTURE_PATH": str(fixtures)},
    )


def define(django: str, python: str, driver: str) -> None:
    name = f"django{django}-py{python}-{driver}"

    stack = STACKS.get(name, ())

    def session(session: nox.Session) -> None:
        run_tests(session, django, driver, stack)

    session.__doc__ = f"Django {django}, Python {python}, " + (
        "psycopg 3 tests" if driver == "psycopg" else "psycopg2 only"
    )
    if stack:
        session.__doc__ += ", " + ", ".join(stack)
    nox.session(
        name=name,
        python=interpreter(python),
        tags=[f"django{django}", f"py{python}", driver, *(["ci"] if name in CI else [])],
        default=name in CI,
        download_python="never",
    )(session)


for _django, _pythons in PYTHONS.items():
    for _python in _pythons:
        for _driver in DRIVERS:
            define(_django, _python, _driver)
