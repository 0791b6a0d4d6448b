"""``python -m deqkit``: the ``deqkit`` command."""

import sys

from deqkit.cli import main

sys.exit(main())
