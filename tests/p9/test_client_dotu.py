"""The client over 9P2000.u, against a stand-in for xen-9pfsd (:mod:`tests.p9.userver`).

The server speaks 9P2000.u only, serves Tversion, Tattach, Twalk, Topen,
Tcreate, Tread, Twrite, Tclunk and Tstat, refuses everything else with
EOPNOTSUPP (Tflush and Tremove included), counts every fid against a limit
of 5, writes stats with xen-9pfsd's sizes, cannot remove directories and
does not answer a Tstat of its root: the client must list, read, write,
create and remove files there, more one after another than the limit, and
say clearly what the server cannot do.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pyxen9p.errors import TransportError
from pyxen9p.p9 import codec as c
from pyxen9p.p9.client import Client
from tests.p9.hostile import HostileServer
from tests.p9.userver import SILENCE, U, UServer


@pytest.fixture
def share(tmp_path: Path) -> Path:
    root = tmp_path / "share"
    root.mkdir()
    (root / "hello.txt").write_bytes(b"hello\n")
    (root / "sub").mkdir()
    (root / "sub" / "inner.bin").write_bytes(bytes(range(256)) * 100)
    return root


def names(sent: list[c.Message]) -> list[str]:
    return [type(m).__name__ for m in sent]


# --- negotiation -----------------------------------------------------------------


def test_auto_falls_back_from_L_to_u(share: Path) -> None:
    srv = UServer(share)
    with srv.client() as fs:
        assert fs.version == U
        assert fs.msize == 64 * 1024
        versions = [m for m in srv.sent if isinstance(m, c.Tversion)]
        assert [v.version for v in versions] == [c.VERSION_9P2000_L, U]


def test_version_u_offers_only_u(share: Path) -> None:
    srv = UServer(share)
    with srv.client(version=U) as fs:
        assert fs.version == U
    assert [m.version for m in srv.sent if isinstance(m, c.Tversion)] == [U]


def test_version_L_refuses_a_u_only_server(share: Path) -> None:
    srv = UServer(share)
    with pytest.raises(c.ProtocolError, match=r"speaks 'unknown', not '9P2000\.L'"):
        srv.client(version=c.VERSION_9P2000_L)
    with pytest.raises(ValueError, match="version must be"):
        srv.client(version="9P2000")


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (lambda m: c.Rversion(m.tag, m.msize, "unknown"), "'unknown', 'unknown'"),
        (lambda m: c.Rversion(m.tag, m.msize, "9P2000"), "'9P2000', '9P2000'"),
        (lambda m: c.Rlerror(m.tag, errno.EINVAL), "Invalid argument, Invalid argument"),
        (lambda m: c.Rerror(m.tag, "no", errno.EPROTO), "Protocol error, Protocol error"),
    ],
)
def test_auto_gives_up_after_both_dialects(
    share: Path, answer: Callable[[c.Message], c.Message], match: str
) -> None:
    def script(m: c.Message, honest: Callable[[], c.Message]) -> c.Message | None:
        return answer(m) if isinstance(m, c.Tversion) else None

    with HostileServer(share, script) as srv:
        transport = srv.transport()
        with pytest.raises(c.ProtocolError, match=r"neither 9P2000\.L nor 9P2000\.u") as info:
            Client(transport, aname=str(share))
        assert match in str(info.value)
        assert [m.version for m in transport.sent] == [c.VERSION_9P2000_L, U]


def test_auto_takes_L_from_an_L_server(share: Path) -> None:
    with HostileServer(share) as srv:
        transport = srv.transport()
        with Client(transport, aname=str(share)) as fs:
            assert fs.version == c.VERSION_9P2000_L
            assert fs.read_bytes("hello.txt") == b"hello\n"
        assert [m.version for m in transport.sent if isinstance(m, c.Tversion)] == [
            c.VERSION_9P2000_L
        ]
        with pytest.raises(c.ProtocolError, match=r"not '9P2000\.u'"):
            Client(srv.transport(), aname=str(share), version=U)


def test_a_server_answering_u_to_an_L_offer(share: Path) -> None:
    """Linux takes a server's "9P2000.u" answer to a 9P2000.L Tversion: so does auto."""

    def script(m: c.Message, honest: Callable[[], c.Message]) -> c.Message | None:
        if isinstance(m, c.Tversion):
            honest()  # the server resets its session
            return c.Rversion(m.tag, 8192, U)
        return None

    srv = UServer(share, script)
    with srv.client() as fs:
        assert fs.version == U and fs.msize == 8192
        assert fs.read_bytes("hello.txt") == b"hello\n"
    with pytest.raises(c.ProtocolError, match=r"speaks '9P2000\.u', not"):
        UServer(share, script).client(version=c.VERSION_9P2000_L)


# --- the file API ----------------------------------------------------------------


def test_list_read_write_stat(share: Path) -> None:
    srv = UServer(share)
    with srv.client() as fs:
        assert sorted(fs.listdir()) == ["hello.txt", "sub"]
        assert fs.read_bytes("hello.txt") == b"hello\n"
        assert fs.read_bytes("sub/inner.bin") == bytes(range(256)) * 100
        st = fs.stat("sub/inner.bin")
        assert st.st_size == 25600 and st.st_ino == os.stat(share / "sub/inner.bin").st_ino
        assert st.st_mtime == int(os.stat(share / "sub/inner.bin").st_mtime)
        assert fs.is_dir("sub") and fs.is_file("hello.txt") and not fs.exists("nope")
        entries = {e.name: e for e in fs.scandir("")}
        assert entries["sub"].is_dir() and entries["hello.txt"].is_file()
        fs.write_bytes("new.txt", b"abc")
        assert (share / "new.txt").read_bytes() == b"abc"
        fs.write_bytes("new.txt", b"x")  # an existing file: Topen with OTRUNC
        assert (share / "new.txt").read_bytes() == b"x"
        with fs.open("new.txt", "a") as f:
            f.write("yz")
        assert (share / "new.txt").read_bytes() == b"xyz"
        with pytest.raises(FileExistsError):
            fs.open("new.txt", "x")
        with pytest.raises(FileNotFoundError):
            fs.read_bytes("missing")
        fs.mkdir("d")
        assert (share / "d").is_dir()
        fs.makedirs("d/e/f")
        assert (share / "d/e/f").is_dir()
        assert fs.fid_count == 1


def test_more_files_than_the_fid_limit_one_after_another(share: Path) -> None:
    srv = UServer(share, max_open_files=5)
    with srv.client() as fs:
        n = 4 * srv.max_open_files
        for i in range(n):
            fs.write_bytes(f"f{i}", b"%d" % i)
        assert sum(1 for name in fs.listdir() if name.startswith("f")) == n
        for i in range(n):
            assert fs.read_bytes(f"f{i}") == b"%d" % i
        for i in range(n):
            fs.remove(f"f{i}")
        assert sorted(os.listdir(share)) == ["hello.txt", "sub"]
        fs.mkdir("kept")
        with pytest.raises(OSError, match="cannot remove directories") as info:
            fs.rmdir("kept")  # xen-9pfsd opens a directory with OREAD only
        assert info.value.errno == errno.EOPNOTSUPP
        assert (share / "kept").is_dir()
        assert fs.fid_count == 1 and len(srv.fids) == 1
    assert srv.peak_fids <= 3
    assert "Tflush" not in names(srv.sent)
    assert not srv.root_tstat_seen


def test_directories_are_removed_where_orclose_takes_them(share: Path) -> None:
    srv = UServer(share, extra_ops={"orclose_dirs"})
    with srv.client() as fs:
        fs.mkdir("gone")
        fs.rmdir("gone")
        assert not (share / "gone").exists()
        with pytest.raises(OSError) as info:
            fs.rmdir("sub")  # not empty: the Tclunk reports nothing, the look-up after does
        assert info.value.errno == errno.ENOTEMPTY
        assert (share / "sub").is_dir()
        assert fs.fid_count == 1 and len(srv.fids) == 1


def test_a_removal_the_server_did_not_make_is_an_error(share: Path) -> None:
    """xen-9pfsd answers the Tclunk even when its unlinkat failed: the client looks."""
    srv = UServer(share)

    def script(m: c.Message, honest: Callable[[], c.Message]) -> c.Message | None:
        if isinstance(m, c.Tclunk) and m.fid in srv.fids:
            srv.fids[m.fid].orclose = False  # as if unlinkat failed
        return None

    srv.script = script
    with srv.client() as fs:
        with pytest.raises(OSError, match="did not remove it") as info:
            fs.remove("hello.txt")
        assert info.value.errno == errno.EIO
        assert (share / "hello.txt").exists()
        assert fs.fid_count == 1 and len(srv.fids) == 1


def test_removal_goes_through_orclose_once_tremove_is_refused(share: Path) -> None:
    srv = UServer(share)
    with srv.client() as fs:
        for name in ("a", "b", "c"):
            fs.write_bytes(name, b"")
            fs.remove(name)
        assert names(srv.sent).count("Tremove") == 1
        orclose = [m for m in srv.sent if isinstance(m, c.Topen) and m.mode & c.ORCLOSE]
        assert len(orclose) == 3
        assert len(srv.fids) == 1  # the refused Tremove's fid was clunked too
        with pytest.raises(IsADirectoryError):
            fs.remove("sub")
        with pytest.raises(NotADirectoryError):
            fs.rmdir("hello.txt")
        with pytest.raises(FileNotFoundError):
            fs.remove("nope")
        assert fs.fid_count == 1 and len(srv.fids) == 1


def test_a_server_with_tremove_gets_tremove(share: Path) -> None:
    srv = UServer(share, extra_ops={"remove"})
    with srv.client() as fs:
        fs.remove("hello.txt")
        fs.mkdir("empty")
        fs.rmdir("empty")
        assert not (share / "hello.txt").exists() and not (share / "empty").exists()
        assert not any(isinstance(m, c.Topen) and m.mode & c.ORCLOSE for m in srv.sent)
        assert fs.fid_count == 1 and len(srv.fids) == 1


def test_rename_chmod_utime_truncate_need_twstat(share: Path) -> None:
    srv = UServer(share)
    with srv.client() as fs:
        for call in (
            lambda: fs.rename("hello.txt", "bye.txt"),
            lambda: fs.chmod("hello.txt", 0o600),
            lambda: fs.utime("hello.txt", (1, 2)),
            lambda: fs.truncate("hello.txt", 0),
        ):
            with pytest.raises(OSError, match="does not support Twstat") as info:
                call()
            assert info.value.errno == errno.EOPNOTSUPP
        assert names(srv.sent).count("Twstat") == 1  # known after the first refusal
        with pytest.raises(OSError) as info:
            fs.rename("hello.txt", "sub/hello.txt")
        assert info.value.errno == errno.EXDEV
        with pytest.raises(OSError, match="statfs") as info:
            fs.statfs()
        with pytest.raises(OSError, match="hard links"):
            fs.link("hello.txt", "hard")
        with pytest.raises(OSError, match="symbolic links"):
            fs.symlink("hello.txt", "ln")
        assert fs.fid_count == 1 and len(srv.fids) == 1


def test_twstat_renames_and_sets_attributes_where_the_server_allows(share: Path) -> None:
    srv = UServer(share, extra_ops={"wstat"})
    with srv.client() as fs:
        fs.rename("hello.txt", "bye.txt")
        assert (share / "bye.txt").read_bytes() == b"hello\n"
        fs.chmod("bye.txt", 0o640)
        assert os.stat(share / "bye.txt").st_mode & 0o7777 == 0o640
        fs.chmod("sub", 0o700)  # the DMDIR bit is kept
        assert os.stat(share / "sub").st_mode & 0o7777 == 0o700
        fs.utime("bye.txt", (1_000_000, 2_000_000))
        st = os.stat(share / "bye.txt")
        assert (st.st_atime, st.st_mtime) == (1_000_000, 2_000_000)
        fs.truncate("bye.txt", 2)
        assert (share / "bye.txt").read_bytes() == b"he"
        with pytest.raises(OverflowError):
            fs.utime("bye.txt", (0, 1 << 33))
        wstats = [m.stat for m in srv.sent if isinstance(m, c.Twstat)]
        assert wstats[0] == c.Stat.wstat(name="bye.txt")


def test_symlinks_through_dmsymlink_and_the_stat_extension(share: Path) -> None:
    srv = UServer(share, extra_ops={"symlink"})
    with srv.client() as fs:
        fs.symlink("sub/inner.bin", "ln")
        assert os.readlink(share / "ln") == "sub/inner.bin"
        assert fs.readlink("ln") == "sub/inner.bin"
        assert fs.is_symlink("ln")
        assert fs.read_bytes("ln") == bytes(range(256)) * 100  # resolved by the client
        with pytest.raises(OSError) as info:
            fs.readlink("hello.txt")
        assert info.value.errno == errno.EINVAL


def test_deep_paths_walk_in_steps_of_16(share: Path) -> None:
    parts = [f"d{i}" for i in range(20)]
    (share / Path(*parts)).mkdir(parents=True)
    srv = UServer(share)
    with srv.client() as fs:
        fs.write_bytes("/".join([*parts, "leaf"]), b"deep")
        assert (share / Path(*parts) / "leaf").read_bytes() == b"deep"
        assert all(len(m.wnames) <= 16 for m in srv.sent if isinstance(m, c.Twalk))
        assert srv.peak_fids <= 3


def test_trees_copy_in_and_out_within_the_fid_limit(share: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(3):
        (src / f"d{i}" / "e").mkdir(parents=True)
        for j in range(4):
            (src / f"d{i}" / f"f{j}").write_bytes(os.urandom(30000))
    srv = UServer(share)
    with srv.client() as fs:
        fs.copy_in(src, "t")  # times cannot be preserved without Twstat: a warning only
        out = tmp_path / "out"
        fs.copy_out("t", out)
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == sorted(
            p.relative_to(src) for p in src.rglob("*")
        )
        for p in src.rglob("f*"):
            assert (out / p.relative_to(src)).read_bytes() == p.read_bytes()
        assert next(d for d, _, _ in fs.walk("t")) == "t"
    assert srv.peak_fids <= 3


def test_max_entries_bounds_a_u_listing(share: Path) -> None:
    for i in range(30):
        (share / f"n{i}").touch()
    srv = UServer(share)
    with srv.client(max_entries=10) as fs:
        with pytest.raises(OSError) as info:
            fs.listdir()
        assert info.value.errno == errno.EFBIG
        assert fs.fid_count == 1 and len(srv.fids) == 1


# --- no Tflush -------------------------------------------------------------------


def test_a_timeout_ends_the_session_without_tflush(share: Path) -> None:
    def script(m: c.Message, honest: object) -> object:
        return SILENCE if isinstance(m, c.Tread) else None

    srv = UServer(share, script)
    fs = srv.client(timeout=0.5)
    with pytest.raises(TimeoutError, match="unresponsive"):
        fs.read_bytes("hello.txt")
    assert "Tflush" not in names(srv.sent)
    assert not fs.usable
    with pytest.raises(TransportError):
        fs.listdir()
    fs.close()


# --- hostile replies -------------------------------------------------------------


def _lie(kind: type[c.Message], raw: bytes) -> object:
    def script(m: c.Message, honest: object) -> object:
        return raw if isinstance(m, kind) else None

    return script


def _rstat_raw(tag_of: c.Message, stat_bytes: bytes, outer: int | None = None) -> bytes:
    n = len(stat_bytes) if outer is None else outer
    body = n.to_bytes(2, "little") + stat_bytes
    return (7 + len(body)).to_bytes(4, "little") + bytes([c.Rstat.TYPE]) + (
        tag_of.tag.to_bytes(2, "little") + body
    )


@pytest.mark.parametrize(
    "mangle",
    [
        lambda good: (good, len(good) + 1),  # outer size lies
        lambda good: (good, len(good) - 1),
        lambda good: ((len(good) - 3).to_bytes(2, "little") + good[2:], None),  # inner size lies
        lambda good: ((len(good)).to_bytes(2, "little") + good[2:], None),
        lambda good: (good[:41] + b"\xff\x00" + good[43:], None),  # name runs past the stat
    ],
    ids=["outer+1", "outer-1", "inner-1", "inner+1", "name-too-long"],
)
def test_an_rstat_whose_sizes_lie_is_a_protocol_error(share: Path, mangle: object) -> None:
    def script(m: c.Message, honest: object) -> object:
        if not isinstance(m, c.Tstat):
            return None
        good = honest().stat.pack()  # type: ignore[operator, attr-defined]
        stat_bytes, outer = mangle(good)  # type: ignore[operator]
        return _rstat_raw(m, stat_bytes, outer)

    srv = UServer(share, script)
    with srv.client() as fs:
        with pytest.raises(c.ProtocolError):
            fs.stat("hello.txt")
        assert fs.fid_count == 1
        srv.script = None
        assert fs.read_bytes("hello.txt") == b"hello\n"  # the session goes on


def test_a_directory_read_with_a_truncated_stat_is_a_protocol_error(share: Path) -> None:
    def script(m: c.Message, honest: object) -> object:
        if isinstance(m, c.Tread) and m.offset == 0:
            reply = honest()  # type: ignore[operator]
            if reply.data[:2] and len(reply.data) > 10:
                return c.Rread(m.tag, reply.data[:-5])
        return None

    srv = UServer(share, script)
    with srv.client() as fs:
        with pytest.raises(c.ProtocolError):
            fs.listdir()
        assert fs.fid_count == 1 and len(srv.fids) == 1


def test_a_listing_with_a_name_no_directory_holds_is_refused(share: Path) -> None:
    """(With the 9P2000.u layout of stats, which the script rewrites.)"""
    def script(m: c.Message, honest: object) -> object:
        if isinstance(m, c.Tread) and m.offset == 0:
            reply = honest()  # type: ignore[operator]
            stats = c.parse_stats(reply.data)
            if stats:
                from dataclasses import replace

                evil = replace(stats[0], name="../escape")
                return c.Rread(m.tag, c.pack_stats([evil, *stats[1:]]))
        return None

    srv = UServer(share, script, stats="spec")
    with srv.client() as fs, pytest.raises(c.ProtocolError, match="escape"):
        fs.listdir()


def test_an_L_only_reply_in_a_u_session_is_a_protocol_error(share: Path) -> None:
    def script(m: c.Message, honest: object) -> object:
        return c.Rlerror(m.tag, errno.ENOENT) if isinstance(m, c.Tstat) else None

    srv = UServer(share, script)
    with srv.client() as fs, pytest.raises(c.ProtocolError, match="unknown message type 7"):
        fs.stat("hello.txt")


def test_the_L_client_is_unchanged_over_a_u_transport_object(share: Path) -> None:
    """Client() with an explicit 9P2000.u still takes every constructor option."""
    srv = UServer(share)
    fs = Client(srv.transport(), version=U, uname="root", n_uname=0, timeout=5)
    assert fs.root_qid.type & c.QTDIR
    fs.close()
    assert len(srv.fids) == 0


def test_fsspec_ls_over_u_stays_within_the_fid_limit(share: Path) -> None:
    """fsspec's ls stats entries in parallel over 9P2000.L; one by one over 9P2000.u."""
    from pyxen9p.fsspec import Xen9pFileSystem

    for i in range(40):
        (share / f"e{i}").write_bytes(b"x" * i)
    srv = UServer(share)
    fs = Xen9pFileSystem.from_client(srv.client())
    try:
        infos = fs.ls("", detail=True)
        assert len(infos) == 42
        assert {os.path.basename(i["name"]): i["size"] for i in infos}["e7"] == 7
    finally:
        fs.close()
    assert srv.peak_fids <= 2


# --- xen-9pfsd's own ways ----------------------------------------------------------


def test_xen9pfsd_stat_sizes_are_read_and_known(share: Path) -> None:
    srv = UServer(share)  # stats="xen9pfsd"
    with srv.client() as fs:
        assert fs._dotu is not None and not fs._dotu.xen9pfsd_stats
        assert fs.stat("hello.txt").st_size == 6
        assert fs._dotu.xen9pfsd_stats
        assert sorted(fs.listdir("")) == ["hello.txt", "sub"]
    spec = UServer(share, stats="spec")
    with spec.client() as fs:
        assert fs.stat("hello.txt").st_size == 6
        assert sorted(fs.listdir("")) == ["hello.txt", "sub"]
        assert fs._dotu is not None and not fs._dotu.xen9pfsd_stats


def test_the_root_of_xen9pfsd_is_never_tstat(share: Path) -> None:
    srv = UServer(share)
    with srv.client() as fs:
        for path in ("", "/", ".", "sub/..", "/sub/../."):
            with pytest.raises(OSError, match="root usefully") as info:
                fs.stat(path)
            assert info.value.errno == errno.EOPNOTSUPP
        assert fs.is_dir("") and fs.exists("/")
        assert sorted(fs.listdir("/")) == ["hello.txt", "sub"]
        assert fs.stat("sub").st_mode & 0o170000 == 0o040000
    assert not srv.root_tstat_seen


def test_the_root_guard_follows_the_stats_without_a_backend_path(share: Path) -> None:
    srv = UServer(share)
    transport = srv.transport()
    transport.backend_path = ""  # as over a socket
    with Client(transport, timeout=5) as fs:
        assert fs._dotu is not None and not fs._dotu.xen9pfsd
        fs.listdir("")  # the stats give xen-9pfsd away
        assert fs._dotu.xen9pfsd
        with pytest.raises(OSError, match="root usefully"):
            fs.stat("")
    assert not srv.root_tstat_seen


def test_a_root_tstat_is_sent_to_other_u_servers(share: Path) -> None:
    srv = UServer(share, stats="spec", root_tstat_refused=False)
    transport = srv.transport()
    transport.backend_path = "/local/domain/0/backend/9pfs/1/0"  # QEMU's
    with Client(transport, timeout=5) as fs:
        assert fs.stat("").st_ino == os.stat(share).st_ino


def test_xen9pfsd_refuses_symlinks_with_einval_said_clearly(share: Path) -> None:
    srv = UServer(share)
    with srv.client() as fs, pytest.raises(OSError, match="symbolic links") as info:
        fs.symlink("hello.txt", "ln")
    assert info.value.errno == errno.EOPNOTSUPP


def test_an_rerror_without_an_errno_is_an_io_error_over_u(share: Path) -> None:
    """9P2000.u servers may leave errno 0 (xen-9pfsd passes on a stale errno); not .L."""

    def script(m: c.Message, honest: Callable[[], c.Message]) -> c.Message | None:
        return c.Rerror(m.tag, "Success", 0) if isinstance(m, c.Twalk) and m.wnames else None

    srv = UServer(share, script)
    with srv.client() as fs:
        with pytest.raises(OSError, match="error number 0") as info:
            fs.stat("hello.txt")
        assert info.value.errno == errno.EIO and not isinstance(info.value, c.ProtocolError)
        assert fs.fid_count == 1 and len(srv.fids) == 1
