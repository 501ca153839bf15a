"""Copies between a hostile server and the local disk: names, links, types, failures.

The server (:mod:`.hostile`) lists names that are not names, a name twice,
lies about types; the local destination holds links planted where the copy
will write.  Whatever happens, nothing appears outside the destination and
no file outside it changes.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyxen9p.errors import TransportError
from pyxen9p.p9 import codec as c
from pyxen9p.p9.client import Client, CopyError
from pyxen9p.p9.codec import ProtocolError

from .hostile import Script, hostile, on

BIG = 700_000  # several I/O units


def first_of(*scripts: Script) -> Script:
    """A script that answers with the first of *scripts* that has an answer."""

    def script(request: c.Message, honest: Callable[[], c.Message]) -> Any:
        for s in scripts:
            answer = s(request, honest)
            if answer is not None:
                return answer
        return None

    return script


def listing(edit: Callable[[list[c.Dirent]], list[c.Dirent]]) -> Script:
    """Every directory's listing, as *edit* makes it from the honest one (in one reply)."""

    def answer(request: c.Treaddir, honest: Callable[[], c.Message]) -> c.Message:
        if request.offset != 0:
            return c.Rreaddir(request.tag, b"")
        reply = honest()  # the real server's listing fits in one reply here
        assert isinstance(reply, c.Rreaddir)
        entries = reply.entries()
        edited = edit(entries)
        renumbered = [
            c.Dirent(e.qid, i + 1, e.type, e.name) for i, e in enumerate(edited)
        ]
        return c.Rreaddir.from_entries(request.tag, renumbered)

    return on(c.Treaddir, answer)


def added(*extra: tuple[str, int]) -> Script:
    """Listings with the entries ``(name, DT_*)`` added after the honest ones."""

    def edit(entries: list[c.Dirent]) -> list[c.Dirent]:
        qid = entries[-1].qid
        return entries + [c.Dirent(qid, 0, dtype, name) for name, dtype in extra]

    return listing(edit)


def tree(base: Path) -> dict[str, bytes | str | None]:
    """Everything under *base*: file contents, link targets, ``None`` for directories."""
    out: dict[str, bytes | str | None] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(base))
            if p.is_symlink():
                out[rel] = os.readlink(p)
            elif p.is_dir():
                out[rel] = None
            else:
                out[rel] = p.read_bytes()
    return out


class Layout:
    """``srv`` (served), ``out/dest`` (the destination) and ``out/outside/victim``."""

    def __init__(self, tmp_path: Path) -> None:
        self.srv = tmp_path / "srv"
        (self.srv / "d").mkdir(parents=True)
        (self.srv / "d" / "f").write_bytes(b"served file\n")
        (self.srv / "x").write_bytes(b"served x\n")
        self.out = tmp_path / "out"
        self.dest = self.out / "dest"
        self.outside = self.out / "outside"
        self.outside.mkdir(parents=True)
        self.victim = self.outside / "victim"
        self.victim.write_bytes(b"precious\n")
        self._before = self.around()

    def around(self) -> dict[str, bytes | str | None]:
        """Everything under ``out`` but the destination."""
        return {k: v for k, v in tree(self.out).items() if k.split("/")[0] != "dest"}

    def check_outside_untouched(self) -> None:
        assert self.around() == self._before
        assert self.victim.read_bytes() == b"precious\n"


@pytest.fixture
def lay(tmp_path: Path) -> Layout:
    return Layout(tmp_path)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --------------------------------------------------------------------------
# Names in listings


BAD_NAMES = ["../x", "ABSOLUTE", "a/b", "", "x\0y", "/", "d/../../x"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_listing_with_a_name_that_is_not_a_name_is_refused(lay: Layout, name: str) -> None:
    name = name.replace("ABSOLUTE", str(lay.outside / "abs"))
    with hostile(lay.srv, added((name, c.DT_REG))) as client:
        with pytest.raises(ProtocolError, match="is not a name") as info:
            client.listdir("d")
        assert repr(name) in str(info.value)
        with pytest.raises(ProtocolError):
            list(client.walk(""))
        fds, fids = open_fds(), client.fid_count
        with pytest.raises(CopyError) as copy_info:
            client.copy_out("d", lay.dest)
        assert (open_fds(), client.fid_count) == (fds, fids)
    [error] = copy_info.value.errors
    assert isinstance(error, ProtocolError) and repr(name) in str(error)
    assert repr(name) in str(copy_info.value)
    lay.check_outside_untouched()


@pytest.mark.parametrize("dtype", [c.DT_REG, c.DT_DIR, c.DT_LNK])
def test_dot_and_dotdot_in_a_listing_are_dropped_whatever_their_type(
    lay: Layout, dtype: int
) -> None:
    with hostile(lay.srv, added((".", dtype), ("..", dtype))) as client:
        assert client.listdir("d") == ["f"]
        assert client.copy_out("d", lay.dest) == len(b"served file\n")
    assert tree(lay.dest) == {"f": b"served file\n"}
    lay.check_outside_untouched()


def test_a_name_listed_twice_is_refused(lay: Layout) -> None:
    with (
        hostile(lay.srv, added(("f", c.DT_REG))) as client,
        pytest.raises(ProtocolError, match="'f' is listed twice"),
    ):
        client.listdir("d")


def test_a_name_first_a_link_then_a_file_writes_nothing_through_the_link(
    lay: Layout,
) -> None:
    """The attack: ``l`` listed as a link to the victim, then ``l`` as a file."""
    (lay.srv / "d" / "l").write_bytes(b"evil\n")

    def edit(entries: list[c.Dirent]) -> list[c.Dirent]:
        real = next(e for e in entries if e.name == "l")
        return [c.Dirent(real.qid, 0, c.DT_LNK, "l"), real]

    script = first_of(
        listing(edit),
        on(c.Treadlink, lambda m, _h: c.Rreadlink(m.tag, str(lay.victim))),
    )
    with hostile(lay.srv, script) as client, pytest.raises(CopyError) as info:
        client.copy_out("d", lay.dest)
    assert "listed twice" in str(info.value)
    lay.check_outside_untouched()


# --------------------------------------------------------------------------
# Nothing written follows a link; a directory is never replaced


def test_an_existing_local_link_is_replaced_not_written_through(lay: Layout) -> None:
    lay.dest.mkdir()
    (lay.dest / "f").symlink_to(lay.victim)
    with hostile(lay.srv) as client:
        client.copy_out("d", lay.dest)
        assert (lay.dest / "f").read_bytes() == b"served file\n"
        assert not (lay.dest / "f").is_symlink()
        (lay.dest / "single").symlink_to(lay.victim)  # a single file too
        client.copy_out("x", lay.dest / "single")
    assert (lay.dest / "single").read_bytes() == b"served x\n"
    lay.check_outside_untouched()


def test_an_existing_local_link_where_a_directory_goes_is_refused(lay: Layout) -> None:
    (lay.srv / "d" / "sub").mkdir()
    (lay.srv / "d" / "sub" / "g").write_bytes(b"g\n")
    (lay.srv / "d" / "zz").write_bytes(b"after\n")
    lay.dest.mkdir()
    (lay.dest / "sub").symlink_to(lay.outside)
    failures: list[OSError | ValueError] = []
    with hostile(lay.srv) as client:
        client.copy_out("d", lay.dest, on_error=failures.append)
    [error] = failures
    assert isinstance(error, OSError) and error.errno == errno.ENOTDIR
    assert error.filename == str(lay.dest / "sub")
    assert "symbolic link, not followed" in str(error)
    assert (lay.dest / "zz").read_bytes() == b"after\n"  # the copy went on
    lay.check_outside_untouched()


def test_a_link_never_replaces_a_directory(lay: Layout) -> None:
    (lay.srv / "d" / "x").symlink_to("f")
    lay.dest.mkdir()
    (lay.dest / "x").mkdir()
    (lay.dest / "x" / "keep").write_bytes(b"keep\n")
    with hostile(lay.srv) as client, pytest.raises(CopyError) as info:
        client.copy_out("d", lay.dest)
    [error] = info.value.errors
    assert isinstance(error, OSError) and error.errno == errno.EISDIR
    assert error.filename == str(lay.dest / "x")
    assert (lay.dest / "x" / "keep").read_bytes() == b"keep\n"
    assert (lay.dest / "f").read_bytes() == b"served file\n"


def test_links_are_created_after_the_files_of_their_directory(
    lay: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    (lay.srv / "d" / "a-link").symlink_to("f")
    (lay.srv / "d" / "sub").mkdir()

    def edit(entries: list[c.Dirent]) -> list[c.Dirent]:
        return sorted(entries, key=lambda e: e.type != c.DT_LNK)  # links listed first

    seen: list[tuple[str, bool, bool]] = []
    real_symlink = os.symlink

    def symlink(target: str, name: str, *args: Any, **kwargs: Any) -> None:
        seen.append((target, (lay.dest / "f").exists(), (lay.dest / "sub").exists()))
        real_symlink(target, name, *args, **kwargs)

    monkeypatch.setattr(os, "symlink", symlink)
    with hostile(lay.srv, listing(edit)) as client:
        client.copy_out("d", lay.dest)
    assert seen == [("f", True, True)]
    assert os.readlink(lay.dest / "a-link") == "f"


def test_lying_types_write_nothing_outside(lay: Layout) -> None:
    """Rgetattr says every entry is a directory, the listing says a link is a file."""
    (lay.srv / "d" / "l").symlink_to(lay.victim)

    def edit(entries: list[c.Dirent]) -> list[c.Dirent]:
        return [c.Dirent(e.qid, 0, c.DT_REG if e.name == "l" else c.DT_UNKNOWN, e.name)
                for e in entries]

    def as_dir(request: c.Tgetattr, honest: Callable[[], c.Message]) -> c.Message:
        reply = honest()
        if isinstance(reply, c.Rgetattr) and reply.mode & 0o170000 == stat.S_IFREG:
            return dataclasses.replace(reply, mode=stat.S_IFDIR | 0o755)
        return reply

    script = first_of(listing(edit), on(c.Tgetattr, as_dir))
    with hostile(lay.srv, script) as client, pytest.raises(CopyError):
        client.copy_out("d", lay.dest)
    lay.check_outside_untouched()


# --------------------------------------------------------------------------
# Special files, failures, interruption, no_clobber


def test_a_remote_fifo_is_skipped_with_a_warning(
    lay: Layout, caplog: pytest.LogCaptureFixture
) -> None:
    os.mkfifo(lay.srv / "d" / "pipe")
    lay.dest.mkdir()
    with hostile(lay.srv) as client, caplog.at_level(logging.WARNING, "pyxen9p"):
        assert client.copy_out("d/pipe", lay.dest / "single") == 0
        client.copy_out("d", lay.dest / "tree")
    assert not (lay.dest / "single").exists()
    assert tree(lay.dest / "tree") == {"f": b"served file\n"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["copy_out: skipping d/pipe (a fifo, not a regular file)"] * 2


def test_a_file_typed_regular_but_a_fifo_is_not_opened(lay: Layout) -> None:
    """The listing says DT_REG; Rgetattr on the walked fid says fifo: never Tlopen'ed."""
    os.mkfifo(lay.srv / "d" / "pipe")

    def edit(entries: list[c.Dirent]) -> list[c.Dirent]:
        return [c.Dirent(e.qid, 0, c.DT_REG, e.name) for e in entries]

    with hostile(lay.srv, listing(edit)) as client:
        client.copy_out("d", lay.dest)
        opened = [m for m in client.transport.sent if isinstance(m, c.Tlopen)]  # type: ignore[attr-defined]
    assert tree(lay.dest) == {"f": b"served file\n"}
    assert len(opened) == 2  # the directory's listing and f


def _data_file(lay: Layout) -> bytes:
    data = os.urandom(BIG)
    (lay.srv / "d" / "big").write_bytes(data)
    return data


@pytest.mark.parametrize("how", ["error", "interrupt"])
def test_a_failed_get_leaves_the_final_name_as_it_was(lay: Layout, how: str) -> None:
    _data_file(lay)
    lay.dest.mkdir()
    (lay.dest / "big").write_bytes(b"the old content\n")
    reads = 0

    def fail(request: c.Tread, _h: object) -> c.Message | None:
        nonlocal reads
        reads += 1
        return c.Rlerror(request.tag, errno.EIO) if request.offset > 0 else None

    def interrupt(done: int, total: int) -> None:
        if done:
            raise KeyboardInterrupt

    script = on(c.Tread, fail) if how == "error" else None
    with hostile(lay.srv, script) as client:
        fds = open_fds()
        with pytest.raises(KeyboardInterrupt if how == "interrupt" else OSError):
            client.copy_out(
                "d/big", lay.dest / "big", progress=interrupt if how == "interrupt" else None
            )
        with pytest.raises(KeyboardInterrupt if how == "interrupt" else OSError):
            client.copy_out(
                "d/big", lay.dest / "new", progress=interrupt if how == "interrupt" else None
            )
        assert open_fds() == fds
    assert tree(lay.dest) == {"big": b"the old content\n"}  # no temporary file left


def test_no_clobber_keeps_existing_files_and_links(lay: Layout) -> None:
    (lay.srv / "d" / "l").symlink_to("f")
    (lay.srv / "d" / "new").write_bytes(b"new\n")
    lay.dest.mkdir()
    (lay.dest / "f").write_bytes(b"mine\n")
    (lay.dest / "l").write_bytes(b"not a link\n")
    with hostile(lay.srv) as client:
        client.copy_out("d", lay.dest, no_clobber=True)
        client.copy_out("x", lay.dest / "f", no_clobber=True)
    assert tree(lay.dest) == {"f": b"mine\n", "l": b"not a link\n", "new": b"new\n"}


def test_a_tree_copy_goes_on_and_reports_every_failure(lay: Layout) -> None:
    for name in ("a", "b", "c"):
        (lay.srv / "d" / name).mkdir()
        (lay.srv / "d" / name / "file").write_bytes(name.encode())
    lay.dest.mkdir()
    (lay.dest / "a").write_bytes(b"a file where a directory goes")
    (lay.dest / "c").symlink_to(lay.outside)
    with hostile(lay.srv) as client, pytest.raises(CopyError) as info:
        client.copy_out("d", lay.dest)
    assert sorted(e.filename for e in info.value.errors) == [  # type: ignore[union-attr]
        str(lay.dest / "a"), str(lay.dest / "c")
    ]
    assert "2 entries not copied" in str(info.value)
    assert (lay.dest / "b" / "file").read_bytes() == b"b"
    assert (lay.dest / "f").read_bytes() == b"served file\n"
    lay.check_outside_untouched()


def test_a_failed_transport_ends_a_tree_copy_at_once(lay: Layout) -> None:
    for i in range(5):
        (lay.srv / "d" / f"g{i}").write_bytes(b"g")
    failures: list[OSError | ValueError] = []
    with hostile(lay.srv) as client:
        def broken(_m: object, _h: object) -> None:
            raise TransportError(errno.EPIPE, "the transport failed")

        client.transport.intercept = on(c.Tread, broken)  # type: ignore[attr-defined]
        with pytest.raises(TransportError):
            client.copy_out("d", lay.dest, on_error=failures.append)
    assert failures == []


def test_local_mode_bits_not_kept_are_reported(
    lay: Layout, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    os.chmod(lay.srv / "d" / "f", 0o2755)
    real_chmod = os.chmod

    def chmod(path: Any, mode: int, **kwargs: Any) -> None:
        real_chmod(path, mode & ~0o7000, **kwargs)  # as a system that drops set-group-ID

    monkeypatch.setattr(os, "chmod", chmod)
    with hostile(lay.srv) as client, caplog.at_level(logging.WARNING, "pyxen9p"):
        client.copy_out("d/f", lay.dest)
    assert [r.getMessage() for r in caplog.records] == [
        f"copy_out: {lay.dest}: this system dropped the mode bits 2000 (2755 asked, 0755 kept)"
    ]


def test_get_to_a_name_ending_in_a_slash_needs_a_directory(lay: Layout) -> None:
    with hostile(lay.srv) as client:
        with pytest.raises(NotADirectoryError):
            client.copy_out("d/f", f"{lay.out}/nodir/")
        with pytest.raises(IsADirectoryError):
            client.copy_out("d/f", f"{lay.outside}/")
    assert not (lay.out / "nodir").exists()
    lay.check_outside_untouched()


# --------------------------------------------------------------------------
# copy_in


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Client, Path, Path]]:
    srv = tmp_path / "srv"
    srv.mkdir()
    local = tmp_path / "local"
    local.mkdir()
    with hostile(srv) as client:
        yield client, srv, local


def _unblocker(fifo: Path) -> threading.Timer:
    """After 5 s, open *fifo* for writing: an old client blocked opening it gets unstuck."""

    def unblock() -> None:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return
        os.close(fd)

    timer = threading.Timer(5, unblock)
    timer.start()
    return timer


def test_put_skips_a_local_fifo_without_opening_it_blocking(
    served: tuple[Client, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    client, srv, local = served
    os.mkfifo(local / "pipe")
    (local / "f").write_bytes(b"f")
    timer = _unblocker(local / "pipe")
    try:
        with caplog.at_level(logging.WARNING, "pyxen9p"):
            assert client.copy_in(local / "pipe", "pipe") == 0
            assert client.copy_in(local, "tree") == 1
    finally:
        timer.cancel()
    assert not (srv / "pipe").exists()
    assert tree(srv / "tree") == {"f": b"f"}
    assert [r.getMessage() for r in caplog.records] == [
        f"copy_in: skipping {local / 'pipe'} (a fifo, not a regular file)"
    ] * 2


def test_put_reports_set_id_bits_the_server_drops(
    served: tuple[Client, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    client, srv, local = served
    (local / "tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(local / "tool", 0o4755)
    with caplog.at_level(logging.WARNING, "pyxen9p"):
        client.copy_in(local / "tool", "tool")
    assert stat.S_IMODE((srv / "tool").stat().st_mode) == 0o755
    assert [r.getMessage() for r in caplog.records] == [
        "copy_in: tool: the server dropped the mode bits 4000 (4755 asked, 0755 kept)"
    ]


def test_put_says_a_refused_link_is_the_servers_link_policy(
    served: tuple[Client, Path, Path],
) -> None:
    client, srv, local = served
    (local / "abs").symlink_to("/etc/passwd")
    (local / "rel").symlink_to("f")
    (local / "f").write_bytes(b"f")
    with pytest.raises(CopyError) as info:
        client.copy_in(local, "tree")
    [error] = info.value.errors
    assert isinstance(error, PermissionError) and error.filename == "tree/abs"
    assert "link policy" in str(error) and "'/etc/passwd'" in str(error)
    assert os.readlink(srv / "tree" / "rel") == "f"


def test_put_goes_on_and_reports_every_failure(served: tuple[Client, Path, Path]) -> None:
    client, srv, local = served
    for name in ("a", "b", "c"):
        (local / name).mkdir()
        (local / name / "file").write_bytes(name.encode())
    (srv / "tree").mkdir()
    (srv / "tree" / "a").write_bytes(b"a file where a directory goes")
    (srv / "tree" / "c").write_bytes(b"another")
    failures: list[OSError | ValueError] = []
    client.copy_in(local, "tree", on_error=failures.append)
    assert sorted(e.filename for e in failures) == ["tree/a", "tree/c"]  # type: ignore[union-attr]
    assert (srv / "tree" / "b" / "file").read_bytes() == b"b"


def test_put_no_clobber(served: tuple[Client, Path, Path]) -> None:
    client, srv, local = served
    (local / "f").write_bytes(b"new")
    (local / "g").write_bytes(b"g")
    (local / "l").symlink_to("g")
    (srv / "tree").mkdir()
    (srv / "tree" / "f").write_bytes(b"theirs")
    (srv / "tree" / "l").write_bytes(b"theirs too")
    client.copy_in(local, "tree", no_clobber=True)
    client.copy_in(local / "f", "tree/f", no_clobber=True)
    assert tree(srv / "tree") == {"f": b"theirs", "g": b"g", "l": b"theirs too"}


def test_put_to_a_name_ending_in_a_slash_needs_a_directory(
    served: tuple[Client, Path, Path],
) -> None:
    client, srv, local = served
    (local / "f").write_bytes(b"f")
    with pytest.raises(NotADirectoryError):
        client.copy_in(local / "f", "newdir/")
    assert not (srv / "newdir").exists()
    client.copy_in(local, "newdir/")  # a tree: the directory is created
    assert tree(srv / "newdir") == {"f": b"f"}


def test_sockets_are_skipped_both_ways(
    served: tuple[Client, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, srv, local = served
    with socket.socket(socket.AF_UNIX) as one, socket.socket(socket.AF_UNIX) as two:
        monkeypatch.chdir(local)
        one.bind("sock")  # relative: a socket's path is short
        monkeypatch.chdir(srv)
        two.bind("remote-sock")
        with caplog.at_level(logging.WARNING, "pyxen9p"):
            assert client.copy_in(local / "sock", "sock") == 0
            assert client.copy_out("remote-sock", local / "got") == 0
    assert not (srv / "sock").exists() and not (local / "got").exists()
    assert [r.getMessage() for r in caplog.records] == [
        f"copy_in: skipping {local / 'sock'} (a socket, not a regular file)",
        "copy_out: skipping remote-sock (a socket, not a regular file)",
    ]


def test_errors_name_the_destination_not_a_temporary_file(lay: Layout) -> None:
    with hostile(lay.srv) as client:
        with pytest.raises(FileNotFoundError) as info:
            client.copy_out("d/f", lay.out / "missing" / "f")
        assert info.value.filename == str(lay.out / "missing" / "f")
        with pytest.raises(IsADirectoryError) as info:  # a file never replaces a directory
            client.copy_out("d/f", lay.outside)
        assert info.value.filename == str(lay.outside)
    lay.check_outside_untouched()  # and no temporary file is left
