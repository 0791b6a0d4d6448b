"""Building blocks for DEQ cells: the multiscale MDEQ cell, norm helpers for any cell and
variational dropout (one mask per DEQ call)."""

from .dropout import VariationalDropout
from .mdeq import MDEQCell, MDEQHead, MDEQStem, branch_sizes
from .norms import NORMABLE, apply_spectral_norm, apply_weight_norm

__all__ = [
    "MDEQCell",
    "MDEQHead",
    "MDEQStem",
    "branch_sizes",
    "VariationalDropout",
    "apply_weight_norm",
    "apply_spectral_norm",
    "NORMABLE",
]
