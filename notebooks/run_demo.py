"""Run a demo notebook in a real Jupyter kernel and print what each cell shows.

With no arguments, ``quickstart.ipynb`` runs against a throwaway SQLite
database (nothing is written into the repository)::

    python notebooks/run_demo.py

The PostgreSQL notebooks need a database URL (the notebook migrates it)::

    python notebooks/run_demo.py recovering.ipynb \\
        --db postgresql://postgres@127.0.0.1:5432/ipy_dbreset_demo

``--save`` writes the outputs back into the notebook, with this machine's
paths shortened to ``…``, so that it reads well when browsed.  The exit
status is 0 when every cell ran, apart from those tagged ``raises-exception``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXPECTED_FAILURE = "raises-exception"


def kernel_env(db_url: str, scratch: Path) -> dict[str, str]:
    """The kernel's environment: the demo database, and no leftover Django settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
    env["IPY_DBRESET_DEMO_DB"] = db_url
    env["IPY_DBRESET_DEMO_OTHER"] = str(scratch / "other.sqlite3")
    if not importable(env):
        # Not installed: the kernel imports it from this checkout.  When it is
        # installed (editable, or a built wheel), the kernel uses that one.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


FIND = "import importlib.util, sys; sys.exit(importlib.util.find_spec('ipy_dbreset') is None)"


def importable(env: dict[str, str]) -> bool:
    """Whether a kernel started here with ``env`` finds ipy_dbreset installed.

    Asked of a new interpreter in the demo folder, as the kernel will be
    started: this process may have the checkout on ``sys.path`` (pytest, ``-m``)
    where the kernel would not.
    """
    probe = subprocess.run([sys.executable, "-c", FIND], cwd=HERE, env=env, check=False)
    return probe.returncode == 0


def execute(
    notebook: nbformat.NotebookNode, scratch: Path, db_url: str | None = None, timeout: int = 120
) -> None:
    """Execute ``notebook`` in the demo project, in place: its cells get their outputs.

    ``scratch`` is a folder for the throwaway SQLite files and the kernel's
    log.  Raises :class:`nbclient.exceptions.CellExecutionError` when a cell
    that is not tagged ``raises-exception`` fails; the cells before it keep
    their outputs.
    """
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)  # timings would only add noise to diffs
    url = db_url or "sqlite:///" + (scratch / "db.sqlite3").as_posix().lstrip("/")
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(HERE)}},
    )
    # The kernel's own log (ipykernel's start-up warnings) would clutter the
    # transcript: keep it aside, and show it only if something went wrong.
    log_path = scratch / "kernel.log"
    with log_path.open("w") as log:
        try:
            client.execute(env=kernel_env(url, scratch), stdout=log, stderr=log)
        except BaseException:
            log.flush()
            sys.stderr.write(log_path.read_text())
            raise


def shorten(notebook: nbformat.NotebookNode, paths: dict[str, str]) -> None:
    """Replace this machine's paths in the outputs, longest first."""

    def fix(text: str) -> str:
        for long, short in sorted(paths.items(), key=lambda item: -len(item[0])):
            text = text.replace(long, short)
        return text

    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if "text" in output:
                output["text"] = fix(output["text"])
            for mime, value in output.get("data", {}).items():
                if isinstance(value, str) and mime.startswith("text/"):
                    output["data"][mime] = fix(value)
            if "evalue" in output:
                output["evalue"] = fix(output["evalue"])
            if "traceback" in output:
                output["traceback"] = [fix(line) for line in output["traceback"]]


def output_text(output: dict[str, Any]) -> str:
    """What an output shows in a terminal."""
    kind = output["output_type"]
    if kind == "stream":
        return str(output["text"]).rstrip("\n")
    if kind in ("execute_result", "display_data"):
        return str(output.get("data", {}).get("text/plain", "")).rstrip("\n")
    if kind == "error":
        return f"{output['ename']}: {output['evalue']}"
    return ""


def render(notebook: nbformat.NotebookNode) -> str:
    """The notebook as a terminal transcript: markdown, sources and text outputs."""
    parts: list[str] = []
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            parts.append(textwrap.indent(cell.source.strip(), "# "))
        elif cell.cell_type == "code":
            number = cell.get("execution_count") or " "
            lines = cell.source.splitlines() or [""]
            prompt = f"In [{number}]: "
            source = [prompt + lines[0]] + [
                " " * (len(prompt) - 5) + "...: " + x for x in lines[1:]
            ]
            shown = [output_text(o) for o in cell.get("outputs", [])]
            parts.append("\n".join(source + [s for s in shown if s]))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "notebook",
        nargs="?",
        default="quickstart.ipynb",
        help="notebook to run, in notebooks/ or a path (default: quickstart.ipynb)",
    )
    parser.add_argument(
        "--db",
        metavar="URL",
        help="database URL (default: a throwaway SQLite file); see demo/settings.py",
    )
    parser.add_argument(
        "--save", action="store_true", help="write the outputs back into the notebook"
    )
    args = parser.parse_args(argv)
    path = Path(args.notebook)
    if not path.is_file():
        path = HERE / args.notebook
    if not path.is_file():
        parser.error(f"no notebook {args.notebook!r}")
    with tempfile.TemporaryDirectory(prefix="ipy_dbreset-demo-") as tmp:
        scratch = Path(tmp)
        notebook = nbformat.read(path, as_version=4)
        try:
            execute(notebook, scratch, args.db)
        except CellExecutionError as exc:
            print(render(notebook))
            print(f"{path.name}: a cell failed unexpectedly: {exc.ename}: {exc.evalue}")
            return 1
        print(render(notebook))
        if args.save:
            shorten(notebook, {str(scratch): "…", str(ROOT): "…"})
            nbformat.write(notebook, path)
            print(f"outputs saved in {path}")
    tagged = [
        c for c in notebook.cells if EXPECTED_FAILURE in c.get("metadata", {}).get("tags", [])
    ]
    silent = [c for c in tagged if not any(o["output_type"] == "error" for o in c.outputs)]
    if silent:
        print(f"{path.name}: {len(silent)} cell(s) tagged {EXPECTED_FAILURE} did not fail")
        return 1
    print(f"{path.name}: every cell ran as expected ({len(tagged)} failed on purpose)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
