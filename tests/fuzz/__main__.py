"""``python -m fuzz`` (from ``tests/``): see :mod:`fuzz.runner`."""

import sys

from fuzz.runner import main

sys.exit(main())
