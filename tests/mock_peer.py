"""A peer domain for the mock-library tests, run as a second process.

Started by :class:`mocklibs.PeerProcess` with ``MOCKXEN_DIR``,
``MOCKXEN_DOMID`` and ``PYXEN9P_LIBXENGNTTAB`` / ``PYXEN9P_LIBXENEVTCHN``
set.  It reads one JSON object per line on stdin, ``{"op": name, ...args}``,
runs it through the pyxen9p bindings and answers one line,
``{"result": value}`` or ``{"error": {"type", "message", "errno", "function"}}``.

Objects (handles, mappings, shared pages) are kept in a table and named by
the integer id an ``open_*``, ``map`` or ``share`` returned.

Operations: ``ping``; ``open_gnttab``, ``open_gntshr``, ``open_evtchn``;
``map`` (table, domid, refs, writable, notify_offset, notify_port);
``share`` (sharer, domid, count, writable, notify_offset, notify_port) ->
``{"id", "refs"}``; ``read`` (id, offset, length) -> hex; ``write`` (id,
offset, data hex); ``close`` (id); ``bind_unbound`` (ch, domid);
``bind_interdomain`` (ch, domid, port); ``notify`` (ch, port); ``wait`` (ch,
timeout) -> port or null; ``unmask`` (ch, port); ``unbind`` (ch, port);
``live`` -> the process's mockxen counters; ``exit`` (close all, exit 0);
``abandon`` (exit at once, closing nothing).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from typing import Any

from pyxen9p.errors import XenLibraryError
from pyxen9p.libs.xenevtchn import EventChannel
from pyxen9p.libs.xengnttab import GrantMapping, GrantSharer, GrantTable, SharedPages


class Peer:
    """The object table and the operations."""

    def __init__(self) -> None:
        self.objects: dict[int, Any] = {}
        self.next_id = 1

    def _add(self, obj: Any) -> int:
        oid = self.next_id
        self.next_id += 1
        self.objects[oid] = obj
        return oid

    def op_ping(self) -> int:
        return os.getpid()

    def op_open_gnttab(self) -> int:
        return self._add(GrantTable())

    def op_open_gntshr(self) -> int:
        return self._add(GrantSharer())

    def op_open_evtchn(self) -> int:
        return self._add(EventChannel())

    def op_map(
        self,
        table: int,
        domid: int,
        refs: list[int],
        writable: bool = True,
        notify_offset: int | None = None,
        notify_port: int | None = None,
    ) -> int:
        gt: GrantTable = self.objects[table]
        if len(refs) == 1:
            mapping = gt.map_grant_ref(
                domid,
                refs[0],
                writable=writable,
                notify_offset=notify_offset,
                notify_port=notify_port,
            )
        else:
            mapping = gt.map_domain_grant_refs(domid, refs, writable=writable)
        return self._add(mapping)

    def op_share(
        self,
        sharer: int,
        domid: int,
        count: int = 1,
        writable: bool = True,
        notify_offset: int | None = None,
        notify_port: int | None = None,
    ) -> dict[str, Any]:
        gs: GrantSharer = self.objects[sharer]
        if notify_offset is not None or notify_port is not None:
            pages = gs.share_page_notify(
                domid, writable=writable, notify_offset=notify_offset, notify_port=notify_port
            )
        else:
            pages = gs.share_pages(domid, count, writable=writable)
        return {"id": self._add(pages), "refs": list(pages.refs)}

    def op_read(self, id: int, offset: int, length: int) -> str:
        region: GrantMapping | SharedPages = self.objects[id]
        return bytes(region.buffer[offset : offset + length]).hex()

    def op_write(self, id: int, offset: int, data: str) -> None:
        region: GrantMapping | SharedPages = self.objects[id]
        raw = bytes.fromhex(data)
        region.buffer[offset : offset + len(raw)] = raw

    def op_close(self, id: int) -> None:
        self.objects.pop(id).close()

    def op_bind_unbound(self, ch: int, domid: int) -> int:
        return int(self.objects[ch].bind_unbound_port(domid))

    def op_bind_interdomain(self, ch: int, domid: int, port: int) -> int:
        return int(self.objects[ch].bind_interdomain(domid, port))

    def op_notify(self, ch: int, port: int) -> None:
        self.objects[ch].notify(port)

    def op_wait(self, ch: int, timeout: float) -> int | None:
        port = self.objects[ch].wait(timeout)
        return None if port is None else int(port)

    def op_unmask(self, ch: int, port: int) -> None:
        self.objects[ch].unmask(port)

    def op_unbind(self, ch: int, port: int) -> None:
        self.objects[ch].unbind(port)

    def op_live(self) -> dict[str, int]:
        lib = ctypes.CDLL(os.environ["PYXEN9P_LIBXENGNTTAB"])
        return {
            kind: int(getattr(lib, f"mockxen_live_{kind}")())
            for kind in ("grants", "mappings", "ports", "handles")
        }

    def close_all(self) -> None:
        # regions first (they belong to handles), newest first
        for oid in sorted(self.objects, reverse=True):
            obj = self.objects[oid]
            if isinstance(obj, (GrantMapping, SharedPages)):
                obj.close()
        for obj in self.objects.values():
            obj.close()
        self.objects.clear()


def _error(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "errno": getattr(exc, "errno", None),
        "function": exc.function if isinstance(exc, XenLibraryError) else None,
    }


def main() -> int:
    peer = Peer()
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        if op == "abandon":
            os._exit(0)  # like a crash: nothing is closed
        if op == "exit":
            peer.close_all()
            print(json.dumps({"result": None}), flush=True)
            return 0
        try:
            result = getattr(peer, f"op_{op}")(**request)
            reply: dict[str, Any] = {"result": result}
        except Exception as exc:
            reply = {"error": _error(exc)}
        print(json.dumps(reply), flush=True)
    peer.close_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
