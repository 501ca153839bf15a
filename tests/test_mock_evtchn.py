"""pyxen9p.libs.xenevtchn over the mock libxenevtchn.so.1 (a real dlopen by path).

Every bound function is exercised against the mock's Xen semantics: ports
allocated for a remote domain, bound from that domain (in this process and
from a second process), notifications that make the peer's descriptor
readable, masking until unmask, coalescing, unbind and close.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mocklibs import (
    EVTCHN,
    EXPORTS,
    MockXen,
    PeerError,
    PeerProcess,
    domain,
    require_peers,
    session_mock_libs,
    xen_system,
)

from pyxen9p.errors import HandleClosedError, XenLibraryError
from pyxen9p.libs import xenevtchn
from pyxen9p.libs.xenevtchn import EventChannel

DOMID_SELF = 0x7FF0


@pytest.fixture(scope="session")
def mock_libs(request: pytest.FixtureRequest) -> dict[str, Path]:
    return session_mock_libs(request.config)


@pytest.fixture(scope="session")
def mockxen(mock_libs: dict[str, Path]) -> MockXen:
    return MockXen(mock_libs)


@pytest.fixture
def xen_dir(tmp_path: Path, mockxen: MockXen, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    with xen_system(tmp_path, mockxen, monkeypatch) as d:
        yield d


@pytest.fixture
def lib(mock_libs: dict[str, Path]) -> str:
    return str(mock_libs[EVTCHN])


def readable(ch: EventChannel, timeout: float = 0.0) -> bool:
    ready, _, _ = select.select([ch.fileno()], [], [], timeout)
    return bool(ready)


def connect(lib: str, a: int = 0, b: int = 1) -> tuple[EventChannel, int, EventChannel, int]:
    """Two handles of domains *a* and *b* joined by an interdomain channel,
    with the binder's initial event consumed."""
    with domain(a):
        cha = EventChannel(library=lib)
    with domain(b):
        chb = EventChannel(library=lib)
    port_a = cha.bind_unbound_port(b)
    port_b = chb.bind_interdomain(a, port_a)
    assert chb.wait(2) == port_b  # Xen sets the new local port pending
    chb.unmask(port_b)
    return cha, port_a, chb, port_b


def test_mock_exports_exactly_the_real_names(mock_libs: dict[str, Path]) -> None:
    try:
        out = subprocess.run(
            ["nm", "-D", "--defined-only", str(mock_libs[EVTCHN])],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    except FileNotFoundError:
        require_peers("nm (binutils) is not installed")
    names = {line.split()[2].split("@")[0] for line in out.splitlines() if " T " in line}
    assert names == EXPORTS[EVTCHN]
    assert set(xenevtchn.LIBRARY.signatures) == names


def test_open_without_a_xen_system_fails_with_enoent(
    lib: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MOCKXEN_DIR", raising=False)
    with pytest.raises(FileNotFoundError) as info:
        EventChannel(library=lib)
    assert isinstance(info.value, XenLibraryError)
    assert info.value.function == "xenevtchn_open"
    assert info.value.errno == errno.ENOENT


def test_notify_both_ways(lib: str, xen_dir: Path, mockxen: MockXen) -> None:
    ch0, p0, ch1, p1 = connect(lib)
    with ch0, ch1:
        assert mockxen.live()["ports"] == 2
        assert not readable(ch0) and not readable(ch1)
        ch0.notify(p0)
        assert readable(ch1, 2) and not readable(ch0)
        assert ch1.pending() == p1
        assert not readable(ch1)
        ch1.unmask(p1)
        ch1.notify(p1)
        assert ch0.wait(2) == p0
        ch0.unmask(p0)
        assert ch0.wait(0.05) is None and ch1.wait(0.05) is None


def test_masked_port_coalesces_until_unmask(lib: str, xen_dir: Path) -> None:
    ch0, p0, ch1, p1 = connect(lib)
    with ch0, ch1:
        for _ in range(3):
            ch0.notify(p0)
        assert ch1.wait(2) == p1
        assert ch1.wait(0.05) is None  # masked: the other two are one pending event
        ch1.unmask(p1)
        assert ch1.wait(2) == p1
        ch1.unmask(p1)
        assert ch1.wait(0.05) is None
        ch1.unmask(p1)  # unmasking an unmasked port is harmless
        ch1.unmask(4000)  # Linux ignores ports of other users
        assert ch1.wait(0.05) is None


def test_several_ports_on_one_handle(lib: str, xen_dir: Path) -> None:
    with EventChannel(library=lib) as ch0, domain(2), EventChannel(library=lib) as ch2:
        ports0 = [ch0.bind_unbound_port(2) for _ in range(20)]
        assert ports0 == sorted(ports0) and len(set(ports0)) == 20
        ports2 = [ch2.bind_interdomain(0, p) for p in ports0]
        assert sorted(ch2.wait(1) or 0 for _ in ports2) == sorted(ports2)
        for p in ports2:
            ch2.unmask(p)
        for p in reversed(ports0):
            ch0.notify(p)
        got = [ch2.wait(1) for _ in ports2]
        assert got == list(reversed(ports2))
        assert ch2.bound_ports == frozenset(ports2)


def test_bind_interdomain_checks(lib: str, xen_dir: Path) -> None:
    with EventChannel(library=lib) as ch0:
        port = ch0.bind_unbound_port(1)
        with domain(2), EventChannel(library=lib) as ch2:
            with pytest.raises(XenLibraryError) as info:
                ch2.bind_interdomain(0, port)  # offered to domain 1, not 2
            assert info.value.function == "xenevtchn_bind_interdomain"
            assert info.value.errno == errno.EINVAL
        with domain(1), EventChannel(library=lib) as ch1:
            for bad in (port + 100, 0):
                with pytest.raises(XenLibraryError) as info:
                    ch1.bind_interdomain(0, bad)
                assert info.value.errno == errno.EINVAL
            with pytest.raises(XenLibraryError) as info:
                ch1.bind_interdomain(3, port)  # right port number, wrong domain
            assert info.value.errno == errno.EINVAL
            mine = ch1.bind_interdomain(0, port)
            with pytest.raises(XenLibraryError):
                ch1.bind_interdomain(0, port)  # already connected
            ch1.unbind(mine)
            assert ch1.bound_ports == frozenset()
            # Xen puts the remote end back into the unbound state: bind again
            again = ch1.bind_interdomain(0, port)
            assert ch1.wait(1) == again
        with pytest.raises(XenLibraryError) as info:
            ch0.bind_unbound_port(0x7FF5)
        assert info.value.errno == errno.ESRCH


def test_domid_self_means_own_domain(lib: str, xen_dir: Path) -> None:
    with domain(3), EventChannel(library=lib) as a, EventChannel(library=lib) as b:
        port = a.bind_unbound_port(DOMID_SELF)
        local = b.bind_interdomain(DOMID_SELF, port)
        assert b.wait(1) == local
        b.unmask(local)
        a.notify(port)
        assert b.wait(1) == local


def test_unbind_and_notify_errors(lib: str, xen_dir: Path, mockxen: MockXen) -> None:
    ch0, p0, ch1, p1 = connect(lib)
    with ch0, ch1:
        ch1.unbind(p1)
        assert mockxen.live()["ports"] == 1
        ch0.notify(p0)  # the remote end is unbound again: Xen drops the event
        assert ch1.wait(0.1) is None
        calls: list[tuple[Callable[[], object], str]] = [
            (lambda: ch1.notify(p1), "xenevtchn_notify"),
            (lambda: ch1.unbind(p1), "xenevtchn_unbind"),
            (lambda: ch1.notify(p0 + 50), "xenevtchn_notify"),
        ]
        for call, name in calls:
            with pytest.raises(XenLibraryError) as info:
                call()
            assert info.value.function == name
            assert info.value.errno == errno.ENOTCONN
        with pytest.raises(XenLibraryError) as info:
            ch1.unbind(1 << 20)
        assert info.value.errno == errno.EINVAL
        # a port of another handle of the same domain is not ours either
        with domain(0), EventChannel(library=lib) as other:
            with pytest.raises(XenLibraryError) as info:
                other.notify(p0)
            assert info.value.errno == errno.ENOTCONN


def test_close_releases_every_port(lib: str, xen_dir: Path, mockxen: MockXen) -> None:
    ch0, p0, ch1, _p1 = connect(lib)
    extra = ch1.bind_unbound_port(0)
    assert mockxen.dir_live(xen_dir)["ports"] == 3
    ch1.close()
    assert mockxen.live()["ports"] == 1
    assert mockxen.dir_live(xen_dir)["ports"] == 1
    ch1.close()  # idempotent
    with domain(1), EventChannel(library=lib) as ch1b:
        # the closed handle's ports are gone: its channel is unbound on our side
        assert ch1b.bind_interdomain(0, p0) >= 1
        with pytest.raises(XenLibraryError):
            ch1b.bind_interdomain(1, extra)
    ch0.close()


def test_bind_virq(lib: str, xen_dir: Path, mockxen: MockXen) -> None:
    with domain(4), EventChannel(library=lib) as ch:
        port = ch.bind_virq(3)  # VIRQ_DOM_EXC
        assert ch.wait(0.05) is None
        mockxen.raise_virq(xen_dir, 4, 3)
        assert ch.wait(2) == port
        mockxen.raise_virq(xen_dir, 4, 3)
        assert ch.wait(0.05) is None
        ch.unmask(port)
        assert ch.wait(2) == port
        ch.unmask(port)
        ch.notify(port)  # Xen refuses, Linux ignores the result: no event
        assert ch.wait(0.05) is None
        with pytest.raises(XenLibraryError) as info:
            ch.bind_virq(3)
        assert info.value.errno == errno.EEXIST
        with pytest.raises(XenLibraryError) as info:
            ch.bind_virq(24)
        assert info.value.function == "xenevtchn_bind_virq"
        assert info.value.errno == errno.EINVAL
        ch.unbind(port)
        with pytest.raises(OSError):
            mockxen.raise_virq(xen_dir, 4, 3)


def test_restrict(lib: str, xen_dir: Path) -> None:
    with EventChannel(library=lib) as ch0, domain(5), EventChannel(library=lib) as ch:
        offered = ch0.bind_unbound_port(5)
        with pytest.raises(XenLibraryError) as info:
            ch.restrict(0)
        assert info.value.function == "xenevtchn_restrict"
        assert info.value.errno == errno.EINVAL
        ch.restrict(7)
        with pytest.raises(PermissionError):
            ch.bind_unbound_port(0)
        with pytest.raises(PermissionError):
            ch.bind_virq(5)
        with pytest.raises(PermissionError) as denied:
            ch.bind_interdomain(0, offered)
        assert denied.value.errno == errno.EACCES
        with pytest.raises(PermissionError):
            ch.restrict(8)  # only once
    with domain(6):
        ch6 = EventChannel(library=lib)
    with ch6, domain(5), EventChannel(library=lib) as ch:
        offered = ch6.bind_unbound_port(5)
        ch.restrict(6)
        local = ch.bind_interdomain(6, offered)  # the one domain still allowed
        assert ch.wait(1) == local
        ch.unmask(local)
        ch6.notify(offered)
        assert ch.wait(1) == local


def test_fdopen_shares_the_ports_of_the_descriptor(
    lib: str, xen_dir: Path, mockxen: MockXen
) -> None:
    ch0, p0, ch1, p1 = connect(lib)
    with ch0, ch1:
        twin = EventChannel.fdopen(os.dup(ch1.fileno()), library=lib)
        ch0.notify(p0)
        assert twin.wait(2) == p1  # the same open file: the same event queue
        twin.unmask(p1)
        twin.notify(p1)  # a port bound through the other handle
        assert ch0.wait(2) == p0
        ch0.unmask(p0)
        twin.close()  # ch1's descriptor keeps the ports alive
        assert mockxen.dir_live(xen_dir)["ports"] == 2
        ch0.notify(p0)
        assert ch1.wait(2) == p1
        with pytest.raises(XenLibraryError) as info:
            EventChannel.fdopen(os.open(os.devnull, os.O_RDONLY), library=lib)
        assert info.value.function == "xenevtchn_fdopen"
        assert info.value.errno == errno.ENOTTY
    assert mockxen.dir_live(xen_dir)["ports"] == 0


def test_ports_live_until_the_last_descriptor_closes(
    mock_libs: dict[str, Path], xen_dir: Path, mockxen: MockXen
) -> None:
    """Like Linux's evtchn driver: the ports belong to the open file."""
    raw = ctypes.CDLL(str(mock_libs[EVTCHN]), use_errno=True)
    raw.xenevtchn_open.restype = raw.xenevtchn_fdopen.restype = ctypes.c_void_p
    for name in ("xenevtchn_fd", "xenevtchn_close", "xenevtchn_pending"):
        getattr(raw, name).argtypes = [ctypes.c_void_p]
    for name in ("xenevtchn_bind_unbound_port", "xenevtchn_notify"):
        getattr(raw, name).argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    first = raw.xenevtchn_open(None, 0)
    port = raw.xenevtchn_bind_unbound_port(first, 0)
    assert port > 0
    second = raw.xenevtchn_fdopen(None, os.dup(raw.xenevtchn_fd(first)), 0)
    assert second
    assert raw.xenevtchn_close(first) == 0
    assert mockxen.dir_live(xen_dir)["ports"] == 1
    assert mockxen.live()["ports"] == 1
    assert raw.xenevtchn_notify(second, port) == 0  # still bound, through the twin
    assert raw.xenevtchn_close(second) == 0
    assert mockxen.dir_live(xen_dir)["ports"] == 0


def test_fdopen_rejects_flags_and_bad_descriptors(
    mock_libs: dict[str, Path], xen_dir: Path, mockxen: MockXen
) -> None:
    raw = ctypes.CDLL(str(mock_libs[EVTCHN]), use_errno=True)
    raw.xenevtchn_fdopen.restype = ctypes.c_void_p
    raw.xenevtchn_open.restype = ctypes.c_void_p
    raw.xenevtchn_fd.argtypes = [ctypes.c_void_p]
    raw.xenevtchn_close.argtypes = [ctypes.c_void_p]
    handle = raw.xenevtchn_open(None, 0)
    fd = os.dup(raw.xenevtchn_fd(handle))
    try:
        ctypes.set_errno(0)
        assert raw.xenevtchn_fdopen(None, fd, 1) is None  # XENEVTCHN_NO_CLOEXEC
        assert ctypes.get_errno() == errno.EINVAL
        assert raw.xenevtchn_fdopen(None, -1, 0) is None
        assert ctypes.get_errno() == errno.EBADF
        ctypes.set_errno(0)
        assert raw.xenevtchn_open(None, 6) is None  # unknown open flags
        assert ctypes.get_errno() == errno.EINVAL
    finally:
        os.close(fd)
        assert raw.xenevtchn_close(handle) == 0
    assert raw.xenevtchn_close(None) == 0


def test_descriptor_flags(lib: str, xen_dir: Path) -> None:
    with EventChannel(library=lib) as a, EventChannel(cloexec=False, library=lib) as b:
        assert fcntl.fcntl(a.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert not fcntl.fcntl(b.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert a.fileno() != b.fileno()


def test_pending_blocks_until_an_event(lib: str, xen_dir: Path) -> None:
    ch0, p0, ch1, p1 = connect(lib)
    got: list[int] = []
    with ch0, ch1:
        reader = threading.Thread(target=lambda: got.append(ch1.pending()), daemon=True)
        reader.start()
        time.sleep(0.1)
        assert got == []  # blocked in read(2), without holding the library's lock
        ch0.notify(p0)  # which another thread can therefore still call
        reader.join(5)
        assert not reader.is_alive()
        assert got == [p1]


def test_use_after_close_raises(lib: str, xen_dir: Path) -> None:
    ch = EventChannel(library=lib)
    port = ch.bind_unbound_port(1)
    assert ch.bound_ports == {port}
    ch.close()
    ch.close()
    calls: list[Callable[[], object]] = [
        ch.fileno,
        ch.pending,
        lambda: ch.notify(port),
        lambda: ch.unmask(port),
        lambda: ch.unbind(port),
        lambda: ch.bind_unbound_port(1),
        lambda: ch.bind_interdomain(1, 1),
        lambda: ch.bind_virq(1),
        lambda: ch.restrict(1),
        lambda: ch.wait(0),
    ]
    for call in calls:
        with pytest.raises(HandleClosedError):
            call()


# ------------------------------------------------------------ second process


def test_peer_process_binds_and_notifies(
    mock_libs: dict[str, Path], lib: str, xen_dir: Path, mockxen: MockXen
) -> None:
    with EventChannel(library=lib) as ch, PeerProcess(mock_libs, xen_dir, domid=3) as peer:
        offered = ch.bind_unbound_port(3)
        evt = peer.call("open_evtchn")
        with pytest.raises(PeerError) as info:
            peer.call("bind_interdomain", ch=evt, domid=0, port=offered + 1)
        assert info.value.function == "xenevtchn_bind_interdomain"
        assert info.value.errno == errno.EINVAL
        theirs = peer.call("bind_interdomain", ch=evt, domid=0, port=offered)
        assert peer.call("wait", ch=evt, timeout=2) == theirs
        peer.call("unmask", ch=evt, port=theirs)
        ch.notify(offered)
        ch.notify(offered)
        assert peer.call("wait", ch=evt, timeout=2) == theirs
        assert peer.call("wait", ch=evt, timeout=0.05) is None
        peer.call("unmask", ch=evt, port=theirs)
        assert peer.call("wait", ch=evt, timeout=2) == theirs  # the coalesced second
        peer.call("notify", ch=evt, port=theirs)
        assert readable(ch, 2)
        assert ch.pending() == offered
        ch.unmask(offered)
        assert peer.call("live")["ports"] == 1
        assert mockxen.dir_live(xen_dir)["ports"] == 2
        peer.call("unbind", ch=evt, port=theirs)
        assert mockxen.dir_live(xen_dir)["ports"] == 1
        # our port went back to unbound: the peer may bind it again
        again = peer.call("bind_interdomain", ch=evt, domid=0, port=offered)
        assert peer.call("wait", ch=evt, timeout=2) == again
    assert mockxen.dir_live(xen_dir)["ports"] == 0


def test_dead_peer_releases_its_ports(
    mock_libs: dict[str, Path], lib: str, xen_dir: Path, mockxen: MockXen
) -> None:
    with EventChannel(library=lib) as ch:
        offered = ch.bind_unbound_port(2)
        peer = PeerProcess(mock_libs, xen_dir, domid=2)
        try:
            evt = peer.call("open_evtchn")
            theirs = peer.call("bind_interdomain", ch=evt, domid=0, port=offered)
            peer.call("bind_unbound", ch=evt, domid=0)
            assert mockxen.dir_live(xen_dir)["ports"] == 3
        finally:
            peer.kill()
        assert mockxen.dir_live(xen_dir) == {"grants": 0, "mappings": 0, "ports": 1, "handles": 1}
        ch.notify(offered)  # silently dropped: the remote end is gone
        with domain(2), EventChannel(library=lib) as ch2:
            assert ch2.bind_interdomain(0, offered) == theirs  # lowest free port again


def _close_in_fork_child(*handles: EventChannel) -> int:
    """Fork; the child closes *handles* (all it may do) and exits: its status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            for handle in handles:
                handle.close()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_close_in_a_fork_child_leaves_the_parent_alone(
    lib: str, xen_dir: Path, mockxen: MockXen
) -> None:
    ch0, p0, ch1, p1 = connect(lib)
    with ch0, ch1:
        status = _close_in_fork_child(ch0, ch1)
        assert mockxen.dir_live(xen_dir)["ports"] == 2
        ch0.notify(p0)
        assert ch1.wait(2) == p1
        assert status == 0


def test_raw_calls_are_the_c_functions_bare(lib: str, xen_dir: Path, mockxen: MockXen) -> None:
    """``raw_calls``: pending, unmask and notify on the handle's pointer,
    returning the C result; a failure is a negative result, and ``error``
    names the function and its errno as the checked call would."""
    ch0, p0, ch1, p1 = connect(lib)
    with ch0, ch1:
        raw0, raw1 = ch0.raw_calls(), ch1.raw_calls()
        assert raw0.notify(p0) == 0
        assert readable(ch1, 2)
        assert raw1.pending() == p1
        assert not readable(ch1)
        raw0.notify(p0)  # masked: held until the unmask
        assert not readable(ch1, 0.05)
        assert raw1.unmask(p1) == 0
        assert readable(ch1, 2) and raw1.pending() == p1 and raw1.unmask(p1) == 0
        for name, call in (
            ("xenevtchn_notify", lambda: raw0.notify(p0)),
            ("xenevtchn_unmask", lambda: raw1.unmask(p1)),
        ):
            mockxen.reset()
            mockxen.fail(name, 1, errno.EFAULT)
            assert call() < 0
            failure = raw1.error(name)
            assert isinstance(failure, XenLibraryError)
            assert failure.function == name and failure.errno == errno.EFAULT
        mockxen.reset()
        assert raw0.notify(p0 + 50) < 0  # not a port of this handle: ENOTCONN
        assert raw0.error("xenevtchn_notify").errno == errno.ENOTCONN
    with pytest.raises(HandleClosedError):
        ch0.raw_calls()
