"""``python -m asge_edge`` is the ``asge-edge`` command."""

import sys

from .cli import main

sys.exit(main())
