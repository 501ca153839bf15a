"""pyxen9p: the Xen 9pfs transport and a 9P2000.L client, in user space.

Importing the package loads no C library; each Xen library is loaded on first
use.
"""

from pyxen9p._version import __version__

__all__ = ["__version__"]
