"""ctypes bindings over the real Xen C libraries.

* :mod:`pyxen9p.libs.xengnttab`: grant tables (``libxengnttab.so.1``)
* :mod:`pyxen9p.libs.xenevtchn`: event channels (``libxenevtchn.so.1``)
* :mod:`pyxen9p.libs.xenstore`: XenStore (``libxenstore.so.4``, or ``.so.3.0``)

Each library is loaded on first use, by its exact SONAME, or from the path in
``PYXEN9P_LIBXENGNTTAB`` / ``PYXEN9P_LIBXENEVTCHN`` / ``PYXEN9P_LIBXENSTORE``,
or from a ``library=`` argument (a path or a loaded :class:`ctypes.CDLL`).
:class:`RealXen` hands out handles of all three as a
:class:`~pyxen9p.interfaces.XenPlatform`.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from pyxen9p.libs.xenevtchn import EventChannel
from pyxen9p.libs.xengnttab import GrantSharer, GrantTable
from pyxen9p.libs.xenstore import XenStore

__all__ = ["EventChannel", "GrantSharer", "GrantTable", "RealXen", "XenStore"]

_Lib = str | os.PathLike[str] | ctypes.CDLL | None


@dataclass(frozen=True)
class RealXen:
    """The real Xen of the running domain, through the C libraries.

    :ivar gnttab_library: ``library=`` for :mod:`~pyxen9p.libs.xengnttab`
    :ivar evtchn_library: ``library=`` for :mod:`~pyxen9p.libs.xenevtchn`
    :ivar xenstore_library: ``library=`` for :mod:`~pyxen9p.libs.xenstore`
    """

    gnttab_library: _Lib = None
    evtchn_library: _Lib = None
    xenstore_library: _Lib = None

    def open_xenstore(self) -> XenStore:
        """Open a :class:`~pyxen9p.libs.xenstore.XenStore` connection."""
        return XenStore(library=self.xenstore_library)

    def open_grant_sharer(self) -> GrantSharer:
        """Open a :class:`~pyxen9p.libs.xengnttab.GrantSharer`."""
        return GrantSharer(library=self.gnttab_library)

    def open_grant_table(self) -> GrantTable:
        """Open a :class:`~pyxen9p.libs.xengnttab.GrantTable`."""
        return GrantTable(library=self.gnttab_library)

    def open_event_channel(self) -> EventChannel:
        """Open an :class:`~pyxen9p.libs.xenevtchn.EventChannel`."""
        return EventChannel(library=self.evtchn_library)
