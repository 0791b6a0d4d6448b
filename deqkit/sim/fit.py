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
  states, but such loops move the implicit model's equilibrium on new inputs (Fashion-MNIST,
  λ = 1: 1.3k of the 3.3k non-zeros of ``A`` sat inside layer 1, with self-loops up to κ).
  ``output_skip=False`` also keeps the outputs from reading the inputs (``D`` = bias only, as
  in the baseline).
* ``debias=True``: the relaxed-lasso refit (Meinshausen, "Relaxed Lasso", CSDA 2007): the
  lasso chooses each row's support, then ``min ½‖z_i − Φβ‖²`` on that support under the same
  constraints undoes the ℓ1 shrinkage, which otherwise compounds through the layers. The
  non-zeros cannot grow.

Solved by :class:`~deqkit.sim.admm.BatchedADMM` (all rows at once) or by the CVXPY reference.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from .admm import MODES, ADMMResult, BatchedADMM
from .model import ImplicitModel
from .reference import CVXPYResult, solve_rows_cvxpy
from .states import States, mlp_layers

SOLVERS = ("admm", "cvxpy")
STRUCTURES = ("full", "feedforward")
LAM_SCALES = ("none", "rms")
PENALTIES = ("uniform", "standardized")


@dataclass
class SIMResult:
    """A fitted model and how its two row blocks were solved (``refit_*``: the debiasing
    solves, ``None`` without ``debias``)."""

    model: ImplicitModel
    ab: Union[ADMMResult, CVXPYResult]
    cd: Union[ADMMResult, CVXPYResult]
    lam: float
    time_s: float
    refit_ab: Optional[Union[ADMMResult, CVXPYResult]] = None
    refit_cd: Optional[Union[ADMMResult, CVXPYResult]] = None

    @property
    def converged(self) -> bool:
        """True when every row of every solve met its tolerance (CVXPY: status optimal)."""
        solves = [r for r in (self.ab, self.cd, self.refit_ab, self.refit_cd) if r is not None]
        return all(
            r.all_converged if isinstance(r, ADMMResult) else all(s == "optimal" for s in r.status)
            for r in solves
        )

    @property
    def objective(self) -> float:
        """Sum of the per-row objectives of the lasso program (before any refit) over all rows."""
        return float(sum(float(torch.as_tensor(r.objective).sum()) for r in (self.ab, self.cd)))


def structure_support(
    states: States, structure: str = "full", output_skip: bool = True
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Boolean masks ``(support_ab, support_cd)`` of the coefficients the program may use,
    shapes ``(n, n+p+1)`` and ``(q, n+p+1)`` over ``Φ = [X U 1]``; ``None`` = unrestricted.

    ``structure="feedforward"``: row ``i`` of ``A`` may use state ``j`` only if ``j``'s layer
    comes before ``i``'s (``A`` strictly block upper triangular, nilpotent). ``output_skip=False``:
    the outputs read no input (``D``'s input columns are zero; its bias column stays).
    """
    if structure not in STRUCTURES:
        raise ValueError(f"structure={structure!r} is invalid; valid: {', '.join(STRUCTURES)}")
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


def _solve_block(method, admm, phi, targets, lam, *, radius, n_constrained, mode, weights, support, beta0, factor,
                 zero_tol):
    """One block of rows by the batched ADMM or by CVXPY; returns (result, beta tensor)."""
    if method == "admm":
        res = admm.solve(phi, targets, lam, radius=radius, n_constrained=n_constrained, beta0=beta0,
                         factor=factor, weights=weights, support=support)
        return res, res.beta
    res = solve_rows_cvxpy(phi, targets, float(lam), radius=radius, n_constrained=n_constrained, mode=mode,
                           weights=weights, support=support)
    beta = torch.as_tensor(res.beta, dtype=phi.dtype, device=phi.device)
    return res, torch.where(beta.abs() < zero_tol, torch.zeros_like(beta), beta)


def fit_sim(
    states: States,
    lam: float,
    *,
    method: str = "admm",
    mode: str = "relaxed",
    kappa: Optional[float] = None,
    admm_ab: Optional[BatchedADMM] = None,
    admm_cd: Optional[BatchedADMM] = None,
    warm_start: Optional[ImplicitModel] = None,
    zero_tol: float = 1e-6,
    lam_scale: str = "none",
    penalty: str = "uniform",
    input_weight: float = 1.0,
    structure: str = "full",
    output_skip: bool = True,
    debias: bool = False,
    **model_kwargs,
) -> SIMResult:
    """Fit ``(A, B, C, D)`` to ``states`` (from :func:`~deqkit.sim.states.collect_states`).

    Args:
        lam: ℓ1 weight λ ≥ 0 (same for every row).
        method: ``"admm"`` (default: batched, any device) or ``"cvxpy"`` (reference, row by row).
        mode: ``"relaxed"`` or ``"equality"`` (see the module docstring).
        kappa: well-posedness margin (default: the one the states were rescaled for).
        admm_ab, admm_cd: the ADMM solvers for the ``(A, B)`` and ``(C, D)`` rows (defaults:
            ``rho=1``, 2000 and 1000 iterations; their ``mode`` must equal ``mode``).
        warm_start: a model of the same shape whose ``(A, B, C, D)`` start the ADMM.
        zero_tol: entries below this magnitude are zeroed (also for CVXPY).
        lam_scale: ``"none"`` (λ for every row, the paper's program) or ``"rms"``: row ``i``
            uses ``λ·rms(z_i)``, which makes λ invariant to the per-layer rescaling of the
            states (deeper layers are scaled down to make ``A`` well-posed). ADMM only.
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
        model_kwargs: passed to :class:`ImplicitModel` (solver, grad, ...).
    Returns:
        a :class:`SIMResult`; its model is well-posed (``‖A‖_∞ ≤ κ``) in every mode.
    """
    if method not in SOLVERS:
        raise ValueError(f"method={method!r} is invalid; valid: {', '.join(SOLVERS)}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is invalid; valid: {', '.join(MODES)}")
    if not (isinstance(lam, (int, float)) and lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if lam_scale not in LAM_SCALES:
        raise ValueError(f"lam_scale={lam_scale!r} is invalid; valid: {', '.join(LAM_SCALES)}")
    if lam_scale != "none" and method != "admm":
        raise ValueError("lam_scale='rms' is only implemented for method='admm'")
    if penalty not in PENALTIES:
        raise ValueError(f"penalty={penalty!r} is invalid; valid: {', '.join(PENALTIES)}")
    if not (isinstance(input_weight, (int, float)) and not isinstance(input_weight, bool)
            and input_weight > 0 and math.isfinite(input_weight)):
        raise ValueError(f"input_weight must be a finite number > 0, got {input_weight!r}")
    if debias and mode != "relaxed":
        raise ValueError("debias=True refits by least squares and needs mode='relaxed' "
                         "(mode='equality' already matches the states exactly)")
    support_ab, support_cd = structure_support(states, structure, output_skip)
    kappa = states.kappa if kappa is None else float(kappa)
    if not (0 < kappa < 1):
        raise ValueError(f"kappa must be in (0, 1), got {kappa}")
    admm_ab = admm_ab or BatchedADMM(rho=1.0, max_iter=2000, mode=mode, zero_tol=zero_tol)
    admm_cd = admm_cd or BatchedADMM(rho=1.0, max_iter=1000, mode=mode, zero_tol=zero_tol)
    for s in (admm_ab, admm_cd):
        if s.mode != mode:
            raise ValueError(f"the ADMM solvers must have mode={mode!r}, got {s.mode!r}")
    phi = states.phi
    n, p, q = states.X.shape[1], states.U.shape[1], states.Y.shape[1]
    weights = None
    if penalty == "standardized":
        weights = phi.pow(2).mean(dim=0).sqrt()
        weights = torch.where(weights > 0, weights, torch.ones_like(weights))
    if input_weight != 1.0:
        if weights is None:
            weights = torch.ones(phi.shape[1], dtype=phi.dtype, device=phi.device)
        weights = weights.clone()
        weights[n : n + p] *= float(input_weight)
    lam_ab: Union[float, Tensor] = lam
    lam_cd: Union[float, Tensor] = lam
    if lam_scale == "rms":
        lam_ab = lam * states.Z.pow(2).mean(dim=0).sqrt()
        lam_cd = lam * states.Y.pow(2).mean(dim=0).sqrt()
    b0_ab = b0_cd = None
    if warm_start is not None:
        b0_ab = torch.cat([warm_start.A.detach(), warm_start.B.detach()], 1).to(phi)
        b0_cd = torch.cat([warm_start.C.detach(), warm_start.D.detach()], 1).to(phi)
    t0 = time.perf_counter()
    factor = admm_ab.factorize(phi) if method == "admm" else None
    blocks = {  # name: (ADMM solver, targets, λ, ball radius, constrained columns, support, warm start)
        "ab": (admm_ab, states.Z.T, lam_ab, kappa, n, support_ab, b0_ab),
        "cd": (admm_cd, states.Y.T, lam_cd, None, 0, support_cd, b0_cd),
    }
    results: dict[str, Union[ADMMResult, CVXPYResult]] = {}
    betas: dict[str, Tensor] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, (admm, targets, lam_b, radius, k, support, beta0) in blocks.items():
            results[name], betas[name] = _solve_block(
                method, admm, phi, targets, lam_b, radius=radius, n_constrained=k, mode=mode, weights=weights,
                support=support, beta0=beta0, factor=factor, zero_tol=zero_tol)
        if debias:  # least squares on each row's lasso support (the structure is inside it)
            for name, (admm, targets, _, radius, k, _, _) in blocks.items():
                results["refit_" + name], betas[name] = _solve_block(
                    method, admm, phi, targets, 0.0, radius=radius, n_constrained=k, mode=mode, weights=None,
                    support=betas[name] != 0, beta0=betas[name], factor=factor, zero_tol=zero_tol)
    for w in caught:  # re-emit with the program named
        warnings.warn(f"fit_sim(lam={lam:g}): {w.message}", w.category, stacklevel=2)
    elapsed = time.perf_counter() - t0
    beta_ab, beta_cd = betas["ab"], betas["cd"]
    model = ImplicitModel(n, p, q, phi="relu", kappa=kappa, bias=True, dtype=phi.dtype, device=phi.device, **model_kwargs)
    with torch.no_grad():
        model.A.copy_(beta_ab[:, :n])
        model.B.copy_(beta_ab[:, n:])
        model.C.copy_(beta_cd[:, :n])
        model.D.copy_(beta_cd[:, n:])
        if method == "cvxpy" and not model.is_wellposed():  # interior-point round-off only
            model.project_wellposed()
    return SIMResult(model=model, ab=results["ab"], cd=results["cd"], lam=float(lam), time_s=elapsed,
                     refit_ab=results.get("refit_ab"), refit_cd=results.get("refit_cd"))


def count_nonzeros(model: ImplicitModel, tol: float = 1e-6) -> dict[str, int]:
    """Entries with ``|·| ≥ tol`` in each of ``A, B, C, D`` and in total."""
    out = {k: int((getattr(model, k).detach().abs() >= tol).sum()) for k in "ABCD"}
    out["total"] = sum(out.values())
    return out


def baseline_nonzeros(net: nn.Module, tol: float = 1e-6) -> int:
    """Non-zero weights and biases of the baseline's affine layers (composed layers counted once)."""
    return sum(int((lay.weight.abs() >= tol).sum()) + int((lay.bias.abs() >= tol).sum()) for lay in mlp_layers(net))


def finetune(
    model: ImplicitModel,
    u: Tensor,
    y: Tensor,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 256,
    keep_sparsity: bool = True,
    seed: int = 0,
    log: Optional[Callable[[int, float], None]] = None,
) -> ImplicitModel:
    """Fine-tune a (SIM) model on ``(u, y)`` by cross-entropy with the core's implicit gradient.

    Projected Adam: after every step each row of ``A`` is projected back onto the ℓ1 ball of
    radius κ (well-posedness kept). With ``keep_sparsity`` the gradient is masked to the
    current non-zero pattern of ``(A, B, C, D)``, so the non-zero count cannot grow (and a
    ``structure="feedforward"`` model stays feedforward). ``log(epoch, mean_loss)`` is called
    after each epoch (1-based). Unlike the SIM program, this uses the labels.
    """
    if not (isinstance(epochs, int) and epochs >= 0):
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    params = [model.A, model.B, model.C, model.D]
    masks = [(p.detach() != 0).to(p.dtype) for p in params] if keep_sparsity else None
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
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
        if log is not None:
            log(epoch + 1, total / max(count, 1))
    return model.eval()
