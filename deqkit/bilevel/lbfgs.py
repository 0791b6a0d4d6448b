"""Inner solver: L-BFGS with an accessible memory of secant pairs ``(s, y)``.

The memory is what SHINE reuses (Ramzi et al., ICLR 2022, arXiv 2106.00553): the two-loop
recursion over the pairs applies the L-BFGS inverse-Hessian estimate ``H⁻¹ ≈ Hₖ`` to any
vector, for free after the inner solve.  With OPA (outer-problem awareness), the solver adds,
every ``opa_freq`` steps, one extra secant pair along ``e = Hₖ ∇L(xₙ)`` so that the estimate is
accurate in the direction the hypergradient needs.

OPA pair (our choice, documented): ``e = Hₖ ∇L(xₙ)`` via the two-loop recursion over the
current memory; ``s = e · min(1, r / ‖e‖)`` with ``r = opa_step · max(1, ‖xₙ‖)`` (a short,
local finite-difference step, so that ``y ≈ ∇²h(xₙ) s``), and
``y = ∇h(xₙ + s) − ∇h(xₙ)``.  Since the BFGS update enforces ``H_new y = s`` and
``y ≈ ∇²h s = ∇²h Hₖ ∇L ≈ ∇L``, the inverse estimate becomes accurate along ``∇L``.
The iterate itself is not moved.  Any pair with ``sᵀy ≤ curvature_eps · ‖s‖‖y‖`` is skipped
and counted.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from deqkit.errors import ConvergenceError, ConvergenceWarning, NonFiniteError

from .problem import BilevelProblem

__all__ = ["LBFGS", "LBFGSResult", "SecantMemory", "two_loop", "dense_bfgs_inverse"]

LINE_SEARCHES = ("wolfe", "armijo")
ON_FAIL = ("warn", "raise", "record")


# --------------------------------------------------------------------------- linear algebra
def _gamma(s: Sequence[Tensor], y: Sequence[Tensor]) -> float:
    if len(s) == 0:
        return 1.0
    return float(s[-1] @ y[-1]) / float(y[-1] @ y[-1])


def two_loop(s: Sequence[Tensor], y: Sequence[Tensor], v: Tensor,
             gamma: Optional[float] = None) -> Tensor:
    """Apply the L-BFGS inverse-Hessian estimate to ``v`` (Nocedal & Wright, Alg. 7.4).

    Args:
        s, y: secant pairs, oldest first, each with ``sᵢᵀyᵢ > 0``.
        v: the vector.
        gamma: initial scaling ``H₀ = γI``; default ``sₖᵀyₖ / yₖᵀyₖ`` of the newest pair
            (``1`` with no pairs, i.e. ``H = I``).

    Returns ``H v`` where ``H`` is the BFGS inverse built from ``H₀`` by the pairs in order.
    """
    if len(s) != len(y):
        raise ValueError("s and y must have the same length")
    if gamma is None:
        gamma = _gamma(s, y)
    q = v.clone()
    rho = [1.0 / float(si @ yi) for si, yi in zip(s, y)]
    alpha = [0.0] * len(s)
    for i in range(len(s) - 1, -1, -1):
        alpha[i] = rho[i] * float(s[i] @ q)
        q = q - alpha[i] * y[i]
    r = gamma * q
    for i in range(len(s)):
        beta = rho[i] * float(y[i] @ r)
        r = r + (alpha[i] - beta) * s[i]
    return r


def dense_bfgs_inverse(s: Sequence[Tensor], y: Sequence[Tensor],
                       gamma: Optional[float] = None) -> Tensor:
    """The dense BFGS inverse ``H`` built from ``H₀ = γI`` by the pairs in order:
    ``H ← (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ``.  For tests and small problems."""
    if len(s) == 0:
        raise ValueError("need at least one pair to know the dimension")
    n = s[0].numel()
    if gamma is None:
        gamma = _gamma(s, y)
    eye = torch.eye(n, dtype=s[0].dtype, device=s[0].device)
    h = gamma * eye
    for si, yi in zip(s, y):
        rho = 1.0 / float(si @ yi)
        left = eye - rho * torch.outer(si, yi)
        h = left @ h @ left.T + rho * torch.outer(si, si)
    return h


class SecantMemory:
    """A bounded ring of secant pairs (oldest first); pairs failing the curvature condition
    ``sᵀy > eps·‖s‖‖y‖`` are refused and counted in ``n_skipped``."""

    def __init__(self, memory: int, curvature_eps: float = 1e-10) -> None:
        if not isinstance(memory, int) or memory < 1:
            raise ValueError(f"memory must be a positive int, got {memory!r}")
        self.memory = memory
        self.curvature_eps = curvature_eps
        self.s: List[Tensor] = []
        self.y: List[Tensor] = []
        self.is_opa: List[bool] = []
        self.n_skipped = 0

    def __len__(self) -> int:
        return len(self.s)

    def push(self, s: Tensor, y: Tensor, opa: bool = False) -> bool:
        sy = float(s @ y)
        if not math.isfinite(sy) or sy <= self.curvature_eps * float(s.norm() * y.norm()):
            self.n_skipped += 1
            return False
        if len(self.s) == self.memory:
            self.s.pop(0)
            self.y.pop(0)
            self.is_opa.pop(0)
        self.s.append(s.detach().clone())
        self.y.append(y.detach().clone())
        self.is_opa.append(opa)
        return True

    def clear(self) -> None:
        self.s.clear()
        self.y.clear()
        self.is_opa.clear()

    def apply(self, v: Tensor) -> Tensor:
        """``H v`` by the two-loop recursion."""
        return two_loop(self.s, self.y, v)


# --------------------------------------------------------------------------- result
@dataclass
class LBFGSResult:
    """What :meth:`LBFGS.solve` returns.

    Attributes:
        x: the final iterate ``x*``.
        f, grad, grad_norm: ``h`` and ``∇ₓh`` at ``x``.
        converged: ``grad_norm ≤ tol``.
        n_steps: accepted L-BFGS steps; n_evals: gradient evaluations (line search + OPA).
        grad_norms: ``‖∇h‖`` at every iterate (``n_steps + 1`` entries).
        s, y: the memory's secant pairs, oldest first (SHINE reuses them).
        is_opa: which pairs came from OPA.
        n_skipped: pairs refused for failing ``sᵀy > 0``; n_opa: OPA pairs added.
        n_resets: steepest-descent restarts (failed line search; non-descent direction,
            which also clears the memory).
        message: why the solve stopped.
        tol, memory, opa_freq: the settings used.
    """

    x: Tensor
    f: float
    grad: Tensor
    grad_norm: float
    converged: bool
    n_steps: int
    n_evals: int
    grad_norms: List[float]
    s: List[Tensor]
    y: List[Tensor]
    is_opa: List[bool]
    n_skipped: int
    n_opa: int
    n_resets: int
    message: str
    tol: float
    memory: int
    opa_freq: Optional[int] = None
    time: float = 0.0
    extra: dict = field(default_factory=dict)

    def inverse_hessian_product(self, v: Tensor) -> Tensor:
        """``Hₖ v``: the L-BFGS inverse-Hessian estimate applied to ``v`` (two-loop)."""
        return two_loop(self.s, self.y, v)


# --------------------------------------------------------------------------- line searches
def _accept(f, d, t, f0, d0, c1, c2, eps_f):
    """Strong Wolfe, or Hager-Zhang's approximate Wolfe once ``h`` differences reach
    round-off (``f ≤ f0 + eps_f`` and ``c2·d0 ≤ φ'(t) ≤ (2c1 − 1)·d0``)."""
    armijo = f <= f0 + c1 * t * d0
    if armijo and abs(d) <= -c2 * d0:
        return True
    return f <= f0 + eps_f and c2 * d0 <= d <= (2 * c1 - 1) * d0


def _zoom(phi, f0, d0, lo, f_lo, d_lo, hi, f_hi, c1, c2, eps_f, evals_left):
    best = None
    for _ in range(evals_left):
        width = hi - lo
        # quadratic interpolation of (lo, f_lo, d_lo) and (hi, f_hi), safeguarded
        denom = 2.0 * (f_hi - f_lo - d_lo * width)
        t = lo - d_lo * width * width / denom if denom > 0 and math.isfinite(f_hi) else lo + width / 2
        low, up = min(lo, hi), max(lo, hi)
        margin = 0.1 * (up - low)
        if not (low + margin <= t <= up - margin):
            t = lo + width / 2
        f, g, d = phi(t)
        if math.isfinite(f) and _accept(f, d, t, f0, d0, c1, c2, eps_f):
            return t, f, g, True
        if not math.isfinite(f) or f > f0 + c1 * t * d0 or f >= f_lo:
            hi, f_hi = t, f
        else:
            best = (t, f, g)
            if d * (hi - lo) >= 0:
                hi, f_hi = lo, f_lo
            lo, f_lo, d_lo = t, f, d
        if abs(hi - lo) < 1e-16 * max(1.0, abs(lo)):
            break
    if best is not None:
        return best[0], best[1], best[2], False
    return None


def _wolfe(phi, f0, d0, t1, c1=1e-4, c2=0.9, max_evals=25):
    """Strong-Wolfe line search (Nocedal & Wright, Alg. 3.5-3.6) with Hager-Zhang's
    approximate-Wolfe test near round-off.  Returns ``(t, f, g, wolfe_ok)`` or ``None`` when
    no acceptable point was found."""
    eps_f = 1e-12 * abs(f0)
    t_prev, f_prev, d_prev = 0.0, f0, d0
    t = t1
    best = None
    for i in range(max_evals):
        f, g, d = phi(t)
        if math.isfinite(f) and _accept(f, d, t, f0, d0, c1, c2, eps_f):
            return t, f, g, True
        if not math.isfinite(f) or f > f0 + c1 * t * d0 or (i > 0 and f >= f_prev):
            out = _zoom(phi, f0, d0, t_prev, f_prev, d_prev, t, f, c1, c2, eps_f,
                        max_evals - i - 1)
            if out is None and best is not None:
                return best[0], best[1], best[2], False
            return out
        best = (t, f, g)
        if d >= 0:
            out = _zoom(phi, f0, d0, t, f, d, t_prev, f_prev, c1, c2, eps_f, max_evals - i - 1)
            return out if out is not None else (t, f, g, False)
        t_prev, f_prev, d_prev = t, f, d
        t = 2.0 * t
    return best[0], best[1], best[2], False


def _armijo(phi, f0, d0, t1, c1=1e-4, max_evals=25):
    """Backtracking (halving) until Armijo holds, or, once ``h`` differences reach
    round-off, until ``f ≤ f0 + eps_f`` with a smaller slope ``|φ'(t)| < |φ'(0)|``."""
    eps_f = 1e-12 * abs(f0)
    t = t1
    for _ in range(max_evals):
        f, g, d = phi(t)
        if math.isfinite(f) and (f <= f0 + c1 * t * d0 or (f <= f0 + eps_f and abs(d) < -d0)):
            return t, f, g, True
        t *= 0.5
    return None


# --------------------------------------------------------------------------- solver
class LBFGS:
    """L-BFGS minimiser of ``h(x, λ)`` over ``x`` whose secant pairs are kept for SHINE.

    Args:
        memory: number of ``(s, y)`` pairs kept (SHINE's bi-level code: 30, 60 with OPA).
        tol: default stopping tolerance on ``‖∇ₓh‖`` (absolute; ``solve(tol=...)`` overrides).
        max_iter: cap on accepted steps.
        line_search: ``'wolfe'`` (strong Wolfe, c1=1e-4, c2=0.9) or ``'armijo'`` (backtracking).
        max_ls_evals: cap on function evaluations per line search.
        opa_step: relative length of the OPA finite-difference step (see module docstring).
        curvature_eps: pairs with ``sᵀy ≤ curvature_eps‖s‖‖y‖`` are skipped (counted).
        on_fail: what a solve that misses ``tol`` does: ``'warn'`` (ConvergenceWarning),
            ``'raise'`` (ConvergenceError) or ``'record'`` (only ``result.converged=False``).

    Ramzi et al., SHINE, ICLR 2022 (arXiv 2106.00553), Sec. 3 and App. (OPA).
    """

    def __init__(self, memory: int = 30, tol: float = 1e-6, max_iter: int = 1000,
                 line_search: str = "wolfe", max_ls_evals: int = 25, opa_step: float = 1e-3,
                 curvature_eps: float = 1e-10, on_fail: str = "warn") -> None:
        if not isinstance(memory, int) or isinstance(memory, bool) or memory < 1:
            raise ValueError(f"memory must be a positive int, got {memory!r}")
        if not (isinstance(tol, (int, float)) and tol > 0):
            raise ValueError(f"tol must be a positive number, got {tol!r}")
        if not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
        if line_search not in LINE_SEARCHES:
            raise ValueError(f"line_search={line_search!r} is not valid; valid: {LINE_SEARCHES}")
        if not isinstance(max_ls_evals, int) or max_ls_evals < 2:
            raise ValueError(f"max_ls_evals must be an int >= 2, got {max_ls_evals!r}")
        if not (opa_step > 0):
            raise ValueError(f"opa_step must be positive, got {opa_step!r}")
        if on_fail not in ON_FAIL:
            raise ValueError(f"on_fail={on_fail!r} is not valid; valid: {ON_FAIL}")
        self.memory = memory
        self.tol = float(tol)
        self.max_iter = max_iter
        self.line_search = line_search
        self.max_ls_evals = max_ls_evals
        self.opa_step = float(opa_step)
        self.curvature_eps = float(curvature_eps)
        self.on_fail = on_fail

    def __repr__(self) -> str:
        return (f"LBFGS(memory={self.memory}, tol={self.tol:g}, max_iter={self.max_iter}, "
                f"line_search={self.line_search!r})")

    def solve(self, problem: BilevelProblem, lam: Tensor, x0: Optional[Tensor] = None,
              tol: Optional[float] = None, opa_freq: Optional[int] = None,
              outer_grad: Optional[Callable[[Tensor], Tensor]] = None) -> LBFGSResult:
        """Minimise ``problem.inner(·, lam)`` from ``x0`` (default ``problem.x0``).

        Args:
            tol: absolute tolerance on ``‖∇ₓh‖`` (default: the constructor's).
            opa_freq: add an OPA secant pair every ``opa_freq`` accepted steps (needs
                ``outer_grad``, default ``problem.outer_grad``).
        Raises:
            NonFiniteError: ``h`` or ``∇h`` is not finite at an accepted iterate.
            ConvergenceError: ``tol`` missed and ``on_fail='raise'``.
        """
        t_start = time.perf_counter()
        tol = self.tol if tol is None else float(tol)
        if not tol > 0:
            raise ValueError(f"tol must be positive, got {tol!r}")
        if opa_freq is not None:
            if not isinstance(opa_freq, int) or opa_freq < 1:
                raise ValueError(f"opa_freq must be a positive int or None, got {opa_freq!r}")
            if outer_grad is None:
                outer_grad = problem.outer_grad
        lam = lam.detach()
        x = (problem.x0 if x0 is None else x0).detach().clone()
        f, g = problem.inner_value_and_grad(x, lam)
        n_evals = 1
        if not (math.isfinite(f) and bool(torch.isfinite(g).all())):
            raise NonFiniteError("h(x0, λ) or its gradient is not finite; check x0 and λ.")
        mem = SecantMemory(self.memory, self.curvature_eps)
        gnorm = float(g.norm())
        grad_norms = [gnorm]
        n_steps = n_opa = n_resets = 0
        message = "max_iter reached"
        steepest = False
        converged = gnorm <= tol
        if converged:
            message = "converged"
        while not converged and n_steps < self.max_iter:
            if len(mem) == 0 or steepest:
                d = -g
                t1 = min(1.0, 1.0 / max(gnorm, 1e-300))
            else:
                d = -mem.apply(g)
                t1 = 1.0
            d0 = float(g @ d)
            if not d0 < 0:  # not a descent direction: forget the memory, steepest descent
                mem.clear()
                n_resets += 1
                d = -g
                d0 = -gnorm ** 2
                t1 = min(1.0, 1.0 / max(gnorm, 1e-300))

            counter = [0]

            def phi(t: float, x=x, d=d):
                counter[0] += 1
                ft, gt = problem.inner_value_and_grad(x + t * d, lam)
                return ft, gt, float(gt @ d)

            if self.line_search == "wolfe":
                out = _wolfe(phi, f, d0, t1, max_evals=self.max_ls_evals)
            else:
                out = _armijo(phi, f, d0, t1, max_evals=self.max_ls_evals)
            n_evals += counter[0]
            if out is None or not (out[2] @ d > d0 or out[1] < f):
                # no progress: retry once along steepest descent, keeping the memory
                if not steepest:
                    steepest = True
                    n_resets += 1
                    continue
                message = "line search failed to make progress"
                break
            steepest = False
            t, f_new, g_new = out[0], out[1], out[2]
            if not (math.isfinite(f_new) and bool(torch.isfinite(g_new).all())):
                raise NonFiniteError("h or its gradient became non-finite at an accepted "
                                     "L-BFGS iterate.")
            s = t * d
            yv = g_new - g
            x = x + s
            f, g = f_new, g_new
            mem.push(s, yv)
            n_steps += 1
            gnorm = float(g.norm())
            grad_norms.append(gnorm)
            if gnorm <= tol:
                converged = True
                message = "converged"
                break
            if opa_freq is not None and n_steps % opa_freq == 0:
                n_opa += self._opa_update(problem, lam, x, g, mem, outer_grad)
                n_evals += 1
        if not converged and message == "max_iter reached" and n_steps < self.max_iter:
            message = "stopped"
        result = LBFGSResult(
            x=x, f=f, grad=g, grad_norm=gnorm, converged=converged, n_steps=n_steps,
            n_evals=n_evals, grad_norms=grad_norms, s=list(mem.s), y=list(mem.y),
            is_opa=list(mem.is_opa), n_skipped=mem.n_skipped, n_opa=n_opa, n_resets=n_resets,
            message=message, tol=tol, memory=self.memory, opa_freq=opa_freq,
            time=time.perf_counter() - t_start)
        if not converged:
            msg = (f"L-BFGS stopped ({message}) with ‖∇h‖={gnorm:.3e} > tol={tol:.3e} after "
                   f"{n_steps} steps. Try increasing `max_iter` or loosening `tol`.")
            if self.on_fail == "raise":
                raise ConvergenceError(msg)
            if self.on_fail == "warn":
                warnings.warn(msg, ConvergenceWarning, stacklevel=2)
        return result

    def _opa_update(self, problem, lam, x, g, mem: SecantMemory, outer_grad) -> int:
        v = outer_grad(x)
        e = mem.apply(v)
        enorm = float(e.norm())
        if not (enorm > 0 and math.isfinite(enorm)):
            mem.n_skipped += 1
            return 0
        r = self.opa_step * max(1.0, float(x.norm()))
        s = e * min(1.0, r / enorm)
        _, g_s = problem.inner_value_and_grad(x + s, lam)
        return int(mem.push(s, g_s - g, opa=True))
