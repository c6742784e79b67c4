"""Make the pictures in ``docs/images/`` again, from a real kernel and a real browser.

A short notebook runs in a Jupyter kernel against PostgreSQL (a database of
its own, created and dropped here), as ``notebooks/run_demo.py`` runs the
demos; the cell with a repair notice and the ``%dbstatus`` cell are each
rendered to HTML by nbconvert, photographed by headless Chromium at a
notebook's width and trimmed::

    python docs/screenshots.py                                   # the local server
    python docs/screenshots.py --server postgresql://postgres@db.example:5432

Needs what ``pip install -e ".[demo,psycopg]" nbconvert pillow`` installs and
``chromium`` (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import nbformat
import psycopg
from nbconvert import HTMLExporter
from PIL import Image, ImageChops

if TYPE_CHECKING:
    from types import ModuleType

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATABASE = "dbreset_docs"  # a name of its own: it is dropped at the end
WIDTH = 820  # CSS pixels of the browser window: about 700 for the output

CELLS = [
    "%load_ext ipy_dbreset",
    "%xmode Minimal\n"
    "from django.core.management import call_command\n"
    "from django.db import transaction\n"
    "from shop.models import Order\n"
    'call_command("migrate", verbosity=0)\n'
    'Order.objects.create(number=1, customer="Ada")\n'
    'Order.objects.create(number=2, customer="Grace")',
    # The notice: an IntegrityError in a manual transaction.
    "transaction.set_autocommit(False)\n"
    'Order.objects.create(number=3, customer="Edsger")\n'
    'Order.objects.create(number=1, customer="duplicate")',
    # %dbstatus: a new write in the transaction, and the repair under the row.
    'Order.objects.create(number=4, customer="Barbara")\n%dbstatus',
    "transaction.rollback()\ntransaction.set_autocommit(True)",
]
PICTURES = {"notice.png": 2, "dbstatus.png": 3}  # file: index of the cell shown


def load_run_demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("run_demo", ROOT / "notebooks" / "run_demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def notebook() -> nbformat.NotebookNode:
    cells = [nbformat.v4.new_code_cell(source) for source in CELLS]
    cells[2].metadata["tags"] = ["raises-exception"]
    book = nbformat.v4.new_notebook(cells=cells)
    book.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    return book


def photograph(html: Path, png: Path, chromium: str) -> None:
    """Screenshot ``html`` at the notebook's width, then trim the empty page around it."""
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--window-size={WIDTH},1600",
            f"--screenshot={png}",
            html.as_uri(),
        ],
        check=True,
        capture_output=True,
    )
    with Image.open(png) as shot:
        picture = shot.convert("RGB")
    background = Image.new("RGB", picture.size, picture.getpixel((picture.width - 1, 0)))
    box = ImageChops.difference(picture, background).getbbox()
    if box is None:
        raise SystemExit(f"{png.name}: the page is empty")
    left, top, right, bottom = box
    picture = picture.crop((max(left - 8, 0), max(top - 8, 0), right + 8, bottom + 8))
    picture.quantize(colors=64).save(png, optimize=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--server",
        default="postgresql://postgres@127.0.0.1:5432",
        help="PostgreSQL server URL, without a database (default: %(default)s)",
    )
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        parser.error("no chromium on the PATH (apt-get install chromium)")
    run_demo = load_run_demo()
    admin = f"{args.server}/postgres"
    with psycopg.connect(admin, autocommit=True) as server:
        server.execute(f"drop database if exists {DATABASE}")
        server.execute(f"create database {DATABASE}")
    try:
        with tempfile.TemporaryDirectory(prefix="ipy_dbreset-screenshots-") as tmp:
            scratch = Path(tmp)
            book = notebook()
            run_demo.execute(book, scratch, f"{args.server}/{DATABASE}")
            exporter = HTMLExporter(template_name="lab")
            for name, index in PICTURES.items():
                shown = nbformat.v4.new_notebook(cells=[book.cells[index]], metadata=book.metadata)
                page, _ = exporter.from_notebook_node(shown)
                html = scratch / f"{name}.html"
                html.write_text(page, encoding="utf-8")
                photograph(html, scratch / name, chromium)
                shutil.copyfile(scratch / name, HERE / "images" / name)
                print(f"docs/images/{name}: {(HERE / 'images' / name).stat().st_size} bytes")
    finally:
        with psycopg.connect(admin, autocommit=True) as server:
            server.execute(f"drop database if exists {DATABASE} with (force)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
