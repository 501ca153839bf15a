"""Shared pieces of the frontend tests: a simulated machine and 9P-shaped frames."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pyxen9p.frontend import Frontend
from pyxen9p.ring import HEADER
from pyxen9p.sim.backend import Sim9pfsBackend
from pyxen9p.sim.platform import SimDomain, SimulatedXen

FE_DOMID = 7
TREAD = 116


def frame(mtype: int, tag: int, body: bytes = b"") -> bytes:
    """A 9P-shaped frame: size[4] type[1] tag[2] body."""
    return HEADER.pack(7 + len(body), mtype, tag) + body


def echo(request: bytes) -> bytes:
    """A handler answering every request with type+1, the same tag and body."""
    size, mtype, tag = HEADER.unpack_from(request)
    return frame(mtype + 1, tag, request[7:size])


def tversion(msize: int = 8192, tag: int = 0xFFFF) -> bytes:
    body = struct.pack("<IH", msize, 8) + b"9P2000.L"
    return frame(100, tag, body)


@dataclass
class Machine:
    """A simulated host: domain 0 runs the backend, domain 7 the frontend."""

    xen: SimulatedXen
    dom0: SimDomain
    guest: SimDomain
    backend: Sim9pfsBackend

    def connect(self, **kwargs: object) -> Frontend:
        kwargs.setdefault("devid", 0)
        kwargs.setdefault("timeout", 5.0)
        return Frontend.connect(platform=self.guest, **kwargs)  # type: ignore[arg-type]

    def assert_clean(self) -> None:
        counts = self.xen.resources(FE_DOMID)
        assert counts.clean, counts


@contextmanager
def machine(
    handler: Callable[[bytes], bytes] | None = echo, **backend_kwargs: object
) -> Iterator[Machine]:
    """A started simulated machine; everything is stopped and checked at the end."""
    xen = SimulatedXen()
    dom0 = xen.domain(0)
    guest = xen.create_domain(FE_DOMID, "guest")
    backend = Sim9pfsBackend(dom0, FE_DOMID, handler=handler, **backend_kwargs)  # type: ignore[arg-type]
    backend.start()
    try:
        yield Machine(xen, dom0, guest, backend)
    finally:
        backend.stop()
        xen.close()
