"""The ``deqkit`` command: one parser with a sub-command per application, and the error boundary.

Every sub-command module (``deqkit.cli.compare``, ``train``, ``sim``, ``hpo``, ``bench``)
registers its flags with ``add_subparser`` and runs through ``args.func``. At this boundary an
option error, a missing data set or a malformed file becomes one line ``deqkit: error: ...`` on
stderr and exit status 2 (never a traceback); ``Ctrl-C`` exits with 130.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..data import DatasetNotFoundError
from . import bench, compare, hpo, sim, train
from .options import HelpFormatter

COMMANDS = (compare, train, sim, hpo, bench)


def build_parser() -> argparse.ArgumentParser:
    """The ``deqkit`` parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="deqkit",
        description="Deep equilibrium and implicit models, with every cheap gradient estimator one switch apart.",
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_subparser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``deqkit`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ndeqkit: interrupted; the last checkpoint (if any) is kept. Re-run with --resume to continue.", file=sys.stderr)
        return 130
    except (ValueError, DatasetNotFoundError) as err:  # option errors (OptionError), missing data: one clear line
        message = " ".join(str(err).split("\n"))
        print(f"deqkit: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
