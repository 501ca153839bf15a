"""pyxen9p.libs.xengnttab over the mock libxengnttab.so.1 (a real dlopen by path).

Every bound function is exercised against the mock's real semantics: pages
shared by one handle are mapped by another handle, in this process and from
a second process of another domain, with the data visible both ways.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mocklibs import (
    EVTCHN,
    EXPORTS,
    GNTTAB,
    MockXen,
    PeerError,
    PeerProcess,
    domain,
    require_peers,
    session_mock_libs,
    xen_system,
)

from pyxen9p.errors import HandleClosedError, XenLibraryError
from pyxen9p.libs import xengnttab
from pyxen9p.libs.xenevtchn import EventChannel
from pyxen9p.libs.xengnttab import (
    PAGE_SIZE,
    ForeignPage,
    GrantCopySegment,
    GrantSharer,
    GrantTable,
)

GNTST_GENERAL_ERROR = -1
GNTST_BAD_GNTREF = -3


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
    return str(mock_libs[GNTTAB])


@pytest.fixture
def raw(mock_libs: dict[str, Path]) -> ctypes.CDLL:
    """The mock loaded directly, for calls the bindings never make."""
    c = ctypes.CDLL(str(mock_libs[GNTTAB]), use_errno=True)
    for name in ("xengnttab_open", "xengntshr_open"):
        getattr(c, name).restype = ctypes.c_void_p
        getattr(c, name).argtypes = [ctypes.c_void_p, ctypes.c_uint]
    for name in ("xengnttab_close", "xengntshr_close", "xengnttab_fd", "xengntshr_fd"):
        getattr(c, name).argtypes = [ctypes.c_void_p]
    c.xengnttab_unmap.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32]
    c.xengntshr_unshare.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32]
    c.xengnttab_map_grant_ref.restype = ctypes.c_void_p
    c.xengnttab_map_grant_ref.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_uint32,
        ctypes.c_int,
    ]
    c.xengnttab_map_grant_refs.restype = ctypes.c_void_p
    c.xengnttab_map_grant_refs.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,
    ]
    c.xengntshr_share_pages.restype = ctypes.c_void_p
    c.xengntshr_share_pages.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_int,
    ]
    c.xengnttab_grant_copy.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p]
    return c


# ---------------------------------------------------------------- the library


def test_mock_exports_exactly_the_real_names(mock_libs: dict[str, Path]) -> None:
    nm = _nm(mock_libs[GNTTAB])
    assert set(nm) == EXPORTS[GNTTAB]
    # every function the bindings bind exists in the mock
    assert set(xengnttab.LIBRARY.signatures) <= set(nm)
    real = Path("/usr/lib/x86_64-linux-gnu/libxengnttab.so.1")
    if real.exists():
        assert nm == _nm(real), "names or symbol versions differ from Debian's library"
    soname = subprocess.run(
        ["objdump", "-p", str(mock_libs[GNTTAB])], capture_output=True, text=True, check=True
    ).stdout
    assert "SONAME               libxengnttab.so.1" in soname


def _nm(path: Path) -> dict[str, str]:
    try:
        out = subprocess.run(
            ["nm", "-D", "--defined-only", str(path)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    except FileNotFoundError:
        require_peers("nm (binutils) is not installed")
    names = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "T":
            name, _, version = parts[2].partition("@@")
            names[name] = version
    return names


def test_open_without_a_xen_system_fails_with_enoent(
    lib: str, monkeypatch: pytest.MonkeyPatch, mockxen: MockXen
) -> None:
    monkeypatch.delenv("MOCKXEN_DIR", raising=False)
    with pytest.raises(XenLibraryError) as info:
        GrantTable(library=lib)
    assert info.value.function == "xengnttab_open"
    assert info.value.errno == errno.ENOENT
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(FileNotFoundError) as info2:
        GrantSharer(library=lib)
    assert isinstance(info2.value, XenLibraryError)
    assert info2.value.function == "xengntshr_open"
    assert mockxen.live()["handles"] == 0


def test_bad_domid_environment_is_einval(
    lib: str, xen_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOCKXEN_DOMID", "32752")  # DOMID_FIRST_RESERVED
    with pytest.raises(XenLibraryError) as info:
        GrantTable(library=lib)
    assert info.value.errno == errno.EINVAL


# ------------------------------------------------------ sharing and mapping


def test_share_then_map_in_another_handle(lib: str, xen_dir: Path, mockxen: MockXen) -> None:
    with GrantSharer(library=lib) as sharer:
        with sharer.share_pages(1, 3) as pages:
            assert pages.count == 3 and len(pages.refs) == 3
            assert len(set(pages.refs)) == 3 and min(pages.refs) >= 8  # 0..7 reserved
            assert len(pages.buffer) == 3 * PAGE_SIZE
            assert bytes(pages.buffer) == bytes(3 * PAGE_SIZE), "new pages are zeroed"
            pages.buffer[0:5] = b"hello"
            pages.buffer[2 * PAGE_SIZE + 100 : 2 * PAGE_SIZE + 105] = b"world"
            assert mockxen.live()["grants"] == 3
            with domain(1), GrantTable(library=lib) as table:
                with table.map_domain_grant_refs(0, pages.refs) as mapping:
                    assert mapping.count == 3
                    assert mapping.address != pages.address
                    view = mapping.buffer
                    assert bytes(view[0:5]) == b"hello"
                    assert bytes(view[2 * PAGE_SIZE + 100 : 2 * PAGE_SIZE + 105]) == b"world"
                    view[PAGE_SIZE : PAGE_SIZE + 3] = b"abc"  # the other way
                    assert bytes(pages.buffer[PAGE_SIZE : PAGE_SIZE + 3]) == b"abc"
                    assert mockxen.live()["mappings"] == 1
                    assert mockxen.dir_live(xen_dir) == {
                        "grants": 3,
                        "mappings": 1,
                        "ports": 0,
                        "handles": 2,
                    }
                assert mapping.closed
                with pytest.raises(ValueError):
                    view[0]  # the memoryview was released before the unmap
                with pytest.raises(ValueError):
                    mapping.buffer  # noqa: B018
        assert pages.closed
        with pytest.raises(ValueError):
            pages.buffer  # noqa: B018


def test_map_single_pages_in_any_order(lib: str, xen_dir: Path) -> None:
    with GrantSharer(library=lib) as sharer, sharer.share_pages(2, 2) as pages:
        pages.buffer[0] = 0x11
        pages.buffer[PAGE_SIZE] = 0x22
        with domain(2), GrantTable(library=lib) as table:
            second = table.map_grant_ref(0, pages.refs[1])
            first = table.map_grant_ref(0, pages.refs[0], writable=False)
            assert second.buffer[0] == 0x22 and first.buffer[0] == 0x11
            assert first.buffer.readonly and not second.buffer.readonly
            pages.buffer[0] = 0x33  # the sharer still writes: the map sees it
            assert first.buffer[0] == 0x33
            first.close()
            second.close()
            first.close()  # idempotent


def test_map_grant_refs_from_several_domains_is_contiguous(lib: str, xen_dir: Path) -> None:
    with domain(3):
        s3 = GrantSharer(library=lib)
    with domain(4):
        s4 = GrantSharer(library=lib)
    with s3, s3.share_pages(0, 1) as p3, s4, s4.share_pages(0, 2) as p4:
        if True:
            p3.buffer[:3] = b"dom"
            p4.buffer[:3] = b"for"
            p4.buffer[PAGE_SIZE : PAGE_SIZE + 3] = b"fiv"
            with GrantTable(library=lib) as table:
                domids = [4, 3, 4]
                refs = [p4.refs[1], p3.refs[0], p4.refs[0]]
                with table.map_grant_refs(domids, refs) as m:
                    assert m.count == 3
                    got = [bytes(m.buffer[i * PAGE_SIZE : i * PAGE_SIZE + 3]) for i in range(3)]
                    assert got == [b"fiv", b"dom", b"for"]
                    m.buffer[PAGE_SIZE + 10] = 7
                    assert p3.buffer[10] == 7
                with pytest.raises(ValueError):
                    table.map_grant_refs([3], [1, 2])


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong_grantee", errno.EINVAL),
        ("wrong_granter", errno.EINVAL),
        ("reserved_ref", errno.EINVAL),
        ("huge_ref", errno.EINVAL),
        ("readonly_grant_mapped_writable", errno.EINVAL),
    ],
)
def test_mapping_what_was_not_granted_fails(
    lib: str, xen_dir: Path, case: str, expected: int
) -> None:
    with GrantSharer(library=lib) as sharer:
        pages = sharer.share_pages(1, 1, writable=case != "readonly_grant_mapped_writable")
        ref = pages.refs[0]
        mapper, granter = 1, 0
        if case == "wrong_grantee":
            mapper = 2
        elif case == "wrong_granter":
            granter = 5
        elif case == "reserved_ref":
            ref = 3
        elif case == "huge_ref":
            ref = 0xFFFFFFF0
        with domain(mapper), GrantTable(library=lib) as table:
            with pytest.raises(XenLibraryError) as info:
                table.map_grant_ref(granter, ref)
            assert info.value.function == "xengnttab_map_grant_ref"
            assert info.value.errno == expected
            with pytest.raises(XenLibraryError) as info2:
                table.map_domain_grant_refs(granter, [ref])
            assert info2.value.function == "xengnttab_map_domain_grant_refs"
            with pytest.raises(XenLibraryError) as info3:
                table.map_grant_refs([granter], [ref])
            assert info3.value.function == "xengnttab_map_grant_refs"
            if case == "readonly_grant_mapped_writable":
                with table.map_grant_ref(0, ref, writable=False) as ro:
                    assert ro.buffer.readonly
        pages.close()


def test_partial_failure_maps_nothing(lib: str, xen_dir: Path, mockxen: MockXen) -> None:
    with (
        GrantSharer(library=lib) as sharer,
        sharer.share_pages(1, 2) as pages,
        domain(1),
        GrantTable(library=lib) as table,
    ):
        with pytest.raises(XenLibraryError):
            table.map_domain_grant_refs(0, [pages.refs[0], pages.refs[1], 9999])
        assert mockxen.live()["mappings"] == 0
        assert mockxen.dir_live(xen_dir)["mappings"] == 0


def test_readonly_share_is_readonly_for_the_peer(lib: str, xen_dir: Path) -> None:
    with GrantSharer(library=lib) as sharer, sharer.share_pages(1, 1, writable=False) as pages:
        pages.buffer[0] = 42  # the owner always writes
        with domain(1), GrantTable(library=lib) as table:
            with pytest.raises(XenLibraryError):
                table.map_grant_ref(0, pages.refs[0], writable=True)
            with table.map_grant_ref(0, pages.refs[0], writable=False) as m:
                assert m.buffer[0] == 42
                with pytest.raises(TypeError):
                    m.buffer[0] = 1


def test_unshare_while_mapped_defers_the_free(lib: str, xen_dir: Path, mockxen: MockXen) -> None:
    with GrantSharer(library=lib) as sharer, domain(1), GrantTable(library=lib) as table:
        pages = sharer.share_pages(1, 1)
        ref = pages.refs[0]
        pages.buffer[0:4] = b"live"
        mapping = table.map_grant_ref(0, ref)
        pages.close()
        assert mockxen.live()["grants"] == 0
        # the grant is ended but its page stays with the mapper (Linux defers the free)
        assert mockxen.dir_live(xen_dir)["grants"] == 1
        assert bytes(mapping.buffer[0:4]) == b"live"
        with pytest.raises(XenLibraryError) as info:
            table.map_grant_ref(0, ref)  # an ended grant cannot be mapped again
        assert info.value.errno == errno.EINVAL
        mapping.close()
        assert mockxen.dir_live(xen_dir)["grants"] == 0


def test_grant_limit_is_enospc(
    lib: str, tmp_path: Path, mockxen: MockXen, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (
        xen_system(tmp_path, mockxen, monkeypatch, grant_limit=4),
        GrantSharer(library=lib) as sharer,
    ):
        a = sharer.share_pages(1, 3)
        with pytest.raises(XenLibraryError) as info:
            sharer.share_pages(1, 2)
        assert info.value.errno == errno.ENOSPC
        assert info.value.function == "xengntshr_share_pages"
        with domain(7), GrantSharer(library=lib) as other:
            other.share_pages(1, 4).close()  # the limit is per granting domain
        b = sharer.share_pages(1, 1)
        a.close()
        sharer.share_pages(1, 3).close()
        b.close()


def test_buffer_still_in_use_blocks_the_unmap(lib: str, xen_dir: Path, mockxen: MockXen) -> None:
    with GrantSharer(library=lib) as sharer:
        pages = sharer.share_pages(1, 1)
        piece = pages.buffer[10:20]
        with pytest.raises(BufferError):
            pages.close()
        assert mockxen.live()["grants"] == 1  # still shared: the slice points into it
        piece.release()
        pages.close()
        assert mockxen.live()["grants"] == 0


def test_closing_the_handle_gives_back_its_regions(
    lib: str, xen_dir: Path, mockxen: MockXen
) -> None:
    sharer = GrantSharer(library=lib)
    pages = [sharer.share_pages(1, 2), sharer.share_pages(1, 1)]
    with domain(1):
        table = GrantTable(library=lib)
    maps = [table.map_grant_ref(0, ref) for ref in pages[0].refs]
    assert mockxen.live() == {"grants": 3, "mappings": 2, "ports": 0, "handles": 2}
    table.close()
    assert all(m.closed for m in maps)
    sharer.close()
    assert all(p.closed for p in pages)
    assert mockxen.live() == {"grants": 0, "mappings": 0, "ports": 0, "handles": 0}
    sharer.close()
    table.close()


def test_use_after_close_raises(lib: str, xen_dir: Path) -> None:
    table = GrantTable(library=lib)
    sharer = GrantSharer(library=lib)
    table.close()
    sharer.close()
    calls: list[Callable[[], object]] = [
        lambda: table.map_grant_ref(0, 8),
        lambda: table.map_grant_refs([0], [8]),
        lambda: table.map_domain_grant_refs(0, [8]),
        lambda: table.fileno(),
        lambda: table.set_max_grants(4),
        lambda: table.grant_copy([GrantCopySegment(ForeignPage(0, 8), bytearray(1), 1)]),
        lambda: sharer.share_pages(0, 1),
        lambda: sharer.share_page_notify(0),
        lambda: sharer.fileno(),
    ]
    for call in calls:
        with pytest.raises(HandleClosedError):
            call()
    with pytest.raises(HandleClosedError), table:
        pass


def test_fileno_and_set_max_grants(lib: str, xen_dir: Path) -> None:
    with GrantTable(library=lib) as table, GrantSharer(library=lib) as sharer:
        table.set_max_grants(128)
        tfd, sfd = table.fileno(), sharer.fileno()
        assert tfd != sfd
        assert os.readlink(f"/proc/self/fd/{tfd}").endswith("/gntdev")
        assert os.readlink(f"/proc/self/fd/{sfd}").endswith("/gntalloc")
        # like the real library: gntdev is opened O_CLOEXEC, gntalloc is not
        assert fcntl.fcntl(tfd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert not fcntl.fcntl(sfd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC


# ------------------------------------------------------- unmap notifications


def test_map_notify_clears_byte_and_signals_on_unmap(
    lib: str, mock_libs: dict[str, Path], xen_dir: Path
) -> None:
    elib = str(mock_libs[EVTCHN])
    with (
        GrantSharer(library=lib) as sharer,
        sharer.share_pages(1, 1) as pages,
        EventChannel(library=elib) as ch0,
        domain(1),
        EventChannel(library=elib) as ch1,
    ):
        port0 = ch0.bind_unbound_port(1)
        port1 = ch1.bind_interdomain(0, port0)
        assert ch1.wait(1) == port1  # Xen leaves a new interdomain port pending
        ch1.unmask(port1)
        pages.buffer[100] = 0xAA
        pages.buffer[101] = 0xBB
        with GrantTable(library=lib) as table:
            m = table.map_grant_ref(0, pages.refs[0], notify_offset=100, notify_port=port1)
            assert m.buffer[100] == 0xAA
            assert ch0.wait(0.05) is None
            m.close()
        assert pages.buffer[100] == 0 and pages.buffer[101] == 0xBB
        assert ch0.wait(2) == port0


def test_map_notify_errors(lib: str, xen_dir: Path, mockxen: MockXen) -> None:
    with (
        GrantSharer(library=lib) as sharer,
        sharer.share_pages(1, 1) as pages,
        domain(1),
        GrantTable(library=lib) as table,
    ):
        with pytest.raises(XenLibraryError) as info:
            table.map_grant_ref(0, pages.refs[0], notify_port=77)  # not bound
        assert info.value.function == "xengnttab_map_grant_ref_notify"
        assert info.value.errno == errno.EINVAL
        with pytest.raises(XenLibraryError):  # a read-only map cannot clear a byte
            table.map_grant_ref(0, pages.refs[0], writable=False, notify_offset=0)
        with pytest.raises(ValueError):
            table.map_grant_ref(0, pages.refs[0], notify_offset=PAGE_SIZE)
        assert mockxen.live()["mappings"] == 0


def test_share_page_notify_clears_byte_and_signals_on_unshare(
    lib: str, mock_libs: dict[str, Path], xen_dir: Path
) -> None:
    elib = str(mock_libs[EVTCHN])
    with domain(1):
        ch1 = EventChannel(library=elib)
        table = GrantTable(library=lib)
    with EventChannel(library=elib) as ch0, ch1, table:
        port0 = ch0.bind_unbound_port(1)
        port1 = ch1.bind_interdomain(0, port0)
        assert ch1.wait(1) == port1
        ch1.unmask(port1)
        with GrantSharer(library=lib) as sharer:
            page = sharer.share_page_notify(1, notify_offset=7, notify_port=port0)
            assert page.count == 1 and len(page.refs) == 1
            page.buffer[7] = 1
            with table.map_grant_ref(0, page.refs[0]) as m:
                assert m.buffer[7] == 1
                page.close()
                assert m.buffer[7] == 0  # cleared in the page the peer still maps
                assert ch1.wait(2) == port1
            with pytest.raises(XenLibraryError) as info:
                sharer.share_page_notify(1, notify_port=99)
            assert info.value.function == "xengntshr_share_page_notify"
            assert info.value.errno == errno.EINVAL


# ---------------------------------------------------------------- grant copy


def test_grant_copy_both_directions(lib: str, xen_dir: Path) -> None:
    with GrantSharer(library=lib) as sharer:
        rw = sharer.share_pages(1, 1)
        ro = sharer.share_pages(1, 1, writable=False)
        rw.buffer[200:205] = b"12345"
        with domain(1), GrantTable(library=lib) as table:
            out = bytearray(8)
            segments = [
                GrantCopySegment(ForeignPage(0, rw.refs[0], 200), out, 5),
                GrantCopySegment(b"xyz", ForeignPage(0, rw.refs[0], 4093), 3),
                GrantCopySegment(b"no", ForeignPage(0, ro.refs[0], 0), 2),
                GrantCopySegment(ForeignPage(0, 5), bytearray(1), 1),
                GrantCopySegment(ForeignPage(0, rw.refs[0], 4093), ForeignPage(0, rw.refs[0]), 3),
                GrantCopySegment(ForeignPage(9, rw.refs[0]), bytearray(1), 1),
            ]
            statuses = table.grant_copy(segments)
            assert statuses == [0, 0, GNTST_GENERAL_ERROR, GNTST_BAD_GNTREF, 0, GNTST_GENERAL_ERROR]
            assert [s.status for s in segments] == statuses
            assert bytes(out[:5]) == b"12345"
            assert bytes(rw.buffer[4093:4096]) == b"xyz"
            assert bytes(rw.buffer[0:3]) == b"xyz"  # foreign to foreign
            assert bytes(ro.buffer[0:2]) == b"\0\0"
            assert table.grant_copy([]) == []
            with pytest.raises(ValueError):
                table.grant_copy([GrantCopySegment(b"a", bytearray(1), 1)])
        rw.close()
        ro.close()


def test_grant_copy_whole_batch_errors(lib: str, xen_dir: Path, raw: ctypes.CDLL) -> None:
    """What the bindings refuse up front, the mock refuses like gntdev: EINVAL."""
    handle = raw.xengnttab_open(None, 0)
    try:
        seg = (ctypes.c_byte * 24)()  # flags 0: neither side is a grant
        ctypes.memset(seg, 0, 24)
        ctypes.set_errno(0)
        assert raw.xengnttab_grant_copy(handle, 1, seg) == -1
        assert ctypes.get_errno() == errno.EINVAL
    finally:
        assert raw.xengnttab_close(handle) == 0


# ------------------------------------------------------ C-level edge cases


def test_unmap_and_unshare_argument_checks(lib: str, xen_dir: Path, raw: ctypes.CDLL) -> None:
    shr = raw.xengntshr_open(None, 0)
    tab = None
    try:
        refs = (ctypes.c_uint32 * 2)()
        addr = raw.xengntshr_share_pages(shr, 0, 2, refs, 1)
        assert addr
        for bad_addr, count in ((None, 2), (addr, 1), (addr, 3), (addr + PAGE_SIZE, 1)):
            ctypes.set_errno(0)
            assert raw.xengntshr_unshare(shr, bad_addr, count) == -1
            assert ctypes.get_errno() == errno.EINVAL
        tab = raw.xengnttab_open(None, 0)
        domids = (ctypes.c_uint32 * 2)(0, 0)
        maddr = raw.xengnttab_map_grant_refs(tab, 2, domids, refs, mmap.PROT_READ)
        assert maddr
        for bad_addr, count in ((None, 2), (maddr, 1), (addr, 2)):
            ctypes.set_errno(0)
            assert raw.xengnttab_unmap(tab, bad_addr, count) == -1
            assert ctypes.get_errno() == errno.EINVAL
        ctypes.set_errno(0)
        assert raw.xengnttab_map_grant_refs(tab, 0, domids, refs, mmap.PROT_READ) is None
        assert ctypes.get_errno() == errno.EINVAL
        assert raw.xengnttab_unmap(tab, maddr, 2) == 0
        assert raw.xengntshr_unshare(shr, addr, 2) == 0
    finally:
        if tab:
            assert raw.xengnttab_close(tab) == 0
        assert raw.xengntshr_close(shr) == 0
    assert raw.xengnttab_close(None) == 0 and raw.xengntshr_close(None) == 0


def test_closed_or_foreign_handle_is_ebadf(
    lib: str, xen_dir: Path, raw: ctypes.CDLL, mockxen: MockXen
) -> None:
    tab = raw.xengnttab_open(None, 0)
    shr = raw.xengntshr_open(None, 0)
    ctypes.set_errno(0)
    assert raw.xengntshr_fd(tab) == -1  # a gntdev handle given to a gntalloc call
    assert ctypes.get_errno() == errno.ENOTTY
    assert raw.xengnttab_close(tab) == 0
    ctypes.set_errno(0)
    assert raw.xengnttab_fd(tab) == -1
    assert ctypes.get_errno() == errno.EBADF
    assert raw.xengnttab_close(tab) == -1  # double close is caught too
    bogus = ctypes.create_string_buffer(64)
    assert raw.xengnttab_fd(ctypes.addressof(bogus)) == -1
    assert ctypes.get_errno() == errno.EBADF
    assert mockxen.misuse() == 4
    assert raw.xengntshr_close(shr) == 0
    mockxen.reset()


def test_dmabuf_calls_are_enosys(xen_dir: Path, raw: ctypes.CDLL) -> None:
    tab = raw.xengnttab_open(None, 0)
    try:
        fd = ctypes.c_uint32()
        refs = (ctypes.c_uint32 * 1)(8)
        calls = {
            "xengnttab_dmabuf_exp_from_refs": (0, 0, 1, refs, ctypes.byref(fd)),
            "xengnttab_dmabuf_exp_wait_released": (3, 10),
            "xengnttab_dmabuf_imp_to_refs": (0, 3, 1, refs),
            "xengnttab_dmabuf_imp_release": (3,),
        }
        for name, args in calls.items():
            func = getattr(raw, name)
            ctypes.set_errno(0)
            assert func(ctypes.c_void_p(tab), *args) == -1, name
            assert ctypes.get_errno() == errno.ENOSYS, name
    finally:
        raw.xengnttab_close(tab)


# ------------------------------------------------------------ second process


def test_peer_process_maps_our_pages(
    mock_libs: dict[str, Path], lib: str, xen_dir: Path, mockxen: MockXen
) -> None:
    with GrantSharer(library=lib) as sharer, sharer.share_pages(5, 2) as pages:
        pages.buffer[0:6] = b"from 0"
        with PeerProcess(mock_libs, xen_dir, domid=5) as peer:
            table = peer.call("open_gnttab")
            mid = peer.call("map", table=table, domid=0, refs=list(pages.refs))
            assert bytes.fromhex(peer.call("read", id=mid, offset=0, length=6)) == b"from 0"
            peer.call("write", id=mid, offset=PAGE_SIZE + 1, data=b"from 5".hex())
            assert bytes(pages.buffer[PAGE_SIZE + 1 : PAGE_SIZE + 7]) == b"from 5"
            assert peer.call("live")["mappings"] == 1
            assert mockxen.dir_live(xen_dir)["mappings"] == 1
            # a process of domain 5 cannot map what was granted to domain 5 by
            # somebody else, nor a grant to another domain
            with pytest.raises(PeerError) as info:
                peer.call("map", table=table, domid=3, refs=[pages.refs[0]])
            assert info.value.errno == errno.EINVAL
            assert info.value.function == "xengnttab_map_grant_ref"
            peer.call("close", id=mid)
            assert peer.call("live") == {"grants": 0, "mappings": 0, "ports": 0, "handles": 1}
            assert peer.close() == 0
        assert mockxen.dir_live(xen_dir) == {"grants": 2, "mappings": 0, "ports": 0, "handles": 1}


def test_we_map_pages_of_a_peer_process(
    mock_libs: dict[str, Path], lib: str, xen_dir: Path
) -> None:
    with PeerProcess(mock_libs, xen_dir, domid=6) as peer:
        sharer = peer.call("open_gntshr")
        shared = peer.call("share", sharer=sharer, domid=0, count=3)
        peer.call("write", id=shared["id"], offset=2 * PAGE_SIZE, data=b"peer".hex())
        with GrantTable(library=lib) as table, table.map_domain_grant_refs(6, shared["refs"]) as m:
            assert bytes(m.buffer[2 * PAGE_SIZE : 2 * PAGE_SIZE + 4]) == b"peer"
            m.buffer[5:8] = b"dom"
            got = peer.call("read", id=shared["id"], offset=5, length=3)
            assert bytes.fromhex(got) == b"dom"
        peer.call("close", id=shared["id"])


def test_dead_mapper_is_collected_with_its_notifications(
    mock_libs: dict[str, Path], lib: str, xen_dir: Path, mockxen: MockXen
) -> None:
    elib = str(mock_libs[EVTCHN])
    with (
        GrantSharer(library=lib) as sharer,
        sharer.share_pages(8, 1) as page,
        EventChannel(library=elib) as ch,
    ):
        port = ch.bind_unbound_port(8)
        page.buffer[3] = 0x5A
        peer = PeerProcess(mock_libs, xen_dir, domid=8)
        try:
            evt = peer.call("open_evtchn")
            peer_port = peer.call("bind_interdomain", ch=evt, domid=0, port=port)
            table = peer.call("open_gnttab")
            peer.call(
                "map",
                table=table,
                domid=0,
                refs=[page.refs[0]],
                notify_offset=3,
                notify_port=peer_port,
            )
            assert mockxen.dir_live(xen_dir)["mappings"] == 1
        finally:
            peer.kill()  # SIGKILL: the "kernel" must clean up
        assert page.buffer[3] == 0x5A  # nothing happens until the collection
        mockxen.gc(xen_dir)
        assert page.buffer[3] == 0
        assert ch.wait(2) == port
        live = mockxen.dir_live(xen_dir)
        assert live == {"grants": 1, "mappings": 0, "ports": 1, "handles": 2}


def test_dead_sharer_leaves_the_mapping_usable(
    mock_libs: dict[str, Path], lib: str, xen_dir: Path, mockxen: MockXen
) -> None:
    peer = PeerProcess(mock_libs, xen_dir, domid=9)
    try:
        sharer = peer.call("open_gntshr")
        shared = peer.call("share", sharer=sharer, domid=0, count=1)
        peer.call("write", id=shared["id"], offset=0, data=b"still".hex())
        with GrantTable(library=lib) as table:
            m = table.map_grant_ref(9, shared["refs"][0])
            peer.kill()
            mockxen.gc(xen_dir)
            assert mockxen.dir_live(xen_dir)["grants"] == 1  # ended, still mapped
            assert bytes(m.buffer[:5]) == b"still"
            with pytest.raises(XenLibraryError):
                table.map_grant_ref(9, shared["refs"][0])
            m.close()
        assert mockxen.dir_live(xen_dir)["grants"] == 0
    finally:
        peer.kill()


def test_fail_env_configures_a_second_process(
    mock_libs: dict[str, Path], lib: str, xen_dir: Path
) -> None:
    with GrantSharer(library=lib) as sharer, sharer.share_pages(4, 1) as page:
        env = {"MOCKXEN_FAIL": "xengnttab_map_grant_ref:2:EPERM,xengntshr_open:1:13"}
        with PeerProcess(mock_libs, xen_dir, domid=4, env=env) as peer:
            with pytest.raises(PeerError) as info:
                peer.call("open_gntshr")
            assert info.value.errno == errno.EACCES
            assert info.value.function == "xengntshr_open"
            table = peer.call("open_gnttab")
            first = peer.call("map", table=table, domid=0, refs=[page.refs[0]])
            with pytest.raises(PeerError) as info:
                peer.call("map", table=table, domid=0, refs=[page.refs[0]])
            assert info.value.errno == errno.EPERM
            assert info.value.kind == "XenPermissionError"
            third = peer.call("map", table=table, domid=0, refs=[page.refs[0]])
            peer.call("close", id=first)
            peer.call("close", id=third)


def test_close_in_a_fork_child_leaves_the_parent_alone(
    lib: str, xen_dir: Path, mockxen: MockXen
) -> None:
    with GrantSharer(library=lib) as sharer, sharer.share_pages(1, 1) as pages:
        with domain(1):
            table = GrantTable(library=lib)
        with table, table.map_grant_ref(0, pages.refs[0]) as mapping:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 0
                try:
                    table.close()
                    sharer.close()
                except BaseException:
                    code = 1
                os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert mockxen.dir_live(xen_dir) == {
                "grants": 1,
                "mappings": 1,
                "ports": 0,
                "handles": 2,
            }
            pages.buffer[0] = 0x42
            assert mapping.buffer[0] == 0x42
            assert os.waitstatus_to_exitcode(status) == 0
