"""A simulated Xen, in pure Python, with the same interfaces as :mod:`pyxen9p.libs`."""
