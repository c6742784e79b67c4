"""A hook over one connection wrapper's method, and its exact removal.

The ledger and the look before each query hook methods that execute wrappers
never see (``commit``, ``close_if_health_check_failed``, ...).  A hook is an
attribute of that one wrapper, over the class's method; removal takes away
that hook only, never one another extension put over it since.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable


def patch(wrapper: Any, name: str, hook: Callable[..., Any]) -> weakref.ref[Callable[..., Any]]:
    """Put ``hook`` over ``wrapper.<name>``; what :func:`unpatch` needs to take it away.

    The reference is weak: the wrapper holds the hook, and the hook (a closure)
    often holds the wrapper.
    """
    setattr(wrapper, name, hook)
    return weakref.ref(hook)


def unpatch(wrapper: Any, name: str, ref: weakref.ref[Callable[..., Any]]) -> None:
    """Take the hook ``ref`` points to away from ``wrapper.<name>``, if it is still there."""
    hook = ref()
    if hook is not None and wrapper.__dict__.get(name) is hook:
        delattr(wrapper, name)
