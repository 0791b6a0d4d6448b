"""Exceptions and warnings raised by deqkit.

Every failure of a solve is surfaced through one of these: a non-finite iterate, a solve that
misses its tolerance (when asked to raise), or an invalid option.
"""

from __future__ import annotations


class DEQError(RuntimeError):
    """Base class of the errors deqkit raises at run time."""


class ConvergenceError(DEQError):
    """A solve missed its tolerance within its iteration cap and the caller asked to raise."""


class NonFiniteError(DEQError):
    """A solve produced NaN or Inf values."""


class ConvergenceWarning(UserWarning):
    """A solve missed its tolerance within its iteration cap (the result is still returned)."""
