"""Escape attempts against the file server: none may reach or change anything outside the export.

Layout (under pytest's tmp_path)::

    outside/secret.txt            "SECRET"
    outside/f.txt                 "OUTSIDE"
    outside/odir/
    export/a.txt                  "inside"
    export/sub/
    export/link_etc      -> /etc
    export/link_abs      -> <tmp>/outside          (absolute)
    export/link_out      -> ../outside
    export/link_out_file -> ../outside/secret.txt
    export/dangling      -> ../outside/created-by-attack
    export/chain1 -> chain2,  export/chain2 -> sub/../../outside

After every test the fixture checks that everything outside ``export/``
(the whole of tmp_path but the export) is byte-for-byte and attribute-for-
attribute unchanged.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pyxen9p.p9 import codec as c
from pyxen9p.p9 import server as server_module
from pyxen9p.p9.server import FileServer, SymlinkPolicy

M = TypeVar("M", bound=c.Message)
ROOT = 0
BAD_NAMES = ["..", ".", "", "../escape", "sub/../../escape", "/tmp/escape", "a\0b", "x/"]


class Conn:
    def __init__(self, srv: FileServer) -> None:
        self.srv = srv
        self.next_fid = 10
        self.ok(c.Tversion(c.NOTAG, 65536, "9P2000.L"), c.Rversion)
        self.root_qid = self.ok(c.Tattach(1, ROOT, c.NOFID, "u", "", c.NONUNAME), c.Rattach).qid

    def rpc(self, msg: c.Message) -> c.Message:
        return c.decode(self.srv.handle(c.encode(msg)))

    def ok(self, msg: c.Message, cls: type[M]) -> M:
        reply = self.rpc(msg)
        assert isinstance(reply, cls), (msg, reply)
        return reply

    def err(self, msg: c.Message) -> int:
        reply = self.rpc(msg)
        assert isinstance(reply, c.Rlerror), (msg, reply)
        return reply.ecode

    def walk(self, *names: str, start: int = ROOT) -> int:
        self.next_fid += 1
        r = self.ok(c.Twalk(1, start, self.next_fid, names), c.Rwalk)
        assert len(r.wqids) == len(names), (names, r)
        return self.next_fid


def snapshot(top: Path, skip: Path) -> dict[str, Any]:
    """Everything observable about *top*'s tree, except the subtree *skip*."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        if here == skip or skip in here.parents:
            dirnames[:] = []
            continue
        for name in sorted(dirnames + filenames):
            p = here / name
            if p == skip:
                continue
            st = os.lstat(p)
            info: tuple[Any, ...] = (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_size)
            # Not atime: reading the tree for this snapshot changes it (relatime).
            info += (st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            if stat.S_ISREG(st.st_mode):
                info += (hashlib.sha256(p.read_bytes()).hexdigest(),)
            elif stat.S_ISLNK(st.st_mode):
                info += (os.readlink(p),)
            out[str(p.relative_to(top))] = info
    return out


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[Path]:
    outside = tmp_path / "outside"
    (outside / "odir").mkdir(parents=True)
    (outside / "secret.txt").write_bytes(b"SECRET")
    (outside / "f.txt").write_bytes(b"OUTSIDE")
    export = tmp_path / "export"
    (export / "sub").mkdir(parents=True)
    (export / "a.txt").write_bytes(b"inside")
    os.symlink("/etc", export / "link_etc")
    os.symlink(str(outside), export / "link_abs")
    os.symlink("../outside", export / "link_out")
    os.symlink("../outside/secret.txt", export / "link_out_file")
    os.symlink("../outside/created-by-attack", export / "dangling")
    os.symlink("chain2", export / "chain1")
    os.symlink("sub/../../outside", export / "chain2")
    before = snapshot(tmp_path, export)
    yield export
    assert snapshot(tmp_path, export) == before, "something outside the export changed"
    assert not Path("/tmp/escape").exists()


@pytest.fixture
def conn(layout: Path) -> Iterator[Conn]:
    with FileServer(layout) as srv:
        yield Conn(srv)


def outside_inodes(layout: Path) -> set[int]:
    top = layout.parent
    inos = {os.stat(top).st_ino, os.stat(top / "outside").st_ino, os.stat("/etc").st_ino}
    for p in (top / "outside").rglob("*"):
        inos.add(os.lstat(p).st_ino)
    return inos


# -- walking -----------------------------------------------------------------------


def test_dotdot_never_leaves_the_root(conn: Conn, layout: Path) -> None:
    r = conn.ok(c.Twalk(1, ROOT, 50, ("..",) * 16), c.Rwalk)
    assert set(r.wqids) == {conn.root_qid}
    r = conn.ok(c.Twalk(1, ROOT, 51, ("sub", "..", "..", "..")), c.Rwalk)
    assert r.wqids[1:] == (conn.root_qid,) * 3
    # ".." then a sibling name of the export: looked up in the export, not above it.
    r = conn.ok(c.Twalk(1, ROOT, 52, ("..", "outside")), c.Rwalk)
    assert r.wqids == (conn.root_qid,)  # partial: "outside" not found
    assert conn.err(c.Tclunk(1, 52)) == errno.EBADF
    r = conn.ok(c.Twalk(1, ROOT, 52, ("sub", "..", "..", "outside")), c.Rwalk)
    assert len(r.wqids) == 3  # partial: "outside" not found
    # Repeated ".." walks from a fid that itself came from "..".
    fid = conn.walk("..")
    for _ in range(5):
        fid = conn.walk("..", start=fid)
    assert conn.ok(c.Tgetattr(1, fid, c.P9_GETATTR_ALL), c.Rgetattr).qid == conn.root_qid
    assert conn.err(c.Tremove(1, fid)) == errno.EBUSY


# "." and ".." are legal walk elements (tested above).
@pytest.mark.parametrize("name", [n for n in BAD_NAMES if n not in (".", "..")] + ["..\0"])
def test_walk_rejects_names_with_slashes_or_nul(conn: Conn, name: str) -> None:
    assert conn.err(c.Twalk(1, ROOT, 60, (name,))) == errno.EINVAL
    r = conn.ok(c.Twalk(1, ROOT, 60, ("sub", name)), c.Rwalk)
    assert len(r.wqids) == 1


@pytest.mark.parametrize(
    "path",
    [
        ("link_etc", "passwd"),
        ("link_abs", "secret.txt"),
        ("link_out", "secret.txt"),
        ("link_out", "odir"),
        ("chain1", "secret.txt"),
        ("chain2", "secret.txt"),
        ("link_out_file", "x"),
    ],
)
def test_walk_never_follows_symlinks(conn: Conn, layout: Path, path: tuple[str, ...]) -> None:
    r = conn.ok(c.Twalk(1, ROOT, 70, path), c.Rwalk)
    assert len(r.wqids) == 1  # stops at the link
    assert r.wqids[0].type == c.QTSYMLINK
    assert r.wqids[0].path == os.lstat(layout / path[0]).st_ino
    assert r.wqids[0].path not in outside_inodes(layout)


@pytest.mark.parametrize(
    "link", ["link_etc", "link_abs", "link_out", "link_out_file", "dangling", "chain1"]
)
def test_symlink_fids_never_reach_their_target(conn: Conn, layout: Path, link: str) -> None:
    fid = conn.walk(link)
    for flags in (c.L_O_RDONLY, c.L_O_RDWR, c.L_O_WRONLY | c.L_O_TRUNC, c.L_O_DIRECTORY):
        assert conn.err(c.Tlopen(1, fid, flags)) in (errno.ELOOP, errno.ENOTDIR)
    assert conn.err(c.Tread(1, fid, 0, 100)) == errno.EBADF
    assert conn.err(c.Twrite(1, fid, 0, b"PWNED")) == errno.EBADF
    assert conn.err(c.Treaddir(1, fid, 0, 1000)) == errno.ENOTDIR
    g = conn.ok(c.Tgetattr(1, fid, c.P9_GETATTR_ALL), c.Rgetattr)
    assert stat.S_ISLNK(g.mode) and g.qid.path == os.lstat(layout / link).st_ino
    st = conn.ok(c.Tstatfs(1, fid), c.Rstatfs)
    assert st.bsize > 0
    assert conn.ok(c.Treadlink(1, fid), c.Rreadlink).target == os.readlink(layout / link)
    # Directory operations through the link fid are refused.
    assert conn.err(c.Tlcreate(1, fid, "x", c.L_O_RDWR, 0o644, 0)) == errno.ENOTDIR
    assert conn.err(c.Tmkdir(1, fid, "x", 0o755, 0)) == errno.ENOTDIR
    assert conn.err(c.Tsymlink(1, fid, "x", "y", 0)) == errno.ENOTDIR
    assert conn.err(c.Tmknod(1, fid, "x", 0o644, 0, 0, 0)) == errno.ENOTDIR
    assert conn.err(c.Tunlinkat(1, fid, "secret.txt", 0)) == errno.ENOTDIR
    assert conn.err(c.Trenameat(1, ROOT, "a.txt", fid, "a.txt")) == errno.ENOTDIR
    assert conn.err(c.Trenameat(1, fid, "secret.txt", ROOT, "stolen")) == errno.ENOTDIR
    assert conn.err(c.Tlink(1, fid, conn.walk("a.txt"), "x")) == errno.ENOTDIR
    assert conn.err(c.Trename(1, conn.walk("a.txt"), fid, "x")) == errno.ENOTDIR


def test_setattr_on_symlinks_changes_only_the_link(conn: Conn, layout: Path) -> None:
    fid = conn.walk("link_out_file")
    sa = c.Tsetattr
    assert conn.err(sa(1, fid, c.P9_SETATTR_MODE, 0o777, 0, 0, 0, 0, 0, 0, 0)) == errno.EOPNOTSUPP
    assert conn.err(sa(1, fid, c.P9_SETATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0)) == errno.EINVAL
    valid = c.P9_SETATTR_ATIME | c.P9_SETATTR_MTIME | c.P9_SETATTR_ATIME_SET
    valid |= c.P9_SETATTR_MTIME_SET
    conn.ok(sa(1, fid, valid, 0, 0, 0, 0, 1000, 0, 2000, 0), c.Rsetattr)
    assert os.lstat(layout / "link_out_file").st_mtime_ns == 2000 * 10**9
    valid = c.P9_SETATTR_UID | c.P9_SETATTR_GID
    r = conn.rpc(sa(1, fid, valid, 0, 4321, 4321, 0, 0, 0, 0, 0))
    if os.geteuid() == 0:
        assert isinstance(r, c.Rsetattr)
        assert os.lstat(layout / "link_out_file").st_uid == 4321
    else:
        assert r == c.Rlerror(1, errno.EPERM)
    # The target (outside) is checked unchanged by the fixture.


def test_hard_link_of_a_symlink_links_the_symlink(layout: Path) -> None:
    with FileServer(layout, symlinks="any") as srv:
        conn = Conn(srv)
        fid = conn.walk("link_out_file")
        conn.ok(c.Tlink(1, ROOT, fid, "hl"), c.Rlink)
    st = os.lstat(layout / "hl")
    assert stat.S_ISLNK(st.st_mode) and st.st_ino == os.lstat(layout / "link_out_file").st_ino
    assert os.stat(layout.parent / "outside" / "secret.txt").st_nlink == 1


UNCONFINED = ["link_etc", "link_abs", "link_out", "link_out_file", "dangling", "chain2"]


def test_hard_links_of_unconfined_links_are_refused(conn: Conn, layout: Path) -> None:
    """A hard link is a new name: only for a link whose target is relative, without ".."."""
    for i, link in enumerate(UNCONFINED):
        fid = conn.walk(link)
        assert conn.err(c.Tlink(1, ROOT, fid, f"hl{i}")) == errno.EPERM
        assert conn.err(c.Tlink(1, conn.walk("sub"), fid, f"hl{i}")) == errno.EPERM
    assert not [p for p in layout.rglob("hl*")]
    # "chain1" -> "chain2" is confined (what it leads to is chain2's business).
    conn.ok(c.Tlink(1, conn.walk("sub"), conn.walk("chain1"), "hl"), c.Rlink)
    assert os.readlink(layout / "sub" / "hl") == "chain2"
    with FileServer(layout, symlinks="none") as srv:
        conn2 = Conn(srv)
        assert conn2.err(c.Tlink(1, ROOT, conn2.walk("chain1"), "hl-none")) == errno.EPERM
        conn2.ok(c.Tlink(1, ROOT, conn2.walk("a.txt"), "a-none"), c.Rlink)  # files still link
        # Moves follow the "confined" rule.
        sub = conn2.walk("sub")
        assert conn2.err(c.Trenameat(1, ROOT, "link_abs", sub, "x")) == errno.EPERM
        conn2.ok(c.Trenameat(1, sub, "hl", ROOT, "hl-moved"), c.Rrenameat)


def link_homes(top: Path) -> dict[tuple[int, int], tuple[str, str]]:
    """Every symbolic link under *top*: inode -> (its directory, its target)."""
    out = {}
    for p in top.rglob("*"):
        if p.is_symlink():
            st = os.lstat(p)
            out[(st.st_dev, st.st_ino)] = (str(p.parent.relative_to(top)), os.readlink(p))
    return out


def test_unconfined_links_never_move_to_another_directory(conn: Conn, layout: Path) -> None:
    # A link made on the host: "../a.txt" from sub/ is export/a.txt; from export/ it
    # would be <tmp>/a.txt, outside.  Shallower or deeper, its meaning changes.
    os.symlink("../a.txt", layout / "sub" / "up")
    (layout / "sub" / "deeper").mkdir()
    homes = link_homes(layout)
    sub = conn.walk("sub")
    deeper = conn.walk("sub", "deeper")
    assert conn.err(c.Trenameat(1, sub, "up", ROOT, "up")) == errno.EPERM
    assert conn.err(c.Trenameat(1, sub, "up", deeper, "up")) == errno.EPERM
    assert conn.err(c.Trename(1, conn.walk("sub", "up"), ROOT, "up")) == errno.EPERM
    for link in UNCONFINED:
        assert conn.err(c.Trenameat(1, ROOT, link, sub, link)) == errno.EPERM, link
        assert conn.err(c.Trename(1, conn.walk(link), sub, link)) == errno.EPERM, link
    assert link_homes(layout) == homes
    # Within its own directory a link keeps its meaning: allowed.
    conn.ok(c.Trenameat(1, sub, "up", sub, "up2"), c.Rrenameat)
    conn.ok(c.Trename(1, conn.walk("link_abs"), ROOT, "abs2"), c.Rrename)
    conn.ok(c.Trename(1, conn.walk("link_out"), conn.walk(), "out2"), c.Rrename)  # 2nd root fid
    assert os.readlink(layout / "sub" / "up2") == "../a.txt"
    assert link_homes(layout) == homes
    # Confined links (relative, no "..") move anywhere.
    conn.ok(c.Trenameat(1, ROOT, "chain1", deeper, "chain1"), c.Rrenameat)
    conn.ok(c.Tsymlink(1, sub, "mine", "deeper", 0), c.Rsymlink)
    conn.ok(c.Trename(1, conn.walk("sub", "mine"), ROOT, "mine"), c.Rrename)
    assert os.readlink(layout / "mine") == "deeper"


def test_directories_holding_unconfined_links_stay_under_their_parent(
    conn: Conn, layout: Path
) -> None:
    # sub/d/l -> ../../a.txt is export/a.txt; with d moved to export/ it is <tmp>/a.txt.
    d = layout / "sub" / "d"
    (d / "x" / "y").mkdir(parents=True)
    os.symlink("../../a.txt", d / "l")
    os.symlink("../../../../../outside", d / "x" / "y" / "deep")  # found at any depth
    clean = layout / "clean"
    (clean / "x" / "y").mkdir(parents=True)
    (clean / "f").write_bytes(b"f")
    os.symlink("f", clean / "l")
    os.symlink("z", clean / "x" / "y" / "l")
    homes = link_homes(layout)
    sub, sub_d = conn.walk("sub"), conn.walk("sub", "d")
    clean_x, clean_fid = conn.walk("clean", "x"), conn.walk("clean")
    before = len(os.listdir("/proc/self/fd"))
    assert conn.err(c.Trenameat(1, sub, "d", ROOT, "d")) == errno.EPERM
    assert conn.err(c.Trename(1, sub_d, ROOT, "d")) == errno.EPERM
    assert conn.err(c.Trenameat(1, sub, "d", clean_x, "d")) == errno.EPERM
    assert conn.err(c.Trenameat(1, ROOT, "sub", clean_fid, "sub")) == errno.EPERM
    assert conn.err(c.Trenameat(1, sub_d, "x", ROOT, "x")) == errno.EPERM
    assert len(os.listdir("/proc/self/fd")) == before  # the check leaks no descriptor
    assert link_homes(layout) == homes
    # Renamed within its parent, a directory keeps its depth: allowed.
    conn.ok(c.Trenameat(1, sub, "d", sub, "d2"), c.Rrenameat)
    conn.ok(c.Trename(1, conn.walk("sub", "d2"), sub, "d"), c.Rrename)
    # A directory whose links are all confined moves anywhere.
    conn.ok(c.Trenameat(1, ROOT, "clean", sub, "clean"), c.Rrenameat)
    conn.ok(c.Trename(1, conn.walk("sub", "clean"), conn.walk("sub", "d", "x"), "c"), c.Rrename)
    assert os.readlink(d / "x" / "c" / "x" / "y" / "l") == "z"
    # With symlinks="any" nothing is checked.
    with FileServer(layout, symlinks="any") as srv:
        conn2 = Conn(srv)
        conn2.ok(c.Trenameat(1, conn2.walk("sub"), "d", ROOT, "d"), c.Rrenameat)
        conn2.ok(c.Trename(1, conn2.walk("link_abs"), conn2.walk("sub"), "abs"), c.Rrename)
    assert os.readlink(layout / "d" / "l") == "../../a.txt"


def test_directories_too_large_to_check_are_not_moved(
    conn: Conn, layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "MOVE_CHECK_ENTRIES", 5)
    monkeypatch.setattr(server_module, "MOVE_CHECK_DEPTH", 3)
    wide = layout / "wide"
    wide.mkdir()
    for i in range(5):
        (wide / str(i)).write_bytes(b"")
    deep = layout / "deep"
    (deep / "1" / "2").mkdir(parents=True)
    sub = conn.walk("sub")
    conn.ok(c.Trenameat(1, ROOT, "wide", sub, "wide"), c.Rrenameat)  # 5 entries
    conn.ok(c.Trenameat(1, ROOT, "deep", sub, "deep"), c.Rrenameat)  # 3 levels
    (layout / "sub" / "wide" / "5").write_bytes(b"")
    (layout / "sub" / "deep" / "1" / "2" / "3").mkdir()
    assert conn.err(c.Trenameat(1, sub, "wide", ROOT, "wide")) == errno.EXDEV
    assert conn.err(c.Trenameat(1, sub, "deep", ROOT, "deep")) == errno.EXDEV
    conn.ok(c.Trenameat(1, sub, "deep", sub, "deep2"), c.Rrenameat)  # same parent: no check
    # A file inside the export can be linked, but only inside.
    a = conn.walk("a.txt")
    for bad in BAD_NAMES:
        assert conn.err(c.Tlink(1, ROOT, a, bad)) == errno.EINVAL


# -- creating and renaming -----------------------------------------------------------


def test_bad_names_are_refused_everywhere(conn: Conn, layout: Path) -> None:
    before = snapshot(layout, layout / "nonexistent")
    a = conn.walk("a.txt")
    for bad in BAD_NAMES:
        d = conn.walk()
        assert conn.err(c.Tlcreate(1, d, bad, c.L_O_RDWR, 0o644, 0)) == errno.EINVAL
        assert conn.err(c.Tmkdir(1, ROOT, bad, 0o755, 0)) == errno.EINVAL
        assert conn.err(c.Tsymlink(1, ROOT, bad, "sub", 0)) == errno.EINVAL
        assert conn.err(c.Tmknod(1, ROOT, bad, 0o644, 0, 0, 0)) == errno.EINVAL
        assert conn.err(c.Trename(1, a, ROOT, bad)) == errno.EINVAL
        assert conn.err(c.Trenameat(1, ROOT, "a.txt", ROOT, bad)) == errno.EINVAL
        assert conn.err(c.Trenameat(1, ROOT, bad, ROOT, "x")) == errno.EINVAL
        assert conn.err(c.Tunlinkat(1, ROOT, bad, 0)) == errno.EINVAL
        assert conn.err(c.Tunlinkat(1, ROOT, bad, c.AT_REMOVEDIR)) == errno.EINVAL
    assert snapshot(layout, layout / "nonexistent") == before


def test_create_over_symlinks_never_writes_the_target(conn: Conn, layout: Path) -> None:
    for name in ("link_out_file", "dangling", "link_out", "link_etc"):
        for flags in (c.L_O_WRONLY | c.L_O_TRUNC, c.L_O_RDWR, c.L_O_WRONLY | c.L_O_EXCL):
            d = conn.walk()
            assert conn.err(c.Tlcreate(1, d, name, flags, 0o644, 0)) in (
                errno.ELOOP, errno.EEXIST,
            )  # fmt: skip
        assert conn.err(c.Tmkdir(1, ROOT, name, 0o755, 0)) == errno.EEXIST
        assert conn.err(c.Tmknod(1, ROOT, name, stat.S_IFIFO | 0o644, 0, 0, 0)) == errno.EEXIST
        assert conn.err(c.Tsymlink(1, ROOT, name, "a.txt", 0)) == errno.EEXIST
    assert not (layout.parent / "outside" / "created-by-attack").exists()


def test_rename_over_a_symlink_replaces_the_link_only(conn: Conn, layout: Path) -> None:
    conn.ok(c.Trenameat(1, ROOT, "a.txt", ROOT, "link_out_file"), c.Rrenameat)
    assert (layout / "link_out_file").read_bytes() == b"inside"
    assert not (layout / "link_out_file").is_symlink()
    conn.ok(c.Tunlinkat(1, ROOT, "link_out", 0), c.Runlinkat)
    assert not os.path.lexists(layout / "link_out")
    assert conn.err(c.Tunlinkat(1, ROOT, "link_abs", c.AT_REMOVEDIR)) == errno.ENOTDIR


@pytest.mark.parametrize(
    "mode", [stat.S_IFCHR | 0o666, stat.S_IFBLK | 0o666, stat.S_IFSOCK | 0o666, 0o170000 | 0o644]
)
def test_mknod_refuses_devices_and_sockets(conn: Conn, layout: Path, mode: int) -> None:
    assert conn.err(c.Tmknod(1, ROOT, "dev", mode, 1, 3, 0)) == errno.EPERM
    assert not os.path.lexists(layout / "dev")


class OpenSpy:
    """Wraps os.open: records every attempt to open (not O_PATH) a non-regular non-directory."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.special: list[tuple[str, int]] = []
        real = os.open

        def spy(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
            # (O_CREAT | O_EXCL never opens an existing file.)
            if not flags & os.O_PATH and flags & (os.O_CREAT | os.O_EXCL) != (
                os.O_CREAT | os.O_EXCL
            ):
                try:
                    st = os.stat(path, dir_fd=dir_fd)
                except OSError:
                    pass
                else:
                    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                        self.special.append((os.fsdecode(path), stat.S_IFMT(st.st_mode)))
            return real(path, flags, mode, dir_fd=dir_fd)

        monkeypatch.setattr(os, "open", spy)


def _special_files(layout: Path) -> dict[str, tuple[int, int]]:
    """Special files to make in the export: name -> (Tlopen errno, Tlcreate errno)."""
    os.mkfifo(layout / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(layout / "sock"))
    sock.close()
    out = {"fifo": (0, errno.EEXIST), "sock": (errno.ENXIO, errno.ENXIO)}
    if os.geteuid() == 0:
        os.mknod(layout / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(layout / "loop", stat.S_IFBLK | 0o600, os.makedev(7, 0))
        out.update(null=(errno.EACCES, errno.EACCES), loop=(errno.EACCES, errno.EACCES))
    return out


def test_existing_special_files_are_never_opened(
    layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Devices and sockets are never opened, FIFOs only by Tlopen (non-blocking)."""
    kinds = _special_files(layout)
    with FileServer(layout) as srv:
        conn = Conn(srv)
        spy = OpenSpy(monkeypatch)
        for name, (lopen_err, lcreate_err) in kinds.items():
            for flags in (c.L_O_RDONLY, c.L_O_WRONLY, c.L_O_RDWR, c.L_O_RDWR | c.L_O_TRUNC):
                d = conn.walk()
                assert conn.err(c.Tlcreate(1, d, name, flags, 0o644, 0)) == lcreate_err, name
                d = conn.walk()
                assert conn.err(c.Tlcreate(1, d, name, flags | c.L_O_EXCL, 0o644, 0)) == (
                    errno.EEXIST
                )
                if lopen_err:
                    assert conn.err(c.Tlopen(1, conn.walk(name), flags)) == lopen_err, name
        assert spy.special == []
        # FIFOs are opened by Tlopen, without blocking, and nothing else is.
        conn.ok(c.Tlopen(1, conn.walk("fifo"), c.L_O_RDONLY), c.Rlopen)
        assert [(p.startswith("/proc/self/fd/"), kind) for p, kind in spy.special] == [
            (True, stat.S_IFIFO)
        ]
    assert os.path.exists(layout / "a.txt")


def test_tlcreate_of_an_existing_file_still_works(conn: Conn, layout: Path) -> None:
    """Without O_EXCL an existing regular file is opened (and truncated if asked)."""
    d = conn.walk()
    conn.ok(c.Tlcreate(1, d, "a.txt", c.L_O_RDWR, 0o600, 0), c.Rlcreate)
    assert conn.ok(c.Tread(1, d, 0, 100), c.Rread).data == b"inside"
    d = conn.walk()
    conn.ok(c.Tlcreate(1, d, "a.txt", c.L_O_WRONLY | c.L_O_TRUNC, 0o600, 0), c.Rlcreate)
    conn.ok(c.Twrite(1, d, 0, b"new"), c.Rwrite)
    assert (layout / "a.txt").read_bytes() == b"new"
    assert conn.err(c.Tlcreate(1, conn.walk(), "sub", c.L_O_RDONLY, 0o600, 0)) == errno.EISDIR


@pytest.mark.skipif(os.geteuid() == 0, reason="as root, /dev/null is made in the export instead")
def test_tlcreate_never_opens_dev_null(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unprivileged, a real device node: /dev/null, through a server exporting /dev."""
    with FileServer("/dev") as srv:
        conn = Conn(srv)
        spy = OpenSpy(monkeypatch)
        d = conn.walk()
        assert conn.err(c.Tlcreate(1, d, "null", c.L_O_RDWR, 0o644, 0)) == errno.EACCES
        assert conn.err(c.Tlopen(1, conn.walk("null"), c.L_O_RDWR)) == errno.EACCES
        assert spy.special == []


@pytest.mark.parametrize(
    "target",
    ["/etc", "/", "../outside", "..", "sub/../../outside", "a/../b", "x/..", "../../../etc/passwd"],
)
def test_confined_symlink_targets(conn: Conn, layout: Path, target: str) -> None:
    assert conn.err(c.Tsymlink(1, ROOT, "evil", target, 0)) == errno.EPERM
    assert not os.path.lexists(layout / "evil")


def test_allowed_symlink_targets_and_policies(layout: Path) -> None:
    with FileServer(layout) as srv:
        conn = Conn(srv)
        for i, target in enumerate(["sub", "sub/x", "./a.txt", "a..b", "...", "x/.../y"]):
            conn.ok(c.Tsymlink(1, ROOT, f"ok{i}", target, 0), c.Rsymlink)
            assert os.readlink(layout / f"ok{i}") == target
        assert conn.err(c.Tsymlink(1, ROOT, "empty", "", 0)) == errno.EINVAL
        assert conn.err(c.Tsymlink(1, ROOT, "nul", "a\0b", 0)) == errno.EINVAL
    policies: list[tuple[SymlinkPolicy, int | None]] = [("none", errno.EPERM), ("any", None)]
    for policy, want in policies:
        with FileServer(layout, symlinks=policy) as srv:
            conn = Conn(srv)
            r = conn.rpc(c.Tsymlink(1, ROOT, f"p-{policy}", "/etc", 0))
            if want is None:
                assert isinstance(r, c.Rsymlink)
                # Even then, the server itself never follows it.
                ln = conn.walk(f"p-{policy}")
                assert conn.err(c.Tlopen(1, ln, 0)) == errno.ELOOP
                r2 = conn.ok(c.Twalk(1, ROOT, 99, (f"p-{policy}", "passwd")), c.Rwalk)
                assert len(r2.wqids) == 1
            else:
                assert r == c.Rlerror(1, want)


def test_rename_and_remove_of_the_root_are_refused(conn: Conn) -> None:
    sub = conn.walk("sub")
    assert conn.err(c.Trename(1, ROOT, sub, "root-moved")) == errno.EBUSY
    root2 = conn.walk()
    assert conn.err(c.Tremove(1, root2)) == errno.EBUSY


def test_attach_cannot_name_another_tree(layout: Path) -> None:
    with FileServer(layout) as srv:
        conn = Conn(srv)
        for aname in ("/etc", str(layout.parent / "outside"), str(layout / ".."), "../"):
            assert conn.err(c.Tattach(1, 77, c.NOFID, "u", aname, 0)) == errno.ENOENT
        r = conn.ok(c.Tattach(1, 77, c.NOFID, "u", "/", 0), c.Rattach)
        assert r.qid == conn.root_qid


def test_setid_bits_are_stripped_on_create(conn: Conn, layout: Path) -> None:
    d = conn.walk()
    conn.ok(c.Tlcreate(1, d, "suid", c.L_O_RDWR, 0o104755, 0), c.Rlcreate)
    conn.ok(c.Tmknod(1, ROOT, "sgid", stat.S_IFREG | 0o2755, 0, 0, 0), c.Rmknod)
    conn.ok(c.Tmkdir(1, ROOT, "sdir", 0o6777, 0), c.Rmkdir)
    assert not os.stat(layout / "suid").st_mode & (stat.S_ISUID | stat.S_ISGID)
    assert not os.stat(layout / "sgid").st_mode & (stat.S_ISUID | stat.S_ISGID)
    assert not os.stat(layout / "sdir").st_mode & stat.S_ISUID


# -- races ---------------------------------------------------------------------------


def test_swapping_a_walked_directory_for_a_symlink(conn: Conn, layout: Path) -> None:
    d = layout / "d"
    d.mkdir()
    (d / "inside.txt").write_bytes(b"in")
    fid = conn.walk("d")
    fid2 = conn.walk("d")
    # The name now leads outside, but the fids hold the original directory.
    os.rename(d, layout / "d.old")
    os.symlink(str(layout.parent / "outside"), d)
    conn.ok(c.Tlopen(1, fid, c.L_O_RDONLY), c.Rlopen)
    names = {e.name for e in conn.ok(c.Treaddir(1, fid, 0, 8000), c.Rreaddir).entries()}
    assert names == {".", "..", "inside.txt"}
    assert conn.err(c.Twalk(1, fid2, 80, ("secret.txt",))) == errno.ENOENT
    conn.ok(c.Tlcreate(1, fid2, "new.txt", c.L_O_RDWR, 0o644, 0), c.Rlcreate)
    conn.ok(c.Twrite(1, fid2, 0, b"written"), c.Rwrite)
    assert (layout / "d.old" / "new.txt").read_bytes() == b"written"
    conn.ok(c.Tmkdir(1, conn.walk("d.old"), "made", 0o755, 0), c.Rmkdir)
    assert (layout / "d.old" / "made").is_dir()


def test_swapping_a_walked_file_for_a_symlink(conn: Conn, layout: Path) -> None:
    fid = conn.walk("a.txt")
    os.rename(layout / "a.txt", layout / "a.old")
    os.symlink("../outside/secret.txt", layout / "a.txt")
    conn.ok(c.Tlopen(1, fid, c.L_O_RDWR), c.Rlopen)
    assert conn.ok(c.Tread(1, fid, 0, 100), c.Rread).data == b"inside"
    conn.ok(c.Twrite(1, fid, 0, b"INSIDE"), c.Rwrite)
    assert (layout / "a.old").read_bytes() == b"INSIDE"
    sa = c.Tsetattr(1, fid, c.P9_SETATTR_SIZE | c.P9_SETATTR_MODE, 0o600, 0, 0, 1, 0, 0, 0, 0)
    conn.ok(sa, c.Rsetattr)
    assert (layout / "a.old").read_bytes() == b"I"
    # Remove / rename by the stale name refuse to touch the symlink now there.
    assert conn.err(c.Trename(1, fid, ROOT, "moved")) == errno.ENOENT
    assert os.path.islink(layout / "a.txt")


def test_threaded_swap_race_never_reaches_outside(conn: Conn, layout: Path) -> None:
    """A thread keeps swapping ``flip`` between a real directory and a link to outside."""
    inside = layout / "hold_dir"
    inside.mkdir()
    (inside / "f.txt").write_bytes(b"INSIDE")
    os.symlink(str(layout.parent / "outside"), layout / "hold_link")
    os.rename(inside, layout / "flip")
    stop = threading.Event()
    swaps = 0

    def flipper() -> None:
        nonlocal swaps
        flip = layout / "flip"
        while not stop.is_set():
            os.rename(flip, layout / "hold_dir")
            os.rename(layout / "hold_link", flip)
            os.rename(flip, layout / "hold_link")
            os.rename(layout / "hold_dir", flip)
            swaps += 1

    t = threading.Thread(target=flipper)
    t.start()
    reads = creates = 0
    outside = outside_inodes(layout)
    deadline = time.monotonic() + 20
    try:
        i = 0
        # At least 400 rounds, and until both kinds of success were seen.
        while i < 400 or not (reads and creates):
            assert time.monotonic() < deadline, (swaps, reads, creates)
            i += 1
            fid = 1000 + i
            r = conn.rpc(c.Twalk(1, ROOT, fid, ("flip", "f.txt")))
            if isinstance(r, c.Rwalk) and len(r.wqids) == 2:
                assert r.wqids[1].path not in outside
                lo = conn.rpc(c.Tlopen(1, fid, c.L_O_RDONLY))
                assert isinstance(lo, c.Rlopen), lo
                assert conn.ok(c.Tread(1, fid, 0, 100), c.Rread).data == b"INSIDE"
                reads += 1
                conn.ok(c.Tclunk(1, fid), c.Rclunk)
            elif isinstance(r, c.Rwalk):
                assert all(q.path not in outside for q in r.wqids)
            dfid = 5000 + i
            r = conn.rpc(c.Twalk(1, ROOT, dfid, ("flip",)))
            if isinstance(r, c.Rwalk) and r.wqids[0].type == c.QTDIR:
                r2 = conn.rpc(c.Tlcreate(1, dfid, f"c{i}", c.L_O_RDWR, 0o644, 0))
                assert isinstance(r2, c.Rlcreate), r2
                creates += 1
            if isinstance(r, c.Rwalk):
                conn.ok(c.Tclunk(1, dfid), c.Rclunk)
    finally:
        stop.set()
        t.join(30)
    assert swaps > 0 and reads > 0 and creates > 0, (swaps, reads, creates)
    # The flipper stops after a whole cycle: "flip" is the directory again.
    flip = layout / "flip"
    assert flip.is_dir() and not flip.is_symlink()
    assert len(list(flip.glob("c*"))) == creates


# -- read-only mode --------------------------------------------------------------------


def test_readonly_refuses_every_modification(layout: Path) -> None:
    (layout / "sub" / "f").write_bytes(b"data")
    before = snapshot(layout, layout / "nonexistent")
    with FileServer(layout, readonly=True) as srv:
        conn = Conn(srv)
        f = conn.walk("a.txt")
        sub = conn.walk("sub")
        rofs = errno.EROFS
        for flags in (c.L_O_WRONLY, c.L_O_RDWR, c.L_O_RDONLY | c.L_O_TRUNC):
            assert conn.err(c.Tlopen(1, f, flags)) == rofs
        d = conn.walk()
        assert conn.err(c.Tlcreate(1, d, "n", c.L_O_RDWR, 0o644, 0)) == rofs
        assert conn.err(c.Tmkdir(1, ROOT, "n", 0o755, 0)) == rofs
        assert conn.err(c.Tsymlink(1, ROOT, "n", "a.txt", 0)) == rofs
        assert conn.err(c.Tmknod(1, ROOT, "n", 0o644, 0, 0, 0)) == rofs
        assert conn.err(c.Tlink(1, ROOT, f, "n")) == rofs
        assert conn.err(c.Trename(1, f, ROOT, "n")) == rofs
        assert conn.err(c.Trenameat(1, ROOT, "a.txt", ROOT, "n")) == rofs
        assert conn.err(c.Tunlinkat(1, ROOT, "a.txt", 0)) == rofs
        assert conn.err(c.Tunlinkat(1, sub, "f", 0)) == rofs
        assert conn.err(c.Txattrcreate(1, f, "user.x", 1, 0)) == rofs
        for valid in (
            c.P9_SETATTR_MODE,
            c.P9_SETATTR_SIZE,
            c.P9_SETATTR_UID,
            c.P9_SETATTR_MTIME,
            c.P9_SETATTR_ATIME | c.P9_SETATTR_ATIME_SET,
        ):
            assert conn.err(c.Tsetattr(1, f, valid, 0o777, 0, 0, 0, 0, 0, 0, 0)) == rofs
        assert conn.err(c.Tremove(1, f)) == rofs
        assert conn.err(c.Tclunk(1, f)) == errno.EBADF  # remove clunked it anyway
        ro = conn.walk("a.txt")
        conn.ok(c.Tlopen(1, ro, c.L_O_RDONLY), c.Rlopen)
        assert conn.err(c.Twrite(1, ro, 0, b"x")) == rofs
        assert conn.ok(c.Tread(1, ro, 0, 100), c.Rread).data == b"inside"
        conn.ok(c.Tlopen(1, sub, c.L_O_RDONLY), c.Rlopen)
        assert len(conn.ok(c.Treaddir(1, sub, 0, 8000), c.Rreaddir).entries()) == 3
    assert snapshot(layout, layout / "nonexistent") == before


def test_fifo_never_blocks_the_server(conn: Conn, layout: Path) -> None:
    conn.ok(c.Tmknod(1, ROOT, "fifo", stat.S_IFIFO | 0o600, 0, 0, 0), c.Rmknod)
    fid = conn.walk("fifo")
    conn.ok(c.Tlopen(1, fid, c.L_O_RDONLY), c.Rlopen)
    # No writer yet: end of file at once, no waiting.
    assert conn.ok(c.Tread(1, fid, 0, 10), c.Rread).data == b""
    w = conn.walk("fifo")
    conn.ok(c.Tlopen(1, w, c.L_O_WRONLY), c.Rlopen)
    assert conn.ok(c.Twrite(1, w, 0, b"ping"), c.Rwrite).count == 4
    assert conn.ok(c.Tread(1, fid, 0, 10), c.Rread).data == b"ping"
    # Creating over an existing FIFO does not block either.
    d = conn.walk()
    assert conn.err(c.Tlcreate(1, d, "fifo", c.L_O_RDONLY, 0o644, 0)) == errno.EEXIST


def test_moves_race_with_renames_inside_the_moved_directory(layout: Path) -> None:
    """A rename inside a directory cannot hide an unconfined link from the check of
    a concurrent move of that directory (renames are serialized)."""
    d = layout / "d"
    d.mkdir()
    for i in range(200):
        (d / f"f{i:03}").write_bytes(b"")
    os.symlink("../a.txt", d / "bad0")
    with FileServer(layout) as srv:
        mover = renamer = Conn(srv)  # one session, two threads
        sub = mover.walk("sub")
        dfid = renamer.walk("d")
        stop = threading.Event()
        renames = 0

        def rename_in_place() -> None:
            nonlocal renames
            while not stop.is_set():
                renamer.ok(c.Trenameat(1, dfid, f"bad{renames}", dfid, f"bad{renames + 1}"),
                           c.Rrenameat)  # fmt: skip
                renames += 1

        t = threading.Thread(target=rename_in_place)
        t.start()
        try:
            for _ in range(300):
                assert mover.err(c.Trenameat(1, ROOT, "d", sub, "d")) == errno.EPERM
        finally:
            stop.set()
            t.join(30)
        assert renames > 0
    assert os.readlink(d / f"bad{renames}") == "../a.txt"
