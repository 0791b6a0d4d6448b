"""The one vocabulary of the ``deqkit`` commands: shared flag groups, list parsers, the
``key=value`` option parser and the help formatter.

Every command builds its parser from these pieces, so the same idea has the same flag
everywhere:

==================  =====================================================================
flag                meaning
==================  =====================================================================
``--dataset``       the data set (each command lists the ones it accepts)
``--data-dir``      directory with the IDX files (fashion-mnist, mnist)
``--seed``          the random seed
``--device``        torch device
``--threads``       torch CPU threads
``--epochs``        training epochs (of the DEQ; of the baseline MLP in ``sim``)
``--lr``            learning rate (idem)
``--solver``        the forward fixed-point solver (``train``; ``compare`` always uses Broyden)
``--solver-opts``   its options, ``key=value,...``
``--grad``          the gradient estimator: one name (``train``), a comma list (``compare``,
                    ``hpo``: one run per name)
``--grad-opts``     the estimator options, ``key=value,...``
``--fit-solver``    ``sim``'s solver of the SIM program (admm, cvxpy)
``--out``           output directory
``--resume``        continue from what ``--out`` holds
``--no-progress``   no per-step progress output (bars, per-step lines)
==================  =====================================================================

Option strings (``--solver-opts tol=1e-4,max_iter=30``) go through :func:`parse_options`,
which refuses a non-numeric or non-finite value for a numeric option with an
:class:`~deqkit.errors.OptionError`; ``deqkit.cli.dispatch`` turns that into one line
``deqkit: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, Optional

from .._options import check_int, check_number
from ..errors import OptionError

__all__ = [
    "HelpFormatter",
    "Number",
    "Parser",
    "NUMERIC_OPTIONS",
    "add_parser",
    "register",
    "pick",
    "add_data_group",
    "add_runtime_group",
    "add_output_group",
    "comma_list",
    "finite_float",
    "floats",
    "fraction",
    "ints",
    "nonneg_int",
    "positive_float",
    "positive_int",
    "option_kinds",
    "parse_options",
]

#: Options of the shared vocabulary that are numbers wherever they appear (so ``tol=abc`` is
#: refused even where a constructor's default for ``tol`` is ``None``).
NUMERIC_OPTIONS: dict[str, type] = {"tol": float, "max_iter": int, "memory": int, "opa_freq": int, "seed": int}

_WORDS = {"true": True, "false": False, "none": None}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends ``(default: X)`` to every option;
    list defaults are shown as the comma list one would type."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return text + " (default: %(default)s)"

    def _expand_help(self, action: argparse.Action) -> str:
        shown = action.default
        if isinstance(shown, (list, tuple)):
            shown = ",".join(map(str, shown))
        elif shown == "":
            shown = "''"
        if shown is not action.default:
            action = argparse.Action(action.option_strings, action.dest, default=shown, help=action.help)
        return super()._expand_help(action)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line, ``deqkit: error: ...``, exit status 2
    (the same form as the errors raised after parsing), naming the command's ``--help``.

    Flags must be spelled in full (``allow_abbrev=False``): ``--epoch 3`` is an error, not
    ``--epochs 3``, so a flag added later cannot silently change what an old command line means."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(2, f"deqkit: error: {' '.join(message.split())} (see: {self.prog} --help)\n")


class Number:
    """An argparse ``type=``: an integer (``kind=int``) or a finite float within bounds; anything
    else (a word, ``nan``, ``inf``, out of range) is argparse's one-line usage error.

    The bounds are attributes, so tests can walk every numeric flag of every command and try
    values outside them.
    """

    def __init__(
        self,
        kind: type,
        *,
        low: Optional[float] = None,
        high: Optional[float] = None,
        low_open: bool = False,
        high_open: bool = False,
        words: tuple[str, ...] = (),
    ) -> None:
        self.kind, self.low, self.high, self.low_open, self.high_open = kind, low, high, low_open, high_open
        self.words = words  # also taken as they are (e.g. "auto")
        self.__name__ = "integer" if kind is int else "number"

    def describe(self) -> str:
        lo = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        hi = "" if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"
        want = " and ".join(s for s in (lo, hi) if s)
        words = "".join(f" or {w!r}" for w in self.words)
        return ("an integer" if self.kind is int else "a finite number") + (f" {want}" if want else "") + words

    def __call__(self, text: str) -> Any:
        if text.strip() in self.words:
            return text.strip()
        try:
            value = self.kind(text.strip())
        except (TypeError, ValueError):
            value = None
        bad = value is None or (self.kind is float and not math.isfinite(value))
        if not bad and value is not None and self.low is not None:
            bad = value < self.low or (self.low_open and value == self.low)
        if not bad and value is not None and self.high is not None:
            bad = value > self.high or (self.high_open and value == self.high)
        if bad:
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}")
        return value

    def __repr__(self) -> str:
        return f"Number({self.describe()})"


#: the numeric argparse types of the commands
positive_int = Number(int, low=1)
nonneg_int = Number(int, low=0)
positive_float = Number(float, low=0.0, low_open=True)
finite_float = Number(float)
#: a fraction in (0, 1]
fraction = Number(float, low=0.0, high=1.0, low_open=True)


def add_parser(subparsers: Any, name: str, *, help: str, description: str) -> argparse.ArgumentParser:
    """A sub-command parser with the shared :class:`HelpFormatter`."""
    return subparsers.add_parser(name, help=help, description=description, formatter_class=HelpFormatter)


def register(
    subparsers: Any,
    name: str,
    *,
    help: str,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], Any],
    run: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    """Add sub-command ``name`` with the flags of ``add_arguments``, run by ``run``; returns its parser."""
    p = add_parser(subparsers, name, help=help, description=description)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def pick(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """``{name: args.name}`` for the flags a config takes under the same name."""
    return {n: getattr(args, n) for n in names}


# ------------------------------------------------------------------------------------------------
# value parsers (argparse ``type=`` callables: a bad value is argparse's one-line usage error)
# ------------------------------------------------------------------------------------------------


def floats(text: str) -> list[float]:
    """``"0.1,1"`` → ``[0.1, 1.0]``: finite, non-negative numbers."""
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not vals or any(v < 0 or not math.isfinite(v) for v in vals):
        raise argparse.ArgumentTypeError(f"expected finite non-negative numbers, got {text!r}")
    return vals


def ints(text: str) -> list[int]:
    """``"64,32"`` → ``[64, 32]``: positive integers."""
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def comma_list(valid: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma list of names from ``valid`` (duplicates dropped, order kept)."""

    def parse(text: str) -> list[str]:
        vals = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
        bad = [v for v in vals if v not in valid]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"invalid {', '.join(bad) or repr(text)}; valid: {', '.join(valid)}")
        return vals

    return parse


# ------------------------------------------------------------------------------------------------
# key=value option strings
# ------------------------------------------------------------------------------------------------


def option_kinds(factory: Optional[Callable[..., Any]]) -> dict[str, type]:
    """``name → int | float`` for the numeric options of ``factory`` (a class or function): those
    whose default is a number, plus the vocabulary's :data:`NUMERIC_OPTIONS` it accepts."""
    kinds: dict[str, type] = {}
    if factory is None:
        return kinds
    target = factory.__init__ if isinstance(factory, type) else factory  # type: ignore[misc]
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return kinds
    for name, p in params.items():
        default = p.default
        if isinstance(default, bool):
            continue
        if isinstance(default, int):
            kinds[name] = int
        elif isinstance(default, float):
            kinds[name] = float
        elif name in NUMERIC_OPTIONS:
            kinds[name] = NUMERIC_OPTIONS[name]
    return kinds


def _scalar(raw: str) -> Any:
    """``"5"`` → 5, ``"1e-4"`` → 1e-4, ``"true"`` → True, ``"none"`` → None, else the string."""
    word = raw.lower()
    if word in _WORDS:
        return _WORDS[word]
    for convert in (int, float):
        try:
            return convert(raw)
        except ValueError:
            pass
    return raw


def parse_options(text: str, flag: str, factory: Optional[Callable[..., Any]] = None) -> dict[str, Any]:
    """``"k=5,damping=0.5"`` → ``{"k": 5, "damping": 0.5}``; dashes in keys become underscores.

    Values are integers, finite floats, ``true``/``false``, ``none`` or words. A numeric
    option (see :func:`option_kinds` of ``factory``, and :data:`NUMERIC_OPTIONS` always) must be
    a finite number (an integer where the default is one) or ``none``. Unknown keys are left to
    ``factory``'s own check (which names the valid ones).

    Raises:
        OptionError: a malformed item, or a bad value, in one line naming ``flag``.
    """
    kinds = {**NUMERIC_OPTIONS, **option_kinds(factory)}
    opts: dict[str, Any] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not raw.strip():
            raise OptionError(f"{flag} expects key=value pairs separated by commas (e.g. memory=20,tol=1e-4); got {item!r}.")
        value = _scalar(raw.strip())
        kind = kinds.get(key)
        if value is None:  # "none": the option's off state, left to the constructor's own check
            pass
        elif kind is int:
            value = check_int(flag, key, value, minimum=0)
        elif kind is float or isinstance(value, float):
            value = check_number(flag, key, value)
        opts[key] = value
    return opts


# ------------------------------------------------------------------------------------------------
# shared flag groups
# ------------------------------------------------------------------------------------------------


def add_data_group(
    p: argparse.ArgumentParser, datasets: Sequence[str], *, default: str, data_dir: bool = True
) -> argparse._ArgumentGroup:
    """``--dataset`` (and ``--data-dir``)."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=list(datasets), default=default, help="the data set")
    if data_dir:
        g.add_argument("--data-dir", default=None, help="directory with the four IDX files (fashion-mnist, mnist)")
    return g


def add_runtime_group(
    p: argparse.ArgumentParser,
    *,
    device: bool = True,
    threads_default: Optional[int] = None,
    threads_help: str = "torch CPU threads (None: 1 on CPU, the fastest for these small models)",
) -> argparse._ArgumentGroup:
    """``--seed``, ``--threads`` (and ``--device``)."""
    g = p.add_argument_group("runtime")
    g.add_argument("--seed", type=nonneg_int, default=0, help="random seed")
    if device:
        g.add_argument(
            "--device", default="cpu", help="torch device: cpu, cuda, cuda:N, mps, or auto (cuda when available, else cpu)"
        )
    g.add_argument("--threads", type=positive_int, default=threads_default, help=threads_help)
    return g


def add_output_group(
    p: argparse.ArgumentParser, *, out: Optional[str], resume: Optional[str] = None, plot: bool = False
) -> argparse._ArgumentGroup:
    """``--out``, ``--no-progress`` (and ``--resume``, ``--no-plot``)."""
    g = p.add_argument_group("output")
    g.add_argument(
        "--out", default=out, help="output directory (refused when it holds an earlier run, unless --resume or --overwrite)"
    )
    if resume:
        g.add_argument("--resume", action="store_true", help=resume)
        g.add_argument(
            "--overwrite",
            action="store_true",
            help="start over in an --out that holds an earlier run (its deqkit outputs are deleted first)",
        )
    if plot:
        g.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    g.add_argument("--no-progress", action="store_true", help="no per-step progress output")
    return g
