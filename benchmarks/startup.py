"""What ``%load_ext ipy_dbreset`` costs at start-up, against ``django.setup()`` alone.

Run it from the repository root::

    .venv/bin/python benchmarks/startup.py                  # psycopg 3 and SQLite projects
    .venv/bin/python benchmarks/startup.py --rounds 20

Each sample is a fresh Python process in the demo project (``notebooks/``) that
creates an IPython shell and then runs one cell: either ``django.setup()`` (the
baseline: what any Django shell pays) or ``%load_ext ipy_dbreset``, which finds
the project through ``manage.py`` and sets Django up itself.  Only that cell is timed,
and the process's resident memory is read before and after it.  The two kinds of
process take turns (ABBA); the extra is the median of each round's difference,
whose two processes ran back to back (this machine's speed drifts over seconds),
with the best against the best beside it.  Target: the extension adds at most
25 ms.  Nothing connects to a database, so no server is needed.
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
from typing import Any

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


def measure(project: str, url: str, rounds: int) -> dict[str, Any]:
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
    setup, load = samples["setup"], samples["load_ext"]
    return {
        "setup_ms": statistics.median(s["ms"] for s in setup),
        "load_ms": statistics.median(s["ms"] for s in load),
        # This machine's speed drifts from one second to the next: each round's
        # two processes ran back to back, so their difference drifts least.
        "extra_ms": statistics.median(b["ms"] - a["ms"] for a, b in zip(setup, load, strict=True)),
        "best_extra_ms": min(s["ms"] for s in load) - min(s["ms"] for s in setup),
        "extra_mb": statistics.median(s["mb"] for s in load)
        - statistics.median(s["mb"] for s in setup),
        "psycopg2": any(s["psycopg2"] for s in load),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=20, help="processes of each kind")
    args = parser.parse_args(argv)
    # Django and IPython come from pip with their bytecode compiled; a checkout's
    # ipy_dbreset may have none (PYTHONDONTWRITEBYTECODE, a fresh clone), and
    # compiling it in every process would be measured as start-up.
    compileall.compile_dir(str(ROOT / "ipy_dbreset"), quiet=1)
    print(f"%load_ext ipy_dbreset vs django.setup(), fresh processes, {args.rounds} rounds")
    print()
    print("           median ms          extra ms (load_ext - setup)")
    print("project     setup  load_ext   per round, median   best vs best  extra MB  psycopg2")
    with tempfile.TemporaryDirectory() as scratch:
        for project, url in PROJECTS.items():
            found = measure(project, url.format(scratch=scratch), args.rounds)
            verdict = "PASS" if found["extra_ms"] <= TARGET_MS else "over target"
            print(
                f"{project:10} {found['setup_ms']:6.1f} {found['load_ms']:9.1f} "
                f"{found['extra_ms']:+20.1f} {found['best_extra_ms']:+14.1f} "
                f"{found['extra_mb']:+9.1f}  "
                f"{'imported' if found['psycopg2'] else 'not imported':12}  "
                f"target <= {TARGET_MS:.0f} ms: {verdict}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
