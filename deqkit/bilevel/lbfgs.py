"""Inner solver: L-BFGS with an accessible memory of secant pairs ``(s, y)``.

The memory is what SHINE reuses (Ramzi et al., "SHINE: SHaring the INverse Estimate from the
forward pass for bi-level optimization and implicit models", ICLR 2022, arXiv 2106.00553):
the two-loop recursion over the pairs applies the L-BFGS inverse-Hessian estimate
``H⁻¹ ≈ Hₖ`` to any vector, for free after the inner solve. :class:`LBFGSInverse` is that
estimate as a :class:`deqkit.inverse.InverseEstimate`, the interface the core's SHINE uses
for Broyden's inverse Jacobian; :attr:`LBFGSResult.inverse` returns it.

With OPA (outer-problem awareness), the solver adds, every ``opa_freq`` steps, one extra
secant pair along ``e = Hₖ ∇L(xₙ)`` (``Hₖ`` applied through :class:`LBFGSInverse`) so that
the estimate is accurate in the direction the hypergradient needs.

OPA pair (our choice, documented): ``s = e · min(1, r / ‖e‖)`` with
``r = opa_step · max(1, ‖xₙ‖)`` (a short, local finite-difference step, so that
``y ≈ ∇²h(xₙ) s``), and ``y = ∇h(xₙ + s) − ∇h(xₙ)``.  Since the BFGS update enforces
``H_new y = s`` and ``y ≈ ∇²h s = ∇²h Hₖ ∇L ≈ ∇L``, the inverse estimate becomes accurate
along ``∇L``. The iterate itself is not moved.  Any pair with
``sᵀy ≤ curvature_eps · ‖s‖‖y‖`` is skipped and counted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from deqkit._options import check_choice, check_failure_policy, check_int, check_positive, options_repr, validated_options
from deqkit.errors import NonFiniteError, OptionError, apply_failure_policy
from deqkit.inverse import InverseEstimate
from deqkit.results import ResultMixin

from .problem import BilevelProblem

__all__ = ["LBFGS", "LBFGSResult", "LBFGSInverse", "SecantMemory", "two_loop", "dense_bfgs_inverse"]

LINE_SEARCHES = ("wolfe", "armijo")


# --------------------------------------------------------------------------- linear algebra
def _gamma(s: Sequence[Tensor], y: Sequence[Tensor]) -> float:
    if len(s) == 0:
        return 1.0
    return float(s[-1] @ y[-1]) / float(y[-1] @ y[-1])


def two_loop(s: Sequence[Tensor], y: Sequence[Tensor], v: Tensor, gamma: Optional[float] = None) -> Tensor:
    """Apply the L-BFGS inverse-Hessian estimate to ``v`` (Nocedal & Wright, "Numerical
    Optimization", Alg. 7.4).

    Args:
        s: the steps of the secant pairs, oldest first.
        y: the gradient differences of the pairs, each with ``sᵢᵀyᵢ > 0``.
        v: the vector.
        gamma: initial scaling ``H₀ = γI``; default ``sₖᵀyₖ / yₖᵀyₖ`` of the newest pair
            (``1`` with no pairs, i.e. ``H = I``).

    Returns ``H v`` where ``H`` is the BFGS inverse built from ``H₀`` by the pairs in order.
    """
    if len(s) != len(y):
        raise OptionError(f"two_loop: s and y must have the same length, got {len(s)} and {len(y)}.")
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


def dense_bfgs_inverse(s: Sequence[Tensor], y: Sequence[Tensor], gamma: Optional[float] = None) -> Tensor:
    """The dense BFGS inverse ``H`` built from ``H₀ = γI`` by the pairs in order:
    ``H ← (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ``.  For tests and small problems."""
    if len(s) == 0:
        raise OptionError("dense_bfgs_inverse: need at least one (s, y) pair to know the dimension.")
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


@validated_options
class LBFGSInverse(InverseEstimate):
    """The L-BFGS inverse-Hessian estimate ``H`` over secant pairs ``(s, y)`` (oldest first),
    applied by the two-loop recursion (:func:`two_loop`), as an
    :class:`~deqkit.inverse.InverseEstimate`.

    ``H`` is symmetric, so :meth:`apply_left` equals :meth:`apply` and :meth:`transpose` is
    the estimate itself. Vectors are ``(d,)`` or a batch of rows ``(B, d)`` (each row gets
    the same ``H``). ``gamma`` is the initial scaling ``H₀ = γI`` (default: that of the
    newest pair). ``dim`` (with ``dtype``, ``device``) gives :meth:`dense` its size when there
    are no pairs (``H = γI``).

    The pair lists are copied; the tensors are not (they are detached already).
    """

    def __init__(
        self,
        s: Sequence[Tensor],
        y: Sequence[Tensor],
        gamma: Optional[float] = None,
        *,
        dim: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        if len(s) != len(y):
            raise OptionError(f"LBFGSInverse: s and y must have the same length, got {len(s)} and {len(y)}.")
        self.s: list[Tensor] = list(s)
        self.y: list[Tensor] = list(y)
        self.gamma = _gamma(self.s, self.y) if gamma is None else check_positive("LBFGSInverse", "gamma", gamma)
        self.dim = None if dim is None else check_int("LBFGSInverse", "dim", dim)
        self.dtype, self.device = dtype, device

    @property
    def n_pairs(self) -> int:
        """How many secant pairs the estimate holds (0: ``H = γI``)."""
        return len(self.s)

    def apply(self, x: Tensor) -> Tensor:
        """``H x`` for ``x`` of shape ``(d,)`` or ``(B, d)``."""
        if x.dim() == 1:
            return two_loop(self.s, self.y, x, self.gamma)
        if x.dim() == 2:
            return torch.stack([two_loop(self.s, self.y, row, self.gamma) for row in x])
        raise OptionError(f"LBFGSInverse.apply: expected a (d,) or (B, d) tensor, got shape {tuple(x.shape)}.")

    def apply_left(self, v: Tensor) -> Tensor:
        """``v H`` (equal to ``H v``: ``H`` is symmetric)."""
        return self.apply(v)

    def transpose(self) -> LBFGSInverse:
        """``Hᵀ = H``."""
        return self

    def dense(self) -> Tensor:
        """The dense ``(d, d)`` BFGS inverse (:func:`dense_bfgs_inverse`); for tests."""
        if self.s:
            return dense_bfgs_inverse(self.s, self.y, self.gamma)
        if self.dim is None:
            raise OptionError("LBFGSInverse.dense: no pairs and no dim: the size of H = γI is unknown.")
        dtype = self.dtype if self.dtype is not None else torch.get_default_dtype()
        return self.gamma * torch.eye(self.dim, dtype=dtype, device=self.device)

    def __repr__(self) -> str:
        return f"LBFGSInverse(n_pairs={self.n_pairs}, gamma={self.gamma:.3g})"


@validated_options
class SecantMemory:
    """A bounded ring of secant pairs (oldest first); pairs failing the curvature condition
    ``sᵀy > curvature_eps·‖s‖‖y‖`` are refused and counted in ``n_skipped``.

    :attr:`inverse` is the L-BFGS inverse estimate over the current pairs."""

    def __init__(self, memory: int, curvature_eps: float = 1e-10) -> None:
        self.memory = check_int("SecantMemory", "memory", memory)
        self.curvature_eps = check_positive("SecantMemory", "curvature_eps", curvature_eps, allow_zero=True)
        self.s: list[Tensor] = []
        self.y: list[Tensor] = []
        self.is_opa: list[bool] = []
        self.n_skipped = 0

    def __len__(self) -> int:
        return len(self.s)

    def __repr__(self) -> str:
        return f"SecantMemory(memory={self.memory}, n_pairs={len(self)}, n_skipped={self.n_skipped})"

    def push(self, s: Tensor, y: Tensor, opa: bool = False) -> bool:
        """Append ``(s, y)`` (dropping the oldest pair when full); ``False`` if refused."""
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
        """Forget every pair (``n_skipped`` is kept)."""
        self.s.clear()
        self.y.clear()
        self.is_opa.clear()

    @property
    def inverse(self) -> LBFGSInverse:
        """The inverse estimate over the current pairs (a snapshot of the pair lists)."""
        return LBFGSInverse(self.s, self.y)


# --------------------------------------------------------------------------- result
@dataclass
class LBFGSResult(ResultMixin):
    """What :meth:`LBFGS.solve` returns.

    Attributes:
        x: the final iterate ``x*``.
        f, grad: ``h`` and ``∇ₓh`` at ``x``.
        converged: ``residual ≤ tol``.
        nstep: accepted L-BFGS steps.
        residual: ``‖∇ₓh(x)‖`` (absolute, compared to ``tol``).
        time_s: seconds spent in the solve.
        n_evals: gradient evaluations (line search + OPA).
        grad_norms: ``‖∇h‖`` at every iterate (``nstep + 1`` entries).
        s, y: the memory's secant pairs, oldest first (SHINE reuses them through
            :attr:`inverse`).
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
    converged: bool
    nstep: int
    residual: float
    time_s: float
    n_evals: int
    grad_norms: list[float]
    s: list[Tensor]
    y: list[Tensor]
    is_opa: list[bool]
    n_skipped: int
    n_opa: int
    n_resets: int
    message: str
    tol: float
    memory: int
    opa_freq: Optional[int] = None
    solver: str = "lbfgs"
    extra: dict = field(default_factory=dict)

    @property
    def inverse(self) -> LBFGSInverse:
        """``Hₖ ≈ (∇²ₓₓh)⁻¹``: the L-BFGS inverse-Hessian estimate over the kept pairs."""
        return LBFGSInverse(self.s, self.y, dim=self.x.numel(), dtype=self.x.dtype, device=self.x.device)


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
            out = _zoom(phi, f0, d0, t_prev, f_prev, d_prev, t, f, c1, c2, eps_f, max_evals - i - 1)
            if out is None and best is not None:
                return best[0], best[1], best[2], False
            return out
        best = (t, f, g)
        if d >= 0:
            out = _zoom(phi, f0, d0, t, f, d, t_prev, f_prev, c1, c2, eps_f, max_evals - i - 1)
            return out if out is not None else (t, f, g, False)
        t_prev, f_prev, d_prev = t, f, d
        t = 2.0 * t
    assert best is not None  # max_evals >= 2, and every pass that does not return sets it
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
@dataclass
class _State:
    """The mutable state of one :meth:`LBFGS.solve`."""

    x: Tensor
    f: float
    g: Tensor
    gnorm: float
    mem: SecantMemory
    grad_norms: list[float]
    nstep: int = 0
    n_evals: int = 1
    n_opa: int = 0
    n_resets: int = 0
    steepest: bool = False


@validated_options
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
        on_failure: what a solve that misses ``tol`` does: ``'warn'`` (ConvergenceWarning),
            ``'raise'`` (ConvergenceError) or ``'ignore'``; ``result.converged`` records it
            whatever the policy.

    Ramzi et al., SHINE, ICLR 2022 (arXiv 2106.00553), Sec. 3 and App. (OPA); Nocedal &
    Wright, "Numerical Optimization", Ch. 7 (L-BFGS) and Alg. 3.5–3.6 (line search).
    """

    def __init__(
        self,
        *,
        memory: int = 30,
        tol: float = 1e-6,
        max_iter: int = 1000,
        line_search: str = "wolfe",
        max_ls_evals: int = 25,
        opa_step: float = 1e-3,
        curvature_eps: float = 1e-10,
        on_failure: str = "warn",
    ) -> None:
        owner = type(self).__name__
        self.memory = check_int(owner, "memory", memory)
        self.tol = check_positive(owner, "tol", tol)
        self.max_iter = check_int(owner, "max_iter", max_iter)
        check_choice(owner, "line_search", line_search, LINE_SEARCHES)
        self.line_search = line_search
        self.max_ls_evals = check_int(owner, "max_ls_evals", max_ls_evals, minimum=2)
        self.opa_step = check_positive(owner, "opa_step", opa_step)
        self.curvature_eps = check_positive(owner, "curvature_eps", curvature_eps, allow_zero=True)
        self.on_failure = check_failure_policy(owner, on_failure)

    def __repr__(self) -> str:
        return options_repr(self)

    def solve(
        self,
        problem: BilevelProblem,
        lam: Tensor,
        x0: Optional[Tensor] = None,
        *,
        tol: Optional[float] = None,
        opa_freq: Optional[int] = None,
        outer_grad: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> LBFGSResult:
        """Minimise ``problem.inner(·, lam)`` from ``x0`` (default ``problem.x0``).

        Args:
            tol: absolute tolerance on ``‖∇ₓh‖`` (default: the constructor's).
            opa_freq: add an OPA secant pair every ``opa_freq`` accepted steps (needs
                ``outer_grad``, default ``problem.outer_grad``).
        Raises:
            NonFiniteError: ``h`` or ``∇h`` is not finite at an accepted iterate.
            ConvergenceError: ``tol`` missed and ``on_failure='raise'``.
        """
        t_start = time.perf_counter()
        owner = f"{type(self).__name__}.solve"
        tol = self.tol if tol is None else check_positive(owner, "tol", tol)
        if opa_freq is not None:
            opa_freq = check_int(owner, "opa_freq", opa_freq)
            if outer_grad is None:
                outer_grad = problem.outer_grad
        lam = lam.detach()
        st = self._start(problem, lam, x0)
        message = self._iterate(problem, lam, st, tol, opa_freq, outer_grad)
        result = LBFGSResult(
            x=st.x,
            f=st.f,
            grad=st.g,
            converged=message == "converged",
            nstep=st.nstep,
            residual=st.gnorm,
            time_s=time.perf_counter() - t_start,
            n_evals=st.n_evals,
            grad_norms=st.grad_norms,
            s=list(st.mem.s),
            y=list(st.mem.y),
            is_opa=list(st.mem.is_opa),
            n_skipped=st.mem.n_skipped,
            n_opa=st.n_opa,
            n_resets=st.n_resets,
            message=message,
            tol=tol,
            memory=self.memory,
            opa_freq=opa_freq,
        )
        if not result.converged:
            apply_failure_policy(
                self.on_failure,
                f"L-BFGS stopped ({message}) with ‖∇h‖={st.gnorm:.3e} > tol={tol:.3e} after "
                f"{st.nstep} steps. Try increasing `max_iter` or loosening `tol`.",
                stacklevel=2,
            )
        return result

    # ----------------------------------------------------------------- the steps of a solve
    def _start(self, problem: BilevelProblem, lam: Tensor, x0: Optional[Tensor]) -> _State:
        x = (problem.x0 if x0 is None else x0).detach().clone()
        f, g = problem.inner_value_and_grad(x, lam)
        if not (math.isfinite(f) and bool(torch.isfinite(g).all())):
            raise NonFiniteError("h(x0, λ) or its gradient is not finite; check x0 and λ.")
        gnorm = float(g.norm())
        return _State(x=x, f=f, g=g, gnorm=gnorm, mem=SecantMemory(self.memory, self.curvature_eps), grad_norms=[gnorm])

    def _iterate(
        self,
        problem: BilevelProblem,
        lam: Tensor,
        st: _State,
        tol: float,
        opa_freq: Optional[int],
        outer_grad: Optional[Callable[[Tensor], Tensor]],
    ) -> str:
        """Run L-BFGS steps until ``‖∇h‖ ≤ tol``, the cap, or a failed line search; returns
        why it stopped."""
        if st.gnorm <= tol:
            return "converged"
        while st.nstep < self.max_iter:
            d, d0, t1 = self._direction(st)
            out = self._line_search(problem, lam, st, d, d0, t1)
            if out is None or not (out[2] @ d > d0 or out[1] < st.f):
                # no progress: retry once along steepest descent, keeping the memory
                if st.steepest:
                    return "line search failed to make progress"
                st.steepest = True
                st.n_resets += 1
                continue
            st.steepest = False
            self._accept(st, out[0] * d, out[1], out[2])
            if st.gnorm <= tol:
                return "converged"
            if opa_freq is not None and st.nstep % opa_freq == 0:
                st.n_opa += self._opa_update(problem, lam, st.x, st.g, st.mem, outer_grad)
                st.n_evals += 1
        return "max_iter reached"

    def _direction(self, st: _State) -> tuple[Tensor, float, float]:
        """The search direction ``d = −Hₖ∇h`` (steepest descent without pairs, after a failed
        line search, or when ``d`` is not a descent direction, which also clears the memory),
        its slope ``∇hᵀd`` and the first trial step."""
        steepest_t1 = min(1.0, 1.0 / max(st.gnorm, 1e-300))
        if len(st.mem) == 0 or st.steepest:
            d, t1 = -st.g, steepest_t1
        else:
            d, t1 = -st.mem.inverse.apply(st.g), 1.0
        d0 = float(st.g @ d)
        if not d0 < 0:  # not a descent direction: forget the memory, steepest descent
            st.mem.clear()
            st.n_resets += 1
            d, d0, t1 = -st.g, -(st.gnorm**2), steepest_t1
        return d, d0, t1

    def _line_search(self, problem: BilevelProblem, lam: Tensor, st: _State, d: Tensor, d0: float, t1: float):
        """``(t, h, ∇h, wolfe_ok)`` at the accepted step along ``d``, or ``None``."""
        counter = [0]
        x = st.x

        def phi(t: float):
            counter[0] += 1
            ft, gt = problem.inner_value_and_grad(x + t * d, lam)
            return ft, gt, float(gt @ d)

        if self.line_search == "wolfe":
            out = _wolfe(phi, st.f, d0, t1, max_evals=self.max_ls_evals)
        else:
            out = _armijo(phi, st.f, d0, t1, max_evals=self.max_ls_evals)
        st.n_evals += counter[0]
        return out

    def _accept(self, st: _State, s: Tensor, f_new: float, g_new: Tensor) -> None:
        """Move to ``x + s`` and store the secant pair."""
        if not (math.isfinite(f_new) and bool(torch.isfinite(g_new).all())):
            raise NonFiniteError("h or its gradient became non-finite at an accepted L-BFGS iterate.")
        yv = g_new - st.g
        st.x = st.x + s
        st.f, st.g = f_new, g_new
        st.mem.push(s, yv)
        st.nstep += 1
        st.gnorm = float(st.g.norm())
        st.grad_norms.append(st.gnorm)

    def _opa_update(self, problem, lam, x, g, mem: SecantMemory, outer_grad) -> int:
        """Add one OPA pair along ``Hₖ∇L(x)`` (see the module docstring); 1 if stored."""
        v = outer_grad(x)
        e = mem.inverse.apply(v)
        enorm = float(e.norm())
        if not (enorm > 0 and math.isfinite(enorm)):
            mem.n_skipped += 1
            return 0
        r = self.opa_step * max(1.0, float(x.norm()))
        s = e * min(1.0, r / enorm)
        _, g_s = problem.inner_value_and_grad(x + s, lam)
        return int(mem.push(s, g_s - g, opa=True))
