"""What ``pip install`` brings, and what the package says it supports.

A project that installs ipy_dbreset gets only what the package always imports;
the drivers, django-extensions and Jupyter are extras, and the demo and test
extras install without compiling anything.  The classifiers name what the nox
matrix tests, and the README's two commands are those CI runs.
"""

from __future__ import annotations

import ast
import re

import pytest

from harness import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; these checks need one Python only

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]


def name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def installed_by(extra: str) -> dict[str, str]:
    """The requirements an extra brings, its own extras followed: {name: requirement}."""
    found: dict[str, str] = {}
    for requirement in EXTRAS[extra]:
        own = re.fullmatch(r"ipy_dbreset\[(.*)\]", requirement)
        if own:
            for inner in own.group(1).split(","):
                found.update(installed_by(inner.strip()))
        else:
            found[name(requirement)] = requirement
    return found


def matrix() -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """noxfile.py's DJANGO and PYTHONS, read without importing nox."""
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    values = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else None
        if isinstance(target, ast.Name) and target.id in ("DJANGO", "PYTHONS"):
            values[target.id] = ast.literal_eval(node.value)
    return values["DJANGO"], values["PYTHONS"]


def test_a_project_gets_only_what_the_package_always_imports():
    assert sorted(name(r) for r in PROJECT["dependencies"]) == ["django", "ipython"]


def test_each_driver_and_jupyter_is_an_extra_of_its_own():
    assert set(installed_by("psycopg")) == {"psycopg"}
    assert set(installed_by("psycopg2")) == {"psycopg2-binary"}
    assert set(installed_by("mysql")) == {"mysqlclient"}
    assert set(installed_by("shell-plus")) == {"django-extensions"}
    assert set(installed_by("notebook")) == {"ipykernel", "jupyterlab"}


def test_no_extra_installs_the_ipykernel_releases_that_leak_a_connection_per_cell():
    for extra in EXTRAS:
        kernel = installed_by(extra).get("ipykernel")
        if kernel is not None:
            assert "!=7.0.0" in kernel and "!=7.0.1" in kernel, (extra, kernel)


def test_the_demo_and_the_tests_install_without_compiling_anything():
    # mysqlclient is the one dependency with no Linux wheel.
    assert "mysqlclient" not in installed_by("demo")
    assert "mysqlclient" not in installed_by("test")
    assert {"ipykernel", "nbclient", "nbformat"} <= set(installed_by("demo"))


def test_the_test_extra_has_what_the_tests_use():
    # Both PostgreSQL drivers (every scenario runs with each), and shell_plus.
    assert {"psycopg", "psycopg2-binary", "django-extensions"} <= set(installed_by("test"))
    assert "mysqlclient" in installed_by("dev")


def test_classifiers_name_what_the_matrix_tests():
    django, pythons = matrix()
    classifiers = PROJECT["classifiers"]
    listed = {c.rsplit(" :: ", 1)[1] for c in classifiers if c.startswith("Framework :: Django ::")}
    assert listed == set(django)
    tested = {python for series in pythons.values() for python in series}
    named = {
        c.rsplit(" :: ", 1)[1]
        for c in classifiers
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    }
    assert named == tested
    lowest = min(tested, key=lambda v: tuple(map(int, v.split("."))))
    assert PROJECT["requires-python"] == f">={lowest}"


def test_the_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[demo]" && python notebooks/run_demo.py' in readme
    assert 'pip install -e ".[test]" && python -m pytest\n' in readme
    assert re.search(r"^timeout .* python -m pytest \|\|", ci, re.MULTILINE)
    assert '"${wheel[0]}[demo]"' in ci
    assert re.search(r'^"\$release/venv/bin/python" notebooks/run_demo.py$', ci, re.MULTILINE)
    assert len(readme) <= 8500, "the README is the short version: the rest goes to docs/"
