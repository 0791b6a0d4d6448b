"""Linear solvers for the adjoint equation of the exact implicit gradient.

The exact gradient needs ``w`` with ``w = wJ + v`` (``J = ∂f/∂z`` at ``z*``, ``v = ∂L/∂z*``,
row vectors), i.e. ``w (I − J) = v``. Only vector–Jacobian products ``u ↦ uJ`` are available.

Any forward solver of :mod:`deqkit.solvers` solves it as the fixed point ``w ↦ wJ + v``
(:meth:`deqkit.solvers.Solver.solve_adjoint`). This module adds two solvers that use the
linearity: :class:`GMRES` (Krylov, per sample, restarted) and :class:`Dense` (builds ``J``
explicitly; for tests and tiny states). All return a :class:`~deqkit.solvers.SolverResult`.

The relative residual of an adjoint solve is ``‖w − wJ − v‖ / ‖v‖``.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Optional

import torch
from torch import Tensor

from ._options import options_repr, check_choice, check_int, check_positive, validated_options
from .errors import NonFiniteError
from .solvers import STOP_MODES, SolverResult

Fn = Callable[[Tensor], Tensor]


def _result(
    name: str, w: Tensor, v: Tensor, res: Tensor, nstep: Tensor, trace: list[Tensor], tol: float, stop_mode: str, max_iter: int
) -> SolverResult:
    vnorm = v.norm(dim=1)
    eps = torch.finfo(v.dtype).eps
    rel = res / (vnorm + eps)
    measure = rel if stop_mode == "rel" else res
    abs_trace = torch.stack(trace) if trace else res[None]
    return SolverResult(
        z=w,
        nstep=nstep,
        abs_residual=res,
        rel_residual=rel,
        converged=measure <= tol,
        abs_trace=abs_trace,
        rel_trace=abs_trace / (vnorm + eps),
        tol=tol,
        stop_mode=stop_mode,
        max_iter=max_iter,
        solver=name,
    )


def _check_finite(name: str, t: Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise NonFiniteError(
            f"{name}: the adjoint solve produced NaN/Inf ({what}). The Jacobian at the fixed point may be "
            f"ill-conditioned (spectral radius ≥ 1): check that the forward solve converged."
        )


class LinearSolver:
    """Base class of the dedicated adjoint solvers (``solve_adjoint`` is the one call)."""

    name: ClassVar[str] = "linear"

    def __init__(self, *, tol: float, max_iter: int, stop_mode: str) -> None:
        owner = type(self).__name__
        check_positive(owner, "tol", tol)
        check_int(owner, "max_iter", max_iter)
        check_choice(owner, "stop_mode", stop_mode, STOP_MODES)
        self.tol, self.max_iter, self.stop_mode = float(tol), int(max_iter), stop_mode

    def __repr__(self) -> str:
        return options_repr(self)

    def solve_adjoint(
        self, vjp: Fn, v: Tensor, w0: Optional[Tensor] = None, *, tol: Optional[float] = None, max_iter: Optional[int] = None
    ) -> SolverResult:
        """Solve ``w = vjp(w) + v`` for rows ``w`` shaped like ``v``, from ``w0`` (default zero).

        ``tol`` / ``max_iter`` override the solver's own settings. The result's ``z`` is ``w``;
        its relative residual is ``‖w − wJ − v‖ / ‖v‖``.
        """
        raise NotImplementedError


@validated_options
class GMRES(LinearSolver):
    """Restarted GMRES on ``w (I − J) = v``, one Krylov space per sample, built on VJPs.

    Saad & Schultz, "GMRES: a generalized minimal residual algorithm", SIAM J. Sci. Stat.
    Comput. 1986. ``max_iter`` caps the Krylov steps (one VJP each; ``nstep`` counts them per
    sample); each restart cycle adds one more VJP for the true residual. ``restart`` bounds the
    Krylov basis kept in memory. Converged samples stop changing. The small least-squares
    problem is solved by Givens rotations and back substitution, elementwise per sample, so the
    result is bitwise reproducible (a batched LAPACK ``lstsq`` was not).
    """

    name = "gmres"

    def __init__(self, *, restart: int = 20, tol: float = 1e-6, max_iter: int = 60, stop_mode: str = "rel") -> None:
        super().__init__(tol=tol, max_iter=max_iter, stop_mode=stop_mode)
        check_int(type(self).__name__, "restart", restart)
        self.restart = int(restart)

    def solve_adjoint(
        self,
        vjp: Fn,
        v: Tensor,
        w0: Optional[Tensor] = None,
        *,
        tol: Optional[float] = None,
        max_iter: Optional[int] = None,
        precondition: Optional[Fn] = None,
    ) -> SolverResult:
        """See :meth:`LinearSolver.solve_adjoint`. ``precondition``: a map ``P`` on rows ``(B, d)``
        with ``P(y) ≈ y (I − J)⁻¹``; GMRES then runs on ``y ↦ P(y)(I − J)`` (right
        preconditioning, Saad, "Iterative Methods for Sparse Linear Systems", §9.3) and returns
        ``w = P(y)``. The residual, the stopping test and ``nstep`` stay those of ``w``. It starts
        at ``w = 0``, so ``w0`` must be ``None``: the first Krylov step already holds ``P(v)``.
        """
        tol = self.tol if tol is None else tol
        max_iter = self.max_iter if max_iter is None else max_iter
        if precondition is not None and w0 is not None:
            raise ValueError("GMRES: pass either w0 or precondition (a preconditioned solve starts at w = 0).")
        shape, B = v.shape, v.shape[0]
        vf = v.reshape(B, -1)
        dtype, dev = vf.dtype, vf.device
        eps = torch.finfo(dtype).eps

        def to_w(y: Tensor) -> Tensor:
            return y if precondition is None else precondition(y).reshape(B, -1)

        def op(u: Tensor) -> Tensor:  # y ↦ P(y) (I − J)
            pu = to_w(u)
            return pu - vjp(pu.view(shape)).reshape(B, -1)

        w = vf.new_zeros(vf.shape) if w0 is None else w0.reshape(B, -1).clone()  # the Krylov unknown (y)
        vnorm = vf.norm(dim=1)
        target = tol * (vnorm + eps) if self.stop_mode == "rel" else torch.full_like(vnorm, tol)
        nstep = torch.zeros(B, dtype=torch.long, device=dev)
        trace: list[Tensor] = []
        used = 0
        r = vf - op(w) if w0 is not None else vf.clone()
        while True:
            beta = r.norm(dim=1)
            trace.append(beta)
            active = beta > target
            nonfinite, any_active = torch.stack([~torch.isfinite(beta).all(), active.any()]).tolist()
            if nonfinite:
                _check_finite(self.name, beta, "residual")
            if used >= max_iter or not any_active:
                break
            k_max = min(self.restart, max_iter - used)
            basis = [r / torch.where(beta > 0, beta, torch.ones_like(beta))[:, None]]
            R = vf.new_zeros(B, k_max + 1, k_max)  # the Hessenberg matrix, rotated to upper triangular
            cs, sn = vf.new_zeros(B, k_max), vf.new_zeros(B, k_max)
            g = vf.new_zeros(B, k_max + 1)  # β e₁, rotated alongside
            g[:, 0] = beta
            k = 0
            for j in range(k_max):
                u = op(basis[j])
                used += 1
                nstep = nstep + active.long()
                h = []
                for i in range(j + 1):  # modified Gram–Schmidt, per sample
                    hij = (u * basis[i]).sum(dim=1)
                    h.append(hij)
                    u = u - hij[:, None] * basis[i]
                hn = u.norm(dim=1)
                # a (near-)zero hn is a "happy breakdown": the Krylov space holds the solution
                basis.append(u / torch.where(hn > eps * beta, hn, torch.ones_like(hn))[:, None])
                # Givens rotations, elementwise per sample: deterministic, unlike a LAPACK lstsq
                for i in range(j):
                    h[i], h[i + 1] = cs[:, i] * h[i] + sn[:, i] * h[i + 1], -sn[:, i] * h[i] + cs[:, i] * h[i + 1]
                denom = torch.sqrt(h[j] ** 2 + hn**2)
                safe = torch.where(denom > 0, denom, torch.ones_like(denom))
                cs[:, j] = torch.where(denom > 0, h[j] / safe, torch.ones_like(denom))
                sn[:, j] = torch.where(denom > 0, hn / safe, torch.zeros_like(denom))
                h[j] = denom
                R[:, : j + 1, j] = torch.stack(h, dim=1)
                g[:, j + 1] = -sn[:, j] * g[:, j]
                g[:, j] = cs[:, j] * g[:, j]
                k = j + 1
                est = g[:, j + 1].abs()
                nonfinite, go_on = torch.stack([~torch.isfinite(est).all(), (active & (est > target)).any()]).tolist()
                if nonfinite:  # one host sync per Krylov step
                    _check_finite(self.name, est, "Krylov least squares")
                if not go_on:
                    break
            y = vf.new_zeros(B, k)  # back substitution R y = g
            for i in range(k - 1, -1, -1):
                acc = g[:, i] - (R[:, i, i + 1 : k] * y[:, i + 1 : k]).sum(dim=1)
                diag = R[:, i, i]
                y[:, i] = torch.where(diag != 0, acc / torch.where(diag != 0, diag, torch.ones_like(diag)), torch.zeros_like(acc))
            Vk = torch.stack(basis[:k], dim=1)  # (B, k, d)
            step = torch.bmm(y.unsqueeze(1), Vk).squeeze(1)
            w = w + torch.where(active[:, None], step, torch.zeros_like(step))
            r = vf - op(w)  # true residual (one extra product) before a restart or the end
            used += 1
        return _result(self.name, to_w(w).view(shape), vf, r.norm(dim=1), nstep, trace, tol, self.stop_mode, max_iter)


@validated_options
class Dense(LinearSolver):
    """Exact dense solve: builds ``J`` (``d`` VJPs per batch) and calls ``torch.linalg.solve``.

    For tests and tiny states only (refuses ``d > max_dim``). ``tol`` is only used to flag the
    result as converged.
    """

    name = "dense"

    def __init__(self, *, max_dim: int = 4096, tol: float = 1e-6, stop_mode: str = "rel") -> None:
        super().__init__(tol=tol, max_iter=1, stop_mode=stop_mode)
        check_int(type(self).__name__, "max_dim", max_dim)
        self.max_dim = int(max_dim)

    def jacobian(self, vjp: Fn, v: Tensor) -> Tensor:
        """Rows ``e_i J`` stacked: the per-sample ``(B, d, d)`` Jacobian of the map behind ``vjp``."""
        shape, B = v.shape, v.shape[0]
        d = v[0].numel()
        if d > self.max_dim:
            raise ValueError(
                f"Dense: the state has {d} entries per sample, more than max_dim={self.max_dim}; building the "
                f"Jacobian would cost {d} VJPs and {d * d} numbers per sample. Use GMRES() or Anderson() instead."
            )
        rows = []
        for i in range(d):
            e = v.new_zeros(B, d)
            e[:, i] = 1
            rows.append(vjp(e.view(shape)).reshape(B, d))
        return torch.stack(rows, dim=1)

    def solve_adjoint(
        self, vjp: Fn, v: Tensor, w0: Optional[Tensor] = None, *, tol: Optional[float] = None, max_iter: Optional[int] = None
    ) -> SolverResult:
        tol = self.tol if tol is None else tol
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
