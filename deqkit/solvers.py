"""Fixed-point solvers: one call shape, one result object.

Every solver finds ``z`` with ``fn(z) = z`` for a batch of states of any shape ``(B, ...)``:

    result = solver(fn, z0)

Samples are independent: each stops when its own residual is below ``tol`` (a converged
sample is frozen while the rest go on) and the batch stops when all have converged or the
iteration cap is hit. The result holds the best iterate of each sample, its step count,
residual traces and a ``converged`` mask; Broyden also returns its inverse-Jacobian estimate.

The residual of an iterate is ``g(z) = fn(z) - z``; ``abs`` is ``‖g‖`` and ``rel`` is
``‖g‖ / (‖fn(z)‖ + eps)``, both per sample over the flattened state. ``stop_mode`` picks which
one is compared to ``tol`` (and ranks iterates for "best").

The same objects solve the linear adjoint equation ``w = wJ + v`` of the exact implicit
gradient (see :mod:`deqkit.linear`), so each solver also has :meth:`Solver.solve_adjoint`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional, Union

import torch
from torch import Tensor

from ._options import options_repr, check_choice, check_fraction, check_int, check_positive, from_registry, validated_options
from .errors import NonFiniteError

Fn = Callable[[Tensor], Tensor]

STOP_MODES = ("abs", "rel")
NONFINITE_POLICIES = ("raise", "freeze")


@dataclass
class BroydenState:
    """Limited-memory inverse-Jacobian estimate ``H = -I + U Vᵀ ≈ (J - I)⁻¹`` per sample.

    ``U`` and ``V`` have shape ``(B, d, memory)`` (``d`` the flattened state size); unused
    columns are zero, so products with all columns are exact. The buffer is a ring: once
    ``memory`` updates were made the oldest column is overwritten, so memory never grows
    with the iteration cap.
    """

    U: Tensor
    V: Tensor
    n_updates: int = 0

    @property
    def memory(self) -> int:
        return self.U.shape[-1]

    # (1, d) @ (d, m) @ (m, d) as batched matrix–matrix products: the matrix–vector einsum form
    # hits a slow CPU path (measured 2.3–3.3x slower forward solves).
    def apply(self, x: Tensor) -> Tensor:
        """``H x`` for column vectors ``x`` of shape ``(B, d)``."""
        return -x + torch.bmm(torch.bmm(x.unsqueeze(1), self.V), self.U.transpose(1, 2)).squeeze(1)

    def apply_left(self, v: Tensor) -> Tensor:
        """``v H`` for row vectors ``v`` of shape ``(B, d)``."""
        return -v + torch.bmm(torch.bmm(v.unsqueeze(1), self.U), self.V.transpose(1, 2)).squeeze(1)

    def dense(self) -> Tensor:
        """The dense ``(B, d, d)`` matrix ``H`` (for tests and small problems)."""
        B, d, _ = self.U.shape
        eye = torch.eye(d, dtype=self.U.dtype, device=self.U.device).expand(B, d, d)
        return -eye + self.U @ self.V.transpose(1, 2)

    def update(self, dz: Tensor, dg: Tensor, mask: Tensor) -> None:
        """Good-Broyden update of the inverse with the secant pair ``(dz, dg)`` where ``mask``.

        ``H ← H + (dz − H dg)(dzᵀ H) / (dzᵀ H dg)``, so afterwards ``H dg = dz``. A sample
        whose denominator is (numerically) zero keeps its estimate unchanged.

        Once the ring is full, ``H`` here is the estimate *without* the oldest column (the one
        being overwritten), so the secant equation also holds after the buffer wraps.
        """
        slot = self.n_updates % self.memory
        u_old, v_old = self.U[:, :, slot], self.V[:, :, slot]
        h_dg = self.apply(dg) - u_old * (v_old * dg).sum(dim=1, keepdim=True)
        vt = self.apply_left(dz) - v_old * (u_old * dz).sum(dim=1, keepdim=True)  # dzᵀ H
        den = (vt * dg).sum(dim=1)
        scale = (dz.norm(dim=1) * h_dg.norm(dim=1)).clamp_min(torch.finfo(dz.dtype).tiny)
        ok = mask & (den.abs() > 1e3 * torch.finfo(dz.dtype).eps * scale)
        safe_den = torch.where(ok, den, torch.ones_like(den))
        u = (dz - h_dg) / safe_den[:, None]
        keep = ~ok[:, None]
        self.U[:, :, slot] = torch.where(keep, self.U[:, :, slot], u)
        self.V[:, :, slot] = torch.where(keep, self.V[:, :, slot], vt)
        self.n_updates += 1

    def detach(self) -> "BroydenState":
        """The same estimate with ``U`` and ``V`` detached from any graph."""
        return BroydenState(self.U.detach(), self.V.detach(), self.n_updates)


@dataclass
class SolverResult:
    """What a solve returns. All per-sample tensors have leading dimension ``B``.

    Attributes:
        z: best iterate per sample (lowest residual in ``stop_mode``), shape of ``z0``.
        nstep: number of residual evaluations each sample used, ``(B,)`` (its own stop step;
            Broyden's line-search trials are counted apart, in ``extra["line_search_evals"]``).
        abs_residual, rel_residual: residuals of the returned iterate, ``(B,)``.
        converged: ``(B,)`` bool, residual of the returned iterate ``<= tol``.
        abs_trace, rel_trace: residual of the current iterate at each iteration, ``(T, B)``
            (a frozen sample repeats its last value).
        state: solver state kept for the backward pass (Broyden: :class:`BroydenState`).
        nonfinite: ``(B,)`` bool, samples whose map returned NaN/Inf (``on_nonfinite="freeze"``).
        tol, stop_mode, max_iter: the settings this solve ran with.
        solver: the solver's name.
        extra: solver-specific counters (Broyden: ``n_opa``, ``line_search_evals``).
    """

    z: Tensor
    nstep: Tensor
    abs_residual: Tensor
    rel_residual: Tensor
    converged: Tensor
    abs_trace: Tensor
    rel_trace: Tensor
    tol: float
    stop_mode: str
    max_iter: int
    solver: str
    state: Optional[BroydenState] = None
    extra: dict = field(default_factory=dict)
    nonfinite: Optional[Tensor] = None

    @property
    def residual(self) -> Tensor:
        """The residual that was compared to ``tol`` (``abs`` or ``rel``)."""
        return self.rel_residual if self.stop_mode == "rel" else self.abs_residual

    @property
    def all_converged(self) -> bool:
        """Whether every sample met the tolerance (one host sync)."""
        return bool(self.converged.all())

    @property
    def n_failed(self) -> int:
        """Samples that did not meet the tolerance."""
        return int((~self.converged).sum())

    def summary(self) -> str:
        """One line for logs and error messages: how many converged, worst residual, step range."""
        B = self.converged.numel()
        worst = float(self.residual.max()) if B else 0.0
        n_bad = 0 if self.nonfinite is None else int(self.nonfinite.sum())
        bad = f"; {n_bad} hit NaN/Inf and were frozen" if n_bad else ""
        return (
            f"{self.solver}: {B - self.n_failed}/{B} samples converged to {self.stop_mode} tol={self.tol:g} "
            f"within max_iter={self.max_iter} (worst {self.stop_mode} residual {worst:.3g}, "
            f"steps {int(self.nstep.min()) if B else 0}..{int(self.nstep.max()) if B else 0}){bad}"
        )


class Solver:
    """Base class of the fixed-point solvers.

    Args:
        tol: stopping tolerance on the residual selected by ``stop_mode``.
        max_iter: cap on residual evaluations (each costs one ``fn`` call).
        stop_mode: ``"rel"`` (``‖fn(z) − z‖ / ‖fn(z)‖``) or ``"abs"`` (``‖fn(z) − z‖``).
        on_nonfinite: ``"raise"`` (default: :class:`~deqkit.errors.NonFiniteError` as soon as
            ``fn`` returns NaN/Inf for a sample) or ``"freeze"``: that sample stops at its best
            finite iterate, is marked in ``result.nonfinite`` and counts as not converged,
            while the rest of the batch goes on.

    Subclasses implement :meth:`_init_state` and :meth:`_propose` only; the loop, per-sample
    freezing, best-iterate tracking, traces and error reporting are shared here.
    """

    #: whether the solver keeps an inverse-Jacobian estimate (needed by SHINE / BroydenReuse).
    keeps_inverse_jacobian: ClassVar[bool] = False
    name: ClassVar[str] = "solver"

    def __init__(self, *, tol: float = 1e-4, max_iter: int = 50, stop_mode: str = "rel", on_nonfinite: str = "raise") -> None:
        owner = type(self).__name__
        check_positive(owner, "tol", tol)
        check_int(owner, "max_iter", max_iter)
        check_choice(owner, "stop_mode", stop_mode, STOP_MODES)
        check_choice(owner, "on_nonfinite", on_nonfinite, NONFINITE_POLICIES)
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.stop_mode = stop_mode
        self.on_nonfinite = on_nonfinite

    def __repr__(self) -> str:
        return options_repr(self)

    # -- subclass hooks -------------------------------------------------------------------
    def _init_state(self, z: Tensor, fz: Tensor, max_iter: int, ctx: "_CallContext") -> object:
        if ctx.state0 is not None or ctx.loss_grad is not None:
            raise ValueError(
                f"{type(self).__name__} keeps no inverse-Jacobian estimate, so it takes neither state0 nor "
                f"loss_grad (outer-problem awareness); use Broyden(...)."
            )
        return None

    def _observe(self, state: object, z: Tensor, fz: Tensor, fresh: Tensor) -> None:
        """See a new evaluation ``fz = f(z)``; ``fresh`` marks the samples it is new for."""

    def _propose(self, state: object, z: Tensor, fz: Tensor, active: Tensor, it: int) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """The next iterate, or ``(z_next, fn(z_next))`` when the solver evaluated it already."""
        raise NotImplementedError

    def _final_state(self, state: object) -> Optional[BroydenState]:
        return None

    def _extra(self, state: object) -> dict:
        """Solver-specific counters for ``SolverResult.extra``."""
        return {}

    # -- the shared loop --------------------------------------------------------------------
    def __call__(
        self,
        fn: Fn,
        z0: Tensor,
        *,
        max_iter: Optional[int] = None,
        tol: Optional[float] = None,
        state0: Optional[BroydenState] = None,
        loss_grad: Optional[Fn] = None,
    ) -> SolverResult:
        """Solve ``fn(z) = z`` from ``z0`` (shape ``(B, ...)``).

        Args:
            fn: the map, batch in, batch of the same shape out.
            z0: the initial state.
            max_iter, tol: override the solver's defaults for this call.
            state0: Broyden only: the initial inverse-Jacobian estimate (e.g. to warm-start).
            loss_grad: Broyden with ``opa_freq`` only: ``z ↦ ∇_z L(z)`` for outer-problem awareness.
        """
        if not isinstance(z0, Tensor) or z0.dim() < 1 or z0.shape[0] == 0:
            raise ValueError(f"{type(self).__name__}: z0 must be a tensor of shape (B, ...) with B >= 1, got {getattr(z0, 'shape', type(z0))}.")
        if not z0.is_floating_point():
            raise ValueError(f"{type(self).__name__}: z0 must be a floating-point tensor, got {z0.dtype}.")
        max_iter = self.max_iter if max_iter is None else max_iter
        tol = self.tol if tol is None else tol
        check_int(type(self).__name__, "max_iter", max_iter)
        check_positive(type(self).__name__, "tol", tol)
        shape, B = z0.shape, z0.shape[0]

        def flat_fn(zf: Tensor) -> Tensor:
            out = fn(zf.view(shape))
            if not isinstance(out, Tensor) or out.shape != shape:
                raise ValueError(
                    f"the function being solved returned {getattr(out, 'shape', type(out))} for a state of shape "
                    f"{tuple(shape)}; a fixed-point map (a DEQ cell f(z, x)) must return a tensor of the same shape as z."
                )
            return out.reshape(B, -1)

        if not torch.isfinite(z0).all():
            raise NonFiniteError(f"{type(self).__name__}: the initial state z0 contains NaN or Inf values.")
        z = z0.reshape(B, -1).clone()
        fz = flat_fn(z)
        eps = torch.finfo(z.dtype).eps
        state = self._init_state(z, fz, max_iter, _CallContext(flat_fn, state0, loss_grad, shape))
        active = torch.ones(B, dtype=torch.bool, device=z.device)
        nstep = torch.zeros(B, dtype=torch.long, device=z.device)
        nonfinite = torch.zeros(B, dtype=torch.bool, device=z.device)
        best_z = z.clone()
        best_abs = torch.full((B,), float("inf"), dtype=z.dtype, device=z.device)
        best_rel = best_abs.clone()
        abs_trace, rel_trace = [], []
        for it in range(max_iter):
            g = fz - z
            abs_res = g.norm(dim=1)  # NaN/Inf anywhere in a sample's f(z) shows up here
            fz_norm = fz.norm(dim=1)
            rel_res = abs_res / (fz_norm + eps)
            bad_mask = active & ~torch.isfinite(abs_res + fz_norm)
            # frozen samples repeat their last value in the traces
            if abs_trace:
                abs_res = torch.where(active, abs_res, abs_trace[-1])
                rel_res = torch.where(active, rel_res, rel_trace[-1])
            abs_trace.append(abs_res)
            rel_trace.append(rel_res)
            measure = rel_res if self.stop_mode == "rel" else abs_res
            best_measure = best_rel if self.stop_mode == "rel" else best_abs
            better = active & (measure < best_measure)
            self._observe(state, z, fz, active)
            best_z = torch.where(better[:, None], z, best_z)
            best_abs = torch.where(better, abs_res, best_abs)
            best_rel = torch.where(better, rel_res, best_rel)
            nstep = nstep + active.long()
            active = active & (measure > tol)
            if self.on_nonfinite == "freeze":
                nonfinite = nonfinite | bad_mask
                active = active & ~bad_mask
            # one host sync per iteration: any sample non-finite, or none left active
            flags = torch.stack([bad_mask.any(), active.any()]).tolist()
            if flags[0] and self.on_nonfinite == "raise":
                bad = bad_mask.nonzero().flatten().tolist()
                raise NonFiniteError(
                    f"{type(self).__name__}: the fixed-point map returned NaN/Inf at iteration {it} for samples "
                    f"{bad[:10]}{'...' if len(bad) > 10 else ''}. Check the cell's scale and inputs, lower the "
                    f"learning rate, add normalisation, or use damping < 1 (or on_nonfinite='freeze' to keep the rest)."
                )
            if it == max_iter - 1 or not flags[1]:
                break
            proposal = self._propose(state, z, fz, active, it)
            # a solver that already evaluated its proposal (a line search) hands f(z_next) back
            z_next, fz_next = proposal if isinstance(proposal, tuple) else (proposal, None)
            z = torch.where(active[:, None], z_next, z)
            fz = torch.where(active[:, None], flat_fn(z) if fz_next is None else fz_next, fz)
        best = best_rel if self.stop_mode == "rel" else best_abs
        return SolverResult(
            z=best_z.view(shape),
            nstep=nstep,
            abs_residual=best_abs,
            rel_residual=best_rel,
            converged=(best <= tol) & ~nonfinite,
            nonfinite=nonfinite,
            abs_trace=torch.stack(abs_trace),
            rel_trace=torch.stack(rel_trace),
            tol=tol,
            stop_mode=self.stop_mode,
            max_iter=max_iter,
            solver=type(self).__name__,
            state=self._final_state(state),
            extra=self._extra(state),
        )

    def solve_adjoint(
        self,
        vjp: Fn,
        v: Tensor,
        w0: Optional[Tensor] = None,
        *,
        tol: Optional[float] = None,
        max_iter: Optional[int] = None,
        state0: Optional[BroydenState] = None,
    ) -> SolverResult:
        """Solve the adjoint equation ``w = vjp(w) + v`` (``vjp(w) = wJ``) as a fixed point.

        Without ``w0`` the iteration starts at ``w = v`` (one free Picard step from zero), so
        even a capped solve never returns a zero adjoint.
        """
        start = v.clone() if w0 is None else w0
        return self(lambda w: vjp(w) + v, start, tol=tol, max_iter=max_iter, state0=state0)


@validated_options
class FixedPoint(Solver):
    """Damped Picard iteration ``z ← (1 − β) z + β f(z)``.

    Converges when the map is a contraction (e.g. ``‖J‖ < 1``); ``damping`` β < 1 helps when
    ``J`` has eigenvalues near −1.
    """

    name = "fixed-point"

    def __init__(
        self, *, damping: float = 1.0, tol: float = 1e-4, max_iter: int = 50, stop_mode: str = "rel", on_nonfinite: str = "raise"
    ) -> None:
        super().__init__(tol=tol, max_iter=max_iter, stop_mode=stop_mode, on_nonfinite=on_nonfinite)
        check_fraction(type(self).__name__, "damping", damping)
        self.damping = float(damping)

    def _propose(self, state: object, z: Tensor, fz: Tensor, active: Tensor, it: int) -> Tensor:
        return z + self.damping * (fz - z)


@dataclass
class _AndersonState:
    X: Tensor  # (B, m, d) past iterates
    G: Tensor  # (B, m, d) their residuals f(x) − x
    gram: Tensor  # (B, m, m) GGᵀ, updated one row/column per step
    count: int = 0


@validated_options
class Anderson(Solver):
    """Anderson acceleration (type II) with ``memory`` past iterates.

    Each step mixes the last ``m`` iterates with weights ``α`` (``Σα = 1``) minimising
    ``‖Σ αᵢ gᵢ‖²`` (``gᵢ = f(zᵢ) − zᵢ``) and takes ``z ← β Σ αᵢ f(zᵢ) + (1 − β) Σ αᵢ zᵢ``.
    Walker & Ni, "Anderson acceleration for fixed-point iterations", SIAM J. Numer. Anal. 2011.

    ``regularization`` λ is scale-free: it is added to the Gram matrix ``GGᵀ`` normalised to a
    unit diagonal, so it weighs the newest (small) and oldest (large) residuals alike. An
    absolute λ, as some peers use, swamps the normal equations once residuals are small and
    stalls tight solves.
    """

    name = "anderson"

    def __init__(
        self,
        *,
        memory: int = 6,
        regularization: float = 1e-4,
        damping: float = 1.0,
        tol: float = 1e-4,
        max_iter: int = 50,
        stop_mode: str = "rel",
        on_nonfinite: str = "raise",
    ) -> None:
        super().__init__(tol=tol, max_iter=max_iter, stop_mode=stop_mode, on_nonfinite=on_nonfinite)
        owner = type(self).__name__
        check_int(owner, "memory", memory)
        check_positive(owner, "regularization", regularization, allow_zero=True)
        check_fraction(owner, "damping", damping)
        self.memory = int(memory)
        self.regularization = float(regularization)
        self.damping = float(damping)

    def _init_state(self, z: Tensor, fz: Tensor, max_iter: int, ctx: "_CallContext") -> _AndersonState:
        super()._init_state(z, fz, max_iter, ctx)
        B, d = z.shape
        m = min(self.memory, max_iter)
        return _AndersonState(z.new_zeros(B, m, d), z.new_zeros(B, m, d), z.new_zeros(B, m, m))

    def _observe(self, state: object, z: Tensor, fz: Tensor, fresh: Tensor) -> None:
        assert isinstance(state, _AndersonState)
        slot = state.count % state.X.shape[1]
        g = fz - z
        state.X[:, slot] = z
        state.G[:, slot] = g
        col = (state.G * g.unsqueeze(1)).sum(-1)  # (B, m): ⟨g_i, g⟩
        state.gram[:, slot, :] = col
        state.gram[:, :, slot] = col
        state.count += 1

    def _propose(self, state: object, z: Tensor, fz: Tensor, active: Tensor, it: int) -> Tensor:
        assert isinstance(state, _AndersonState)
        n = min(state.count, state.X.shape[1])
        if n == 1:
            return z + self.damping * (fz - z)
        gram = state.gram[:, :n, :n]
        # Scale-free Tikhonov: regularise the Gram matrix normalised to unit diagonal, so that λ
        # acts the same on the newest (small) and oldest (large) residuals in the window.
        info = torch.finfo(z.dtype)
        scale = gram.diagonal(dim1=1, dim2=2).clamp_min(info.tiny).rsqrt()  # (B, n)
        corr = gram * scale[:, :, None] * scale[:, None, :]
        lam = max(self.regularization, 10 * info.eps)  # a few ulps keep repeated history solvable
        eye = torch.eye(n, dtype=z.dtype, device=z.device)
        # solve_ex: no error check, so no host sync on CUDA; a failure shows up as NaN in the next
        # residual, which the loop reports
        y = torch.linalg.solve_ex(corr + lam * eye, scale.unsqueeze(-1)).result.squeeze(-1)
        a = y * scale
        alpha = a / a.sum(dim=1, keepdim=True)
        # Σα f(x_i) = Σα x_i + Σα g_i (elementwise: tiny batched bmm calls are ~3x slower on CPU)
        w = alpha.unsqueeze(-1)
        mix_x = (w * state.X[:, :n]).sum(1)
        mix_g = (w * state.G[:, :n]).sum(1)
        return mix_x + self.damping * mix_g


@dataclass
class _CallContext:
    fn: Fn  # the flattened map (B, d) -> (B, d)
    state0: Optional[BroydenState]
    loss_grad: Optional[Fn]
    shape: torch.Size


@dataclass
class _BroydenLoopState:
    H: BroydenState
    ctx: _CallContext
    z_prev: Optional[Tensor] = None
    g_prev: Optional[Tensor] = None
    n_seen: int = 0
    n_opa: int = 0
    n_line_search: int = 0


@validated_options
class Broyden(Solver):
    """Limited-memory ("good") Broyden's method on ``g(z) = f(z) − z``.

    Keeps ``H ≈ J_g⁻¹`` as ``H = −I + U Vᵀ`` with a ring buffer of ``memory`` columns per sample
    (memory is bounded by ``memory``, never by ``max_iter``) and steps ``z ← z − H g``.
    After each step, ``H`` satisfies the secant equation ``H Δg = Δz`` for the latest pair.
    Broyden, "A class of methods for solving nonlinear simultaneous equations", Math. Comp. 1965;
    as used in DEQs by Bai, Kolter & Koltun, NeurIPS 2019.

    The final ``H`` is returned in ``result.state`` for SHINE and BroydenReuse.

    ``line_search=True`` backtracks along the Broyden direction ``p = −H g``: the step
    ``α ∈ {1, ½, ¼, …}`` (at most ``line_search_steps`` halvings) is the first with
    ``‖g(z + αp)‖ ≤ (1 − 10⁻⁴α)‖g(z)‖`` (a sufficient decrease of the residual norm, the
    derivative-free test of Griewank, "The 'global' convergence of Broyden-like methods with a
    suitable line search", J. Austral. Math. Soc. B 1986), per sample; a sample that finds none
    takes the trial with the smallest residual. Each halving costs one evaluation of the map for
    the batch, counted in ``result.extra["line_search_evals"]`` (not in ``nstep``). The secant
    update uses the step actually taken. Off by default: it rescues full steps that overshoot
    (``g = −2·atan(z)`` from ``z₀ = 5``: the root instead of a run-away, tested), but where ``H``
    is still poor the Broyden direction need not decrease ``‖g‖`` and the short steps feed worse
    secant pairs: on random ``tanh(Wz + x)`` problems with ``‖W‖₂ = 3``, ``d = 8``, 16 samples,
    it converged 14, 15 or 16 of the samples where plain Broyden converged 16, for 15–200 extra
    batch evaluations.
    """

    keeps_inverse_jacobian = True
    name = "broyden"
    #: sufficient-decrease constant of the line search
    armijo_c: ClassVar[float] = 1e-4

    def __init__(
        self,
        *,
        memory: int = 20,
        opa_freq: Optional[int] = None,
        line_search: bool = False,
        line_search_steps: int = 4,
        tol: float = 1e-4,
        max_iter: int = 50,
        stop_mode: str = "rel",
        on_nonfinite: str = "raise",
    ) -> None:
        super().__init__(tol=tol, max_iter=max_iter, stop_mode=stop_mode, on_nonfinite=on_nonfinite)
        check_int(type(self).__name__, "memory", memory)
        if opa_freq is not None:
            check_int(type(self).__name__, "opa_freq", opa_freq)
        if not isinstance(line_search, bool):
            raise ValueError(f"Broyden: line_search must be True or False, got {line_search!r}.")
        check_int(type(self).__name__, "line_search_steps", line_search_steps)
        self.memory = int(memory)
        self.opa_freq = opa_freq
        self.line_search = line_search
        self.line_search_steps = int(line_search_steps)

    def _init_state(self, z: Tensor, fz: Tensor, max_iter: int, ctx: _CallContext) -> _BroydenLoopState:
        B, d = z.shape
        if ctx.loss_grad is not None and self.opa_freq is None:
            raise ValueError("Broyden got loss_grad but has no opa_freq, so it would ignore it; set Broyden(opa_freq=k).")
        if ctx.state0 is not None:
            H0 = ctx.state0
            if H0.U.shape[:2] != (B, d):
                raise ValueError(f"Broyden: state0 has shape {tuple(H0.U.shape)}, expected (B={B}, d={d}, memory).")
            # keep the given columns and append room for this solve's own updates
            pad = z.new_zeros(B, d, self.memory)
            H = BroydenState(torch.cat([H0.U.to(z), pad], -1), torch.cat([H0.V.to(z), pad.clone()], -1), H0.U.shape[-1])
        else:
            H = BroydenState(z.new_zeros(B, d, self.memory), z.new_zeros(B, d, self.memory))
        return _BroydenLoopState(H, ctx)

    def _observe(self, state: object, z: Tensor, fz: Tensor, fresh: Tensor) -> None:
        # every fresh evaluation, the last one included, adds its secant pair to H
        assert isinstance(state, _BroydenLoopState)
        g = fz - z
        if state.z_prev is not None:
            state.H.update(z - state.z_prev, g - state.g_prev, fresh)
        state.z_prev, state.g_prev = z, g
        state.n_seen += 1
        if self.opa_freq is not None and state.ctx.loss_grad is not None and state.n_seen % self.opa_freq == 0:
            self._opa_update(state, z, fresh)

    def _opa_update(self, state: _BroydenLoopState, z: Tensor, mask: Tensor) -> None:
        """Outer-problem awareness (SHINE, Ramzi et al. 2022): make ``vH`` accurate for ``v = ∇_z L``.

        An *adjoint* Broyden update (Schlenkrich, Griewank & Walther 2010) along
        ``σ = (vH)ᵀ``: with ``B = H⁻¹ ≈ J_g``, ``B ← B + σ (σᵀJ_g − σᵀB) / σᵀσ`` makes
        ``σᵀB = σᵀJ_g`` exactly, i.e. ``(σᵀJ_g) H = σᵀ``: ``H`` becomes exact on the row
        ``u = σᵀJ_g = v H J_g``, which equals ``v`` only if ``H`` already was. Repeated updates
        therefore act as an iterative refinement of ``−vH`` towards ``−vJ_g⁻¹`` (measured: error
        0.15–0.22 → 0.02–0.05 → ~2e-3 after three updates at a fixed point); give the ring room
        for them (the OPA columns share ``memory`` with the secant pairs and, once it wraps,
        overwrite them). ``σᵀB = v`` needs no ``B``; ``σᵀJ_g`` costs one VJP of the cell.
        Applied to ``H`` by Sherman–Morrison as one more ring column; counted in ``result.extra["n_opa"]``.
        A good-Broyden (secant) step along ``H∇L`` instead fixes the *column* action ``H y``,
        which the row product ``vH`` of the backward pass does not use.
        """
        ctx = state.ctx
        assert ctx.loss_grad is not None
        B = z.shape[0]
        # the column about to be overwritten must not take part (as in BroydenState.update)
        slot = state.H.n_updates % state.H.memory
        u_old, v_old = state.H.U[:, :, slot].clone(), state.H.V[:, :, slot].clone()
        state.H.U[:, :, slot] = 0
        state.H.V[:, :, slot] = 0
        with torch.enable_grad():
            v = ctx.loss_grad(z.view(ctx.shape).detach()).reshape(B, -1).detach()
            sigma = state.H.apply_left(v)  # row vector vH
            zz = z.detach().requires_grad_()
            out = ctx.fn(zz)
            (sJ,) = torch.autograd.grad(out, zz, sigma)
        sJg = sJ - sigma  # σᵀ J_g
        r = (sJg - v) / (sigma * sigma).sum(1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)  # row rᵀ
        H_sigma = state.H.apply(sigma)
        rT_H = state.H.apply_left(r)
        den = 1 + (r * H_sigma).sum(1)
        ok = mask & (den.abs() > 1e-8) & torch.isfinite(den)
        u = -H_sigma / torch.where(ok, den, torch.ones_like(den))[:, None]
        keep = ~ok[:, None]
        state.H.U[:, :, slot] = torch.where(keep, u_old, u)
        state.H.V[:, :, slot] = torch.where(keep, v_old, rT_H)
        state.H.n_updates += 1
        state.n_opa += 1

    def _propose(self, state: object, z: Tensor, fz: Tensor, active: Tensor, it: int) -> Union[Tensor, tuple[Tensor, Tensor]]:
        assert isinstance(state, _BroydenLoopState)
        g = fz - z
        p = -state.H.apply(g)
        if not self.line_search:
            return z + p
        return self._backtrack(state, z, g, p, active)

    def _backtrack(self, state: _BroydenLoopState, z: Tensor, g: Tensor, p: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample backtracking along ``p`` (see the class docstring); returns ``(z_new, f(z_new))``."""
        fn = state.ctx.fn
        g_norm = g.norm(dim=1)
        alpha = torch.ones_like(g_norm)
        z_new = z + p
        f_new = fn(z_new)
        new_norm = torch.nan_to_num((f_new - z_new).norm(dim=1), nan=float("inf"))
        best_z, best_f, best_norm = z_new, f_new, new_norm
        for _ in range(self.line_search_steps):
            retry = active & ~(new_norm <= (1 - self.armijo_c * alpha) * g_norm)
            if not bool(retry.any()):  # one host sync per trial
                break
            alpha = torch.where(retry, alpha / 2, alpha)
            z_try = z + alpha[:, None] * p
            f_try = fn(z_try)
            state.n_line_search += 1
            z_new = torch.where(retry[:, None], z_try, z_new)
            f_new = torch.where(retry[:, None], f_try, f_new)
            new_norm = torch.where(retry, torch.nan_to_num((f_try - z_try).norm(dim=1), nan=float("inf")), new_norm)
            better = new_norm < best_norm
            best_z = torch.where(better[:, None], z_new, best_z)
            best_f = torch.where(better[:, None], f_new, best_f)
            best_norm = torch.where(better, new_norm, best_norm)
        else:  # samples still without sufficient decrease take their best trial
            failed = active & ~(new_norm <= (1 - self.armijo_c * alpha) * g_norm)
            z_new = torch.where(failed[:, None], best_z, z_new)
            f_new = torch.where(failed[:, None], best_f, f_new)
        return z_new, f_new

    def _final_state(self, state: object) -> Optional[BroydenState]:
        assert isinstance(state, _BroydenLoopState)
        return state.H

    def _extra(self, state: object) -> dict:
        # each OPA update costs one loss gradient and one cell VJP, not counted in nstep
        assert isinstance(state, _BroydenLoopState)
        return {"n_opa": state.n_opa, "line_search_evals": state.n_line_search}


SOLVERS: dict[str, type[Solver]] = {"fixed-point": FixedPoint, "anderson": Anderson, "broyden": Broyden}


def make_solver(name: str, **options: object) -> Solver:
    """Build a forward solver by name (``fixed-point``, ``anderson``, ``broyden``)."""
    return from_registry("solver", SOLVERS, name, **options)  # type: ignore[arg-type]
