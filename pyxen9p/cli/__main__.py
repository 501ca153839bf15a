"""``python -m pyxen9p.cli``: the :mod:`pyxen9p.cli` command line."""

import sys

from pyxen9p.cli import main

if __name__ == "__main__":
    sys.exit(main())
