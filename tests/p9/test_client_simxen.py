"""The client suite through the whole simulated stack.

client -> Frontend -> simulated rings, grants and event channels -> the
QEMU-like simulated backend -> pyxen9p's FileServer on the exported directory.
Every test also checks that the guest domain holds nothing once closed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from frontend_helpers import FE_DOMID, machine

from pyxen9p.p9.client import Client
from pyxen9p.p9.server import FileServer

from .client_suite import *  # noqa: F403


@pytest.fixture
def root(tmp_path: Path) -> Path:
    export = tmp_path / "export"
    export.mkdir()
    return export


@pytest.fixture
def client(root: Path) -> Iterator[Client]:
    server = FileServer(root)
    try:
        with machine(handler=server.handle) as m:
            fe = m.connect(rings=2)
            c = Client(fe, aname=str(root), timeout=20)
            try:
                yield c
            finally:
                c.close()
            assert m.xen.resources(FE_DOMID).clean, m.xen.resources(FE_DOMID)
    finally:
        server.close()


def test_the_transport_is_the_xen_frontend(client: Client) -> None:
    fe = client.transport
    assert type(fe).__name__ == "Frontend"
    assert client.msize <= fe.msize
    assert fe.num_rings == 2  # type: ignore[attr-defined]
