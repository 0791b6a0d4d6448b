"""The dtype policy of solver state, and the smallest tolerance a dtype can resolve.

One rule for every iterative solve in deqkit (forward solvers, adjoint linear solvers):

- **Solver state is kept in at least float32** (:func:`state_dtype`): the iterates, Anderson's
  history and Gram matrix, Broyden's ``U, V``, the Krylov basis of GMRES. A cell that computes in
  ``float16`` / ``bfloat16`` (or under autocast) is called with its own dtype and its output is
  promoted; the returned state has the caller's dtype again. Small dense solves (Anderson's
  normal equations) are then well defined on every backend (LAPACK has no half-precision LU),
  and the low-rank or Krylov algebra does not lose the digits the cell computed.
- **A relative tolerance below the resolution of the map's output dtype is raised to it**
  (:func:`min_tol`, four times the dtype's machine epsilon), with one warning per solver and
  dtype naming both (:func:`resolve_tol`). A relative residual ``‖f(z) − z‖ / ‖f(z)‖`` under the
  unit roundoff of ``f``'s output is rounding noise: asking for less never converges (every call
  would report a failure), and iterating in the noise spoils quasi-Newton estimates (Broyden's
  ``H``, which SHINE reuses: a bfloat16 SHINE gradient fell from cosine 0.99+ to 0.79 to the
  float32 one when the solve ran on to its cap). ``result.tol`` records the tolerance used.
  Under autocast the floor is that of the autocast dtype. An ``"abs"`` tolerance is never
  raised, so ``stop_mode="abs"`` with a tiny ``tol`` still means "run ``max_iter`` steps".

Higham, "Accuracy and Stability of Numerical Algorithms", SIAM 2002, ch. 2 (unit roundoff) and
Micikevicius et al., "Mixed Precision Training", ICLR 2018 (keeping accumulations in float32).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch

from ..errors import PrecisionWarning  # re-exported here, where the dtype policy lives

__all__ = ["PrecisionWarning", "autocast_dtype", "coarsest", "min_tol", "resolve_tol", "state_dtype"]


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype solver state is kept in for a problem in ``dtype``: at least ``float32``.

    ``float16``/``bfloat16`` → ``float32``; ``float32``/``float64`` are kept (complex: kept).
    """
    if dtype.is_floating_point and torch.finfo(dtype).bits < 32:
        return torch.float32
    return dtype


def min_tol(dtype: torch.dtype) -> float:
    """The smallest meaningful *relative* tolerance for a map whose output has ``dtype``: 4 × its machine epsilon.

    ``float64``: 8.9e-16, ``float32``: 4.8e-07, ``float16``: 3.9e-03, ``bfloat16``: 3.1e-02. Rounding
    ``f(z)`` alone leaves a relative residual up to half an epsilon; the cell's own operations add a
    few more roundings, so a solve in half precision stalls around one epsilon (measured with tanh
    MLP cells, Picard, Anderson and Broyden); four leave room for that.
    """
    return 4.0 * float(torch.finfo(dtype).eps)


def coarsest(*dtypes: Optional[torch.dtype]) -> torch.dtype:
    """The floating dtype with the largest machine epsilon among ``dtypes`` (``None`` entries skipped)."""
    floats = [d for d in dtypes if d is not None and d.is_floating_point]
    if not floats:
        return torch.get_default_dtype()
    return max(floats, key=lambda d: torch.finfo(d).eps)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype in force for ``device_type`` now, or ``None`` outside autocast.

    Under autocast a map's output may be float32 (a bias added after a bfloat16 matmul) while its
    accuracy is that of the autocast dtype, so the tolerance floor uses the autocast dtype.
    """
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, RuntimeError, AttributeError):  # an older torch or an unknown device type
        return None
    return None


def resolve_tol(owner: Any, tol: float, stop_mode: str, dtype: torch.dtype, *, what: str = "the map's output") -> float:
    """The tolerance a solve in ``dtype`` runs with: ``tol``, raised to :func:`min_tol` in ``"rel"`` mode.

    Warns (:class:`PrecisionWarning`) the first time a given ``owner`` object raises a tolerance
    for a given dtype, not on every call. An ``"abs"`` tolerance is scale-dependent and kept as given.
    """
    if stop_mode != "rel" or not dtype.is_floating_point:
        return tol
    floor = min_tol(dtype)
    if tol >= floor:
        return tol
    seen = owner.__dict__.setdefault("_precision_warned", set()) if hasattr(owner, "__dict__") else set()
    if dtype not in seen:
        seen.add(dtype)
        name = str(dtype).replace("torch.", "")
        warnings.warn(
            f"{type(owner).__name__}: tol={tol:g} is below the resolution of {name} ({what}): relative residuals "
            f"under {floor:.2g} (4 × the machine epsilon of {name}) are rounding noise, so this solve uses tol={floor:.2g} "
            f"(result.tol). Set tol >= {floor:.2g} for {name} (or compute the cell in a wider dtype) to silence this warning; "
            f"to run exactly max_iter steps, use stop_mode='abs' (absolute tolerances are never raised).",
            PrecisionWarning,
            stacklevel=5,
        )
    return floor
