"""Fuzz target ``codec``: every 9P2000.L and 9P2000.u message type, valid and mutated.

Each case is one input to :func:`pyxen9p.p9.codec.decode` (or one encode
of a message with out-of-range fields):

* ``roundtrip``: a random valid message of a random type (every type is
  drawn equally) must survive ``decode(encode(m)) == m`` and
  ``encode(decode(raw)) == raw``;
* ``invalid``: a message with a field the wire cannot carry (an integer out
  of range, a lone surrogate, 17 walk names, a non-Qid) must make
  ``encode`` raise :class:`~pyxen9p.p9.codec.ProtocolError` and nothing else;
* ``mutated:<how>``: the encoding of a random valid message, mutated (bits,
  bytes, truncation, insertion, a count or length field overwritten with a
  lying value, the type byte changed, a splice of two messages, random
  bodies), its size field usually fixed up so that the body parser is
  reached.  ``decode`` must return a message of the header's type and tag
  that re-encodes to the same bytes (the legacy bare-errno Rerror aside), or
  raise ``ProtocolError``; nothing else.  An Rreaddir's entries go through
  :func:`~pyxen9p.p9.codec.parse_dirents` the same way.

A quarter of the cases are 9P2000.u: messages of that dialect (Topen,
Tcreate, Tstat/Rstat, Twstat with their nested stat sizes, and an Rread
carrying packed stats, which go through
:func:`~pyxen9p.p9.codec.parse_stats`), decoded with
``decode(frame, dialect="9P2000.u")``.  Some of them are Rstats laid out
as xen-9pfsd writes them (sizes 10 bytes over), valid and mutated, for
:func:`~pyxen9p.p9.codec.decode_xen9pfsd_rstat`; every 9P2000.u Rstat frame
and Rread also goes through the xen-9pfsd readers, which must either refuse
it or give back something that re-encodes to the same bytes.

Memory: every decode of a frame with a lying count, and every 16th decode,
runs under :mod:`tracemalloc`; the peak must stay within a small multiple of
the frame's length (a decoder that believed a count of 2**32 would allocate
gigabytes).
"""

from __future__ import annotations

import random
import struct
import tracemalloc
from collections import Counter
from typing import Any

from pyxen9p.p9 import codec as c

CLASSES = [c.message_classes()[t] for t in sorted(c.message_classes())]
U = c.VERSION_9P2000_U
L = c.VERSION_9P2000_L
#: the classes of each dialect
DIALECT_CLASSES = {
    L: CLASSES,
    U: [c.message_classes(U)[t] for t in sorted(c.message_classes(U))],
}
_MAX = {"u8": 0xFF, "u16": 0xFFFF, "u32": 0xFFFFFFFF, "u64": (1 << 64) - 1, "i64": (1 << 63) - 1}
#: the smallest value of the signed kinds (the others start at 0)
_MIN = {"i64": -(1 << 63)}
#: bytes of a frame's length the decoder may allocate, plus a constant
MEMORY_FACTOR = 8
MEMORY_SLACK = 64 * 1024


def fields_of(cls: type[c.Message]) -> list[tuple[str, str]]:
    """``(name, kind)`` of every wire field of *cls*, in order."""
    out: list[tuple[str, str]] = []
    for op in cls._OPS:
        if isinstance(op, c._FixedOp):
            out.extend(op.items)
        elif isinstance(op, c._StrOp):
            out.append((op.name, "s"))
        elif isinstance(op, c._StrsOp):
            out.append((op.name, "strs"))
        elif isinstance(op, c._QidsOp):
            out.append((op.name, "qids"))
        elif isinstance(op, c._DataOp):
            out.append((op.name, "data"))
        elif isinstance(op, c._StatOp):
            out.append((op.name, "stat"))
        else:  # pragma: no cover - a new kind of field
            raise AssertionError(f"unknown field op {op!r}")
    return out


def integer(rng: random.Random, kind: str) -> int:
    """An integer of *kind* (u8..u64, i64), biased to the boundaries."""
    top = _MAX[kind]
    low = _MIN.get(kind, 0)
    roll = rng.random()
    if roll < 0.3:
        return rng.choice([0, 1, top, top - 1, top >> 1, (top >> 1) + 1, low, low + 1, low // 2])
    if roll < 0.6:
        return rng.randrange(max(low, -4096), min(top, 4096) + 1)
    return rng.randrange(low, top + 1)


def raw_name(rng: random.Random, longest: int = 40) -> bytes:
    """Bytes of a 9P string: ASCII, UTF-8, invalid UTF-8, NUL, slashes, dots."""
    roll = rng.random()
    if roll < 0.1:
        return rng.choice([b"", b".", b"..", b"/", b"a/b", b"\0", b"\xff\xfe", "é".encode()])
    n = rng.randrange(longest + 1) if roll < 0.95 else rng.randrange(300, 2000)
    alphabet = rng.choice([b"abcxyz._-", bytes(range(256)), "aé€😀".encode() + b"/."])
    return bytes(rng.choice(alphabet) for _ in range(n))


def string(rng: random.Random) -> str:
    """A :class:`str` that encodes (``surrogateescape`` keeps any bytes)."""
    return raw_name(rng).decode("utf-8", "surrogateescape")


def qid(rng: random.Random) -> c.Qid:
    """A random qid."""
    return c.Qid(integer(rng, "u8"), integer(rng, "u32"), integer(rng, "u64"))


def value(rng: random.Random, kind: str) -> Any:
    """A valid value of a field of *kind*."""
    if kind in _MAX:
        return integer(rng, kind)
    if kind == "s":
        return string(rng)
    if kind == "qid":
        return qid(rng)
    if kind == "strs":
        return tuple(string(rng) for _ in range(rng.randrange(c.MAXWELEM + 1)))
    if kind == "qids":
        return tuple(qid(rng) for _ in range(rng.randrange(c.MAXWELEM + 1)))
    if kind == "data":
        n = rng.choice([0, 1, rng.randrange(64), rng.randrange(4096)])
        return rng.randbytes(n)
    if kind == "stat":
        return stat(rng)
    raise AssertionError(kind)


def stat(rng: random.Random) -> c.Stat:
    """A random 9P2000.u stat."""
    return c.Stat(
        integer(rng, "u16"), integer(rng, "u32"), qid(rng),
        *(integer(rng, k) for k in ("u32", "u32", "u32", "u64")),
        *(string(rng) for _ in range(5)),
        *(integer(rng, "u32") for _ in range(3)),
    )  # fmt: skip


def message(
    rng: random.Random, cls: type[c.Message] | None = None, dialect: str = L
) -> c.Message:
    """A random valid message (of *cls*, or of a random type of *dialect*)."""
    cls = cls if cls is not None else rng.choice(DIALECT_CLASSES[dialect])
    if cls is c.Rread and dialect == U and rng.random() < 0.5:
        stats = [stat(rng) for _ in range(rng.randrange(4))]
        return c.Rread(integer(rng, "u16"), c.pack_stats(stats))
    if cls is c.Rreaddir and rng.random() < 0.7:
        entries = [
            c.Dirent(qid(rng), integer(rng, "u64"), integer(rng, "u8"), string(rng))
            for _ in range(rng.randrange(6))
        ]
        return c.Rreaddir(integer(rng, "u16"), c.pack_dirents(entries))
    return cls(integer(rng, "u16"), *(value(rng, k) for _, k in fields_of(cls)))


def invalid_message(rng: random.Random, dialect: str = L) -> c.Message:
    """A message of a random type with one field the wire cannot carry."""
    for _ in range(100):
        cls = rng.choice(DIALECT_CLASSES[dialect])
        names = fields_of(cls)
        if names:
            break
    values = [integer(rng, "u16")] + [value(rng, k) for _, k in names]
    index = rng.randrange(len(values))
    kind = "u16" if index == 0 else names[index - 1][1]
    if kind in _MAX:
        bad: Any = rng.choice(
            [_MIN.get(kind, 0) - 1, _MAX[kind] + 1, 1 << 70, "1", None, 1.5]
        )
    elif kind == "s":
        bad = rng.choice(["\ud800", "x" * 65536, b"bytes", 7])
    elif kind == "strs":
        bad = rng.choice([("a",) * (c.MAXWELEM + 1), "abc", ("\udfff",), 5])
    elif kind == "qids":
        bad = rng.choice([(c.Qid(0, 0, 0),) * (c.MAXWELEM + 1), ("q",), 5])
    elif kind == "qid":
        bad = rng.choice([(0, 0, 0), c.Qid(256, 0, 0), c.Qid(0, -1, 0), None])
    elif kind == "stat":
        bad = rng.choice(
            [None, "stat", c.Stat.wstat(name="\ud800"), c.Stat.wstat(atime=-1),
             c.Stat.wstat(name="x" * 40000, uid="y" * 30000), c.Stat.wstat(qid=(0, 0, 0))]
        )  # fmt: skip
    else:  # data
        bad = rng.choice(["text", 5, None, [1, 2]])
    values[index] = bad
    return cls(*values)


def mutate(rng: random.Random, raw: bytes, dialect: str = L) -> tuple[str, bytes]:
    """One mutation of the frame *raw*; returns its name and the new frame."""
    data = bytearray(raw)
    how = rng.choice(
        [
            "bits",
            "byte",
            "truncate",
            "append",
            "insert",
            "delete",
            "count",
            "count",
            "type",
            "splice",
            "random",
        ]
    )
    if how == "bits":
        for _ in range(rng.randrange(1, 5)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif how == "byte":
        data[rng.randrange(len(data))] = rng.randrange(256)
    elif how == "truncate":
        del data[rng.randrange(len(data)) :]
    elif how == "append":
        data += rng.randbytes(rng.randrange(1, 20))
    elif how == "insert":
        i = rng.randrange(len(data) + 1)
        data[i:i] = rng.randbytes(rng.randrange(1, 8))
    elif how == "delete":
        i = rng.randrange(len(data))
        del data[i : i + rng.randrange(1, 8)]
    elif how == "count":
        # a lying count or length: a u16 or u32 anywhere in the body
        width = rng.choice([2, 4])
        if len(data) >= 7 + width:
            i = rng.randrange(7, len(data) - width + 1)
            lie = rng.choice([0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF, 0x10000, 17, 4096, len(data)])
            data[i : i + width] = (lie & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    elif how == "type":
        if len(data) >= 5:
            data[4] = rng.randrange(256)
    elif how == "splice":
        other = c.encode(message(rng, dialect=dialect))
        data = data[: rng.randrange(7, len(data) + 1)] + other[rng.randrange(len(other)) :]
    else:  # random body behind a valid header of a random type
        data = bytearray(raw[:7]) + rng.randbytes(rng.randrange(64))
        classes = DIALECT_CLASSES[dialect]
        data[4] = rng.choice(classes).TYPE if rng.random() < 0.9 else rng.randrange(256)
    if len(data) >= 4 and rng.random() < 0.85:
        struct.pack_into("<I", data, 0, len(data))
    return how, bytes(data)


def xen9pfsd_stat(stat: c.Stat) -> bytes:
    """*stat* as xen-9pfsd writes it: ``tlen[2] size[2]`` and the fields, size 10 over."""
    fields = stat.pack()[2:]
    size = len(fields) + c.XEN9PFSD_STAT_EXCESS
    return struct.pack("<HH", size + 2, size) + fields


def xen9pfsd_rstat(tag: int, stat: c.Stat) -> bytes:
    """An Rstat frame as xen-9pfsd writes it."""
    body = xen9pfsd_stat(stat)
    return struct.pack("<IBH", 7 + len(body), c.Rstat.TYPE, tag) + body


def check_xen9pfsd(frame: bytes) -> None:
    """The xen-9pfsd readers refuse *frame* or read what re-encodes to it."""
    if len(frame) >= c.HEADER_SIZE and frame[4] == c.Rstat.TYPE:
        try:
            msg = c.decode_xen9pfsd_rstat(frame)
        except c.ProtocolError:
            pass
        else:
            assert xen9pfsd_rstat(msg.tag, msg.stat) == frame, frame.hex()
    if len(frame) >= c.HEADER_SIZE and frame[4] == c.Rread.TYPE:
        try:
            data = c.decode(frame, U)
        except c.ProtocolError:
            return
        assert isinstance(data, c.Rread)
        try:
            stats = c.parse_xen9pfsd_stats(data.data)
        except c.ProtocolError:
            pass
        else:
            assert b"".join(xen9pfsd_stat(st) for st in stats) == data.data


def check_decode(frame: bytes, *, measure: bool, dialect: str = L) -> c.Message | None:
    """Decode *frame*: a message that re-encodes to *frame*, or ProtocolError."""
    if dialect == U:
        check_xen9pfsd(frame)
    if measure:
        tracemalloc.start()
    try:
        msg = c.decode(frame, dialect)
    except c.ProtocolError as exc:
        assert str(exc), "a ProtocolError without a message"
        return None
    finally:
        if measure:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            limit = MEMORY_FACTOR * len(frame) + MEMORY_SLACK
            assert peak <= limit, f"decoding {len(frame)} bytes allocated {peak} bytes"
    _size, mtype, tag = c.peek_header(frame)
    assert mtype == msg.TYPE and msg.tag == tag, (msg, frame[:7])
    again = c.encode(msg)
    if not (isinstance(msg, c.Rerror) and len(frame) == c.HEADER_SIZE + 4):
        assert again == frame, f"{msg!r} re-encodes differently: {frame.hex()} -> {again.hex()}"
    assert c.decode(again, dialect) == msg
    if isinstance(msg, c.Rread) and dialect == U:
        try:
            stats = c.parse_stats(msg.data)
        except c.ProtocolError:
            pass
        else:
            assert c.pack_stats(stats) == msg.data
    if isinstance(msg, c.Rreaddir):
        try:
            entries = c.parse_dirents(msg.data)
        except c.ProtocolError:
            pass
        else:
            assert c.pack_dirents(entries) == msg.data
    return msg


class Worker:
    """Plays codec cases (stateless: nothing to set up)."""

    def __init__(self) -> None:
        self.count = 0
        self.notes: Counter[str] = Counter()

    def case(self, rng: random.Random) -> str:
        """One input; returns its kind."""
        self.count += 1
        roll = rng.random()
        # a quarter of the cases are 9P2000.u, chosen by the roll's low digits so
        # that the 9P2000.L cases draw what they drew before 9P2000.u was added
        dialect = U if (roll * 1000) % 1 < 0.25 else L
        suffix = ":u" if dialect == U else ""
        if roll < 0.2:
            msg = message(rng, dialect=dialect)
            raw = c.encode(msg)
            assert c.decode(raw, dialect) == msg, msg
            check_decode(raw, measure=self.count % 16 == 0, dialect=dialect)
            return "roundtrip" + suffix
        if roll < 0.25:
            bad = invalid_message(rng, dialect)
            try:
                c.encode(bad)
            except c.ProtocolError:
                return "invalid" + suffix
            raise AssertionError(f"encode accepted {bad!r}")
        if dialect == U and rng.random() < 0.15:
            raw = xen9pfsd_rstat(integer(rng, "u16"), stat(rng))
            if rng.random() < 0.3:
                msg = c.decode_xen9pfsd_rstat(raw)
                assert xen9pfsd_rstat(msg.tag, msg.stat) == raw
                return "roundtrip:xen9pfsd"
            how, frame = mutate(rng, raw, dialect)
            check_decode(frame, measure=how == "count", dialect=dialect)
            return f"mutated:{how}:xen9pfsd"
        raw = c.encode(message(rng, dialect=dialect))
        how, frame = mutate(rng, raw, dialect)
        measure = how == "count" or self.count % 16 == 0
        decoded = check_decode(frame, measure=measure, dialect=dialect)
        if decoded is not None:
            self.notes["mutated frames that decoded"] += 1
        if measure:
            self.notes["mutated frames decoded under tracemalloc"] += 1
        return f"mutated:{how}{suffix}"

    def close(self) -> None:
        """Nothing to release."""
