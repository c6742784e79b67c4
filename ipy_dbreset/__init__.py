"""Keep Django database connections working in IPython and Jupyter.

Load it in a shell or notebook that sits in (or below) a Django project::

    In [1]: %load_ext ipy_dbreset
    In [2]: from shop.models import Order; Order.objects.count()

Between cells, every Django connection is judged from what is known locally
(no round trip to the server while it is healthy) and a broken one is repaired
so that the next cell works.  ``%dbreset`` resets connections on demand and
``%dbstatus`` shows them.  Importing this package never sets up Django.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

__version__ = "0.1.0"

# A library's loggers get no handler but this one: where records go is the
# project's choice, and without a configuration none reaches Python's
# last-resort handler, which would print them beside their notices.
logging.getLogger(__name__).addHandler(logging.NullHandler())


def load_ipython_extension(ipython: InteractiveShell) -> None:
    """Set up Django if needed and register the magics and cell callbacks."""
    from ipy_dbreset.extension import load

    load(ipython)


def unload_ipython_extension(ipython: InteractiveShell) -> None:
    """Remove exactly what :func:`load_ipython_extension` added."""
    from ipy_dbreset.extension import unload

    unload(ipython)
