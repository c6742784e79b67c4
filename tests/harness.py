"""Real Jupyter kernels for the tests: start one in a folder, run cells, read what they show."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.manager import KernelManager

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "notebooks"


@dataclass
class Cell:
    """What a cell did: its status, error, and everything it showed."""

    code: str
    status: str = ""
    ename: str | None = None
    evalue: str | None = None
    stdout: str = ""
    stderr: str = ""
    texts: list[str] = field(default_factory=list)
    htmls: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def shown(self) -> str:
        """Everything the user saw, as text."""
        return "\n".join([self.stdout, self.stderr, *self.texts, self.evalue or ""])

    @property
    def notices(self) -> list[str]:
        return [t for t in self.texts + self.stdout.splitlines() if t.startswith("ipy_dbreset:")]

    def value(self) -> Any:
        """The cell's result, evaluated from its text/plain repr."""
        import ast

        results = [t for t in self.texts if not t.startswith("ipy_dbreset:")]
        assert results, f"cell showed no result: {self}"
        return ast.literal_eval(results[-1])


class Kernel:
    """A real ipykernel started in ``cwd`` with ``env``."""

    def __init__(self, cwd: Path = DEMO, env: dict[str, str] | None = None) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
        full_env.update(env or {})
        full_env.setdefault("PYTHONPATH", str(ROOT))
        self.manager = KernelManager(kernel_name="python3")
        self.manager.kernel_spec.argv[0] = sys.executable
        self.manager.start_kernel(cwd=str(cwd), env=full_env)
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)
        self.cells: list[Cell] = []

    def run(self, code: str, timeout: float = 60) -> Cell:
        cell = Cell(code)

        def hook(msg: dict[str, Any]) -> None:
            kind = msg["msg_type"]
            content = msg["content"]
            if kind == "stream":
                if content["name"] == "stdout":
                    cell.stdout += content["text"]
                else:
                    cell.stderr += content["text"]
            elif kind in ("execute_result", "display_data"):
                data = content["data"]
                if "text/plain" in data:
                    cell.texts.append(data["text/plain"])
                if "text/html" in data:
                    cell.htmls.append(data["text/html"])
            elif kind == "error":
                cell.ename, cell.evalue = content["ename"], content["evalue"]

        reply = self.client.execute_interactive(code, output_hook=hook, timeout=timeout)
        cell.status = reply["content"]["status"]
        if cell.status == "error" and cell.ename is None:
            cell.ename = reply["content"].get("ename")
            cell.evalue = reply["content"].get("evalue")
        self.cells.append(cell)
        return cell

    def ok(self, code: str, timeout: float = 60) -> Cell:
        """Run a cell that must succeed."""
        cell = self.run(code, timeout)
        assert cell.ok, f"cell failed: {cell.ename}: {cell.evalue}\n{code}\n{cell.shown}"
        return cell

    def interrupt_during(self, code: str, after: float = 1.0, timeout: float = 60) -> Cell:
        """Run ``code`` and interrupt the kernel (as the stop button does) after ``after`` s."""
        timer = threading.Timer(after, self.manager.interrupt_kernel)
        timer.start()
        try:
            return self.run(code, timeout)
        finally:
            timer.cancel()

    @property
    def failed(self) -> int:
        return sum(1 for c in self.cells if not c.ok)

    def close(self) -> None:
        try:
            self.client.stop_channels()
            self.manager.shutdown_kernel(now=True)
        except Exception:  # best effort at teardown
            if self.manager.has_kernel and self.manager.provisioner:
                pid = getattr(self.manager.provisioner, "pid", None)
                if pid:
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0)
