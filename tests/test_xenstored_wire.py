"""Tests of the simulated xenstored on its Unix socket: raw wire protocol,
Debian's ``xenstore-*`` tools, and the real ``libxenstore`` through
:class:`pyxen9p.libs.xenstore.XenStore`."""

from __future__ import annotations

import errno
import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pyxen9p.interfaces import Permission, WatchEvent
from pyxen9p.interfaces import PermissionFlag as F
from pyxen9p.sim.xenstore import SimXenStore, XenStoreTree
from pyxen9p.sim.xenstored import HEADER, XENSTORE_PAYLOAD_MAX, XenStoreDaemon, XsType

TOOLS = (
    "xenstore-read",
    "xenstore-write",
    "xenstore-ls",
    "xenstore-rm",
    "xenstore-chmod",
    "xenstore-list",
    "xenstore-exists",
    "xenstore-watch",
)


def _require(what: str, available: bool) -> None:
    """Skip without the peer, unless ``PYXEN9P_REQUIRE_PEERS`` is set (CI): then fail."""
    if available:
        return
    if os.environ.get("PYXEN9P_REQUIRE_PEERS"):
        pytest.fail(f"{what} is required (PYXEN9P_REQUIRE_PEERS is set)")
    pytest.skip(f"{what} is not available")


@pytest.fixture
def socket_dir() -> Iterator[str]:
    # AF_UNIX paths are limited to 107 bytes: keep it short
    path = tempfile.mkdtemp(prefix="xs-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(socket_dir: str) -> Iterator[XenStoreDaemon]:
    tree = XenStoreTree()
    tree.introduce_domain(5)
    with XenStoreDaemon(os.path.join(socket_dir, "socket"), tree) as d:
        yield d


class RawClient:
    """A minimal wire-protocol client (no libxenstore)."""

    _ids = itertools.count(1)

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.events: list[tuple[str, str]] = []

    def close(self) -> None:
        self.sock.close()

    def send(self, kind: int, payload: bytes, *, req_id: int | None = None, tx_id: int = 0) -> int:
        req_id = next(self._ids) if req_id is None else req_id
        self.sock.sendall(HEADER.pack(kind, req_id, tx_id, len(payload)) + payload)
        return req_id

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError("xenstored closed the connection")
            data += chunk
        return data

    def recv(self) -> tuple[int, int, int, bytes]:
        kind, req_id, tx_id, length = HEADER.unpack(self._exactly(HEADER.size))
        return kind, req_id, tx_id, self._exactly(length)

    def reply(self, req_id: int) -> tuple[int, int, bytes]:
        """The reply to *req_id* (watch events met on the way are kept)."""
        while True:
            kind, rid, tx_id, payload = self.recv()
            if kind == XsType.WATCH_EVENT:
                assert rid == 0 and tx_id == 0
                path, token, end = payload.split(b"\0")
                assert end == b""
                self.events.append((path.decode(), token.decode()))
                continue
            assert rid == req_id
            return kind, tx_id, payload

    def call(self, kind: int, payload: bytes, tx_id: int = 0) -> bytes:
        """Send a request and return its payload; an error reply raises OSError."""
        rid = self.send(kind, payload, tx_id=tx_id)
        rkind, rtx, data = self.reply(rid)
        assert rtx == tx_id
        if rkind == XsType.ERROR:
            name = data.rstrip(b"\0").decode()
            raise OSError(getattr(errno, name), name)
        assert rkind == kind
        return data

    def event(self, timeout: float = 5.0) -> tuple[str, str]:
        if not self.events:
            self.sock.settimeout(timeout)
            try:
                kind, rid, _, payload = self.recv()
            finally:
                self.sock.settimeout(5)
            assert kind == XsType.WATCH_EVENT and rid == 0
            path, token, _ = payload.split(b"\0")
            self.events.append((path.decode(), token.decode()))
        return self.events.pop(0)


@pytest.fixture
def raw(daemon: XenStoreDaemon) -> Iterator[Callable[[], RawClient]]:
    clients: list[RawClient] = []

    def connect() -> RawClient:
        client = RawClient(daemon.socket_path)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


def _errno_of(call: Callable[[], Any]) -> int | None:
    with pytest.raises(OSError) as info:
        call()
    return info.value.errno


# --- raw protocol ----------------------------------------------------------


def test_read_write_and_echo(raw: Callable[[], RawClient]) -> None:
    c = raw()
    assert c.call(XsType.WRITE, b"/a/b\0v\0with\0nuls") == b"OK\0"
    assert c.call(XsType.READ, b"/a/b\0") == b"v\0with\0nuls"
    assert c.call(XsType.DIRECTORY, b"/a\0") == b"b\0"
    assert c.call(XsType.MKDIR, b"/a/c\0") == b"OK\0"
    assert c.call(XsType.DIRECTORY, b"/a\0") == b"b\0c\0"
    assert c.call(XsType.RM, b"/a/b\0") == b"OK\0"
    assert c.call(XsType.DIRECTORY, b"/a\0") == b"c\0"
    rid = c.send(XsType.READ, b"/a/c\0", req_id=0xDEADBEEF)
    kind, tx_id, payload = c.reply(rid)
    assert (kind, tx_id, payload) == (XsType.READ, 0, b"")


def test_error_replies(raw: Callable[[], RawClient]) -> None:
    c = raw()
    assert _errno_of(lambda: c.call(XsType.READ, b"/missing\0")) == errno.ENOENT
    assert _errno_of(lambda: c.call(XsType.READ, b"/no-nul")) == errno.EINVAL
    assert _errno_of(lambda: c.call(XsType.READ, b"/a\0/b\0")) == errno.EINVAL
    assert _errno_of(lambda: c.call(XsType.READ, b"/bad path\0")) == errno.EINVAL
    assert _errno_of(lambda: c.call(XsType.READ, b"/\xff\0")) == errno.EINVAL
    assert _errno_of(lambda: c.call(XsType.WRITE, b"/no-separator")) == errno.EINVAL
    assert _errno_of(lambda: c.call(XsType.RM, b"/\0")) == errno.EINVAL
    for kind in (XsType.WATCH_EVENT, XsType.ERROR, 20, 23, 0xFFFF, 12345):
        rid = c.send(kind, b"x\0", tx_id=3)
        rkind, tx_id, payload = c.reply(rid)
        assert (rkind, tx_id, payload) == (XsType.ERROR, 3, b"ENOSYS\0")


def test_pipelined_requests(raw: Callable[[], RawClient]) -> None:
    c = raw()
    messages = b"".join(
        HEADER.pack(kind, rid, 0, len(body)) + body
        for kind, rid, body in [
            (XsType.WRITE, 11, b"/p\0one"),
            (XsType.READ, 12, b"/p\0"),
            (XsType.READ, 13, b"/nothing\0"),
        ]
    )
    c.sock.sendall(messages)
    assert c.recv() == (XsType.WRITE, 11, 0, b"OK\0")
    assert c.recv() == (XsType.READ, 12, 0, b"one")
    assert c.recv() == (XsType.ERROR, 13, 0, b"ENOENT\0")


def test_byte_by_byte_request(raw: Callable[[], RawClient]) -> None:
    c = raw()
    body = b"/slow\0value"
    for byte in HEADER.pack(XsType.WRITE, 7, 0, len(body)) + body:
        c.sock.send(bytes([byte]))
    assert c.recv() == (XsType.WRITE, 7, 0, b"OK\0")


def test_watch_reply_then_events(raw: Callable[[], RawClient]) -> None:
    watcher, writer = raw(), raw()
    rid = watcher.send(XsType.WATCH, b"/w\0tok\0")
    assert watcher.recv() == (XsType.WATCH, rid, 0, b"OK\0")
    assert watcher.recv() == (XsType.WATCH_EVENT, 0, 0, b"/w\0tok\0")
    writer.call(XsType.WRITE, b"/w/x\0" + b"1")
    assert watcher.event() == ("/w/x", "tok")
    writer.call(XsType.WRITE, b"/wx\0" + b"sibling")
    writer.call(XsType.WRITE, b"/w\0" + b"2")
    assert watcher.event() == ("/w", "tok")
    # an event caused by the watcher's own request is delivered too
    assert watcher.call(XsType.WRITE, b"/w/y\0z") == b"OK\0"
    assert watcher.event() == ("/w/y", "tok")
    assert _errno_of(lambda: watcher.call(XsType.WATCH, b"/w\0tok\0")) == errno.EEXIST
    assert watcher.call(XsType.UNWATCH, b"/w\0tok\0") == b"OK\0"
    assert _errno_of(lambda: watcher.call(XsType.UNWATCH, b"/w\0tok\0")) == errno.ENOENT
    assert _errno_of(lambda: watcher.call(XsType.WATCH, b"/w\0")) == errno.EINVAL
    writer.call(XsType.WRITE, b"/w\0" + b"3")
    assert watcher.call(XsType.READ, b"/w\0") == b"3"
    assert watcher.events == []


def test_reset_watches(raw: Callable[[], RawClient], daemon: XenStoreDaemon) -> None:
    c = raw()
    c.call(XsType.WATCH, b"/r\0t1\0")
    tx = int(c.call(XsType.TRANSACTION_START, b"\0").rstrip(b"\0"))
    assert c.call(XsType.RESET_WATCHES, b"\0") == b"OK\0"
    assert c.event() == ("/r", "t1")  # the initial one, sent before the reset
    c.call(XsType.WRITE, b"/r\0x")
    assert _errno_of(lambda: c.call(XsType.READ, b"/r\0", tx_id=tx)) == errno.ENOENT
    assert c.events == []
    assert not daemon.tree._transactions


def test_transactions(raw: Callable[[], RawClient]) -> None:
    c, other = raw(), raw()
    tx = int(c.call(XsType.TRANSACTION_START, b"\0").rstrip(b"\0"))
    assert tx != 0
    assert c.call(XsType.WRITE, b"/tx\0in", tx_id=tx) == b"OK\0"
    assert c.call(XsType.READ, b"/tx\0", tx_id=tx) == b"in"
    assert _errno_of(lambda: other.call(XsType.READ, b"/tx\0")) == errno.ENOENT
    assert _errno_of(lambda: c.call(XsType.TRANSACTION_START, b"\0", tx_id=tx)) == errno.EBUSY
    assert _errno_of(lambda: c.call(XsType.TRANSACTION_END, b"X\0", tx_id=tx)) == errno.EINVAL
    assert c.call(XsType.TRANSACTION_END, b"T\0", tx_id=tx) == b"OK\0"
    assert other.call(XsType.READ, b"/tx\0") == b"in"
    assert _errno_of(lambda: c.call(XsType.TRANSACTION_END, b"T\0", tx_id=tx)) == errno.ENOENT
    assert _errno_of(lambda: c.call(XsType.TRANSACTION_END, b"T\0")) == errno.ENOENT
    assert _errno_of(lambda: c.call(XsType.READ, b"/tx\0", tx_id=999)) == errno.ENOENT
    # a transaction id belongs to its connection
    tx = int(c.call(XsType.TRANSACTION_START, b"\0").rstrip(b"\0"))
    assert _errno_of(lambda: other.call(XsType.READ, b"/tx\0", tx_id=tx)) == errno.ENOENT
    # abort discards
    c.call(XsType.WRITE, b"/tx\0aborted", tx_id=tx)
    assert c.call(XsType.TRANSACTION_END, b"F\0", tx_id=tx) == b"OK\0"
    assert other.call(XsType.READ, b"/tx\0") == b"in"
    # conflict
    tx = int(c.call(XsType.TRANSACTION_START, b"\0").rstrip(b"\0"))
    c.call(XsType.READ, b"/tx\0", tx_id=tx)
    other.call(XsType.WRITE, b"/tx\0other")
    c.call(XsType.WRITE, b"/tx2\0mine", tx_id=tx)
    assert _errno_of(lambda: c.call(XsType.TRANSACTION_END, b"T\0", tx_id=tx)) == errno.EAGAIN
    assert _errno_of(lambda: other.call(XsType.READ, b"/tx2\0")) == errno.ENOENT


def test_directory_part(raw: Callable[[], RawClient]) -> None:
    c = raw()
    names = [f"entry-number-{i:05d}" for i in range(300)]
    for name in names:
        c.call(XsType.WRITE, f"/big/{name}\0".encode())
    assert _errno_of(lambda: c.call(XsType.DIRECTORY, b"/big\0")) == errno.E2BIG
    listing = b""
    gen = None
    parts = 0
    while True:
        reply = c.call(XsType.DIRECTORY_PART, b"/big\0" + str(len(listing)).encode() + b"\0")
        assert len(reply) <= XENSTORE_PAYLOAD_MAX
        head, _, chunk = reply.partition(b"\0")
        assert gen in (None, head)
        gen = head
        parts += 1
        listing += chunk
        if listing.endswith(b"\0\0") or chunk == b"\0":
            break
    assert parts > 1
    assert listing[:-1].decode().split("\0")[:-1] == names
    # the generation changes with the node
    c.call(XsType.WRITE, b"/big/one-more\0")
    reply = c.call(XsType.DIRECTORY_PART, b"/big\0" + b"0\0")
    assert reply.partition(b"\0")[0] != gen
    assert _errno_of(lambda: c.call(XsType.DIRECTORY_PART, b"/big\0x\0")) == errno.EINVAL
    assert _errno_of(lambda: c.call(XsType.DIRECTORY_PART, b"/big\0")) == errno.EINVAL
    assert c.call(XsType.DIRECTORY_PART, b"/big\0" + b"999999\0").endswith(b"\0\0")


def test_permissions(raw: Callable[[], RawClient], daemon: XenStoreDaemon) -> None:
    c = raw()
    c.call(XsType.WRITE, b"/perm\0x")
    assert c.call(XsType.GET_PERMS, b"/perm\0") == b"n0\0"
    assert c.call(XsType.SET_PERMS, b"/perm\0n5\0r7\0b9\0w3\0") == b"OK\0"
    assert c.call(XsType.GET_PERMS, b"/perm\0") == b"n5\0r7\0b9\0w3\0"
    assert daemon.tree.get_permissions(0, "/perm") == [
        Permission(5, F.NONE),
        Permission(7, F.READ),
        Permission(9, F.READ | F.WRITE),
        Permission(3, F.WRITE),
    ]
    for bad in (b"/perm\0", b"/perm\0x5\0", b"/perm\0r\0", b"/perm\0r99999\0"):
        with pytest.raises(OSError) as info:
            c.call(XsType.SET_PERMS, bad)
        assert info.value.errno == errno.EINVAL
    assert c.call(XsType.GET_PERMS, b"@releaseDomain\0") == b"n0\0"


def test_domains_and_control(raw: Callable[[], RawClient]) -> None:
    c = raw()
    assert c.call(XsType.GET_DOMAIN_PATH, b"7\0") == b"/local/domain/7\0"
    assert _errno_of(lambda: c.call(XsType.GET_DOMAIN_PATH, b"seven\0")) == errno.EINVAL
    c.call(XsType.WATCH, b"@introduceDomain\0in\0")
    c.call(XsType.WATCH, b"@releaseDomain\0out\0")
    assert {c.event(), c.event()} == {("@introduceDomain", "in"), ("@releaseDomain", "out")}
    assert c.call(XsType.IS_DOMAIN_INTRODUCED, b"7\0") == b"F\0"
    assert c.call(XsType.INTRODUCE, b"7\0" + b"4660\0" + b"3\0") == b"OK\0"
    assert c.event() == ("@introduceDomain", "in")
    assert c.call(XsType.IS_DOMAIN_INTRODUCED, b"7\0") == b"T\0"
    assert c.call(XsType.GET_PERMS, b"/local/domain/7\0") == b"n7\0"
    assert c.call(XsType.SET_TARGET, b"7\0" + b"5\0") == b"OK\0"
    assert c.call(XsType.RESUME, b"7\0") == b"OK\0"
    assert c.call(XsType.RELEASE, b"7\0") == b"OK\0"
    assert c.event() == ("@releaseDomain", "out")
    assert _errno_of(lambda: c.call(XsType.RELEASE, b"7\0")) == errno.ENOENT
    assert _errno_of(lambda: c.call(XsType.RESUME, b"7\0")) == errno.ENOENT
    assert _errno_of(lambda: c.call(XsType.INTRODUCE, b"7\0")) == errno.EINVAL
    assert c.call(XsType.CONTROL, b"check\0") == b"OK\0"
    assert b"print" in c.call(XsType.CONTROL, b"help\0")
    assert _errno_of(lambda: c.call(XsType.CONTROL, b"bogus\0")) == errno.EINVAL


def test_oversized_message_drops_only_that_client(raw: Callable[[], RawClient]) -> None:
    bad, good = raw(), raw()
    good.call(XsType.WRITE, b"/still\0here")
    bad.sock.sendall(HEADER.pack(XsType.WRITE, 42, 0, XENSTORE_PAYLOAD_MAX + 1))
    assert bad.recv() == (XsType.ERROR, 42, 0, b"E2BIG\0")
    with pytest.raises((EOFError, ConnectionResetError)):
        bad.recv()
    assert good.call(XsType.READ, b"/still\0") == b"here"
    # exactly the limit is fine
    value = b"v" * (XENSTORE_PAYLOAD_MAX - len(b"/max\0"))
    assert good.call(XsType.WRITE, b"/max\0" + value) == b"OK\0"
    assert good.call(XsType.READ, b"/max\0") == value


def test_garbage_does_not_hurt_others(raw: Callable[[], RawClient], daemon: XenStoreDaemon) -> None:
    good = raw()
    rng = random.Random(1234)
    for _ in range(20):
        junk = raw()
        junk.sock.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
        junk.close()
    half = raw()
    half.sock.sendall(HEADER.pack(XsType.WRITE, 1, 0, 100) + b"/half")  # then hang up
    half.close()
    for i in range(5):
        assert good.call(XsType.WRITE, f"/ok{i}\0x".encode()) == b"OK\0"
    assert daemon.running
    assert _errno_of(lambda: good.call(XsType.READ, b"/half\0")) == errno.ENOENT


def test_disconnect_cleans_up(raw: Callable[[], RawClient], daemon: XenStoreDaemon) -> None:
    c = raw()
    c.call(XsType.WATCH, b"/gone\0t\0")
    c.call(XsType.TRANSACTION_START, b"\0")
    assert daemon.tree._transactions and daemon.tree._watches
    c.close()
    deadline = time.monotonic() + 5
    while (daemon.tree._transactions or daemon.tree._watches) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not daemon.tree._transactions
    assert not daemon.tree._watches


def test_many_clients(daemon: XenStoreDaemon) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            c = RawClient(daemon.socket_path)
            try:
                for i in range(20):
                    c.call(XsType.WRITE, f"/many/{n}/{i}\0{n}-{i}".encode())
                    assert c.call(XsType.READ, f"/many/{n}/{i}\0".encode()) == f"{n}-{i}".encode()
            finally:
                c.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert len(daemon.tree.directory(0, "/many")) == 16


def test_events_from_a_simulated_domain(
    raw: Callable[[], RawClient], daemon: XenStoreDaemon
) -> None:
    c = raw()
    c.call(XsType.WATCH, b"/local/domain/5\0dom5\0")
    assert c.event() == ("/local/domain/5", "dom5")
    with SimXenStore(daemon.tree, 5) as guest:
        guest.write("device/9pfs/0/state", b"1")  # from another thread
        assert c.event() == ("/local/domain/5/device/9pfs/0/state", "dom5")
        watch = guest.watch("device")
        assert watch.get(1) == WatchEvent("device", watch.token)
        c.call(XsType.WRITE, b"/local/domain/5/device/9pfs/0/state\0" + b"2")
        assert watch.get(1) == WatchEvent("device/9pfs/0/state", watch.token)


def test_stop_and_socket_file(socket_dir: str) -> None:
    path = os.path.join(socket_dir, "s")
    daemon = XenStoreDaemon(path)
    daemon.start()
    with pytest.raises(RuntimeError):
        daemon.start()
    client = RawClient(path)
    client.call(XsType.WRITE, b"/x\0y")
    daemon.stop()
    daemon.stop()
    assert not os.path.exists(path)
    with pytest.raises((EOFError, ConnectionResetError)):
        client.recv()
    client.close()
    with XenStoreDaemon(path, daemon.tree) as again:  # replaces nothing, reuses the tree
        c = RawClient(again.socket_path)
        assert c.call(XsType.READ, b"/x\0") == b"y"
        c.close()


def test_module_entry_point(socket_dir: str) -> None:
    path = os.path.join(socket_dir, "main")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyxen9p.sim.xenstored", "--socket", path, "--domain", "3"],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(path):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.02)
        c = RawClient(path)
        assert c.call(XsType.READ, b"/local/domain/3/domid\0") == b"3"
        c.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert not os.path.exists(path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


# --- Debian's xenstore-* tools (libxenstore inside) -------------------------


@pytest.fixture
def tool(daemon: XenStoreDaemon) -> Callable[..., subprocess.CompletedProcess[bytes]]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    _require(f"xenstore-utils ({', '.join(missing)})", not missing)
    env = dict(os.environ, XENSTORED_PATH=daemon.socket_path)

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(args, env=env, capture_output=True, timeout=20, check=check)

    return run


def test_cli_write_read_list_exists_rm(
    tool: Callable[..., subprocess.CompletedProcess[bytes]], daemon: XenStoreDaemon
) -> None:
    tool("xenstore-write", "/cli/a", "one", "/cli/b", "two words")
    assert daemon.tree.read(0, "/cli/b") == b"two words"
    assert tool("xenstore-read", "/cli/a", "/cli/b").stdout == b"one\ntwo words\n"
    assert tool("xenstore-list", "/cli").stdout == b"a\nb\n"
    assert tool("xenstore-exists", "/cli/a").returncode == 0
    assert tool("xenstore-exists", "/cli/zzz", check=False).returncode != 0
    missing = tool("xenstore-read", "/cli/zzz", check=False)
    assert missing.returncode != 0 and b"/cli/zzz" in missing.stderr
    tool("xenstore-rm", "/cli/a")
    assert daemon.tree.directory(0, "/cli") == ["b"]
    tool("xenstore-write", "/deep/er/node", "x")
    tool("xenstore-rm", "-t", "/deep/er/node")  # also removes the emptied parents
    assert "deep" not in daemon.tree.directory(0, "/")


def test_cli_binary_values(
    tool: Callable[..., subprocess.CompletedProcess[bytes]], daemon: XenStoreDaemon
) -> None:
    tool("xenstore-write", "/bin", "a\\000b\\x01c")  # the tool unescapes
    assert daemon.tree.read(0, "/bin") == b"a\0b\x01c"
    assert tool("xenstore-read", "-R", "/bin").stdout == b"a\0b\x01c"  # raw: no newline
    daemon.tree.write(0, "/bin2", b"\0\0")
    assert tool("xenstore-read", "-R", "/bin2").stdout == b"\0\0"
    assert tool("xenstore-read", "/bin").stdout == b"a\\000b\\001c\n"  # escaped


def test_cli_ls_and_chmod(
    tool: Callable[..., subprocess.CompletedProcess[bytes]], daemon: XenStoreDaemon
) -> None:
    tool("xenstore-write", "/ls/x", "1", "/ls/y/z", "2")
    out = tool("xenstore-ls", "/ls").stdout.decode()
    assert out.split("\n")[:3] == ['x = "1"', 'y = ""', ' z = "2"']
    tool("xenstore-chmod", "/ls/x", "n5", "r7")
    assert daemon.tree.get_permissions(0, "/ls/x") == [Permission(5, F.NONE), Permission(7, F.READ)]
    tool("xenstore-chmod", "-r", "/ls/y", "b3")
    assert daemon.tree.get_permissions(0, "/ls/y/z") == [Permission(3, F.READ | F.WRITE)]
    perms = tool("xenstore-ls", "-p", "/ls").stdout.decode()
    assert "(n5,r7)" in perms and "(b3)" in perms
    full = tool("xenstore-ls", "-f", "/local/domain/5").stdout.decode()
    assert '/local/domain/5/domid = "5"' in full


def test_cli_watch(
    tool: Callable[..., subprocess.CompletedProcess[bytes]], daemon: XenStoreDaemon
) -> None:
    env = dict(os.environ, XENSTORED_PATH=daemon.socket_path)
    proc = subprocess.Popen(
        ["xenstore-watch", "-n", "3", "/cw"], env=env, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"/cw\n"  # the initial event
        daemon.tree.write(0, "/cwsibling", b"no")
        daemon.tree.write(0, "/cw/a", b"1")
        assert proc.stdout.readline() == b"/cw/a\n"
        tool("xenstore-rm", "/cw")
        assert proc.stdout.readline() == b"/cw\n"
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


# --- the real libxenstore through pyxen9p.libs.xenstore.XenStore ------------


@pytest.fixture
def lib_store(
    daemon: XenStoreDaemon, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[], Any]]:
    try:
        from pyxen9p.libs.xenstore import LIBRARY, XenStore

        LIBRARY.load()
        available = True
    except (ImportError, OSError):
        available = False
    _require("libxenstore.so.4 and pyxen9p.libs.xenstore", available)
    # the library reads XENSTORED_PATH in xs_open
    monkeypatch.setenv("XENSTORED_PATH", daemon.socket_path)
    stores: list[Any] = []

    def open_store() -> Any:
        store = XenStore()
        stores.append(store)
        return store

    yield open_store
    for store in stores:
        store.close()


def test_lib_nodes(lib_store: Callable[[], Any], daemon: XenStoreDaemon) -> None:
    xs = lib_store()
    xs.write("/lib/v", b"\0x\0y\0")
    assert xs.read("/lib/v") == b"\0x\0y\0"
    assert daemon.tree.read(0, "/lib/v") == b"\0x\0y\0"
    xs.write("/lib/s", "text")
    xs.mkdir("/lib/d/e")
    assert xs.read("/lib/d/e") == b""
    xs.mkdir("/lib/d")  # exists: fine
    assert xs.directory("/lib") == ["v", "s", "d"]
    xs.rm("/lib/d")
    assert xs.directory("/lib") == ["v", "s"]
    xs.rm("/lib/d")  # already gone: fine
    with pytest.raises(FileNotFoundError) as info:
        xs.read("/lib/d/e")
    assert info.value.errno == errno.ENOENT
    with pytest.raises(FileNotFoundError):
        xs.directory("/lib/nope")
    with pytest.raises(FileNotFoundError):
        xs.rm("/lib/nope/deeper")
    assert xs.get_domain_path(5) == "/local/domain/5"
    assert xs.read("/local/domain/5/domid") == b"5"
    xs.write("relative", b"r")  # the socket acts for domain 0
    assert daemon.tree.read(0, "/local/domain/0/relative") == b"r"


def test_lib_large_directory(lib_store: Callable[[], Any]) -> None:
    xs = lib_store()
    names = [f"a-rather-long-child-name-{i:04d}" for i in range(250)]
    for txn in xs.transaction():
        with txn:
            for name in names:
                txn.write(f"/wide/{name}", b"")
    assert xs.directory("/wide") == names  # via XS_DIRECTORY_PART


def test_lib_permissions(lib_store: Callable[[], Any], daemon: XenStoreDaemon) -> None:
    xs = lib_store()
    xs.write("/lp", b"x")
    assert xs.get_permissions("/lp") == [Permission(0, F.NONE)]
    perms = [Permission(5, F.NONE), Permission(7, F.READ), Permission(9, F.READ | F.WRITE)]
    xs.set_permissions("/lp", perms)
    assert xs.get_permissions("/lp") == perms
    with SimXenStore(daemon.tree, 5) as owner:
        assert owner.read("/lp") == b"x"
    with SimXenStore(daemon.tree, 8) as stranger, pytest.raises(PermissionError):
        stranger.read("/lp")


def test_lib_transaction_conflict_is_retried(lib_store: Callable[[], Any]) -> None:
    first, second = lib_store(), lib_store()
    first.write("/ltx/n", b"0")
    attempts = 0
    for txn in first.transaction():
        with txn:
            attempts += 1
            value = int(txn.read("/ltx/n"))
            if attempts == 1:
                second.write("/ltx/n", b"100")  # a conflicting change
            txn.write("/ltx/n", str(value + 1))
    assert attempts == 2
    assert first.read("/ltx/n") == b"101"
    from pyxen9p.errors import TransactionConflictError

    with pytest.raises(TransactionConflictError), first.begin() as txn:
        txn.read("/ltx/n")
        second.write("/ltx/n", b"0")
        txn.write("/ltx/n", b"lost")
    assert second.read("/ltx/n") == b"0"


def test_lib_watches(lib_store: Callable[[], Any]) -> None:
    xs, writer = lib_store(), lib_store()
    xs.mkdir("/lw")
    with xs.watch("/lw/a") as a, xs.watch("/lw/b") as b:
        assert a.get(5) == WatchEvent("/lw/a", a.token)
        assert b.get(5) == WatchEvent("/lw/b", b.token)
        writer.write("/lw/a", b"1")
        writer.write("/lw/a/below", b"2")
        writer.write("/lw/ab", b"sibling")
        writer.write("/lw/b", b"3")
        assert a.get(5) == WatchEvent("/lw/a", a.token)
        assert a.get(5) == WatchEvent("/lw/a/below", a.token)
        assert b.get(5) == WatchEvent("/lw/b", b.token)
        assert a.get(0.2) is None
        assert b.get(0.05) is None
    writer.write("/lw/a", b"after close")
    assert xs.read("/lw/a") == b"after close"


def test_lib_domains(lib_store: Callable[[], Any]) -> None:
    xs = lib_store()
    assert not xs.is_domain_introduced(12)
    with xs.watch("@introduceDomain") as intro:
        assert intro.get(5) == WatchEvent("@introduceDomain", intro.token)
        xs.introduce_domain(12, 0x1234, 7)
        assert intro.get(5) == WatchEvent("@introduceDomain", intro.token)
    assert xs.is_domain_introduced(12)
    assert xs.get_permissions("/local/domain/12") == [Permission(12, F.NONE)]
    xs.release_domain(12)
    assert not xs.is_domain_introduced(12)
    assert xs.control_command("check") == b"OK"
