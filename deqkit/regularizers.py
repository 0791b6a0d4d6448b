"""Stabilisers of deep equilibrium training: Jacobian regularisation, the spectral-radius monitor
and fixed-point correction.

* :func:`hutchinson_frobenius` — an unbiased Hutchinson estimate of ``‖∂f/∂z‖²_F / d`` at ``z*``
  from Gaussian probes, one vector–Jacobian product each: ``E_ε ‖εᵀJ‖² = tr(JJᵀ) = ‖J‖²_F``
  (Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian Regularization", ICML 2021).
* :class:`JacobianRegularizer` — that estimate as a loss term: weight, the fraction of training
  calls it is applied on, probes, an optional linear warm-up and a switch-off point. Give it to
  :class:`~deqkit.deq.DEQ` (``jac_reg=``); the DEQ puts the estimate, with its graph, in
  ``info.jac_loss``; :class:`~deqkit.train.Trainer` adds ``weight_at(progress) · jac_loss``.
* :func:`spectral_radius` — the spectral radius of ``∂f/∂z`` at ``z*`` by power iteration with
  VJPs only (a monitor: below 1 the solve is locally a contraction).
* :func:`fixed_point_correction` — the loss on several solver iterates with weights
  ``γ^(n−j)``, each iterate differentiated phantom-style through ``k`` damped steps of ``f``
  (Bai, Kolter & Koltun et al., "Deep Equilibrium Optical Flow Estimation", CVPR 2022;
  phantom gradients: Geng et al., "On Training Implicit Models", NeurIPS 2021).

All functions take ``fn: z ↦ f(z, x)`` on batched states ``(B, ...)`` and treat samples
independently (per-sample results have leading dimension ``B``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from ._options import check_fraction, check_int, check_number, validated_options
from .errors import OptionError
from .solvers.base import SolverResult

__all__ = [
    "JacobianRegularizer",
    "hutchinson_frobenius",
    "spectral_radius",
    "fixed_point_correction",
    "unrolled_result",
]

Fn = Callable[[Tensor], Tensor]


def hutchinson_frobenius(
    fn: Fn, z: Tensor, *, probes: int = 1, create_graph: bool = False, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Per-sample Hutchinson estimate of ``‖∂f/∂z‖²_F / d`` at ``z``, shape ``(B,)``.

    Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian Regularization", ICML 2021.
    For Gaussian ``ε ~ N(0, I)``, ``E ‖εᵀJ‖² = ‖J‖²_F``; the estimate averages ``probes`` such
    terms (one VJP each) and divides by the state size ``d``.

    Args:
        fn: ``z ↦ f(z, x)``, evaluated here once with autograd on.
        z: the point (``z*``), ``(B, ...)``; detached here.
        probes: number of Gaussian probes.
        create_graph: keep the graph to the parameters (``True`` for a loss term).
        generator: draws the probes (default: torch's global generator).
    """
    probes = check_int("hutchinson_frobenius", "probes", probes)
    B = z.shape[0]
    with torch.enable_grad():
        z_in = z.detach().requires_grad_()
        fz = fn(z_in)
        d = fz[0].numel()
        total = fz.new_zeros(B)
        for i in range(probes):
            eps = torch.randn(fz.shape, generator=generator, dtype=fz.dtype, device=fz.device)
            (g,) = torch.autograd.grad(fz, z_in, eps, retain_graph=create_graph or i < probes - 1, create_graph=create_graph)
            total = total + g.reshape(B, -1).pow(2).sum(dim=1)
    out = total / (probes * d)
    return out if create_graph else out.detach()


def spectral_radius(fn: Fn, z: Tensor, *, n_iter: int = 20, generator: Optional[torch.Generator] = None) -> Tensor:
    """Per-sample spectral radius of ``J = ∂f/∂z`` at ``z`` by power iteration, shape ``(B,)``.

    Power iteration on ``Jᵀ`` with vector–Jacobian products ``v ↦ vJ`` (``J`` and ``Jᵀ`` have the
    same eigenvalues); the estimate is ``‖v_n J‖ / ‖v_n‖`` after ``n_iter`` normalised steps. It
    converges to ``|λ_max|`` when one real eigenvalue dominates in modulus; with a dominant
    complex pair it oscillates within ``[|λ|·c, |λ|/c]`` (a monitor, not a certificate).
    Bai, Koltun & Kolter (ICML 2021) monitor DEQ stability this way.
    """
    n_iter = check_int("spectral_radius", "n_iter", n_iter)
    B = z.shape[0]
    with torch.enable_grad():
        z_in = z.detach().requires_grad_()
        fz = fn(z_in)
        v = torch.randn(fz.shape, generator=generator, dtype=fz.dtype, device=fz.device)
        est = fz.new_zeros(B)
        for i in range(n_iter):
            v = v / v.reshape(B, -1).norm(dim=1).clamp_min(1e-30).reshape(B, *([1] * (v.dim() - 1)))
            (vj,) = torch.autograd.grad(fz, z_in, v, retain_graph=i < n_iter - 1)
            est = vj.reshape(B, -1).norm(dim=1)
            v = vj
    return est.detach()


def fixed_point_correction(
    fn: Fn, iterates: Sequence[Tensor], loss_fn: Callable[[Tensor], Tensor], *, gamma: float = 0.8, tau: float = 1.0, k: int = 1
) -> Tensor:
    """``Σ_j γ^(n−j) · loss_fn(z̃_j)`` over the solver iterates ``z_1..z_n`` (``z_n`` = ``z*``).

    Bai et al., "Deep Equilibrium Optical Flow Estimation", CVPR 2022 (fixed-point correction).
    Each iterate is detached and differentiated phantom-style (Geng et al., "On Training
    Implicit Models", NeurIPS 2021): ``z̃_j`` is ``k`` damped steps ``z ← (1 − τ) z + τ f(z)`` from
    ``z_j``, with the graph to ``f``'s parameters and input only through those steps.

    Args:
        fn: ``z ↦ f(z, x)`` on the iterates' shape (``info.cell_fn`` of a DEQ call).
        iterates: oldest first (``info.iterates``, which ends with ``z*``).
        loss_fn: ``z ↦`` scalar loss (e.g. cross-entropy of the head).
        gamma: decay in ``(0, 1]``; the last iterate has weight 1.
        tau: damping in ``(0, 1]``.
        k: phantom steps per iterate.
    """
    gamma = check_fraction("fixed_point_correction", "gamma", gamma)
    tau = check_fraction("fixed_point_correction", "tau", tau)
    k = check_int("fixed_point_correction", "k", k)
    if not iterates:
        raise OptionError("fixed_point_correction: no iterates; build the DEQ with keep_iterates=n (n >= 1).")
    n = len(iterates)
    total: Any = 0.0
    for j, zj in enumerate(iterates, start=1):
        z = zj.detach()
        for _ in range(k):
            z = (1 - tau) * z + tau * fn(z) if tau != 1.0 else fn(z)
        total = total + gamma ** (n - j) * loss_fn(z)
    return total  # type: ignore[no-any-return]


def unrolled_result(z: Tensor, fz: Tensor, solver: Any, depth: int) -> SolverResult:
    """A :class:`~deqkit.solvers.SolverResult` describing ``depth`` plain iterations ending at ``z``
    (``fz = f(z)``), judged by ``solver``'s tolerance and stop mode (unrolled pre-training)."""
    B = z.shape[0]
    abs_res = (fz - z).reshape(B, -1).norm(dim=1)
    rel_res = abs_res / (fz.reshape(B, -1).norm(dim=1) + 1e-9)
    stop_mode = getattr(solver, "stop_mode", "rel")
    tol = float(getattr(solver, "tol", 1e-4))
    res = rel_res if stop_mode == "rel" else abs_res
    return SolverResult(
        z=z,
        nstep=torch.full((B,), depth, dtype=torch.long, device=z.device),
        abs_residual=abs_res,
        rel_residual=rel_res,
        converged=res <= tol,
        abs_trace=abs_res[None],
        rel_trace=rel_res[None],
        tol=tol,
        stop_mode=stop_mode,
        max_iter=depth,
        solver="unrolled",
    )


@validated_options
class JacobianRegularizer:
    """Jacobian regularisation: ``weight · ‖∂f/∂z‖²_F / d`` at ``z*``, estimated by Hutchinson.

    Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian Regularization", ICML 2021.

    Args:
        weight: the loss weight (the paper's MDEQ runs use a few tenths).
        freq: the fraction of training calls it is computed on; 1 = every call. Each call's
            draw comes from the DEQ's ``decision_generator`` (the trainers set it to the step's
            generator, a function of ``(seed, global_step)``), else torch's global generator.
        probes: Gaussian probes (VJPs) per estimate.
        warmup: fraction of training over which the weight ramps linearly from 0 (0 = none).
        stop: fraction of training after which the weight is 0 (1 = never switched off).
    """

    def __init__(
        self, weight: float = 0.5, *, freq: float = 1.0, probes: int = 1, warmup: float = 0.0, stop: float = 1.0
    ) -> None:
        owner = type(self).__name__
        self.weight = check_number(owner, "weight", weight, low=0.0)
        self.freq = check_fraction(owner, "freq", freq)
        self.probes = check_int(owner, "probes", probes)
        self.warmup = check_fraction(owner, "warmup", warmup, include_zero=True)
        self.stop = check_fraction(owner, "stop", stop)
        if self.warmup >= self.stop and self.warmup > 0:
            raise OptionError(f"{owner}: warmup ({warmup}) must end before stop ({stop}).")

    def __repr__(self) -> str:
        return (
            f"JacobianRegularizer(weight={self.weight}, freq={self.freq}, probes={self.probes}, "
            f"warmup={self.warmup}, stop={self.stop})"
        )

    def fires(self, generator: Optional[torch.Generator] = None) -> bool:
        """Whether this call computes the term (always with ``freq=1``, drawing nothing).

        Args:
            generator: draws the decision (default: torch's global generator). Under data
                parallelism every rank must decide alike: the trainers pass the step's
                :func:`~deqkit.train.checkpoint.step_generator` (through ``DEQ.decision_generator``).
        """
        if self.freq >= 1.0:
            return True
        device = None if generator is None else generator.device
        return bool(torch.rand((), generator=generator, device=device) < self.freq)

    def weight_at(self, progress: float) -> float:
        """The weight at ``progress`` ∈ [0, 1] of training (warm-up ramp, switched off after ``stop``)."""
        if progress >= self.stop and self.stop < 1.0:
            return 0.0
        if self.warmup > 0 and progress < self.warmup:
            return self.weight * progress / self.warmup
        return self.weight
