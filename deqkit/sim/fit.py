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

Solved by :class:`~deqkit.sim.admm.BatchedADMM` (all rows at once; ADMM as in Boyd et al.,
Found. Trends Mach. Learn. 2011) or by the CVXPY reference.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._options import (
    check_bool,
    check_choice,
    check_failure_policy,
    check_positive,
    validated_options,
)
from ..errors import OptionError, apply_failure_policy
from ..results import ResultMixin
from .admm import MODES, ADMMResult, BatchedADMM
from .baseline import _check_training_options
from .model import ImplicitModel, check_kappa
from .reference import CVXPYResult, solve_rows_cvxpy
from .states import States, _mlp_layers

__all__ = [
    "LAM_SCALES",
    "PENALTIES",
    "SOLVERS",
    "STRUCTURES",
    "SIMResult",
    "baseline_nonzeros",
    "count_nonzeros",
    "finetune",
    "fit_sim",
    "structure_support",
]

#: the ``method`` values of :func:`fit_sim`
SOLVERS = ("admm", "cvxpy")
STRUCTURES = ("full", "feedforward")
LAM_SCALES = ("none", "rms")
PENALTIES = ("uniform", "standardized")

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
      excluded).
    """

    model: ImplicitModel
    ab: BlockResult
    cd: BlockResult
    lam: float
    time_s: float
    refit_ab: BlockResult | None = None
    refit_cd: BlockResult | None = None

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
        return max((float(torch.as_tensor(r.residual).max()) for r in self.solves.values() if len(r.residual)),
                   default=0.0)

    @property
    def objective(self) -> float:
        """Sum of the per-row objectives of the lasso program (before any refit) over all rows."""
        return float(sum(float(torch.as_tensor(r.objective).sum()) for r in (self.ab, self.cd)))


@validated_options
def structure_support(
    states: States, structure: str = "full", output_skip: bool = True
) -> tuple[Tensor | None, Tensor | None]:
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
    """One row block of the program: its ADMM solver, targets, λ, ball, support and warm start."""

    admm: BatchedADMM
    targets: Tensor
    lam: float | Tensor
    radius: float | None
    n_constrained: int
    support: Tensor | None
    beta0: Tensor | None


def _solve_block(method: str, mode: str, block: _Block, phi: Tensor, lam, *, weights, support, beta0, factor,
                 zero_tol: float) -> tuple[BlockResult, Tensor]:
    """One block of rows by the batched ADMM or by CVXPY, without a failure policy (the fit
    applies its own); returns (result, beta tensor)."""
    if method == "admm":
        res = block.admm._solve(phi, block.targets, lam, radius=block.radius, n_constrained=block.n_constrained,
                                beta0=beta0, factor=factor, weights=weights, support=support)
        return res, res.beta
    ref = solve_rows_cvxpy(phi, block.targets, float(lam), radius=block.radius, n_constrained=block.n_constrained,
                           mode=mode, weights=weights, support=support, on_failure="ignore")
    beta = torch.as_tensor(ref.beta, dtype=phi.dtype, device=phi.device)
    return ref, torch.where(beta.abs() < zero_tol, torch.zeros_like(beta), beta)


def _check_fit_options(states: States, lam, method, mode, kappa, admm_ab, admm_cd, zero_tol, lam_scale, penalty,
                       input_weight, output_skip, debias, on_failure) -> tuple[float, BatchedADMM, BatchedADMM]:
    """Validate :func:`fit_sim`'s options; returns ``kappa`` and the two ADMM solvers."""
    own = "fit_sim"
    check_choice(own, "method", method, SOLVERS)
    check_choice(own, "mode", mode, MODES)
    check_positive(own, "lam", lam, allow_zero=True)
    check_choice(own, "lam_scale", lam_scale, LAM_SCALES)
    if lam_scale != "none" and method != "admm":
        raise OptionError(f"{own}: lam_scale={lam_scale!r} is only implemented for method='admm', got method={method!r}.")
    check_choice(own, "penalty", penalty, PENALTIES)
    check_positive(own, "input_weight", input_weight)
    zero_tol = check_positive(own, "zero_tol", zero_tol, allow_zero=True)
    check_bool(own, "output_skip", output_skip)
    check_bool(own, "debias", debias)
    check_failure_policy(own, on_failure)
    if debias and mode != "relaxed":
        raise OptionError(f"{own}: debias=True refits by least squares and needs mode='relaxed' "
                          f"(mode={mode!r} already matches the states exactly).")
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


def _blocks(states: States, lam: float, lam_scale: str, kappa: float, admm_ab: BatchedADMM, admm_cd: BatchedADMM,
            structure: str, output_skip: bool, warm_start: ImplicitModel | None) -> dict[str, _Block]:
    """The two row blocks of the program: ``(A, B)`` under the ℓ1 ball, ``(C, D)`` without."""
    support_ab, support_cd = structure_support(states, structure, output_skip)
    phi = states.phi
    lam_ab: float | Tensor = lam
    lam_cd: float | Tensor = lam
    if lam_scale == "rms":
        lam_ab = lam * states.Z.pow(2).mean(dim=0).sqrt()
        lam_cd = lam * states.Y.pow(2).mean(dim=0).sqrt()
    b0_ab = b0_cd = None
    if warm_start is not None:
        b0_ab = torch.cat([warm_start.A.detach(), warm_start.B.detach()], 1).to(phi)
        b0_cd = torch.cat([warm_start.C.detach(), warm_start.D.detach()], 1).to(phi)
    n = states.X.shape[1]
    return {
        "ab": _Block(admm_ab, states.Z.T, lam_ab, kappa, n, support_ab, b0_ab),
        "cd": _Block(admm_cd, states.Y.T, lam_cd, None, 0, support_cd, b0_cd),
    }


def _solve_blocks(method: str, mode: str, blocks: dict[str, _Block], phi: Tensor, weights: Tensor | None,
                  debias: bool, zero_tol: float) -> tuple[dict[str, BlockResult], dict[str, Tensor]]:
    """The lasso solve of each block, then (``debias``) least squares on each row's lasso support."""
    factor = blocks["ab"].admm.factorize(phi) if method == "admm" else None
    results: dict[str, BlockResult] = {}
    betas: dict[str, Tensor] = {}
    for name, b in blocks.items():
        results[name], betas[name] = _solve_block(method, mode, b, phi, b.lam, weights=weights, support=b.support,
                                                  beta0=b.beta0, factor=factor, zero_tol=zero_tol)
    if debias:  # the structure is inside the lasso support
        for name, b in blocks.items():
            results["refit_" + name], betas[name] = _solve_block(
                method, mode, b, phi, 0.0, weights=None, support=betas[name] != 0, beta0=betas[name],
                factor=factor, zero_tol=zero_tol)
    return results, betas


def _failure_message(lam: float, results: dict[str, BlockResult], blocks: dict[str, _Block]) -> str | None:
    """One message naming every solve of the fit with rows that missed their tolerance."""
    parts = []
    for name, res in results.items():
        if res.all_converged:
            continue
        if isinstance(res, ADMMResult):
            parts.append(f"{_BLOCK_LABELS[name]}: {blocks[name.removeprefix('refit_')].admm.failure_message(res)}")
        else:
            parts.append(f"{_BLOCK_LABELS[name]}: CVXPY: {res.n_failed} of {len(res.status)} rows not solved to "
                         f"optimality (status {', '.join(sorted(set(res.status) - {'optimal'}))})")
    return f"fit_sim(lam={lam:g}): " + "; ".join(parts) if parts else None


def _build_model(states: States, betas: dict[str, Tensor], kappa: float, method: str, solver, grad) -> ImplicitModel:
    """The implicit model with ``[A B] = β_ab`` and ``[C D] = β_cd``."""
    phi = states.phi
    n, p, q = states.X.shape[1], states.U.shape[1], states.Y.shape[1]
    model = ImplicitModel(n, p, q, phi="relu", kappa=kappa, bias=True, dtype=phi.dtype, device=phi.device,
                          solver=solver, grad=grad)
    beta_ab, beta_cd = betas["ab"], betas["cd"]
    with torch.no_grad():
        model.A.copy_(beta_ab[:, :n])
        model.B.copy_(beta_ab[:, n:])
        model.C.copy_(beta_cd[:, :n])
        model.D.copy_(beta_cd[:, n:])
        if method == "cvxpy" and not model.is_wellposed():  # interior-point round-off only
            model.project_wellposed()
    return model


@validated_options
def fit_sim(
    states: States,
    lam: float,
    *,
    method: str = "admm",
    mode: str = "relaxed",
    kappa: float | None = None,
    admm_ab: BatchedADMM | None = None,
    admm_cd: BatchedADMM | None = None,
    warm_start: ImplicitModel | None = None,
    zero_tol: float = 1e-6,
    lam_scale: str = "none",
    penalty: str = "uniform",
    input_weight: float = 1.0,
    structure: str = "full",
    output_skip: bool = True,
    debias: bool = False,
    on_failure: str = "warn",
    solver: Any = None,
    grad: Any = None,
) -> SIMResult:
    """Fit ``(A, B, C, D)`` to ``states`` (from :func:`~deqkit.sim.states.collect_states`).

    Args:
        lam: ℓ1 weight λ ≥ 0 (same for every row).
        method: ``"admm"`` (default: batched, any device) or ``"cvxpy"`` (reference, row by row).
        mode: ``"relaxed"`` or ``"equality"`` (see the module docstring).
        kappa: well-posedness margin (default: the one the states were rescaled for).
        admm_ab, admm_cd: the ADMM solvers for the ``(A, B)`` and ``(C, D)`` rows (defaults:
            ``rho=1``, 2000 and 1000 iterations; their ``mode`` must equal ``mode``). Their
            own ``on_failure`` is not consulted: this function's applies to the whole fit.
        warm_start: a model of the same shape whose ``(A, B, C, D)`` start the ADMM.
        zero_tol: entries below this magnitude are zeroed (also for CVXPY).
        lam_scale: ``"none"`` (λ for every row, the paper's program) or ``"rms"``: row ``i``
            uses ``λ·rms(z_i)``, which makes λ invariant to the per-layer rescaling of the
            states (deeper layers are scaled down to make ``A`` well-posed). ADMM only.
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
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"`` when some row of some
            solve missed its tolerance (one message for the whole fit); the result records it.
        solver, grad: the fitted :class:`ImplicitModel`'s fixed-point solver and gradient
            estimator (defaults: those of :class:`ImplicitModel`).
    Returns:
        a :class:`SIMResult`; its model is well-posed (``‖A‖_∞ ≤ κ``) in every mode.
    """
    kappa, admm_ab, admm_cd = _check_fit_options(states, lam, method, mode, kappa, admm_ab, admm_cd, zero_tol,
                                                  lam_scale, penalty, input_weight, output_skip, debias, on_failure)
    blocks = _blocks(states, lam, lam_scale, kappa, admm_ab, admm_cd, structure, output_skip, warm_start)
    phi = states.phi
    weights = _penalty_weights(phi, states.X.shape[1], states.U.shape[1], penalty, input_weight)
    t0 = time.perf_counter()
    results, betas = _solve_blocks(method, mode, blocks, phi, weights, debias, zero_tol)
    elapsed = time.perf_counter() - t0
    msg = _failure_message(lam, results, blocks)
    if msg is not None:
        apply_failure_policy(on_failure, msg, stacklevel=3)
    model = _build_model(states, betas, kappa, method, solver, grad)
    return SIMResult(model=model, ab=results["ab"], cd=results["cd"], lam=float(lam), time_s=elapsed,
                     refit_ab=results.get("refit_ab"), refit_cd=results.get("refit_cd"))


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
    return sum(int((lay.weight.abs() >= zero_tol).sum()) + int((lay.bias.abs() >= zero_tol).sum())
               for lay in _mlp_layers(net, "baseline_nonzeros"))


def _finetune_epoch(model: ImplicitModel, u: Tensor, y: Tensor, opt, params, masks, batch_size: int,
                    gen: torch.Generator) -> float:
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
