"""Dense adjoint solve (tests and tiny states)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .._options import check_int, validated_options
from ..errors import OptionError
from ..registry import register_linear_solver
from ..solvers.base import SolverResult
from .base import Fn, LinearSolver, _check_finite, _result

__all__ = ["Dense"]


@register_linear_solver("dense")
@validated_options
class Dense(LinearSolver):
    """Exact dense solve: builds ``J`` (``d`` VJPs per batch) and calls ``torch.linalg.solve``.

    For tests and tiny states only (refuses ``d > max_dim``). ``tol`` is only used to flag the
    result as converged; ``w0`` is ignored (the solve is direct). LU factorisation as in
    LAPACK (Anderson et al., "LAPACK Users' Guide", SIAM 1999), via ``torch.linalg.solve``.
    """

    name = "dense"

    def __init__(self, *, max_dim: int = 4096, tol: float = 1e-6, stop_mode: str = "rel") -> None:
        super().__init__(tol=tol, max_iter=1, stop_mode=stop_mode)
        self.max_dim = check_int(type(self).__name__, "max_dim", max_dim)

    def jacobian(self, vjp: Fn, v: Tensor) -> Tensor:
        """Rows ``e_i J`` stacked: the per-sample ``(B, d, d)`` Jacobian of the map behind ``vjp``."""
        shape, B = v.shape, v.shape[0]
        d = v[0].numel()
        if d > self.max_dim:
            raise OptionError(
                f"Dense: the state has {d} entries per sample, more than max_dim={self.max_dim}; building the "
                f"Jacobian would cost {d} VJPs and {d * d} numbers per sample. Use GMRES() or Anderson() instead."
            )
        rows = []
        for i in range(d):
            e = v.new_zeros(B, d)
            e[:, i] = 1
            rows.append(vjp(e.view(shape)).reshape(B, d))
        return torch.stack(rows, dim=1)

    def _solve(
        self, vjp: Fn, v: Tensor, w0: Optional[Tensor], tol: float, max_iter: int, options: dict[str, Any]
    ) -> SolverResult:
        shape, B = v.shape, v.shape[0]
        J = self.jacobian(vjp, v)
        d = J.shape[-1]
        vf = v.reshape(B, d)
        eye = torch.eye(d, dtype=v.dtype, device=v.device)
        # w (I − J) = v  ⇔  (I − J)ᵀ wᵀ = vᵀ
        w = torch.linalg.solve((eye - J).transpose(1, 2), vf.unsqueeze(-1)).squeeze(-1)
        _check_finite(self.name, w, "dense solve")
        res = (w - torch.einsum("bi,bij->bj", w, J) - vf).norm(dim=1)
        nstep = torch.full((B,), d, dtype=torch.long, device=v.device)
        return _result(self.name, w.view(shape), vf, res, nstep, [res], tol, self.stop_mode, 1)
