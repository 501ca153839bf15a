"""Tests of the simulated XenStore: :class:`XenStoreTree` and :class:`SimXenStore`."""

from __future__ import annotations

import errno
import select
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyxen9p.errors import HandleClosedError, TransactionConflictError
from pyxen9p.interfaces import Permission, WatchEvent
from pyxen9p.interfaces import PermissionFlag as F
from pyxen9p.sim.xenstore import (
    SimXenStore,
    XenStoreTree,
    permission_from_string,
    permission_to_string,
)


@pytest.fixture
def tree() -> XenStoreTree:
    t = XenStoreTree()
    t.introduce_domain(5)
    t.introduce_domain(7)
    return t


@pytest.fixture
def dom0(tree: XenStoreTree) -> Iterator[SimXenStore]:
    with SimXenStore(tree, 0) as store:
        yield store


@pytest.fixture
def dom5(tree: XenStoreTree) -> Iterator[SimXenStore]:
    with SimXenStore(tree, 5) as store:
        yield store


@pytest.fixture
def dom7(tree: XenStoreTree) -> Iterator[SimXenStore]:
    with SimXenStore(tree, 7) as store:
        yield store


def _errno(exc_info: pytest.ExceptionInfo[OSError]) -> int | None:
    return exc_info.value.errno


# --- nodes -----------------------------------------------------------------


def test_initial_tree(dom0: SimXenStore) -> None:
    assert dom0.directory("/") == ["tool", "local"]
    assert dom0.directory("/tool") == ["xenstored"]
    assert dom0.directory("/local/domain") == ["0", "5", "7"]
    assert dom0.get_permissions("/") == [Permission(0, F.NONE)]


def test_read_write_binary_values(dom0: SimXenStore) -> None:
    value = b"\0a\0\xff\0"
    dom0.write("/data/blob", value)
    assert dom0.read("/data/blob") == value
    dom0.write("/data/text", "h\u00e9")
    assert dom0.read("/data/text") == "h\u00e9".encode()
    dom0.write("/data/empty", b"")
    assert dom0.read("/data/empty") == b""
    dom0.write("/data/blob", bytearray(b"new"))
    assert dom0.read("/data/blob") == b"new"


def test_write_creates_parents_with_empty_values(dom0: SimXenStore) -> None:
    dom0.write("/a/b/c", b"v")
    assert dom0.read("/a") == b""
    assert dom0.read("/a/b") == b""
    assert dom0.directory("/a") == ["b"]
    assert dom0.directory("/a/b/c") == []


def test_missing_node(dom0: SimXenStore) -> None:
    with pytest.raises(FileNotFoundError) as info:
        dom0.read("/no/such")
    assert info.value.errno == errno.ENOENT
    with pytest.raises(FileNotFoundError):
        dom0.directory("/no/such")
    assert not dom0.exists("/no/such")
    assert dom0.exists("/tool")


def test_mkdir(dom0: SimXenStore) -> None:
    dom0.mkdir("/m/n")
    assert dom0.read("/m/n") == b""
    dom0.write("/m/n", b"keep")
    dom0.mkdir("/m/n")  # exists: unchanged
    assert dom0.read("/m/n") == b"keep"


def test_rm(dom0: SimXenStore) -> None:
    dom0.write("/r/a/x", b"1")
    dom0.write("/r/a/y", b"2")
    dom0.write("/r/b", b"3")
    dom0.rm("/r/a")
    assert dom0.directory("/r") == ["b"]
    assert not dom0.exists("/r/a/x")
    dom0.rm("/r/a")  # missing, but its parent exists: fine
    with pytest.raises(FileNotFoundError):
        dom0.rm("/r/a/deeper")  # parent missing too
    with pytest.raises(OSError) as info:
        dom0.rm("/")
    assert _errno(info) == errno.EINVAL


def test_directory_keeps_creation_order(dom0: SimXenStore) -> None:
    for name in ("z", "a", "m"):
        dom0.write(f"/order/{name}", b"")
    assert dom0.directory("/order") == ["z", "a", "m"]
    dom0.rm("/order/a")
    dom0.write("/order/a", b"")
    assert dom0.directory("/order") == ["z", "m", "a"]


@pytest.mark.parametrize(
    "path",
    ["/a//b", "/a/", "/a b", "/caf\u00e9", "/a\0b", "/" + "x" * 3072, "", "rel/"],
)
def test_invalid_paths(dom0: SimXenStore, path: str) -> None:
    with pytest.raises(OSError) as info:
        dom0.write(path, b"v")
    assert _errno(info) == errno.EINVAL


def test_valid_punctuation(dom0: SimXenStore) -> None:
    dom0.write("/a-b_c@d/E9", b"ok")
    assert dom0.read("/a-b_c@d/E9") == b"ok"


def test_relative_paths(dom0: SimXenStore, dom5: SimXenStore) -> None:
    dom5.write("device/vif/0/state", b"1")
    assert dom0.read("/local/domain/5/device/vif/0/state") == b"1"
    assert dom5.read("/local/domain/5/device/vif/0/state") == b"1"
    assert dom5.directory("device/vif") == ["0"]
    dom0.write("mine", b"0")
    assert dom0.read("/local/domain/0/mine") == b"0"
    assert dom5.own_domid() == 5
    assert dom5.get_domain_path(7) == "/local/domain/7"


# --- permissions -----------------------------------------------------------


def test_domu_rights(dom0: SimXenStore, dom5: SimXenStore, dom7: SimXenStore) -> None:
    dom0.write("/secret", b"s")
    with pytest.raises(PermissionError):
        dom5.read("/secret")
    with pytest.raises(PermissionError):
        dom5.write("/secret", b"x")
    with pytest.raises(PermissionError):
        dom5.write("/new-top-level", b"x")  # / is not writable by domUs
    # a domU owns what it creates below its home, others cannot see it
    dom5.write("data/x", b"1")
    assert dom5.get_permissions("data/x") == [Permission(5, F.NONE)]
    with pytest.raises(PermissionError):
        dom7.read("/local/domain/5/data/x")
    assert dom0.read("/local/domain/5/data/x") == b"1"


def test_missing_node_below_unreadable_parent_is_eacces(
    dom0: SimXenStore, dom5: SimXenStore
) -> None:
    dom0.mkdir("/hidden")
    with pytest.raises(PermissionError):
        dom5.read("/hidden/missing")
    with pytest.raises(FileNotFoundError):
        dom5.read("/local/domain/5/missing")


def test_permissions_grant_and_inherit(
    dom0: SimXenStore, dom5: SimXenStore, dom7: SimXenStore
) -> None:
    dom5.mkdir("shared")
    dom5.set_permissions("shared", [Permission(5, F.NONE), Permission(7, F.WRITE | F.READ)])
    dom7.write("/local/domain/5/shared/from7", b"hi")
    # created by 7: owned by 7, other entries inherited from the parent
    assert dom0.get_permissions("/local/domain/5/shared/from7") == [
        Permission(7, F.NONE),
        Permission(7, F.READ | F.WRITE),
    ]
    # as in xenstored, the parent's owner is "others" on the new node
    with pytest.raises(PermissionError):
        dom5.read("shared/from7")
    assert dom7.read("/local/domain/5/shared/from7") == b"hi"


def test_others_right_applies(dom0: SimXenStore, dom5: SimXenStore, dom7: SimXenStore) -> None:
    dom0.write("/pub", b"p")
    dom0.set_permissions("/pub", [Permission(0, F.READ)])
    assert dom5.read("/pub") == b"p"
    with pytest.raises(PermissionError):
        dom5.write("/pub", b"x")
    dom0.set_permissions("/pub", [Permission(0, F.READ), Permission(7, F.NONE)])
    assert dom5.read("/pub") == b"p"
    with pytest.raises(PermissionError):
        dom7.read("/pub")


def test_set_permissions_rules(dom0: SimXenStore, dom5: SimXenStore, dom7: SimXenStore) -> None:
    dom0.write("/granted", b"g")
    dom0.set_permissions("/granted", [Permission(0, F.NONE), Permission(5, F.READ | F.WRITE)])
    dom5.write("/granted", b"changed")  # may write...
    with pytest.raises(PermissionError):  # ...but not change the access list
        dom5.set_permissions("/granted", [Permission(0, F.READ)])
    dom5.mkdir("own")
    with pytest.raises(OSError) as info:  # an owner may not give a node away
        dom5.set_permissions("own", [Permission(7, F.NONE)])
    assert _errno(info) == errno.EPERM
    dom0.set_permissions("/local/domain/5/own", [Permission(7, F.NONE)])
    assert dom7.get_permissions("/local/domain/5/own") == [Permission(7, F.NONE)]
    with pytest.raises(OSError) as info:
        dom5.set_permissions("data", [Permission(5, F.NONE)] + [Permission(7, F.READ)] * 5)
    assert _errno(info) == errno.ENOSPC
    with pytest.raises(ValueError):
        dom0.set_permissions("/granted", [])
    with pytest.raises(OSError) as info:
        dom0.set_permissions("/granted", [Permission(70000, F.READ)])
    assert _errno(info) == errno.EINVAL


def test_permission_strings() -> None:
    for perm, text in [
        (Permission(0, F.NONE), "n0"),
        (Permission(5, F.READ), "r5"),
        (Permission(7, F.WRITE), "w7"),
        (Permission(65535, F.READ | F.WRITE), "b65535"),
    ]:
        assert permission_to_string(perm) == text
        assert permission_from_string(text) == perm
    for bad in ("", "x1", "r", "r-1", "r1a", "r65536"):
        with pytest.raises(OSError):
            permission_from_string(bad)


def test_target_domain_acts_for_its_target(tree: XenStoreTree, dom7: SimXenStore) -> None:
    with pytest.raises(PermissionError):
        dom7.read("/local/domain/5/domid")
    tree.set_target(7, 5)
    assert dom7.read("/local/domain/5/domid") == b"5"
    dom7.write("/local/domain/5/by-stubdom", b"x")


# --- domains ---------------------------------------------------------------


def test_introduce_and_release(tree: XenStoreTree, dom0: SimXenStore, dom5: SimXenStore) -> None:
    intro = dom0.watch("@introduceDomain")
    release = dom0.watch("@releaseDomain")
    assert intro.get(1) == WatchEvent("@introduceDomain", intro.token)
    assert release.get(1) == WatchEvent("@releaseDomain", release.token)
    assert not dom0.is_domain_introduced(9)
    dom0.introduce_domain(9, 1234, 3)
    assert dom0.is_domain_introduced(9)
    assert intro.get(1) == WatchEvent("@introduceDomain", intro.token)
    assert dom0.get_permissions("/local/domain/9") == [Permission(9, F.NONE)]
    assert dom0.read("/local/domain/9/domid") == b"9"
    dom0.introduce_domain(9)  # again: nothing happens
    assert intro.get(0.05) is None
    dom0.release_domain(9)
    assert release.get(1) == WatchEvent("@releaseDomain", release.token)
    assert not dom0.is_domain_introduced(9)
    with pytest.raises(FileNotFoundError):
        dom0.release_domain(9)
    for call in (
        lambda: dom5.introduce_domain(11),
        lambda: dom5.release_domain(7),
        lambda: dom5.is_domain_introduced(7),
    ):
        with pytest.raises(PermissionError):
            call()
    with pytest.raises(OSError) as info:
        tree.introduce_domain(0x7FF0)
    assert _errno(info) == errno.EINVAL


def test_shutdown_and_resume(tree: XenStoreTree, dom0: SimXenStore) -> None:
    release = dom0.watch("@releaseDomain")
    assert release.get(1) is not None
    tree.shutdown_domain(5)
    assert release.get(1) is not None
    tree.shutdown_domain(5)  # already shut down: no second event
    assert release.get(0.05) is None
    dom0.resume_domain(5)
    tree.shutdown_domain(5)
    assert release.get(1) is not None


def test_special_events_need_rights(tree: XenStoreTree, dom5: SimXenStore) -> None:
    watch = dom5.watch("@releaseDomain")
    assert watch.get(1) is not None  # the initial event is always sent
    tree.release_domain(7)
    assert watch.get(0.05) is None
    tree.set_permissions(0, "@releaseDomain", [Permission(0, F.NONE), Permission(5, F.READ)])
    tree.introduce_domain(7)
    tree.release_domain(7)
    assert watch.get(1) == WatchEvent("@releaseDomain", watch.token)


def test_control(dom0: SimXenStore, dom5: SimXenStore) -> None:
    assert dom0.control_command("check") == b"OK"
    assert b"check" in dom0.control_command("help")
    with pytest.raises(OSError) as info:
        dom0.control_command("no-such-command")
    assert _errno(info) == errno.EINVAL
    with pytest.raises(PermissionError):
        dom5.control_command("check")


# --- transactions ----------------------------------------------------------


def test_transaction_isolation_and_commit(dom0: SimXenStore) -> None:
    dom0.write("/t/a", b"old")
    with dom0.begin() as txn:
        txn.write("/t/a", b"new")
        txn.write("/t/b", b"created")
        assert txn.read("/t/a") == b"new"
        assert dom0.read("/t/a") == b"old"
        assert not dom0.exists("/t/b")
        assert txn.directory("/t") == ["a", "b"]
    assert txn.committed
    assert dom0.read("/t/a") == b"new"
    assert dom0.read("/t/b") == b"created"


def test_transaction_abort_on_exception(dom0: SimXenStore) -> None:
    dom0.write("/t/a", b"old")
    with pytest.raises(KeyError):
        for txn in dom0.transaction():
            with txn:
                txn.write("/t/a", b"new")
                txn.rm("/t")
                raise KeyError("boom")
    assert dom0.read("/t/a") == b"old"


def test_transaction_conflict_low_level(dom0: SimXenStore, dom5: SimXenStore) -> None:
    dom0.write("/c/x", b"0")
    txid = dom0.transaction_start()
    dom0.transaction_end(txid)  # empty transaction commits
    with pytest.raises(TransactionConflictError) as info, dom0.begin() as txn:
        txn.read("/c/x")
        dom5.tree.write(0, "/c/x", b"other")
        txn.write("/c/y", b"mine")
    assert info.value.errno == errno.EAGAIN
    assert not dom0.exists("/c/y")
    with pytest.raises(FileNotFoundError):
        dom0.transaction_end(12345)


def test_transaction_retries_on_conflict(dom0: SimXenStore, tree: XenStoreTree) -> None:
    dom0.write("/counter", b"0")
    attempts = 0
    for txn in dom0.transaction():
        with txn:
            attempts += 1
            value = int(txn.read("/counter"))
            if attempts == 1:
                tree.write(0, "/counter", b"10")  # someone else, meanwhile
            txn.write("/counter", str(value + 1))
    assert attempts == 2
    assert dom0.read("/counter") == b"11"


def test_transaction_gives_up(dom0: SimXenStore, tree: XenStoreTree) -> None:
    dom0.write("/busy", b"0")
    attempts = 0
    with pytest.raises(TransactionConflictError):
        for txn in dom0.transaction(max_attempts=3):
            with txn:
                attempts += 1
                txn.read("/busy")
                tree.write(0, "/busy", str(attempts))
                txn.write("/busy", b"never")
    assert attempts == 3
    assert dom0.read("/busy") == b"3"


def test_unrelated_changes_do_not_conflict(dom0: SimXenStore, tree: XenStoreTree) -> None:
    dom0.write("/one", b"1")
    with dom0.begin() as txn:
        txn.write("/one", b"2")
        tree.write(0, "/two", b"elsewhere")
    assert txn.committed
    assert dom0.read("/one") == b"2"
    assert dom0.read("/two") == b"elsewhere"


@pytest.mark.parametrize("change", ["create-same", "create-child", "rm-read"])
def test_conflict_kinds(dom0: SimXenStore, tree: XenStoreTree, change: str) -> None:
    dom0.write("/k/existing", b"e")
    with pytest.raises(TransactionConflictError), dom0.begin() as txn:
        if change == "create-same":
            txn.write("/k/new", b"mine")
            tree.write(0, "/k/new", b"theirs")
        elif change == "create-child":
            txn.rm("/k/existing")
            tree.write(0, "/k/existing/child", b"theirs")
        else:
            txn.read("/k/existing")
            tree.rm(0, "/k/existing")
    assert not (change == "create-same" and dom0.read("/k/new") == b"mine")


def test_transaction_attempt_must_be_entered(dom0: SimXenStore) -> None:
    with pytest.raises(RuntimeError):
        for _txn in dom0.transaction():
            pass
    txn = dom0.begin()
    with pytest.raises(RuntimeError):
        txn.read("/tool")


def test_transact(dom0: SimXenStore) -> None:
    dom0.write("/n", b"41")
    assert dom0.transact(lambda txn: int(txn.read("/n")) + 1) == 42


def test_concurrent_increments(tree: XenStoreTree) -> None:
    stores = [SimXenStore(tree, 0) for _ in range(4)]
    stores[0].write("/count", b"0")

    def work(store: SimXenStore) -> None:
        for _ in range(25):
            for txn in store.transaction(max_attempts=1000):
                with txn:
                    txn.write("/count", str(int(txn.read("/count")) + 1))

    threads = [threading.Thread(target=work, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert stores[0].read("/count") == b"100"
    for store in stores:
        store.close()


def test_domu_transaction_quota(dom5: SimXenStore) -> None:
    ids = [dom5.transaction_start() for _ in range(10)]
    with pytest.raises(OSError) as info:
        dom5.transaction_start()
    assert _errno(info) == errno.ENOSPC
    for txid in ids:
        dom5.transaction_end(txid, abort=True)


# --- watches ---------------------------------------------------------------


def test_watch_fires_at_and_below_only(dom0: SimXenStore) -> None:
    dom0.mkdir("/w")
    with dom0.watch("/w/a", token="tok") as watch:
        assert watch.token == "tok"
        assert watch.get(1) == WatchEvent("/w/a", "tok")  # once, at registration
        assert watch.get(0.02) is None
        dom0.write("/w/a", b"1")
        assert watch.get(1) == WatchEvent("/w/a", "tok")
        dom0.write("/w/a/deep/er", b"2")
        assert watch.get(1) == WatchEvent("/w/a/deep/er", "tok")
        dom0.write("/w/ab", b"sibling")
        dom0.write("/w/b", b"sibling")
        assert watch.get(0.05) is None
        dom0.set_permissions("/w/a", [Permission(0, F.READ)])
        assert watch.get(1) == WatchEvent("/w/a", "tok")
        dom0.mkdir("/w/a/m")
        assert watch.get(1) == WatchEvent("/w/a/m", "tok")
        dom0.mkdir("/w/a/m")  # exists: no change, no event
        assert watch.get(0.05) is None
        dom0.rm("/w/a/m")
        assert watch.get(1) == WatchEvent("/w/a/m", "tok")


def test_watch_below_removed_node(dom0: SimXenStore) -> None:
    dom0.write("/top/mid/leaf", b"x")
    leaf = dom0.watch("/top/mid/leaf")
    parent = dom0.watch("/")
    assert leaf.get(1) is not None
    assert parent.get(1) == WatchEvent("/", parent.token)
    dom0.rm("/top")
    assert leaf.get(1) == WatchEvent("/top/mid/leaf", leaf.token)
    assert parent.get(1) == WatchEvent("/top", parent.token)
    assert leaf.get(0.05) is None
    assert parent.get(0.05) is None


def test_per_token_dispatch(dom0: SimXenStore) -> None:
    a = dom0.watch("/x/a")
    b = dom0.watch("/x/b")
    assert a.token != b.token
    dom0.write("/x/b", b"1")
    dom0.write("/x/a", b"1")
    dom0.write("/x/b", b"2")
    assert [e.path for e in iter(lambda: a.get(0.05), None)] == ["/x/a", "/x/a"]
    assert [e.path for e in iter(lambda: b.get(0.05), None)] == ["/x/b", "/x/b", "/x/b"]
    with pytest.raises(ValueError):
        dom0.watch("/x/c", token=a.token)


def test_relative_watch_reports_relative_paths(dom5: SimXenStore, dom0: SimXenStore) -> None:
    watch = dom5.watch("device", token="rel")
    assert watch.get(1) == WatchEvent("device", "rel")
    dom0.write("/local/domain/5/device/vbd/state", b"4")
    assert watch.get(1) == WatchEvent("device/vbd/state", "rel")


def test_watch_respects_read_rights(dom0: SimXenStore, dom5: SimXenStore) -> None:
    watch = dom5.watch("/local/domain/7")
    assert watch.get(1) is not None
    dom0.write("/local/domain/7/private", b"x")
    assert watch.get(0.05) is None
    dom0.write("/local/domain/7/public", b"x")
    dom0.set_permissions("/local/domain/7/public", [Permission(7, F.READ)])
    assert watch.get(1) == WatchEvent("/local/domain/7/public", watch.token)
    everything = dom0.watch("/")
    assert everything.get(1) is not None
    dom5.write("data/y", b"1")
    assert everything.get(1) == WatchEvent("/local/domain/5/data/y", everything.token)


def test_transaction_events_only_on_commit(dom0: SimXenStore) -> None:
    watch = dom0.watch("/tx")
    assert watch.get(1) is not None
    with dom0.begin() as txn:
        txn.write("/tx/a", b"1")
        assert watch.get(0.05) is None
    assert watch.get(1) == WatchEvent("/tx/a", watch.token)
    with pytest.raises(ZeroDivisionError), dom0.begin() as txn:
        txn.write("/tx/b", b"1")
        raise ZeroDivisionError
    assert watch.get(0.05) is None


def test_fileno_readable_while_events_queued(dom0: SimXenStore) -> None:
    fd = dom0.fileno()

    def readable(timeout: float = 0.0) -> bool:
        return bool(select.select([fd], [], [], timeout)[0])

    assert not readable()
    a = dom0.watch("/f/a")
    b = dom0.watch("/f/b")
    assert readable(1)
    assert a.get(0) is not None
    assert readable()  # b's initial event is still queued
    assert b.get(0) is not None
    assert not readable()
    dom0.write("/f/a", b"1")
    dom0.write("/f/a", b"2")
    assert readable(1)
    assert a.get(0) is not None
    assert readable()
    assert dom0.check_watch() == WatchEvent("/f/a", a.token)
    assert not readable()
    assert dom0.check_watch() is None
    dom0.write("/f/b", b"1")
    b.close()  # dropping the queued event drains the descriptor too
    assert not readable()


def test_fileno_made_after_events(dom0: SimXenStore) -> None:
    watch = dom0.watch("/late")
    fd = dom0.fileno()
    assert select.select([fd], [], [], 1)[0]
    assert watch.get(0) is not None
    assert not select.select([fd], [], [], 0)[0]


def test_iterating_a_watch_until_closed(dom0: SimXenStore) -> None:
    watch = dom0.watch("/it")
    seen: list[str] = []

    def consume() -> None:
        seen.extend(event.path for event in watch)

    thread = threading.Thread(target=consume)
    thread.start()
    dom0.write("/it/x", b"1")
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    watch.close()
    thread.join(5)
    assert not thread.is_alive()
    assert seen == ["/it", "/it/x"]
    assert watch.get(0) is None


def test_closed_watch_gets_nothing(dom0: SimXenStore, tree: XenStoreTree) -> None:
    watch = dom0.watch("/gone")
    watch.close()
    watch.close()
    dom0.write("/gone", b"1")
    assert watch.get(0.05) is None
    assert dom0.check_watch() is None
    assert tree.remove_watches(dom0) == 0


def test_tree_watch_duplicates_and_unwatch(tree: XenStoreTree) -> None:
    events: list[tuple[str, str]] = []
    owner = object()

    def sink(path: str, token: str) -> None:
        events.append((path, token))

    tree.add_watch(0, "/d", "t", sink, owner=owner)
    with pytest.raises(FileExistsError):
        tree.add_watch(0, "/d", "t", sink, owner=owner)
    tree.add_watch(0, "/d", "t", sink, owner=object())  # another connection may
    tree.unwatch(0, "/d", "t", owner=owner)
    with pytest.raises(FileNotFoundError):
        tree.unwatch(0, "/d", "t", owner=owner)
    tree.write(0, "/d", b"1")
    assert events == [("/d", "t"), ("/d", "t"), ("/d", "t")]


def test_watch_quota(dom5: SimXenStore) -> None:
    watches = [dom5.watch(f"w{i}") for i in range(128)]
    with pytest.raises(OSError) as info:
        dom5.watch("one-more")
    assert _errno(info) == errno.E2BIG
    for watch in watches:
        watch.close()


# --- close -----------------------------------------------------------------


def test_close_semantics(tree: XenStoreTree) -> None:
    store = SimXenStore(tree, 0)
    watch = store.watch("/c")
    fd = store.fileno()
    txn = store.begin().__enter__()
    txn.write("/c/in-txn", b"1")
    store.close()
    store.close()
    assert store.closed
    assert tree.remove_watches(store) == 0  # unregistered by close
    assert not tree._transactions  # aborted by close
    assert watch.get(0) is None
    for call in (
        lambda: store.read("/tool"),
        lambda: store.write("/x", b"1"),
        lambda: store.watch("/x"),
        store.fileno,
        store.begin,
        lambda: store.get_domain_path(1),
        lambda: txn.read("/tool"),
    ):
        with pytest.raises(HandleClosedError):
            call()
    assert fd >= 0 and not store._fds  # the event pipe was closed
    reader = SimXenStore(tree, 0)
    assert not reader.exists("/c/in-txn")
    reader.close()


def test_close_wakes_a_waiting_get(tree: XenStoreTree) -> None:
    store = SimXenStore(tree, 0)
    watch = store.watch("/wake")
    assert watch.get(1) is not None
    results: list[object] = []
    thread = threading.Thread(target=lambda: results.append(watch.get()))
    thread.start()
    time.sleep(0.05)
    store.close()
    thread.join(5)
    assert results == [None]


# --- property tests --------------------------------------------------------

_names = st.sampled_from(["a", "b", "c", "d-1", "e_2"])
_paths = st.lists(_names, min_size=1, max_size=3).map(lambda parts: "/p/" + "/".join(parts))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["write", "rm"]), _paths, st.binary(max_size=8))))
def test_matches_a_dict_model(ops: list[tuple[str, str, bytes]]) -> None:
    tree = XenStoreTree()
    model: dict[str, bytes] = {"/p": b""}
    tree.mkdir(0, "/p")
    for op, path, value in ops:
        if op == "write":
            tree.write(0, path, value)
            parts = path.split("/")
            for i in range(2, len(parts)):
                model.setdefault("/".join(parts[:i]), b"")
            model[path] = value
        else:
            if path.rsplit("/", 1)[0] in model:
                tree.rm(0, path)
            else:
                with pytest.raises(FileNotFoundError):
                    tree.rm(0, path)
            for key in [k for k in model if k == path or k.startswith(path + "/")]:
                del model[key]
    for key, value in model.items():
        assert tree.read(0, key) == value
        children = {k.rsplit("/", 1)[1] for k in model if k.rsplit("/", 1)[0] == key}
        assert set(tree.directory(0, key)) == children
