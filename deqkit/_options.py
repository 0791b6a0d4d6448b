"""One validation mechanism for every public constructor in deqkit (core, bilevel, sim, models, trainer).

- :func:`validated_options`: a class decorator; an unknown keyword to ``__init__`` raises an
  :class:`~deqkit.errors.OptionError` naming the valid options, with a "did you mean" hint.
- ``check_*``: value checks that raise :class:`~deqkit.errors.OptionError` with the owner
  (class name), the option, the value and what is allowed. Numbers must be real and finite
  (``tol=float("inf")`` or ``tol="1e-4"`` is refused, ``numpy`` integers are accepted).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any, Optional, TypeVar

from .errors import FAILURE_POLICIES, OptionError

T = TypeVar("T")

__all__ = [
    "validated_options",
    "options_repr",
    "unknown_option_message",
    "check_choice",
    "check_positive",
    "check_number",
    "check_int",
    "check_fraction",
    "check_bool",
    "check_failure_policy",
    "from_registry",
]


def validated_options(obj: T) -> T:
    """Decorator for a class (its ``__init__``) or a public function: an unknown keyword raises an
    ``OptionError`` naming the valid ones, with a "did you mean" hint.

    Python's own ``TypeError`` for an unexpected keyword does not list the valid options and
    gives no hint for a typo (``tolerance=`` for ``tol=``); this does both. The valid names are
    kept in ``obj.valid_options``.
    """
    is_class = isinstance(obj, type)
    target: Any = obj.__init__ if is_class else obj  # type: ignore[misc]
    sig = inspect.signature(target)
    valid = [n for n, p in sig.parameters.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    owner = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", str(obj))

    def check(kwargs: dict[str, Any]) -> None:
        unknown = [k for k in kwargs if k not in valid]
        if unknown:
            raise OptionError(unknown_option_message(owner, unknown[0], valid))

    if is_class:

        @functools.wraps(target)
        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            check(kwargs)
            target(self, *args, **kwargs)

        obj.__init__ = init  # type: ignore[misc]
        obj.valid_options = tuple(valid)  # type: ignore[attr-defined]
        return obj

    @functools.wraps(target)
    def call(*args: Any, **kwargs: Any) -> Any:
        check(kwargs)
        return target(*args, **kwargs)

    call.valid_options = tuple(valid)  # type: ignore[attr-defined]
    return call  # type: ignore[return-value]


def options_repr(obj: Any) -> str:
    """``ClassName(opt=value, ...)`` over the options a :func:`validated_options` class accepts."""
    opts = ", ".join(f"{k}={getattr(obj, k)!r}" for k in getattr(obj, "valid_options", ()) if hasattr(obj, k))
    return f"{type(obj).__name__}({opts})"


def unknown_option_message(owner: str, name: str, valid: Iterable[str]) -> str:
    """``"<owner> got an unknown option 'x'. Valid options: ... Did you mean 'y'?"``."""
    valid = list(valid)
    hint = difflib.get_close_matches(name, valid, n=1)
    if not hint:  # an abbreviation or its long form: 'tolerance' for 'tol', 'mem' for 'memory'
        hint = [v for v in valid if min(len(v), len(name)) >= 3 and (name.startswith(v) or v.startswith(name))][:1]
    msg = f"{owner} got an unknown option {name!r}. Valid options: {', '.join(valid)}."
    if hint:
        msg += f" Did you mean {hint[0]!r}?"
    return msg


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> None:
    """``value`` must be one of ``choices``."""
    choices = list(choices)
    try:
        ok = value in choices
    except TypeError:  # an unhashable or incomparable value
        ok = False
    if not ok:
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        msg = f"{owner}: {name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}."
        if hint:
            msg += f" Did you mean {hint[0]!r}?"
        raise OptionError(msg)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_number(
    owner: str,
    name: str,
    value: Any,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` must be a finite real number in the given bounds; returns it as ``float``."""
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    want = " and ".join(s for s in (lo, hi) if s)
    what = f"a finite number{' ' + want if want else ''}"
    if not _is_real(value) or not math.isfinite(float(value)):
        raise OptionError(f"{owner}: {name} must be {what}, got {value!r}.")
    x = float(value)
    if low is not None and (x < low or (low_open and x == low)):
        raise OptionError(f"{owner}: {name} must be {what}, got {value!r}.")
    if high is not None and (x > high or (high_open and x == high)):
        raise OptionError(f"{owner}: {name} must be {what}, got {value!r}.")
    return x


def check_positive(owner: str, name: str, value: Any, *, allow_zero: bool = False) -> float:
    """``value`` must be a finite number ``> 0`` (``>= 0`` with ``allow_zero``)."""
    return check_number(owner, name, value, low=0.0, low_open=not allow_zero)


def check_int(owner: str, name: str, value: Any, *, minimum: int = 1, maximum: Optional[int] = None) -> int:
    """``value`` must be an integer (Python or numpy, not ``bool``) ``>= minimum``; returns ``int``."""
    bound = f">= {minimum}" + ("" if maximum is None else f" and <= {maximum}")
    if (
        not isinstance(value, numbers.Integral)
        or isinstance(value, bool)
        or int(value) < minimum
        or (maximum is not None and int(value) > maximum)
    ):
        raise OptionError(f"{owner}: {name} must be an integer {bound}, got {value!r}.")
    return int(value)


def check_fraction(owner: str, name: str, value: Any, *, include_zero: bool = False) -> float:
    """``value`` must lie in ``(0, 1]`` (``[0, 1]`` with ``include_zero``)."""
    if not _is_real(value) or not math.isfinite(float(value)) or not ((value >= 0 if include_zero else value > 0) and value <= 1):
        interval = "[0, 1]" if include_zero else "(0, 1]"
        raise OptionError(f"{owner}: {name} must lie in {interval}, got {value!r}.")
    return float(value)


def check_bool(owner: str, name: str, value: Any) -> bool:
    """``value`` must be ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise OptionError(f"{owner}: {name} must be True or False, got {value!r}.")
    return value


def check_failure_policy(owner: str, value: Any, name: str = "on_failure") -> str:
    """``value`` must be an ``on_failure`` policy: ``"warn"``, ``"raise"`` or ``"ignore"``."""
    check_choice(owner, name, value, FAILURE_POLICIES)
    return str(value)


def from_registry(kind: str, registry: dict[str, Callable[..., T]], name: str, **options: Any) -> T:
    """Build ``registry[name](**options)`` with a clear error for an unknown name."""
    key = name.lower().replace("_", "-") if isinstance(name, str) else name
    if key not in registry:
        check_choice(kind, "name", name, sorted(registry))
    return registry[key](**options)
