"""The one error/warning hierarchy of deqkit, and the one failure policy.

Every failure is surfaced through one of these classes, in core, ``deqkit.bilevel`` and
``deqkit.sim`` alike:

- :class:`OptionError` — an invalid option or argument (a ``ValueError``, raised at
  construction or call time, naming the class, the option, the value and what is allowed);
- :class:`ConvergenceError` / :class:`ConvergenceWarning` — an iterative solve missed its
  tolerance within its iteration cap (raised or warned according to ``on_failure``);
- :class:`NonFiniteError` — a solve produced NaN or Inf (always raised unless a solver's own
  option, such as ``on_nonfinite="freeze"``, says otherwise);
- :class:`PrecisionWarning` — a requested tolerance is below what the dtype resolves (it was
  raised to the dtype's floor; see :mod:`deqkit.solvers.precision`).

``on_failure`` is the one spelling of the failure policy everywhere: ``"warn"`` (default),
``"raise"`` or ``"ignore"``; whatever the policy, the result object records what happened
(``converged``, ``nstep``, residuals). :func:`apply_failure_policy` is the helper every
module calls.
"""

from __future__ import annotations

import warnings
from typing import Literal

__all__ = [
    "DEQError",
    "OptionError",
    "ConvergenceError",
    "NonFiniteError",
    "ConvergenceWarning",
    "PrecisionWarning",
    "FAILURE_POLICIES",
    "FailurePolicy",
    "apply_failure_policy",
]


class DEQError(RuntimeError):
    """Base class of the errors deqkit raises at run time."""


class OptionError(DEQError, ValueError):
    """An invalid option or argument: the message names the owner, the option, the value and what is allowed.

    A ``ValueError`` too, so ``except ValueError`` keeps working.
    """


class ConvergenceError(DEQError):
    """A solve missed its tolerance within its iteration cap and the caller asked to raise."""


class NonFiniteError(DEQError):
    """A solve produced NaN or Inf values."""


class ConvergenceWarning(UserWarning):
    """A solve missed its tolerance within its iteration cap (the result is still returned)."""


class PrecisionWarning(UserWarning):
    """A requested tolerance is below what the computation's dtype can resolve (it was raised)."""


FailurePolicy = Literal["warn", "raise", "ignore"]
#: the values of every ``on_failure`` option in deqkit
FAILURE_POLICIES: tuple[str, ...] = ("warn", "raise", "ignore")


def apply_failure_policy(policy: str, message: str, *, stacklevel: int = 2) -> None:
    """Act on a missed tolerance according to ``policy`` (an ``on_failure`` value).

    ``"raise"``: :class:`ConvergenceError` with ``message``; ``"warn"``: a
    :class:`ConvergenceWarning`; ``"ignore"``: nothing (the result still records it).
    ``stacklevel`` counts from the caller of this function, as in :func:`warnings.warn`.
    """
    if policy == "raise":
        raise ConvergenceError(message)
    if policy == "warn":
        warnings.warn(message, ConvergenceWarning, stacklevel=stacklevel + 1)
    elif policy != "ignore":
        raise OptionError(f"on_failure={policy!r} is not valid; choose one of {', '.join(map(repr, FAILURE_POLICIES))}.")
