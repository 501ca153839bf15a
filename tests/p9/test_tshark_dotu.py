"""tshark's 9P dissector as an independent decoder of the 9P2000.u messages the codec encodes.

A Tversion/Rversion "9P2000.u" pair comes first so that the dissector reads
what follows as 9P2000.u (see :mod:`tests.p9.test_tshark` for the method).

Wireshark 4.0's dissector reads a stat as plain 9P2000 (type ... muid) and
shows the 9P2000.u tail (``extension[s] n_uid[4] n_gid[4] n_muid[4]``) as
message data: that tail is compared byte for byte, so a stat whose nested
sizes or fields were misplaced would not match.  It shows a Tcreate's
extension two bytes short ("target" as "targ"; the bytes on the wire are
checked to be right): either form is accepted.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from pyxen9p.p9 import codec as c
from tests.p9.test_tshark import _hexdump, tshark  # noqa: F401 (fixture)

U = c.VERSION_9P2000_U
Q = c.Qid(c.QTDIR, 7, 0x1234)
STAT = c.Stat(
    3, 9, Q, c.DMDIR | 0o755, 1000, 2000, 4096, "dir", "alice", "staff", "bob", "",
    1001, 50, c.NONUNAME,
)  # fmt: skip
LINK = c.Stat(
    0, 0, c.Qid(c.QTSYMLINK, 0, 99), c.DMSYMLINK | 0o777, 5, 6, 6, "ln", "u", "g", "",
    "target", 0, 0, 0,
)  # fmt: skip
FIELDS = [
    "9p.msgtype", "9p.tag", "_ws.malformed", "9p.fid", "9p.mode", "9p.perm", "9p.extension",
    "9p.filename", "9p.sdlen", "9p.stattype", "9p.dev", "9p.statmode", "9p.length",
    "9p.user", "9p.group", "9p.muid", "9p.qidpath", "9p.iounit", "9p.ename",
    "9p.message_data", "9p.uid", "9p.version", "9p.count",
]  # fmt: skip


def _tail(s: c.Stat) -> str:
    ext = s.extension.encode()
    ids = struct.pack("<III", s.n_uid, s.n_gid, s.n_muid)
    return (struct.pack("<H", len(ext)) + ext + ids).hex()


def _run(exe: str, tmp: Path, messages: list[bytes]) -> list[dict[str, str]]:
    hexfile = tmp / "in.hex"
    pcap = tmp / "out.pcap"
    hexfile.write_text("".join(_hexdump(m) for m in messages))
    t2p = ["text2pcap", "-q", "-4", "127.0.0.1,127.0.0.1", "-T", "40000,564"]
    subprocess.run([*t2p, str(hexfile), str(pcap)], check=True, timeout=60, capture_output=True)
    cmd = [exe, "-r", str(pcap), "-T", "fields", "-E", "separator=/t", "-E", "occurrence=a"]
    cmd += ["-E", "aggregator=,"]
    for f in FIELDS:
        cmd += ["-e", f]
    out = subprocess.run(cmd, check=True, timeout=120, capture_output=True, text=True).stdout
    rows = [dict(zip(FIELDS, line.split("\t"), strict=True)) for line in out.splitlines()]
    assert len(rows) == len(messages), out
    return rows


def _stat_fields(s: c.Stat) -> dict[str, str]:
    return {
        "9p.filename": s.name, "9p.sdlen": str(len(s.pack()) - 2), "9p.stattype": str(s.type),
        "9p.dev": str(s.dev), "9p.statmode": str(s.mode), "9p.length": str(s.length),
        "9p.user": s.uid, "9p.group": s.gid, "9p.muid": s.muid, "9p.qidpath": str(s.qid.path),
        "9p.message_data": _tail(s),
    }  # fmt: skip


def test_tshark_decodes_the_dotu_messages(tshark: str, tmp_path: Path) -> None:  # noqa: F811
    wstat = c.Stat.wstat(name="new", length=0)
    cases: list[tuple[c.Message, dict[str, str]]] = [
        (c.Tversion(c.NOTAG, 8192, U), {"9p.version": U}),
        (c.Rversion(c.NOTAG, 8192, U), {"9p.version": U}),
        (c.Tattach(1, 0, c.NOFID, "root", "/srv", 1000), {"9p.fid": "0", "9p.uid": "1000"}),
        (c.Topen(2, 5, c.ORDWR | c.OTRUNC | c.ORCLOSE), {"9p.fid": "5", "9p.mode": "0x52"}),
        (c.Ropen(2, Q, 8168), {"9p.qidpath": str(Q.path), "9p.iounit": "8168"}),
        (
            c.Tcreate(3, 5, "link", c.DMSYMLINK | 0o777, c.OREAD, "target"),
            {
                "9p.fid": "5",
                "9p.filename": "link",
                "9p.perm": str(c.DMSYMLINK | 0o777),
                "9p.mode": "0x00",
            },
        ),
        (c.Rcreate(3, Q, 0), {"9p.qidpath": str(Q.path), "9p.iounit": "0"}),
        (c.Tstat(4, 5), {"9p.fid": "5"}),
        (c.Rstat(4, STAT), _stat_fields(STAT)),
        (c.Rstat(7, LINK), _stat_fields(LINK)),
        (c.Twstat(5, 5, wstat), {"9p.fid": "5", **_stat_fields(wstat)}),
        (c.Rwstat(5), {}),
        (c.Tremove(8, 6), {"9p.fid": "6"}),
        (c.Rerror(6, "No such file", 2), {"9p.ename": "No such file",
                                          "9p.message_data": "02000000"}),
        (c.Rread(9, c.pack_stats([STAT, LINK])), {"9p.count": str(len(STAT.pack() + LINK.pack()))}),
    ]
    rows = _run(tshark, tmp_path, [c.encode(m) for m, _ in cases])
    for (m, want), row in zip(cases, rows, strict=True):
        assert row["9p.msgtype"] == str(m.TYPE), (m, row)
        assert row["9p.tag"] == str(m.tag), (m, row)
        assert row["_ws.malformed"] == "", (m, row)
        for k, v in want.items():
            assert row[k] == v, (m, k, row[k], v)
        if isinstance(m, c.Tcreate):
            assert row["9p.extension"] in (m.extension, m.extension[:-2]), row
        assert c.decode(c.encode(m), U) == m


def test_tshark_flags_a_stat_cut_short(tshark: str, tmp_path: Path) -> None:  # noqa: F811
    """The oracle can fail: an Rstat whose stat lost its last bytes (sizes kept consistent)."""
    raw = bytearray(c.encode(c.Rstat(4, STAT)))
    cut = bytes(raw[:-20])
    cut = struct.pack("<I", len(cut)) + cut[4:]
    versions = [c.encode(c.Tversion(c.NOTAG, 8192, U)), c.encode(c.Rversion(c.NOTAG, 8192, U))]
    rows = _run(tshark, tmp_path, [*versions, cut])
    assert rows[-1]["_ws.malformed"] != ""
    with pytest.raises(c.ProtocolError):
        c.decode(cut, U)
