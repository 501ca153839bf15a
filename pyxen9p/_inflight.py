"""The record of a 9P request in flight, shared by the Xen and stream transports."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

from pyxen9p.errors import ProtocolError

__all__ = ["InFlight"]

_RLERROR = 7
_RERROR = 107


@dataclass
class InFlight:
    """One 9P request sent and not yet answered.

    :ivar tag: its tag
    :ivar type: its message type (the reply must be ``type + 1`` or an error)
    :ivar future: resolved with the reply's bytes, or an exception
    :ivar abandoned: the caller stopped waiting (the tag stays reserved)
    """

    tag: int
    type: int
    future: Future[bytes] = field(default_factory=Future)
    abandoned: bool = False

    def wrong_reply(self, mtype: int) -> ProtocolError | None:
        """The error for a reply of type *mtype* to this request, or ``None``
        if that type may answer it (``type + 1``, Rlerror or Rerror).

        Every transport raises this same :class:`~pyxen9p.errors.ProtocolError`.
        """
        if mtype in (self.type + 1, _RLERROR, _RERROR):
            return None
        return ProtocolError(
            f"reply of type {mtype} to a request of type {self.type} (tag {self.tag})"
        )
