"""Registries: build solvers and estimators by name, and extend deqkit without editing it.

    >>> @register_solver("my-solver")
    ... class MySolver(Solver): ...
    >>> make_solver("my-solver", tol=1e-6)

A registered class is also picked up by the conformance tests (``tests/test_conformance.py``),
which run every registered forward solver, linear solver and gradient estimator through the
same float64 checks. Names are case-insensitive and ``_`` equals ``-``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, Optional, TypeVar

from ._options import check_choice, validated_options
from .errors import OptionError

__all__ = [
    "Registry",
    "SOLVERS",
    "ESTIMATORS",
    "LINEAR_SOLVERS",
    "register_solver",
    "register_estimator",
    "register_linear_solver",
]

T = TypeVar("T")
F = TypeVar("F")


def _key(name: str) -> str:
    return name.lower().replace("_", "-")


@validated_options
class Registry(Generic[T]):
    """A name → factory table of one kind of object (``"solver"``, ``"estimator"``, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *, aliases: tuple[str, ...] = (), replace: bool = False) -> Callable[[F], F]:
        """Decorator: register a class (or factory) under ``name`` (and ``aliases``)."""

        def deco(factory: F) -> F:
            self.add(name, factory, aliases=aliases, replace=replace)  # type: ignore[arg-type]
            return factory

        return deco

    def add(self, name: str, factory: Callable[..., T], *, aliases: tuple[str, ...] = (), replace: bool = False) -> None:
        """Register ``factory`` under ``name``; refuses to overwrite an entry unless ``replace``."""
        if not isinstance(name, str) or not name:
            raise OptionError(f"register a {self.kind}: name must be a non-empty string, got {name!r}.")
        for n in (name, *aliases):
            k = _key(n)
            if not replace and (k in self._items or k in self._aliases):
                raise OptionError(
                    f"a {self.kind} named {n!r} is registered already ({self.get_factory(n)!r}); "
                    f"pick another name or pass replace=True."
                )
        self._items[_key(name)] = factory
        for a in aliases:
            self._aliases[_key(a)] = _key(name)

    def remove(self, name: str) -> None:
        """Unregister ``name`` and its aliases (tests that register temporary entries use this)."""
        k = self._resolve(name)
        self._items.pop(k)
        for a in [a for a, t in self._aliases.items() if t == k]:
            del self._aliases[a]

    def _resolve(self, name: str) -> str:
        k = _key(name) if isinstance(name, str) else name
        k = self._aliases.get(k, k)
        if k not in self._items:
            check_choice(self.kind, "name", name, self.names(aliases=True))
        return k

    def get_factory(self, name: str) -> Callable[..., T]:
        """The registered class or factory for ``name``."""
        return self._items[self._resolve(name)]

    def make(self, name: str, **options: Any) -> T:
        """Build the ``name`` entry with ``options`` (unknown options: "did you mean")."""
        return self.get_factory(name)(**options)

    def names(self, *, aliases: bool = False) -> list[str]:
        """The registered names (sorted), optionally with their aliases."""
        return sorted([*self._items, *(self._aliases if aliases else ())])

    def items(self) -> Iterator[tuple[str, Callable[..., T]]]:
        """``(name, factory)`` pairs, sorted by name."""
        return iter(sorted(self._items.items()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._aliases.get(_key(name), _key(name)) in self._items

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


def optional_name(obj: Optional[object]) -> Optional[str]:
    """The registered ``name`` class attribute of an object, if any."""
    return getattr(obj, "name", None) if obj is not None else None


# -- the library's registries ---------------------------------------------------------------------
# They live here, in a module that imports nothing of deqkit's solvers or estimators, so a solver or
# estimator module registers itself on import and nothing needs a lazy import to build one by name.

#: forward fixed-point solvers (:class:`deqkit.solvers.Solver`), built by :func:`deqkit.make_solver`
SOLVERS: Registry[Any] = Registry("solver")
#: gradient estimators (:class:`deqkit.estimators.GradientEstimator`), built by :func:`deqkit.make_estimator`
ESTIMATORS: Registry[Any] = Registry("estimator")
#: adjoint linear solvers (:class:`deqkit.linear.LinearSolver`), built by :func:`deqkit.make_linear_solver`
LINEAR_SOLVERS: Registry[Any] = Registry("linear solver")


def register_solver(name: str, *, aliases: tuple[str, ...] = (), replace: bool = False) -> Callable[[F], F]:
    """Class decorator: make a forward solver buildable by ``make_solver(name)`` (and conformance-tested)."""
    return SOLVERS.register(name, aliases=aliases, replace=replace)


def register_estimator(name: str, *, aliases: tuple[str, ...] = (), replace: bool = False) -> Callable[[F], F]:
    """Class decorator: make a gradient estimator buildable by ``make_estimator(name)`` (and conformance-tested)."""
    return ESTIMATORS.register(name, aliases=aliases, replace=replace)


def register_linear_solver(name: str, *, aliases: tuple[str, ...] = (), replace: bool = False) -> Callable[[F], F]:
    """Class decorator: make an adjoint linear solver buildable by ``make_linear_solver(name)`` (and conformance-tested)."""
    return LINEAR_SOLVERS.register(name, aliases=aliases, replace=replace)
