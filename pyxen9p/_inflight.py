"""The record of a 9P request in flight, shared by the Xen and stream transports."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

__all__ = ["InFlight"]


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
