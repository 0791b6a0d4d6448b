"""The implicit model ``x = φ(Ax + Bu)``, ``ŷ = Cx + Du`` (El Ghaoui et al., "Implicit Deep
Learning", SIAM J. Math. Data Sci. 2021; Tsai et al., "State-driven Implicit Modeling",
arXiv 2209.09389).

The forward pass is a deqkit :class:`~deqkit.deq.DEQ` over the cell ``z ↦ φ(Az + Bu)``, so the
equilibrium is found by the library's fixed-point solvers and gradients (to ``A, B`` and to the
input ``u``, e.g. for attacks) are the core's implicit gradients. Well-posedness: for a
componentwise 1-Lipschitz φ (ReLU, tanh), ``‖A‖_∞ ≤ κ < 1`` makes the cell a contraction in
ℓ∞, so the fixed point exists, is unique, and Picard iteration converges to it from any start.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._options import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_positive,
    validated_options,
)
from ..errors import OptionError
from .projection import project_l1_ball

__all__ = ["ACTIVATIONS", "WELLPOSED_CRITERIA", "ImplicitModel", "check_kappa"]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "tanh": torch.tanh}
WELLPOSED_CRITERIA = ("inf", "pf")
INITS = ("zeros", "random")


def check_kappa(owner: str, kappa) -> float:
    """The well-posedness margin κ must lie in the open interval (0, 1)."""
    return check_number(owner, "kappa", kappa, low=0.0, high=1.0, low_open=True, high_open=True)


def _resolve_phi(phi: str | Callable[[Tensor], Tensor]) -> tuple[str, Callable[[Tensor], Tensor]]:
    if isinstance(phi, str):
        check_choice("ImplicitModel", "phi", phi, ACTIVATIONS)
        return phi, ACTIVATIONS[phi]
    if phi is F.relu or phi is torch.relu or isinstance(phi, nn.ReLU):
        return "relu", F.relu
    if phi is torch.tanh or isinstance(phi, nn.Tanh):
        return "tanh", torch.tanh
    if callable(phi):
        return getattr(phi, "__name__", type(phi).__name__), phi
    raise OptionError(f"ImplicitModel: phi must be one of {', '.join(map(repr, ACTIVATIONS))} or a callable, got {phi!r}.")


class _ImplicitCell(nn.Module):
    """``cell(z, Bu) = φ(A z + Bu)``; ``Bu`` is computed once per forward, outside the solve."""

    _owner: ImplicitModel

    def __init__(self, owner: ImplicitModel) -> None:
        super().__init__()
        # keep a plain reference (not a submodule) to avoid a module cycle
        object.__setattr__(self, "_owner", owner)

    def parameters(self, recurse: bool = True):  # the DEQ asks whether the cell needs a graph
        return iter([self._owner.A])

    def forward(self, z: Tensor, bu: Tensor) -> Tensor:
        owner = self._owner
        return owner.phi(z @ owner.A.T + bu)


def _default_solver():
    from ..solvers import Anderson

    return Anderson(memory=6, tol=1e-6, max_iter=300, stop_mode="abs")


def _default_grad():
    from ..estimators import Exact

    return Exact()


@validated_options
class ImplicitModel(nn.Module):
    """Implicit model ``x = φ(Ax + Bu)``, ``ŷ = Cx + Du`` with ``n`` states, ``p`` inputs, ``q`` outputs.

    Args:
        n: state size.
        p: input size.
        q: output size.
        phi: activation, ``"relu"`` (default), ``"tanh"`` or a componentwise callable.
        kappa: well-posedness margin, ``0 < κ < 1``: :meth:`project_wellposed` enforces
            ``‖A‖_∞ ≤ κ``.
        bias: if True a constant 1 is appended to the input, so ``B`` is ``(n, p + 1)`` and
            ``D`` is ``(q, p + 1)`` with the biases in their last column.
        solver: a deqkit fixed-point solver (default ``Anderson(memory=6, tol=1e-6, max_iter=300,
            stop_mode="abs")``; plain Picard ``FixedPoint`` also converges when ``‖A‖_∞ ≤ κ``,
            but at rate κ, i.e. slowly for κ = 0.99).
        grad: a deqkit gradient estimator (default ``Exact()``, the implicit gradient).
        init: ``"zeros"`` or ``"random"`` (small Gaussian ``A, B, C, D``, ``A`` projected).

    ``forward(u)`` returns ``ŷ``; :meth:`equilibrium` also returns the state and the solve info.
    Fine-tuning: any optimizer on ``parameters()``, calling :meth:`project_wellposed` after each
    step (projected gradient), as in the SIM paper.
    """

    def __init__(
        self,
        n: int,
        p: int,
        q: int,
        phi: str | Callable[[Tensor], Tensor] = "relu",
        kappa: float = 0.99,
        bias: bool = False,
        solver: Any = None,
        grad: Any = None,
        init: str = "zeros",
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        own = "ImplicitModel"
        self.n, self.p, self.q = (check_int(own, name, val) for name, val in (("n", n), ("p", p), ("q", q)))
        self.kappa = check_kappa(own, kappa)
        self.bias = check_bool(own, "bias", bias)
        check_choice(own, "init", init, INITS)
        self.phi_name, self.phi = _resolve_phi(phi)
        pin = p + 1 if bias else p
        self.A = nn.Parameter(torch.zeros(n, n, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(n, pin, dtype=dtype, device=device))
        self.C = nn.Parameter(torch.zeros(q, n, dtype=dtype, device=device))
        self.D = nn.Parameter(torch.zeros(q, pin, dtype=dtype, device=device))
        if init == "random":
            with torch.no_grad():
                for prm in (self.A, self.B, self.C, self.D):
                    prm.normal_(0.0, 1.0 / math.sqrt(prm.shape[1]))
            self.project_wellposed()
        self.solver = solver if solver is not None else _default_solver()
        self.grad = grad if grad is not None else _default_grad()
        self._deq: Any = None  # built lazily (DEQ validates solver/grad compatibility)

    # ------------------------------------------------------------------ forward
    def _get_deq(self) -> Any:
        # rebuilt when solver or grad were reassigned, so a swap is never silently ignored
        if self._deq is None or self._deq.solver is not self.solver or self._deq.grad is not self.grad:
            try:
                from ..deq import DEQ
            except ImportError:  # pragma: no cover - the package root may export it instead
                from deqkit import DEQ  # type: ignore[attr-defined]
            deq = DEQ(_ImplicitCell(self), solver=self.solver, grad=self.grad, state_shape=(self.n,))
            object.__setattr__(self, "_deq", deq)  # not a submodule: A lives on self
        return self._deq

    def _augment(self, u: Tensor) -> Tensor:
        if u.ndim != 2 or u.shape[1] != self.p:
            raise OptionError(f"ImplicitModel: input must have shape (batch, {self.p}), got {tuple(u.shape)}.")
        if self.bias:
            u = torch.cat([u, torch.ones(u.shape[0], 1, dtype=u.dtype, device=u.device)], dim=1)
        return u

    def equilibrium(self, u: Tensor, x0: Tensor | None = None) -> tuple[Tensor, object]:
        """Return the state ``x`` (``(batch, n)``, implicit gradient attached) and the DEQ info.

        ``x0`` is the solver's starting state (default zeros); for a well-posed model the
        result does not depend on it."""
        u = self._augment(u.reshape(u.shape[0], -1))
        bu = u @ self.B.T
        return self._get_deq()(bu, z0=x0)

    def forward(self, u: Tensor) -> Tensor:
        """``ŷ = C x* + D u`` for inputs ``u`` of shape ``(batch, p)`` (extra dims are flattened)."""
        u = u.reshape(u.shape[0], -1)
        x, _ = self.equilibrium(u)
        return x @ self.C.T + self._augment(u) @ self.D.T

    # ---------------------------------------------------------- well-posedness
    def inf_norm(self) -> float:
        """``‖A‖_∞``, the largest row ℓ1 norm of ``A``."""
        return float(self.A.detach().abs().sum(dim=1).max())

    @torch.no_grad()
    def project_wellposed(self) -> None:
        """Project each row of ``A`` onto the ℓ1 ball of radius κ (nearest point), in place."""
        self.A.copy_(project_l1_ball(self.A.detach(), self.kappa))

    @validated_options
    def is_wellposed(self, criterion: str = "inf", tol: float = 1e-9) -> bool:
        """Sufficient condition for a unique equilibrium (φ componentwise 1-Lipschitz).

        ``"inf"``: ``‖A‖_∞ ≤ κ (+tol)``, the condition SIM enforces; ``"pf"``: the
        Perron-Frobenius eigenvalue of ``|A|`` is ``< 1`` (El Ghaoui et al., Thm. 2.2), weaker,
        and true e.g. for the strictly block-triangular ``A`` of a feed-forward network.
        """
        check_choice("ImplicitModel.is_wellposed", "criterion", criterion, WELLPOSED_CRITERIA)
        tol = check_positive("ImplicitModel.is_wellposed", "tol", tol, allow_zero=True)
        if criterion == "inf":
            return self.inf_norm() <= self.kappa + tol
        ev = torch.linalg.eigvals(self.A.detach().abs().double()).abs().max()
        return float(ev) < 1.0 - tol

    def extra_repr(self) -> str:
        return f"n={self.n}, p={self.p}, q={self.q}, phi={self.phi_name}, kappa={self.kappa}, bias={self.bias}"
