"""States of a trained explicit network, and its exact implicit form (SIM, Tsai et al.,
arXiv 2209.09389, §3; El Ghaoui et al., "Implicit Deep Learning", §2.3).

An ``nn.Sequential`` of affine layers and ReLUs ``x_l = relu(W_l x_{l-1} + b_l)``,
``ŷ = W_L x_{L-1} + b_L`` is the implicit model with the states stacked last layer first,
``x = (x_{L-1}, …, x_1)``: then ``A`` holds ``W_2 … W_{L-1}`` above its block diagonal
(strictly block upper triangular, nilpotent), ``B = [W_1 b_1; 0 b_2; …]`` on the input with a
constant 1 appended, ``C = [W_L 0 …]``, ``D = [0 b_L]``.

ReLU is positively homogeneous, so hidden layer ``l`` may be rescaled by ``s_l > 0``
(``W_l ← (s_l/s_{l-1}) W_l``, ``b_l ← s_l b_l``, ``W_L ← W_L / s_{L-1}``) without changing the
outputs; the scales are chosen so every block row of ``A`` has ``‖·‖_∞ ≤ κ``, i.e. the
baseline itself is a feasible point of the well-posed SIM program.

Layer types are converted by handlers in :data:`LAYER_HANDLERS` (``Linear``; ``Flatten``,
``Identity`` and ``Dropout`` as no-ops in eval mode; ``ReLU`` as the activation); add a type
with :func:`register_layer`, e.g. a convolution as its dense (im2col/Toeplitz) matrix.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._options import validated_options
from ..errors import OptionError
from .model import ImplicitModel, check_kappa

__all__ = [
    "LAYER_HANDLERS",
    "Activation",
    "Affine",
    "NoOp",
    "States",
    "collect_states",
    "implicit_from_layers",
    "layer_scales",
    "mlp_layers",
    "mlp_to_implicit",
    "register_layer",
    "states_from_layers",
]


@validated_options
@dataclass
class Affine:
    """An affine map ``x ↦ W x + b`` on flattened features."""

    weight: Tensor
    bias: Tensor


class Activation:
    """Marker for the network's activation (ReLU)."""


class NoOp:
    """Marker for a layer that is the identity on flattened features (in eval mode)."""


LayerHandler = Callable[[nn.Module], Affine | Activation | NoOp]


def _linear(mod: nn.Module) -> Affine:
    assert isinstance(mod, nn.Linear)
    w = mod.weight.detach()
    b = mod.bias.detach() if mod.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    return Affine(w, b)


LAYER_HANDLERS: dict[type, LayerHandler] = {
    nn.Linear: _linear,
    nn.ReLU: lambda mod: Activation(),
    nn.Flatten: lambda mod: NoOp(),
    nn.Identity: lambda mod: NoOp(),
    nn.Dropout: lambda mod: NoOp(),
}


@validated_options
def register_layer(layer_type: type, handler: LayerHandler) -> None:
    """Teach :func:`mlp_layers` a new layer type: ``handler(module)`` returns an
    :class:`Affine` (dense ``W``, ``b`` on flattened features), :class:`Activation` or :class:`NoOp`."""
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise OptionError(f"register_layer: layer_type must be an nn.Module subclass, got {layer_type!r}.")
    if not callable(handler):
        raise OptionError(f"register_layer: handler must be callable, got {handler!r}.")
    LAYER_HANDLERS[layer_type] = handler


def _handler(mod: nn.Module, owner: str) -> LayerHandler:
    """The handler of ``mod``'s exact type, else of its nearest registered base type."""
    if isinstance(mod, nn.Sequential):
        raise OptionError(f"{owner}: nested nn.Sequential is not supported; flatten it first.")
    handler = next((h for t, h in LAYER_HANDLERS.items() if type(mod) is t), None)
    if handler is None:
        handler = next((h for t, h in LAYER_HANDLERS.items() if isinstance(mod, t)), None)
    if handler is None:
        raise OptionError(
            f"{owner}: unsupported layer {type(mod).__name__}; supported: "
            + ", ".join(t.__name__ for t in LAYER_HANDLERS)
            + " (add one with deqkit.sim.register_layer)."
        )
    return handler


def _affine_groups(net: nn.Module, owner: str) -> list[list[Affine]]:
    """The affine layers of ``net`` grouped between activations (no-op layers dropped)."""
    modules = list(net) if isinstance(net, nn.Sequential) else [net]
    groups: list[list[Affine]] = [[]]
    last_act = True
    for mod in modules:
        kind = _handler(mod, owner)(mod)
        if isinstance(kind, NoOp):
            continue
        if isinstance(kind, Activation):
            if last_act:
                raise OptionError(f"{owner}: an activation must follow an affine layer (found two in a row, or one first).")
            groups.append([])
            last_act = True
        else:
            groups[-1].append(kind)
            last_act = False
    if last_act:
        raise OptionError(f"{owner}: the network must end with an affine layer (the output layer).")
    return groups


def _compose(group: list[Affine], owner: str) -> Affine:
    """One affine map equal to the consecutive affine layers of ``group``."""
    w, b = group[0].weight, group[0].bias
    for nxt in group[1:]:
        if nxt.weight.shape[1] != w.shape[0]:
            raise OptionError(f"{owner}: consecutive affine layers have mismatched shapes.")
        w, b = nxt.weight @ w, nxt.weight @ b + nxt.bias
    return Affine(w, b)


def _mlp_layers(net: nn.Module, owner: str) -> list[Affine]:
    layers = [_compose(g, owner) for g in _affine_groups(net, owner)]
    if len(layers) < 2:
        raise OptionError(f"{owner}: the network needs at least one hidden layer (affine, ReLU, affine).")
    for a, b in itertools.pairwise(layers):
        if b.weight.shape[1] != a.weight.shape[0]:
            raise OptionError(f"{owner}: layer shapes do not chain: {tuple(a.weight.shape)} then {tuple(b.weight.shape)}.")
    return layers


def mlp_layers(net: nn.Module) -> list[Affine]:
    """The affine layers ``[(W_1, b_1), …, (W_L, b_L)]`` of ``net``, a ReLU between each pair.

    Consecutive affine layers are composed. Raises OptionError for an unsupported layer, two
    activations in a row, an activation first or last, or a network without hidden layer.
    """
    return _mlp_layers(net, "mlp_layers")


@validated_options
def layer_scales(layers: list[Affine], kappa: float = 0.99) -> list[float]:
    """Scales ``s_1 … s_{L-1}`` of the hidden layers: ``s_1 = 1``,
    ``s_l = s_{l-1}·min(1, κ/‖W_l‖_∞)`` so each block of ``A`` has ``‖·‖_∞ ≤ κ``."""
    kappa = check_kappa("layer_scales", kappa)
    scales = [1.0]
    for lay in layers[1:-1]:
        norm = float(lay.weight.abs().sum(dim=1).max())
        scales.append(scales[-1] * (min(1.0, kappa / norm) if norm > 0 else 1.0))
    return scales


@validated_options
def mlp_to_implicit(net: nn.Module, kappa: float = 0.99, *, solver: Any = None, grad: Any = None) -> ImplicitModel:
    """The ImplicitModel (``bias=True``, ReLU) that reproduces ``net`` exactly, rescaled so
    ``‖A‖_∞ ≤ κ``. ``solver`` and ``grad`` are the model's fixed-point solver and gradient
    estimator (defaults: those of :class:`ImplicitModel`)."""
    kappa = check_kappa("mlp_to_implicit", kappa)
    return implicit_from_layers(_mlp_layers(net, "mlp_to_implicit"), kappa, solver=solver, grad=grad)


def implicit_from_layers(layers: list[Affine], kappa: float = 0.99, *, solver: Any = None, grad: Any = None) -> ImplicitModel:
    """The ImplicitModel of the affine layers ``layers`` (a ReLU between each pair), rescaled
    so ``‖A‖_∞ ≤ κ`` (see :func:`mlp_to_implicit`)."""
    scales = layer_scales(layers, kappa)
    hidden = [lay.weight.shape[0] for lay in layers[:-1]]
    p, q = layers[0].weight.shape[1], layers[-1].weight.shape[0]
    n = sum(hidden)
    ref = layers[0].weight
    model = ImplicitModel(
        n, p, q, phi="relu", kappa=kappa, bias=True, dtype=ref.dtype, device=ref.device, solver=solver, grad=grad
    )
    # offsets of hidden layer l (1-based) in the stacked state (last layer first)
    L1 = len(hidden)
    offsets = {}
    pos = 0
    for l in range(L1, 0, -1):
        offsets[l] = pos
        pos += hidden[l - 1]
    with torch.no_grad():
        for l in range(1, L1 + 1):
            lay, s = layers[l - 1], scales[l - 1]
            rows = slice(offsets[l], offsets[l] + hidden[l - 1])
            if l == 1:
                model.B[rows, :p] = s * lay.weight
            else:
                cols = slice(offsets[l - 1], offsets[l - 1] + hidden[l - 2])
                model.A[rows, cols] = (s / scales[l - 2]) * lay.weight
            model.B[rows, p] = s * lay.bias
        out = layers[-1]
        cols = slice(offsets[L1], offsets[L1] + hidden[L1 - 1])
        model.C[:, cols] = out.weight / scales[L1 - 1]
        model.D[:, p] = out.bias
    return model


@validated_options
@dataclass
class States:
    """Stacked states of ``m`` samples (batch-first; the paper's matrices transposed).

    ``U`` ``(m, p)`` inputs (without the constant 1), ``Z`` ``(m, n)`` pre-activations,
    ``X = φ(Z)`` ``(m, n)`` states, ``Y`` ``(m, q)`` outputs, all in the rescaled coordinates
    of :func:`mlp_to_implicit`, so ``Z = X Aᵀ + [U 1] Bᵀ`` and ``Y = X Cᵀ + [U 1] Dᵀ``.
    ``layer_sizes`` are the baseline's hidden widths, layer 1 first (needed only by
    ``fit_sim(structure="feedforward")``). ``reference_nnz`` is the number of non-zero weights
    and biases of the baseline (the denominator of ``fit_sim(density=...)``; ``None``: unknown).
    """

    U: Tensor
    Z: Tensor
    X: Tensor
    Y: Tensor
    kappa: float
    layer_sizes: tuple[int, ...] = ()
    reference_nnz: int | None = None

    def __post_init__(self) -> None:
        self.kappa = check_kappa("States", self.kappa)
        for name in "UZXY":
            t = getattr(self, name)
            if not isinstance(t, Tensor) or t.ndim != 2 or t.shape[0] != self.U.shape[0]:
                raise OptionError(
                    f"States: {name} must be a 2-D tensor with one row per sample "
                    f"({self.U.shape[0]}), got {getattr(t, 'shape', type(t).__name__)}."
                )
        if self.Z.shape != self.X.shape:
            raise OptionError(f"States: Z and X must have the same shape, got {tuple(self.Z.shape)} and {tuple(self.X.shape)}.")
        self.layer_sizes = tuple(self.layer_sizes)
        if self.reference_nnz is not None and (
            isinstance(self.reference_nnz, bool) or not isinstance(self.reference_nnz, int) or self.reference_nnz < 1
        ):
            raise OptionError(f"States: reference_nnz must be a positive int or None, got {self.reference_nnz!r}.")

    def state_layers(self) -> Tensor:
        """The hidden layer (1-based, layer 1 reads the input) of each state, in the stacking
        order of ``X`` (last layer first), shape ``(n,)``. Needs ``layer_sizes``."""
        n = self.X.shape[1]
        if sum(self.layer_sizes) != n:
            raise OptionError(
                f"States.state_layers: these States do not record their layers (layer_sizes={self.layer_sizes!r} for {n} states); "
                "collect them with collect_states(), or set layer_sizes to the hidden widths, layer 1 first"
            )
        ids = [l for l in range(len(self.layer_sizes), 0, -1) for _ in range(self.layer_sizes[l - 1])]
        return torch.tensor(ids, device=self.X.device)

    @property
    def phi(self) -> Tensor:
        """The regressors ``Φ = [X U 1]`` of the state-matching program, ``(m, n + p + 1)``."""
        ones = torch.ones(self.U.shape[0], 1, dtype=self.U.dtype, device=self.U.device)
        return torch.cat([self.X, self.U, ones], dim=1)


@validated_options
@torch.no_grad()
def collect_states(net: nn.Module, u: Tensor, kappa: float = 0.99, dtype: torch.dtype | None = None) -> States:
    """Run ``u`` (``(m, …)``, flattened) through ``net``'s layers and stack its rescaled states."""
    kappa = check_kappa("collect_states", kappa)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise OptionError(f"collect_states: dtype must be a torch.dtype or None, got {dtype!r}.")
    return states_from_layers(_mlp_layers(net, "collect_states"), u, kappa, dtype)


@torch.no_grad()
def states_from_layers(
    layers: list[Affine], u: Tensor, kappa: float = 0.99, dtype: torch.dtype | None = None, batch_size: int = 2048
) -> States:
    """:func:`collect_states` for a network given as its affine layers (a ReLU between each pair)."""
    scales = layer_scales(layers, kappa)
    dtype = dtype or layers[0].weight.dtype
    uu = u.reshape(u.shape[0], -1).to(dtype)
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    for i in range(0, uu.shape[0], batch_size):  # a batch at a time: conv layers have large dense matrices
        h = uu[i : i + batch_size]
        zs, xs = [], []
        for l, lay in enumerate(layers[:-1]):
            z = h @ lay.weight.to(dtype).T + lay.bias.to(dtype)
            h = torch.relu(z)
            zs.append(scales[l] * z)
            xs.append(scales[l] * h)
        y_b = h @ layers[-1].weight.to(dtype).T + layers[-1].bias.to(dtype)
        parts.append((torch.cat(zs[::-1], dim=1), torch.cat(xs[::-1], dim=1), y_b))
    Z = torch.cat([p[0] for p in parts], 0)
    X = torch.cat([p[1] for p in parts], 0)
    y = torch.cat([p[2] for p in parts], 0)
    sizes = tuple(int(lay.weight.shape[0]) for lay in layers[:-1])
    nnz = sum(int((lay.weight.abs() >= 1e-6).sum()) + int((lay.bias.abs() >= 1e-6).sum()) for lay in layers)
    return States(U=uu, Z=Z, X=X, Y=y, kappa=kappa, layer_sizes=sizes, reference_nnz=max(nnz, 1))
