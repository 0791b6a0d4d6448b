"""Fitting an implicit model to a baseline's states: the SIM state-matching program.

Tsai, Decugis, El Ghaoui, Atamtürk, "State-driven Implicit Modeling for Sparsity and
Robustness in Neural Networks", arXiv 2209.09389, §3. With ``Φ = [X U 1]`` (states, inputs,
constant) the program separates over the rows of ``[A B]`` and ``[C D]``:

* rows of ``(A, B)``: ``min λ‖β‖₁ + ½‖z_i − Φβ‖²`` s.t. ``‖a‖₁ ≤ κ`` (``β = (a, b)``), which
  keeps ``‖A‖_∞ ≤ κ`` (well-posedness) by construction;
* rows of ``(C, D)``: the same without the constraint, targets the outputs ``ŷ_i``;
* ``mode="equality"``: ``min λ‖β‖₁`` s.t. ``Φβ = z_i`` (exact state matching).

Two options restrict or refine that program; both keep it convex and row-separable:

* ``structure="feedforward"``: a state may read only states of *earlier* layers of the
  baseline (skip connections allowed; no lateral, self or backward edges): ``A`` is strictly
  block upper triangular in the stacking, hence nilpotent. With ``"full"`` (the paper's
  program) the lasso also buys lateral edges inside a layer: a first-layer state is a cheap
  summary of all pixels, so it explains its neighbours' pre-activations on the training
  states, but such loops (self-loops included) move the implicit model's equilibrium on new
  inputs.
  ``output_skip=False`` also keeps the outputs from reading the inputs (``D`` = bias only, as
  in the baseline).
* ``debias=True``: the relaxed-lasso refit (Meinshausen, "Relaxed Lasso", CSDA 2007): the
  lasso chooses each row's support, then ``min ½‖z_i − Φβ‖²`` on that support under the same
  constraints undoes the ℓ1 shrinkage, which otherwise compounds through the layers. The
  non-zeros cannot grow.

λ's units (``lam_scale``): the paper's program above grows with the number of samples and
with the states' scale, so a λ that sparsifies one network does nothing on another. The
default ``"pooled"`` divides the loss by ``m``, ``Φ`` by its root mean square and each block's
targets by one root mean square pooled over the block, so rows keep their relative scale (a
state that is small on the samples buys fewer coefficients); ``"normalized"`` (the default
before 2026-11-30) divides each row's target by its own root mean square instead
(:func:`lam_factors`); ``lam_scale="paper"`` is the program exactly as written above (pass it
to reproduce the paper's λ).
``density=`` chooses λ for a target fraction of non-zeros instead (:mod:`deqkit.sim.density`).

Robustness: ``input_radius``/``output_radius`` bound the ℓ1 norm of each row of ``B``'s
input columns and of ``[C D_u]``; with ``‖A‖_∞ ≤ κ`` that bounds the model's ℓ∞ gain (the
certificate is :func:`deqkit.sim.robust.certified_linf_gain`).

Solved by :class:`~deqkit.sim.admm.BatchedADMM` (all rows at once; ADMM as in Boyd et al.,
Found. Trends Mach. Learn. 2011) or by the CVXPY reference.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from .._options import (
    check_bool,
    check_choice,
    check_failure_policy,
    check_fraction,
    check_int,
    check_number,
    check_positive,
    validated_options,
)
from ..errors import OptionError, apply_failure_policy
from ..results import ResultMixin
from .admm import MODES, ADMMResult, BatchedADMM
from .baseline import _check_training_options
from .density import DensitySearch, search_lam
from .model import ImplicitModel, check_kappa
from .reference import CVXPYResult, solve_rows_cvxpy
from .states import States, _mlp_layers

__all__ = [
    "LAM_SCALES",
    "PENALTIES",
    "RADIUS_SCALES",
    "SOLVERS",
    "STRUCTURES",
    "SIMResult",
    "baseline_nonzeros",
    "count_nonzeros",
    "finetune",
    "fit_sim",
    "lam_factors",
    "structure_support",
]

#: the ``method`` values of :func:`fit_sim`
SOLVERS = ("admm", "cvxpy")
STRUCTURES = ("full", "feedforward")
LAM_SCALES = ("pooled", "normalized", "paper", "rms")
PENALTIES = ("uniform", "standardized")
RADIUS_SCALES = ("absolute", "relative")

BlockResult = ADMMResult | CVXPYResult
_BLOCK_LABELS = {"ab": "rows of (A, B)", "cd": "rows of (C, D)", "refit_ab": "refit of (A, B)", "refit_cd": "refit of (C, D)"}


@dataclass
class SIMResult(ResultMixin):
    """A fitted model and how its row blocks were solved.

    ``ab`` and ``cd`` are the lasso solves of the rows of ``(A, B)`` and ``(C, D)``;
    ``refit_ab`` and ``refit_cd`` the debiasing solves (``None`` without ``debias``). The
    core fields (see :mod:`deqkit.results`) summarise the whole fit:

    - ``converged``: every row of every solve converged (ADMM: met its tolerance; CVXPY:
      status ``"optimal"``), a ``bool``;
    - ``nstep``: the most iterations any row of any solve ran (ADMM iterations, or the conic
      solver's), an ``int``;
    - ``residual``: the largest ``residual`` of any row of any solve (ADMM: residual over
      tolerance, ``≤ 1`` when converged; CVXPY: primal infeasibility), a ``float``;
    - ``time_s``: wall-clock seconds of the solves (factorisation included, building the model
      excluded; with ``density``, every solve of the search; with relative radii, the plain fit
      too).

    ``lam`` is the λ of the fit (given, or chosen by the density search) in ``lam_scale``
    units; ``density`` the non-zeros of the model over the baseline's (``None`` when unknown),
    ``density_target`` the target asked for (``None`` without one) and ``search`` the density
    search (its ``path`` of ``(λ, density)``). ``input_radius`` and ``output_radius`` are the
    robust program's bounds as applied (absolute; with ``radius_scale="relative"``, the fractions
    given times the plain fit's largest rows), ``None`` without one.
    """

    model: ImplicitModel
    ab: BlockResult
    cd: BlockResult
    lam: float
    time_s: float
    refit_ab: BlockResult | None = None
    refit_cd: BlockResult | None = None
    lam_scale: str = "pooled"
    density: float | None = None
    density_target: float | None = None
    search: DensitySearch | None = None
    input_radius: float | None = None
    output_radius: float | None = None

    @property
    def solves(self) -> dict[str, BlockResult]:
        """The solves of this fit by name (``"ab"``, ``"cd"``, and ``"refit_*"`` with ``debias``)."""
        named = {"ab": self.ab, "cd": self.cd, "refit_ab": self.refit_ab, "refit_cd": self.refit_cd}
        return {k: v for k, v in named.items() if v is not None}

    @property
    def converged(self) -> bool:  # type: ignore[override]
        """True when every row of every solve met its tolerance (CVXPY: status optimal)."""
        return all(r.all_converged for r in self.solves.values())

    @property
    def nstep(self) -> int:  # type: ignore[override]
        """The most iterations any row of any solve ran."""
        return max((int(torch.as_tensor(r.nstep).max()) for r in self.solves.values() if len(r.nstep)), default=0)

    @property
    def residual(self) -> float:  # type: ignore[override]
        """The largest per-row ``residual`` over all solves."""
        return max((float(torch.as_tensor(r.residual).max()) for r in self.solves.values() if len(r.residual)), default=0.0)

    @property
    def objective(self) -> float:
        """Sum of the per-row objectives of the lasso program (before any refit) over all rows."""
        return float(sum(float(torch.as_tensor(r.objective).sum()) for r in (self.ab, self.cd)))


@validated_options
def structure_support(states: States, structure: str = "full", output_skip: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """Boolean masks ``(support_ab, support_cd)`` of the coefficients the program may use,
    shapes ``(n, n+p+1)`` and ``(q, n+p+1)`` over ``Φ = [X U 1]``; ``None`` = unrestricted.

    ``structure="feedforward"``: row ``i`` of ``A`` may use state ``j`` only if ``j``'s layer
    comes before ``i``'s (``A`` strictly block upper triangular, nilpotent). ``output_skip=False``:
    the outputs read no input (``D``'s input columns are zero; its bias column stays).
    """
    check_choice("structure_support", "structure", structure, STRUCTURES)
    check_bool("structure_support", "output_skip", output_skip)
    n, p, q = states.X.shape[1], states.U.shape[1], states.Y.shape[1]
    d = n + p + 1
    dev = states.X.device
    support_ab = support_cd = None
    if structure == "feedforward":
        layer = states.state_layers()
        support_ab = torch.ones(n, d, dtype=torch.bool, device=dev)
        support_ab[:, :n] = layer[None, :] < layer[:, None]
    if not output_skip:
        support_cd = torch.ones(q, d, dtype=torch.bool, device=dev)
        support_cd[:, n : n + p] = False
    return support_ab, support_cd


@dataclass
class _Block:
    """One row block of the program: its ADMM solver, targets, λ factor, balls, support and warm start.

    Row ``i`` of the block uses ``λ·scale_i`` in the paper's units (see ``lam_scale``)."""

    admm: BatchedADMM
    targets: Tensor
    scale: float | Tensor
    radius: float | None
    n_constrained: int
    support: Tensor | None
    beta0: Tensor | None
    block_ball: tuple[int, int, float] | None = None


def _grouped(block: _Block) -> bool:
    """Whether the ADMM solves ``block`` grouped by structural support (:func:`_solve_grouped`):
    when its rows read less than half of ``Φ``'s columns on average (a CNN's receptive fields)."""
    return block.support is not None and float(block.support.double().mean()) < 0.5


def _solve_block(
    method: str, mode: str, block: _Block, phi: Tensor, lam, *, weights, support, beta0, factor, zero_tol: float
) -> tuple[BlockResult, Tensor]:
    """One block of rows by the batched ADMM or by CVXPY, without a failure policy (the fit
    applies its own); returns (result, beta tensor). ``lam`` is in the paper's units (scalar or per row)."""
    if method == "admm" and _grouped(block):
        res = _solve_grouped(block, phi, lam, weights=weights, support=support, beta0=beta0)
        return res, res.beta
    if method == "admm":
        res = block.admm._solve(
            phi,
            block.targets,
            lam,
            radius=block.radius,
            n_constrained=block.n_constrained,
            beta0=beta0,
            factor=factor,
            weights=weights,
            support=support,
            block_ball=block.block_ball,
        )
        return res, res.beta
    lam_c = lam.detach().cpu().numpy() if isinstance(lam, Tensor) else float(lam)
    ref = solve_rows_cvxpy(
        phi,
        block.targets,
        lam_c,
        radius=block.radius,
        n_constrained=block.n_constrained,
        mode=mode,
        weights=weights,
        support=support,
        block_ball=block.block_ball,
        on_failure="ignore",
    )
    beta = torch.as_tensor(ref.beta, dtype=phi.dtype, device=phi.device)
    return ref, torch.where(beta.abs() < zero_tol, torch.zeros_like(beta), beta)


def _solve_grouped(block: _Block, phi: Tensor, lam, *, weights, support, beta0) -> ADMMResult:
    """The rows of ``block`` grouped by their structural support (e.g. a CNN unit's receptive
    field): the rows of a group share their columns ``S`` and are solved together by the batched
    ADMM on ``Φ[:, S]`` (``|S|`` columns, not ``d``); ``support`` (finer, e.g. a lasso support to
    refit) is applied inside each group. The same program as the masked solve over all columns."""
    assert block.support is not None
    t0 = time.perf_counter()
    structural = block.support.to(phi.device)
    r, d = structural.shape
    dt, dev = phi.dtype, phi.device
    lam_t = torch.as_tensor(lam, dtype=dt, device=dev)
    lam_t = lam_t.expand(r) if lam_t.ndim == 0 else lam_t
    groups, inverse = torch.unique(structural, dim=0, return_inverse=True)
    beta = torch.zeros(r, d, dtype=dt, device=dev)
    fields = {
        k: torch.zeros(r, dtype=dt, device=dev)
        for k in ("objective", "residual", "primal_residual", "dual_residual", "rho", "constraint_residual")
    }
    converged = torch.zeros(r, dtype=torch.bool, device=dev)
    nstep = torch.zeros(r, dtype=torch.long, device=dev)
    for g in range(groups.shape[0]):
        rows = (inverse == g).nonzero().squeeze(1)
        cols = groups[g].nonzero().squeeze(1)
        k_con = int((cols < block.n_constrained).sum()) if block.radius is not None else 0
        ball = None
        if block.block_ball is not None:
            start, stop, rad = block.block_ball
            ball = (int((cols < start).sum()), int((cols < stop).sum()), rad)
        res = block.admm._solve(
            phi[:, cols],
            block.targets[rows],
            lam_t[rows],
            radius=block.radius,
            n_constrained=k_con,
            beta0=None if beta0 is None else beta0[rows][:, cols],
            weights=None if weights is None else weights[cols],
            support=None if support is None else support[rows][:, cols].to(dev),
            block_ball=ball,
        )
        beta[rows[:, None], cols[None, :]] = res.beta
        for k, v in fields.items():
            v[rows] = getattr(res, k).to(dt)
        converged[rows] = res.converged
        nstep[rows] = res.nstep.to(torch.long)
    return ADMMResult(
        beta=beta, converged=converged, nstep=nstep, time_s=time.perf_counter() - t0, mode=block.admm.mode, **fields
    )


def _check_fit_options(
    states: States,
    lam,
    density,
    method,
    mode,
    kappa,
    admm_ab,
    admm_cd,
    zero_tol,
    lam_scale,
    penalty,
    input_weight,
    output_skip,
    debias,
    on_failure,
    input_radius,
    output_radius,
    density_tol,
    max_evals,
    density_of,
) -> tuple[float, BatchedADMM, BatchedADMM]:
    """Validate :func:`fit_sim`'s options; returns ``kappa`` and the two ADMM solvers."""
    own = "fit_sim"
    check_choice(own, "method", method, SOLVERS)
    check_choice(own, "mode", mode, MODES)
    if (lam is None) == (density is None):
        raise OptionError(
            f"{own}: give exactly one of lam (the ℓ1 weight) and density (a target fraction of "
            f"non-zeros, λ then searched), got lam={lam!r}, density={density!r}."
        )
    if lam is not None:
        check_positive(own, "lam", lam, allow_zero=True)
    else:
        check_positive(own, "density", density)
        check_number(own, "density_tol", density_tol, low=0.0, low_open=True)
        check_int(own, "max_evals", max_evals, minimum=2)
        if density_of is not None:
            check_int(own, "density_of", density_of)
        elif states.reference_nnz is None:
            raise OptionError(
                f"{own}: density needs the baseline's non-zero count: collect the states with "
                "collect_states()/collect_cnn_states(), or pass density_of=<non-zeros of the baseline>."
            )
        if mode != "relaxed":
            raise OptionError(
                f"{own}: density searches λ along the lasso path and needs mode='relaxed' "
                f"(in mode={mode!r} the solution does not depend on λ)."
            )
    if lam_scale == "none":
        raise OptionError(
            f"{own}: lam_scale='none' was renamed 'paper' (λ in the units of the SIM paper); the "
            "default is now 'normalized' (per-sample mean loss, targets and regressors of unit rms)."
        )
    check_choice(own, "lam_scale", lam_scale, LAM_SCALES)
    check_choice(own, "penalty", penalty, PENALTIES)
    check_positive(own, "input_weight", input_weight)
    zero_tol = check_positive(own, "zero_tol", zero_tol, allow_zero=True)
    check_bool(own, "output_skip", output_skip)
    check_bool(own, "debias", debias)
    check_failure_policy(own, on_failure)
    for name, val in (("input_radius", input_radius), ("output_radius", output_radius)):
        if val is not None:
            check_positive(own, name, val, allow_zero=True)
    if debias and mode != "relaxed":
        raise OptionError(
            f"{own}: debias=True refits by least squares and needs mode='relaxed' "
            f"(mode={mode!r} already matches the states exactly)."
        )
    kappa = states.kappa if kappa is None else check_kappa(own, kappa)
    admm_ab = admm_ab or BatchedADMM(rho=1.0, max_iter=2000, mode=mode, zero_tol=zero_tol)
    admm_cd = admm_cd or BatchedADMM(rho=1.0, max_iter=1000, mode=mode, zero_tol=zero_tol)
    for name, s in (("admm_ab", admm_ab), ("admm_cd", admm_cd)):
        if not isinstance(s, BatchedADMM):
            raise OptionError(f"{own}: {name} must be a BatchedADMM, got {type(s).__name__}.")
        if s.mode != mode:
            raise OptionError(f"{own}: the ADMM solvers must have mode={mode!r}, got {name} with mode={s.mode!r}.")
    return kappa, admm_ab, admm_cd


def _penalty_weights(phi: Tensor, n: int, p: int, penalty: str, input_weight: float) -> Tensor | None:
    """The ℓ1 weights over ``Φ``'s columns (``None``: all ones)."""
    weights = None
    if penalty == "standardized":
        weights = phi.pow(2).mean(dim=0).sqrt()
        weights = torch.where(weights > 0, weights, torch.ones_like(weights))
    if input_weight != 1.0:
        if weights is None:
            weights = torch.ones(phi.shape[1], dtype=phi.dtype, device=phi.device)
        weights = weights.clone()
        weights[n : n + p] *= float(input_weight)
    return weights


def lam_factors(states: States, lam_scale: str = "pooled") -> tuple[float | Tensor, float | Tensor]:
    """The per-row factors ``(s_ab, s_cd)`` that turn a λ in ``lam_scale`` units into the paper's:
    row ``i`` of the program ``min λ_i‖β‖₁ + ½‖z_i − Φβ‖²`` gets ``λ_i = λ·s_i``.

    ``"paper"``: ``s_i = 1``; ``"rms"``: ``s_i = rms(z_i)``; ``"normalized"``:
    ``s_i = m·rms(z_i)·rms(Φ)``, i.e. the program ``min λ‖β̃‖₁ + (1/2m)‖z̃_i − Φ̃β̃‖²`` on the
    target and regressors each divided by its root mean square (``z̃ = z/rms(z)``,
    ``Φ̃ = Φ/rms(Φ)``, ``β̃ = β·rms(Φ)/rms(z)``); ``"pooled"`` (the default): the same with one
    root mean square for all the targets of a block (``s_i = m·rms(Z)·rms(Φ)``, ``Z`` every
    state's pre-activations for ``(A, B)``, every output for ``(C, D)``).

    Both ``"normalized"`` and ``"pooled"`` make λ mean the same thing for any number of samples
    ``m`` and any scale of the targets (tested); a rescaled input moves ``rms(Φ)`` only in
    part, as ``Φ`` also holds the states and a constant column. They differ in how they weigh the
    rows against each other: ``"normalized"`` asks every row for the same relative fit, so a
    state that stays small on the samples (and moves the outputs little) costs as many
    coefficients as a large one; ``"pooled"`` asks for the same absolute fit, so coefficients go where
    the states are large. At a matched density, ``"pooled"`` gave the more accurate models on
    the benchmarks (BENCHMARKS.md, "SIM against magnitude pruning").
    """
    check_choice("lam_factors", "lam_scale", lam_scale, LAM_SCALES)
    if lam_scale == "paper":
        return 1.0, 1.0
    if lam_scale == "rms":
        return states.Z.pow(2).mean(dim=0).sqrt(), states.Y.pow(2).mean(dim=0).sqrt()
    phi = states.phi
    c = phi.shape[0] * float(phi.pow(2).mean().sqrt())
    if lam_scale == "pooled":
        return c * float(states.Z.pow(2).mean().sqrt()), c * float(states.Y.pow(2).mean().sqrt())
    return c * states.Z.pow(2).mean(dim=0).sqrt(), c * states.Y.pow(2).mean(dim=0).sqrt()


def _blocks(
    states: States,
    lam_scale: str,
    kappa: float,
    admm_ab: BatchedADMM,
    admm_cd: BatchedADMM,
    structure: str,
    output_skip: bool,
    warm_start: ImplicitModel | None,
    input_radius: float | None,
    output_radius: float | None,
    support: tuple[Tensor | None, Tensor | None] | None = None,
) -> dict[str, _Block]:
    """The two row blocks of the program: ``(A, B)`` under the ℓ1 ball, ``(C, D)`` without (or
    under ``output_radius`` on ``[C D_u]``); ``input_radius`` bounds each row of ``B_u``."""
    support_ab, support_cd = support if support is not None else structure_support(states, structure, output_skip)
    phi = states.phi
    s_ab, s_cd = lam_factors(states, lam_scale)
    b0_ab = b0_cd = None
    if warm_start is not None:
        b0_ab = torch.cat([warm_start.A.detach(), warm_start.B.detach()], 1).to(phi)
        b0_cd = torch.cat([warm_start.C.detach(), warm_start.D.detach()], 1).to(phi)
    n, p = states.X.shape[1], states.U.shape[1]
    ball_b = None if input_radius is None else (n, n + p, float(input_radius))
    cd_radius, cd_k = (None, 0) if output_radius is None else (float(output_radius), n + p)
    return {
        "ab": _Block(admm_ab, states.Z.T, s_ab, kappa, n, support_ab, b0_ab, ball_b),
        "cd": _Block(admm_cd, states.Y.T, s_cd, cd_radius, cd_k, support_cd, b0_cd),
    }


def _lasso(
    method: str,
    mode: str,
    blocks: dict[str, _Block],
    phi: Tensor,
    lam: float,
    weights: Tensor | None,
    zero_tol: float,
    factor,
    beta0: Mapping[str, Tensor | None],
) -> tuple[dict[str, BlockResult], dict[str, Tensor]]:
    """The lasso solve of each block at ``lam`` (in ``lam_scale`` units)."""
    results: dict[str, BlockResult] = {}
    betas: dict[str, Tensor] = {}
    for name, b in blocks.items():
        results[name], betas[name] = _solve_block(
            method,
            mode,
            b,
            phi,
            lam * b.scale,
            weights=weights,
            support=b.support,
            beta0=beta0.get(name),
            factor=factor,
            zero_tol=zero_tol,
        )
    return results, betas


def _refit(
    method: str,
    mode: str,
    blocks: dict[str, _Block],
    phi: Tensor,
    zero_tol: float,
    factor,
    results: dict[str, BlockResult],
    betas: dict[str, Tensor],
) -> None:
    """Least squares on each row's lasso support under the same constraints (in place)."""
    for name, b in blocks.items():  # the structure is inside the lasso support
        results["refit_" + name], betas[name] = _solve_block(
            method, mode, b, phi, 0.0, weights=None, support=betas[name] != 0, beta0=betas[name], factor=factor, zero_tol=zero_tol
        )


def _lam_max(blocks: dict[str, _Block], phi: Tensor, weights: Tensor | None) -> float:
    """The smallest λ (in ``lam_scale`` units) at which every row's lasso solution is 0:
    ``max_i max_j |Φ_jᵀ z_i| / (w_j·s_i)`` over each row's support (KKT of ``β = 0``)."""
    top = 0.0
    for b in blocks.values():
        corr = (b.targets @ phi).abs()  # (r, d)
        if weights is not None:
            corr = corr / weights[None, :]
        if b.support is not None:
            corr = corr * b.support.to(corr.dtype)
        scale = torch.as_tensor(b.scale, dtype=corr.dtype, device=corr.device)
        scale = scale.expand(corr.shape[0]) if scale.ndim == 0 else scale
        row = corr.max(dim=1).values if corr.shape[1] else torch.zeros(corr.shape[0], dtype=corr.dtype)
        ok = scale > 0
        if bool(ok.any()):
            top = max(top, float((row[ok] / scale[ok]).max()))
    return top


def _nnz(betas: dict[str, Tensor]) -> int:
    return int(sum(int((b != 0).sum()) for b in betas.values()))


def _failure_message(lam: float, results: dict[str, BlockResult], blocks: dict[str, _Block]) -> str | None:
    """One message naming every solve of the fit with rows that missed their tolerance."""
    parts = []
    for name, res in results.items():
        if res.all_converged:
            continue
        if isinstance(res, ADMMResult):
            parts.append(f"{_BLOCK_LABELS[name]}: {blocks[name.removeprefix('refit_')].admm.failure_message(res)}")
        else:
            parts.append(
                f"{_BLOCK_LABELS[name]}: CVXPY: {res.n_failed} of {len(res.status)} rows not solved to "
                f"optimality (status {', '.join(sorted(set(res.status) - {'optimal'}))})"
            )
    return f"fit_sim(lam={lam:g}): " + "; ".join(parts) if parts else None


def _build_model(states: States, betas: dict[str, Tensor], kappa: float, method: str, solver, grad) -> ImplicitModel:
    """The implicit model with ``[A B] = β_ab`` and ``[C D] = β_cd``."""
    phi = states.phi
    n, p, q = states.X.shape[1], states.U.shape[1], states.Y.shape[1]
    model = ImplicitModel(
        n, p, q, phi="relu", kappa=kappa, bias=True, dtype=phi.dtype, device=phi.device, solver=solver, grad=grad
    )
    beta_ab, beta_cd = betas["ab"], betas["cd"]
    with torch.no_grad():
        model.A.copy_(beta_ab[:, :n])
        model.B.copy_(beta_ab[:, n:])
        model.C.copy_(beta_cd[:, :n])
        model.D.copy_(beta_cd[:, n:])
        if method == "cvxpy" and not model.is_wellposed():  # interior-point round-off only
            model.project_wellposed()
    return model


#: one λ's solution: each block's solve result and coefficients
Solution = tuple[dict[str, BlockResult], dict[str, Tensor]]


def _density_search(
    method: str,
    mode: str,
    blocks: dict[str, _Block],
    phi: Tensor,
    weights: Tensor | None,
    zero_tol: float,
    factor,
    target: float,
    reference: int,
    tol: float,
    max_evals: int,
    debias: bool,
    log: Callable[[str], None] | None,
) -> tuple[DensitySearch, dict[str, BlockResult], dict[str, Tensor]]:
    """λ for ``target`` non-zeros / ``reference`` by :func:`~deqkit.sim.density.search_lam`; each
    lasso warm-started from the nearest λ solved so far. Returns the search and the solution at
    the λ chosen (refitted with ``debias``).

    With ``debias`` the target is on the refitted model, which can be sparser than its lasso:
    the refit zeroes the support entries that least squares does not need (e.g. input columns
    the lasso used as proxies for a state that determines the output exactly). The search runs
    on the lasso's density, then refits at the λ chosen; only if that misses the target does it
    search again, from that λ down, on the refitted density (a lasso and a refit per solve).
    """
    kept: dict[float, Solution] = {}  # λ: the lasso solution (its betas warm-start the next solves)
    refitted: dict[float, Solution] = {}  # λ: the refit of that lasso solution
    first = {name: b.beta0 for name, b in blocks.items()}

    def remember(store: dict[float, Solution], lam: float, sol: Solution) -> Solution:
        store[lam] = sol  # memory stays bounded: the three solutions nearest this λ
        for k in sorted(store, key=lambda k: abs(math.log(k) - math.log(lam)))[3:]:
            del store[k]
        return sol

    def lasso(lam: float) -> Solution:
        near = min(kept, key=lambda k: abs(math.log(k) - math.log(lam)), default=None)
        beta0 = first if near is None else kept[near][1]
        return remember(kept, lam, _lasso(method, mode, blocks, phi, lam, weights, zero_tol, factor, beta0))

    def refit(lam: float, sol: Solution) -> Solution:
        res, betas = dict(sol[0]), dict(sol[1])  # the lasso's betas stay the warm starts
        _refit(method, mode, blocks, phi, zero_tol, factor, res, betas)
        return remember(refitted, lam, (res, betas))

    def report(lam: float, sol: Solution, what: str) -> float:
        dens = _nnz(sol[1]) / reference
        if log is not None:
            log(f"density search: λ={lam:.4g} -> {100 * dens:.2f}% non-zeros{what} (target {100 * target:g}%)")
        return dens

    lam_max = _lam_max(blocks, phi, weights)
    if lam_max <= 0:
        raise OptionError("fit_sim: every target is zero (λ_max = 0); there is no λ to search.")
    search = search_lam(lambda lam: report(lam, lasso(lam), ""), target, lam_max, tol=tol, max_evals=max_evals)
    # the chosen point may have been evicted (or be λ_max): then solve it again, warm
    sol = kept[search.lam] if search.lam in kept else lasso(search.lam)
    if not debias:
        return search, *sol
    dens = report(search.lam, refit(search.lam, sol), " after the refit")
    # the refit only removes entries: when it made the model too sparse, search on, down from this λ
    if dens < target - tol and search.nstep < max_evals:
        again = search_lam(
            lambda lam: report(lam, refit(lam, lasso(lam)), " after the refit"),
            target,
            lam_max,
            tol=tol,
            max_evals=max_evals - search.nstep,
            start=(search.lam, dens),
        )
        search = replace(again, nstep=search.nstep + again.nstep, path=search.path + again.path[1:])
    else:
        search = replace(search, density=dens, converged=abs(dens - target) <= tol, path=[*search.path, (search.lam, dens)])
    sol = refitted[search.lam] if search.lam in refitted else refit(search.lam, lasso(search.lam))
    return search, *sol


@validated_options
def fit_sim(
    states: States,
    lam: float | None = None,
    *,
    density: float | None = None,
    density_tol: float = 0.005,
    max_evals: int = 20,
    density_of: int | None = None,
    method: str = "admm",
    mode: str = "relaxed",
    kappa: float | None = None,
    admm_ab: BatchedADMM | None = None,
    admm_cd: BatchedADMM | None = None,
    warm_start: ImplicitModel | None = None,
    zero_tol: float = 1e-6,
    lam_scale: str = "pooled",
    penalty: str = "uniform",
    input_weight: float = 1.0,
    structure: str = "full",
    output_skip: bool = True,
    debias: bool = False,
    input_radius: float | None = None,
    output_radius: float | None = None,
    radius_scale: str = "absolute",
    support: tuple[Tensor | None, Tensor | None] | None = None,
    on_failure: str = "warn",
    solver: Any = None,
    grad: Any = None,
    log: Callable[[str], None] | None = None,
) -> SIMResult:
    """Fit ``(A, B, C, D)`` to ``states`` (from :func:`~deqkit.sim.states.collect_states`).

    Args:
        lam: ℓ1 weight λ ≥ 0 (same for every row, in ``lam_scale`` units). Give ``lam`` or
            ``density``, not both.
        density: a target fraction of non-zeros of ``(A, B, C, D)``, relative to the baseline's
            non-zero weights and biases (``states.reference_nnz``, or ``density_of``): λ is then
            found by a warm-started search along the lasso path
            (:func:`~deqkit.sim.density.search_lam`) to within ``density_tol`` with at most
            ``max_evals`` solves; the result reports the λ chosen, the density reached and the
            path. With ``debias`` the target is on the refitted model returned (the refit can
            zero entries of the lasso's support). ``mode="relaxed"`` only.
        method: ``"admm"`` (default: batched, any device) or ``"cvxpy"`` (reference, row by row).
        mode: ``"relaxed"`` or ``"equality"`` (see the module docstring).
        kappa: well-posedness margin (default: the one the states were rescaled for).
        admm_ab: the ADMM solver for the ``(A, B)`` rows (default: ``rho=1``, 2000
            iterations; its ``mode`` must equal ``mode``). Its own ``on_failure`` is not
            consulted: this function's applies to the whole fit.
        admm_cd: the same for the ``(C, D)`` rows (default: ``rho=1``, 1000 iterations).
        warm_start: a model of the same shape whose ``(A, B, C, D)`` start the ADMM.
        zero_tol: entries below this magnitude are zeroed (also for CVXPY).
        lam_scale: the units of λ (see :func:`lam_factors`). ``"pooled"`` (default):
            per-sample mean loss on regressors of unit root mean square and targets divided by
            their block's pooled root mean square, so a λ carries over between sample counts
            and data sets (useful values lie in ``(0, 1)``) while the rows keep their relative
            scale; ``"normalized"``: each row's target divided by its own root mean square (the
            default until 2026-11-30); ``"paper"``: λ exactly as in the SIM paper's program
            ``λ‖β‖₁ + ½‖z_i − Φβ‖²`` (the default of earlier deqkit versions, there called
            ``"none"``; it grows with the number of samples and the states' scale);
            ``"rms"``: ``λ·rms(z_i)`` per row.
        penalty: ``"uniform"`` (the paper's ℓ1 norm) or ``"standardized"`` (each column of
            ``Φ`` weighted by its root mean square, invariant to the rescaling).
        input_weight: per-block λ: the ℓ1 weight of the input columns (``U``, i.e. of ``B`` and
            ``D`` without their bias column) relative to the state columns (``A``, ``C``) and the
            bias, so those coefficients cost ``input_weight·λ`` each (default 1: the paper's
            uniform penalty). A value > 1 counters the rescaling that shrinks deep states and
            makes the lasso prefer raw pixels. Multiplies ``penalty="standardized"``'s weights.
        structure: ``"full"`` (the paper: any state may feed any state) or ``"feedforward"``
            (states read only earlier layers; see the module docstring and
            :func:`structure_support`).
        output_skip: whether the outputs may read the inputs directly (``D``'s input columns).
        debias: refit each row by least squares on the lasso's support under the same
            constraints (relaxed lasso); ``mode="relaxed"`` only.
        input_radius: robustness: each row of ``B``'s input columns kept in the ℓ1 ball of this
            radius (``None``: no bound). With ``output_radius`` it bounds the model's ℓ∞ gain
            (see :mod:`deqkit.sim.robust`): convex and row-separable like the κ ball.
        output_radius: robustness: each row of ``[C D_u]`` (the outputs' weights on states and
            inputs, bias excluded) kept in the ℓ1 ball of this radius.
        radius_scale: the units of ``input_radius`` and ``output_radius``: ``"absolute"``
            (default: ℓ1 norms in the states' rescaled coordinates, which differ between
            networks) or ``"relative"``: a fraction in ``(0, 1]`` of the largest such row norm of
            the plain fit (the same ``lam`` or ``density``, no bounds), which is solved first, so
            the same value tightens the largest rows alike on any network (the accuracy it costs
            still differs; BENCHMARKS.md has the CNN's). The result records the absolute bounds
            applied.
        support: explicit ``(support_ab, support_cd)`` boolean masks over ``Φ``'s columns
            (replacing ``structure``/``output_skip``; e.g. the receptive fields of a CNN).
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"`` when some row of some
            solve missed its tolerance, or the density search missed its target (one message
            for the whole fit); the result records it.
        solver: the fitted :class:`ImplicitModel`'s fixed-point solver (default: that of
            :class:`ImplicitModel`).
        grad: its gradient estimator (default: that of :class:`ImplicitModel`).
        log: called with one line per solve of the density search (progress).
    Returns:
        a :class:`SIMResult`; its model is well-posed (``‖A‖_∞ ≤ κ``) in every mode.
    """
    kappa, admm_ab, admm_cd = _check_fit_options(
        states,
        lam,
        density,
        method,
        mode,
        kappa,
        admm_ab,
        admm_cd,
        zero_tol,
        lam_scale,
        penalty,
        input_weight,
        output_skip,
        debias,
        on_failure,
        input_radius,
        output_radius,
        density_tol,
        max_evals,
        density_of,
    )
    check_choice("fit_sim", "structure", structure, STRUCTURES)
    if support is not None and (structure != "full" or not output_skip):
        raise OptionError(
            "fit_sim: support= replaces structure/output_skip; pass one or the other "
            f"(got structure={structure!r}, output_skip={output_skip!r} with support)."
        )
    check_choice("fit_sim", "radius_scale", radius_scale, RADIUS_SCALES)
    plain_s = time.perf_counter()
    if radius_scale == "relative" and (input_radius is not None or output_radius is not None):
        input_radius, output_radius, warm_start = _relative_radii(
            states,
            input_radius,
            output_radius,
            warm_start,
            dict(
                lam=lam,
                density=density,
                density_tol=density_tol,
                max_evals=max_evals,
                density_of=density_of,
                method=method,
                mode=mode,
                kappa=kappa,
                admm_ab=admm_ab,
                admm_cd=admm_cd,
                zero_tol=zero_tol,
                lam_scale=lam_scale,
                penalty=penalty,
                input_weight=input_weight,
                structure=structure,
                output_skip=output_skip,
                debias=debias,
                support=support,
                on_failure=on_failure,
                log=log,
            ),
        )
    plain_s = time.perf_counter() - plain_s  # the plain fit's time (relative radii), counted in time_s
    blocks = _blocks(
        states, lam_scale, kappa, admm_ab, admm_cd, structure, output_skip, warm_start, input_radius, output_radius, support
    )
    phi = states.phi
    weights = _penalty_weights(phi, states.X.shape[1], states.U.shape[1], penalty, input_weight)
    reference = density_of if density_of is not None else states.reference_nnz
    t0 = time.perf_counter()
    # the eigendecomposition of ΦᵀΦ serves every block solved over all columns (none when all are grouped)
    factor = admm_ab.factorize(phi) if method == "admm" and not all(_grouped(b) for b in blocks.values()) else None
    search = None
    if density is not None:
        assert reference is not None  # checked above
        search, results, betas = _density_search(
            method,
            mode,
            blocks,
            phi,
            weights,
            zero_tol,
            factor,
            float(density),
            int(reference),
            float(density_tol),
            int(max_evals),
            debias,
            log,
        )
        lam = search.lam
    else:
        assert lam is not None
        results, betas = _lasso(
            method, mode, blocks, phi, float(lam), weights, zero_tol, factor, {name: b.beta0 for name, b in blocks.items()}
        )
    if debias and search is None:  # the density search returns its solution refitted
        _refit(method, mode, blocks, phi, zero_tol, factor, results, betas)
    elapsed = time.perf_counter() - t0 + plain_s
    msg = _failure_message(float(lam), results, blocks)
    if search is not None and not search.converged:
        assert density is not None  # a search runs only for density=...
        miss = (
            f"fit_sim(density={density:g}): the λ search reached {100 * search.density:.2f}% non-zeros "
            f"(target {100 * density:g}% ± {100 * density_tol:g}) after {search.nstep} solves; raise max_evals, "
            "loosen density_tol, or check that the target lies between 0 and the density of the dense fit"
        )
        msg = miss if msg is None else f"{miss}; {msg}"
    if msg is not None:
        apply_failure_policy(on_failure, msg, stacklevel=3)
    model = _build_model(states, betas, kappa, method, solver, grad)
    reached = _nnz(betas) / reference if reference is not None else None
    return SIMResult(
        model=model,
        ab=results["ab"],
        cd=results["cd"],
        lam=float(lam),
        time_s=elapsed,
        refit_ab=results.get("refit_ab"),
        refit_cd=results.get("refit_cd"),
        lam_scale=lam_scale,
        density=reached,
        density_target=None if density is None else float(density),
        search=search,
        input_radius=None if input_radius is None else float(input_radius),
        output_radius=None if output_radius is None else float(output_radius),
    )


def _relative_radii(
    states: States, input_frac: float | None, output_frac: float | None, warm_start: ImplicitModel | None, fit_kw: dict
) -> tuple[float | None, float | None, ImplicitModel | None]:
    """``radius_scale="relative"``: the plain fit (``fit_kw``, no bounds), then each fraction times
    its largest row norm (``B``'s input columns; ``[C D_u]``). Returns the absolute radii and the
    plain model as the warm start (unless one was given)."""
    for name, frac in (("input_radius", input_frac), ("output_radius", output_frac)):
        if frac is not None:
            check_fraction(
                "fit_sim", f"{name} (with radius_scale='relative': a fraction of the plain fit's largest row norm)", frac
            )
    plain = fit_sim(states, warm_start=warm_start, **fit_kw).model
    p = states.U.shape[1]
    with torch.no_grad():
        b_top = float(plain.B[:, :p].abs().sum(dim=1).max()) if plain.B.numel() else 0.0
        cd = torch.cat([plain.C, plain.D[:, :p]], 1).abs().sum(dim=1)
        cd_top = float(cd.max()) if cd.numel() else 0.0
    in_r = None if input_frac is None else float(input_frac) * b_top
    out_r = None if output_frac is None else float(output_frac) * cd_top
    return in_r, out_r, warm_start if warm_start is not None else plain


@validated_options
def count_nonzeros(model: ImplicitModel, zero_tol: float = 1e-6) -> dict[str, int]:
    """Entries with ``|·| ≥ zero_tol`` in each of ``A, B, C, D`` and in total."""
    zero_tol = check_positive("count_nonzeros", "zero_tol", zero_tol, allow_zero=True)
    out = {k: int((getattr(model, k).detach().abs() >= zero_tol).sum()) for k in "ABCD"}
    out["total"] = sum(out.values())
    return out


@validated_options
def baseline_nonzeros(net: nn.Module, zero_tol: float = 1e-6) -> int:
    """Non-zero weights and biases of the baseline's affine layers (composed layers counted once)."""
    zero_tol = check_positive("baseline_nonzeros", "zero_tol", zero_tol, allow_zero=True)
    return sum(
        int((lay.weight.abs() >= zero_tol).sum()) + int((lay.bias.abs() >= zero_tol).sum())
        for lay in _mlp_layers(net, "baseline_nonzeros")
    )


def _finetune_epoch(
    model: ImplicitModel, u: Tensor, y: Tensor, opt, params, masks, batch_size: int, gen: torch.Generator
) -> float:
    """One epoch of projected (and masked) Adam; returns the mean training loss."""
    perm = torch.randperm(len(u), generator=gen)
    total, count = 0.0, 0
    for i in range(0, len(u), batch_size):
        idx = perm[i : i + batch_size].to(u.device)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(u[idx]), y[idx])
        loss.backward()
        if masks is not None:
            for p, mk in zip(params, masks):
                p.grad.mul_(mk)
        opt.step()
        with torch.no_grad():
            if masks is not None:
                for p, mk in zip(params, masks):
                    p.mul_(mk)
        model.project_wellposed()
        total, count = total + float(loss.detach()) * len(idx), count + len(idx)
    return total / max(count, 1)


@validated_options
def finetune(
    model: ImplicitModel,
    u: Tensor,
    y: Tensor,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 256,
    keep_sparsity: bool = True,
    seed: int = 0,
    log: Callable[[int, float], None] | None = None,
) -> ImplicitModel:
    """Fine-tune a (SIM) model on ``(u, y)`` by cross-entropy with the core's implicit gradient.

    Projected Adam: after every step each row of ``A`` is projected back onto the ℓ1 ball of
    radius κ (well-posedness kept), the projected gradient of the SIM paper (Tsai et al.,
    arXiv 2209.09389). With ``keep_sparsity`` the gradient is masked to the current non-zero
    pattern of ``(A, B, C, D)``, so the non-zero count cannot grow (and a
    ``structure="feedforward"`` model stays feedforward). ``log(epoch, mean_loss)`` is called
    after each epoch (1-based). Unlike the SIM program, this uses the labels.
    """
    _check_training_options("finetune", epochs, lr, batch_size, seed)
    check_bool("finetune", "keep_sparsity", keep_sparsity)
    params = [model.A, model.B, model.C, model.D]
    masks = [(p.detach() != 0).to(p.dtype) for p in params] if keep_sparsity else None
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        mean_loss = _finetune_epoch(model, u, y, opt, params, masks, batch_size, gen)
        if log is not None:
            log(epoch + 1, mean_loss)
    return model.eval()
