"""The names Django's own ``shell`` command would give: models, and what the project adds.

Django 5.2+ builds its shell's namespace in ``shell.Command.get_namespace()``
(every model; 6.0 also common utilities), and a project customises it by
overriding that command's ``get_auto_imports()``.  The project's command is
asked here, through Django's own command lookup, so its customisations count.
On Django 4.2, whose shell imports nothing, the installed models are the names.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any, NamedTuple

import django
from django.apps import apps
from django.core.management import get_commands, load_command_class

if TYPE_CHECKING:
    from collections.abc import Collection, MutableMapping

log = logging.getLogger(__name__)


class Imported(NamedTuple):
    """What :func:`import_into` did to a namespace."""

    added: dict[str, Any]
    """Names put in, with their objects."""
    present: int
    """Names the namespace already had, bound to the same object (shell_plus, manage.py shell)."""
    skipped: tuple[str, ...]
    """Names the namespace already had for something else: left as they were."""
    source: str
    """Where the names came from: the shell command's module, or ``"models"`` (Django 4.2)."""


def shell_namespace() -> tuple[dict[str, Any], str]:
    """The namespace this project's ``manage.py shell`` would start with, and its source."""
    try:
        command = load_command_class(get_commands()["shell"], "shell")
    except (ImportError, KeyError) as exc:  # a project that removed or broke its shell command
        log.debug("no shell command to ask for its names: %s", exc)
        command = None
    get_namespace = getattr(command, "get_namespace", None)
    if command is not None and get_namespace is not None:
        # verbosity 0: Django prints nothing; what was imported is said once, by us.
        namespace: dict[str, Any] = get_namespace(verbosity=0)
        return namespace, type(command).__module__
    # Django 4.2: its shell imports nothing; the installed models, as 5.2 would
    # (reversed, so that a model of an earlier app wins a clash of names).
    return {model.__name__: model for model in reversed(apps.get_models())}, "models"


# What shells that import names of their own leave behind: the command on
# manage.py's command line, django-extensions' notebook extension in the kernels
# that ``shell_plus --notebook/--lab`` starts.
_SHELL_PLUS_KERNEL = "django_extensions.management.notebook_extension"


def imported_already(loaded_extensions: Collection[str]) -> bool:
    """Whether the shell that runs us imported the names itself (manage.py shell, shell_plus)."""
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "shell_plus" or _SHELL_PLUS_KERNEL in loaded_extensions:
        return True
    return command == "shell" and django.VERSION >= (5, 2)  # 4.2's shell imports nothing


def import_into(namespace: MutableMapping[str, Any]) -> Imported:
    """Put the shell command's names into ``namespace``, never replacing a name it has."""
    names, source = shell_namespace()
    added: dict[str, Any] = {}
    present = 0
    skipped: list[str] = []
    for name, obj in names.items():
        if name not in namespace:
            namespace[name] = added[name] = obj
        elif namespace[name] is obj:
            present += 1
        else:
            skipped.append(name)
    return Imported(added, present, tuple(skipped), source)
