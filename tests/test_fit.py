"""``%dbstatus`` and the notices fit where users read them, for realistic rows.

In a notebook: JupyterLab beside its file browser leaves about 550 px for an
output.  The table is rendered by a real headless Chromium with JupyterLab's
own rules for an output's tables, and measured there.  In a terminal: a real
terminal IPython on a pseudo-terminal of 100 and of 60 columns; what the
extension prints wraps at words to that width.

The rows are a real kernel's, on PostgreSQL: an aborted manual transaction
(a long repair line), a connection lost in an atomic block, an atomic block
holding writes, another thread's connection, and the host named as a managed
cloud database names itself.
"""

from __future__ import annotations

import fcntl
import html
import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from typing import TYPE_CHECKING

import pytest

from conftest import DRIVERS, IN_CI, terminate_backends, wait_until_disconnected
from harness import DEMO, clean_env

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from harness import Kernel

pytestmark = pytest.mark.postgres

CLOUD_HOST = "mydb.c1abcdefgh.eu-west-1.rds.amazonaws.com"
OUTPUT_PX = 550  # JupyterLab at 1000 px with its file browser open

# Shown as a project's database in the cloud would be: the connections are
# local, and %dbstatus reads host and name from the settings (the tests'
# generated database names are longer than a project's).
AS_IN_THE_CLOUD = f"connection.settings_dict.update(HOST={CLOUD_HOST!r}, NAME='shop')"

ROLLED_BACK = (
    "rolled back db 'default': a failed statement aborted the transaction; "
    "lost 2 unsaved writes (INSERT shop_order x2); "
    "autocommit is still off, so the next query opens a new transaction"
)


# -- in a notebook ---------------------------------------------------------------------

# JupyterLab 4.6's rules for an HTML output and its tables, as the running app
# applies them (read from its style sheets), with its light theme's sizes.
JUPYTERLAB_CSS = """
:root {
  --jp-content-font-family: system-ui, -apple-system, blinkmacsystemfont, "Segoe UI",
    helvetica, arial, sans-serif;
  --jp-content-font-size1: 14px; --jp-ui-font-size1: 13px; --jp-content-line-height: 1.6;
  --jp-border-width: 1px; --jp-border-color1: #bdbdbd;
}
.lm-Widget { box-sizing: border-box; position: relative; }
.jp-RenderedHTMLCommon {
  font-family: var(--jp-content-font-family); font-size: var(--jp-content-font-size1);
  line-height: var(--jp-content-line-height); padding-right: 20px;
}
.jp-RenderedHTMLCommon table {
  border-collapse: collapse; border-spacing: 0; border: none;
  font-size: var(--jp-ui-font-size1); table-layout: fixed;
  margin-left: auto; margin-bottom: 1em; margin-right: auto;
}
.jp-RenderedHTMLCommon thead {
  border-bottom: var(--jp-border-width) solid var(--jp-border-color1); vertical-align: bottom;
}
.jp-RenderedHTMLCommon td, .jp-RenderedHTMLCommon th, .jp-RenderedHTMLCommon tr {
  vertical-align: middle; padding: 0.5em; line-height: normal; white-space: normal;
  max-width: none; border: none;
}
:not(.jp-RenderedMarkdown).jp-RenderedHTMLCommon td,
:not(.jp-RenderedMarkdown).jp-RenderedHTMLCommon th,
:not(.jp-RenderedMarkdown).jp-RenderedHTMLCommon tr { text-align: right; }
.jp-RenderedHTMLCommon th { font-weight: bold; }
.jp-OutputArea-output { height: auto; overflow: auto; }
.jp-OutputArea-output.jp-RenderedHTMLCommon table { margin-left: 0; margin-right: 0; }
"""

# Written into the page once it is laid out: each output's widths, and every
# word that the browser broke over two lines (a word: a run of non-spaces in
# one text node; the table marks where a long name may break with <wbr>).
MEASURE = """
const found = [...document.querySelectorAll('.jp-OutputArea-output')].map(area => {
  const broken = [];
  const walk = document.createTreeWalker(area, NodeFilter.SHOW_TEXT);
  for (let node = walk.nextNode(); node; node = walk.nextNode()) {
    for (const word of node.data.matchAll(/\\S+/g)) {
      const range = document.createRange();
      range.setStart(node, word.index);
      range.setEnd(node, word.index + word[0].length);
      const tops = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
      if (tops.size > 1) broken.push(word[0]);
    }
  }
  const table = area.querySelector('table');
  // The lines the host's cell takes (none: no such cell).
  const host = [...area.querySelectorAll('td')].find(td => td.textContent.includes('.com:'));
  const range = document.createRange();
  if (host) range.selectNodeContents(host);
  const tops = host ? new Set([...range.getClientRects()].map(r => Math.round(r.top))) : [];
  return {
    client: area.clientWidth, scroll: area.scrollWidth,
    table: Math.ceil(table.getBoundingClientRect().width),
    host_lines: host ? tops.size : 0, text: area.textContent, broken,
  };
});
document.getElementById('measured').textContent = JSON.stringify(found);
"""


def chromium() -> str:
    """The headless browser: skipped without one, a failure under CI (.ci/run installs it)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    why = "no Chromium to render the table in (apt-get install chromium)"
    if IN_CI:
        pytest.fail(f"{why} (CI=true: the browser test must run)", pytrace=False)
    pytest.skip(why)


def rendered(outputs: list[str], tmp_path: Path) -> list[dict]:
    """``outputs`` (HTML) laid out by Chromium, each in an output area OUTPUT_PX wide."""
    areas = "".join(
        f'<div class="lm-Widget jp-RenderedHTMLCommon jp-RenderedHTML jp-OutputArea-output"'
        f' style="width:{OUTPUT_PX}px">{output}</div>'
        for output in outputs
    )
    page = tmp_path / "outputs.html"
    page.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><style>{JUPYTERLAB_CSS}</style>"
        f"</head><body>{areas}<pre id='measured'></pre><script>{MEASURE}</script></body></html>"
    )
    done = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1000,1000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    found = re.search(r"<pre id=\"measured\">(.*?)</pre>", done.stdout, re.S)
    assert found and found.group(1), f"Chromium measured nothing:\n{done.stderr[-3000:]}"
    return json.loads(html.unescape(found.group(1)))


@pytest.fixture
def busy(start_kernel: Callable[..., Kernel], postgres_url: str, postgres_db: str) -> Kernel:
    """A kernel with realistic connections and repairs behind it (see the module's docstring)."""
    # The other alias in memory: pytest's folder names are longer than a project's.
    kernel = start_kernel(postgres_url, DRIVERS[0], env={"IPY_DBRESET_DEMO_OTHER": ":memory:"})
    kernel.ok("from django.db import connections; import threading")
    kernel.ok("Order.objects.create(number=1)")
    kernel.ok("transaction.set_autocommit(False)\nOrder.objects.create(number=2)")
    kernel.ok("Order.objects.create(number=3)")
    assert kernel.run("Order.objects.create(number=1)").ename == "IntegrityError"
    kernel.ok(
        "transaction.set_autocommit(True)\na = transaction.atomic(); a.__enter__()\n"
        "Order.objects.create(number=4); Order.objects.filter(number=1).delete()"
    )
    assert terminate_backends(postgres_db) >= 1
    wait_until_disconnected(postgres_db)
    kernel.ok("Order.objects.count()")
    kernel.ok(
        "b = transaction.atomic(); b.__enter__()\n"
        "Order.objects.create(number=5); Order.objects.create(number=6)\n"
        "Order.objects.filter(number=5).update(number=7)"
    )
    kernel.ok(
        "connections['other'].ensure_connection()\n"
        "started, done = threading.Event(), threading.Event()\n"
        "def work():\n"
        "    connection.ensure_connection(); started.set(); done.wait()\n"
        "worker = threading.Thread(target=work, name='worker_0'); worker.start()\n"
        "started.wait(10)"
    )
    kernel.ok(AS_IN_THE_CLOUD)
    return kernel


@pytest.mark.kernel
def test_dbstatus_and_its_history_fit_550_px_of_jupyterlab_output(busy, tmp_path):
    status = busy.ok("%dbstatus").htmls[-1]
    history = busy.ok("%dbstatus --history").htmls[-1]
    busy.ok("done.set(); worker.join()")
    measured = rendered([status, history], tmp_path)
    for output, name in zip(measured, ("%dbstatus", "%dbstatus --history"), strict=True):
        assert output["scroll"] <= output["client"], (name, output)  # no scrollbar
        assert output["table"] <= OUTPUT_PX - 20, (name, output)  # JupyterLab's padding
        assert output["broken"] == [], (name, output)  # wrapped between words only

    shown = measured[0]["text"]
    assert f"{CLOUD_HOST}:5432/shop" in shown  # whole, for a copy and paste
    assert "worker_0" in shown and "in an atomic block: 3 writes, open" in shown, shown
    assert "closed db 'default': the server closed the connection; lost an atomic block" in shown
    assert measured[0]["host_lines"] > 1, measured[0]  # wrapped, at its dots
    assert ROLLED_BACK.split(": ", 1)[1] in measured[1]["text"], measured[1]["text"]


# -- in a terminal ---------------------------------------------------------------------


class Terminal:
    """Terminal IPython on a pseudo-terminal ``columns`` wide: type a line, read the reply."""

    PROMPT = re.compile(r"In \[\d+\]: ")

    def __init__(self, columns: int, env: dict[str, str]) -> None:
        self.master, slave = os.openpty()
        attributes = termios.tcgetattr(slave)
        attributes[3] &= ~termios.ECHO  # what is typed is not shown back
        termios.tcsetattr(slave, termios.TCSANOW, attributes)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
        argv = [sys.executable, "-m", "IPython", "--no-banner", "--colors=NoColor"]
        argv += ["--simple-prompt", "--TerminalInteractiveShell.term_title=False"]
        self.process = subprocess.Popen(
            argv, cwd=DEMO, env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True
        )
        os.close(slave)
        self.pending = ""
        self.type("")

    def type(self, line: str, timeout: float = 60) -> str:
        """Type ``line``; everything the shell showed until its next prompt."""
        if line:
            os.write(self.master, line.encode() + b"\n")
        deadline = time.monotonic() + timeout
        while (found := self.PROMPT.search(self.pending)) is None:
            assert time.monotonic() < deadline, f"no prompt within {timeout}s:\n{self.pending}"
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the shell has exited
                    chunk = b""
                assert chunk, f"the shell exited; it showed:\n{self.pending}"
                self.pending += chunk.decode("utf-8", "replace").replace("\r\n", "\n")
        shown, self.pending = self.pending[: found.start()], self.pending[found.end() :]
        return shown

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                os.write(self.master, b"exit()\n")
                self.process.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            os.close(self.master)


def notices(shown: str) -> list[list[str]]:
    """Each notice in ``shown`` as the lines it takes (further lines hang under its text)."""
    found: list[list[str]] = []
    for line in shown.splitlines():
        if line.startswith("ipy_dbreset: "):
            found.append([line])
        elif found and line.startswith(" " * 13) and line.strip():
            found[-1].append(line)
    return found


@pytest.mark.parametrize("columns", [100, 60])
def test_terminal_notices_and_dbstatus_wrap_at_words_to_the_terminals_width(
    columns: int, postgres_url: str, postgres_db: str
) -> None:
    env = clean_env(
        IPY_DBRESET_DEMO_DB=postgres_url, IPY_DBRESET_DEMO_OTHER=os.devnull, TERM="dumb"
    )
    env.pop("COLUMNS", None)  # the terminal's own width, from the pseudo-terminal
    env.pop("LINES", None)
    shell = Terminal(columns, env)
    try:
        shell.type("%xmode Minimal")
        shell.type("%load_ext ipy_dbreset")
        shell.type("from shop.models import Order; from django.db import connection, transaction")
        shell.type("Order.objects.create(number=1); transaction.set_autocommit(False)")
        shell.type("Order.objects.create(number=2); Order.objects.create(number=3)")
        failed = shell.type("Order.objects.create(number=1)")
        shell.type("transaction.set_autocommit(True); a = transaction.atomic(); a.__enter__()")
        shell.type("Order.objects.create(number=4); Order.objects.filter(number=1).delete()")
        assert terminate_backends(postgres_db) >= 1
        wait_until_disconnected(postgres_db)
        closed = shell.type("Order.objects.count()")
        shell.type("b = transaction.atomic(); b.__enter__(); Order.objects.create(number=5)")
        shell.type(AS_IN_THE_CLOUD)
        status = shell.type("%dbstatus")
        history = shell.type("%dbstatus --history")
        shell.type("b.__exit__(None, None, None)")
    finally:
        shell.close()

    (rolled_back,) = notices(failed)
    assert len(rolled_back) > 1, failed  # wider than any terminal of these
    assert " ".join(line.strip() for line in rolled_back) == f"ipy_dbreset: {ROLLED_BACK}"
    (lost,) = notices(closed)
    assert "lost an atomic block with 2 unsaved writes" in " ".join(x.strip() for x in lost)
    for table in (status, history):
        assert table.startswith("Out["), table
        assert max(len(line) for line in table.splitlines()) <= columns, table
    text = " ".join(line.strip() for line in [*rolled_back, *lost, *status.splitlines()])
    for word in ("(INSERT", "shop_order", "unsaved", "transaction;", ".eu-west-1", "c1abcdefgh"):
        assert word in text, (word, status)
    for line in [*rolled_back, *lost]:
        assert len(line) <= columns, line
    # The last repair under its row, its further lines hanging: the words joined up again.
    under = re.search(r"\n    (last repair .*?)\n(?! {6})", status, re.S)
    assert under, status
    said = " ".join(part.strip() for part in under.group(1).splitlines())
    assert re.fullmatch(r"last repair at \d\d:\d\d:\d\d, closed db 'default': .+ reconnects", said)
