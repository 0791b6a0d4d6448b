"""Limited-memory Broyden's method and its inverse-Jacobian estimate."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

import torch
from torch import Tensor
from torch.linalg import vector_norm

from .._options import check_bool, check_int, validated_options
from ..errors import OptionError
from ..inverse import InverseEstimate
from ..registry import register_solver
from .base import Fn, Problem, Solver
from .precision import state_dtype


def _may_hold(mask: Tensor) -> bool:
    """Whether the masked branch for ``mask`` must run (some sample may be flagged).

    On the CPU reading ``mask.any()`` costs nothing and saves full passes over the Broyden buffers
    (and the masking) when no sample is flagged. On an accelerator that read is a host
    synchronisation each iteration, so the masked updates (no-ops where the mask is false)
    always run instead.
    """
    return bool(mask.any()) if mask.device.type == "cpu" else True


def _all_hold(mask: Tensor) -> bool:
    """``not _may_hold(~mask)`` without building ``~mask``: every entry known true (read on the CPU only)."""
    return mask.device.type == "cpu" and bool(mask.all())


__all__ = ["Broyden", "BroydenState"]


@dataclass(eq=False, repr=False)
class BroydenState(InverseEstimate):
    """Limited-memory inverse-Jacobian estimate ``H = H₀ + U Vᵀ ≈ (J − I)⁻¹`` per sample.

    An :class:`~deqkit.inverse.InverseEstimate` (Broyden, Math. Comp. 1965; reused by SHINE,
    Ramzi et al., ICLR 2022). ``H₀`` is ``−I`` unless ``base`` gives another estimate (a
    warm start from any :class:`~deqkit.inverse.InverseEstimate`). ``U`` and ``V`` have shape
    ``(B, d, memory)`` (``d`` the flattened state size); unused columns are zero, so products
    with all columns are exact. The buffer is a ring: once ``memory`` updates were made the
    oldest column is overwritten, so memory never grows with the iteration cap.

    ``filled`` (set by :class:`Broyden`) says that only the columns ``[0, filled)`` were ever
    written, so products skip the others; ``None`` (the default for a state built by hand)
    means every column may be in use.
    """

    U: Tensor
    V: Tensor
    n_updates: int = 0
    base: Optional[InverseEstimate] = None
    filled: Optional[int] = None

    def __post_init__(self) -> None:
        # update()'s test for a degenerate denominator, as a 0-dim tensor (cheaper than a Python number)
        self._degenerate = self.U.new_tensor(1e3 * torch.finfo(self.U.dtype).eps)
        #: whether the last :meth:`update` left some sample unchanged, or could not tell without a host sync
        self.last_update_masked = True

    def __repr__(self) -> str:
        B, d, m = self.U.shape
        base = "" if self.base is None else f", base={self.base!r}"
        return f"BroydenState(B={B}, d={d}, memory={m}, n_updates={self.n_updates}{base})"

    @property
    def memory(self) -> int:
        return self.U.shape[-1]

    # (1, d) @ (d, k) @ (k, d) as batched matrix–matrix products: the matrix–vector einsum form
    # hits a slow CPU path (several times slower forward solves on CPU).
    def _columns(self, dtype: torch.dtype) -> Optional[tuple[Tensor, Tensor]]:
        """The written columns of ``U, V`` in ``dtype`` (``None`` when there are none)."""
        k = self.memory if self.filled is None else self.filled
        if k == 0:
            return None
        U, V = (self.U, self.V) if k == self.memory else (self.U[:, :, :k], self.V[:, :, :k])
        return (U, V) if U.dtype == dtype else (U.to(dtype), V.to(dtype))

    def apply(self, x: Tensor) -> Tensor:
        """``H x`` for column vectors ``x`` of shape ``(B, d)`` (in the dtype of ``x`` promoted with ``U``'s)."""
        if x.dtype != self.U.dtype:  # U, V are kept in at least float32; x may be half
            x = x.to(torch.promote_types(x.dtype, self.U.dtype))
        cols = self._columns(x.dtype)
        if cols is None:
            return self.apply_base(x)
        U, V = cols
        low_rank = torch.bmm(torch.bmm(x.unsqueeze(1), V), U.transpose(1, 2)).squeeze(1)
        return low_rank - x if self.base is None else self.base.apply(x) + low_rank

    def apply_left(self, v: Tensor) -> Tensor:
        """``v H`` for row vectors ``v`` of shape ``(B, d)`` (in the dtype of ``v`` promoted with ``U``'s)."""
        if v.dtype != self.U.dtype:
            v = v.to(torch.promote_types(v.dtype, self.U.dtype))
        cols = self._columns(v.dtype)
        if cols is None:
            return -v if self.base is None else self.base.apply_left(v)
        U, V = cols
        low_rank = torch.bmm(torch.bmm(v.unsqueeze(1), U), V.transpose(1, 2)).squeeze(1)
        return low_rank - v if self.base is None else self.base.apply_left(v) + low_rank

    def apply_base(self, x: Tensor) -> Tensor:
        """``H₀ x``: the product with the estimate a reset (``U = V = 0``) leaves."""
        return -x if self.base is None else self.base.apply(x)

    def dense(self) -> Tensor:
        """The dense ``(B, d, d)`` matrix ``H`` (for tests and small problems)."""
        B, d, _ = self.U.shape
        if self.base is not None:
            return self.base.dense() + self.U @ self.V.transpose(1, 2)
        eye = torch.eye(d, dtype=self.U.dtype, device=self.U.device).expand(B, d, d)
        return -eye + self.U @ self.V.transpose(1, 2)

    def transpose(self) -> BroydenState:
        """``Hᵀ = H₀ᵀ + VUᵀ``: the inverse estimate for the adjoint (row-vector) system."""
        base = None if self.base is None else self.base.transpose()
        return BroydenState(self.V, self.U, self.n_updates, base, self.filled)

    def update(
        self,
        dz: Tensor,
        dg: Tensor,
        mask: Tensor,
        *,
        h_dg: Optional[Tensor] = None,
        x: Optional[Tensor] = None,
        hx: Optional[Tensor] = None,
    ) -> Optional[Tensor]:
        """Good-Broyden update of the inverse with the secant pair ``(dz, dg)`` where ``mask``.

        ``H ← H + (dz − H dg)(dzᵀ H) / (dzᵀ H dg)``, so afterwards ``H dg = dz``. A sample
        whose denominator is (numerically) zero keeps its estimate unchanged.

        Once the ring is full, ``H`` here is the estimate *without* the oldest column (the one
        being overwritten), so the secant equation also holds after the buffer wraps.

        Products the caller already has save work (the solver's loop: one product per
        iteration fewer): ``h_dg`` is ``H dg`` with the estimate before this update, and with
        ``x`` and ``hx = H x`` (before the update) the method returns ``H x`` after it.
        """
        slot = self.n_updates % self.memory
        in_use = self.filled is None or slot < self.filled  # the slot being overwritten holds an update
        if h_dg is None:
            h_dg = self.apply(dg)
        vt = self.apply_left(dz)  # dzᵀ H
        if in_use:
            u_old, v_old = self.U[:, :, slot].clone(), self.V[:, :, slot].clone()
            h_dg = h_dg - u_old * (v_old * dg).sum(dim=1, keepdim=True)
            vt = vt - v_old * (u_old * dz).sum(dim=1, keepdim=True)
        den = (vt * dg).sum(dim=1)
        scale = vector_norm(dz, dim=1) * vector_norm(h_dg, dim=1)
        degenerate = self._degenerate if dz.dtype == self.U.dtype else 1e3 * torch.finfo(dz.dtype).eps
        ok = mask & (den.abs() > degenerate * scale)  # false for dz = 0 (den = 0) and NaN
        # on the CPU, the usual case (every sample updates) skips the masking
        self.last_update_masked = masked = not _all_hold(ok)
        u = (dz - h_dg) / (torch.where(ok, den, torch.ones_like(den)) if masked else den)[:, None]
        if masked:
            self.U[:, :, slot] = torch.where(ok[:, None], u, self.U[:, :, slot])
            self.V[:, :, slot] = torch.where(ok[:, None], vt, self.V[:, :, slot])
        else:
            self.U[:, :, slot] = u
            self.V[:, :, slot] = vt
        self.n_updates += 1
        if self.filled is not None:
            self.filled = min(self.filled + 1, self.memory)
        if x is None or hx is None:
            return None
        hx_new = hx - u_old * (v_old * x).sum(dim=1, keepdim=True) if in_use else hx
        hx_new = hx_new + u * (vt * x).sum(dim=1, keepdim=True)
        return torch.where(ok[:, None], hx_new, hx) if masked else hx_new

    def detach(self) -> BroydenState:
        """The same estimate with ``U`` and ``V`` detached from any graph."""
        base = None if self.base is None else self.base.detach()
        return BroydenState(self.U.detach(), self.V.detach(), self.n_updates, base, self.filled)


@dataclass
class _BroydenLoopState:
    H: BroydenState
    problem: Problem
    loss_grad: Optional[Fn]
    z_prev: Optional[Tensor] = None
    g_prev: Optional[Tensor] = None
    # H g for the current g (the next step's direction, before the safeguards), when observe knows it
    hg: Optional[Tensor] = None
    # H g_prev with the H the last step used: with H g it gives H Δg without a product
    hg_prev: Optional[Tensor] = None
    n_seen: int = 0
    n_opa: int = 0
    n_line_search: int = 0
    # the residual at the best iterate (problem.tracker keeps the iterate), to restart from it
    best_g: Optional[Tensor] = None
    # ‖f(z)‖ of the iterate the next step starts from
    fz_norm: Optional[Tensor] = None
    n_restart: Optional[Tensor] = None
    capped: list[Tensor] = field(default_factory=list)  # per step; summed into n_capped at the end
    # the divergence safeguard's bound on ‖z‖: divergence_ratio · (‖z₀‖ + ‖f(z₀) − z₀‖)
    far_norm: Optional[Tensor] = None
    # restart_growth, −max_step_ratio and −1 as 0-dim tensors (operations with Python numbers cost more)
    growth: Optional[Tensor] = None
    minus_ratio: Optional[Tensor] = None
    minus_one: Optional[Tensor] = None
    # the samples whose previous iterate had met the tolerance: their secant pairs no longer update H
    met: Optional[Tensor] = None


@register_solver("broyden")
@validated_options
class Broyden(Solver):
    """Limited-memory ("good") Broyden's method on ``g(z) = f(z) − z``.

    Keeps ``H ≈ J_g⁻¹`` as ``H = −I + U Vᵀ`` with a ring buffer of ``min(memory, max_iter − 1)``
    columns per sample (bounded by ``memory`` and by the updates a solve can make; plus the OPA
    updates with ``opa_freq``) and steps ``z ← z − H g``. :meth:`state_bytes` estimates the
    buffers' size for a batch; ``max_state_bytes`` turns a solve that would need more into an
    :class:`~deqkit.errors.OptionError` before anything is allocated.
    After each step, ``H`` satisfies the secant equation ``H Δg = Δz`` for the latest pair.
    Broyden, "A class of methods for solving nonlinear simultaneous equations", Math. Comp. 1965;
    as used in DEQs by Bai, Kolter & Koltun, NeurIPS 2019.

    The final ``H`` (a :class:`BroydenState`) is returned in ``result.inverse`` for SHINE,
    BroydenReuse and WarmExact.

    Call options (``solver(fn, z0, inverse0=..., loss_grad=...)``):

    - ``inverse0``: an initial inverse estimate (any :class:`~deqkit.inverse.InverseEstimate`
      of ``(J − I)⁻¹`` for this map; a :class:`BroydenState` keeps its columns and gets room for
      this solve's own), e.g. to warm-start an adjoint solve from the forward estimate;
    - ``loss_grad``: with ``opa_freq``, ``z ↦ ∇_z L(z)`` for outer-problem awareness (OPA).

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
    secant pairs, so it can cost convergence on problems plain Broyden solves (see BENCHMARKS.md).

    Safeguards (always on; counted in ``result.extra["n_restart"]`` and ``["n_capped"]`` per sample):

    - *step length*: a step ``p`` longer than ``max_step_ratio · (‖z‖ + ‖f(z)‖)`` is shortened to
      that length (a maximum-step rule as in Dennis & Schnabel, "Numerical Methods for
      Unconstrained Optimization and Nonlinear Equations", SIAM 1996, §6.4). A flat stretch of
      ``g`` makes the secant slope tiny and the step huge; without the cap a map such as
      ``f(z) = z + 0.1·tanh(3 − z)`` is "solved" far out, where ``‖f(z) − z‖ / ‖f(z)‖``
      is small only because ``‖f(z)‖`` is huge.
    - *divergence*: a step that would take ``‖z‖`` beyond ``divergence_ratio · (‖z₀‖ + ‖f(z₀) − z₀‖)``
      (further than a contraction with Lipschitz constant below 0.999 can put its fixed point)
      resets that sample's ``H`` to ``−I`` and takes the plain step ``z + g`` instead.
    - *restart*: when a sample's residual ``‖g‖`` exceeds ``restart_growth`` times that of its
      best iterate so far (the one the solve would return, best in ``stop_mode``), or is not
      finite, its ``H`` is reset to ``−I`` and it steps again from that iterate. Secant pairs
      made of rounding noise (a tolerance below what the dtype resolves) otherwise corrupt ``H``
      and the iteration runs away to overflow from a fixed point it had found.
    """

    keeps_inverse = True
    call_options: ClassVar[tuple[str, ...]] = ("inverse0", "loss_grad")
    name = "broyden"
    nonfinite_advice = (
        "or try Broyden(line_search=True), a smaller memory, or Anderson(damping=0.5) "
        "(Broyden has no damping; it restarts from its best iterate when the residual grows)"
    )
    #: sufficient-decrease constant of the line search
    armijo_c: ClassVar[float] = 1e-4
    #: safeguard: a step longer than this many times ``‖z‖ + ‖f(z)‖`` is shortened to that length
    max_step_ratio: ClassVar[float] = 10.0
    #: safeguard: a residual this many times that of the sample's best iterate restarts it from that iterate with ``H = −I``
    restart_growth: ClassVar[float] = 1e3
    #: safeguard: a step to ``‖z‖`` beyond this many times ``‖z₀‖ + ‖f(z₀) − z₀‖`` resets ``H`` and takes a plain step instead
    divergence_ratio: ClassVar[float] = 1e3

    def __init__(
        self,
        *,
        memory: int = 20,
        opa_freq: Optional[int] = None,
        line_search: bool = False,
        line_search_steps: int = 4,
        max_state_bytes: Optional[int] = None,
        tol: float = 1e-4,
        max_iter: int = 50,
        stop_mode: str = "rel",
        on_nonfinite: str = "raise",
        freeze_converged: bool = False,
    ) -> None:
        super().__init__(
            tol=tol, max_iter=max_iter, stop_mode=stop_mode, on_nonfinite=on_nonfinite, freeze_converged=freeze_converged
        )
        owner = type(self).__name__
        self.memory = check_int(owner, "memory", memory)
        self.opa_freq = None if opa_freq is None else check_int(owner, "opa_freq", opa_freq)
        self.line_search = check_bool(owner, "line_search", line_search)
        self.line_search_steps = check_int(owner, "line_search_steps", line_search_steps)
        self.max_state_bytes = None if max_state_bytes is None else check_int(owner, "max_state_bytes", max_state_bytes)

    def buffer_columns(self, max_iter: Optional[int] = None) -> int:
        """Columns of ``U`` and ``V`` a solve with ``max_iter`` allocates: ``min(memory, updates it can make)``.

        A solve makes at most ``max_iter − 1`` secant updates (plus one OPA update per ``opa_freq``
        evaluations), so a ``memory`` above that would only hold zeros.
        """
        max_iter = self.max_iter if max_iter is None else max_iter
        updates = max(max_iter - 1, 1) + (max_iter // self.opa_freq if self.opa_freq else 0)
        return min(self.memory, updates)

    def state_bytes(
        self, z0: Union[Tensor, tuple[int, ...]], dtype: Optional[torch.dtype] = None, max_iter: Optional[int] = None
    ) -> int:
        """Estimated bytes of this solver's buffers for a solve from ``z0`` (a tensor, or its shape with ``dtype``).

        ``U`` and ``V`` (``2 · B · d · columns``) plus about eight ``(B, d)`` vectors (iterate,
        residuals, best iterate, secant pair), in the state dtype (at least float32). The map's
        own activations are not included.
        """
        if isinstance(z0, Tensor):
            shape, dtype = tuple(z0.shape), z0.dtype if dtype is None else dtype
        else:
            shape = tuple(int(s) for s in z0)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        B, d = shape[0], math.prod(shape[1:])
        item = torch.empty((), dtype=state_dtype(dtype)).element_size()
        return int(item * B * d * (2 * self.buffer_columns(max_iter) + 8))

    def _check_state_bytes(self, B: int, d: int, dtype: torch.dtype, max_iter: int) -> None:
        if self.max_state_bytes is None:
            return
        need = self.state_bytes((B, d), dtype, max_iter)
        if need > self.max_state_bytes:
            raise OptionError(
                f"Broyden: this solve needs about {need / 2**20:.1f} MiB of solver state (U, V: 2 × batch {B} × state {d} × "
                f"{self.buffer_columns(max_iter)} columns, {state_dtype(dtype)}), above max_state_bytes={self.max_state_bytes}. "
                f"Lower memory (now {self.memory}) or the batch size, or raise max_state_bytes."
            )

    @property
    def needs_loss_grad(self) -> bool:
        """``True`` with ``opa_freq``: the forward call wants ``loss_grad`` for outer-problem awareness."""
        return self.opa_freq is not None

    def init(self, problem: Problem, z: Tensor, fz: Tensor) -> _BroydenLoopState:
        B, d = z.shape
        loss_grad = problem.options.get("loss_grad")
        if loss_grad is not None and self.opa_freq is None:
            raise OptionError("Broyden got loss_grad but has no opa_freq, so it would ignore it; set Broyden(opa_freq=k).")
        if problem.tracker is None:
            raise OptionError("Broyden's hooks read the loop's residuals (problem.tracker): call the solver, solver(fn, z0).")
        H0 = problem.options.get("inverse0")
        self._check_state_bytes(B, d, z.dtype, problem.max_iter)
        zeros = z.new_zeros(B, d, self.buffer_columns(problem.max_iter))
        if H0 is None:
            H = BroydenState(zeros, zeros.clone(), filled=0)
        elif isinstance(H0, BroydenState) and H0.base is None:
            if H0.U.shape[:2] != (B, d):
                raise OptionError(f"Broyden: inverse0 has shape {tuple(H0.U.shape)}, expected (B={B}, d={d}, memory).")
            # keep the given columns and append room for this solve's own updates
            m0 = H0.U.shape[-1]
            H = BroydenState(torch.cat([H0.U.to(z), zeros], -1), torch.cat([H0.V.to(z), zeros.clone()], -1), m0, filled=m0)
        elif isinstance(H0, InverseEstimate):
            H = BroydenState(zeros, zeros.clone(), base=H0, filled=0)
        else:
            raise OptionError(f"Broyden: inverse0 must be an InverseEstimate (e.g. a BroydenState), got {type(H0).__name__}.")
        g = fz - z
        zeros_b = torch.zeros(B, dtype=torch.long, device=z.device)
        return _BroydenLoopState(
            H,
            problem,
            loss_grad,
            best_g=g,
            n_restart=zeros_b,
            far_norm=self.divergence_ratio * (vector_norm(z, dim=1) + vector_norm(g, dim=1)),
            growth=z.new_tensor(self.restart_growth),
            minus_ratio=z.new_tensor(-self.max_step_ratio),
            minus_one=z.new_tensor(-1.0),
        )

    def observe(self, state: Any, z: Tensor, fz: Tensor, fresh: Tensor) -> None:
        # every fresh evaluation, the last one included, adds its secant pair to H
        tracker = state.problem.tracker  # it has the residual and the best iterate of this evaluation
        g, state.fz_norm = tracker.residual, tracker.fz_norm
        state.hg = None
        if state.z_prev is not None:
            # the tracker's best includes this iterate; a residual that grew cannot be the best
            steady = tracker.abs_residual <= state.growth * tracker.best_abs  # false for NaN
            # a stopped sample's z is held by the loop, so its Δz = 0 and update() leaves it alone; a
            # sample that had met the tolerance and goes on with its batch keeps its H: its steps are
            # then near the rounding level, where a secant pair is mostly noise (SHINE reads this H)
            good, bad = steady & ~state.met, fresh & ~steady
            # H g before the update gives both H Δg (= H g − H g_prev, the last step's product) and,
            # through the rank-one change, H g after it: one product with H per iteration, not three
            hg = state.H.apply(g)
            h_dg = None if state.hg_prev is None else hg - state.hg_prev
            state.hg = state.H.update(z - state.z_prev, g - state.g_prev, good, h_dg=h_dg, x=g, hx=hg)
            state.best_g = torch.where(tracker.better[:, None], g, state.best_g)
            # restart: H ← −I for the bad samples, which step again from their best iterate; a rare event:
            # no full passes over U, V (or the iterates) when none restarts (a bad sample is never updated)
            if state.H.last_update_masked and _may_hold(bad):
                state.H.U.masked_fill_(bad[:, None, None], 0)
                state.H.V.masked_fill_(bad[:, None, None], 0)
                state.n_restart += bad
                z, g = torch.where(bad[:, None], tracker.best_z, z), torch.where(bad[:, None], state.best_g, g)
                state.hg = torch.where(bad[:, None], state.H.apply_base(g), state.hg)
                state.fz_norm = torch.where(bad, vector_norm(z + g, dim=1), state.fz_norm)
        # the step starts from (z_prev, g_prev): the restarted samples' best iterate
        state.z_prev, state.g_prev = z, g
        met_before = state.met
        state.met = tracker.measure <= state.problem.tol
        state.n_seen += 1
        if self.opa_freq is not None and state.loss_grad is not None and state.n_seen % self.opa_freq == 0:
            # as for the secant pairs: no more updates once a sample had met the tolerance
            self._opa_update(state, z, fresh if met_before is None else fresh & ~met_before)
            state.hg = None

    def _opa_update(self, state: _BroydenLoopState, z: Tensor, mask: Tensor) -> None:
        """Outer-problem awareness (SHINE, Ramzi et al. 2022): make ``vH`` accurate for ``v = ∇_z L``.

        An *adjoint* Broyden update (Schlenkrich, Griewank & Walther 2010) along
        ``σ = (vH)ᵀ``: with ``B = H⁻¹ ≈ J_g``, ``B ← B + σ (σᵀJ_g − σᵀB) / σᵀσ`` makes
        ``σᵀB = σᵀJ_g`` exactly, i.e. ``(σᵀJ_g) H = σᵀ``: ``H`` becomes exact on the row
        ``u = σᵀJ_g = v H J_g``, which equals ``v`` only if ``H`` already was. Repeated updates
        therefore act as an iterative refinement of ``−vH`` towards ``−vJ_g⁻¹`` (tested in
        ``tests/test_shine.py``); give the ring room
        for them (the OPA columns share ``memory`` with the secant pairs and, once it wraps,
        overwrite them). ``σᵀB = v`` needs no ``B``; ``σᵀJ_g`` costs one VJP of the cell.
        Applied to ``H`` by Sherman–Morrison as one more ring column; counted in ``result.extra["n_opa"]``.
        A good-Broyden (secant) step along ``H∇L`` instead fixes the *column* action ``H y``,
        which the row product ``vH`` of the backward pass does not use.
        """
        problem, loss_grad = state.problem, state.loss_grad
        assert loss_grad is not None
        B = z.shape[0]
        # the column about to be overwritten must not take part (as in BroydenState.update)
        slot = state.H.n_updates % state.H.memory
        u_old, v_old = state.H.U[:, :, slot].clone(), state.H.V[:, :, slot].clone()
        state.H.U[:, :, slot] = 0
        state.H.V[:, :, slot] = 0
        with torch.enable_grad():
            v = loss_grad(z.view(problem.shape).detach()).reshape(B, -1).detach()
            sigma = state.H.apply_left(v)  # row vector vH
            zz = z.detach().requires_grad_()
            out = problem.fn(zz)
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
        if state.H.filled is not None:
            state.H.filled = min(state.H.filled + 1, state.H.memory)
        state.n_opa += 1

    def step(self, state: Any, z: Tensor, fz: Tensor, active: Tensor) -> Union[Tensor, tuple[Tensor, Tensor]]:
        # observe saw this (z, f(z)) just before and left the iterate to step from (a restarted
        # sample's best one) in z_prev, its residual in g_prev and, mostly, H g in hg
        z, g = state.z_prev, state.g_prev
        hg = state.H.apply(g) if state.hg is None else state.hg
        state.hg_prev = hg
        # the step p = −H g; maximum-step safeguard: no step longer than max_step_ratio · (‖z‖ + ‖f(z)‖):
        # p = −min(1, limit / ‖H g‖) · H g, so a step is capped where that factor is above −1
        minus_limit = (vector_norm(z, dim=1) + state.fz_norm) * state.minus_ratio
        factor = (minus_limit / vector_norm(hg, dim=1).clamp_min(torch.finfo(hg.dtype).tiny)).clamp_min(-1.0)
        capped = active & (factor > state.minus_one)
        p = hg * factor[:, None]
        state.capped.append(capped)
        # divergence safeguard: a step far beyond the problem's initial scale is not trusted
        z_next = z + p
        far = active & (vector_norm(z_next, dim=1) > state.far_norm)
        if _may_hold(far):  # a rare event: skip two full passes over U, V when no step is that far
            state.H.U.masked_fill_(far[:, None, None], 0)
            state.H.V.masked_fill_(far[:, None, None], 0)
            state.hg_prev = torch.where(far[:, None], state.H.apply_base(g), hg)  # their H is H₀ now
            p = torch.where(far[:, None], g, p)
            state.n_restart += far
            z_next = z + p
        if not self.line_search:
            return z_next
        return self._backtrack(state, z, g, p, active)

    def _backtrack(self, state: _BroydenLoopState, z: Tensor, g: Tensor, p: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample backtracking along ``p`` (see the class docstring); returns ``(z_new, f(z_new))``."""
        fn = state.problem.fn
        g_norm = vector_norm(g, dim=1)
        alpha = torch.ones_like(g_norm)
        z_new = z + p
        f_new = fn(z_new)
        new_norm = torch.nan_to_num(vector_norm(f_new - z_new, dim=1), nan=float("inf"))
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
            new_norm = torch.where(retry, torch.nan_to_num(vector_norm(f_try - z_try, dim=1), nan=float("inf")), new_norm)
            better = new_norm < best_norm
            best_z = torch.where(better[:, None], z_new, best_z)
            best_f = torch.where(better[:, None], f_new, best_f)
            best_norm = torch.where(better, new_norm, best_norm)
        else:  # samples still without sufficient decrease take their best trial
            failed = active & ~(new_norm <= (1 - self.armijo_c * alpha) * g_norm)
            z_new = torch.where(failed[:, None], best_z, z_new)
            f_new = torch.where(failed[:, None], best_f, f_new)
        return z_new, f_new

    def inverse(self, state: Any) -> BroydenState:
        return state.H

    def extras(self, state: Any) -> dict:
        # each OPA update costs one loss gradient and one cell VJP, not counted in nstep
        return {
            "n_opa": state.n_opa,
            "line_search_evals": state.n_line_search,
            "n_restart": state.n_restart,
            "n_capped": torch.stack(state.capped).sum(0) if state.capped else torch.zeros_like(state.n_restart),
        }
