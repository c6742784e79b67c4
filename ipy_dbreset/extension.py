"""Loading and unloading the extension: all of it, or nothing.

:func:`load` registers the magics and the two cell callbacks only once Django
is set up; a bad option or a project that cannot be found registers nothing
and says why in one line (at start-up, without IPython's traceback, unless
``InteractiveShellApp.reraise_ipython_extension_failures`` asks for it).
:func:`unload` removes exactly what :func:`load` added.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from IPython.core.error import UsageError

from ipy_dbreset.magics import EVENTS, DBReset
from ipy_dbreset.options import BadOption
from ipy_dbreset.output import ran_a_cell

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.core.shellapp import InteractiveShellApp


def _loaded(ipython: InteractiveShell) -> DBReset | None:
    for configurable in ipython.configurables:
        if type(configurable).__name__ == DBReset.__name__ and hasattr(configurable, "checkup"):
            return configurable  # type: ignore[return-value]
    return None


def _start_up_app(shell: InteractiveShell) -> InteractiveShellApp | None:
    """The application loading ``shell``'s start-up extensions, if that is what this is.

    Terminal IPython and ipykernel make the shell with their application as
    (grand)parent; they load configured extensions before any cell runs.
    """
    if ran_a_cell(shell) or shell.displayhook.exec_result is not None:
        return None  # in a cell: %load_ext, or exec_lines
    parent = shell.parent
    # Only a failed load gets here: no need to import the application module before.
    from IPython.core.shellapp import InteractiveShellApp

    while parent is not None and not isinstance(parent, InteractiveShellApp):
        parent = parent.parent
    return parent


def load(ipython: InteractiveShell) -> None:
    """Register everything, or nothing if Django cannot be set up."""
    if _loaded(ipython) is not None:
        return
    try:
        magics = DBReset(shell=ipython)
    except BadOption as exc:
        _refuse(
            ipython,
            f"ipy_dbreset: {exc}; fix it in ipython_config.py or with %config, "
            "then %load_ext ipy_dbreset",
            at_start_up=f"ipy_dbreset: {exc}; fix it with %config, then %reload_ext ipy_dbreset",
        )
        return
    try:
        magics.start()
    except BaseException as exc:
        ipython.configurables.remove(magics)  # type: ignore[arg-type]
        if not isinstance(exc, UsageError):
            raise
        _refuse(
            ipython, str(exc), at_start_up=f"{exc}\nOnce that is fixed: %reload_ext ipy_dbreset"
        )
        return
    ipython.register_magics(magics)
    for event in EVENTS:
        ipython.events.register(event, magics.callbacks[event])


def _refuse(shell: InteractiveShell, message: str, *, at_start_up: str) -> None:
    """Raise a UsageError, or print ``at_start_up`` while IPython loads start-up extensions.

    There IPython would log the error with its traceback, unless told to
    reraise it (``InteractiveShellApp.reraise_ipython_extension_failures``):
    one message says it all.  Nothing is registered, but IPython counts the
    extension as loaded, hence the way back in with ``%reload_ext``.
    """
    app = _start_up_app(shell)
    if app is None or app.reraise_ipython_extension_failures:
        raise UsageError(message) from None
    print(at_start_up, file=sys.stderr)


def unload(ipython: InteractiveShell) -> None:
    """Remove exactly what :func:`load` added and stop watching connections."""
    magics = _loaded(ipython)
    if magics is None:
        return
    for event in EVENTS:
        callback = magics.callbacks.get(event)
        if callback is not None and callback in ipython.events.callbacks[event]:
            ipython.events.unregister(event, callback)
    manager = ipython.magics_manager
    for kind, names in magics.magics.items():
        for name in names:
            manager.magics[kind].pop(name, None)
    if manager.registry.get(type(magics).__name__) is magics:
        del manager.registry[type(magics).__name__]
    ipython.configurables.remove(magics)  # type: ignore[arg-type]
    magics.stop()
