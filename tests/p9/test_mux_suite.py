"""The client suite through the multiplexer: Client -> mux socket -> mux -> FileServer.

Every test of :mod:`client_suite` runs with a client that reaches pyxen9p's
FileServer through a :class:`~pyxen9p.p9.mux.MultiplexerThread`, and a
second client of the same multiplexer attached meanwhile.  After each test
the backend session holds exactly the fids of the two clients' roots (the
suite's own check covers the client's side).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pyxen9p.p9.client import Client

from .client_suite import *  # noqa: F403
from .muxing import mux_client, mux_on_file_server, server_fids, wait_for


@pytest.fixture
def root(tmp_path: Path) -> Path:
    export = tmp_path / "export"
    export.mkdir()
    return export


@pytest.fixture
def client(root: Path, tmp_path: Path) -> Iterator[Client]:
    with (
        mux_on_file_server(root, tmp_path / "mux.sock") as (server, mux, path),
        mux_client(path, root) as bystander,
    ):
        c = mux_client(path, root)
        try:
            yield c
            if not c.closed:
                c.exists("")  # clunks fids of files garbage-collected unclosed
                wait_for(lambda: server_fids(server) == 2, what="the backend's fids")
        finally:
            c.close()
        assert bystander.listdir("") is not None
        wait_for(lambda: server_fids(server) == 1, what="the client's fids' clunk")
        assert mux.clients == 1
