"""The ``deqkit`` command line: ``deqkit {compare,train,sim,hpo,bench}``.

Thin layers over the applications in :mod:`deqkit.apps` and the library; the shared flag
vocabulary and the option parser are in :mod:`deqkit.cli.options`.
"""

from .dispatch import build_parser, main

__all__ = ["build_parser", "main"]
