"""A 9pfs backend in its own process, over the REAL ctypes bindings.

Run by ``tests/test_frontend_mocklibs.py``: the grant and event-channel calls
go through pyxen9p.libs into the mock C libraries (as domain
``MOCKXEN_DOMID``), XenStore through the real libxenstore into the simulated
xenstored (``XENSTORED_PATH``).  The backend logic is the simulated QEMU-like
backend's; this adapter gives it the real bindings instead of simulated ones.

Usage: mock_backend_peer.py FRONTEND_DOMID FRONTEND_PATH EXPORT_DIR
Prints "ready" once in InitWait, runs until stdin closes, prints "stopped".
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pyxen9p.libs import EventChannel, GrantTable, XenStore
from pyxen9p.libs.xengnttab import GrantMapping
from pyxen9p.p9.server import FileServer
from pyxen9p.sim.backend import Sim9pfsBackend
from pyxen9p.xenbus import XenbusState


class Table:
    """GrantTable with the simulator's map_grant_refs(domid, refs) call."""

    def __init__(self) -> None:
        self.table = GrantTable()

    def map_grant_ref(self, domid: int, ref: int, *, writable: bool = True) -> GrantMapping:
        return self.table.map_grant_ref(domid, ref, writable=writable)

    def map_grant_refs(
        self, domid: int, refs: Sequence[int], *, writable: bool = True
    ) -> GrantMapping:
        return self.table.map_domain_grant_refs(domid, refs, writable=writable)

    def close(self) -> None:
        self.table.close()


class Channel(EventChannel):
    """EventChannel with the simulator's pending(timeout=...) signature (the
    backend polls the descriptor first, so pending() does not block)."""

    def pending(self, timeout: float | None = None) -> int:  # type: ignore[override]
        return super().pending()


class RealDomain:
    """What Sim9pfsBackend needs of its domain, from the real bindings."""

    def __init__(self, domid: int) -> None:
        self.domid = domid
        self.path = f"/local/domain/{domid}"

    def open_xenstore(self) -> XenStore:
        return XenStore()

    def open_grant_table(self) -> Table:
        return Table()

    def open_event_channel(self) -> Channel:
        return Channel()


def main() -> int:
    fe_domid, fe_path, export = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    server = FileServer(export)
    backend = Sim9pfsBackend(
        RealDomain(0),  # type: ignore[arg-type]
        fe_domid,
        handler=server.handle,
        frontend_path=fe_path,
        write_toolstack_nodes=False,
    )
    backend.start()
    if not backend.wait_for_state(XenbusState.INIT_WAIT, timeout=10):
        print("backend did not reach InitWait:", backend.errors, flush=True)
        return 1
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    backend.stop()
    server.close()
    print("stopped", backend.connections, backend.errors, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
