"""A transport-agnostic test suite for :class:`pyxen9p.p9.client.Client`.

A test module provides two pytest fixtures and star-imports this module::

    @pytest.fixture
    def root(tmp_path) -> Path: ...        # the server's exported directory
    @pytest.fixture
    def client(root) -> Iterator[Client]: ...  # a Client attached to it

    from .client_suite import *            # or: from p9.client_suite import *

Every test acts through the client and checks the effect on the exported
directory itself (and the other way round), so it exercises the client, the
transport and the server together.  The autouse fixture
``check_client_clean`` fails a test that leaves fids or tags behind.

Some tests need root (``chown`` to another user); they adapt when not root.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import io
import itertools
import os
import stat
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyxen9p.p9 import codec as c
from pyxen9p.p9.client import Client
from pyxen9p.p9.files import RemoteFileIO
from pyxen9p.p9.transport import Transport

__all__ = [
    "check_client_clean",
    "test_chmod",
    "test_chown",
    "test_concurrent_threads",
    "test_copy_file_in_and_out_with_progress",
    "test_copy_tree_in_and_out",
    "test_deep_paths",
    "test_errors_map_to_oserror_subclasses",
    "test_exists_is_dir_is_file",
    "test_fids_not_leaked_on_errors",
    "test_fsync_and_file_stat",
    "test_hard_link",
    "test_interrupt_sends_tflush",
    "test_large_directory_listing",
    "test_large_files_hash",
    "test_listdir_and_scandir",
    "test_makedirs",
    "test_mkdir_rmdir",
    "test_open_append",
    "test_open_exclusive",
    "test_open_invalid",
    "test_open_read_write_update",
    "test_open_text_modes",
    "test_read_existing_file",
    "test_remove",
    "test_rename_and_replace",
    "test_seek_tell",
    "test_stat_matches_export",
    "test_statfs",
    "test_symlinks",
    "test_timeout_sends_tflush",
    "test_truncate",
    "test_unclosed_file_is_clunked_later",
    "test_unicode_names",
    "test_utime",
    "test_walk_like_os_walk",
    "test_write_creates_file",
]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def check_client_clean(client: Client) -> Iterator[None]:
    """After each test: only the root fid is held and no request is in flight."""
    yield
    if client.closed:
        return
    client.exists("")  # clunks fids whose files were garbage-collected unclosed
    assert client.fid_count == 1, f"{client.fid_count - 1} fid(s) leaked"
    assert client.tags_in_use == 0
    assert not client.stuck_tags


# --------------------------------------------------------------------------
# Listing and attributes


def test_listdir_and_scandir(client: Client, root: Path) -> None:
    (root / "dir").mkdir()
    (root / "dir" / "inner.txt").write_bytes(b"12345")
    (root / "file.txt").write_bytes(b"abc")
    (root / "link").symlink_to("file.txt")
    (root / "dirlink").symlink_to("dir")
    (root / "dangling").symlink_to("nowhere")

    assert sorted(client.listdir("")) == sorted(os.listdir(root))
    assert sorted(client.listdir("/")) == sorted(os.listdir(root))
    assert client.listdir("dir") == ["inner.txt"]
    assert client.listdir("dir/") == ["inner.txt"]

    with client.scandir("") as it:
        entries = {e.name: e for e in it}
    assert set(entries) == {"dir", "file.txt", "link", "dirlink", "dangling"}
    assert entries["dir"].is_dir() and not entries["dir"].is_file()
    assert entries["file.txt"].is_file() and not entries["file.txt"].is_symlink()
    assert entries["link"].is_symlink() and entries["link"].is_file()
    assert not entries["link"].is_file(follow_symlinks=False)
    assert entries["dirlink"].is_dir() and not entries["dirlink"].is_dir(follow_symlinks=False)
    assert entries["dangling"].is_symlink()
    assert not entries["dangling"].is_file() and not entries["dangling"].is_dir()
    assert entries["file.txt"].stat().st_size == 3
    assert entries["link"].stat().st_size == 3
    assert stat.S_ISLNK(entries["link"].stat(follow_symlinks=False).st_mode)
    assert entries["file.txt"].inode() == client.stat("file.txt").st_ino
    assert entries["file.txt"].path == "file.txt"
    sub = next(iter(client.scandir("dir")))
    assert sub.path == "dir/inner.txt" and os.fspath(sub) == "dir/inner.txt"
    assert sub.stat().st_size == 5


def test_large_directory_listing(client: Client, root: Path) -> None:
    # enough long names to need several Treaddir requests at msize 64 KiB
    names = {f"{i:04d}-" + "n" * 120 for i in range(700)}
    big = root / "big"
    big.mkdir()
    for name in names:
        (big / name).touch()
    listed = client.listdir("big")
    assert len(listed) == len(names)
    assert set(listed) == names


def test_stat_matches_export(client: Client, root: Path) -> None:
    f = root / "f.bin"
    f.write_bytes(os.urandom(1234))
    os.chmod(f, 0o640)
    os.utime(f, ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
    (root / "d").mkdir()
    (root / "ln").symlink_to("f.bin")

    for name in ("f.bin", "d"):
        local = os.stat(root / name)
        remote = client.stat(name)
        assert isinstance(remote, os.stat_result)
        for field in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_mtime_ns"):
            assert getattr(remote, field) == getattr(local, field), field
        assert remote.st_mtime == pytest.approx(local.st_mtime)
    remote = client.stat("f.bin")
    assert remote.st_atime_ns == 1_600_000_000_123_456_789
    assert remote.st_mtime_ns == 1_500_000_000_987_654_321
    assert remote.st_mtime == pytest.approx(1_500_000_000.987654321, abs=1e-6)
    assert remote.st_mode == stat.S_IFREG | 0o640
    assert remote.st_ctime_ns > 0 and remote.st_blksize > 0

    assert stat.S_ISDIR(client.stat("").st_mode)
    assert stat.S_ISDIR(client.stat("/").st_mode)
    assert client.stat("ln").st_ino == client.stat("f.bin").st_ino
    assert stat.S_ISLNK(client.lstat("ln").st_mode)
    assert client.lstat("ln").st_size == len("f.bin")
    assert stat.S_ISREG(client.stat("d/../f.bin").st_mode)


def test_exists_is_dir_is_file(client: Client, root: Path) -> None:
    (root / "d").mkdir()
    (root / "f").write_text("x")
    (root / "l").symlink_to("d")
    (root / "bad").symlink_to("missing")
    assert client.exists("d") and client.exists("f") and client.exists("l")
    assert not client.exists("missing") and not client.exists("f/sub")
    assert not client.exists("bad") and client.exists("bad", follow_symlinks=False)
    assert client.is_dir("d") and client.is_dir("l") and not client.is_dir("f")
    assert client.is_file("f") and not client.is_file("d") and not client.is_file("missing")
    assert client.is_symlink("l") and not client.is_symlink("d")
    assert not client.is_dir("missing")


def test_statfs(client: Client, root: Path) -> None:
    st = client.statfs()
    local = os.statvfs(root)
    assert st.bsize > 0 and st.blocks > 0
    assert st.namelen == local.f_namemax
    assert st.bfree <= st.blocks and st.bavail <= st.blocks
    (root / "d").mkdir()
    assert client.statfs("d").blocks == st.blocks


def test_walk_like_os_walk(client: Client, root: Path) -> None:
    for d in ("a/b/c", "a/e", "f"):
        (root / d).mkdir(parents=True)
    for p in ("a/x", "a/b/y", "a/b/c/z", "top"):
        (root / p).write_text(p)
    (root / "a" / "lnk").symlink_to("b")

    def norm(triples: Iterator[tuple[str, list[str], list[str]]], base: str) -> set[
        tuple[str, tuple[str, ...], tuple[str, ...]]
    ]:
        out = set()
        for dirpath, dirs, files in triples:
            rel = os.path.relpath(dirpath, base) if base else (dirpath or ".")
            out.add((rel, tuple(sorted(dirs)), tuple(sorted(files))))
        return out

    expected = norm(os.walk(root), str(root))
    assert norm(client.walk(""), "") == expected
    # bottom-up: children before parents
    order = [d for d, _, _ in client.walk("a", topdown=False)]
    assert order.index("a/b/c") < order.index("a/b") < order.index("a")
    # pruning in top-down mode
    seen = []
    for dirpath, dirs, _ in client.walk("a"):
        seen.append(dirpath)
        dirs[:] = [d for d in dirs if d != "b"]
    assert "a/b" not in seen and "a/e" in seen
    # followlinks descends into the link
    assert "a/lnk" in [d for d, _, _ in client.walk("a", followlinks=True)]
    errors: list[OSError] = []
    assert list(client.walk("missing", onerror=errors.append)) == []
    assert isinstance(errors[0], FileNotFoundError)


# --------------------------------------------------------------------------
# Reading and writing


def test_read_existing_file(client: Client, root: Path) -> None:
    data = os.urandom(100_000)
    (root / "data.bin").write_bytes(data)
    (root / "text.txt").write_text("line one\nline two\nlast")
    assert client.read_bytes("data.bin") == data
    assert client.read_text("text.txt") == "line one\nline two\nlast"
    with client.open("text.txt") as f:
        assert isinstance(f, io.TextIOWrapper)
        assert f.readlines() == ["line one\n", "line two\n", "last"]
        assert f.mode == "r"
    with client.open("data.bin", "rb") as f:
        assert isinstance(f, io.BufferedReader)
        assert f.read(10) == data[:10]
        assert f.tell() == 10
        f.seek(50_000)
        assert f.read(70_000) == data[50_000:]
        assert f.read() == b""
    with client.open("data.bin", "rb", buffering=0) as raw:
        assert isinstance(raw, io.RawIOBase)
        buf = bytearray(1000)
        assert raw.readinto(buf) == 1000 and bytes(buf) == data[:1000]
        assert raw.readall() == data[1000:]
        with pytest.raises(io.UnsupportedOperation):
            raw.fileno()
        with pytest.raises(io.UnsupportedOperation):
            raw.write(b"x")


def test_write_creates_file(client: Client, root: Path) -> None:
    assert client.write_bytes("new.bin", b"\x00\x01binary") == 8
    assert (root / "new.bin").read_bytes() == b"\x00\x01binary"
    assert stat.S_IMODE(os.stat(root / "new.bin").st_mode) == 0o666 & ~client.umask
    client.write_text("new.txt", "héllo\n", encoding="utf-8")
    assert (root / "new.txt").read_bytes() == "héllo\n".encode()
    with client.open("perm.bin", "wb", perm=0o600) as f:
        assert isinstance(f, io.BufferedWriter)
        f.write(b"abc")
    assert stat.S_IMODE(os.stat(root / "perm.bin").st_mode) == 0o600
    # "w" truncates an existing file
    (root / "old.txt").write_text("a long old content")
    with client.open("old.txt", "w") as f:
        f.write("short")
    assert (root / "old.txt").read_text() == "short"


def test_open_exclusive(client: Client, root: Path) -> None:
    with client.open("x.txt", "x") as f:
        f.write("first")
    assert (root / "x.txt").read_text() == "first"
    with pytest.raises(FileExistsError) as info:
        client.open("x.txt", "x")
    assert info.value.errno == errno.EEXIST
    assert (root / "x.txt").read_text() == "first"


def test_open_append(client: Client, root: Path) -> None:
    (root / "log.txt").write_text("one\n")
    with client.open("log.txt", "a") as f:
        assert f.tell() == 4
        f.write("two\n")
    with client.open("log.txt", "a") as f:
        f.write("three\n")
    assert (root / "log.txt").read_text() == "one\ntwo\nthree\n"
    with client.open("log.txt", "ab+") as f:
        f.write(b"four\n")
        f.seek(0)
        assert f.read() == b"one\ntwo\nthree\nfour\n"
    with client.open("fresh.log", "a") as f:
        f.write("created")
    assert (root / "fresh.log").read_text() == "created"


def test_open_read_write_update(client: Client, root: Path) -> None:
    (root / "u.bin").write_bytes(b"0123456789")
    with client.open("u.bin", "r+b") as f:
        assert isinstance(f, io.BufferedRandom)
        assert f.read(3) == b"012"
        f.write(b"abc")
        f.seek(-2, os.SEEK_END)
        f.write(b"YZ")
    assert (root / "u.bin").read_bytes() == b"012abc67YZ"
    with client.open("w.bin", "w+b") as f:
        f.write(b"hello world")
        f.seek(6)
        assert f.read() == b"world"
    assert (root / "w.bin").read_bytes() == b"hello world"
    with client.open("u.bin", "rb") as f, pytest.raises(io.UnsupportedOperation):
        f.write(b"no")
    with client.open("w.bin", "wb") as f, pytest.raises(io.UnsupportedOperation):
        f.read()


def test_open_text_modes(client: Client, root: Path) -> None:
    with client.open("t.txt", "w", newline="\r\n", encoding="utf-8") as f:
        f.write("a\nb\n")
    assert (root / "t.txt").read_bytes() == b"a\r\nb\r\n"
    with client.open("t.txt", "r", encoding="utf-8") as f:
        assert f.read() == "a\nb\n"
    with client.open("t.txt", "r", newline="", encoding="utf-8") as f:
        assert f.read() == "a\r\nb\r\n"
    with client.open("lat.txt", "w", encoding="latin-1") as f:
        f.write("é")
    assert (root / "lat.txt").read_bytes() == b"\xe9"
    with client.open("lines.txt", "w", buffering=1) as f:
        assert f.line_buffering
        f.write("flushed\n")
        assert (root / "lines.txt").read_text() == "flushed\n"


def test_open_invalid(client: Client, root: Path) -> None:
    (root / "d").mkdir()
    (root / "f").write_text("x")
    for mode in ("", "rw", "rr", "rbt", "q", "r++", "wa"):
        with pytest.raises(ValueError):
            client.open("f", mode)
    with pytest.raises(ValueError):
        client.open("f", "r", buffering=0)
    with pytest.raises(ValueError):
        client.open("f", "rb", encoding="utf-8")
    with pytest.raises(FileNotFoundError):
        client.open("missing")
    with pytest.raises(FileNotFoundError):
        client.open("missing/new", "w")
    with pytest.raises(IsADirectoryError):
        client.open("d")
    with pytest.raises(IsADirectoryError):
        client.open("d", "w")
    with pytest.raises(NotADirectoryError):
        client.open("f/sub", "w")
    assert not (root / "missing").exists()


def test_seek_tell(client: Client, root: Path) -> None:
    (root / "s.bin").write_bytes(bytes(range(100)))
    with client.open("s.bin", "rb", buffering=0) as f:
        assert f.seekable()
        assert f.seek(10) == 10 and f.read(2) == b"\x0a\x0b"
        assert f.seek(5, os.SEEK_CUR) == 17 and f.read(1) == b"\x11"
        assert f.seek(-1, os.SEEK_END) == 99 and f.read() == b"\x63"
        assert f.read() == b""
        assert f.seek(200) == 200 and f.read(10) == b""
        with pytest.raises(OSError) as info:
            f.seek(-1)
        assert info.value.errno == errno.EINVAL
        with pytest.raises(ValueError):
            f.seek(0, 7)
    # writing past the end leaves a hole of zeros
    with client.open("s.bin", "r+b") as f:
        f.seek(110)
        f.write(b"end")
    assert (root / "s.bin").read_bytes() == bytes(range(100)) + bytes(10) + b"end"


def test_truncate(client: Client, root: Path) -> None:
    (root / "t.bin").write_bytes(b"x" * 1000)
    client.truncate("t.bin", 10)
    assert (root / "t.bin").read_bytes() == b"x" * 10
    client.truncate("t.bin", 20)
    assert (root / "t.bin").read_bytes() == b"x" * 10 + bytes(10)
    with client.open("t.bin", "r+b") as f:
        f.seek(5)
        assert f.truncate() == 5
        assert f.tell() == 5
        assert f.truncate(3) == 3
    assert (root / "t.bin").read_bytes() == b"xxx"
    with pytest.raises(FileNotFoundError):
        client.truncate("missing", 0)
    with pytest.raises(OSError):
        client.truncate("t.bin", -1)


def test_fsync_and_file_stat(client: Client, root: Path) -> None:
    with client.open("f.bin", "wb", buffering=0) as f:
        f.write(b"12345")
        f.fsync()
        assert f.stat().st_size == 5
    assert (root / "f.bin").stat().st_size == 5


def test_large_files_hash(client: Client, root: Path) -> None:
    data = os.urandom(6 * 1024 * 1024 + 12345)
    client.write_bytes("up.bin", data)
    assert _sha((root / "up.bin").read_bytes()) == _sha(data)
    other = os.urandom(5 * 1024 * 1024 + 7)
    (root / "down.bin").write_bytes(other)
    assert _sha(client.read_bytes("down.bin")) == _sha(other)
    # unbuffered, large reads and writes at offsets
    with client.open("down.bin", "r+b", buffering=0) as f:
        f.seek(1_000_001)
        chunk = os.urandom(2_000_000)
        assert f.write(chunk) == len(chunk)
        f.seek(1_000_001)
        buf = bytearray(len(chunk))
        got = 0
        while got < len(buf):
            n = f.readinto(memoryview(buf)[got:])
            assert n
            got += n
        assert buf == chunk
    expected = other[:1_000_001] + chunk + other[3_000_001:]
    assert _sha((root / "down.bin").read_bytes()) == _sha(expected)


def test_copy_file_in_and_out_with_progress(
    client: Client, root: Path, tmp_path: Path
) -> None:
    local = tmp_path / "local-src.bin"
    data = os.urandom(3 * 1024 * 1024 + 99)
    local.write_bytes(data)
    os.chmod(local, 0o751)
    os.utime(local, ns=(1_400_000_000_000_000_000, 1_300_000_000_000_000_000))
    calls: list[tuple[int, int]] = []
    assert client.copy_in(local, "copied.bin", progress=lambda d, t: calls.append((d, t))) == len(
        data
    )
    exported = root / "copied.bin"
    assert _sha(exported.read_bytes()) == _sha(data)
    assert stat.S_IMODE(exported.stat().st_mode) == 0o751
    assert exported.stat().st_mtime_ns == 1_300_000_000_000_000_000
    assert calls and calls[-1] == (len(data), len(data))
    assert all(t == len(data) for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)

    back = tmp_path / "back.bin"
    calls.clear()
    assert client.copy_out("copied.bin", back, progress=lambda d, t: calls.append((d, t))) == len(
        data
    )
    assert _sha(back.read_bytes()) == _sha(data)
    assert stat.S_IMODE(back.stat().st_mode) == 0o751
    assert back.stat().st_mtime_ns == 1_300_000_000_000_000_000
    assert calls[-1] == (len(data), len(data))

    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert client.copy_in(empty, "empty") == 0
    assert (root / "empty").read_bytes() == b""


def test_copy_tree_in_and_out(client: Client, root: Path, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    (src / "a" / "b").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "a" / "f1.txt").write_text("one")
    (src / "a" / "b" / "f2.bin").write_bytes(os.urandom(200_000))
    (src / "top.txt").write_text("top")
    (src / "a" / "link").symlink_to("f1.txt")
    os.chmod(src / "a" / "b", 0o750)

    def snapshot(base: Path) -> dict[str, tuple[str, object]]:
        out: dict[str, tuple[str, object]] = {}
        for dirpath, dirnames, filenames in os.walk(base):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                rel = str(p.relative_to(base))
                if p.is_symlink():
                    out[rel] = ("link", os.readlink(p))
                elif p.is_dir():
                    out[rel] = ("dir", stat.S_IMODE(p.stat().st_mode))
                else:
                    out[rel] = ("file", _sha(p.read_bytes()))
        return out

    total = (200_000 + 3 + 3)
    progress: list[tuple[int, int]] = []
    assert client.copy_in(src, "dest/tree", progress=lambda d, t: progress.append((d, t))) == total
    assert progress[-1] == (total, total)
    assert snapshot(root / "dest" / "tree") == snapshot(src)

    out = tmp_path / "out"
    assert client.copy_out("dest/tree", out) == total
    assert snapshot(out) == snapshot(src)
    # copying again over existing trees works (files overwritten, links replaced)
    assert client.copy_in(src, "dest/tree") == total
    assert client.copy_out("dest/tree", out) == total
    assert snapshot(out) == snapshot(src)


# --------------------------------------------------------------------------
# Namespace operations


def test_mkdir_rmdir(client: Client, root: Path) -> None:
    client.mkdir("d")
    assert (root / "d").is_dir()
    assert stat.S_IMODE(os.stat(root / "d").st_mode) == 0o777 & ~client.umask
    client.mkdir("d/private", 0o700)
    assert stat.S_IMODE(os.stat(root / "d" / "private").st_mode) == 0o700
    with pytest.raises(FileExistsError):
        client.mkdir("d")
    with pytest.raises(FileExistsError):
        client.mkdir("")
    with pytest.raises(FileNotFoundError):
        client.mkdir("nope/sub")
    with pytest.raises(OSError) as info:
        client.rmdir("d")
    assert info.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    client.rmdir("d/private")
    client.rmdir("d")
    assert not (root / "d").exists()
    (root / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        client.rmdir("f")
    with pytest.raises(FileNotFoundError):
        client.rmdir("missing")


def test_makedirs(client: Client, root: Path) -> None:
    client.makedirs("a/b/c/d")
    assert (root / "a" / "b" / "c" / "d").is_dir()
    with pytest.raises(FileExistsError):
        client.makedirs("a/b/c/d")
    client.makedirs("a/b/c/d", exist_ok=True)
    client.makedirs("a/b/e", exist_ok=True)
    assert (root / "a" / "b" / "e").is_dir()
    (root / "a" / "file").write_text("x")
    with pytest.raises(FileExistsError):
        client.makedirs("a/file", exist_ok=True)
    with pytest.raises(NotADirectoryError):
        client.makedirs("a/file/sub")


def test_remove(client: Client, root: Path) -> None:
    (root / "f").write_text("x")
    (root / "d").mkdir()
    (root / "l").symlink_to("f")
    client.remove("l")
    assert not (root / "l").is_symlink() and (root / "f").exists()
    client.unlink("f")
    assert not (root / "f").exists()
    with pytest.raises(FileNotFoundError):
        client.remove("f")
    with pytest.raises(OSError) as info:
        client.remove("d")
    assert info.value.errno in (errno.EISDIR, errno.EPERM)
    assert (root / "d").is_dir()


def test_rename_and_replace(client: Client, root: Path) -> None:
    (root / "a").mkdir()
    (root / "b").mkdir()
    (root / "a" / "f").write_text("content")
    client.rename("a/f", "b/g")
    assert not (root / "a" / "f").exists()
    assert (root / "b" / "g").read_text() == "content"
    (root / "target").write_text("old")
    client.replace("b/g", "target")
    assert (root / "target").read_text() == "content"
    client.rename("a", "renamed")
    assert (root / "renamed").is_dir() and not (root / "a").exists()
    with pytest.raises(FileNotFoundError):
        client.rename("missing", "x")
    with pytest.raises(FileNotFoundError):
        client.rename("target", "nodir/x")
    (root / "renamed" / "inner").write_text("z")
    with pytest.raises(OSError) as info:
        client.rename("b", "renamed")  # over a non-empty directory
    assert info.value.errno in (errno.ENOTEMPTY, errno.EEXIST)


def test_symlinks(client: Client, root: Path) -> None:
    (root / "sub").mkdir()
    (root / "sub" / "f").write_text("target data")
    client.symlink("sub/f", "rel")
    assert os.readlink(root / "rel") == "sub/f"
    assert client.readlink("rel") == "sub/f"
    assert client.read_text("rel") == "target data"
    # a link in the middle of a path, and one climbing with ".."
    client.symlink("sub", "dirlink")
    assert client.read_text("dirlink/f") == "target data"
    (root / "sub" / "up").symlink_to("../sub/f")
    assert client.read_text("sub/up") == "target data"
    assert client.read_text("dirlink/up") == "target data"
    # an absolute target starts at the attach root
    (root / "abs").symlink_to("/sub/f")
    assert client.read_text("abs") == "target data"
    # writing through a link writes the target
    client.write_text("rel", "new data")
    assert (root / "sub" / "f").read_text() == "new data"
    assert (root / "rel").is_symlink()
    # loops and dangling links
    (root / "loop1").symlink_to("loop2")
    (root / "loop2").symlink_to("loop1")
    with pytest.raises(OSError) as info:
        client.stat("loop1")
    assert info.value.errno == errno.ELOOP
    (root / "dangling").symlink_to("nowhere")
    with pytest.raises(FileNotFoundError):
        client.read_text("dangling")
    assert client.readlink("dangling") == "nowhere"
    with pytest.raises(OSError) as info:
        client.readlink("sub/f")
    assert info.value.errno == errno.EINVAL
    with pytest.raises(FileExistsError):
        client.symlink("x", "rel")


def test_hard_link(client: Client, root: Path) -> None:
    (root / "orig").write_text("shared")
    client.link("orig", "alias")
    assert (root / "alias").read_text() == "shared"
    assert os.stat(root / "orig").st_ino == os.stat(root / "alias").st_ino
    assert os.stat(root / "orig").st_nlink == 2
    assert client.stat("alias").st_nlink == 2
    assert client.stat("alias").st_ino == client.stat("orig").st_ino
    with pytest.raises(FileExistsError):
        client.link("orig", "alias")
    with pytest.raises(FileNotFoundError):
        client.link("missing", "other")


def test_chmod(client: Client, root: Path) -> None:
    (root / "f").write_text("x")
    client.chmod("f", 0o604)
    assert stat.S_IMODE(os.stat(root / "f").st_mode) == 0o604
    (root / "d").mkdir()
    client.chmod("d", 0o711)
    assert stat.S_IMODE(os.stat(root / "d").st_mode) == 0o711
    client.chmod("d", 0o1777)  # the sticky bit too
    assert stat.S_IMODE(os.stat(root / "d").st_mode) == 0o1777
    with pytest.raises(FileNotFoundError):
        client.chmod("missing", 0o600)


def test_chown(client: Client, root: Path) -> None:
    (root / "f").write_text("x")
    before = os.stat(root / "f")
    if os.geteuid() == 0:
        client.chown("f", 4321, 8765)
        after = os.stat(root / "f")
        assert (after.st_uid, after.st_gid) == (4321, 8765)
        client.chown("f", -1, 42)
        after = os.stat(root / "f")
        assert (after.st_uid, after.st_gid) == (4321, 42)
    else:
        client.chown("f", before.st_uid, -1)
        assert os.stat(root / "f").st_uid == before.st_uid


def test_utime(client: Client, root: Path) -> None:
    (root / "f").write_text("x")
    client.utime("f", (1_000_000_000.5, 1_100_000_000.25))
    st = os.stat(root / "f")
    assert st.st_atime_ns == 1_000_000_000_500_000_000
    assert st.st_mtime_ns == 1_100_000_000_250_000_000
    client.utime("f", ns=(123_456_789_012_345_678, 223_456_789_012_345_678))
    st = os.stat(root / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (123_456_789_012_345_678, 223_456_789_012_345_678)
    client.utime("f")
    assert abs(os.stat(root / "f").st_mtime - time.time()) < 60
    with pytest.raises(ValueError):
        client.utime("f", (1, 2), ns=(1, 2))


def test_unicode_names(client: Client, root: Path) -> None:
    names = ["été.txt", "日本語", "with space", "emoji-\U0001f600"]
    for name in names:
        client.write_text(name, name)
    assert sorted(os.listdir(root)) == sorted(names)
    assert sorted(client.listdir("")) == sorted(names)
    for name in names:
        assert (root / name).read_text() == name


# --------------------------------------------------------------------------
# Depth, errors, leaks, concurrency, timeouts


def test_deep_paths(client: Client, root: Path) -> None:
    depth = 40  # more than two Twalks of 16 names
    parts = [f"d{i}" for i in range(depth)]
    deep = "/".join(parts)
    (root / deep).mkdir(parents=True)
    (root / deep / "leaf.txt").write_text("deep")
    assert client.read_text(f"{deep}/leaf.txt") == "deep"
    assert client.listdir(deep) == ["leaf.txt"]
    assert client.stat(f"{deep}/leaf.txt").st_size == 4
    for n in (15, 16, 17, 32, 33):
        assert client.is_dir("/".join(parts[:n]))
    client.write_text(f"{deep}/new.txt", "made")
    assert (root / deep / "new.txt").read_text() == "made"
    client.makedirs("e/" + "/".join(f"e{i}" for i in range(35)))
    assert (root / "e" / "/".join(f"e{i}" for i in range(35))).is_dir()
    # failures in the first, second and third Twalk
    for n in (3, 20, 36):
        missing = "/".join([*parts[:n], "missing", "x", "y"])
        with pytest.raises(FileNotFoundError) as info:
            client.stat(missing)
        assert info.value.filename == missing
    with pytest.raises(NotADirectoryError):
        client.stat(f"{deep}/leaf.txt/below")
    # a link deep down, pointing up
    (root / deep / "up").symlink_to("../" * depth + "e")
    assert client.is_dir(f"{deep}/up/e0")


def test_errors_map_to_oserror_subclasses(client: Client, root: Path) -> None:
    (root / "f").write_text("x")
    (root / "d").mkdir()
    cases: list[tuple[Callable[[], object], type[OSError], int]] = [
        (lambda: client.stat("no/such"), FileNotFoundError, errno.ENOENT),
        (lambda: client.stat("f/x"), NotADirectoryError, errno.ENOTDIR),
        (lambda: client.listdir("f"), NotADirectoryError, errno.ENOTDIR),
        (lambda: client.mkdir("f"), FileExistsError, errno.EEXIST),
        (lambda: client.open("d", "w"), IsADirectoryError, errno.EISDIR),
        (lambda: client.link("d", "d2"), PermissionError, errno.EPERM),
        (lambda: client.read_bytes("missing"), FileNotFoundError, errno.ENOENT),
    ]
    for call, exc_type, code in cases:
        with pytest.raises(exc_type) as info:
            call()
        assert info.value.errno == code
        assert info.value.filename, "the 9P path is part of the error"
    with pytest.raises(FileNotFoundError) as missing:
        client.stat("no/such")
    assert "no/such" in str(missing.value)


def test_fids_not_leaked_on_errors(client: Client, root: Path) -> None:
    (root / "f").write_text("x")
    (root / "d" / "e").mkdir(parents=True)
    base = client.fid_count
    failures: list[Callable[[], object]] = [
        lambda: client.stat("missing"),
        lambda: client.stat("d/missing/x"),
        lambda: client.stat("f/x/y"),
        lambda: client.open("missing"),
        lambda: client.open("d"),
        lambda: client.open("f", "x"),
        lambda: client.mkdir("d/e"),
        lambda: client.rmdir("d"),
        lambda: client.remove("missing"),
        lambda: client.rename("missing", "x"),
        lambda: client.link("missing", "x"),
        lambda: client.readlink("f"),
        lambda: client.listdir("f"),
        lambda: client.symlink("t", "d/e"),
    ]
    for _ in range(3):
        for call in failures:
            with pytest.raises(OSError):
                call()
            assert client.fid_count == base
    files = [client.open("f") for _ in range(5)]
    assert client.fid_count == base + 5
    for f in files:
        f.close()
    assert client.fid_count == base
    for _ in range(20):  # fids are recycled, not always fresh
        with client.open("f", "rb") as binary:
            raw = binary.raw
            assert isinstance(raw, RemoteFileIO)
            fid = raw.fid
            assert fid < base + 5


def test_unclosed_file_is_clunked_later(client: Client, root: Path) -> None:
    (root / "f").write_text("x")
    base = client.fid_count
    raw = client.open("f", "rb", buffering=0)
    assert client.fid_count == base + 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del raw
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) for w in caught)
    assert client.exists("f")
    assert client.fid_count == base


def test_concurrent_threads(client: Client, root: Path) -> None:
    nthreads, rounds = 12, 15
    errors: list[BaseException] = []
    (root / "shared").mkdir()
    shared = os.urandom(200_000)
    (root / "shared" / "blob").write_bytes(shared)

    def worker(n: int) -> None:
        try:
            for i in range(rounds):
                payload = os.urandom(1000 + 997 * i + n)
                name = f"t{n}/f{i}"
                if i == 0:
                    client.mkdir(f"t{n}")
                client.write_bytes(name, payload)
                assert client.read_bytes(name) == payload
                assert client.stat(name).st_size == len(payload)
                assert client.read_bytes("shared/blob") == shared
                assert f"f{i}" in client.listdir(f"t{n}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    for n in range(nthreads):
        assert len(os.listdir(root / f"t{n}")) == rounds


class StallingTransport:
    """Wraps a client's transport; the next request of one type is lost.

    Its caller gets *outcome* (a timeout, an interrupt) instead of a reply,
    as if the server were stuck; the message never reaches the server, so the
    Tflush that follows names a tag the server does not know, which it must
    answer with Rflush anyway.  Every message and ``flushed()`` call is
    recorded in :attr:`log` as ``(message, None)`` or ``(None, tag)``.
    """

    def __init__(self, inner: Transport, mtype: int, outcome: BaseException) -> None:
        self.inner = inner
        self.msize = inner.msize
        self.mtype = mtype
        self.outcome: BaseException | None = outcome
        self.log: list[tuple[c.Message | None, int | None]] = []
        self.lock = threading.Lock()

    def request(self, message: bytes, *, timeout: float | None = None) -> bytes:
        decoded = c.decode(message)
        with self.lock:
            self.log.append((decoded, None))
            outcome = None
            if self.mtype == decoded.TYPE and self.outcome is not None:
                outcome, self.outcome = self.outcome, None
        if outcome is not None:
            time.sleep(min(timeout or 0.05, 0.05))
            raise outcome
        return self.inner.request(message, timeout=timeout)

    def flushed(self, tag: int) -> None:
        with self.lock:
            self.log.append((None, tag))
        self.inner.flushed(tag)

    def close(self) -> None:
        self.inner.close()


def _check_flush_sequence(log: list[tuple[c.Message | None, int | None]], mtype: int) -> int:
    """Check the stalled request was flushed, and its tag reused only after Rflush."""
    sent = [m for m, _ in log if m is not None]
    stalled = next(i for i, m in enumerate(sent) if mtype == m.TYPE)
    oldtag = sent[stalled].tag
    flush = sent[stalled + 1]
    assert isinstance(flush, c.Tflush) and flush.oldtag == oldtag
    assert flush.tag != oldtag
    freed = log.index((None, oldtag))
    sends_before_free = [m for m, _ in log[:freed] if m is not None]
    assert [m for m in sends_before_free if m.tag == oldtag] == [sent[stalled]]
    # tags go round-robin, never NOTAG
    tags = [m.tag for m in sent]
    assert c.NOTAG not in tags
    assert all((b - a) % 0xFFFF == 1 for a, b in itertools.pairwise(tags)), tags
    return oldtag


def test_timeout_sends_tflush(
    client: Client, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (root / "f").write_text("x")
    spy = StallingTransport(
        client.transport, c.Tgetattr.TYPE, TimeoutError(errno.ETIMEDOUT, "stalled")
    )
    monkeypatch.setattr(client, "_transport", spy)
    flushes = client.flushes_sent
    with pytest.raises(TimeoutError) as info:
        client.stat("f")
    assert info.value.errno == errno.ETIMEDOUT
    assert info.value.filename == "f"
    assert client.flushes_sent == flushes + 1
    assert client.fid_count == 1 and client.tags_in_use == 0
    # the session goes on, and the flushed tag comes round again in time
    for i in range(5):
        assert client.stat("f").st_size == 1
        client.write_text(f"after{i}", "ok")
    assert (root / "after4").read_text() == "ok"
    _check_flush_sequence(spy.log, c.Tgetattr.TYPE)


def test_interrupt_sends_tflush(
    client: Client, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (root / "f").write_text("abc")
    spy = StallingTransport(client.transport, c.Tread.TYPE, KeyboardInterrupt())
    monkeypatch.setattr(client, "_transport", spy)
    with pytest.raises(KeyboardInterrupt):
        client.read_bytes("f")
    assert client.fid_count == 1 and client.tags_in_use == 0
    assert client.read_bytes("f") == b"abc"
    _check_flush_sequence(spy.log, c.Tread.TYPE)
