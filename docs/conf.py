"""Sphinx configuration: the pages in this folder, in Markdown (MyST), and the demo notebooks.

Build them as CI does, warnings (a broken internal link among them) as errors::

    python -m sphinx -W -n --keep-going -b html docs docs/_build/html

The notebooks under ``demo/`` are links to ``notebooks/*.ipynb``, shown with
the outputs they were saved with (``python notebooks/run_demo.py NAME --save``);
nothing is executed here.  The README and CHANGELOG are not pages, but their
relative links are checked too: a link to a file that does not exist is a warning.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from sphinx.util import logging

if TYPE_CHECKING:
    from sphinx.application import Sphinx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

project = "ipy_dbreset"
author = "ipy_dbreset contributors"
copyright = "ipy_dbreset contributors"
release = metadata.version("ipy_dbreset")  # the docs extra comes with the project installed

extensions = ["myst_nb"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
nitpicky = True

myst_enable_extensions = ["attrs_block", "colon_fence", "deflist"]
# Anchors for headings down to ###, so that links such as page.md#section are checked.
myst_heading_anchors = 3

nb_execution_mode = "off"  # the notebooks carry the outputs of a real run
nb_merge_streams = True

html_theme = "furo"
html_title = "ipy_dbreset"
html_static_path = ["_static"]
html_css_files = ["tables.css"]

LINK = re.compile(r"\]\(([^)\s]+)\)")


def check_repository_links(app: Sphinx) -> None:
    """Warn about a relative link in README.md or CHANGELOG.md to a file that is not there."""
    log = logging.getLogger(__name__)
    for name in ("README.md", "CHANGELOG.md"):
        page = ROOT / name
        if not page.is_file():
            log.warning("%s is missing", name)
            continue
        for number, line in enumerate(page.read_text().splitlines(), start=1):
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target) or target.startswith("#"):
                    continue  # a URL (not checked: no network here), or an anchor
                path = target.split("#", 1)[0]
                if not (ROOT / path).exists():
                    log.warning("%s:%d: link to a missing file: %s", name, number, target)


def setup(app: Sphinx) -> None:
    app.connect("builder-inited", check_repository_links)
