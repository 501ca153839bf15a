"""The record of a 9P request in flight (kept for old imports).

The request table of every transport lives in :mod:`pyxen9p._requests`;
:class:`InFlight` is its :class:`~pyxen9p._requests.Request`.
"""

from __future__ import annotations

from pyxen9p._requests import Request as InFlight

__all__ = ["InFlight"]
