"""``python -m deqkit.bench [flags]``: the same as ``deqkit bench [flags]`` (the benchmark suite).

A command-line shim, not library code: it runs only as ``__main__`` and imports the command
line then (see :mod:`deqkit.cli.bench` for the flags, e.g. ``--device cuda``).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess in tests/test_bench_device.py
    from deqkit.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
