"""The ``xen9p`` fsspec file system: fsspec's own tests, URLs, connections, a hostile server.

fsspec's abstract test classes (copy, get, put, open, pipe) run on a
simulated share, through the whole stack (client -> frontend -> simulated
Xen -> file server).
"""

from __future__ import annotations

import dataclasses
import errno
import importlib.metadata
import os
import posixpath
import select
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REQUIRE_PEERS, need

try:
    import fsspec
except ImportError:  # the fsspec extra is not installed
    if REQUIRE_PEERS:
        raise
    pytest.skip("fsspec is not installed (pip install '.[fsspec]')", allow_module_level=True)

import fsspec.callbacks
import fsspec.core
import fsspec.tests.abstract as abstract
from p9.hostile import SILENCE, HostileServer, on

from pyxen9p.errors import ProtocolError, TransportError
from pyxen9p.fsspec import Xen9pFile, Xen9pFileSystem
from pyxen9p.p9 import codec as c
from pyxen9p.p9.server import FileServer


@pytest.fixture(autouse=True)
def _registered() -> None:
    """``xen9p`` resolves even without the installed entry point (checked on its own below)."""
    if "xen9p" not in fsspec.registry:
        fsspec.register_implementation("xen9p", Xen9pFileSystem)


# --------------------------------------------------------------------------
# fsspec's own tests on a simulated share


@pytest.fixture(scope="module")
def share(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("share")


class Xen9pFixtures(abstract.AbstractFixtures):  # type: ignore[misc]
    """fsspec's fixtures for a simulated share (one connection for the module)."""

    @pytest.fixture
    def fs(self, share: Path) -> Iterator[Xen9pFileSystem]:
        fs = fsspec.filesystem("xen9p", simulate=str(share))
        yield fs
        assert fs.client.fid_count == 1, "a fid leaked"

    @pytest.fixture
    def fs_join(self) -> Callable[..., str]:
        return posixpath.join

    @pytest.fixture
    def fs_path(self) -> str:
        return "/"


class TestXen9pCopy(abstract.AbstractCopyTests, Xen9pFixtures):  # type: ignore[misc]
    pass


class TestXen9pGet(abstract.AbstractGetTests, Xen9pFixtures):  # type: ignore[misc]
    pass


class TestXen9pPut(abstract.AbstractPutTests, Xen9pFixtures):  # type: ignore[misc]
    pass


class TestXen9pOpen(abstract.AbstractOpenTests, Xen9pFixtures):  # type: ignore[misc]
    pass


class TestXen9pPipe(abstract.AbstractPipeTests, Xen9pFixtures):  # type: ignore[misc]
    pass


# --------------------------------------------------------------------------
# Registration and URLs


def test_the_entry_point_is_installed() -> None:
    """``pip install .[fsspec]`` registers ``xen9p`` under ``fsspec.specs``."""
    points = [
        ep for ep in importlib.metadata.entry_points(group="fsspec.specs") if ep.name == "xen9p"
    ]
    if not points and not REQUIRE_PEERS:
        pytest.skip("pyxen9p is not installed with its entry points (pip install -e .)")
    assert [ep.value for ep in points] == ["pyxen9p.fsspec:Xen9pFileSystem"]
    assert points[0].load() is Xen9pFileSystem


def test_filesystem_by_name_and_url(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    fs = fsspec.filesystem("xen9p", simulate=str(tmp_path))
    assert isinstance(fs, Xen9pFileSystem)
    with fsspec.open("xen9p://share/data.csv", "rt", simulate=str(tmp_path)) as f:
        assert f.read() == "a,b\n1,2\n"
    fs2, path = fsspec.core.url_to_fs("xen9p://share/data.csv", simulate=str(tmp_path))
    assert path == "/data.csv"
    assert fs2.tag == "share"
    assert fs2.unstrip_protocol(path) == "xen9p://share/data.csv"
    assert fs.unstrip_protocol("/x") == "xen9p:///x"


@pytest.mark.parametrize(
    ("url", "path", "options"),
    [
        ("xen9p://share/data.csv", "/data.csv", {"tag": "share"}),
        ("xen9p://share/a//b/", "/a/b", {"tag": "share"}),
        ("xen9p://share", "/", {"tag": "share"}),
        ("xen9p://share/", "/", {"tag": "share"}),
        ("xen9p:///x/y", "/x/y", {}),
        ("xen9p://t/what?is#this", "/what?is#this", {"tag": "t"}),
        ("a/b", "/a/b", {}),
        ("/a/b/", "/a/b", {}),
        ("", "/", {}),
    ],
)
def test_url_parsing(url: str, path: str, options: dict[str, Any]) -> None:
    assert Xen9pFileSystem._strip_protocol(url) == path
    assert Xen9pFileSystem._get_kwargs_from_urls(url) == options


def test_server_addresses_are_checked_when_the_file_system_is_made() -> None:
    for bad in ("unix:", "tcp:host", "tcp:host:0", "tcp::564", "udp:x:1", "/run/p.sock"):
        with pytest.raises(ValueError, match=r"address|port cannot be 0|socket path"):
            Xen9pFileSystem(server=bad, skip_instance_cache=True)
    with pytest.raises(ValueError):
        fsspec.filesystem("xen9p", server="nowhere")


# --------------------------------------------------------------------------
# Behaviour on a simulated share


@pytest.fixture
def simfs(tmp_path: Path) -> Iterator[Xen9pFileSystem]:
    fs = fsspec.filesystem("xen9p", simulate=str(tmp_path), skip_instance_cache=True)
    yield fs
    fs.close()


def test_info_and_ls(simfs: Xen9pFileSystem, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"12345")
    os.symlink("f", tmp_path / "d" / "link")
    os.symlink(".", tmp_path / "d" / "loop")
    os.utime(tmp_path / "d" / "f", (1_000_000_000, 1_500_000_000.25))
    listing = {i["name"]: i for i in simfs.ls("/d", detail=True)}
    assert set(listing) == {"/d/f", "/d/link", "/d/loop"}
    f = listing["/d/f"]
    assert (f["type"], f["size"], f["islink"]) == ("file", 5, False)
    assert f["mtime"] == pytest.approx(1_500_000_000.25)
    assert f["ino"] == os.stat(tmp_path / "d" / "f").st_ino or f["ino"] > 0
    assert (listing["/d/link"]["type"], listing["/d/link"]["size"]) == ("file", 5)
    assert listing["/d/link"]["destination"] == "f"
    assert listing["/d/loop"]["type"] == "other"  # never descended into
    assert simfs.info("/d")["type"] == "directory"
    assert simfs.ls("/d/f", detail=False) == ["/d/f"]
    assert sorted(simfs.ls("/d", detail=False)) == ["/d/f", "/d/link", "/d/loop"]
    assert simfs.find("/") == ["/d/f", "/d/link", "/d/loop"]  # the loop ends the walk
    assert simfs.modified("/d/f").timestamp() == pytest.approx(1_500_000_000.25)
    assert simfs.created("/d/f").tzinfo is not None
    with pytest.raises(FileNotFoundError):
        simfs.info("/nope")
    with pytest.raises(FileNotFoundError):
        simfs.ls("/nope")
    assert not simfs.exists("/nope") and simfs.exists("/d/f")
    os.symlink("gone", tmp_path / "dangling")
    assert not simfs.exists("/dangling") and simfs.lexists("/dangling")


def test_cat_file_ranges(simfs: Xen9pFileSystem) -> None:
    data = bytes(range(256)) * 1000
    simfs.pipe_file("/r", data)
    for start, end in [(None, None), (10, 20), (-100, None), (None, -5), (-7, -2),
                       (0, 0), (5, 3), (len(data) - 3, len(data) + 50), (len(data) + 1, None),
                       (-10**6, 4)]:
        assert simfs.cat_file("/r", start, end) == data[start:end], (start, end)
    assert simfs.cat_ranges(["/r", "/r"], [0, 5], [3, 9]) == [data[0:3], data[5:9]]
    assert simfs.head("/r", 4) == data[:4] and simfs.tail("/r", 4) == data[-4:]


def test_open_modes(simfs: Xen9pFileSystem, tmp_path: Path) -> None:
    with simfs.open("/deep/er/f", "wb") as f:  # auto_mkdir
        assert isinstance(f, Xen9pFile)
        f.write(b"hello")
    with simfs.open("/deep/er/f", "ab") as f:
        f.write(b" world")
    with simfs.open("/deep/er/f", "r+b") as f:
        f.seek(6)
        f.write(b"W")
        f.seek(0)
        assert f.read() == b"hello World"
        assert f.size == 11
    with simfs.open("/deep/er/f", "rt") as t:
        assert t.readline() == "hello World"
    with simfs.open("/deep/er/f", "rb") as f:
        assert f.info()["size"] == 11
        assert f.read(5) == b"hello" and f.tell() == 5
    with pytest.raises(FileExistsError):
        simfs.open("/deep/er/f", "xb")
    with pytest.raises(FileNotFoundError):
        simfs.open("/nope", "rb")
    with pytest.raises(IsADirectoryError):
        simfs.open("/deep", "rb")
    nomk = fsspec.filesystem(
        "xen9p", simulate=str(tmp_path), auto_mkdir=False, skip_instance_cache=True
    )
    with pytest.raises(FileNotFoundError):
        nomk.pipe_file("/no/such/dir", b"x")
    nomk.close()
    assert simfs.client.fid_count == 1


def test_transactions_commit_and_discard(simfs: Xen9pFileSystem, tmp_path: Path) -> None:
    with simfs.transaction:
        with simfs.open("/t", "wb") as f:
            f.write(b"committed")
        assert not (tmp_path / "t").exists()  # not before the commit
    assert (tmp_path / "t").read_bytes() == b"committed"
    with pytest.raises(RuntimeError, match="boom"), simfs.transaction:
        with simfs.open("/u", "wb") as f:
            f.write(b"dropped")
        raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["t"]  # no temporary left


def test_mv_is_a_rename(simfs: Xen9pFileSystem, tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_bytes(b"x")
    ino = os.stat(tmp_path / "a" / "b" / "f").st_ino
    simfs.mv("/a", "/z")
    assert os.stat(tmp_path / "z" / "b" / "f").st_ino == ino  # moved, not copied
    simfs.mkdir("/into")
    simfs.mv("/z", "/into")
    assert (tmp_path / "into" / "z" / "b" / "f").exists()
    simfs.pipe({"/g1": b"1", "/g2": b"2"})
    simfs.mkdir("/globbed")
    simfs.mv("/g?", "/globbed/")
    assert sorted(os.listdir(tmp_path / "globbed")) == ["g1", "g2"]
    with pytest.raises(FileNotFoundError):
        simfs.mv("/into/z", "/missing/dir/z")


def test_rm_touch_copy_and_keys(simfs: Xen9pFileSystem, tmp_path: Path) -> None:
    (tmp_path / "t" / "u").mkdir(parents=True)
    (tmp_path / "t" / "u" / "f").write_bytes(b"abc")
    os.symlink("/", tmp_path / "t" / "up")  # removed as a link, never followed
    (tmp_path / "keep").write_bytes(b"k")
    with pytest.raises(OSError) as info:
        simfs.rm("/t")  # not empty, not recursive
    assert info.value.errno == errno.ENOTEMPTY
    simfs.rm("/t", recursive=True)
    assert sorted(os.listdir(tmp_path)) == ["keep"]
    key = simfs.ukey("/keep")
    assert simfs.checksum("/keep") == int(key, 16)
    simfs.cat_file("/keep")  # reading (atime) does not change the key
    assert simfs.ukey("/keep") == key
    simfs.pipe_file("/keep", b"changed")
    assert simfs.ukey("/keep") != key
    os.utime(tmp_path / "keep", (0, 0))
    simfs.touch("/keep", truncate=False)
    assert (tmp_path / "keep").read_bytes() == b"changed"
    assert os.stat(tmp_path / "keep").st_mtime > 0
    simfs.touch("/keep")
    assert (tmp_path / "keep").read_bytes() == b""
    big = os.urandom(300_000)
    simfs.pipe_file("/big", big)
    simfs.cp_file("/big", "/copies/big")
    assert (tmp_path / "copies" / "big").read_bytes() == big
    simfs.mkdir("/e", create_parents=False)
    with pytest.raises(FileExistsError):
        simfs.mkdir("/e")
    simfs.rmdir("/e")
    assert not simfs.exists("/e")


def test_put_and_get_use_the_clients_copies(simfs: Xen9pFileSystem, tmp_path: Path) -> None:
    local = tmp_path.parent / (tmp_path.name + "-local")
    local.mkdir()
    data = os.urandom(200_000)
    (local / "in").write_bytes(data)
    seen: list[tuple[int, int]] = []

    class Callback(fsspec.callbacks.Callback):  # type: ignore[misc]
        def call(self, *args: Any, **kwargs: Any) -> None:
            seen.append((self.value, self.size))

    simfs.put_file(str(local / "in"), "/up/in", callback=Callback())
    assert (tmp_path / "up" / "in").read_bytes() == data
    assert seen[-1] == (len(data), len(data))
    with pytest.raises(FileExistsError):
        simfs.put_file(str(local / "in"), "/up/in", mode="create")
    simfs.get_file("/up/in", str(local / "out" / "copy"))
    assert (local / "out" / "copy").read_bytes() == data
    with open(local / "stream", "wb") as out:
        simfs.get_file("/up/in", out)
    assert (local / "stream").read_bytes() == data


def test_errors_are_fsspec_visible(simfs: Xen9pFileSystem, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(FileNotFoundError):
        simfs.cat_file("/missing")
    with pytest.raises(NotADirectoryError):
        simfs.cat_file("/f/under")
    with pytest.raises(IsADirectoryError):
        simfs.cat_file("/")
    with pytest.raises(FileExistsError):
        simfs.makedirs("/f")
    with pytest.raises(FileNotFoundError):
        simfs.rm("/missing")


# --------------------------------------------------------------------------
# Connections: sharing, closing, failing, forking


def test_instances_share_one_connection(tmp_path: Path) -> None:
    fs = fsspec.filesystem("xen9p", simulate=str(tmp_path))
    assert fsspec.filesystem("xen9p", simulate=str(tmp_path)) is fs  # fsspec's cache
    other: list[Any] = []
    thread = threading.Thread(
        target=lambda: other.append(fsspec.filesystem("xen9p", simulate=str(tmp_path)))
    )
    thread.start()
    thread.join()
    assert other[0] is not fs  # fsspec caches per thread...
    assert other[0].client is fs.client  # ...the connection is one
    fs.close()


def test_a_closed_or_failed_connection_is_not_reused(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    fs = fsspec.filesystem("xen9p", simulate=str(tmp_path))
    first = fs.client
    first.close()
    assert fsspec.filesystem("xen9p", simulate=str(tmp_path)) is fs
    assert fs.cat_file("/f") == b"x"
    second = fs.client
    assert second is not first and not second.closed
    second.transport.abort(TransportError(errno.EPIPE, "the backend went away"))
    assert fs.cat_file("/f") == b"x"
    assert fs.client is not second
    fs.close()


def test_a_forked_child_opens_its_own_connection(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"parent")
    fs = fsspec.filesystem("xen9p", simulate=str(tmp_path))
    parent = fs.client
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never touch the parent's connection
        code = 1
        try:
            child = fs.client
            ok = child is not parent and fs.cat_file("/f") == b"parent"
            child.close()
            code = 0 if ok else 2
        finally:
            os.write(write, bytes([code]))
            os._exit(code)
    os.close(write)
    ready, _, _ = select.select([read], [], [], 120)
    status = os.read(read, 1) if ready else b"hung"
    os.close(read)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert status == b"\x00"
    assert fs.client is parent and fs.cat_file("/f") == b"parent"  # still intact
    fs.close()


# --------------------------------------------------------------------------
# A hostile server behind fsspec


@pytest.fixture
def hostile_root(tmp_path: Path) -> Path:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"0123456789")
    return tmp_path


def _hostile_fs(server: HostileServer, **options: Any) -> Xen9pFileSystem:
    client = server.client(msize=64 * 1024, timeout=2, flush_timeout=2)
    client.max_read = options.pop("max_read", 1 << 20)
    client.max_entries = options.pop("max_entries", 1000)
    return Xen9pFileSystem.from_client(client, **options)


@pytest.mark.parametrize("name", ["..", ".", "../../etc", "a/b", "", "x\0y", "f"])
def test_hostile_names_never_escape(hostile_root: Path, name: str) -> None:
    """A listing with a name no directory holds (or a name twice) is refused, even by find/glob.

    fsspec's walk omits a directory whose listing fails; a broken listing
    must not be taken for an unreadable directory.  An extra ``.`` or ``..``
    is dropped (as every listing's own two are).
    """

    def evil(m: c.Treaddir, honest: Callable[[], c.Message]) -> c.Message:
        reply = honest()
        assert isinstance(reply, c.Rreaddir)
        entries = reply.entries()
        if not entries:
            return reply
        bad = c.Dirent(entries[-1].qid, entries[-1].offset + 1, c.DT_REG, name)
        return c.Rreaddir.from_entries(m.tag, [*entries, bad])

    with HostileServer(hostile_root) as server:
        fs = _hostile_fs(server)
        calls: list[Callable[[], object]] = [
            lambda: fs.ls("/d", detail=False), lambda: fs.find("/"), lambda: fs.cat("/d/*"),
            lambda: fs.du("/"), lambda: fs.glob("/**"),
        ]
        honest = [call() for call in calls]
        server.script = on(c.Treaddir, evil)
        for call, expected in zip(calls, honest, strict=True):
            if name in (".", ".."):
                assert call() == expected
            else:
                with pytest.raises(ProtocolError):
                    call()
        fs.close()


def test_hostile_sizes_are_bounded(hostile_root: Path) -> None:
    def huge(m: c.Tgetattr, honest: Callable[[], c.Message]) -> c.Message:
        reply = honest()
        assert isinstance(reply, c.Rgetattr)
        return dataclasses.replace(reply, size=(1 << 64) - 1)

    def endless(m: c.Tread, honest: Callable[[], c.Message]) -> c.Message:
        return c.Rread(m.tag, b"x" * m.count)

    with HostileServer(hostile_root, on(c.Tgetattr, huge)) as server:
        fs = _hostile_fs(server, max_read=4096)
        assert fs.info("/d/f")["size"] == (1 << 64) - 1  # reported as it is
        with pytest.raises(OSError) as info:
            fs.cat_file("/d/f")  # the claimed size is never allocated
        assert info.value.errno == errno.EFBIG
        with pytest.raises(OSError) as info:
            fs.cat_file("/d/f", -10)  # 10 bytes at the claimed end: the server's own error
        assert info.value.errno == errno.EINVAL
        assert fs.cat_file("/d/f", 0, 4) == b"0123"
        fs.close()
    with HostileServer(hostile_root, on(c.Tread, endless)) as server:
        fs = _hostile_fs(server, max_read=4096)
        with pytest.raises(OSError) as info:
            fs.cat_file("/d/f")
        assert info.value.errno == errno.EFBIG
        with pytest.raises(OSError) as info:
            fs.cat_file("/d/f", 0, 1 << 40)
        assert info.value.errno == errno.EFBIG
        assert fs.cat_file("/d/f", 0, 100) == b"x" * 100
        fs.close()


def test_hostile_listing_is_bounded(hostile_root: Path) -> None:
    def endless(m: c.Treaddir, honest: Callable[[], c.Message]) -> c.Message:
        n = m.offset + 1
        entry = c.Dirent(c.Qid(0, 0, n), n, c.DT_REG, f"n{n}")
        return c.Rreaddir.from_entries(m.tag, [entry])

    with HostileServer(hostile_root, on(c.Treaddir, endless)) as server:
        fs = _hostile_fs(server, max_entries=50)
        with pytest.raises(OSError) as info:
            fs.ls("/d", detail=False)
        assert info.value.errno == errno.EFBIG
        fs.close()


def test_hostile_times_are_an_error_not_a_crash(hostile_root: Path) -> None:
    def far(m: c.Tgetattr, honest: Callable[[], c.Message]) -> c.Message:
        reply = honest()
        assert isinstance(reply, c.Rgetattr)
        return dataclasses.replace(reply, mtime_sec=(1 << 63) - 1, ctime_sec=-(1 << 63))

    with HostileServer(hostile_root, on(c.Tgetattr, far)) as server:
        fs = _hostile_fs(server)
        assert fs.info("/d/f")["mtime"] > 1e18  # reported as it is
        for call in (fs.modified, fs.created):
            with pytest.raises(OSError) as info:
                call("/d/f")
            assert info.value.errno == errno.EOVERFLOW
        fs.close()


def test_hostile_errors_and_silence(hostile_root: Path) -> None:
    def refuse(m: c.Twalk, honest: Callable[[], c.Message]) -> c.Message | None:
        if m.wnames == ("d", "f"):
            return c.Rlerror(m.tag, errno.EACCES)
        if m.wnames == ("d", "bad"):
            return c.Rlerror(m.tag, 0xFFFFFFF)  # no such errno
        if m.wnames == ("d", "quiet"):
            return SILENCE
        return None

    with HostileServer(hostile_root, on(c.Twalk, refuse)) as server:
        fs = _hostile_fs(server)
        with pytest.raises(PermissionError):
            fs.cat_file("/d/f")
        with pytest.raises(PermissionError):
            fs.info("/d/f")
        with pytest.raises(ProtocolError):
            fs.exists("/d/bad")  # a broken reply is not "missing"
        with pytest.raises(ProtocolError):
            fs.isfile("/d/bad")
        with pytest.raises(TimeoutError):
            fs.info("/d/quiet")  # never hangs: the request's timeout
        fs.close()


# --------------------------------------------------------------------------
# p9fs (PyPI): an independent fsspec 9P2000.L client, over TCP


@pytest.fixture(params=["file-server", "agent"])
def tcp_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A 9P2000.L server on a loopback TCP port: pyxen9p's FileServer, or
    ``pyxen9p serve``'s TCP listener (a real agent program on a simulated Xen)."""
    root = tmp_path / "export"
    root.mkdir()
    if request.param == "agent":
        from test_agent import child_env, running

        from pyxen9p import agent

        runtime = tmp_path / "run"
        argv = ["--simulate", str(root), "serve", "--listen", "tcp:127.0.0.1:0"]
        with running(argv, child_env(runtime)) as a:
            (address,) = a.listening(runtime, agent.agent_name(simulate=root))
            yield int(address.rsplit(":", 1)[1]), root
            assert a.stop() == 0, a.stderr()
        return
    server = FileServer(root)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    threads: list[threading.Thread] = []

    def accept() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=server.serve_socket, args=(sock,), daemon=True)
            threads.append(thread)
            thread.start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    yield port, root
    listener.close()
    server.close()
    acceptor.join(10)
    for thread in threads:
        thread.join(10)


def test_p9fs_reads_and_writes_through_a_pyxen9p_server(tcp_server: tuple[int, Path]) -> None:
    """PyPI's p9fs, an independent client, through pyxen9p's server and through
    the agent's TCP listener (issue 10: the agent serves any 9P2000.L client)."""
    try:
        import p9fs
    except ImportError:
        p9fs = None
    need(p9fs is not None, "the p9fs package (pip install p9fs)")
    port, root = tcp_server
    (root / "dir").mkdir()
    (root / "dir" / "hello.txt").write_bytes(b"hello from the host\n")
    fs = p9fs.P9FileSystem(
        host="127.0.0.1", port=port, username=os.environ.get("USER", "root"),
        version="9P2000.L", skip_instance_cache=True,
    )
    assert fs.cat_file("dir/hello.txt") == b"hello from the host\n"
    assert fs.ls("dir", detail=False) == ["dir/hello.txt"]
    assert fs.info("dir/hello.txt")["size"] == 20
    data = os.urandom(100_000)
    with fs.open("dir/written.bin", "wb") as f:
        f.write(data)
    assert (root / "dir" / "written.bin").read_bytes() == data
    fs.mkdir("made", create_parents=False)
    assert (root / "made").is_dir()
    fs.rm("dir/written.bin")
    assert not (root / "dir" / "written.bin").exists()
    # and pyxen9p's own client over the same TCP server sees what p9fs left
    ours = Xen9pFileSystem(server=f"tcp:127.0.0.1:{port}", skip_instance_cache=True)
    assert sorted(ours.ls("/", detail=False)) == ["/dir", "/made"]
    ours.close()


def test_server_option_over_unix_socket(tmp_path: Path) -> None:
    root = tmp_path / "export"
    root.mkdir()
    (root / "f").write_bytes(b"via a socket")
    server = FileServer(root)
    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()

    def serve() -> None:
        sock, _ = listener.accept()
        server.serve_socket(sock)
        sock.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with fsspec.open(
            "xen9p://share/f", "rb", server=f"unix:{path}", skip_instance_cache=True,
            request_timeout=10,
        ) as f:
            assert f.read() == b"via a socket"
        # the tag only names the share: the same server, the same connection
        fs = fsspec.filesystem("xen9p", server=f"unix:{path}", request_timeout=10)
        assert fs.cat_file("/f") == b"via a socket"
        fs.close()
    finally:
        listener.close()
        server.close()
        thread.join(10)
