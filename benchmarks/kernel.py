"""What ipy_dbreset costs per cell in a real Jupyter kernel, where users run it.

A kernel is not a terminal shell: ipykernel replaces the SIGINT handler around
every ``execute_request``, so whatever the extension does with signals is paid
per cell there and never in ``InteractiveShell``.  :func:`measure` starts a real
ipykernel through ``jupyter_client``, with an open Django connection, and runs
empty cells sent as real execute requests.  Inside the kernel, timers
stand outside everything else: one around ``run_cell_async`` (the whole cell as
the kernel runs it, without the messaging), one around each of the
extension's callbacks, and one around each of the kernel's SIGINT hooks
(``pre_handler_hook``/``post_handler_hook``, run around every request),
which the extension takes over to put its guard in front.  Rounds alternate
between the extension unloaded and loaded in the same kernel (ABBA), so the
machine's drift favours neither.

``percell.py`` prints these figures beside the terminal shell's.
"""

from __future__ import annotations

import ast
import statistics
import sys
from pathlib import Path
from typing import Any

from common import DEMO, BenchmarkBroken

# Run in the kernel once: timers around run_cell_async and, when asked, around
# the extension's callbacks.  They are put on and taken off around each round,
# so that %unload_ext finds exactly the callbacks it registered.
KERNEL_TIMERS = r'''
import functools as _functools, time as _time
_bench = {
    "cells": [], "pre_run_cell": [], "post_run_cell": [],
    "pre_handler_hook": [], "post_handler_hook": [],
}
_shell = get_ipython()
_clock = _time.perf_counter_ns

def _bench_timed_cell(run_cell_async):
    @_functools.wraps(run_cell_async)
    async def timed(*args, **kwargs):
        started = _clock()
        try:
            return await run_cell_async(*args, **kwargs)
        finally:
            _bench["cells"].append(_clock() - started)
    return timed

_shell.run_cell_async = _bench_timed_cell(type(_shell).run_cell_async.__get__(_shell))

def _bench_timed(call, times):
    def timed(*args):
        started = _clock()
        try:
            return call(*args)
        finally:
            times.append(_clock() - started)
    return timed

def _bench_wrap(loaded):
    """Time the extension's callbacks (when loaded) and the kernel's SIGINT hooks,
    which the extension may take over; return how to put them back."""
    swapped = []
    if loaded:
        for event in ("pre_run_cell", "post_run_cell"):
            callbacks = _shell.events.callbacks[event]
            for i, callback in enumerate(callbacks):
                if getattr(callback, "__module__", "").startswith("ipy_dbreset"):
                    callbacks[i] = _bench_timed(callback, _bench[event])
                    swapped.append((callbacks, i, callback))
        if len(swapped) != 2:
            raise RuntimeError(f"expected the extension's 2 callbacks, found {len(swapped)}")
    kernel = _shell.kernel
    hooks = {name: kernel.__dict__.get(name) for name in ("pre_handler_hook", "post_handler_hook")}
    for name in hooks:
        setattr(kernel, name, _bench_timed(getattr(kernel, name), _bench[name]))
    def restore():
        for callbacks, i, callback in swapped:
            callbacks[i] = callback
        for name, before in hooks.items():
            if before is None:
                delattr(kernel, name)
            else:
                setattr(kernel, name, before)
    return restore
'''


def _median_of(values: list[int]) -> float:
    if not values:
        raise BenchmarkBroken("the kernel timed no cell")
    return statistics.median(values)


_BATCH = 200  # cells sent at once: their IOPub messages stay below ZMQ's high-water mark


class _Kernel:
    """A real ipykernel in the demo project, driven with execute requests."""

    def __init__(self, env: dict[str, str]) -> None:
        from jupyter_client.manager import KernelManager

        # Unix sockets: no TCP port to pick, none to collide with another kernel's.
        self.manager = KernelManager(kernel_name="python3", transport="ipc")
        self.manager.ip = str(Path(env["IPYTHONDIR"]).parent / "kernel")
        self.manager.kernel_spec.argv[0] = sys.executable
        self.manager.start_kernel(cwd=str(DEMO), env=env)
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def run(self, code: str) -> dict[str, Any]:
        """Run a cell; its result's ``text/plain``, or BenchmarkBroken if it failed."""
        shown: dict[str, Any] = {}

        def hook(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "execute_result":
                shown["value"] = msg["content"]["data"].get("text/plain")
            elif msg["msg_type"] == "error":
                shown["error"] = f"{msg['content']['ename']}: {msg['content']['evalue']}"

        reply = self.client.execute_interactive(code, output_hook=hook, timeout=120)
        if reply["content"]["status"] != "ok":
            raise BenchmarkBroken(f"a kernel cell failed: {shown.get('error')}\n{code}")
        return shown

    def empty_cells(self, n: int) -> None:
        # Sent back to back without waiting for each reply: the kernel runs them one
        # by one as a notebook's "run all" does, and the client's turnaround is
        # not what is measured.  In batches, each read to its end on IOPub: a
        # PUB socket drops what a reader leaves queued past its high-water mark.
        for start in range(0, n, _BATCH):
            count = min(_BATCH, n - start)
            ids = [self.client.execute("pass", store_history=True) for _ in range(count)]
            pending = set(ids)
            while pending:
                msg = self.client.get_shell_msg(timeout=120)
                parent = msg["parent_header"].get("msg_id")
                if parent in pending:
                    if msg["content"]["status"] != "ok":
                        raise BenchmarkBroken("an empty cell failed in the kernel")
                    pending.discard(parent)
            while True:
                msg = self.client.get_iopub_msg(timeout=120)
                idle = msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
                if idle and msg["parent_header"].get("msg_id") == ids[-1]:
                    break

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


def measure(env: dict[str, str], *, driver: str, cells: int, rounds: int) -> dict[str, float]:
    """Median cell (ns) unloaded and loaded, and the callbacks' median per cell, in a kernel."""
    kernel = _Kernel(env)
    try:
        if driver == "psycopg2":
            kernel.run("import sys; sys.modules['psycopg'] = None")
        kernel.run("%load_ext ipy_dbreset")
        used = kernel.run(
            "from django.db import connection\n"
            "connection.ensure_connection()\n"
            "type(connection.connection).__module__.split('.')[0]"
        )["value"].strip("'")
        if used != driver:
            raise BenchmarkBroken(f"the kernel uses {used}, not {driver}")
        kernel.run(KERNEL_TIMERS)
        kernel.empty_cells(cells)  # warm-up
        figures: dict[str, list[float]] = {
            "bare": [],
            "loaded": [],
            "callbacks": [],
            "hooks bare": [],
            "hooks loaded": [],
        }
        for i in range(rounds * 2):
            loaded = (i % 4) in (1, 2)  # bare, loaded, loaded, bare, ...
            switch = "%load_ext ipy_dbreset" if loaded else "%unload_ext ipy_dbreset"
            kernel.run(f"{switch}\n_bench_restore = _bench_wrap({loaded})")
            kernel.run("for _times in _bench.values(): _times.clear()")
            kernel.empty_cells(cells)
            # What this cell itself adds (its span, its pre_run_cell, its
            # request's pre_handler_hook) comes after the empty cells' in each
            # list, as its clearing cell's post_run_cell and post_handler_hook
            # come before them.
            timed = kernel.run("repr([_bench[k][:] for k in _bench])")["value"]
            spans, pre, post, pre_hook, post_hook = ast.literal_eval(ast.literal_eval(timed))
            spans = spans[-cells:]
            figures["loaded" if loaded else "bare"].append(_median_of(spans))
            hooks = [a + b for a, b in zip(pre_hook[:cells], post_hook[-cells:], strict=True)]
            figures["hooks loaded" if loaded else "hooks bare"].append(_median_of(hooks))
            if loaded:
                per_cell = [a + b for a, b in zip(pre[:cells], post[-cells:], strict=True)]
                figures["callbacks"].append(_median_of(per_cell))
            kernel.run("_bench_restore()")
        return {key: statistics.median(values) for key, values in figures.items()}
    finally:
        kernel.close()
