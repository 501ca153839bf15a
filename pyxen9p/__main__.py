"""``python -m pyxen9p``: the :mod:`pyxen9p.cli` command line."""

from __future__ import annotations

import sys

from pyxen9p.cli import main

if __name__ == "__main__":
    sys.exit(main())
