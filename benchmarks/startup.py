"""What ``%load_ext ipy_dbreset`` costs at start-up, against ``django.setup()`` alone.

Run it from the repository root::

    .venv/bin/python benchmarks/startup.py                  # psycopg 3 and SQLite projects
    .venv/bin/python benchmarks/startup.py --rounds 20

Each sample is a fresh Python process in the demo project (``notebooks/``) that
creates an IPython shell and then runs one cell: either ``django.setup()`` (the
baseline: what any Django shell pays) or ``%load_ext ipy_dbreset``, which finds
the project through ``manage.py`` and sets Django up itself.  Only that cell is timed,
and the process's resident memory is read before and after it.  The two kinds of
process take turns (ABBA); the figures are medians.  Target: the extension adds at
most 25 ms.  Nothing connects to a database, so no server is needed.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "notebooks"
TARGET_MS = 25.0

# The demo project with a PostgreSQL URL: Django picks psycopg 3 (nothing connects).
PROJECTS = {
    "psycopg": "postgresql://postgres@127.0.0.1:5432/never_connected",
    "sqlite": "sqlite:///{scratch}/startup.sqlite3",
}

CHILD = """
import json, os, sys, time

def rss():
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0

from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

config = Config()
config.HistoryManager.hist_file = ":memory:"
shell = InteractiveShell.instance(config=config)
# Both kinds run as a shell's first cell, which costs about 5 ms of IPython's
# own (compiling, history, hooks) with or without the extension.
cell = "import django; django.setup()" if sys.argv[1] == "setup" else "%load_ext ipy_dbreset"
before, start = rss(), time.perf_counter()
result = shell.run_cell(cell)
assert result.success, result.error_in_exec
elapsed = time.perf_counter() - start
print(json.dumps({
    "ms": elapsed * 1000,
    "mb": (rss() - before) / 2**20,
    "psycopg2": "psycopg2" in sys.modules,
}))
"""


def sample(kind: str, env: dict[str, str]) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, kind],
        cwd=DEMO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def measure(project: str, url: str, rounds: int) -> dict[str, dict[str, float]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
    env.update(IPY_DBRESET_DEMO_DB=url, PYTHONPATH=str(ROOT))
    setup_env = {**env, "DJANGO_SETTINGS_MODULE": "demo.settings", "PYTHONPATH": f"{ROOT}:{DEMO}"}
    kinds = {"setup": setup_env, "load_ext": env}  # %load_ext finds manage.py itself
    for kind, kind_env in kinds.items():
        sample(kind, kind_env)  # warm the file cache
    samples: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    for i in range(rounds):
        order = list(kinds) if i % 2 == 0 else list(reversed(kinds))
        for kind in order:
            samples[kind].append(sample(kind, kinds[kind]))
    return {
        kind: {
            "ms": statistics.median(s["ms"] for s in found),
            "mb": statistics.median(s["mb"] for s in found),
            "psycopg2": any(s["psycopg2"] for s in found),
        }
        for kind, found in samples.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=10, help="processes of each kind")
    args = parser.parse_args(argv)
    # Django and IPython come from pip with their bytecode compiled; a checkout's
    # ipy_dbreset may have none (PYTHONDONTWRITEBYTECODE, a fresh clone), and
    # compiling it in every process would be measured as start-up.
    compileall.compile_dir(str(ROOT / "ipy_dbreset"), quiet=1)
    print(f"%load_ext ipy_dbreset vs django.setup(), fresh processes, {args.rounds} each, medians")
    print()
    print("project     setup ms  load_ext ms  extra ms  extra MB  psycopg2")
    with tempfile.TemporaryDirectory() as scratch:
        for project, url in PROJECTS.items():
            found = measure(project, url.format(scratch=scratch), args.rounds)
            setup, load = found["setup"], found["load_ext"]
            extra = load["ms"] - setup["ms"]
            verdict = "PASS" if extra <= TARGET_MS else "over target"
            print(
                f"{project:10} {setup['ms']:9.1f} {load['ms']:12.1f} {extra:+9.1f} "
                f"{load['mb'] - setup['mb']:+9.1f}  "
                f"{'imported' if load['psycopg2'] else 'not imported':12}  "
                f"target <= {TARGET_MS:.0f} ms: {verdict}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
