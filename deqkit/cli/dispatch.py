"""The ``deqkit`` command: one parser with a sub-command per application, and the error boundary.

Every sub-command module (``deqkit.cli.compare``, ``train``, ``sim``, ``hpo``, ``bench``)
registers its flags with ``add_subparser`` and runs through ``args.func``. At this boundary:

* a usage error, an option error, a missing data set or an unreadable input file becomes one
  line ``deqkit: error: ...`` on stderr and exit status 2 (never a traceback);
* an operating-system error while reading or writing (disk full, permissions) becomes one line
  ``deqkit: error: ...`` and exit status 1; files written before it are intact (every output is
  written atomically);
* ``Ctrl-C`` (SIGINT) and ``SIGTERM`` are the same request: a training run finishes its step and
  checkpoints; the command then exits with one line saying what was kept and how to continue
  (status 130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any, Optional

from ..data import DatasetNotFoundError
from . import bench, compare, hpo, sim, train
from .options import HelpFormatter, Parser

COMMANDS = (compare, train, sim, hpo, bench)


def build_parser() -> argparse.ArgumentParser:
    """The ``deqkit`` parser with every sub-command."""
    parser = Parser(
        prog="deqkit",
        description="Deep equilibrium and implicit models, with every cheap gradient estimator one switch apart.",
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_subparser(sub)
    return parser


class _Terminate:
    """SIGTERM handled as Ctrl-C: the handler forwards to whatever handles SIGINT at that moment
    (the trainer's deferred-interrupt guard, or Python's default, which raises
    ``KeyboardInterrupt``) and remembers that it was a SIGTERM (for the exit status)."""

    def __init__(self) -> None:
        self.received = False
        self._previous: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = True
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:  # SIG_IGN / SIG_DFL for SIGINT: stop here all the same
            raise KeyboardInterrupt

    def __enter__(self) -> _Terminate:
        if threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handler)
                self._installed = True
            except (ValueError, OSError):
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)


def interrupt_message(args: argparse.Namespace, terminated: bool) -> str:
    """What an interrupted command kept and how to continue it (true for each command)."""
    what = "terminated (SIGTERM)" if terminated else "interrupted"
    out = getattr(args, "out", None)
    if not out:
        return f"deqkit: {what}; nothing was saved (no --out)."
    if getattr(args, "command", None) == "bench":
        return f"deqkit: {what}; the benchmark has no resume, re-run it."
    kept = {
        "train": f"the last checkpoint in {out} is kept",
        "compare": f"finished runs and the last checkpoint of the current one in {out} are kept",
        "sim": f"every finished λ in {out} is kept",
        "hpo": f"every finished estimator in {out} is kept",
    }.get(getattr(args, "command", ""), f"what {out} holds is kept")
    return f"deqkit: {what}; {kept}. Re-run the same command with --resume to continue."


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``deqkit`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    term = _Terminate()
    try:
        with term:
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\n" + interrupt_message(args, term.received), file=sys.stderr)
        return 143 if term.received else 130
    except (ValueError, DatasetNotFoundError) as err:  # option errors (OptionError), missing data, unreadable files
        print(f"deqkit: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, permissions: the environment, not the input
        print(f"deqkit: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
