"""Tests of the simulated Xen platform (pyxen9p.sim.platform)."""

from __future__ import annotations

import asyncio
import errno
import os
import select
import threading
import time
from collections.abc import Iterator

import pytest

from pyxen9p.errors import HandleClosedError, XenLibraryError
from pyxen9p.interfaces import (
    EventChannelLike,
    GrantSharerLike,
    Permission,
    PermissionFlag,
    SharedPagesLike,
    WatchLike,
    XenPlatform,
    XenStoreLike,
)
from pyxen9p.sim.platform import (
    FIRST_GRANT_REF,
    OPERATIONS,
    XEN_PAGE_SIZE,
    GrantMappingLike,
    GrantTableLike,
    ResourceCounts,
    SimDomain,
    SimEventChannel,
    SimulatedXen,
)


@pytest.fixture
def xen() -> Iterator[SimulatedXen]:
    machine = SimulatedXen()
    machine.create_domain(1, "guest1")
    machine.create_domain(2, "guest2")
    yield machine
    machine.close()


def readable(fd: int, timeout: float = 0.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


# ---------------------------------------------------------------------------
# Protocol conformance (checked statically by mypy --strict and at run time)


def test_domain_handles_satisfy_the_interfaces(xen: SimulatedXen) -> None:
    domain: SimDomain = xen.domain(1)
    platform: XenPlatform = domain
    assert isinstance(domain, XenPlatform)
    store: XenStoreLike = platform.open_xenstore()
    sharer: GrantSharerLike = platform.open_grant_sharer()
    channel: EventChannelLike = platform.open_event_channel()
    table: GrantTableLike = xen.domain(0).open_grant_table()
    pages: SharedPagesLike = sharer.share_pages(0, 1)
    mapping: GrantMappingLike = table.map_grant_ref(1, pages.refs[0])
    watch: WatchLike = store.watch("data")
    assert xen.resources().handles == 4
    for closable in (watch, mapping, pages, table, channel, sharer, store):
        with closable:
            pass
        closable.close()  # idempotent
    xen.assert_no_leaks()


# ---------------------------------------------------------------------------
# Domains and XenStore


def test_create_domain_writes_toolstack_nodes(xen: SimulatedXen) -> None:
    assert [d.domid for d in xen.domains] == [0, 1, 2]
    assert xen.tree.read(0, "/local/domain/1/name") == b"guest1"
    assert xen.tree.read(0, "/local/domain/0/name") == b"Domain-0"
    dom3 = xen.create_domain(3)
    assert dom3.name == "dom3" and dom3.path == "/local/domain/3"
    with dom3.open_xenstore() as store:
        assert store.read("domid") == b"3"
        store.write("data/x", "hello")  # its home is its own
        assert store.read("/local/domain/3/data/x") == b"hello"
        assert store.get_domain_path(3) == "/local/domain/3"
        with pytest.raises(PermissionError):
            store.write("/local/domain/1/data/x", "no")
    with pytest.raises(ValueError, match="already exists"):
        xen.create_domain(3)
    with pytest.raises(ValueError):
        xen.create_domain(0x7FF0)
    with pytest.raises(KeyError):
        xen.domain(42)


def test_xenstore_watch_and_transaction_through_domain(xen: SimulatedXen) -> None:
    guest = xen.domain(1).open_xenstore()
    dom0 = xen.domain(0).open_xenstore()
    watch = guest.watch("device", "tok")
    first = watch.get(1)
    assert first is not None and first.token == "tok"  # fires at registration
    dom0.write("/local/domain/1/device/x", "1")
    event = watch.get(1)
    assert event is not None and event.path == "device/x"
    for txn in guest.transaction():
        with txn:
            txn.write("device/y", b"2")
            assert txn.read("device/y") == b"2"
    assert dom0.read("/local/domain/1/device/y") == b"2"
    dom0.set_permissions(
        "/local/domain/1/device/y",
        [Permission(0, PermissionFlag.NONE), Permission(1, PermissionFlag.READ)],
    )
    with pytest.raises(PermissionError):
        guest.write("device/y", "3")
    assert readable(guest.fileno(), 1)
    watch.close()
    guest.close()
    dom0.close()
    xen.assert_no_leaks()


# ---------------------------------------------------------------------------
# Grants


def test_shared_memory_is_really_shared(xen: SimulatedXen) -> None:
    sharer = xen.domain(1).open_grant_sharer()
    table = xen.domain(0).open_grant_table()
    pages = sharer.share_pages(0, 4)
    assert len(pages.refs) == 4 and pages.refs[0] >= FIRST_GRANT_REF
    assert pages.buffer.nbytes == 4 * XEN_PAGE_SIZE and not pages.buffer.readonly
    assert bytes(pages.buffer) == bytes(4 * XEN_PAGE_SIZE)  # zeroed
    whole = table.map_grant_refs(1, pages.refs)
    middle = table.map_grant_refs([1, 1], pages.refs[1:3])
    single = table.map_grant_ref(1, pages.refs[3])
    pages.buffer[XEN_PAGE_SIZE + 5] = 0xAB
    assert whole.buffer[XEN_PAGE_SIZE + 5] == 0xAB and middle.buffer[5] == 0xAB
    single.buffer[0:4] = b"back"
    assert bytes(pages.buffer[3 * XEN_PAGE_SIZE : 3 * XEN_PAGE_SIZE + 4]) == b"back"
    view = whole.buffer.cast("I")
    view[0] = 0xDEADBEEF
    assert bytes(pages.buffer[:4]) == (0xDEADBEEF).to_bytes(4, "little")
    view.release()
    assert xen.resources(0) == ResourceCounts(mappings=3, mapped_pages=7, handles=1)
    assert xen.resources(1) == ResourceCounts(grants=4, handles=1)
    table.close()
    sharer.close()
    xen.assert_no_leaks()


def test_only_the_grantee_maps_and_read_only_is_enforced(xen: SimulatedXen) -> None:
    sharer = xen.domain(1).open_grant_sharer()
    rw = sharer.share_pages(0, 1)
    ro = sharer.share_pages(0, 1, writable=False)
    other = xen.domain(2).open_grant_table()
    with pytest.raises(OSError) as info:
        other.map_grant_ref(1, rw.refs[0])
    assert info.value.errno == errno.EINVAL and "is for domain 0" in str(info.value)
    table = xen.domain(0).open_grant_table()
    with pytest.raises(OSError, match="read-only"):
        table.map_grant_ref(1, ro.refs[0])
    mapped = table.map_grant_ref(1, ro.refs[0], writable=False)
    assert mapped.buffer.readonly
    with pytest.raises(TypeError):
        mapped.buffer[0] = 1
    ro.buffer[0] = 9  # the owner still writes its own page
    assert mapped.buffer[0] == 9
    rw_ro = table.map_grant_ref(1, rw.refs[0], writable=False)  # read-only of a rw grant
    assert rw_ro.buffer.readonly
    with pytest.raises(OSError, match="no grant reference"):
        table.map_grant_ref(1, 12345)
    with pytest.raises(OSError, match="no grant reference"):
        table.map_grant_ref(2, rw.refs[0])
    for table_ in (table, other):
        table_.close()
    sharer.close()
    xen.assert_no_leaks()


def test_dom0_maps_its_own_grant(xen: SimulatedXen) -> None:
    dom0 = xen.domain(0)
    with dom0.open_grant_sharer() as sharer, dom0.open_grant_table() as table:
        pages = sharer.share_pages(0, 1)
        mapping = table.map_grant_ref(0, pages.refs[0])
        mapping.buffer[10] = 3
        assert pages.buffer[10] == 3
    xen.assert_no_leaks()


def test_multi_page_maps_must_be_consecutive(xen: SimulatedXen) -> None:
    sharer = xen.domain(1).open_grant_sharer()
    a = sharer.share_pages(0, 2)
    b = sharer.share_pages(0, 2)
    table = xen.domain(0).open_grant_table()
    for refs in ([a.refs[1], a.refs[0]], [a.refs[0], b.refs[0]], [a.refs[0], a.refs[0]]):
        with pytest.raises(OSError, match="simulator limit") as info:
            table.map_grant_refs(1, refs)
        assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError):
        table.map_grant_refs(1, [])
    with pytest.raises(OSError):
        table.map_grant_refs([1], a.refs)
    assert xen.resources(0).mappings == 0
    table.close()
    sharer.close()


def test_unshare_while_mapped_is_deferred(xen: SimulatedXen) -> None:
    sharer = xen.domain(1).open_grant_sharer()
    table = xen.domain(0).open_grant_table()
    pages = sharer.share_pages(0, 3)
    refs = pages.refs
    mapping = table.map_grant_refs(1, refs[:2])
    pages.buffer[0] = 7
    pages.close()
    with pytest.raises(HandleClosedError):
        _ = pages.buffer
    assert xen.resources(1) == ResourceCounts(deferred_grants=2, handles=1)
    assert mapping.buffer[0] == 7  # the backend's mapping still works
    with pytest.raises(OSError, match="no grant reference"):
        table.map_grant_ref(1, refs[0])  # but the grant cannot be mapped again
    with pytest.raises(OSError, match="no grant reference"):
        table.map_grant_ref(1, refs[2])  # the unmapped page was released at once
    mapping.close()
    assert xen.resources(1) == ResourceCounts(handles=1)
    sharer.close()
    table.close()
    xen.assert_no_leaks()


def test_closing_handles_releases_everything(xen: SimulatedXen) -> None:
    sharer = xen.domain(1).open_grant_sharer()
    table = xen.domain(0).open_grant_table()
    pages = [sharer.share_pages(0, 2) for _ in range(3)]
    mappings = [table.map_grant_refs(1, p.refs) for p in pages]
    buffer = mappings[0].buffer
    table.close()
    assert all(m.closed for m in mappings)
    with pytest.raises(ValueError):
        buffer[0]  # the handed-out view was released
    with pytest.raises(HandleClosedError):
        table.map_grant_ref(1, pages[0].refs[0])
    sharer.close()
    assert all(p.closed for p in pages)
    with pytest.raises(HandleClosedError):
        sharer.share_pages(0, 1)
    xen.assert_no_leaks()


def test_derived_views_are_reported(xen: SimulatedXen) -> None:
    sharer = xen.domain(1).open_grant_sharer()
    pages = sharer.share_pages(0, 1)
    kept = pages.buffer[8:16]
    sharer.close()
    assert xen.resources().exported_views == 1
    with pytest.raises(AssertionError, match="still have views"):
        xen.assert_no_leaks()
    kept.release()
    xen.assert_no_leaks()


def test_grant_limit(xen: SimulatedXen) -> None:
    xen.gntalloc_limit = 10
    sharer = xen.domain(1).open_grant_sharer()
    table = xen.domain(0).open_grant_table()
    first = sharer.share_pages(0, 8)
    with pytest.raises(OSError) as info:
        sharer.share_pages(0, 3)
    assert info.value.errno == errno.ENOSPC
    mapping = table.map_grant_refs(1, first.refs)
    first.close()  # deferred grants still count against the limit
    with pytest.raises(OSError):
        sharer.share_pages(0, 3)
    mapping.close()
    sharer.share_pages(0, 10)
    with pytest.raises(OSError) as info:
        sharer.share_pages(0x7FF0, 1)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError):
        sharer.share_pages(0, 0)
    sharer.close()
    table.close()


# ---------------------------------------------------------------------------
# Event channels


def connect(xen: SimulatedXen) -> tuple[SimEventChannel, int, SimEventChannel, int]:
    """A frontend (dom1) channel offered to dom0, bound by dom0."""
    fe = xen.domain(1).open_event_channel()
    be = xen.domain(0).open_event_channel()
    fe_port = fe.bind_unbound_port(0)
    be_port = be.bind_interdomain(1, fe_port)
    assert be.pending(timeout=1) == be_port  # Xen leaves the new port pending
    be.unmask(be_port)
    return fe, fe_port, be, be_port


def test_notify_pending_unmask(xen: SimulatedXen) -> None:
    fe, fe_port, be, be_port = connect(xen)
    assert fe.port_info(fe_port) == ("interdomain", 0, be_port)
    assert be.port_info(be_port) == ("interdomain", 1, fe_port)
    assert not readable(be.fileno()) and not readable(fe.fileno())
    fe.notify(fe_port)
    assert readable(be.fileno())
    assert be.pending() == be_port
    assert not readable(be.fileno())
    be.notify(be_port)
    assert fe.pending(timeout=1) == fe_port
    fe.unmask(fe_port)
    with pytest.raises(TimeoutError):
        fe.pending(timeout=0.02)
    fe.close()
    be.close()
    xen.assert_no_leaks()


def test_coalescing_and_masking(xen: SimulatedXen) -> None:
    fe, fe_port, be, be_port = connect(xen)
    for _ in range(5):
        fe.notify(fe_port)  # pending: coalesced into one
    assert be.pending(timeout=0) == be_port
    assert not readable(be.fileno())
    for _ in range(3):
        fe.notify(fe_port)  # masked: latched once
    assert not readable(be.fileno())
    be.unmask(be_port)
    assert readable(be.fileno())  # the latched event is delivered at unmask
    assert be.pending(timeout=0) == be_port
    be.unmask(be_port)
    assert not readable(be.fileno())
    with pytest.raises(TimeoutError):
        be.pending(timeout=0)
    be.unmask(be_port)  # unmasking an unmasked port changes nothing
    be.unmask(999)  # nor does an unknown port, as with Linux
    fe.notify(fe_port)
    assert be.pending(timeout=0) == be_port
    fe.close()
    be.close()


def test_several_ports_on_one_handle(xen: SimulatedXen) -> None:
    fe = xen.domain(1).open_event_channel()
    be = xen.domain(0).open_event_channel()
    fe_ports = [fe.bind_unbound_port(0) for _ in range(3)]
    be_ports = [be.bind_interdomain(1, p) for p in fe_ports]
    assert fe_ports == [1, 2, 3] and be_ports == [1, 2, 3]
    assert sorted(be.pending(0) for _ in range(3)) == be_ports
    for port in be_ports:
        be.unmask(port)
    fe.notify(fe_ports[2])
    fe.notify(fe_ports[0])
    assert [be.pending(0), be.pending(0)] == [be_ports[2], be_ports[0]]
    be.unbind(be_ports[1])
    assert be.ports == (1, 3)
    assert be.bind_interdomain(1, fe_ports[1]) == 2  # lowest free port; rebinding allowed
    fe.close()
    be.close()
    xen.assert_no_leaks()


def test_binding_rules(xen: SimulatedXen) -> None:
    fe = xen.domain(1).open_event_channel()
    be = xen.domain(0).open_event_channel()
    intruder = xen.domain(2).open_event_channel()
    port = fe.bind_unbound_port(0)
    assert fe.port_info(port) == ("unbound", 0, None)
    with pytest.raises(OSError) as info:
        intruder.bind_interdomain(1, port)
    assert info.value.errno == errno.EINVAL and "offered to domain 0" in str(info.value)
    with pytest.raises(OSError) as info:
        be.bind_interdomain(1, 99)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError) as info:
        be.bind_interdomain(9, port)
    assert info.value.errno == errno.ESRCH
    with pytest.raises(OSError) as info:
        fe.bind_unbound_port(9)
    assert info.value.errno == errno.ESRCH
    be.bind_interdomain(1, port)
    with pytest.raises(OSError, match="already bound"):
        be.bind_interdomain(1, port)
    with pytest.raises(OSError) as info:
        fe.notify(42)
    assert info.value.errno == errno.ENOTCONN
    with pytest.raises(OSError) as info:
        fe.unbind(42)
    assert info.value.errno == errno.ENOTCONN
    fe.notify(port)
    for handle in (fe, be, intruder):
        handle.close()
    xen.assert_no_leaks()


def test_unbind_closes_the_channel_for_the_peer(xen: SimulatedXen) -> None:
    fe, fe_port, be, be_port = connect(xen)
    fe.notify(fe_port)  # pending at the backend when the frontend unbinds
    be.unbind(be_port)
    assert not readable(be.fileno())  # its pending event went with it
    assert fe.port_info(fe_port) == ("unbound", 0, None)
    fe.notify(fe_port)  # harmless, dropped
    assert not readable(be.fileno())
    be2 = be.bind_interdomain(1, fe_port)
    be.pending(0)
    be.unmask(be2)
    fe.close()  # closing the handle unbinds its ports
    assert be.port_info(be2) == ("unbound", 1, None)
    be.notify(be2)  # dropped
    assert xen.resources(1).ports == 0 and xen.resources(0).ports == 1
    be.close()
    xen.assert_no_leaks()


def test_close_wakes_a_blocked_pending(xen: SimulatedXen) -> None:
    handle = xen.domain(1).open_event_channel()
    fd = handle.fileno()
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            handle.pending()
        except BaseException as err:
            outcome.append(err)

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.05)
    handle.close()
    thread.join(2)
    assert not thread.is_alive()
    assert isinstance(outcome[0], HandleClosedError)
    with pytest.raises(OSError):
        os.fstat(fd)  # the descriptor was closed
    with pytest.raises(HandleClosedError):
        handle.notify(1)
    with pytest.raises(HandleClosedError):
        handle.fileno()


def test_blocking_pending_is_woken_by_notify(xen: SimulatedXen) -> None:
    fe, fe_port, be, be_port = connect(xen)
    got: list[int] = []
    thread = threading.Thread(target=lambda: got.append(be.pending(timeout=5)))
    thread.start()
    time.sleep(0.05)
    fe.notify(fe_port)
    thread.join(5)
    assert got == [be_port]
    fe.close()
    be.close()


def test_fd_and_pending_stay_consistent_under_threads(xen: SimulatedXen) -> None:
    fe, fe_port, be, be_port = connect(xen)
    stop = threading.Event()
    sent = [0]

    def sender() -> None:
        while not stop.is_set():
            fe.notify(fe_port)
            sent[0] += 1

    thread = threading.Thread(target=sender)
    thread.start()
    received = 0
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        if readable(be.fileno(), 0.05):
            assert be.pending(timeout=0) == be_port  # readable means pending
            be.unmask(be_port)
            received += 1
    stop.set()
    thread.join()
    assert 0 < received <= sent[0]
    if readable(be.fileno()):
        be.pending(timeout=0)
    assert not readable(be.fileno())
    with pytest.raises(TimeoutError):
        be.pending(timeout=0)
    fe.close()
    be.close()


def test_event_channel_works_with_asyncio(xen: SimulatedXen) -> None:
    fe, fe_port, be, be_port = connect(xen)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[int] = loop.create_future()

        def on_readable() -> None:
            if not ready.done():
                ready.set_result(be.pending(timeout=0))

        loop.add_reader(be.fileno(), on_readable)
        try:
            loop.call_later(0.02, fe.notify, fe_port)
            return await asyncio.wait_for(ready, 2)
        finally:
            loop.remove_reader(be.fileno())

    assert asyncio.run(main()) == be_port
    fe.close()
    be.close()


# ---------------------------------------------------------------------------
# Accounting and fault injection


def test_leak_accounting_per_domain(xen: SimulatedXen) -> None:
    fe_dom, be_dom = xen.domain(1), xen.domain(0)
    store = fe_dom.open_xenstore()
    sharer = fe_dom.open_grant_sharer()
    pages = sharer.share_pages(0, 2)
    table = be_dom.open_grant_table()
    table.map_grant_refs(1, pages.refs)
    fe, _fe_port, be, _be_port = connect(xen)
    assert fe_dom.resources() == ResourceCounts(grants=2, ports=1, handles=3)
    assert be_dom.resources() == ResourceCounts(mappings=1, mapped_pages=2, ports=1, handles=2)
    assert xen.resources(2).clean
    assert xen.resources() == ResourceCounts(
        grants=2, mappings=1, mapped_pages=2, ports=2, handles=5
    )
    with pytest.raises(AssertionError, match="grant dom1 ref"):
        xen.assert_no_leaks(1)
    xen.assert_no_leaks(2)
    for handle in (store, sharer, table, fe, be):
        handle.close()
    assert xen.resources().clean
    xen.assert_no_leaks()


def test_destroy_domain_releases_its_resources(xen: SimulatedXen) -> None:
    guest = xen.domain(2)
    sharer = guest.open_grant_sharer()
    sharer.share_pages(0, 1)
    channel = guest.open_event_channel()
    channel.bind_unbound_port(0)
    guest.open_xenstore()
    xen.destroy_domain(2)
    assert sharer.closed and channel.closed
    xen.assert_no_leaks()
    with pytest.raises(OSError) as info:
        guest.open_event_channel()
    assert info.value.errno == errno.ESRCH
    assert 2 not in [d.domid for d in xen.domains]


def test_inject_failure_counts_calls(xen: SimulatedXen) -> None:
    sharer = xen.domain(1).open_grant_sharer()
    fault = xen.inject_failure("share_pages", errno.ENOMEM, after=1)
    assert fault.active and not fault.fired
    sharer.share_pages(0, 1)
    with pytest.raises(XenLibraryError) as info:
        sharer.share_pages(0, 1)
    assert info.value.errno == errno.ENOMEM and info.value.function == "xengntshr_share_pages"
    assert fault.fired and not fault.active
    sharer.share_pages(0, 1)  # fires once
    assert xen.resources(1).grants == 2  # the failed call shared nothing
    sharer.close()


def test_inject_failure_filters_by_domain(xen: SimulatedXen) -> None:
    fe = xen.domain(1).open_event_channel()
    be = xen.domain(0).open_event_channel()
    port = fe.bind_unbound_port(0)
    xen.inject_failure("bind_interdomain", errno.EBUSY, domid=0)
    with pytest.raises(OSError) as info:
        be.bind_interdomain(1, port)
    assert info.value.errno == errno.EBUSY
    assert fe.port_info(port) == ("unbound", 0, None)  # nothing changed
    be.bind_interdomain(1, port)
    other = xen.inject_failure("notify", errno.EIO, domid=0)
    fe.notify(port)  # dom1's notify does not count
    assert other.active
    other.cancel()
    be.notify(1)
    assert not other.fired
    fe.close()
    be.close()


def test_inject_failure_on_xenstore_and_opening(xen: SimulatedXen) -> None:
    store = xen.domain(1).open_xenstore()
    xen.inject_failure("xenstore_write", errno.EACCES)
    with pytest.raises(PermissionError):
        store.write("data/a", "1")
    with pytest.raises(FileNotFoundError):
        store.read("data/a")
    xen.inject_failure("xenstore_transaction_end", errno.EAGAIN)
    attempts = 0
    for txn in store.transaction():
        with txn:
            attempts += 1
            txn.write("data/b", "2")
    assert attempts == 2 and store.read("data/b") == b"2"
    xen.inject_failure("xenstore_write", errno.EIO)
    with pytest.raises(OSError) as info:
        for txn in store.transaction():
            with txn:
                txn.write("data/c", "3")
    assert info.value.errno == errno.EIO
    xen.inject_failure("open_event_channel", errno.EMFILE)
    with pytest.raises(OSError):
        xen.domain(1).open_event_channel()
    assert xen.resources(1).handles == 1
    store.close()
    with pytest.raises(ValueError, match="unknown operation"):
        xen.inject_failure("share_page", errno.EIO)
    assert "map_grant_refs" in OPERATIONS
    pending = xen.inject_failure("unbind", errno.EIO)
    xen.clear_failures()
    assert not pending.active and not pending.fired
