"""Validation of constructor options: unknown names and bad values give errors that say what to do."""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any, Callable, Iterable, TypeVar

T = TypeVar("T")


def validated_options(cls: type[T]) -> type[T]:
    """Class decorator: an unknown keyword to ``__init__`` raises a ``ValueError`` naming the valid ones.

    Python's own ``TypeError`` for an unexpected keyword does not list the valid options and
    gives no hint for a typo (``tolerance=`` for ``tol=``); this does both.
    """
    init = cls.__init__
    sig = inspect.signature(init)
    valid = [n for n, p in sig.parameters.items() if n != "self" and p.kind is not p.VAR_KEYWORD]

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        unknown = [k for k in kwargs if k not in valid]
        if unknown:
            raise ValueError(unknown_option_message(cls.__name__, unknown[0], valid))
        init(self, *args, **kwargs)

    cls.__init__ = wrapper  # type: ignore[method-assign]
    cls.valid_options = tuple(valid)  # type: ignore[attr-defined]
    return cls


def options_repr(obj: Any) -> str:
    """``ClassName(opt=value, ...)`` over the options a :func:`validated_options` class accepts."""
    opts = ", ".join(f"{k}={getattr(obj, k)!r}" for k in getattr(obj, "valid_options", ()) if hasattr(obj, k))
    return f"{type(obj).__name__}({opts})"


def unknown_option_message(owner: str, name: str, valid: Iterable[str]) -> str:
    valid = list(valid)
    hint = difflib.get_close_matches(name, valid, n=1)
    if not hint:  # an abbreviation or its long form: 'tolerance' for 'tol', 'mem' for 'memory'
        hint = [v for v in valid if min(len(v), len(name)) >= 3 and (name.startswith(v) or v.startswith(name))][:1]
    msg = f"{owner} got an unknown option {name!r}. Valid options: {', '.join(valid)}."
    if hint:
        msg += f" Did you mean {hint[0]!r}?"
    return msg


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        msg = f"{owner}: {name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}."
        if hint:
            msg += f" Did you mean {hint[0]!r}?"
        raise ValueError(msg)


def check_positive(owner: str, name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{owner}: {name} must be a number {bound}, got {value!r}.")


def check_int(owner: str, name: str, value: int, *, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}.")


def check_fraction(owner: str, name: str, value: float, *, include_zero: bool = False) -> None:
    low_ok = value >= 0 if include_zero else value > 0
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (low_ok and value <= 1):
        interval = "[0, 1]" if include_zero else "(0, 1]"
        raise ValueError(f"{owner}: {name} must lie in {interval}, got {value!r}.")


def from_registry(kind: str, registry: dict[str, Callable[..., T]], name: str, **options: Any) -> T:
    """Build ``registry[name](**options)`` with a clear error for an unknown name."""
    key = name.lower().replace("_", "-")
    if key not in registry:
        check_choice(kind, "name", name, sorted(registry))
    return registry[key](**options)
