"""Every function of the libxenstore table, called through the REAL library.

The scenario runs against the simulated xenstored over its socket; a counting
wrapper around each bound C function proves that none of the table is left
unexercised, and each call's result is checked.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import need_file

from pyxen9p.errors import TransactionConflictError, XenLibraryError
from pyxen9p.interfaces import Permission, PermissionFlag, WatchEvent
from pyxen9p.libs import xenstore
from pyxen9p.libs.xenstore import XenStore
from pyxen9p.sim.xenstored import XenStoreDaemon

REAL = "/usr/lib/x86_64-linux-gnu/libxenstore.so.4"


@pytest.fixture
def counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    need_file(REAL)
    sock = tmp_path / "xs.sock"
    monkeypatch.setenv("XENSTORED_PATH", str(sock))
    monkeypatch.setenv("XENSTORED_RUNDIR", str(tmp_path))
    lib = xenstore.LIBRARY.load(REAL)
    calls: Counter[str] = Counter()
    for name in xenstore.LIBRARY.signatures:
        original = getattr(lib, name)

        def wrapper(*args: Any, _f: Any = original, _n: str = name) -> Any:
            calls[_n] += 1
            return _f(*args)

        setattr(lib, name, wrapper)
    monkeypatch.setattr(xenstore.LIBRARY, "load", lambda library=None: lib)
    with XenStoreDaemon(str(sock)):
        yield calls


def test_every_xenstore_function(counted: Counter[str]) -> None:
    # module functions (no handle)
    assert xenstore.path_is_subpath("/a", "/a/b") and not xenstore.path_is_subpath("/a", "/ab")
    assert xenstore.daemon_socket() == os.environ["XENSTORED_PATH"]
    assert xenstore.daemon_rundir() == os.environ["XENSTORED_RUNDIR"]
    assert xenstore.daemon_socket_ro().endswith("socket_ro") or xenstore.daemon_socket_ro()
    assert isinstance(xenstore.suspend_evtchn_port(5), int)

    with XenStore() as xs, XenStore() as other:
        assert xs.fileno() >= 0
        # nodes (values with NUL bytes)
        xs.write("/t/a", b"x\0y")
        assert xs.read("/t/a") == b"x\0y"
        xs.mkdir("/t/dir")
        assert sorted(xs.directory("/t")) == ["a", "dir"]
        perms = [Permission(0, PermissionFlag.NONE), Permission(3, PermissionFlag.READ)]
        xs.set_permissions("/t/a", perms)
        assert xs.get_permissions("/t/a") == perms
        xs.rm("/t/dir")
        with pytest.raises(FileNotFoundError) as missing:
            xs.read("/t/dir")
        assert isinstance(missing.value, XenLibraryError) and missing.value.function == "xs_read"

        # transactions: a conflict from the other connection is retried
        attempts = 0
        for txn in xs.transaction():
            with txn:
                attempts += 1
                value = txn.read("/t/a")
                if attempts == 1:
                    other.write("/t/a", b"changed")
                txn.write("/t/b", value + b"!")
        assert attempts == 2 and xs.read("/t/b") == b"changed!"
        single = xs.begin()
        with pytest.raises(TransactionConflictError), single:
            single.read("/t/a")
            other.write("/t/a", b"again")
            single.write("/t/c", b"1")

        # watches: per-watch queue, the low-level check/read calls too
        with xs.watch("/t") as watch:
            assert watch.get(5) == WatchEvent("/t", watch.token)  # fires at registration
            other.write("/t/a", b"3")
            assert watch.get(5) == WatchEvent("/t/a", watch.token)
            other.write("/u", b"sibling")
            assert watch.get(0.3) is None
        raw = xs.watch("/w", token="raw")
        first = xs.read_watch()  # blocking C call
        assert first == WatchEvent("/w", "raw")
        other.write("/w/x", b"1")
        seen = None
        for _ in range(50):
            seen = xs.check_watch()
            if seen is not None:
                break
            threading.Event().wait(0.05)
        assert seen == WatchEvent("/w/x", "raw")
        raw.close()

        # domains and control
        assert xs.get_domain_path(5) == "/local/domain/5"
        assert not xs.is_domain_introduced(5)
        xs.introduce_domain(5, 0x1234, 7)
        assert xs.is_domain_introduced(5)
        xs.set_target(5, 0)
        xs.resume_domain(5)
        xs.release_domain(5)
        assert not xs.is_domain_introduced(5)
        assert xs.control_command("check") is not None
        assert xs.debug_command("check") is not None
        # Xen 4.17's xs_restrict is a stub that fails without errno: the
        # binding reports that, as EIO, naming the function
        with pytest.raises(XenLibraryError) as restricted:
            xs.restrict(5)
        assert restricted.value.function == "xs_restrict"

    unexercised = set(xenstore.LIBRARY.signatures) - set(counted)
    # called in a fork child: test_postfork_close_uses_destroy_postfork
    unexercised.discard("xs_daemon_destroy_postfork")
    assert unexercised == set(), f"never called: {sorted(unexercised)}"


def test_postfork_close_uses_destroy_postfork(counted: Counter[str]) -> None:
    store = XenStore()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        store.close()
        os.write(w, b"%d %d" % (counted["xs_daemon_destroy_postfork"], counted["xs_close"]))
        os._exit(0)
    os.close(w)
    assert os.read(r, 10) == b"1 0"  # the child never sent anything on the parent's socket
    os.close(r)
    os.waitpid(pid, 0)
    store.write("/still", b"usable")  # the parent's connection is intact
    assert store.read("/still") == b"usable"
    store.close()
    assert counted["xs_close"] == 1
