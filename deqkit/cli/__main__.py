"""``python -m deqkit.cli``: the ``deqkit`` command."""

import sys

from .dispatch import main

sys.exit(main())
