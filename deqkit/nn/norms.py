"""Weight normalisation and spectral normalisation for chosen submodules of any DEQ cell.

Both are ``torch.nn.utils.parametrize`` parametrisations, so a :class:`~deqkit.deq.DEQ` computes
the normalised weights **once per call** (inside ``parametrize.cached()``) and every solver
iteration, the estimator's evaluations and the backward pass share them: the map being solved
does not change between iterations (spectral norm's power iteration would otherwise move it).
Parametrised modules survive ``copy.deepcopy`` (EMA copies) and ``state_dict`` round trips.

* weight norm: ``W = g · V / ‖V‖`` per output unit (Salimans & Kingma, "Weight Normalization",
  NeurIPS 2016), what MDEQ uses (Bai, Koltun & Kolter, "Multiscale Deep Equilibrium Models",
  NeurIPS 2020);
* spectral norm: ``W = scale · W / σ_max(W)`` by power iteration (Miyato et al., "Spectral
  Normalization for Generative Adversarial Networks", ICLR 2018); ``σ_max`` is that of the
  weight viewed as a matrix, a bound on a linear layer's Lipschitz constant (not exactly the
  operator norm of a convolution).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize

from .._options import check_int, check_positive, unknown_option_message
from ..errors import OptionError

__all__ = ["apply_weight_norm", "apply_spectral_norm", "NORMABLE"]

#: the module types normalised when no names are given
NORMABLE: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _Scale(nn.Module):
    """Multiply a (spectrally normalised) weight by a constant."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = float(scale)

    def forward(self, w: Tensor) -> Tensor:
        return w * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def _targets(owner: str, module: nn.Module, names: Optional[Sequence[str]], types: Sequence[type]) -> list[tuple[str, nn.Module]]:
    if not isinstance(module, nn.Module):
        raise OptionError(f"{owner}: module must be an nn.Module, got {type(module).__name__}.")
    named: dict[str, nn.Module] = dict(module.named_modules())
    if names is None:
        found = [(n, m) for n, m in named.items() if isinstance(m, tuple(types)) and not parametrize.is_parametrized(m, "weight")]
        if not found:
            raise OptionError(
                f"{owner}: {type(module).__name__} has no un-normalised {', '.join(t.__name__ for t in types)} submodule."
            )
        return found
    if isinstance(names, str):
        names = [names]
    out = []
    candidates = [n for n, m in named.items() if isinstance(getattr(m, "weight", None), Tensor)]
    for n in names:
        if n not in named:
            raise OptionError(unknown_option_message(owner, n, candidates).replace("option", "submodule"))
        m = named[n]
        if not isinstance(getattr(m, "weight", None), Tensor):
            raise OptionError(f"{owner}: submodule {n!r} ({type(m).__name__}) has no weight to normalise.")
        if parametrize.is_parametrized(m, "weight"):
            raise OptionError(f"{owner}: submodule {n!r} is already normalised.")
        out.append((n, m))
    return out


def apply_weight_norm(
    module: nn.Module, names: Optional[Sequence[str]] = None, *, types: Sequence[type] = NORMABLE, dim: int = 0
) -> nn.Module:
    """Weight-normalise ``module``'s submodules (in place; returns ``module``).

    Salimans & Kingma, "Weight Normalization", NeurIPS 2016.

    Args:
        module: any cell.
        names: submodule names (as in ``named_modules()``) to normalise; ``None``: every
            submodule of one of ``types`` not yet normalised.
        types: the module types picked when ``names`` is ``None``.
        dim: the dimension kept (0: one norm per output unit / channel).

    The weights are unchanged at the time of the call (``g = ‖V‖``).
    """
    for _, m in _targets("apply_weight_norm", module, names, types):
        parametrizations.weight_norm(m, dim=dim)
    return module


def apply_spectral_norm(
    module: nn.Module,
    names: Optional[Sequence[str]] = None,
    *,
    types: Sequence[type] = NORMABLE,
    scale: float = 1.0,
    n_power_iterations: int = 1,
) -> nn.Module:
    """Spectrally normalise ``module``'s submodules to ``scale · W / σ_max(W)`` (in place; returns it).

    Miyato et al., "Spectral Normalization for Generative Adversarial Networks", ICLR 2018.

    Args:
        module: as :func:`apply_weight_norm`.
        names: as :func:`apply_weight_norm`.
        types: as :func:`apply_weight_norm`.
        scale: the spectral norm kept (``< 1`` for a contractive linear map).
        n_power_iterations: power-iteration steps per weight evaluation (in training mode;
            once per DEQ call).
    """
    scale = check_positive("apply_spectral_norm", "scale", scale)
    n_power_iterations = check_int("apply_spectral_norm", "n_power_iterations", n_power_iterations)
    for _, m in _targets("apply_spectral_norm", module, names, types):
        parametrizations.spectral_norm(m, n_power_iterations=n_power_iterations)
        if scale != 1.0:
            parametrize.register_parametrization(m, "weight", _Scale(scale))
    return module
