"""The 9P2000.u messages and stat structure: layouts, round trips, strictness, dialects."""

from __future__ import annotations

import struct

import pytest

from pyxen9p.p9 import codec as c

U = c.VERSION_9P2000_U
L = c.VERSION_9P2000_L
Q = c.Qid(c.QTDIR, 1, 2)
STAT = c.Stat(
    0, 0, Q, c.DMDIR | 0o755, 1, 2, 0, "d", "u", "g", "", "", 1000, 1000, c.NONUNAME
)

MESSAGES: list[c.Message] = [
    c.Topen(1, 2, c.ORDWR | c.OTRUNC),
    c.Ropen(1, Q, 8168),
    c.Tcreate(2, 3, "name", c.DMSYMLINK | 0o777, c.OREAD, "target"),
    c.Rcreate(2, Q, 0),
    c.Tstat(3, 4),
    c.Rstat(3, STAT),
    c.Twstat(4, 5, c.Stat.wstat(name="new")),
    c.Rwstat(4),
    c.Tattach(5, 0, c.NOFID, "root", "", 0),
    c.Rerror(6, "Operation not supported", 95),
    c.Tremove(7, 1),
    c.Tread(8, 1, 0, 100),
    c.Rread(8, c.pack_stats([STAT, STAT])),
]


def test_stat_layout_is_the_9p2000u_one() -> None:
    """size[2] type[2] dev[4] qid[13] mode[4] atime[4] mtime[4] length[8] 5 strings 3 ids."""
    raw = STAT.pack()
    body = (
        struct.pack("<HIBIQIIIQ", 0, 0, Q.type, Q.version, Q.path, STAT.mode, 1, 2, 0)
        + b"\x01\x00d\x01\x00u\x01\x00g\x00\x00\x00\x00"
        + struct.pack("<III", 1000, 1000, c.NONUNAME)
    )
    assert raw == struct.pack("<H", len(body)) + body
    # Rstat and Twstat wrap the stat in one more size[2]: the stat's length with its size
    rstat = c.encode(c.Rstat(3, STAT))
    assert rstat[7:9] == struct.pack("<H", len(raw)) and rstat[9:] == raw
    twstat = c.encode(c.Twstat(4, 5, STAT))
    assert twstat[7:11] == struct.pack("<I", 5) and twstat[11:13] == struct.pack("<H", len(raw))


def test_topen_and_tcreate_layouts() -> None:
    assert c.encode(c.Topen(1, 2, 0x40)).hex() == "0c000000" "70" "0100" "02000000" "40"
    raw = c.encode(c.Tcreate(1, 2, "a", 0o644, 1, "x"))
    assert raw[4] == c.MessageType.TCREATE
    fields = struct.pack("<I", 2) + b"\x01\x00a" + struct.pack("<IB", 0o644, 1)
    assert raw[7:] == fields + b"\x01\x00x"


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_in_the_u_dialect(msg: c.Message) -> None:
    raw = c.encode(msg)
    assert c.decode(raw, U) == msg
    assert c.encode(c.decode(raw, U)) == raw


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_truncation_and_trailing_byte_is_refused(msg: c.Message) -> None:
    raw = c.encode(msg)
    for n in range(c.HEADER_SIZE, len(raw)):
        short = struct.pack("<I", n) + raw[4:n]
        if isinstance(msg, c.Rerror) and n - c.HEADER_SIZE == 4:
            continue  # the nfs-ganesha bare-errno form
        with pytest.raises(c.ProtocolError):
            c.decode(short, U)
    longer = struct.pack("<I", len(raw) + 1) + raw[4:] + b"\0"
    if not isinstance(msg, c.Rread):
        with pytest.raises(c.ProtocolError):
            c.decode(longer, U)


def test_dialects_know_only_their_own_types() -> None:
    topen = c.encode(c.Topen(1, 2, 0))
    with pytest.raises(c.ProtocolError, match="unknown message type 112"):
        c.decode(topen)  # 9P2000.L is the default
    tlopen = c.encode(c.Tlopen(1, 2, 0))
    with pytest.raises(c.ProtocolError, match="unknown message type 12"):
        c.decode(tlopen, U)
    assert c.decode(tlopen) == c.Tlopen(1, 2, 0)
    with pytest.raises(ValueError, match="dialect"):
        c.decode(topen, "9P2000")
    assert c.Topen not in c.message_classes().values()
    assert c.message_class(112, U) is c.Topen
    assert c.reply_type_for(c.Tstat(1, 2)) is c.Rstat
    for t in (100, 101, 104, 107, 110, 116, 117, 118, 120, 122):
        assert c.message_class(t, U) is c.message_class(t)


def _rstat_with(stat_bytes: bytes, outer: int | None = None) -> bytes:
    n = len(stat_bytes) if outer is None else outer
    body = struct.pack("<H", n) + stat_bytes
    return struct.pack("<IBH", 7 + len(body), c.Rstat.TYPE, 1) + body


def test_stat_sizes_that_lie_are_refused() -> None:
    good = STAT.pack()
    assert c.decode(_rstat_with(good), U) == c.Rstat(1, STAT)
    for outer in (len(good) - 1, len(good) + 1, 0, 0xFFFF):
        with pytest.raises(c.ProtocolError):
            c.decode(_rstat_with(good, outer), U)
    inner = struct.unpack_from("<H", good)[0]
    for lie in (inner - 1, inner + 1, 0, 40, 0xFFFF):
        bad = struct.pack("<H", lie) + good[2:]
        with pytest.raises(c.ProtocolError):
            c.decode(_rstat_with(bad), U)
    # a byte after n_muid, inside a stat whose size (and the outer size) count it
    padded = struct.pack("<H", inner + 1) + good[2:] + b"\0"
    with pytest.raises(c.ProtocolError, match="does not match its fields"):
        c.decode(_rstat_with(padded), U)
    with pytest.raises(c.ProtocolError, match="does not match its fields"):
        c.parse_stats(padded + good)
    # a name whose length runs into the ids, with the stat's size kept consistent
    fixed = 2 + 39
    bad = bytearray(good)
    bad[fixed : fixed + 2] = struct.pack("<H", 9)
    with pytest.raises(c.ProtocolError):
        c.decode(_rstat_with(bytes(bad)), U)


def test_parse_stats_is_strict() -> None:
    data = c.pack_stats([STAT, STAT])
    assert c.parse_stats(data) == [STAT, STAT]
    assert c.parse_stats(b"") == []
    for n in range(1, len(data)):
        if n == len(STAT.pack()):
            continue
        with pytest.raises(c.ProtocolError):
            c.parse_stats(data[:n])
    with pytest.raises(c.ProtocolError):
        c.parse_stats(data + b"\0")


def test_encoding_what_does_not_fit_is_refused() -> None:
    with pytest.raises(c.ProtocolError):
        c.encode(c.Topen(1, 2, 256))
    with pytest.raises(c.ProtocolError):
        c.encode(c.Rstat(1, c.Stat.wstat(name="x" * 70000)))
    with pytest.raises(c.ProtocolError):
        c.encode(c.Rstat(1, "not a stat"))  # type: ignore[arg-type]
    with pytest.raises(c.ProtocolError):
        c.Stat.wstat(atime=-1).pack()


def test_wstat_leaves_every_other_field_untouched() -> None:
    s = c.Stat.wstat(length=0)
    assert s.length == 0
    assert (s.type, s.dev, s.mode, s.atime, s.mtime) == (0xFFFF, *(4 * [0xFFFFFFFF]))
    assert s.qid == c.Qid(0xFF, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF)
    assert (s.name, s.uid, s.gid, s.muid, s.extension) == ("",) * 5
    assert (s.n_uid, s.n_gid, s.n_muid) == (0xFFFFFFFF,) * 3


def _xen_layout(stat: c.Stat, excess: int = c.XEN9PFSD_STAT_EXCESS, gap: int = 2) -> bytes:
    fields = stat.pack()[2:]
    size = len(fields) + excess
    return struct.pack("<HH", size + gap, size) + fields


def test_xen9pfsd_layouts_are_read_with_exactly_their_excess() -> None:
    """xen-9pfsd counts 71 + len(name) for fields of 61 + len(name) bytes."""
    entry = _xen_layout(STAT)
    frame = struct.pack("<IBH", 7 + len(entry), c.Rstat.TYPE, 3) + entry
    assert c.decode_xen9pfsd_rstat(frame) == c.Rstat(3, STAT)
    with pytest.raises(c.ProtocolError):
        c.decode(frame, U)  # not the 9P2000.u layout
    assert c.parse_xen9pfsd_stats(entry + entry) == [STAT, STAT]
    for bad in (_xen_layout(STAT, excess=9), _xen_layout(STAT, excess=11),
                _xen_layout(STAT, gap=0), _xen_layout(STAT, excess=0)):  # fmt: skip
        with pytest.raises(c.ProtocolError):
            c.parse_xen9pfsd_stats(bad)
        with pytest.raises(c.ProtocolError):
            c.decode_xen9pfsd_rstat(struct.pack("<IBH", 7 + len(bad), c.Rstat.TYPE, 3) + bad)
    for n in range(1, len(entry)):
        with pytest.raises(c.ProtocolError):
            c.parse_xen9pfsd_stats(entry[:n])
    with pytest.raises(c.ProtocolError):
        c.decode_xen9pfsd_rstat(frame + b"\0")
    with pytest.raises(c.ProtocolError):
        c.decode_xen9pfsd_rstat(c.encode(c.Tstat(1, 2)))
