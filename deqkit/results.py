"""The result protocol every iterative solve in deqkit returns.

Forward solvers, adjoint linear solvers (GMRES, CG, Dense), L-BFGS, the hypergradient
estimators, ADMM and the CVXPY reference all return a result with the same core fields:

========================  ==============================================================
``converged``             whether the solve met its tolerance: a ``bool`` for one problem,
                          a ``(B,)`` bool tensor (or array) for a batch of independent ones
``nstep``                 iterations spent (same shape convention as ``converged``)
``residual``              the residual compared to the tolerance (same shape convention)
``time_s``                wall-clock seconds of the solve (``None`` where not measured)
========================  ==============================================================

plus their own extras. :class:`ResultMixin` adds ``all_converged``, ``n_failed`` and a
default ``summary()`` on top of those fields.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, runtime_checkable

__all__ = ["IterativeResult", "ResultMixin", "RESULT_FIELDS"]

#: the fields every result has
RESULT_FIELDS: tuple[str, ...] = ("converged", "nstep", "residual", "time_s")


@runtime_checkable
class IterativeResult(Protocol):
    """What every iterative solve returns (see the module docstring)."""

    converged: Any
    nstep: Any
    residual: Any
    time_s: Optional[float]


def _all(x: Any) -> bool:
    if isinstance(x, bool):
        return x
    return bool(x.all())


def _count_false(x: Any) -> int:
    if isinstance(x, bool):
        return int(not x)
    return int((~x).sum())


class ResultMixin:
    """Shared helpers over the core fields (``converged``, ``nstep``, ``residual``, ``time_s``)."""

    converged: Any
    nstep: Any
    residual: Any

    @property
    def all_converged(self) -> bool:
        """Whether every problem in the result met its tolerance (one host sync for tensors)."""
        return _all(self.converged)

    @property
    def n_failed(self) -> int:
        """How many problems missed their tolerance."""
        return _count_false(self.converged)

    def summary(self) -> str:
        """One line for logs and error messages."""
        name = getattr(self, "solver", None) or type(self).__name__
        res = self.residual
        worst = float(res.max()) if hasattr(res, "max") else float(res)
        return f"{name}: converged={self.all_converged} after nstep={self.nstep} (residual {worst:.3g})"
