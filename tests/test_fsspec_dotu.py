"""The fsspec file system over 9P2000.u with xen-9pfsd's rules (tests/p9/userver.py):
directly on a client that knows xen-9pfsd, and through the multiplexer on a
xen-9pfsd backend by address.  ls, info, cat, put, get and rm work; the root's
info is made up here; the backend is never asked for the root's attributes."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from conftest import need

try:
    import fsspec
except ImportError:  # pragma: no cover - fsspec is a test dependency
    fsspec = None

from p9.userver import UServer, mux_as_xen_9pfsd


@pytest.fixture
def share(tmp_path: Path) -> Path:
    root = tmp_path / "share"
    root.mkdir()
    (root / "a.txt").write_text("alpha\n")
    (root / "sub").mkdir()
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)) * 40)
    return root


def exercise(fs: object, share: Path, tmp_path: Path) -> None:
    from pyxen9p.fsspec import Xen9pFileSystem

    assert isinstance(fs, Xen9pFileSystem)
    assert sorted(fs.ls("/", detail=False)) == ["/a.txt", "/sub"]
    root = fs.info("/")
    assert root["type"] == "directory" and root["name"] == "/"
    assert fs.isdir("/") and fs.isdir("sub") and fs.isfile("a.txt")
    assert fs.info("sub/b.bin")["size"] == 256 * 40
    assert fs.cat("a.txt") == b"alpha\n"
    assert fs.cat_file("sub/b.bin", start=256, end=260) == bytes(range(4))
    local = tmp_path / "local"
    local.mkdir()
    for i in range(8):  # more files than xen-9pfsd's fid limit (5), one after another
        (local / f"n{i}.txt").write_text(f"file {i}\n")
    fs.put(str(local) + "/", "/up", recursive=True)
    assert sorted(p.name for p in (share / "up").iterdir()) == [f"n{i}.txt" for i in range(8)]
    fs.put_file(str(local / "n1.txt"), "/top.txt")
    assert (share / "top.txt").read_text() == "file 1\n"
    fs.get("/sub/b.bin", str(tmp_path / "b.bin"))
    assert (tmp_path / "b.bin").read_bytes() == (share / "sub/b.bin").read_bytes()
    fs.get("/up", str(tmp_path / "down"), recursive=True)
    assert (tmp_path / "down" / "n7.txt").read_text() == "file 7\n"
    fs.pipe_file("/sub/piped", b"through fsspec")
    assert (share / "sub/piped").read_bytes() == b"through fsspec"
    fs.rm("/top.txt")
    fs.rm([f"/up/n{i}.txt" for i in range(8)])
    assert not (share / "top.txt").exists() and list((share / "up").iterdir()) == []
    with pytest.raises(OSError) as info:  # xen-9pfsd removes no directory
        fs.rmdir("/up")
    assert info.value.errno == errno.EOPNOTSUPP
    with pytest.raises(OSError) as info:  # nor renames
        fs.mv("/a.txt", "/sub/a.txt")
    assert (share / "a.txt").read_text() == "alpha\n"


def test_fsspec_over_xen_9pfsd(share: Path, tmp_path: Path) -> None:
    need(fsspec is not None, "fsspec")
    from pyxen9p.fsspec import Xen9pFileSystem

    server = UServer(share)
    fs = Xen9pFileSystem.from_client(server.client())
    try:
        exercise(fs, share, tmp_path)
    finally:
        fs.close()
        server.close()
    assert not server.root_tstat_seen
    assert server.peak_fids <= 5


def test_fsspec_through_the_mux_on_xen_9pfsd(share: Path, tmp_path: Path) -> None:
    need(fsspec is not None, "fsspec")
    from pyxen9p.fsspec import Xen9pFileSystem

    with mux_as_xen_9pfsd(share, tmp_path):
        sock = str(tmp_path / "mux.sock")
        fs = Xen9pFileSystem(server=f"unix:{sock}", skip_instance_cache=True)
        try:
            exercise(fs, share, tmp_path)
        finally:
            fs.close()
