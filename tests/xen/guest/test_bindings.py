"""Group "bindings": pyxen9p's ctypes bindings against the real Xen libraries in dom0.

Grants are shared with domain 0 itself and mapped back; event channels are
connected between two handles of dom0; XenStore is the real oxenstored.
Results are cross-checked with Xen's own command-line tools where possible.
"""

from __future__ import annotations

import errno
import json
import os
import select
from collections.abc import Iterator
from pathlib import Path

import pytest
import xenlab

from pyxen9p.interfaces import Permission, PermissionFlag, XenPlatform
from pyxen9p.libs import EventChannel, GrantSharer, GrantTable, RealXen, XenStore
from pyxen9p.libs.xengnttab import ForeignPage, GrantCopySegment

pytestmark = pytest.mark.realxen

PAGE = 4096
DOM0 = 0


def pattern(seed: int, size: int = PAGE) -> bytes:
    """Deterministic, page-distinguishing bytes."""
    return bytes((seed * 31 + i * 7 + (i >> 8)) & 0xFF for i in range(size))


# --------------------------------------------------------------------------- grants


@pytest.fixture
def sharer() -> Iterator[GrantSharer]:
    with GrantSharer() as handle:
        yield handle


@pytest.fixture
def table() -> Iterator[GrantTable]:
    with GrantTable() as handle:
        yield handle


def test_share_one_page_and_map_it_back(sharer: GrantSharer, table: GrantTable) -> None:
    with sharer.share_pages(DOM0, 1) as pages:
        assert len(pages.refs) == 1
        assert len(pages.buffer) == PAGE
        assert bytes(pages.buffer) == bytes(PAGE), "fresh shared pages are zeroed"
        pages.buffer[:] = pattern(1)
        with table.map_grant_ref(DOM0, pages.refs[0]) as mapping:
            assert len(mapping.buffer) == PAGE
            assert bytes(mapping.buffer) == pattern(1)
            # and the other way: written through the mapping, seen by the sharer
            mapping.buffer[100:200] = b"\xa5" * 100
            assert bytes(pages.buffer[100:200]) == b"\xa5" * 100
            assert bytes(pages.buffer[:100]) == pattern(1)[:100]


def test_share_many_pages_map_them_contiguously(sharer: GrantSharer, table: GrantTable) -> None:
    count = 8
    with sharer.share_pages(DOM0, count) as pages:
        assert len(pages.refs) == count
        assert len(set(pages.refs)) == count
        for i in range(count):
            pages.buffer[i * PAGE : (i + 1) * PAGE] = pattern(i + 10)
        with table.map_grant_refs([DOM0] * count, list(pages.refs)) as mapping:
            assert len(mapping.buffer) == count * PAGE
            for i in range(count):
                assert bytes(mapping.buffer[i * PAGE : (i + 1) * PAGE]) == pattern(i + 10)
        # reversed order through map_domain_grant_refs
        refs = list(reversed(pages.refs))
        with table.map_domain_grant_refs(DOM0, refs) as mapping:
            for i in range(count):
                expected = pattern(count - 1 - i + 10)
                assert bytes(mapping.buffer[i * PAGE : (i + 1) * PAGE]) == expected


def test_read_only_mapping_and_read_only_grant(sharer: GrantSharer, table: GrantTable) -> None:
    with sharer.share_pages(DOM0, 1) as pages:
        pages.buffer[:4] = b"ro!!"
        with table.map_grant_ref(DOM0, pages.refs[0], writable=False) as mapping:
            assert mapping.buffer.readonly
            assert bytes(mapping.buffer[:4]) == b"ro!!"
            with pytest.raises(TypeError):
                mapping.buffer[0] = 0
    with sharer.share_pages(DOM0, 1, writable=False) as pages:
        pages.buffer[:2] = b"ok"
        with table.map_grant_ref(DOM0, pages.refs[0], writable=False) as mapping:
            assert bytes(mapping.buffer[:2]) == b"ok"
        with pytest.raises(OSError):
            table.map_grant_ref(DOM0, pages.refs[0], writable=True)


def test_unshared_grant_cannot_be_mapped(sharer: GrantSharer, table: GrantTable) -> None:
    pages = sharer.share_pages(DOM0, 1)
    ref = pages.refs[0]
    pages.close()
    pages.close()  # idempotent
    with pytest.raises(ValueError):
        pages.buffer  # noqa: B018
    with pytest.raises(OSError):
        table.map_grant_ref(DOM0, ref)


def test_sharing_does_not_leak_grants(sharer: GrantSharer) -> None:
    # gntalloc allows 1024 grants system-wide by default: leaking would fail here.
    for round_ in range(80):
        pages = sharer.share_pages(DOM0, 16)
        pages.buffer[0] = round_ & 0xFF
        pages.close()
    with GrantSharer() as other, other.share_pages(DOM0, 512) as big:
        assert len(big.refs) == 512


def test_grant_copy_to_and_from_a_granted_page(sharer: GrantSharer, table: GrantTable) -> None:
    with sharer.share_pages(DOM0, 1) as pages:
        pages.buffer[:] = pattern(3)
        ref = pages.refs[0]
        into = bytearray(64)
        segments = [
            GrantCopySegment(ForeignPage(DOM0, ref, 1000), into, 64),
            GrantCopySegment(b"copied-in", ForeignPage(DOM0, ref, 2000), 9),
        ]
        assert table.grant_copy(segments) == [0, 0]
        assert bytes(into) == pattern(3)[1000:1064]
        assert bytes(pages.buffer[2000:2009]) == b"copied-in"


def test_unshare_notify_clears_byte_and_signals(sharer: GrantSharer, table: GrantTable) -> None:
    with EventChannel() as local, EventChannel() as remote:
        port = local.bind_unbound_port(DOM0)
        peer = remote.bind_interdomain(DOM0, port)
        drain_bind_event(remote, peer)
        pages = sharer.share_page_notify(DOM0, notify_offset=16, notify_port=port)
        pages.buffer[16] = 0x77
        with table.map_grant_ref(DOM0, pages.refs[0]) as mapping:
            assert mapping.buffer[16] == 0x77
            assert remote.wait(0.2) is None
            pages.close()  # the mapping keeps the page alive
            assert remote.wait(10) == peer
            remote.unmask(peer)
            assert mapping.buffer[16] == 0


# --------------------------------------------------------------------------- event channels


def user_evtchn_irqs() -> int:
    """Interrupt lines bound through /dev/xen/evtchn by processes named python3."""
    text = Path("/proc/interrupts").read_text()
    return sum(1 for line in text.splitlines() if "evtchn:python3" in line)


def drain_bind_event(channel: EventChannel, port: int) -> None:
    """Consume the event Xen raises on a port that ``bind_interdomain`` just bound.

    (Xen sets the new local port pending, in case a notification sent to
    the unbound port was lost.)
    """
    assert channel.wait(10) == port
    channel.unmask(port)
    assert channel.wait(0.1) is None


@pytest.fixture
def pair() -> Iterator[tuple[EventChannel, EventChannel, int, int]]:
    with EventChannel() as a, EventChannel() as b:
        port_a = a.bind_unbound_port(DOM0)
        port_b = b.bind_interdomain(DOM0, port_a)
        drain_bind_event(b, port_b)
        yield a, b, port_a, port_b


def test_evtchn_bind_interdomain_leaves_the_new_port_pending() -> None:
    with EventChannel() as a, EventChannel() as b:
        port_a = a.bind_unbound_port(DOM0)
        assert a.wait(0.1) is None
        port_b = b.bind_interdomain(DOM0, port_a)
        assert b.wait(10) == port_b
        b.unmask(port_b)
        assert a.wait(0.1) is None, "the unbound side is not notified by the bind"


def test_evtchn_loopback_notify_both_ways(
    pair: tuple[EventChannel, EventChannel, int, int],
) -> None:
    a, b, port_a, port_b = pair
    assert port_a != port_b
    assert b.wait(0.1) is None, "nothing pending before a notify"
    a.notify(port_a)
    assert b.wait(10) == port_b
    b.unmask(port_b)
    b.notify(port_b)
    assert a.wait(10) == port_a
    a.unmask(port_a)
    assert a.wait(0.1) is None
    assert b.wait(0.1) is None


def test_evtchn_pending_names_the_right_port() -> None:
    with EventChannel() as a, EventChannel() as b:
        pairs = []
        for _ in range(4):
            pa = a.bind_unbound_port(DOM0)
            pb = b.bind_interdomain(DOM0, pa)
            drain_bind_event(b, pb)
            pairs.append((pa, pb))
        for pa, pb in (pairs[2], pairs[0], pairs[3]):
            a.notify(pa)
            got = b.wait(10)
            assert got == pb
            b.unmask(pb)
        assert b.wait(0.1) is None
        assert a.bound_ports == frozenset(pa for pa, _ in pairs)


def test_evtchn_masked_until_unmask(pair: tuple[EventChannel, EventChannel, int, int]) -> None:
    a, b, port_a, port_b = pair
    a.notify(port_a)
    assert b.wait(10) == port_b
    a.notify(port_a)  # arrives while masked: latched, not delivered
    assert b.wait(0.2) is None
    b.unmask(port_b)
    assert b.wait(10) == port_b
    b.unmask(port_b)


def test_evtchn_fileno_becomes_readable(pair: tuple[EventChannel, EventChannel, int, int]) -> None:
    a, b, port_a, port_b = pair
    fd = b.fileno()
    assert select.select([fd], [], [], 0.1)[0] == []
    a.notify(port_a)
    assert select.select([fd], [], [], 10)[0] == [fd]
    assert b.pending() == port_b
    b.unmask(port_b)


def test_evtchn_ports_released_on_unbind_and_close() -> None:
    before = user_evtchn_irqs()
    with EventChannel() as a:
        ports = [a.bind_unbound_port(DOM0) for _ in range(6)]
        assert user_evtchn_irqs() == before + 6
        a.unbind(ports[0])
        assert user_evtchn_irqs() == before + 5
    assert user_evtchn_irqs() == before


def test_evtchn_bind_to_a_missing_port_fails() -> None:
    with EventChannel() as a, pytest.raises(OSError) as info:
        a.bind_interdomain(DOM0, 65000)
    assert info.value.errno in (errno.EINVAL, errno.ENOENT, errno.EBADF)


# --------------------------------------------------------------------------- xenstore


@pytest.fixture
def xs() -> Iterator[XenStore]:
    with XenStore() as store:
        yield store


@pytest.fixture
def base(xs: XenStore) -> Iterator[str]:
    path = f"/local/domain/0/data/pyxen9p-bindings/{os.getpid()}-{os.urandom(3).hex()}"
    yield path
    xenlab.xs_rm(path)


def test_xenstore_write_read_directory_rm(xs: XenStore, base: str) -> None:
    xs.write(f"{base}/a", b"bin\x00ary\xff")
    xs.write(f"{base}/b/c", "text é")
    xs.mkdir(f"{base}/empty")
    assert xs.read(f"{base}/a") == b"bin\x00ary\xff"
    assert xs.read(f"{base}/b/c") == "text é".encode()
    assert xs.read(f"{base}/empty") == b""
    assert sorted(xs.directory(base)) == ["a", "b", "empty"]
    # the real tools see the same store
    assert xenlab.xs_read(f"{base}/b/c") == "text é"
    assert sorted(xenlab.xs_list(base)) == ["a", "b", "empty"]
    xs.rm(f"{base}/b")
    assert sorted(xs.directory(base)) == ["a", "empty"]
    with pytest.raises(FileNotFoundError):
        xs.read(f"{base}/b/c")
    with pytest.raises(FileNotFoundError):
        xs.directory(f"{base}/nope")


def test_xenstore_relative_paths_and_domain_path(xs: XenStore, base: str) -> None:
    assert xs.get_domain_path(0) == "/local/domain/0"
    assert xs.get_domain_path(7) == "/local/domain/7"
    relative = base.removeprefix("/local/domain/0/")
    xs.write(f"{relative}/rel", b"r")
    assert xenlab.xs_read(f"{base}/rel") == "r"
    assert xs.read(f"{base}/rel") == b"r"


def test_xenstore_permissions_roundtrip(xs: XenStore, base: str) -> None:
    path = f"{base}/perm"
    xs.write(path, b"x")
    perms = [
        Permission(0, PermissionFlag.NONE),
        Permission(5, PermissionFlag.READ),
        Permission(6, PermissionFlag.READ | PermissionFlag.WRITE),
    ]
    xs.set_permissions(path, perms)
    assert xs.get_permissions(path) == perms
    listing = xenlab.sh(["xenstore-ls", "-p", base]).stdout
    assert "n0,r5,b6" in listing


def test_xenstore_transaction_commit_and_abort(xs: XenStore, base: str) -> None:
    for txn in xs.transaction():
        with txn:
            txn.write(f"{base}/t/one", b"1")
            txn.write(f"{base}/t/two", b"2")
            assert txn.read(f"{base}/t/one") == b"1"
    assert xenlab.xs_read(f"{base}/t/two") == "2"

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        for txn in xs.transaction():
            with txn:
                txn.write(f"{base}/t/three", b"3")
                raise Boom
    assert xenlab.xs_read(f"{base}/t/three") is None


def test_xenstore_transaction_conflict_is_retried(xs: XenStore, base: str) -> None:
    key = f"{base}/counter"
    xs.write(key, b"0")
    attempts = 0
    with XenStore() as other:
        for txn in xs.transaction():
            with txn:
                attempts += 1
                value = int(txn.read(key))
                if attempts == 1:
                    other.write(key, b"100")  # a concurrent change: this attempt must fail
                txn.write(key, str(value + 1).encode())
    assert attempts == 2
    assert xs.read(key) == b"101"


def test_xenstore_watch_fires_initially_and_on_change(xs: XenStore, base: str) -> None:
    xs.mkdir(base)
    with xs.watch(base, "tok-a") as watch:
        first = watch.get(10)
        assert first is not None
        assert (first.path, first.token) == (base, "tok-a")
        while watch.get(0.2) is not None:  # drop spurious extra firings
            pass
        xenlab.xs_write({f"{base}/child": "v"})  # from another process
        event = watch.get(10)
        assert event is not None
        assert event.path == f"{base}/child"
        assert event.token == "tok-a"
        assert watch.get(0.3) is None
    xs.write(f"{base}/after", b"1")
    assert watch.get(0.3) is None, "a closed watch yields nothing"


def test_xenstore_two_watches_are_dispatched_by_token(xs: XenStore, base: str) -> None:
    xs.mkdir(f"{base}/x")
    xs.mkdir(f"{base}/y")
    with xs.watch(f"{base}/x") as wx, xs.watch(f"{base}/y") as wy:
        assert wx.get(10) is not None
        assert wy.get(10) is not None
        xs.write(f"{base}/y/n", b"1")
        event = wy.get(10)
        assert event is not None
        assert event.path == f"{base}/y/n"
        assert wx.get(0.3) is None


@pytest.mark.release("bookworm")
def test_xenstore_reads_what_qemu_publishes(
    xs: XenStore, dom0_9pfs: xenlab.Dom0NinePDevice
) -> None:
    dev = dom0_9pfs
    assert xs.read(f"{dev.backend}/state") == b"2"
    assert xs.read(f"{dev.backend}/versions").split(b",")[0] == b"1"
    assert int(xs.read(f"{dev.backend}/max-rings")) == 8
    assert int(xs.read(f"{dev.backend}/max-ring-page-order")) == 9
    assert xs.read(f"{dev.frontend}/tag") == b"pyxen9p"
    with xs.watch(f"{dev.backend}/state") as watch:
        assert watch.get(10) is not None
        xs.write(f"{dev.frontend}/state", b"6")  # frontend Closed
        # QEMU answers a closed frontend by closing its side too
        for _ in range(10):
            if watch.get(20) is None or xs.read(f"{dev.backend}/state") == b"6":
                break
        assert xs.read(f"{dev.backend}/state") == b"6"


@pytest.mark.release("trixie")
def test_xenstore_reads_what_xen_9pfsd_publishes(xs: XenStore, share_dir: Path) -> None:
    xenlab.blacklist_9pnet_xen()
    xenlab.ensure_xen_9pfsd()
    with xenlab.xen_9pfsd_device(share_dir, tag="pyxen9p") as dev:
        assert xs.read(f"{dev.backend}/state") == b"2"
        assert xs.read(f"{dev.backend}/versions").split(b",")[0] == b"1"
        assert int(xs.read(f"{dev.backend}/max-rings")) == 4
        assert int(xs.read(f"{dev.backend}/max-ring-page-order")) == 9
        with xs.watch(f"{dev.backend}/state") as watch:
            assert watch.get(10) is not None
            xs.write(f"{dev.frontend}/state", b"6")  # frontend Closed
            for _ in range(10):
                if watch.get(20) is None or xs.read(f"{dev.backend}/state") == b"6":
                    break
            assert xs.read(f"{dev.backend}/state") == b"6"


def test_real_xen_platform_hands_out_working_handles() -> None:
    platform = RealXen()
    assert isinstance(platform, XenPlatform)
    with platform.open_xenstore() as store:
        assert store.read("/local/domain/0/name") == b"Domain-0"
    with platform.open_event_channel() as channel:
        assert channel.fileno() >= 0
    with platform.open_grant_sharer() as shr, shr.share_pages(DOM0, 1) as pages:
        assert pages.refs[0] > 0


def open_fds() -> set[str]:
    """Targets of this process's open file descriptors."""
    fds = set()
    for entry in Path("/proc/self/fd").iterdir():
        try:
            fds.add(f"{entry.name}->{os.readlink(entry)}")
        except OSError:
            pass
    return fds


def test_closing_handles_leaks_no_descriptor() -> None:
    XenStore().close()  # warm up: the libraries load lazily
    before = open_fds()
    for _ in range(20):
        store = XenStore()
        store.read("/local/domain/0/name")
        store.close()
        store.close()
        with EventChannel() as channel:
            channel.bind_unbound_port(DOM0)
        with GrantSharer() as shr:
            shr.share_pages(DOM0, 2)  # closed with its handle
        with GrantTable():
            pass
    assert open_fds() == before
    with pytest.raises(ValueError):
        store.read("/local/domain/0/name")


DOMU_BINDINGS = """
import json
from pyxen9p.libs import EventChannel, GrantSharer, XenStore

out = {}
with XenStore() as xs:
    out["domid"] = int(xs.read("domid"))
    out["path"] = xs.get_domain_path(out["domid"])
    xs.write("data/pyxen9p-probe", b"from the domU")
with EventChannel() as ev:
    out["port"] = ev.bind_unbound_port(0)
with GrantSharer() as shr, shr.share_pages(0, 2) as pages:
    pages.buffer[:5] = b"domU!"
    out["refs"] = list(pages.refs)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_bindings_work_in_a_pv_domu() -> None:
    """The bindings in a PV domU running dom0's Python and the project tree.

    Debian 12: the domU's root is dom0's, over a QEMU-served 9pfs share.
    Debian 13 (QEMU 10 serves no 9pfs device): dom0's root image from the
    lab VM's read-only disk through blkback, the pyxen9p tree in the
    initramfs, and no 9pfs driver in the domU at all.
    """
    src = os.environ["PYXEN9P_SRC"]
    check = "test -c /dev/xen/evtchn && test -c /dev/xen/gntalloc || exit 20\n"
    probe = f"cat > /tmp/probe.py <<'PYEOF'\n{DOMU_BINDINGS}\nPYEOF\n"
    if xenlab.release() == "bookworm":
        result = xenlab.run_pv_domu(
            f"{check}{probe}PYTHONPATH={src} python3 /tmp/probe.py\n",
            dom0_root=True,
            modules=("9pnet_xen", "9p", "xen-evtchn", "xen-gntalloc"),
            memory_mb=512,
            timeout=240,
        )
    else:
        result = xenlab.run_pv_domu(
            f"{check}{probe}PYTHONPATH=/tmp/domu/src python3 /tmp/probe.py\n",
            root_disk=True,
            files=xenlab.project_files(src, "domu/src"),
            modules=("xen-evtchn", "xen-gntalloc"),
            memory_mb=512,
            timeout=240,
        )
    assert result.rc == 0, result.console[-4000:]
    line = next(x for x in result.output.splitlines() if x.startswith("RESULT "))
    got = json.loads(line.split(" ", 1)[1])
    assert got["domid"] > 0
    assert got["path"] == f"/local/domain/{got['domid']}"
    assert got["port"] > 0
    assert len(got["refs"]) == 2 and all(ref > 0 for ref in got["refs"])
