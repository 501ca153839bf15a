"""The ``pyxen9p`` command line, in process and as a real program.

Every command runs against ``--simulate DIR`` (the whole stack: frontend,
rings, simulated XenStore / grants / event channels, backend, 9P server) and
its effect is checked on DIR itself.  ``info`` is also run on this machine's
real environment, and against the real libxenstore talking to the simulated
xenstored over its socket (``XENSTORED_PATH``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import pty
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import need, need_file

import pyxen9p
from pyxen9p import cli
from pyxen9p._progress import ProgressBar, format_duration, format_size
from pyxen9p.cli import apply_mode, main
from pyxen9p.libs import XenStore
from pyxen9p.sim.xenstored import XenStoreDaemon

REPO = Path(__file__).resolve().parent.parent
BIG = 3 * 1024 * 1024 + 777  # several msizes, not a multiple of the I/O unit
ON_XEN = os.path.exists("/dev/xen/xenbus") or os.path.exists("/proc/xen/capabilities")


# --------------------------------------------------------------------------
# Helpers


@pytest.fixture
def share(tmp_path: Path) -> Path:
    """A directory to serve: files, a subdirectory, a link, a hidden file, a big file."""
    root = tmp_path / "share"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"alpha\n")
    (root / "sub" / "b.txt").write_bytes(b"beta\n")
    (root / "sub" / "deeper" / "c.txt").write_bytes(b"gamma\n")
    (root / ".hidden").write_bytes(b"secret\n")
    (root / "big.bin").write_bytes(os.urandom(BIG))
    (root / "link").symlink_to("a.txt")
    os.chmod(root / "a.txt", 0o640)
    return root


class Run:
    """``main(argv)`` in this process, with the captured output."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        status = main(list(argv))
        out, err = self.capsys.readouterr()
        return status, out, err


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    return Run(capsys)


def sim(directory: Path, *argv: str) -> list[str]:
    return ["--simulate", str(directory), *argv]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("XENSTORED_PATH", None)
    env.update(extra)
    return env


def program(
    *argv: str,
    module: str = "pyxen9p.cli",
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m <module> argv`` as a separate process."""
    return subprocess.run(
        [sys.executable, "-m", module, *argv],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        env=child_env() if env is None else env,
        timeout=timeout,
    )


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------
# Parsing, help, usage errors


def test_version(run: Run) -> None:
    status, out, _ = run("--version")
    assert status == 0
    assert out.strip() == f"pyxen9p {pyxen9p.__version__}"


@pytest.mark.parametrize("command", [c.name for c in cli._COMMANDS])
def test_every_command_has_help_with_examples(run: Run, command: str) -> None:
    status, out, err = run(command, "--help")
    assert status == 0, err
    assert out.startswith(f"usage: pyxen9p {command}")
    assert "examples:\n  pyxen9p" in out
    assert "--simulate DIR" in out  # the global options are documented on each command


def test_top_level_help_lists_every_command(run: Run) -> None:
    status, out, _ = run("--help")
    assert status == 0
    for command in cli._COMMANDS:
        assert f"    {command.name} " in out
    assert "exit status" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required: COMMAND"),
        (["frobnicate"], "invalid choice"),
        (["--tag", "a", "--devid", "1", "ls"], "at most one of --tag, --devid, --path"),
        (["ls", "--tag", "a", "--path", "/x"], "at most one of --tag, --devid, --path"),
        (["--readonly", "ls"], "--readonly only applies with --simulate"),
        (["--ring-order", "12", "ls"], "must be within 1..9"),
        (["--rings", "0", "ls"], "must be at least 1"),
        (["--devid", "-1", "ls"], "not a device number"),
        (["--timeout", "0", "ls"], "positive number of seconds"),
        (["-q", "-v", "ls"], "contradict"),
        (["mkdir", "-m", "999", "x"], "not an octal mode"),
        (["get"], "required: REMOTE"),
        (["mv", "onlyone"], "required: DST"),
    ],
)
def test_usage_errors_exit_2(run: Run, argv: list[str], message: str) -> None:
    status, out, err = run(*argv)
    assert status == 2
    assert out == ""
    assert err.startswith("usage: pyxen9p")
    assert message in err


def test_semantic_usage_errors_exit_2(run: Run, share: Path) -> None:
    status, _, err = run(*sim(share, "chmod", "u+q", "a.txt"))
    assert status == 2
    assert err.splitlines()[0] == "pyxen9p: chmod: invalid mode: 'u+q'"
    assert "Try 'pyxen9p chmod --help'." in err
    assert stat.S_IMODE((share / "a.txt").stat().st_mode) == 0o640  # untouched
    status, _, err = run(*sim(share, "demo"))
    assert status == 2
    assert "demo serves its own temporary directory: --simulate and --readonly do not apply" in err


def test_global_options_after_the_command(run: Run, share: Path) -> None:
    status, out, err = run("ls", "--simulate", str(share), "--timeout", "20", "sub")
    assert (status, err) == (0, "")
    assert out.splitlines() == ["b.txt", "deeper"]


# --------------------------------------------------------------------------
# Commands, in process


def test_ls(run: Run, share: Path) -> None:
    status, out, err = run(*sim(share, "ls"))
    assert (status, err) == (0, "")
    assert out.splitlines() == ["a.txt", "big.bin", "link", "sub"]
    status, out, _ = run(*sim(share, "ls", "-a", "/"))
    assert out.splitlines() == [".hidden", "a.txt", "big.bin", "link", "sub"]


def test_ls_long(run: Run, share: Path) -> None:
    status, out, err = run(*sim(share, "ls", "-l"))
    assert (status, err) == (0, "")
    lines = {
        line.split()[-1] if "->" not in line else line.split()[-3]: line
        for line in out.splitlines()
    }
    st = (share / "a.txt").stat()
    fields = lines["a.txt"].split()
    assert fields[0] == "-rw-r-----"
    assert fields[1:5] == ["1", str(st.st_uid), str(st.st_gid), "6"]
    assert fields[5] == time.strftime("%Y-%m-%d", time.localtime(st.st_mtime))
    assert lines["link"].startswith("l") and lines["link"].endswith("link -> a.txt")
    assert lines["sub"].startswith("d")
    assert lines["big.bin"].split()[4] == str(BIG)
    # the size column is right-aligned: every name starts in the same column
    assert len({line.index(":") for line in out.splitlines()}) == 1


def test_ls_long_reads_every_links_target(run: Run, share: Path) -> None:
    """Many links in one directory (their targets asked for together):
    each row names its own link's target, hidden ones left out."""
    many = share / "links"
    many.mkdir()
    for i in range(70):
        (many / f"l{i:02d}").symlink_to(f"target-{i}" + "x" * (i % 7))
    (many / ".hidden-link").symlink_to("nowhere")
    (many / "plain").write_bytes(b"p")
    status, out, err = run(*sim(share, "ls", "-l", "links"))
    assert (status, err) == (0, "")
    rows = out.splitlines()
    assert len(rows) == 71
    for i in range(70):
        assert rows[i].startswith("l") and rows[i].endswith(
            f"l{i:02d} -> target-{i}" + "x" * (i % 7)
        ), rows[i]
    assert rows[70].startswith("-") and rows[70].endswith(" plain")


def test_ls_recursive_and_several_paths(run: Run, share: Path) -> None:
    status, out, err = run(*sim(share, "ls", "-R", "sub"))
    assert (status, err) == (0, "")
    assert out == "sub:\nb.txt\ndeeper\n\nsub/deeper:\nc.txt\n"
    status, out, _ = run(*sim(share, "ls", "a.txt", "sub/deeper", "link"))
    assert out == "a.txt\nlink\n\nsub/deeper:\nc.txt\n"


def test_ls_missing_reports_and_goes_on(run: Run, share: Path) -> None:
    status, out, err = run(*sim(share, "ls", "nope", "sub/deeper"))
    assert status == 1
    assert err == "pyxen9p: ls: nope: No such file or directory\n"
    assert out.splitlines() == ["sub/deeper:", "c.txt"]


def test_cat(run: Run, share: Path) -> None:
    status, out, err = run(*sim(share, "cat", "a.txt", "/x", "sub/b.txt", "link"))
    assert status == 1
    assert out == "alpha\nbeta\nalpha\n"
    assert err == "pyxen9p: cat: /x: No such file or directory\n"
    status, out, err = run(*sim(share, "cat", "sub"))
    assert status == 1
    assert err == "pyxen9p: cat: sub: Is a directory\n"


def test_get_file_and_tree(
    run: Run, share: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    monkeypatch.chdir(out_dir)
    status, _, err = run(*sim(share, "get", "big.bin"))  # LOCAL defaults to its name here
    assert (status, err) == (0, "")
    assert sha(out_dir / "big.bin") == sha(share / "big.bin")
    status, _, err = run(*sim(share, "get", "a.txt", "renamed.txt"))
    assert (status, err) == (0, "")
    assert (out_dir / "renamed.txt").read_bytes() == b"alpha\n"
    assert stat.S_IMODE((out_dir / "renamed.txt").stat().st_mode) == 0o640  # preserved
    status, _, err = run(*sim(share, "get", "sub"))
    assert status == 1
    assert err == "pyxen9p: get: sub: Is a directory (use -r to copy a tree)\n"
    assert not (out_dir / "sub").exists()
    status, _, err = run(*sim(share, "get", "-r", "sub", str(out_dir)))
    assert (status, err) == (0, "")
    assert (out_dir / "sub" / "deeper" / "c.txt").read_bytes() == b"gamma\n"
    status, _, err = run(*sim(share, "get", "-r", "/", "whole"))
    assert (status, err) == (0, "")
    assert os.readlink(out_dir / "whole" / "link") == "a.txt"
    assert sha(out_dir / "whole" / "big.bin") == sha(share / "big.bin")
    status, _, err = run(*sim(share, "get", "missing.txt"))
    assert (status, err) == (1, "pyxen9p: get: missing.txt: No such file or directory\n")


def test_put_file_and_tree(run: Run, share: Path, tmp_path: Path) -> None:
    local = tmp_path / "local"
    (local / "inner").mkdir(parents=True)
    (local / "inner" / "f.txt").write_bytes(b"from the local side\n")
    (local / "top.bin").write_bytes(os.urandom(200_000))
    os.chmod(local / "top.bin", 0o600)
    status, _, err = run(*sim(share, "put", str(local / "top.bin")))
    assert (status, err) == (0, "")
    assert sha(share / "top.bin") == sha(local / "top.bin")
    assert stat.S_IMODE((share / "top.bin").stat().st_mode) == 0o600
    status, _, err = run(*sim(share, "put", str(local / "top.bin"), "sub"))  # into a directory
    assert (status, err) == (0, "")
    assert sha(share / "sub" / "top.bin") == sha(local / "top.bin")
    status, _, err = run(*sim(share, "put", str(local)))
    assert status == 1
    assert err == f"pyxen9p: put: {local}: Is a directory (use -r to copy a tree)\n"
    status, _, err = run(*sim(share, "put", "-r", str(local), "/copied"))
    assert (status, err) == (0, "")
    assert (share / "copied" / "inner" / "f.txt").read_bytes() == b"from the local side\n"
    status, _, err = run(*sim(share, "put", str(tmp_path / "nothing")))
    assert status == 1
    assert err == f"pyxen9p: put: {tmp_path / 'nothing'}: No such file or directory\n"


# --------------------------------------------------------------------------
# get and put behave like cp


def test_a_trailing_slash_means_a_directory(
    run: Run, share: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_bytes(b"f")
    status, _, err = run(*sim(share, "put", str(tmp_path / "f"), "/newdir/"))
    assert (status, err) == (1, "pyxen9p: put: /newdir/: Not a directory\n")
    status, _, err = run(*sim(share, "mv", "a.txt", "nodir/"))
    assert (status, err) == (1, "pyxen9p: mv: nodir/: Not a directory\n")
    status, _, err = run(*sim(share, "get", "a.txt", "localnodir/"))
    assert (status, err) == (1, "pyxen9p: get: localnodir/: Not a directory\n")
    assert not (share / "newdir").exists() and not (share / "nodir").exists()
    assert (share / "a.txt").exists() and not (tmp_path / "localnodir").exists()
    # a directory may take a new name ending in '/', as with rename(2) and cp -r
    assert run(*sim(share, "mv", "sub", "moved/"))[0] == 0
    assert (share / "moved" / "b.txt").exists()
    assert run(*sim(share, "get", "-r", "moved", "fresh/")) == (0, "", "")
    assert (tmp_path / "fresh" / "b.txt").read_bytes() == b"beta\n"
    assert run(*sim(share, "put", "-r", str(tmp_path / "fresh"), "/again/")) == (0, "", "")
    assert (share / "again" / "b.txt").read_bytes() == b"beta\n"


def test_get_r_goes_on_and_reports_every_failure(
    run: Run, share: Path, tmp_path: Path
) -> None:
    (share / "sub" / "l").symlink_to("b.txt")
    (share / "sub" / "z.txt").write_bytes(b"zed\n")
    out = tmp_path / "sub"
    out.mkdir()
    (out / "deeper").write_bytes(b"a file where a directory goes")
    (out / "l").mkdir()  # a directory where a link goes
    status, _, err = run(*sim(share, "get", "-r", "sub", str(tmp_path)))
    assert status == 1
    assert sorted(err.splitlines()) == [
        f"pyxen9p: get: {out / 'deeper'}: Not a directory (not replaced)",
        f"pyxen9p: get: {out / 'l'}: Is a directory (not replaced by a symbolic link)",
    ]
    assert (out / "b.txt").read_bytes() == b"beta\n"  # the rest was copied
    assert (out / "z.txt").read_bytes() == b"zed\n"


def test_put_r_goes_on_and_says_why_a_link_is_refused(
    run: Run, share: Path, tmp_path: Path
) -> None:
    local = tmp_path / "local"
    for name in ("a", "b"):
        (local / name).mkdir(parents=True)
        (local / name / "f").write_bytes(name.encode())
    (local / "abs").symlink_to("/etc/passwd")
    (share / "tree" / "local").mkdir(parents=True)
    (share / "tree" / "local" / "a").write_bytes(b"a file where a directory goes")
    status, _, err = run(*sim(share, "put", "-r", str(local), "/tree/"))
    assert status == 1
    assert sorted(err.splitlines()) == [
        "pyxen9p: put: /tree/local/a: Not a directory (not replaced)",
        "pyxen9p: put: /tree/local/abs: Operation not permitted: the server refused a"
        " symbolic link to '/etc/passwd' (its link policy; e.g. a confined server takes"
        " only relative targets that stay inside the share)",
    ]
    assert (share / "tree" / "local" / "b" / "f").read_bytes() == b"b"  # the rest was copied


def _unblock_later(fifo: Path) -> threading.Timer:
    """After 5 s open *fifo* for writing, so that a reader blocked opening it goes on."""

    def unblock() -> None:
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    timer = threading.Timer(5, unblock)
    timer.start()
    return timer


@pytest.mark.parametrize("recursive", [False, True])
def test_special_files_are_skipped_with_a_warning_both_ways(
    run: Run, share: Path, tmp_path: Path, recursive: bool
) -> None:
    os.mkfifo(share / "sub" / "remote-pipe")
    local = tmp_path / "local"
    local.mkdir()
    os.mkfifo(local / "local-pipe")
    flag = ["-r"] if recursive else []
    src = "sub" if recursive else "sub/remote-pipe"
    status, _, err = run(*sim(share, "get", *flag, src, str(tmp_path / "got")))
    assert (status, err) == (0, "pyxen9p: WARNING: pyxen9p.p9.client: copy_out: skipping"
                                " sub/remote-pipe (a fifo, not a regular file)\n")
    assert not (tmp_path / "got" / "remote-pipe").exists()
    assert (tmp_path / "got").is_dir() == recursive
    timer = _unblock_later(local / "local-pipe")
    try:
        src = str(local) if recursive else str(local / "local-pipe")
        status, _, err = run(*sim(share, "put", *flag, src, "/put"))
    finally:
        timer.cancel()
    assert (status, err) == (0, "pyxen9p: WARNING: pyxen9p.p9.client: copy_in: skipping"
                                f" {local / 'local-pipe'} (a fifo, not a regular file)\n")
    assert not (share / "put" / "local-pipe").exists()
    assert (share / "put").is_dir() == recursive


def test_an_interrupted_get_leaves_no_partial_file(
    run: Run, share: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyxen9p.p9.client import Client

    def interrupted(self: Client, fid: int, iounit: int, path: str, out: Any, *a: Any) -> int:
        out.write(b"half of it")
        out.flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(Client, "_download", interrupted)
    (tmp_path / "old.bin").write_bytes(b"the old content")
    assert run(*sim(share, "get", "big.bin", str(tmp_path / "old.bin")))[0] == 130
    assert run(*sim(share, "get", "big.bin", str(tmp_path / "new.bin")))[0] == 130
    assert sorted(os.listdir(tmp_path)) == ["old.bin", "share"]
    assert (tmp_path / "old.bin").read_bytes() == b"the old content"


def test_no_clobber(run: Run, share: Path, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"local a")
    assert run(*sim(share, "get", "-n", "a.txt", str(tmp_path))) == (0, "", "")
    assert (tmp_path / "a.txt").read_bytes() == b"local a"
    assert run(*sim(share, "get", "-r", "--no-clobber", "sub", str(tmp_path))) == (0, "", "")
    (tmp_path / "sub" / "b.txt").write_bytes(b"changed")
    (tmp_path / "sub" / "deeper" / "c.txt").unlink()
    assert run(*sim(share, "get", "-rn", "sub", str(tmp_path))) == (0, "", "")
    assert (tmp_path / "sub" / "b.txt").read_bytes() == b"changed"
    assert (tmp_path / "sub" / "deeper" / "c.txt").read_bytes() == b"gamma\n"
    assert run(*sim(share, "put", "-n", str(tmp_path / "a.txt"), "/")) == (0, "", "")
    assert (share / "a.txt").read_bytes() == b"alpha\n"
    assert run(*sim(share, "put", "-rn", str(tmp_path / "sub"), "/")) == (0, "", "")
    assert (share / "sub" / "b.txt").read_bytes() == b"beta\n"


def test_put_reports_mode_bits_the_server_drops(run: Run, share: Path, tmp_path: Path) -> None:
    (tmp_path / "tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(tmp_path / "tool", 0o4755)
    status, _, err = run(*sim(share, "put", str(tmp_path / "tool"), "/tool"))
    assert (status, err) == (0, "pyxen9p: WARNING: pyxen9p.p9.client: copy_in: /tool: the"
                                " server dropped the mode bits 4000 (4755 asked, 0755 kept)\n")
    assert stat.S_IMODE((share / "tool").stat().st_mode) == 0o755


def test_stat(run: Run, share: Path) -> None:
    status, out, err = run(*sim(share, "stat", "a.txt", "link"))
    assert (status, err) == (0, "")
    st = (share / "a.txt").stat()
    lines = out.splitlines()
    assert lines[0] == "  File: a.txt"
    assert lines[1].split()[:2] == ["Size:", "6"] and lines[1].endswith("regular file")
    assert f"Inode: {st.st_ino}" in lines[2]
    assert lines[3].startswith("Access: (0640/-rw-r-----)")
    assert lines[5].startswith(
        "Modify: " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime))
    )
    assert f".{st.st_mtime_ns % 1_000_000_000:09d}" in lines[5]
    assert "  File: link -> a.txt" in lines
    assert any(line.endswith("symbolic link") for line in lines)


def test_stat_json(run: Run, share: Path) -> None:
    status, out, err = run(*sim(share, "stat", "--json", "link", "sub", "nope"))
    assert status == 1
    assert err == "pyxen9p: stat: nope: No such file or directory\n"
    link, sub = (json.loads(line) for line in out.splitlines())
    assert link["type"] == "symbolic link" and link["target"] == "a.txt"
    assert sub["type"] == "directory" and sub["inode"] == (share / "sub").stat().st_ino
    status, out, _ = run(*sim(share, "stat", "--json", "-L", "link"))
    followed = json.loads(out)
    st = (share / "a.txt").stat()
    assert (followed["size"], followed["permissions"], followed["mtime_ns"]) == (
        6,
        "0640",
        st.st_mtime_ns,
    )
    assert "target" not in followed


def test_mkdir(run: Run, share: Path) -> None:
    assert run(*sim(share, "mkdir", "new"))[0] == 0
    assert (share / "new").is_dir()
    status, _, err = run(*sim(share, "mkdir", "new", "x/y"))
    assert status == 1
    assert err.splitlines() == [
        "pyxen9p: mkdir: new: File exists",
        "pyxen9p: mkdir: x/y: No such file or directory",
    ]
    status, _, err = run(*sim(share, "mkdir", "-p", "-m", "700", "x/y/z", "new"))
    assert (status, err) == (0, "")
    assert stat.S_IMODE((share / "x" / "y" / "z").stat().st_mode) == 0o700


def test_rm(run: Run, share: Path) -> None:
    status, _, err = run(*sim(share, "rm", "a.txt", "sub"))
    assert status == 1
    assert err == "pyxen9p: rm: sub: Is a directory (use -r to remove a tree)\n"
    assert not (share / "a.txt").exists() and (share / "sub").is_dir()
    assert os.path.islink(share / "link")  # a dangling link remains
    status, _, err = run(*sim(share, "rm", "-r", "sub", "link"))
    assert (status, err) == (0, "")
    assert not (share / "sub").exists() and not os.path.lexists(share / "link")
    status, _, err = run(*sim(share, "rm", "gone"))
    assert (status, err) == (1, "pyxen9p: rm: gone: No such file or directory\n")
    assert run(*sim(share, "rm", "-f", "gone"))[0] == 0


@pytest.mark.parametrize("root", ["/", "//", ".", "", "sub/..", "/../.."])
def test_rm_never_removes_the_root(run: Run, share: Path, root: str) -> None:
    status, _, err = run(*sim(share, "rm", "-rf", root))
    assert status == 1
    assert "refusing to remove the share's root directory" in err
    assert sorted(p.name for p in share.iterdir()) == [".hidden", "a.txt", "big.bin", "link", "sub"]


def test_rm_does_not_follow_links(run: Run, share: Path, tmp_path: Path) -> None:
    (share / "to-sub").symlink_to("sub")
    assert run(*sim(share, "rm", "-r", "to-sub"))[0] == 0
    assert (share / "sub" / "b.txt").exists()
    assert not os.path.lexists(share / "to-sub")


def test_rmdir(run: Run, share: Path) -> None:
    (share / "empty").mkdir()
    status, _, err = run(*sim(share, "rmdir", "empty", "sub"))
    assert status == 1
    assert err == "pyxen9p: rmdir: sub: Directory not empty\n"
    assert not (share / "empty").exists()


def test_mv(run: Run, share: Path) -> None:
    assert run(*sim(share, "mv", "a.txt", "renamed.txt"))[0] == 0
    assert (share / "renamed.txt").read_bytes() == b"alpha\n"
    assert run(*sim(share, "mv", "renamed.txt", "sub"))[0] == 0  # into the directory
    assert (share / "sub" / "renamed.txt").exists()
    (share / "empty").mkdir()
    assert run(*sim(share, "mv", "-T", "sub/deeper", "empty"))[0] == 0  # replaces it
    assert (share / "empty" / "c.txt").exists() and not (share / "sub" / "deeper").exists()
    status, _, err = run(*sim(share, "mv", "nope", "x"))
    assert (status, err) == (1, "pyxen9p: mv: nope: No such file or directory\n")


def test_ln(run: Run, share: Path) -> None:
    assert run(*sim(share, "ln", "-s", "sub/b.txt", "to-b"))[0] == 0
    assert os.readlink(share / "to-b") == "sub/b.txt"
    assert run(*sim(share, "ln", "-s", "deeper/c.txt", "sub"))[0] == 0  # inside the directory
    assert os.readlink(share / "sub" / "c.txt") == "deeper/c.txt"
    status, _, err = run(*sim(share, "ln", "-s", "../a.txt", "sub/up"))  # the server's policy
    assert (status, err) == (1, "pyxen9p: ln: sub/up: Operation not permitted\n")
    assert run(*sim(share, "ln", "a.txt", "hard"))[0] == 0
    assert (share / "hard").stat().st_ino == (share / "a.txt").stat().st_ino
    status, _, err = run(*sim(share, "ln", "-s", "x", "to-b"))
    assert (status, err) == (1, "pyxen9p: ln: to-b: File exists\n")


def test_chmod(run: Run, share: Path) -> None:
    assert run(*sim(share, "chmod", "604", "a.txt"))[0] == 0
    assert stat.S_IMODE((share / "a.txt").stat().st_mode) == 0o604
    assert run(*sim(share, "chmod", "u+x,g=u,o-r", "a.txt", "sub/b.txt"))[0] == 0
    assert stat.S_IMODE((share / "a.txt").stat().st_mode) == 0o770
    assert stat.S_IMODE((share / "sub" / "b.txt").stat().st_mode) == 0o770
    assert run(*sim(share, "chmod", "--", "-w", "a.txt"))[0] == 0
    assert stat.S_IMODE((share / "a.txt").stat().st_mode) == 0o550
    status, _, err = run(*sim(share, "chmod", "644", "nope"))
    assert (status, err) == (1, "pyxen9p: chmod: nope: No such file or directory\n")


@pytest.mark.parametrize(
    ("spec", "mode", "is_dir", "expected"),
    [
        ("755", 0, False, 0o755),
        ("0644", 0o777, False, 0o644),
        ("4755", 0, False, 0o4755),
        ("u+x", 0o644, False, 0o744),
        ("+x", 0o644, False, 0o755),
        ("go-w", 0o777, False, 0o755),
        ("a=r,u+w", 0o777, False, 0o644),
        ("g=u", 0o750, False, 0o770),
        ("o=g", 0o750, False, 0o755),
        ("a+X", 0o644, True, 0o755),
        ("a+X", 0o644, False, 0o644),
        ("a+X", 0o744, False, 0o755),
        ("u+s,+t", 0o755, True, 0o5755),
        ("u=rw,go=", 0o777, False, 0o600),
        ("u-x+w", 0o500, False, 0o600),
    ],
)
def test_apply_mode(spec: str, mode: int, is_dir: bool, expected: int) -> None:
    assert apply_mode(spec, mode, is_dir=is_dir) == expected


@pytest.mark.parametrize("spec", ["", "u", "x+r", "u+q", "12345", "8", "u+r,", "ug"])
def test_apply_mode_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="invalid mode"):
        apply_mode(spec, 0o644)


def test_df(run: Run, share: Path) -> None:
    vfs = os.statvfs(share)
    status, out, err = run(*sim(share, "df", "--json"))
    assert (status, err) == (0, "")
    record = json.loads(out)
    assert (record["bsize"], record["blocks"], record["namelen"]) == (
        vfs.f_bsize,
        vfs.f_blocks,
        vfs.f_namemax,
    )
    assert record["share"] == "share"
    assert record["size"] == vfs.f_blocks * vfs.f_bsize
    status, out, _ = run(*sim(share, "df"))
    header, row = out.splitlines()
    assert header.split() == ["Share", "1K-blocks", "Used", "Available", "Use%"]
    assert row.split()[:2] == ["share", str(vfs.f_blocks * vfs.f_bsize // 1024)]
    status, out, _ = run(*sim(share, "df", "-h", "sub"))
    assert out.splitlines()[1].split()[1:3] == format_size(vfs.f_blocks * vfs.f_bsize).split()
    status, out, _ = run(*sim(share, "df", "-i"))
    assert out.splitlines()[1].split()[1] == str(vfs.f_files)


def test_readonly_share(run: Run, share: Path, tmp_path: Path) -> None:
    local = tmp_path / "new.txt"
    local.write_bytes(b"x")
    status, _, err = run(*sim(share, "--readonly", "put", str(local)))
    assert (status, err) == (1, "pyxen9p: put: /new.txt: Read-only file system\n")
    assert not (share / "new.txt").exists()
    status, _, err = run(*sim(share, "--readonly", "rm", "a.txt"))
    assert (status, err) == (1, "pyxen9p: rm: a.txt: Read-only file system\n")
    assert run(*sim(share, "--readonly", "cat", "a.txt"))[1] == "alpha\n"


def test_simulate_missing_directory(run: Run, tmp_path: Path) -> None:
    status, out, err = run(*sim(tmp_path / "absent", "ls"))
    assert (status, out) == (1, "")
    assert err == (
        f"pyxen9p: ls: cannot connect to the 9pfs share '{tmp_path / 'absent'}'"
        f" (simulated): {tmp_path / 'absent'}: No such file or directory\n"
    )


def test_errors_show_a_traceback_only_with_verbose(run: Run, share: Path) -> None:
    status, _, err = run(*sim(share, "cat", "nope"))
    assert status == 1 and "Traceback" not in err
    status, _, err = run(*sim(share, "-v", "cat", "nope"))
    assert status == 1
    assert "pyxen9p: cat: nope: No such file or directory" in err
    assert "Traceback (most recent call last)" in err
    assert "pyxen9p: INFO: pyxen9p.cli: connected" in err


def test_ctrl_c_exits_130(run: Run, share: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(**kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pyxen9p, "connect", interrupted)
    status, _out, err = run(*sim(share, "ls"))
    assert status == 130
    assert err.strip() == "pyxen9p: interrupted"


def test_unexpected_exception_is_one_line(
    run: Run, share: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(**kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(pyxen9p, "connect", broken)
    status, _, err = run(*sim(share, "ls"))
    assert status == 1
    assert err == "pyxen9p: ls: internal error: RuntimeError: boom (-v shows the traceback)\n"


def test_transport_options_reach_the_frontend(run: Run, share: Path) -> None:
    status, out, err = run(*sim(share, "--rings", "1", "--ring-order", "4", "info", "--json"))
    assert (status, err) == (0, "")
    conn = json.loads(out)["connection"]
    assert (conn["rings"], conn["ring_order"]) == (1, 4)
    assert conn["grants"] == 1 + 16
    assert conn["transport_msize"] == conn["ring_bytes_each_way"] // 2 == 16384
    assert conn["msize"] == 16384


def test_allow_reconnect_reaches_connect(
    run: Run, share: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[object] = []
    real = pyxen9p.connect

    def recording(**kwargs: Any) -> Any:
        seen.append(kwargs.get("allow_reconnect"))
        return real(**kwargs)

    monkeypatch.setattr(pyxen9p, "connect", recording)
    assert run(*sim(share, "ls"))[0] == 0
    assert run(*sim(share, "--allow-reconnect", "ls"))[0] == 0
    assert run(*sim(share, "ls", "--allow-reconnect"))[0] == 0
    assert seen == [False, True, True]


def test_a_refused_reconnect_is_explained(
    run: Run, share: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyxen9p.frontend import ReconnectRefusedError

    def refused(**kwargs: object) -> None:
        raise ReconnectRefusedError(errno.ECONNREFUSED, "be/state is CLOSED (--allow-reconnect)")

    monkeypatch.setattr(pyxen9p, "connect", refused)
    status, out, err = run("--devid", "0", "ls")
    assert (status, out) == (1, "")
    assert "be/state is CLOSED (--allow-reconnect)" in err


# --------------------------------------------------------------------------
# info


def test_info_simulated(run: Run, share: Path) -> None:
    status, out, err = run(*sim(share, "--tag", "mytag", "info", "--json"))
    assert (status, err) == (0, "")
    report = json.loads(out)
    conn = report["connection"]
    assert conn["connected"] and conn["simulated"]
    assert conn["directory"] == str(share)
    assert conn["tag"] == "mytag"
    assert conn["frontend_path"] == "/local/domain/1/device/9pfs/0"
    assert conn["backend_path"] == "/local/domain/0/backend/9pfs/1/0"
    assert conn["backend_id"] == 0
    assert conn["backend_versions"] == [1]
    assert (conn["backend_max_rings"], conn["backend_max_ring_order"]) == (8, 9)
    assert (conn["rings"], conn["ring_order"]) == (2, 8)
    assert conn["version"] == "9P2000.L"
    assert conn["msize"] == conn["transport_msize"] == 262144
    [device] = conn["devices"]
    assert device["tag"] == "mytag" and device["state"] == "Connected"
    assert device["backend_state"] == "Connected"
    assert report["exit_status"] == 0
    status, out, _ = run(*sim(share, "info"))
    assert "Connection (simulated Xen serving" in out
    assert (
        "  in use                2 rings of order 8 (512.0 KiB each way per ring, 514 grants)"
        in out
    )
    assert "  9P session            9P2000.L, msize 262144" in out


def test_info_simulated_device_missing_exits_1(run: Run, share: Path) -> None:
    status, out, _ = run(*sim(share, "--devid", "3", "info"))
    assert status == 1
    assert "  failed: no 9pfs device 3 at /local/domain/1/device/9pfs" in out


@pytest.mark.skipif(ON_XEN, reason="this machine runs on Xen")
def test_info_without_xen(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    need_file("/usr/lib/x86_64-linux-gnu/libxenstore.so.4")  # the messages name xs_open
    monkeypatch.delenv("XENSTORED_PATH", raising=False)
    status, out, err = run("info")
    assert (status, err) == (0, "")
    assert "XenStore              not reachable:" in out
    assert "  no 9pfs device is reachable: XenStore is not reachable" in out
    assert "/dev/xen/gntalloc     absent" in out
    status, out, _ = run("info", "--json")
    report = json.loads(out)
    assert report["xenstore"]["reachable"] is False
    assert report["connection"]["connected"] is False
    assert report["paths"]["/dev/xen"]["exists"] is False
    assert [lib["name"] for lib in report["libraries"]] == [
        "libxengnttab",
        "libxenevtchn",
        "libxenstore",
    ]
    # asking for a device (or requiring one) makes its absence a failure
    status, out, err = run("info", "--require-device")
    assert status == 1 and err == ""
    status, out, err = run("--tag", "share", "info")
    assert status == 1
    assert "  failed: xs_open: No such file or directory (is this a Xen domain?" in out
    status, out, err = run("--tag", "share", "ls")
    assert (status, out) == (1, "")
    assert err.startswith("pyxen9p: ls: cannot connect to the 9pfs share: xs_open: No such file")
    status, out, err = run("ls")  # default: the only device, which cannot be looked up
    assert status == 1
    assert err.startswith("pyxen9p: ls: cannot read XenStore: xs_open: No such file or directory")


@pytest.mark.skipif(ON_XEN, reason="this machine runs on Xen")
def test_info_without_the_libraries() -> None:
    result = program(
        "info",
        env=child_env(
            PYXEN9P_LIBXENSTORE="/nonexistent/libxenstore.so",
            PYXEN9P_LIBXENGNTTAB="/nonexistent/libxengnttab.so",
        ),
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert "libxenstore           does not load: cannot load /nonexistent/libxenstore.so" in out
    assert "libxengnttab          does not load:" in out
    assert "[PYXEN9P_LIBXENSTORE=/nonexistent/libxenstore.so]" in out
    assert "XenStore              not reachable:" in out
    assert result.stderr == b""


def _toolstack(store: XenStore, devices: list[tuple[int, str]]) -> None:
    """What a toolstack writes for 9pfs devices of domain 0, backends waiting (InitWait)."""
    store.write("/local/domain/0/domid", "0")
    for devid, tag in devices:
        fe = f"/local/domain/0/device/9pfs/{devid}"
        be = f"/local/domain/0/backend/9pfs/0/{devid}"
        for path, value in [
            (f"{fe}/backend", be),
            (f"{fe}/backend-id", "0"),
            (f"{fe}/tag", tag),
            (f"{fe}/state", "1"),
            (f"{be}/state", "2"),
            (f"{be}/versions", "1"),
            (f"{be}/max-rings", "4"),
            (f"{be}/max-ring-page-order", "6"),
        ]:
            store.write(path, value)


@pytest.fixture
def xenstored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[XenStoreDaemon]:
    """The simulated xenstored on a socket, used by the real libxenstore."""
    need_file("/usr/lib/x86_64-linux-gnu/libxenstore.so.4")
    sock = tmp_path / "xenstored.sock"
    with XenStoreDaemon(str(sock)) as daemon:
        monkeypatch.setenv("XENSTORED_PATH", str(sock))
        yield daemon


@pytest.mark.skipif(ON_XEN, reason="this machine runs on Xen")
def test_info_with_real_libxenstore_one_device(run: Run, xenstored: XenStoreDaemon) -> None:
    with XenStore() as store:
        _toolstack(store, [(0, "share")])
    status, out, err = run("--timeout", "5", "info", "--no-connect")
    assert (status, err) == (0, "")
    assert f"XenStore              reachable through XENSTORED_PATH={xenstored.socket_path}" in out
    assert (
        "  0    tag 'share', state Initialising; backend /local/domain/0/backend/9pfs/0/0"
        " (domain 0, state InitWait)"
    ) in out
    assert "not connecting (--no-connect)" in out
    with XenStore() as store:
        assert store.read("/local/domain/0/device/9pfs/0/state") == b"1"  # untouched
    # a plain survey connects to the only device; here no grant device exists
    status, out, err = run("--timeout", "5", "info", "--json")
    assert (status, err) == (0, "")
    conn = json.loads(out)["connection"]
    assert conn["requested"] == {"devid": 0} and conn["automatic"]
    assert conn["connected"] is False and "xengntshr_open" in conn["error"]
    status, _, _ = run("--timeout", "5", "info", "--require-device")
    assert status == 1
    status, _, err = run("--timeout", "5", "ls")  # the only device is chosen by default
    assert status == 1
    assert err.startswith("pyxen9p: ls: cannot connect to the 9pfs share: xengntshr_open:")


@pytest.mark.skipif(ON_XEN, reason="this machine runs on Xen")
def test_several_devices_must_be_chosen(run: Run, xenstored: XenStoreDaemon) -> None:
    with XenStore() as store:
        _toolstack(store, [(0, "share"), (3, "data")])
    status, out, err = run("ls")
    assert (status, out) == (1, "")
    assert err == (
        "pyxen9p: ls: this domain has 2 9pfs devices: 0 (tag 'share', Initialising);"
        " 3 (tag 'data', Initialising); choose one with --tag, --devid or --path\n"
    )
    status, out, err = run("info")
    assert (status, err) == (0, "")
    assert "this domain has 2 9pfs devices: choose one with --tag, --devid or --path" in out
    status, out, err = run("--tag", "nope", "info")
    assert status == 1
    assert "failed: no 9pfs device with tag 'nope' under /local/domain/0/device/9pfs" in out


@pytest.mark.skipif(ON_XEN, reason="this machine runs on Xen")
def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_program_sigint_exits_130(xenstored: XenStoreDaemon) -> None:
    """Ctrl-C while the frontend waits for a backend that never gets ready."""
    fe, be = "/local/domain/0/device/9pfs/0", "/local/domain/0/backend/9pfs/0/0"
    with XenStore() as store:
        store.write("/local/domain/0/domid", "0")
        for path, value in [
            (f"{fe}/backend", be),
            (f"{fe}/backend-id", "0"),
            (f"{fe}/tag", "share"),
            (f"{fe}/state", "6"),
            (f"{be}/state", "1"),
        ]:
            store.write(path, value)
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyxen9p.cli", "--timeout", "60", "ls"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(XENSTORED_PATH=xenstored.socket_path, PYTHONFAULTHANDLER="1"),
            # as from a terminal: a job started in the background by a
            # non-interactive shell inherits SIGINT ignored, and Python keeps it so
            preexec_fn=_default_sigint,
        )
        try:
            deadline = time.monotonic() + 30
            while store.read(f"{fe}/state") != b"1":  # claimed: now waiting for the backend
                assert time.monotonic() < deadline, "the frontend never claimed the device"
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.05)
            time.sleep(0.2)
            started = time.monotonic()
            proc.send_signal(signal.SIGINT)
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGABRT)  # faulthandler: every thread's stack
                out, err = proc.communicate(timeout=30)
                pytest.fail(f"no exit 30 s after SIGINT; stacks:\n{err.decode(errors='replace')}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert time.monotonic() - started < 10  # not the 60 s timeout
        assert proc.returncode == 130
        assert (out, err.strip()) == (b"", b"pyxen9p: interrupted")
        assert store.read(f"{fe}/state") == b"6"  # the device was given back (Closed)


# --------------------------------------------------------------------------
# demo


def test_demo_in_process(run: Run) -> None:
    status, out, err = run("--rings", "1", "--ring-order", "5", "demo", "--keep")
    kept = [
        Path(line.removeprefix("pyxen9p: demo: kept "))
        for line in err.splitlines()
        if line.startswith("pyxen9p: demo: kept ")
    ]
    try:
        assert status == 0, out + err
        assert out.splitlines()[-1].startswith("demo passed: 8 checks in ")
        assert "FAILED" not in out
        assert "negotiated 1 ring of order 5 (64.0 KiB each way, 33 grants)" in out
        assert "lrwxrwxrwx" in out and "latest.csv -> data/numbers.csv" in out
        [workdir] = kept
        assert (workdir / "share" / "made-by-9p" / "final.bin").stat().st_size == 300_000
        assert not (workdir / "share" / "roundtrip").exists()
        assert sha(workdir / "copied-out" / "data" / "random.bin") == sha(
            workdir / "share" / "data" / "random.bin"
        )
    finally:
        for path in kept:
            shutil.rmtree(path, ignore_errors=True)
    status, out, err = run("-q", "demo")
    assert (status, err) == (0, "")
    assert len(out.splitlines()) == 1 and out.startswith("demo passed:")


# --------------------------------------------------------------------------
# As a real program


@pytest.mark.parametrize(
    ("argv", "stdout"),
    [
        (["ls", "-a"], b".hidden\na.txt\nbig.bin\nlink\nsub\n"),
        (["cat", "sub/b.txt", "a.txt"], b"beta\nalpha\n"),
        (["mkdir", "-p", "made/here"], b""),
        (["rmdir", "sub/deeper"], None),  # fails: not empty
        (["mv", "a.txt", "moved.txt"], b""),
        (["ln", "-s", "sub/b.txt", "lb"], b""),
        (["chmod", "600", "a.txt"], b""),
        (["rm", "-r", "sub"], b""),
    ],
)
def test_program(share: Path, argv: list[str], stdout: bytes | None) -> None:
    result = program(*sim(share, *argv))
    if stdout is None:
        assert result.returncode == 1
        assert result.stderr == b"pyxen9p: rmdir: sub/deeper: Directory not empty\n"
        return
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout == stdout
    effects = {
        "mkdir": lambda: (share / "made" / "here").is_dir(),
        "mv": lambda: (share / "moved.txt").exists() and not (share / "a.txt").exists(),
        "ln": lambda: os.readlink(share / "lb") == "sub/b.txt",
        "chmod": lambda: stat.S_IMODE((share / "a.txt").stat().st_mode) == 0o600,
        "rm": lambda: not (share / "sub").exists(),
    }
    if argv[0] in effects:
        assert effects[argv[0]]()


def test_program_get_put_stat_df(share: Path, tmp_path: Path) -> None:
    target = tmp_path / "got.bin"
    result = program(*sim(share, "get", "big.bin", str(target)))
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")  # no tty: no bar
    assert sha(target) == sha(share / "big.bin")
    result = program(*sim(share, "put", str(target), "sub/back.bin"))
    assert (result.returncode, result.stderr) == (0, b"")
    assert sha(share / "sub" / "back.bin") == sha(target)
    result = program(*sim(share, "stat", "--json", "sub/back.bin"))
    assert json.loads(result.stdout)["size"] == BIG
    result = program(*sim(share, "df", "--json"))
    assert json.loads(result.stdout)["blocks"] == os.statvfs(share).f_blocks
    result = program(*sim(share, "cat", "big.bin"))
    assert hashlib.sha256(result.stdout).hexdigest() == sha(share / "big.bin")


def test_program_errors_and_exit_codes(share: Path) -> None:
    result = program(*sim(share, "cat", "/x"))
    assert (result.returncode, result.stdout) == (1, b"")
    assert result.stderr == b"pyxen9p: cat: /x: No such file or directory\n"
    result = program(*sim(share, "frobnicate"))
    assert result.returncode == 2 and b"invalid choice" in result.stderr
    result = program(*sim(share, "ls", "--help"), module="pyxen9p")  # python -m pyxen9p
    assert result.returncode == 0 and result.stdout.startswith(b"usage: pyxen9p ls")


def test_program_broken_pipe_exits_141(share: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyxen9p.cli", *sim(share, "cat", "big.bin", "big.bin")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert len(proc.stdout.read(10)) == 10
    proc.stdout.close()
    with proc.stderr:
        err = proc.stderr.read()
    assert proc.wait(60) == 141
    assert err == b""


def test_console_script_demo(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "pyxen9p"
    need(script.exists(), f"the console script {script}")
    started = time.monotonic()
    # no Xen library may be needed: make every one of them unloadable
    env = child_env(
        **{
            f"PYXEN9P_LIB{name}": f"/nonexistent/lib{name.lower()}.so"
            for name in ("XENGNTTAB", "XENEVTCHN", "XENSTORE")
        }
    )
    result = subprocess.run(
        [str(script), "demo"], capture_output=True, cwd=tmp_path, env=env, timeout=120
    )
    took = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout.decode()
    assert "negotiated 2 rings of order 8" in out
    assert out.splitlines()[-1].startswith("demo passed: 8 checks")
    assert result.stderr == b""
    assert took < 30
    # the temporary directory named in the first step is gone
    shared = next(
        line.split(":")[0].strip()
        for line in out.splitlines()
        if line.strip().startswith("/") and "pyxen9p-demo-" in line
    )
    assert Path(shared).name == "share"
    assert not Path(shared).parent.exists()


# --------------------------------------------------------------------------
# Progress bars


def _run_on_pty(argv: list[str]) -> tuple[int, bytes]:
    """Run the program with its standard error on a 100-column pseudo-terminal."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyxen9p.cli", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=slave,
            env=child_env(TERM="xterm"),
        )
    finally:
        os.close(slave)
    output = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        status = proc.wait(30)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return status, output


def test_progress_bar_on_a_terminal(share: Path, tmp_path: Path) -> None:
    status, output = _run_on_pty(sim(share, "get", "big.bin", str(tmp_path / "out.bin")))
    assert status == 0, output
    assert sha(tmp_path / "out.bin") == sha(share / "big.bin")
    text = output.decode()
    assert text.startswith("\r") and "get big.bin" in text
    final = text.rstrip("\r\n").split("\r")[-1]
    assert " 100% 3.0 MiB/3.0 MiB " in final and "[" + "#" * 30 + "]" in final
    assert all(len(line.replace("\x1b[K", "")) <= 99 for line in text.split("\r"))
    status, output = _run_on_pty(["-q", *sim(share, "get", "big.bin", str(tmp_path / "q.bin"))])
    assert (status, output) == (0, b"")


def test_progress_bar_rendering() -> None:
    bar = ProgressBar("get a-rather-long-file-name.iso", enabled=False)
    bar(512 * 1024, 2 * 1024 * 1024)
    line = bar.render(80)
    assert len(line) <= 80
    assert " 25% 512.0 KiB/2.0 MiB " in line and "ETA" in line
    bar_text = line[line.index("[") + 1 : line.index("]")]
    assert set(bar_text) == {"#", "-"} and len(bar_text) >= 10
    assert bar_text.count("#") == round(len(bar_text) / 4)
    assert len(bar.render(30)) <= 30  # the label is shortened first
    assert bar.render(30).startswith("...")
    bar(2 * 1024 * 1024, 2 * 1024 * 1024)
    assert " 100% " in bar.render(80) and " in 0:" in bar.render(80)
    assert format_size(0) == "0 B" and format_size(1536) == "1.5 KiB"
    assert format_duration(3725) == "1:02:05" and format_duration(65) == "1:05"


def test_progress_bar_disabled_draws_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with ProgressBar("x") as bar:  # stderr is not a terminal under capsys
        bar(1, 2)
        bar(2, 2)
    assert capsys.readouterr() == ("", "")


def test_demo_on_a_real_share_only_reads(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a 9pfs device of its own (here: a simulated one standing in for
    the real Xen), demo runs on it, read only; --simulated forces the
    simulated demo."""
    from pyxen9p import cli

    share = tmp_path / "share"
    share.mkdir()
    (share / "a.txt").write_bytes(b"alpha")
    (share / "sub").mkdir()
    before = sorted(p.name for p in share.rglob("*"))
    real_connect = pyxen9p.connect
    monkeypatch.setattr(cli.demo, "_real_share", lambda: {"tag": "share"})
    monkeypatch.setattr(
        cli.pyxen9p, "connect", lambda **kw: real_connect(**({"simulate": share} | kw))
    )
    status, out, err = run("demo")
    assert status == 0, out + err
    assert "a real Xen 9pfs share (read only)" in out
    assert "a.txt: 5 B, sha256 8ed3f6ad685b959e..." in out
    assert "sub/" in out
    assert out.splitlines()[-1].startswith("demo passed on real Xen in ")
    assert sorted(p.name for p in share.rglob("*")) == before  # nothing written
    status, out, err = run("-q", "demo", "--simulated")
    assert status == 0 and out.startswith("demo passed: 8 checks"), out + err
