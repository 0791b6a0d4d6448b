"""Ready-made DEQ cells and classifiers: injection → equilibrium layer → head.

A deep equilibrium model (Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019)
replaces a stack of weight-tied layers by the fixed point ``z* = f(z*, u)`` of one cell ``f``,
where ``u`` is the input *injection* (computed once per input, outside the solve). This module
provides two cells and a classifier that wires them up:

* :class:`MLPCell` — flat states ``(B, width)``:
  ``f(z, u) = norm(act(W z + u))`` (or, with ``hidden=h``, ``norm(act(u + W₂ act(W₁ z + b₁)))``).
* :class:`ConvCell` — image states ``(B, C, H, W)``, the residual cell of the DEQ tutorial
  (Kolter, Duvenaud & Johnson, "Deep Implicit Layers", NeurIPS 2020 tutorial, chapter 4):
  ``y = GN(relu(conv₁ z))``, ``f(z, u) = GN(relu(z + GN(u + conv₂ y)))``.
* :class:`DEQClassifier` — ``logits = head(DEQ(cell)(injection(x)))``, with the constructors
  :meth:`DEQClassifier.mlp` and :meth:`DEQClassifier.conv`.

Every normalisation is per sample (LayerNorm / GroupNorm, never BatchNorm): the solvers and
gradient estimators treat each sample's fixed-point system separately, so the cell must not
mix samples.

Well-posedness at initialisation: the weights acting on ``z`` start small (``MLPCell``: spectral
norm ``init_scale``; ``ConvCell``: ``N(0, init_std²)`` as in the tutorial), so ``f`` is a
contraction in ``z`` and the fixed point exists and is found in a few solver steps. Training can
lose that property; :class:`MLPCell` offers two guards: ``spectral_norm=True`` keeps
``‖W‖₂ = spectral_scale < 1`` throughout training (with ``norm=None`` and a 1-Lipschitz
activation ``f`` is then a ``spectral_scale``-contraction: a unique fixed point, always), and
``weight_norm=True`` (Salimans & Kingma 2016, used by Bai et al. 2019) decouples the scale of
each row from its direction. For models with a certified unique fixed point under training,
see monotone operator equilibrium networks (Winston & Kolter, "Monotone operator equilibrium
networks", NeurIPS 2020), which parametrise ``W = (1 − m) I − AᵀA + B − Bᵀ``; they are not
implemented here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from ._options import check_choice, check_fraction, check_int, check_positive, unknown_option_message, validated_options
from .deq import DEQ, DEQInfo, InitPolicy
from .errors import OptionError
from .estimators import GradientEstimator
from .solvers import Solver

__all__ = ["MLPCell", "ConvCell", "DEQClassifier", "NORMS", "ACTIVATIONS"]

#: accepted values of ``norm`` (``None`` and ``"none"`` both mean no normalisation)
NORMS: tuple[Optional[str], ...] = ("layer", "group", None, "none")
#: accepted values of ``activation``
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "elu": nn.ELU}

#: the keywords of :class:`DEQClassifier`'s constructors (the rest go to the cell)
_CLASSIFIER_OPTIONS = ("solver", "grad", "eval_max_iter", "on_failure")


def _check_cell_options(owner: str, cell: type, options: dict[str, Any], own: Sequence[str]) -> None:
    """Refuse a keyword that neither the constructor (``own``) nor ``cell`` takes, with a
    "did you mean"; the cell's positional sizes are the constructor's, not options."""
    positional = ("width", "input_dim", "channels")
    valid = [*own, *(k for k in getattr(cell, "valid_options", ()) if k not in positional)]
    for key in options:
        if key not in valid:
            raise OptionError(unknown_option_message(owner, key, valid))


def _norm_layer(owner: str, norm: Optional[str], width: int, groups: int) -> nn.Module:
    check_choice(owner, "norm", norm, NORMS)
    if norm == "layer":
        return nn.LayerNorm(width)
    if norm == "group":
        if width % groups:
            raise OptionError(f"{owner}: groups={groups} must divide the width {width} for norm='group'.")
        return nn.GroupNorm(groups, width)
    return nn.Identity()


class _ScaledSpectralNorm(nn.Module):
    """A linear layer whose weight is ``scale · W / σ_max(W)`` (power iteration, Miyato et al. 2018)."""

    def __init__(self, linear: nn.Linear, scale: float) -> None:
        super().__init__()
        self.linear = parametrizations.spectral_norm(linear)
        self.scale = float(scale)

    def forward(self, z: Tensor) -> Tensor:
        out = torch.nn.functional.linear(z, cast(Tensor, self.linear.weight)) * self.scale
        bias = cast(Optional[Tensor], self.linear.bias)
        return out if bias is None else out + bias


def _small_linear(
    owner: str, n_in: int, n_out: int, *, bias: bool, scale: float, weight_norm: bool, spectral_norm: bool, spectral_scale: float
) -> nn.Module:
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        sigma = torch.linalg.matrix_norm(lin.weight, ord=2)
        lin.weight.mul_(scale / sigma)
        if bias:
            lin.bias.zero_()
    if spectral_norm:
        return _ScaledSpectralNorm(lin, spectral_scale)
    if weight_norm:
        return parametrizations.weight_norm(lin)
    return lin


@validated_options
class MLPCell(nn.Module):
    """DEQ cell for flat states: ``f(z, u) = norm(act(W z + u))``.

    Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019 (the cell is the
    weight-tied layer whose infinite-depth limit the DEQ solves for).

    Args:
        width: size of the state ``z`` (and of the injection ``u``).
        input_dim: ``None`` (default): the second argument of ``forward`` is the injection
            ``u`` itself, shape ``(B, width)``, computed outside the solve (cheaper; what
            :meth:`DEQClassifier.mlp` does). An integer: the cell owns the injection
            ``u = U x + b`` with ``x`` of shape ``(B, input_dim)`` (recomputed at every solver
            step; then give the DEQ ``state_shape=(width,)``).
        hidden: ``None`` (default) for the one-layer form above, or a hidden size ``h`` for
            ``f(z, u) = norm(act(u + W₂ act(W₁ z + b₁)))`` with ``W₁: width→h``, ``W₂: h→width``.
        norm: ``"layer"`` (default), ``"group"`` (``groups`` groups) or ``None``: a per-sample
            normalisation of the output. It bounds the fixed point (``‖z*‖ ≈ √width``).
        groups: number of groups for ``norm="group"`` (must divide ``width``).
        activation: ``"relu"`` (default), ``"tanh"``, ``"gelu"`` or ``"elu"``.
        weight_norm: reparametrise the ``z``-weights by weight normalisation.
        spectral_norm: keep the ``z``-weights at spectral norm ``spectral_scale`` throughout
            training (overrides ``weight_norm``); with ``norm=None`` this makes ``f`` a
            contraction for any parameters.
        spectral_scale: the spectral norm kept by ``spectral_norm`` (in (0, 1]).
        init_scale: spectral norm of the ``z``-weight at initialisation (each of ``W₁, W₂``
            gets ``√init_scale`` with ``hidden``). The default 0.25 makes ``f`` contractive at
            init for unit-scale injections.
        bias: whether the ``z``-weights have biases (zero at init).
    """

    def __init__(
        self,
        width: int,
        input_dim: Optional[int] = None,
        *,
        hidden: Optional[int] = None,
        norm: Optional[str] = "layer",
        groups: int = 8,
        activation: str = "relu",
        weight_norm: bool = False,
        spectral_norm: bool = False,
        spectral_scale: float = 0.9,
        init_scale: float = 0.25,
        bias: bool = True,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_int(owner, "width", width)
        if input_dim is not None:
            check_int(owner, "input_dim", input_dim)
        if hidden is not None:
            check_int(owner, "hidden", hidden)
        check_int(owner, "groups", groups)
        check_choice(owner, "activation", activation, ACTIVATIONS)
        check_positive(owner, "init_scale", init_scale)
        check_fraction(owner, "spectral_scale", spectral_scale)
        self.width, self.input_dim, self.hidden = int(width), input_dim, hidden
        self.norm_kind = None if norm == "none" else norm
        self.inject = None if input_dim is None else nn.Linear(input_dim, width)
        lin = functools.partial(
            _small_linear, owner, bias=bias, weight_norm=weight_norm, spectral_norm=spectral_norm, spectral_scale=spectral_scale
        )
        if hidden is None:
            self.linear = lin(width, width, scale=init_scale)
            self.linear2: Optional[nn.Module] = None
        else:
            self.linear = lin(width, hidden, scale=math.sqrt(init_scale))
            self.linear2 = lin(hidden, width, scale=math.sqrt(init_scale))
        self.act = ACTIVATIONS[activation]()
        self.norm = _norm_layer(owner, self.norm_kind, width, groups)

    def extra_repr(self) -> str:
        return f"width={self.width}, input_dim={self.input_dim}, hidden={self.hidden}, norm={self.norm_kind!r}"

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        u = x if self.inject is None else self.inject(x)
        if u.shape != z.shape:
            raise ValueError(
                f"MLPCell: the injection has shape {tuple(u.shape)} but the state has shape {tuple(z.shape)}; "
                f"pass u of shape (B, {self.width}) or build the cell with input_dim=... to inject raw inputs."
            )
        if self.linear2 is None:
            h = self.linear(z) + u
        else:
            h = u + self.linear2(self.act(self.linear(z)))
        return self.norm(self.act(h))


@validated_options
class ConvCell(nn.Module):
    """Residual convolutional DEQ cell for image states ``(B, C, H, W)``.

    ``y = GN(relu(conv₁ z))``, ``f(z, u) = GN(relu(z + GN(u + conv₂ y)))`` with the injection
    ``u`` of the state's shape. The cell of the "Deep Implicit Layers" tutorial (Kolter,
    Duvenaud & Johnson, NeurIPS 2020), itself the building block of (M)DEQ
    (Bai, Kolter & Koltun, NeurIPS 2019), with GroupNorm throughout so samples never interact.

    Args:
        channels: channels of the state.
        hidden_channels: channels after ``conv₁`` (default ``channels``).
        groups: GroupNorm groups (must divide ``channels`` and ``hidden_channels``).
        kernel_size: odd convolution size (same padding).
        init_std: the convolution weights start as ``N(0, init_std²)`` (small: contraction at init).
    """

    def __init__(
        self,
        channels: int,
        *,
        hidden_channels: Optional[int] = None,
        groups: int = 8,
        kernel_size: int = 3,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_int(owner, "channels", channels)
        hidden_channels = channels if hidden_channels is None else hidden_channels
        check_int(owner, "hidden_channels", hidden_channels)
        check_int(owner, "groups", groups)
        check_int(owner, "kernel_size", kernel_size)
        check_positive(owner, "init_std", init_std)
        if kernel_size % 2 == 0:
            raise OptionError(f"{owner}: kernel_size must be odd (same padding), got {kernel_size}.")
        for name, c in (("channels", channels), ("hidden_channels", hidden_channels)):
            if c % groups:
                raise OptionError(f"{owner}: groups={groups} must divide {name}={c}.")
        pad = kernel_size // 2
        self.channels, self.hidden_channels, self.groups, self.kernel_size = channels, hidden_channels, groups, kernel_size
        self.conv1 = nn.Conv2d(channels, hidden_channels, kernel_size, padding=pad, bias=False)
        self.conv2 = nn.Conv2d(hidden_channels, channels, kernel_size, padding=pad, bias=False)
        self.norm1 = nn.GroupNorm(groups, hidden_channels)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.norm3 = nn.GroupNorm(groups, channels)
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.weight, 0.0, init_std)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        if x.shape != z.shape:
            raise ValueError(
                f"ConvCell: the injection has shape {tuple(x.shape)} but the state has shape {tuple(z.shape)}; "
                f"the injection must map inputs to (B, {self.channels}, H, W)."
            )
        y = self.norm1(torch.relu(self.conv1(z)))
        return self.norm3(torch.relu(z + self.norm2(x + self.conv2(y))))


class _AsImage(nn.Module):
    """Reshape flat inputs ``(B, prod(shape))`` to ``(B, *shape)``; image-shaped inputs pass through."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) == self.shape:
            return x
        if x.dim() == 2 and x.shape[1] == math.prod(self.shape):
            return x.reshape(x.shape[0], *self.shape)
        raise ValueError(f"expected inputs of shape (B, {', '.join(map(str, self.shape))}) or flat, got {tuple(x.shape)}.")

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


@validated_options
class DEQClassifier(nn.Module):
    """``logits = head(z*)``, ``z* = cell(z*, injection(x))``: a deep equilibrium classifier.

    Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019. The injection runs once per
    input; the equilibrium layer (:class:`~deqkit.deq.DEQ`) runs the forward ``solver`` and
    attaches the ``grad`` estimator's backward; the head maps the equilibrium to logits.

    Args:
        cell: the DEQ cell ``f(z, u)`` (e.g. :class:`MLPCell`, :class:`ConvCell`).
        injection: ``x ↦ u`` (e.g. a linear layer); ``u`` is passed to the cell.
        head: ``z* ↦ logits``.
        solver: the forward solver (default: that of :class:`~deqkit.deq.DEQ`).
        grad: the gradient estimator (default: that of :class:`~deqkit.deq.DEQ`).
        state_shape: per-sample shape of ``z`` (default: the shape of ``u``).
        init: passed to :class:`~deqkit.deq.DEQ`.
        eval_max_iter: passed to :class:`~deqkit.deq.DEQ`.
        on_failure: what a forward solve that misses its tolerance does: ``"warn"``,
            ``"raise"`` or ``"ignore"`` (the DEQ's failure policy).

    Attributes:
        deq: the equilibrium layer; ``deq.solver`` / ``deq.grad`` can be swapped between calls.
        last_info: the :class:`~deqkit.deq.DEQInfo` of the latest forward call (its
            ``backward`` field is filled in once ``loss.backward()`` has run).

    ``forward(x, return_info=False, target=None)`` returns the logits, or ``(logits, info)``.
    """

    def __init__(
        self,
        cell: nn.Module,
        injection: nn.Module,
        head: nn.Module,
        *,
        solver: Optional[Solver] = None,
        grad: Optional[GradientEstimator] = None,
        state_shape: Optional[Sequence[int]] = None,
        init: InitPolicy = "zeros",
        eval_max_iter: Optional[int] = None,
        on_failure: str = "warn",
    ) -> None:
        super().__init__()
        for name, mod in (("cell", cell), ("injection", injection), ("head", head)):
            if not isinstance(mod, nn.Module):
                raise OptionError(f"DEQClassifier: {name} must be an nn.Module, got {type(mod).__name__}.")
        self.injection = injection
        self.deq = DEQ(cell, solver, grad, state_shape=state_shape, init=init, eval_max_iter=eval_max_iter, on_failure=on_failure)
        self.head = head
        self.last_info: Optional[DEQInfo] = None

    @property
    def cell(self) -> nn.Module:
        return self.deq.cell

    def forward(
        self, x: Tensor, return_info: bool = False, target: Optional[Tensor] = None
    ) -> Union[Tensor, tuple[Tensor, DEQInfo]]:
        """Logits for ``x`` (or ``(logits, info)`` with ``return_info=True``).

        ``target`` (class indices), in training mode, gives the forward solver the training
        loss ``z ↦ cross_entropy(head(z), target)``, which a solver with outer-problem awareness
        (``Broyden(opa_freq=k)``, SHINE-OPA, Ramzi et al. ICLR 2022) uses; other solvers ignore it.
        :class:`~deqkit.train.Trainer` passes it.
        """
        loss_fn = (
            (lambda z: torch.nn.functional.cross_entropy(self.head(z), target)) if target is not None and self.training else None
        )
        z, info = self.deq(self.injection(x), loss_fn=loss_fn)
        self.last_info = info
        logits = self.head(z)
        return (logits, info) if return_info else logits

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def mlp(
        cls,
        input_dim: int,
        width: int,
        num_classes: int,
        *,
        solver: Optional[Solver] = None,
        grad: Optional[GradientEstimator] = None,
        eval_max_iter: Optional[int] = None,
        on_failure: str = "warn",
        **cell_options: Any,
    ) -> DEQClassifier:
        """An MLP DEQ: ``u = U flatten(x) + b``, ``z* = MLPCell(z*, u)``, ``logits = C z* + c``.

        ``input_dim`` is the number of input features (inputs of any shape ``(B, ...)`` are
        flattened); ``cell_options`` are those of :class:`MLPCell` (``hidden``, ``norm``,
        ``groups``, ``activation``, ``weight_norm``, ``spectral_norm``, ``spectral_scale``,
        ``init_scale``, ``bias``; not ``input_dim``: the injection is the classifier's).
        """
        owner = "DEQClassifier.mlp"
        _check_cell_options(owner, MLPCell, cell_options, _CLASSIFIER_OPTIONS)
        check_int(owner, "input_dim", input_dim)
        check_int(owner, "num_classes", num_classes)
        cell = MLPCell(width, **cell_options)
        injection = nn.Sequential(nn.Flatten(), nn.Linear(input_dim, width))
        head = nn.Linear(width, num_classes)
        return cls(cell, injection, head, solver=solver, grad=grad, eval_max_iter=eval_max_iter, on_failure=on_failure)

    @classmethod
    def conv(
        cls,
        input_shape: Sequence[int],
        channels: int,
        num_classes: int,
        *,
        solver: Optional[Solver] = None,
        grad: Optional[GradientEstimator] = None,
        pool: int = 4,
        eval_max_iter: Optional[int] = None,
        on_failure: str = "warn",
        **cell_options: Any,
    ) -> DEQClassifier:
        """A convolutional DEQ for images ``(B, C_in, H, W)`` (flat inputs are reshaped).

        Injection ``u = GN(conv₃ₓ₃(x))`` to ``channels``; ``z* = ConvCell(z*, u)``; head:
        adaptive average pooling to ``pool × pool``, flatten, linear. ``input_shape`` is
        ``(C_in, H, W)`` (``Splits.input_shape``), e.g. ``(1, 28, 28)`` or ``(1, 8, 8)``.
        ``cell_options`` are those of :class:`ConvCell` (``hidden_channels``, ``groups``,
        ``kernel_size``, ``init_std``); ``groups`` and ``kernel_size`` also shape the injection.
        """
        owner = "DEQClassifier.conv"
        _check_cell_options(owner, ConvCell, cell_options, (*_CLASSIFIER_OPTIONS, "pool"))
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise OptionError(f"{owner}: input_shape must be (C, H, W), got {tuple(input_shape)!r}.")
        check_int(owner, "channels", channels)
        check_int(owner, "num_classes", num_classes)
        check_int(owner, "pool", pool)
        cell = ConvCell(channels, **cell_options)
        groups, kernel_size = cell.groups, cell.kernel_size
        injection = nn.Sequential(
            _AsImage(shape),
            nn.Conv2d(shape[0], channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.GroupNorm(groups, channels),
        )
        p = min(pool, shape[1], shape[2])
        head = nn.Sequential(nn.AdaptiveAvgPool2d(p), nn.Flatten(), nn.Linear(channels * p * p, num_classes))
        return cls(cell, injection, head, solver=solver, grad=grad, eval_max_iter=eval_max_iter, on_failure=on_failure)

    @classmethod
    def mdeq(
        cls,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        channels: Sequence[int] = (16, 32),
        stem_stride: Optional[int] = None,
        pool: int = 2,
        solver: Optional[Solver] = None,
        grad: Optional[GradientEstimator] = None,
        eval_max_iter: Optional[int] = None,
        on_failure: str = "warn",
        **cell_options: Any,
    ) -> DEQClassifier:
        """A multiscale DEQ (MDEQ) for images ``(B, C_in, H, W)`` (flat inputs are reshaped).

        Bai, Koltun & Kolter, "Multiscale Deep Equilibrium Models", NeurIPS 2020. The stem
        (:class:`~deqkit.nn.MDEQStem`, stride ``stem_stride``) injects the image into every
        branch, once per call; ``z*`` is a tuple with one feature map per branch
        (:class:`~deqkit.nn.MDEQCell`, ``channels`` highest resolution first); the head
        (:class:`~deqkit.nn.MDEQHead`) pools each branch to ``pool × pool`` and applies a linear
        layer. ``cell_options`` are :class:`~deqkit.nn.MDEQCell`'s (``hidden_ratio``, ``groups``,
        ``dropout``, ``weight_norm``, ``init_std``, ``residual``); ``groups`` also shapes the stem.
        ``stem_stride`` (1, 2, 4 or 8) defaults to 4 for images at least 24 pixels a side
        (28×28 → branches at 7×7 and 4×4, what trains on a CPU), else 1.
        """
        from .nn import MDEQCell, MDEQHead, MDEQStem, branch_sizes

        owner = "DEQClassifier.mdeq"
        _check_cell_options(owner, MDEQCell, cell_options, (*_CLASSIFIER_OPTIONS, "channels", "stem_stride", "pool"))
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise OptionError(f"{owner}: input_shape must be (C, H, W), got {tuple(input_shape)!r}.")
        check_int(owner, "num_classes", num_classes)
        if stem_stride is None:
            stem_stride = 4 if min(shape[1], shape[2]) >= 24 else 1
        check_int(owner, "stem_stride", stem_stride)
        cell = MDEQCell(channels, **cell_options)
        h0, w0 = shape[1], shape[2]
        for _ in range(stem_stride.bit_length() - 1):  # the stem's stride-2 convolutions
            h0, w0 = (h0 - 1) // 2 + 1, (w0 - 1) // 2 + 1
        state_shape = tuple((c, h, w) for c, (h, w) in zip(cell.channels, branch_sizes(h0, w0, len(cell.channels))))
        injection = nn.Sequential(_AsImage(shape), MDEQStem(shape[0], cell.channels, stride=stem_stride, groups=cell.groups))
        head = MDEQHead(cell.channels, num_classes, pool=pool)
        return cls(
            cell,
            injection,
            head,
            solver=solver,
            grad=grad,
            state_shape=state_shape,  # type: ignore[arg-type]
            eval_max_iter=eval_max_iter,
            on_failure=on_failure,
        )
