"""Backend types: ``backend/xen_9pfs`` (xen-9pfsd) found and driven like
``backend/9pfs`` (QEMU), each with its own reconnect rules; the simulated
xen-9pfsd (pyxen9p.sim.xen9pfsd) with the 9P2000.u stand-in server behind it;
and hostile xen-9pfsd-like backends on the new paths (wrong state on
reconnect, missing nodes, a refused reconnection).
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

import pyxen9p
from pyxen9p.errors import BackendError, TransportClosedError
from pyxen9p.frontend import (
    BACKEND_TYPES,
    Frontend,
    ReconnectRefusedError,
    backend_type,
)
from pyxen9p.sim.backend import Sim9pfsBackend
from pyxen9p.sim.platform import SimDomain, SimulatedXen
from pyxen9p.sim.xen9pfsd import DEFAULT_MAX_OPEN_FILES, SimXen9pfsd
from pyxen9p.xenbus import XenbusState
from tests.frontend_helpers import echo, tversion
from tests.p9.userver import UServer

FE = 7


@dataclass
class Host:
    xen: SimulatedXen
    dom0: SimDomain
    guest: SimDomain
    backend: SimXen9pfsd
    servers: list[UServer]

    def connect(self, **kwargs: object) -> Frontend:
        kwargs.setdefault("devid", 0)
        kwargs.setdefault("timeout", 5.0)
        return Frontend.connect(platform=self.guest, **kwargs)  # type: ignore[arg-type]

    def client(self, **kwargs: object) -> pyxen9p.Client:
        kwargs.setdefault("devid", 0)
        kwargs.setdefault("timeout", 5.0)
        return pyxen9p.connect(platform=self.guest, **kwargs)  # type: ignore[arg-type]

    def assert_clean(self) -> None:
        counts = self.xen.resources(FE)
        assert counts.clean, counts


@contextmanager
def host(
    root: Path | None = None, *, handler: object = echo, **backend_kwargs: object
) -> Iterator[Host]:
    """A simulated host whose domain 0 runs a xen-9pfsd-like backend for domain 7.

    With *root*, every connection gets a fresh 9P2000.u stand-in server of
    *root* with the device's fid limit (as xen-9pfsd frees a device's fids
    when its connection ends); else *handler* answers.
    """
    xen = SimulatedXen()
    dom0 = xen.domain(0)
    guest = xen.create_domain(FE, "guest")
    servers: list[UServer] = []

    def factory(limit: int) -> UServer:
        server = UServer(root, max_open_files=limit)  # type: ignore[arg-type]
        servers.append(server)
        return server

    if root is not None:
        backend_kwargs["handler_factory"] = lambda limit: factory(limit).answer
    else:
        backend_kwargs["handler"] = handler
    backend = SimXen9pfsd(dom0, FE, **backend_kwargs)  # type: ignore[arg-type]
    backend.start()
    try:
        yield Host(xen, dom0, guest, backend, servers)
    finally:
        backend.stop()
        for server in servers:
            server.close()
        xen.close()


# --------------------------------------------------------------------------- types


def test_backend_type_comes_from_the_backend_path() -> None:
    assert backend_type("/local/domain/0/backend/9pfs/7/0") is BACKEND_TYPES["9pfs"]
    assert backend_type("/local/domain/0/backend/xen_9pfs/7/3/") is BACKEND_TYPES["xen_9pfs"]
    xen = backend_type("/local/domain/0/backend/xen_9pfs/7/3")
    assert (xen.server, xen.reconnects, xen.initwait_on_reconnect) == ("xen-9pfsd", True, False)
    assert xen.dialects == ("9P2000.u",)
    qemu = BACKEND_TYPES["9pfs"]
    assert (qemu.server, qemu.reconnects, qemu.initwait_on_reconnect) == ("QEMU", False, True)
    for odd in ("/local/domain/0/backend/vif/7/0", "/local/domain/0/xen_9pfs/7/0", "", "/"):
        kind = backend_type(odd)
        assert kind.server == "unknown"
        assert not kind.reconnects and kind.initwait_on_reconnect


# --------------------------------------------------------------------------- the sim


def test_sim_xen_9pfsd_publishes_like_xen_9pfsd() -> None:
    with host(max_open_files=9) as h:
        be = h.backend.backend_path
        assert be == "/local/domain/0/backend/xen_9pfs/7/0"
        store = h.dom0.open_xenstore()
        try:
            read = lambda key: store.read(f"{be}/{key}").decode()  # noqa: E731
            assert (read("versions"), read("max-rings"), read("max-ring-page-order")) == (
                "1",
                "4",
                "9",
            )
            assert (read("max-open-files"), read("max-files"), read("max-space")) == ("9", "0", "0")
            assert read("auto-delete") == "0"
            assert read("state") == str(int(XenbusState.INIT_WAIT))
        finally:
            store.close()
        assert h.backend.max_open_files == 9


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        ({"security_model": "mapped"}, "security model"),
        ({"path": "/srv//share"}, "host path"),
        ({"path": "/srv/share/"}, "host path"),
        ({"path": "srv/share"}, "host path"),
    ],
)
def test_sim_xen_9pfsd_refuses_to_serve_bad_toolstack_nodes(
    kwargs: dict[str, str], reason: str
) -> None:
    with host(**kwargs) as h:  # type: ignore[arg-type]
        assert h.backend.state == XenbusState.INITIALISING
        assert any(reason in e for e in h.backend.errors), h.backend.errors
        with pytest.raises(TimeoutError, match="xen-9pfsd"):
            h.connect(timeout=0.5)
        h.assert_clean()


def test_devices_found_by_devid_tag_and_path() -> None:
    with host(tag="data") as h:
        for selector in ({"devid": 0}, {"tag": "data"}, {"path": "/local/domain/7/device/9pfs/0"}):
            kwargs = {"devid": None, **selector}
            with h.connect(**kwargs) as fe:
                assert fe.path == "/local/domain/7/device/9pfs/0"
                assert fe.backend_path == h.backend.backend_path
                assert fe.backend_type.name == "xen_9pfs"
                assert fe.tag == "data"
                assert fe.backend_max_rings == 4
                assert fe.request(tversion(), timeout=5) == echo(tversion())
        assert h.backend.connections == 3
        h.assert_clean()


def test_frontend_node_is_ignored_by_xen_9pfsd() -> None:
    """The toolstack's ``frontend`` node says nothing to xen-9pfsd: it serves
    ``device/9pfs/<devid>`` of the frontend's domain, whatever the node says."""
    with host() as h:
        store = h.dom0.open_xenstore()
        try:
            store.write(f"{h.backend.backend_path}/frontend", "/local/domain/7/data/elsewhere")
        finally:
            store.close()
        with h.connect() as fe:
            assert fe.request(tversion(), timeout=5) == echo(tversion())
        h.assert_clean()


def test_client_files_over_the_sim_xen_9pfsd(tmp_path: Path) -> None:
    root = tmp_path / "share"
    root.mkdir()
    (root / "hello.txt").write_text("hello\n")
    with host(root) as h, h.client() as client:
        assert client.version == "9P2000.u"
        assert client.read_text("hello.txt") == "hello\n"
        client.mkdir("d")
        for i in range(3 * DEFAULT_MAX_OPEN_FILES):  # more than the fid limit, one by one
            client.write_text(f"d/f{i}", str(i))
        assert sorted(client.listdir("d")) == sorted(f"f{i}" for i in range(15))
        assert [client.read_text(f"d/f{i}") for i in range(15)] == [str(i) for i in range(15)]
        for i in range(15):
            client.remove(f"d/f{i}")
        assert os.listdir(root / "d") == []
        # xen-9pfsd opens a directory with OREAD only: no ORCLOSE, no removal
        with pytest.raises(OSError) as info:
            client.rmdir("d")
        assert info.value.errno == errno.EOPNOTSUPP
        assert "cannot remove directories" in str(info.value)
        os.rmdir(root / "d")
        with pytest.raises(OSError) as info:
            client.rename("hello.txt", "bye.txt")
        assert "Twstat" in str(info.value)
        assert sorted(os.listdir(root)) == ["hello.txt"]
        server = h.servers[-1]
        assert server.peak_fids <= DEFAULT_MAX_OPEN_FILES
        assert not server.root_tstat_seen  # the client knows xen-9pfsd by its path
        assert client.stat("hello.txt").st_size == 6


# --------------------------------------------------------------------------- reconnect rules


def test_xen_9pfsd_is_reconnected_without_allow_reconnect(tmp_path: Path) -> None:
    root = tmp_path / "share"
    root.mkdir()
    states: list[XenbusState] = []
    with host(root) as h:
        for round_ in range(3):
            with h.client() as client:
                client.write_text(f"r{round_}", "x")
                states.append(h.backend.state)
            assert h.backend.wait_for_state(XenbusState.CLOSED)
        assert states == [XenbusState.CONNECTED] * 3
        assert h.backend.connections == 3
        # a fresh server each time: the fids of a connection end with it
        assert len(h.servers) == 3
        assert sorted(os.listdir(root)) == ["r0", "r1", "r2"]
        h.assert_clean()


def test_xen_9pfsd_never_goes_back_to_init_wait() -> None:
    seen: list[XenbusState] = []
    with host() as h:
        with h.connect():
            pass
        stop = threading.Event()

        def record() -> None:
            while not stop.is_set():
                seen.append(h.backend.state)
                stop.wait(0.001)

        recorder = threading.Thread(target=record)
        recorder.start()
        try:
            with h.connect() as fe:
                assert fe.request(tversion(), timeout=5) == echo(tversion())
        finally:
            stop.set()
            recorder.join()
        assert XenbusState.INIT_WAIT not in seen
        assert XenbusState.CONNECTED in seen
        h.assert_clean()


def test_qemu_backend_still_needs_allow_reconnect() -> None:
    xen = SimulatedXen()
    try:
        guest = xen.create_domain(FE, "guest")
        backend = Sim9pfsBackend(xen.domain(0), FE, handler=echo)
        backend.start()
        try:
            with Frontend.connect(devid=0, platform=guest, timeout=5) as fe:
                assert fe.backend_type.name == "9pfs"
            with pytest.raises(ReconnectRefusedError):
                Frontend.connect(devid=0, platform=guest, timeout=5)
            with Frontend.connect(devid=0, platform=guest, timeout=5, allow_reconnect=True):
                pass
        finally:
            backend.stop()
        assert xen.resources(FE).clean
    finally:
        xen.close()


def test_a_closing_xen_9pfsd_takes_a_new_connection() -> None:
    """xen-9pfsd left at Closing (its frontend went Closing, then Closed while
    the daemon was not watching): it has unmapped already and takes the next
    connection from there, without InitWait; the frontend does not wait for
    the Closing to end, as it does for QEMU."""
    with host() as h:
        with h.connect():
            pass
        h.backend.force_state(XenbusState.CLOSING)
        with h.connect(timeout=2.0) as fe:
            assert fe.request(tversion(), timeout=5) == echo(tversion())
        assert h.backend.connections == 2
        h.assert_clean()


# --------------------------------------------------------------------------- hostile


def _closed_once(h: Host) -> None:
    with h.connect():
        pass
    assert h.backend.wait_for_state(XenbusState.CLOSED)


def test_hostile_wrong_state_on_reconnect() -> None:
    """A xen-9pfsd-like backend that says Connected to a frontend that is not
    connected: no connection is taken over, the wait ends, nothing leaks."""
    with host() as h:
        _closed_once(h)
        h.backend.force_state(XenbusState.CONNECTED)
        with pytest.raises(TimeoutError, match="has not published its features"):
            h.connect(timeout=0.5)
        h.assert_clean()


def test_hostile_reconnect_refused_from_closed() -> None:
    """The backend refuses the new connection by writing Closed over Closed:
    only the timeout tells, and it says what probably happened."""
    with host(advertise={"max-rings": "8"}) as h:  # it really takes 4 at most
        _closed_once(h)
        with pytest.raises(TimeoutError, match="stayed CLOSED: it refused"):
            h.connect(rings=8, timeout=0.5)
        assert any("num-rings" in e for e in h.backend.errors), h.backend.errors
        h.assert_clean()
        with h.connect(rings=2) as fe:  # the device still serves a good frontend
            assert fe.request(tversion(), timeout=5) == echo(tversion())
        h.assert_clean()


def test_hostile_refusal_from_init_wait_is_seen_at_once() -> None:
    with host(advertise={"max-rings": "8"}) as h:
        with pytest.raises(TransportClosedError, match="CLOSED"):
            h.connect(rings=8, timeout=5)
        h.assert_clean()


@pytest.mark.parametrize("node", ["versions", "max-rings", "max-ring-page-order"])
def test_hostile_closed_backend_with_a_missing_node(node: str) -> None:
    with host() as h:
        _closed_once(h)
        store = h.dom0.open_xenstore()
        try:
            store.rm(f"{h.backend.backend_path}/{node}")
        finally:
            store.close()
        with pytest.raises(BackendError, match=f"{node}: missing"):
            h.connect(timeout=1)
        h.assert_clean()


def test_hostile_backend_state_node_missing() -> None:
    with host() as h:
        _closed_once(h)
        store = h.dom0.open_xenstore()
        try:
            store.rm(f"{h.backend.backend_path}/state")
        finally:
            store.close()
        with pytest.raises(TimeoutError):
            h.connect(timeout=0.5)
        h.assert_clean()


def test_hostile_backend_directory_gone() -> None:
    with host() as h:
        _closed_once(h)
        store = h.dom0.open_xenstore()
        try:
            store.rm(h.backend.backend_path)
        finally:
            store.close()
        # the guest may not even learn whether it exists: EACCES, as from xenstored
        with pytest.raises((TimeoutError, BackendError, PermissionError)):
            h.connect(timeout=0.5)
        h.assert_clean()


def test_root_attributes_are_not_asked_of_xen_9pfsd(tmp_path: Path) -> None:
    """The client knows xen-9pfsd by its backend directory and never asks it
    for the attributes of the share's root (it does not answer them usefully)."""
    root = tmp_path / "share"
    root.mkdir()
    (root / "f").write_text("x")
    with host(root) as h, h.client(request_timeout=5.0) as client:
        for path in ("", "/", "f/.."):
            with pytest.raises(OSError):
                client.stat(path)
        assert client.listdir("") == ["f"]
        assert client.is_file("f")
        assert client.usable
        assert not h.servers[-1].root_tstat_seen
