"""StreamTransport: framing, demultiplexing, end of stream, malformed frames, timeouts."""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from pyxen9p.errors import TransportClosedError, TransportError
from pyxen9p.p9 import codec as c
from pyxen9p.p9.transport import FramingError, StreamTransport, Transport


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "peer closed"
        data += chunk
    return data


def recv_frame(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Read one complete 9P message sent by the transport."""
    sock.settimeout(timeout)
    head = _recv_exact(sock, 7)
    (size,) = struct.unpack_from("<I", head)
    return head + _recv_exact(sock, size - 7)


def reply_for(request: bytes, body: c.Message | None = None) -> bytes:
    """An encoded reply to *request* (an Rlerror ENOENT unless *body* is given)."""
    tag = c.decode(request).tag
    if body is None:
        return c.encode(c.Rlerror(tag, errno.ENOENT))
    return c.encode(body)


@pytest.fixture
def pair() -> Iterator[tuple[StreamTransport, socket.socket]]:
    ours, peer = socket.socketpair()
    transport = StreamTransport.from_socket(ours, msize=64 * 1024)
    try:
        yield transport, peer
    finally:
        transport.close()
        peer.close()


def _in_thread(fn: object, *args: object) -> tuple[threading.Thread, dict[str, object]]:
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["result"] = fn(*args)  # type: ignore[operator]
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_satisfies_the_transport_protocol(pair: tuple[StreamTransport, socket.socket]) -> None:
    transport, _ = pair
    assert isinstance(transport, Transport)
    assert transport.msize == 64 * 1024


def test_request_and_reply(pair: tuple[StreamTransport, socket.socket]) -> None:
    transport, peer = pair
    t, out = _in_thread(lambda: transport.request(c.encode(c.Tclunk(5, 9)), timeout=5))
    request = recv_frame(peer)
    assert c.decode(request) == c.Tclunk(5, 9)
    peer.sendall(c.encode(c.Rclunk(5)))
    t.join(5)
    assert out["result"] == c.encode(c.Rclunk(5))
    assert transport.outstanding_tags() == set()


def test_reply_split_byte_by_byte_and_coalesced(
    pair: tuple[StreamTransport, socket.socket],
) -> None:
    transport, peer = pair
    threads = [
        _in_thread(lambda tag=tag: transport.request(c.encode(c.Tread(tag, 1, 0, 10)), timeout=5))
        for tag in (1, 2, 3)
    ]
    requests = {c.decode(recv_frame(peer)).tag for _ in range(3)}
    assert requests == {1, 2, 3}
    one = c.encode(c.Rread(1, b"first"))
    for i in range(len(one)):  # one byte at a time
        peer.sendall(one[i : i + 1])
        time.sleep(0.001)
    # two replies in a single write
    peer.sendall(c.encode(c.Rread(3, b"third")) + c.encode(c.Rread(2, b"second")))
    results = {}
    for t, out in threads:
        t.join(5)
        reply = c.decode(out["result"])  # type: ignore[arg-type]
        assert isinstance(reply, c.Rread)
        results[reply.tag] = reply.data
    assert results == {1: b"first", 2: b"second", 3: b"third"}


def test_many_concurrent_requests_demultiplexed(
    pair: tuple[StreamTransport, socket.socket],
) -> None:
    transport, peer = pair
    n = 200

    def server() -> None:
        got = [recv_frame(peer) for _ in range(n)]
        # answer in reverse order, each reply carrying its tag as data
        for raw in reversed(got):
            m = c.decode(raw)
            peer.sendall(c.encode(c.Rread(m.tag, str(m.tag).encode())))

    srv = threading.Thread(target=server)
    srv.start()
    results: dict[int, bytes] = {}
    lock = threading.Lock()

    def client(tag: int) -> None:
        reply = c.decode(transport.request(c.encode(c.Tread(tag, 0, 0, 1)), timeout=10))
        assert isinstance(reply, c.Rread)
        with lock:
            results[tag] = reply.data

    threads = [threading.Thread(target=client, args=(tag,)) for tag in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    srv.join(10)
    assert results == {tag: str(tag).encode() for tag in range(n)}


def test_error_replies_are_delivered(pair: tuple[StreamTransport, socket.socket]) -> None:
    transport, peer = pair
    for reply in (c.Rlerror(4, errno.EACCES), c.Rerror(4, "denied", errno.EACCES)):
        t, out = _in_thread(lambda: transport.request(c.encode(c.Tgetattr(4, 1, 0)), timeout=5))
        recv_frame(peer)
        peer.sendall(c.encode(reply))
        t.join(5)
        assert c.decode(out["result"]) == reply  # type: ignore[arg-type]


def test_reply_of_wrong_type(pair: tuple[StreamTransport, socket.socket]) -> None:
    transport, peer = pair
    t, out = _in_thread(lambda: transport.request(c.encode(c.Tclunk(8, 1)), timeout=5))
    recv_frame(peer)
    peer.sendall(c.encode(c.Rremove(8)))
    t.join(5)
    assert isinstance(out["error"], c.ProtocolError)
    assert transport.connected  # framing is intact: the transport goes on
    t, out = _in_thread(lambda: transport.request(c.encode(c.Tclunk(8, 1)), timeout=5))
    recv_frame(peer)
    peer.sendall(c.encode(c.Rclunk(8)))
    t.join(5)
    assert out["result"] == c.encode(c.Rclunk(8))


def test_reply_for_unknown_tag_is_dropped(pair: tuple[StreamTransport, socket.socket]) -> None:
    transport, peer = pair
    peer.sendall(c.encode(c.Rclunk(77)))
    t, out = _in_thread(lambda: transport.request(c.encode(c.Tclunk(1, 1)), timeout=5))
    recv_frame(peer)
    peer.sendall(c.encode(c.Rclunk(1)))
    t.join(5)
    assert out["result"] == c.encode(c.Rclunk(1))
    assert transport.dropped_replies == 1


@pytest.mark.parametrize(
    ("frame", "errno_"),
    [
        (struct.pack("<IBH", 6, 101, 0), errno.EPROTO),  # size below the header
        (struct.pack("<IBH", 0, 101, 0), errno.EPROTO),
        (struct.pack("<IBH", 64 * 1024 + 1, 117, 1), errno.EMSGSIZE),  # above msize
        (struct.pack("<IBH", 0xFFFFFFFF, 117, 1), errno.EMSGSIZE),
    ],
)
def test_malformed_frame_fails_the_transport(
    pair: tuple[StreamTransport, socket.socket], frame: bytes, errno_: int
) -> None:
    transport, peer = pair
    t, out = _in_thread(lambda: transport.request(c.encode(c.Tclunk(1, 1)), timeout=5))
    recv_frame(peer)
    peer.sendall(frame)
    t.join(5)
    error = out["error"]
    assert isinstance(error, FramingError)
    assert isinstance(error, TransportError) and isinstance(error, c.ProtocolError)
    assert error.errno == errno_
    assert not transport.connected
    assert transport.failure is error
    with pytest.raises(FramingError):
        transport.request(c.encode(c.Tclunk(2, 1)), timeout=1)


def test_peer_eof_fails_every_waiter(pair: tuple[StreamTransport, socket.socket]) -> None:
    transport, peer = pair
    waiters = [
        _in_thread(lambda tag=tag: transport.request(c.encode(c.Tclunk(tag, 1)), timeout=10))
        for tag in range(5)
    ]
    for _ in range(5):
        recv_frame(peer)
    start = time.monotonic()
    peer.close()
    for t, out in waiters:
        t.join(5)
        error = out["error"]
        assert isinstance(error, TransportClosedError)
        assert isinstance(error, ConnectionError)
        assert "closed the connection" in str(error)
    assert time.monotonic() - start < 5
    with pytest.raises(TransportClosedError):
        transport.request(c.encode(c.Tclunk(9, 1)), timeout=1)


def test_peer_eof_in_the_middle_of_a_message(
    pair: tuple[StreamTransport, socket.socket],
) -> None:
    transport, peer = pair
    t, out = _in_thread(lambda: transport.request(c.encode(c.Tread(1, 1, 0, 100)), timeout=5))
    recv_frame(peer)
    peer.sendall(c.encode(c.Rread(1, b"x" * 50))[:20])
    peer.shutdown(socket.SHUT_WR)
    t.join(5)
    assert isinstance(out["error"], TransportClosedError)
    assert "middle of a message" in str(out["error"])


def test_timeout_keeps_the_tag_until_reply_or_flushed(
    pair: tuple[StreamTransport, socket.socket],
) -> None:
    transport, peer = pair
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        transport.request(c.encode(c.Tclunk(3, 1)), timeout=0.2)
    assert 0.15 < time.monotonic() - start < 3
    assert info.value.errno == errno.ETIMEDOUT
    recv_frame(peer)
    # the tag stays reserved: it cannot be sent again
    assert transport.outstanding_tags() == {3}
    with pytest.raises(ValueError, match="in flight"):
        transport.request(c.encode(c.Tclunk(3, 1)), timeout=0.2)
    # the late reply is swallowed and frees the tag
    peer.sendall(c.encode(c.Rclunk(3)))
    deadline = time.monotonic() + 5
    while transport.outstanding_tags() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert transport.outstanding_tags() == set()
    assert transport.dropped_replies == 0
    # flushed() frees a tag whose reply will never come
    with pytest.raises(TimeoutError):
        transport.request(c.encode(c.Tclunk(4, 1)), timeout=0.05)
    assert transport.outstanding_tags() == {4}
    transport.flushed(4)
    assert transport.outstanding_tags() == set()
    transport.flushed(4)  # harmless when already free


def test_flushed_interrupts_an_attached_waiter(
    pair: tuple[StreamTransport, socket.socket],
) -> None:
    transport, peer = pair
    t, out = _in_thread(lambda: transport.request(c.encode(c.Tclunk(6, 1)), timeout=5))
    recv_frame(peer)
    transport.flushed(6)
    t.join(5)
    assert isinstance(out["error"], InterruptedError)


def test_send_timeout_on_a_stuck_peer() -> None:
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    transport = StreamTransport.from_socket(ours, msize=4 * 1024 * 1024)
    try:
        big = c.encode(c.Twrite(1, 1, 0, b"x" * (3 * 1024 * 1024)))
        start = time.monotonic()
        with pytest.raises(TransportError) as info:
            transport.request(big, timeout=0.3)  # the peer never reads
        assert time.monotonic() - start < 5
        # part of the message went out: the stream is unusable, the transport failed
        assert info.value.errno == errno.ETIMEDOUT
        assert not transport.connected
    finally:
        transport.close()
        peer.close()


def test_invalid_messages_are_refused(pair: tuple[StreamTransport, socket.socket]) -> None:
    transport, _ = pair
    with pytest.raises(ValueError):
        transport.request(b"\x07\x00\x00", timeout=1)
    with pytest.raises(ValueError):
        transport.request(struct.pack("<IBH", 10, 120, 1), timeout=1)  # size != length
    with pytest.raises(ValueError):
        transport.request(c.encode(c.Twrite(1, 1, 0, b"x" * 70_000)), timeout=1)
    assert transport.connected


def test_close_is_idempotent_and_releases_everything() -> None:
    ours, peer = socket.socketpair()
    transport = StreamTransport.from_socket(ours)
    reader = transport._reader
    t, out = _in_thread(lambda: transport.request(c.encode(c.Tclunk(1, 1)), timeout=10))
    recv_frame(peer)
    transport.close()
    transport.close()
    t.join(5)
    assert isinstance(out["error"], TransportClosedError)
    assert not reader.is_alive()
    assert ours.fileno() == -1
    with pytest.raises(TransportClosedError):
        transport.request(c.encode(c.Tclunk(2, 1)), timeout=1)
    assert peer.recv(1) == b""  # the peer sees the end of the stream
    peer.close()


def test_not_owned_socket_stays_open() -> None:
    ours, peer = socket.socketpair()
    with StreamTransport.from_socket(ours, own=False) as transport:
        assert transport.connected
    assert ours.fileno() != -1
    ours.close()
    peer.close()


def test_from_fds_over_two_pipes() -> None:
    to_server_r, to_server_w = os.pipe()
    to_client_r, to_client_w = os.pipe()
    transport = StreamTransport.from_fds(to_client_r, to_server_w)
    try:
        t, out = _in_thread(lambda: transport.request(c.encode(c.Tclunk(2, 5)), timeout=5))
        head = os.read(to_server_r, 7)
        (size,) = struct.unpack_from("<I", head)
        body = os.read(to_server_r, size - 7)
        assert c.decode(head + body) == c.Tclunk(2, 5)
        os.write(to_client_w, c.encode(c.Rclunk(2)))
        t.join(5)
        assert out["result"] == c.encode(c.Rclunk(2))
    finally:
        transport.close()
        os.close(to_server_r)
        os.close(to_client_w)
    for fd in (to_client_r, to_server_w):  # owned: closed with the transport
        with pytest.raises(OSError):
            os.fstat(fd)


def test_tcp_loopback() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            request = recv_frame(conn)
            conn.sendall(reply_for(request, c.Rversion(c.NOTAG, 8192, "9P2000.L")))

    srv = threading.Thread(target=serve)
    srv.start()
    try:
        with StreamTransport.tcp("127.0.0.1", port) as transport:
            raw = transport.request(c.encode(c.Tversion(c.NOTAG, 8192, "9P2000.L")), timeout=5)
            assert c.decode(raw) == c.Rversion(c.NOTAG, 8192, "9P2000.L")
    finally:
        srv.join(5)
        listener.close()


def test_unix_connect_failure_is_clear(tmp_path: object) -> None:
    with pytest.raises(FileNotFoundError):
        StreamTransport.unix(os.path.join(str(tmp_path), "no-such.sock"))
