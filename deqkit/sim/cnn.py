"""Convolutional baselines for SIM: a CNN as an implicit model whose state is its stacked feature maps.

A convolution is a linear map on the flattened feature map (its im2col/Toeplitz matrix), so a
network ``conv → ReLU → conv → ReLU → (Flatten) → Linear`` is an MLP with structured weights,
and :func:`cnn_to_implicit` builds the same implicit model as
:func:`~deqkit.sim.states.mlp_to_implicit` (El Ghaoui et al., "Implicit Deep Learning", §2.3;
Tsai, Decugis, El Ghaoui, Atamtürk, arXiv 2209.09389, which fits implicit models to the states of
convolutional baselines too). Each unit of a feature map reads only its receptive field:
:func:`cnn_support` restricts every row of the SIM program to the previous layer's units in
that field (and, with ``skip_inputs``, to the input pixels in its composed field), so each row
is a small lasso and :func:`~deqkit.sim.fit.fit_sim` (``support=``) solves the rows that share a
field together, never forming the program over all ``n + p + 1`` columns for a row.

Supported layers: ``Conv2d`` (``groups=1``, ``dilation=1``, zero padding given as integers,
any stride and kernel), ``Linear``, ``ReLU``, ``Flatten``, ``Unflatten``, and the no-ops ``Identity`` and
``Dropout`` (eval mode). Fold a BatchNorm into its convolution and replace pooling by a
strided convolution before converting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._options import check_bool, check_int, validated_options
from ..errors import OptionError
from .model import ImplicitModel, check_kappa
from .states import Affine, States, implicit_from_layers, states_from_layers

__all__ = ["CNNLayers", "cnn_layers", "cnn_support", "cnn_to_implicit", "collect_cnn_states", "make_cnn"]

_SUPPORTED = "Conv2d (groups=1, dilation=1, integer zero padding), Linear, ReLU, Flatten, Unflatten, Identity, Dropout"


@validated_options
def make_cnn(
    in_shape: Sequence[int] = (1, 28, 28),
    channels: Sequence[int] = (8, 16),
    q: int = 10,
    kernel_size: int = 3,
    stride: int = 2,
    padding: int = 1,
) -> nn.Sequential:
    """``Conv2d → ReLU → … → Conv2d → ReLU → Flatten → Linear(·, q)`` for inputs of ``in_shape`` (C, H, W)."""
    own = "make_cnn"
    if len(in_shape) != 3:
        raise OptionError(f"{own}: in_shape must be (channels, height, width), got {tuple(in_shape)!r}.")
    for name, v in (("q", q), ("kernel_size", kernel_size), ("stride", stride)):
        check_int(own, name, v)
    check_int(own, "padding", padding, minimum=0)
    if not channels or any(not isinstance(c, int) or c < 1 for c in channels):
        raise OptionError(f"{own}: channels must be a non-empty list of positive ints, got {channels!r}.")
    layers: list[nn.Module] = []
    c, h, w = in_shape
    for c_out in channels:
        layers += [nn.Conv2d(c, c_out, kernel_size, stride=stride, padding=padding), nn.ReLU()]
        h, w = (h + 2 * padding - kernel_size) // stride + 1, (w + 2 * padding - kernel_size) // stride + 1
        if h < 1 or w < 1:
            raise OptionError(f"{own}: the feature maps vanish (input {tuple(in_shape)}, {len(channels)} convolutions).")
        c = c_out
    layers += [nn.Flatten(), nn.Linear(c * h * w, q)]
    return nn.Sequential(*layers)


@dataclass
class CNNLayers:
    """The affine layers of a CNN on flattened features, each with its connectivity pattern.

    ``layers[l]`` is the dense ``(W, b)`` of layer ``l`` (a ReLU between each pair);
    ``patterns[l][i, j]`` is True when output ``i`` of layer ``l`` is connected to input ``j``
    (by the kernel's shape, whatever its values); ``shapes[l]`` the output shape ``(C, H, W)`` or
    ``(features,)``."""

    layers: list[Affine]
    patterns: list[Tensor]
    shapes: list[tuple[int, ...]]


def _conv_dense(mod: nn.Conv2d, shape: tuple[int, ...], owner: str) -> tuple[Affine, Tensor, tuple[int, ...]]:
    if mod.groups != 1 or tuple(mod.dilation) != (1, 1) or mod.padding_mode != "zeros" or isinstance(mod.padding, str):
        raise OptionError(f"{owner}: unsupported Conv2d ({mod}); supported: {_SUPPORTED}.")
    if len(shape) != 3 or shape[0] != mod.in_channels:
        raise OptionError(f"{owner}: Conv2d with {mod.in_channels} input channels got features of shape {shape}.")
    w = mod.weight.detach()
    d_in = shape[0] * shape[1] * shape[2]
    eye = torch.eye(d_in, dtype=w.dtype, device=w.device).reshape(d_in, *shape)
    out = F.conv2d(eye, w, None, mod.stride, mod.padding)
    out_shape = tuple(out.shape[1:])
    weight = out.reshape(d_in, -1).T.contiguous()
    pat = F.conv2d(eye, torch.ones_like(w), None, mod.stride, mod.padding).reshape(d_in, -1).T != 0
    bias = mod.bias.detach() if mod.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    bias = bias[:, None, None].expand(out_shape).reshape(-1).clone()
    return Affine(weight, bias), pat, out_shape


@validated_options
def cnn_layers(net: nn.Module, in_shape: Sequence[int]) -> CNNLayers:
    """The dense affine layers and connectivity patterns of ``net`` for inputs of ``in_shape``.

    Raises OptionError, naming the layer, for anything outside ``Conv2d`` (groups=1,
    dilation=1, integer zero padding), ``Linear``, ``ReLU``, ``Flatten``, ``Identity``, ``Dropout``."""
    own = "cnn_layers"
    shape = tuple(int(s) for s in in_shape)
    modules = list(net) if isinstance(net, nn.Sequential) else [net]
    layers: list[Affine] = []
    patterns: list[Tensor] = []
    shapes: list[tuple[int, ...]] = []
    expect_affine = True
    for mod in modules:
        if isinstance(mod, nn.Unflatten):
            new = tuple(int(v) for v in mod.unflattened_size)
            if int(torch.tensor(new).prod()) != int(torch.tensor(shape).prod()):
                raise OptionError(f"{own}: Unflatten to {new} got features of shape {shape}.")
            shape = new
            continue
        if isinstance(mod, (nn.Identity, nn.Dropout, nn.Flatten)):
            if isinstance(mod, nn.Flatten):
                shape = (int(torch.tensor(shape).prod()),)
            continue
        if isinstance(mod, nn.ReLU):
            if expect_affine:
                raise OptionError(f"{own}: a ReLU must follow a Conv2d or Linear layer (found two in a row, or one first).")
            expect_affine = True
            continue
        if not expect_affine:
            raise OptionError(f"{own}: two affine layers without a ReLU between them; put a ReLU between them.")
        if isinstance(mod, nn.Conv2d):
            aff, pat, shape = _conv_dense(mod, shape, own)
        elif isinstance(mod, nn.Linear):
            d_in = int(torch.tensor(shape).prod())
            if d_in != mod.in_features:
                raise OptionError(f"{own}: Linear({mod.in_features}, …) got {d_in} features (shape {shape}).")
            w = mod.weight.detach()
            b = mod.bias.detach() if mod.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
            aff, pat, shape = Affine(w, b), torch.ones(w.shape, dtype=torch.bool, device=w.device), (w.shape[0],)
        else:
            raise OptionError(
                f"{own}: unsupported layer {type(mod).__name__}; supported: {_SUPPORTED} "
                "(fold BatchNorm into the convolution, replace pooling by a strided convolution)."
            )
        layers.append(aff)
        patterns.append(pat)
        shapes.append(shape)
        expect_affine = False
    if expect_affine or len(layers) < 2:
        raise OptionError(f"{own}: the network must be affine (ReLU affine)+ and end with an affine layer.")
    return CNNLayers(layers, patterns, shapes)


def _in_shape(net: nn.Module, in_shape, owner: str) -> tuple[int, ...]:
    if in_shape is None:
        first = next((m for m in (net if isinstance(net, nn.Sequential) else [net]) if isinstance(m, nn.Conv2d)), None)
        raise OptionError(
            f"{owner}: in_shape (channels, height, width) is required"
            + (f" (the first Conv2d has {first.in_channels} channels)" if first is not None else "")
            + "."
        )
    return tuple(int(s) for s in in_shape)


@validated_options
def cnn_to_implicit(net: nn.Module, in_shape: Sequence[int], kappa: float = 0.99) -> ImplicitModel:
    """The implicit model that reproduces ``net`` exactly; its state is the stacked feature maps
    (last layer first, each flattened as ``(C, H, W)``), rescaled so ``‖A‖_∞ ≤ κ``."""
    kappa = check_kappa("cnn_to_implicit", kappa)
    return implicit_from_layers(cnn_layers(net, _in_shape(net, in_shape, "cnn_to_implicit")).layers, kappa)


@validated_options
def collect_cnn_states(
    net: nn.Module, u: Tensor, in_shape: Sequence[int] | None = None, kappa: float = 0.99, dtype: torch.dtype | None = None
) -> States:
    """:func:`~deqkit.sim.states.collect_states` for a CNN: inputs ``u`` of shape ``(m, C, H, W)``
    (or flattened, with ``in_shape``). ``reference_nnz`` counts the non-zeros of the dense
    (unrolled) convolution matrices, i.e. of the exact implicit form."""
    kappa = check_kappa("collect_cnn_states", kappa)
    if in_shape is None and u.ndim == 4:
        in_shape = tuple(u.shape[1:])
    cl = cnn_layers(net, _in_shape(net, in_shape, "collect_cnn_states"))
    st = states_from_layers(cl.layers, u, kappa, dtype)
    st.layer_sizes = tuple(int(lay.weight.shape[0]) for lay in cl.layers[:-1])
    st.reference_nnz = max(
        1, sum(int((lay.weight.abs() >= 1e-6).sum()) + int((lay.bias.abs() >= 1e-6).sum()) for lay in cl.layers)
    )
    return st


@validated_options
def cnn_support(
    net: nn.Module, in_shape: Sequence[int], skip_inputs: bool = False, output_skip: bool = False
) -> tuple[Tensor, Tensor]:
    """Boolean masks ``(support_ab, support_cd)`` over ``Φ = [X U 1]`` for ``fit_sim(support=...)``.

    Row ``i`` of ``(A, B)`` (a unit of hidden layer ``l``) may use the units of layer ``l − 1``
    in its receptive field (the input pixels for ``l = 1``) and the bias; ``skip_inputs`` also
    lets a deeper unit read the input pixels of its composed receptive field. Rows of ``(C, D)``
    read the last hidden layer as the output layer does (``output_skip``: and every input).
    """
    check_bool("cnn_support", "skip_inputs", skip_inputs)
    check_bool("cnn_support", "output_skip", output_skip)
    cl = cnn_layers(net, _in_shape(net, in_shape, "cnn_support"))
    sizes = [int(lay.weight.shape[0]) for lay in cl.layers[:-1]]
    n, p, q = sum(sizes), int(cl.layers[0].weight.shape[1]), int(cl.layers[-1].weight.shape[0])
    d = n + p + 1
    offsets, pos = {}, 0
    for l in range(len(sizes), 0, -1):  # stacked last layer first, as mlp_to_implicit
        offsets[l] = pos
        pos += sizes[l - 1]
    ab = torch.zeros(n, d, dtype=torch.bool)
    field = None  # composed receptive field on the input
    for l in range(1, len(sizes) + 1):
        pat = cl.patterns[l - 1].cpu()
        rows = slice(offsets[l], offsets[l] + sizes[l - 1])
        field = pat if field is None else (pat.double() @ field.double()) > 0
        if l == 1:
            ab[rows, n : n + p] = pat
        else:
            ab[rows, offsets[l - 1] : offsets[l - 1] + sizes[l - 2]] = pat
            if skip_inputs:
                ab[rows, n : n + p] = field
        ab[rows, n + p] = True
    cd = torch.zeros(q, d, dtype=torch.bool)
    cd[:, offsets[len(sizes)] : offsets[len(sizes)] + sizes[-1]] = cl.patterns[-1].cpu()
    if output_skip:
        cd[:, n : n + p] = True
    cd[:, n + p] = True
    return ab, cd
