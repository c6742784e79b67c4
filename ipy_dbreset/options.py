"""Options and magic arguments: what they accept, and one line for a refused one.

A value set in ``ipython_config.py`` or with ``%config`` before ``%load_ext``
is read while the magics are made; traitlets would answer a bad one with a
traceback.  :func:`config_checked` turns it into a :class:`BadOption` whose
one line (:func:`explain`) names the option, the value and what the option
accepts.  A magic's bad arguments are a ``UsageError`` in one sentence too
(:func:`parse`).
"""

from __future__ import annotations

from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import parse_argstring
from traitlets import Bool, Enum, Float, Int, TraitError, TraitType
from traitlets.config.loader import DeferredConfig

if TYPE_CHECKING:
    from argparse import Namespace
    from collections.abc import Callable, Iterator, Sequence

    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Configurable


class Verbosity(Int):  # type: ignore[type-arg]
    """0, 1 or 2; a bad value's error lists them (Int's bounds error names only one)."""

    info_text = "0, 1 or 2"

    def validate(self, obj: Any, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2:
            self.error(obj, value)
        return value


class Seconds(Float):  # type: ignore[type-arg]
    """Seconds, 0 or more; a bad value's error says so (Float's says only "a float")."""

    info_text = "a number of seconds, 0 or more"

    def __init__(self, default: float, **kwargs: Any) -> None:
        super().__init__(default, min=0.0, **kwargs)


class BadOption(ValueError):
    """A configured value that the option does not accept; the message names both."""


def allowed(trait: TraitType[Any, Any]) -> str:
    if isinstance(trait, Bool):
        return "True or False"
    if isinstance(trait, Enum):
        *first, last = map(repr, trait.values or ())
        return f"{', '.join(first)} or {last}" if first else last
    return trait.info()


@contextmanager
def config_checked(configurable: Configurable, shell: InteractiveShell | None) -> Iterator[None]:
    """Around ``configurable``'s ``__init__``: a configured value it refuses is a BadOption.

    ``Magics.__init__`` puts the magics in ``shell.configurables`` before it
    reads the config: they leave again, or the next ``%load_ext`` would find
    them and register nothing.
    """
    try:
        yield
    except (TraitError, ValueError) as exc:  # ValueError: a bad --DBReset.x=... string
        if shell is not None:
            with suppress(ValueError):
                shell.configurables.remove(configurable)  # type: ignore[arg-type]
        raise BadOption(explain(configurable, shell, exc)) from None


def explain(configurable: Configurable, shell: InteractiveShell | None, exc: Exception) -> str:
    """Name the configured value ``configurable`` refused and what it accepts.

    ``c.DBReset.verbosity = 'x' is not valid: expected 0, 1 or 2``.  ``exc`` is
    what traitlets raised; its first line is the fallback.
    """
    config = getattr(shell, "config", None)
    section = config.get(type(configurable).__name__, {}) if config is not None else {}
    traits = configurable.traits(config=True)
    for name, raw in section.items():
        trait = traits.get(name)
        if trait is None:
            continue
        shown = str(raw) if isinstance(raw, DeferredConfig) else raw  # --DBReset.x=...
        try:
            # On this instance, which is being thrown away: its traits are
            # still the defaults, and its observers see nothing running.
            value = raw.get_value(trait) if isinstance(raw, DeferredConfig) else raw
            setattr(configurable, name, value)
        except (TraitError, ValueError):
            return (
                f"c.{type(configurable).__name__}.{name} = {shown!r} is not valid: "
                f"expected {allowed(trait)}"
            )
    return f"{type(configurable).__name__} configuration is not valid: {str(exc).splitlines()[0]}"


def parse(magic: Callable[[str], object], line: str, known: Callable[[], list[str]]) -> Namespace:
    """Parse a magic's arguments; any bad input is a UsageError that points to the help.

    ``.aliases``: the database aliases named, each once and in order, or
    ``None`` for none; one that ``known()`` (``DATABASES``) lacks is bad input.
    """
    name = magic.__name__
    try:
        args = parse_argstring(magic, line)  # type: ignore[no-untyped-call]
    except UsageError as exc:  # argparse's own complaint, e.g. "unrecognized arguments: -x"
        message = str(exc)
    except ValueError as exc:  # the line does not split, e.g. "No closing quotation"
        message = str(exc)
    else:
        args.aliases = _known_aliases(args.aliases, known()) if args.aliases else None
        return args  # type: ignore[no-any-return]
    raise UsageError(f"%{name}: {message}; see %{name}?")


def _known_aliases(names: Sequence[str], known: Sequence[str]) -> list[str]:
    """``names`` once each, in order; a UsageError if ``DATABASES`` does not name one."""
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(
            f"unknown database alias {', '.join(map(repr, unknown))}; "
            f"DATABASES has {', '.join(map(repr, known))}"
        )
    return list(dict.fromkeys(names))
