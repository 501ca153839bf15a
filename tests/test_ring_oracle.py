"""pyxen9p.ring against a C oracle built from Xen's own ring definitions.

``tests/oracle/ring_oracle.c`` compiles ``xen/io/9pfs.h`` and ``ring.h``
(``libxen-dev``); the same packets written and read by both must match,
wrap-around included, and a C backend built only from Xen's macros must
exchange messages with pyxen9p's Producer/Consumer through shared memory.
"""

from __future__ import annotations

import ctypes
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import need, need_file, need_tool
from hypothesis import given, settings
from hypothesis import strategies as st

from pyxen9p.barrier import get_barriers
from pyxen9p.errors import RingProtocolError
from pyxen9p.ring import (
    HEADER,
    INTF_SIZE,
    XEN_PAGE_SIZE,
    ByteRing,
    Consumer,
    Interface,
    Producer,
    queued,
    ring_size,
)

SOURCE = Path(__file__).parent / "oracle" / "ring_oracle.c"
U32 = 0xFFFFFFFF


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    cc = need_tool("cc")
    need_file("/usr/include/xen/io/9pfs.h")
    out = tmp_path_factory.mktemp("oracle") / "libringoracle.so"
    result = subprocess.run(
        [cc, "-O2", "-Wall", "-Werror", "-shared", "-fPIC", "-o", str(out), str(SOURCE)],
        capture_output=True,
        text=True,
    )
    need(result.returncode == 0, f"building the ring oracle: {result.stderr}")
    lib = ctypes.CDLL(str(out))
    lib.oracle_sizeof_intf.restype = ctypes.c_size_t
    lib.oracle_offsetof.restype = ctypes.c_size_t
    lib.oracle_offsetof.argtypes = [ctypes.c_int]
    lib.oracle_ring_size.restype = ctypes.c_ulong
    lib.oracle_ring_size.argtypes = [ctypes.c_int]
    lib.oracle_queued.restype = ctypes.c_uint32
    lib.oracle_queued.argtypes = [ctypes.c_uint32] * 3
    args = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_uint32] * 3
    lib.oracle_write.argtypes = args
    lib.oracle_read.argtypes = args
    lib.oracle_backend_echo.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.oracle_backend_echo.restype = ctypes.c_int
    return lib


def test_layout_matches_the_c_struct(oracle: ctypes.CDLL) -> None:
    assert oracle.oracle_sizeof_intf() == INTF_SIZE
    page = bytearray(XEN_PAGE_SIZE)
    intf = Interface(memoryview(page))
    names = ["in_cons", "in_prod", "out_cons", "out_prod", "ring_order"]
    for field, name in enumerate(names):
        offset = oracle.oracle_offsetof(field)
        setattr(intf, name, 0x01020304 + field)
        assert struct.unpack_from("<I", page, offset)[0] == 0x01020304 + field, name
    intf.set_refs([11, 22, 33])
    ref_offset = oracle.oracle_offsetof(5)
    assert struct.unpack_from("<3I", page, ref_offset) == (11, 22, 33)
    intf.release()


def test_ring_sizes_match(oracle: ctypes.CDLL) -> None:
    for order in range(10):
        assert ring_size(order) == oracle.oracle_ring_size(order)


@settings(max_examples=300, deadline=None)
@given(
    prod=st.integers(0, U32),
    distance=st.one_of(st.integers(0, 1 << 12), st.integers(0, U32)),
    order=st.integers(0, 1),
)
def test_queued_matches_for_valid_indices(
    oracle: ctypes.CDLL, prod: int, distance: int, order: int
) -> None:
    size = ring_size(order)
    if distance > size:
        with pytest.raises(RingProtocolError):
            queued(prod, (prod - distance) & U32, size)
    else:
        cons = (prod - distance) & U32
        assert queued(prod, cons, size) == oracle.oracle_queued(prod, cons, size)


@settings(max_examples=300, deadline=None)
@given(start=st.integers(0, U32), data=st.binary(min_size=1, max_size=2048))
def test_write_and_read_packets_agree(oracle: ctypes.CDLL, start: int, data: bytes) -> None:
    size = ring_size(0)  # 2 KiB: wrap-around is common
    ours, theirs = bytearray(size), (ctypes.c_ubyte * size)()
    ByteRing(memoryview(ours)).write(start, data)
    # free space for the C writer: the consumer sits right at `start`
    oracle.oracle_write(theirs, data, len(data), start, start, size)
    assert bytes(ours) == bytes(theirs)
    # and each reads what the other wrote
    back = (ctypes.c_ubyte * len(data))()
    oracle.oracle_read(
        back, ctypes.c_char_p(bytes(ours)), len(data), (start + len(data)) & U32, start, size
    )
    assert bytes(back) == data
    assert ByteRing(memoryview(bytearray(bytes(theirs)))).read(start, len(data)) == data


def _message(tag: int, body: bytes) -> bytes:
    return HEADER.pack(7 + len(body), 100, tag) + body


_Bytes = ctypes.Array[ctypes.c_ubyte]


def _frontend_ring(order: int, start: int) -> tuple[_Bytes, _Bytes, Interface, Producer, Consumer]:
    """An interface page and data area for the C backend, every index at
    *start*, and the frontend's producer (out) and consumer (in) on them."""
    size = ring_size(order)
    page = (ctypes.c_ubyte * XEN_PAGE_SIZE)()
    data = (ctypes.c_ubyte * (2 * size))()
    intf = Interface(memoryview(page))
    for name in ("in_cons", "in_prod", "out_cons", "out_prod"):
        setattr(intf, name, start)
    barriers = get_barriers()
    view = memoryview(data).cast("B")
    producer = Producer(
        ByteRing(view[size:]), intf.loader("out_cons"), intf.storer("out_prod"), barriers, start
    )
    consumer = Consumer(
        ByteRing(view[:size]), intf.loader("in_prod"), intf.storer("in_cons"), barriers, start
    )
    return page, data, intf, producer, consumer


@settings(max_examples=25, deadline=None)
@given(
    start=st.integers(0, U32),
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=60),
)
def test_python_frontend_side_against_c_backend(
    oracle: ctypes.CDLL, start: int, sizes: list[int]
) -> None:
    """Producer/Consumer (frontend roles) exchange messages with a C echo
    backend over one shared interface page and data area, starting at an
    arbitrary index so the free-running counters wrap."""
    order = 1  # 4 KiB per direction
    size = ring_size(order)
    page, data, intf, producer, consumer = _frontend_ring(order, start)
    pending = [_message(i, bytes([i % 251]) * n) for i, n in enumerate(sizes)]
    expected = list(pending)
    received = []
    for _ in range(10 * len(pending) + 10):
        while pending and producer.put(pending[0]):
            pending.pop(0)
        oracle.oracle_backend_echo(page, data, order)
        while (header := consumer.peek_header(size)) is not None:
            received.append(consumer.take(header[0]))
            consumer.publish()
        if not pending and len(received) == len(expected):
            break
    assert received == expected
    assert intf.out_prod == (start + sum(len(m) for m in expected)) & U32
    assert intf.in_cons == intf.in_prod == intf.out_cons == intf.out_prod


@settings(max_examples=40, deadline=None)
@given(
    start=st.integers(0, U32),
    messages=st.lists(
        st.tuples(st.integers(4, 3000), st.integers(0, 3000), st.integers(0, 3000)),
        min_size=1,
        max_size=40,
    ),
)
def test_pieces_in_and_payload_out_in_place_against_c_backend(
    oracle: ctypes.CDLL, start: int, messages: list[tuple[int, int, int]]
) -> None:
    """The frontend's data path: each message put as up to three pieces cut
    anywhere (``put_pieces``, written in place, a piece may wrap), echoed by
    the C backend, taken back as an 11-byte head (``take``) and the rest
    copied straight into a buffer (``take_into``, which may wrap), from an
    arbitrary start so every piece and payload boundary meets the ring's end."""
    order = 1  # 4 KiB per direction
    size = ring_size(order)
    page, data, intf, producer, consumer = _frontend_ring(order, start)
    pending = []
    for i, (n, cut1, cut2) in enumerate(messages):
        whole = _message(i, bytes((i + j) % 251 for j in range(n)))
        a, b = sorted((cut1 % (len(whole) + 1), cut2 % (len(whole) + 1)))
        mv = memoryview(whole)
        pending.append((whole, [mv[:a], mv[a:b], mv[b:]]))
    expected = [whole for whole, _ in pending]
    received: list[bytes] = []
    for _ in range(10 * len(pending) + 10):
        while pending and producer.put_pieces(pending[0][1], len(pending[0][0])):
            pending.pop(0)
        oracle.oracle_backend_echo(page, data, order)
        while (header := consumer.peek_header(size)) is not None:
            head = consumer.take(11)
            payload = bytearray(header[0] - 11)
            consumer.take_into(memoryview(payload))
            consumer.publish()
            received.append(head + payload)
        if not pending and len(received) == len(expected):
            break
    assert received == expected
    assert intf.in_cons == intf.in_prod == intf.out_cons == intf.out_prod
