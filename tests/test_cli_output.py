"""What the command line prints when a server's names, error strings and times are hostile.

The CLI runs in process against a :class:`~p9.hostile.HostileServer` (its
``connect`` replaced), or as a program against ``--simulate DIR``; a
pseudo-terminal stands for the user's terminal.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import need_tool
from p9.hostile import HostileServer, Script, on

from pyxen9p import cli
from pyxen9p.cli import escape_controls, main, quote_name
from pyxen9p.p9 import codec as c

REPO = Path(__file__).resolve().parent.parent

#: Names a hostile server serves (bytes: some are not UTF-8).
HOSTILE = {
    b"esc\x1b[2J": "'esc'$'\\033''[2J'",  # clears the screen
    b"nl\nfake entry": "'nl'$'\\n''fake entry'",  # looks like two entries
    b"cr\rover": "'cr'$'\\r''over'",  # overwrites the line
    b"del\x7f": "'del'$'\\177'",
    b"bad\xff\xfe": "'bad'$'\\377\\376'",  # not UTF-8
    b"rtl\xe2\x80\xaetxt.exe": "'rtl'$'\\342\\200\\256''txt.exe'",  # right-to-left override
    b"bell\x07\x9b": "'bell'$'\\a\\233'",  # BEL, and a lone C1 byte (CSI in 8 bits)
    b"plain": "plain",
    b"caf\xc3\xa9": "café",
    b"a b": "'a b'",
    b"it's": '"it\'s"',
}


@pytest.fixture
def export(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    root.mkdir()
    for name in HOSTILE:
        with open(os.path.join(bytes(root), name), "wb"):
            pass
    os.symlink(b"esc\x1b[2J", os.path.join(bytes(root), b"link\x1b]0;title\x07"))
    return root


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., HostileServer]]:
    """``serve(root, script)``: the CLI's connections go to a HostileServer on *root*."""
    servers: list[HostileServer] = []

    def start(root: Path, script: Script | None = None) -> HostileServer:
        server = HostileServer(root, script)
        servers.append(server)
        monkeypatch.setattr(cli.pyxen9p, "connect", lambda **_kw: server.client())
        return server

    yield start
    for server in servers:
        server.close()


def run_in_process(
    argv: list[str], *, tty: bool, monkeypatch: pytest.MonkeyPatch | None = None
) -> tuple[int, bytes, bytes]:
    """``main(argv)`` with standard output on a pseudo-terminal (*tty*) or a pipe."""
    master, slave = pty.openpty() if tty else os.pipe()
    err_r, err_w = os.pipe()
    stdout = open(slave, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    stderr = open(err_w, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    try:
        with pytest.MonkeyPatch.context() as streams:
            streams.setattr(sys, "stdout", stdout)
            streams.setattr(sys, "stderr", stderr)
            status = main(["--simulate", "/unused", *argv])
            stdout.flush()
            stderr.flush()
    finally:
        stdout.close()
        stderr.close()
        os.close(slave)
        os.close(err_w)
    out = _drain(master)
    err = _drain(err_r)
    os.close(master)
    os.close(err_r)
    if tty:
        out = out.replace(b"\r\n", b"\n")  # the terminal's ONLCR
    return status, out, err


def _drain(fd: int) -> bytes:
    data = b""
    while select.select([fd], [], [], 0.2)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: a pseudo-terminal with no writer left
            break
        if not chunk:
            break
        data += chunk
    return data


def program(*argv: str) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "pyxen9p.cli", *argv], capture_output=True,
                          stdin=subprocess.DEVNULL, env=env, timeout=60)  # fmt: skip


def names_on_disk(root: Path) -> set[bytes]:
    return set(os.listdir(bytes(root)))


# --------------------------------------------------------------------------
# Quoting


@pytest.mark.parametrize("raw", list(HOSTILE), ids=repr)
def test_quote_name_is_gnu_ls_shell_escape(raw: bytes) -> None:
    name = raw.decode("utf-8", "surrogateescape")  # as the codec decodes names
    assert quote_name(name) == HOSTILE[raw]


def test_quote_name_gives_a_shell_word_for_the_exact_name() -> None:
    bash = need_tool("bash")
    names = [*HOSTILE, b"", b"~home", b"x#y~", b"#x", b"a=b", b"q\"x", b"it's $HOME",
             b"back\\slash", b"tab\tx", b"\x01\x02\x1f", b"'", b"\xc2\xa0nbsp", b"\xed\xa0\x80"]
    for raw in names:
        quoted = quote_name(raw.decode("utf-8", "surrogateescape"))
        assert quoted.isprintable(), quoted
        got = subprocess.run([bash, "-c", f"printf %s {quoted}"], capture_output=True,
                             check=True).stdout  # fmt: skip
        assert got == raw, (raw, quoted)


def test_escape_controls() -> None:
    assert escape_controls("plain text: 'x'") == "plain text: 'x'"
    assert escape_controls("a\x1b[2Jb\nc\rd\x7f") == "a\\033[2Jb\\nc\\rd\\177"
    assert escape_controls("bad\udcff") == "bad\\377"
    assert escape_controls("line 1\nline\x1b 2", keep_newlines=True) == "line 1\nline\\033 2"


# --------------------------------------------------------------------------
# ls, stat and errors on a terminal and on a pipe


def test_ls_on_a_terminal_quotes_every_name(
    export: Path, serve: Callable[..., HostileServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    serve(export)
    status, out, err = run_in_process(["ls"], tty=True, monkeypatch=monkeypatch)
    assert (status, err) == (0, b"")
    lines = out.decode().splitlines()
    assert sorted(lines) == sorted([*HOSTILE.values(), "'link'$'\\033'']0;title'$'\\a'"])
    assert not any(ch in out for ch in b"\x1b\r\x7f\x07\x9b\xff")
    status, out, _ = run_in_process(["ls", "-l"], tty=True, monkeypatch=monkeypatch)
    assert status == 0
    lines = out.decode().splitlines()
    assert len(lines) == len(HOSTILE) + 1
    assert any(line.endswith(" 'link'$'\\033'']0;title'$'\\a' -> 'esc'$'\\033''[2J'")
               for line in lines)  # fmt: skip
    assert not any(ch in out for ch in b"\x1b\r\x7f\x07\x9b\xff")


def test_ls_to_a_pipe_writes_names_as_they_are(
    export: Path, serve: Callable[..., HostileServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As GNU ls does; a name that is not UTF-8 is written as its bytes (no crash)."""
    serve(export)
    status, out, err = run_in_process(["ls"], tty=False, monkeypatch=monkeypatch)
    assert (status, err) == (0, b"")
    assert b"bad\xff\xfe\n" in out and b"esc\x1b[2J\n" in out


def test_stat_on_a_terminal_quotes_the_names(
    export: Path, serve: Callable[..., HostileServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    serve(export)
    link = os.fsdecode(b"link\x1b]0;title\x07")
    status, out, err = run_in_process(["stat", link], tty=True, monkeypatch=monkeypatch)
    assert (status, err) == (0, b"")
    assert out.decode().splitlines()[0] == (
        "  File: 'link'$'\\033'']0;title'$'\\a' -> 'esc'$'\\033''[2J'"
    )


def test_errors_quote_names_and_escape_server_strings(
    export: Path, serve: Callable[..., HostileServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve(export)
    missing = os.fsdecode(b"esc\x1b[2J/nl\nx\xff")
    status, _, err = run_in_process(["cat", missing], tty=True, monkeypatch=monkeypatch)
    assert status == 1
    assert err == b"pyxen9p: cat: 'esc'$'\\033''[2J/nl'$'\\n''x'$'\\377': Not a directory\n"

    server.script = on(c.Tstatfs, lambda m, _h: c.Rerror(m.tag, "evil\x1b[2J\nforged line", 5))
    status, _, err = run_in_process(["df"], tty=False, monkeypatch=monkeypatch)
    assert status == 1
    assert err == b"pyxen9p: df: /: evil\\033[2J\\nforged line\n"
    status, _, err = run_in_process(["-v", "df"], tty=False, monkeypatch=monkeypatch)
    assert b"\x1b" not in err and b"evil\\033[2J\\nforged line" in err  # the traceback too


def test_log_lines_escape_what_they_carry() -> None:
    stream = io.StringIO()
    args = cli.build_parser().parse_args(["ls"])
    with cli._logging(args, stream):
        logging.getLogger("pyxen9p.test").warning("skipping %s", "fifo\x1b[2J\nx")
    assert stream.getvalue() == "pyxen9p: WARNING: pyxen9p.test: skipping fifo\\033[2J\\nx\n"


# --------------------------------------------------------------------------
# Machine-readable listings: exact for any name


def test_ls_null_is_exact(export: Path) -> None:
    result = program("--simulate", str(export), "ls", "-0", "-a")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(b"\0")
    paths = result.stdout[:-1].split(b"\0")
    assert set(paths) == {b"/" + name for name in names_on_disk(export)}
    result = program("--simulate", str(export), "ls", "-R", "--null", "/")
    assert set(result.stdout[:-1].split(b"\0")) == {b"/" + n for n in names_on_disk(export)}
    result = program("--simulate", str(export), "ls", "-0", "-l")
    assert result.returncode == 2 and b"-0 prints paths only" in result.stderr


def _exact(record: dict[str, Any], key: str) -> bytes:
    if f"{key}_base64" in record:
        return base64.b64decode(record[f"{key}_base64"])
    value: str = record[key]
    return value.encode()


@pytest.mark.parametrize("long", [False, True])
def test_ls_json_is_exact(
    export: Path, serve: Callable[..., HostileServer], monkeypatch: pytest.MonkeyPatch,
    long: bool,
) -> None:
    serve(export)
    argv = ["ls", "--json", *(["-l"] if long else [])]
    status, out, err = run_in_process(argv, tty=True, monkeypatch=monkeypatch)
    assert (status, err) == (0, b"")
    out.decode("ascii")  # JSON Lines, ASCII only: no byte can drive the terminal
    records = [json.loads(line) for line in out.splitlines()]
    assert {_exact(r, "name") for r in records} == names_on_disk(export)
    assert {_exact(r, "path") for r in records} == {b"/" + n for n in names_on_disk(export)}
    bad = next(r for r in records if r["name"].startswith("bad"))
    assert bad["name"] == "bad\ufffd\ufffd"  # readable, and the exact bytes beside it
    assert base64.b64decode(bad["name_base64"]) == b"bad\xff\xfe"
    plain = next(r for r in records if r["name"] == "plain")
    assert "name_base64" not in plain
    assert plain["type"] == ("regular empty file" if long else "regular file")
    link = next(r for r in records if r["name"].startswith("link"))
    assert link["type"] == "symbolic link"
    if long:
        assert _exact(link, "target") == b"esc\x1b[2J"
        assert plain["size"] == 0 and plain["permissions"] == "0644"


def test_names_injected_into_a_listing(
    tmp_path: Path, serve: Callable[..., HostileServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Names that exist on no disk (a newline, an ESC) reach ls only through Rreaddir."""
    fake = ["one\nfake", "\x1b]2;pwned\x07", "ok"]

    def listing(m: c.Treaddir, _honest: Callable[[], c.Message]) -> c.Message:
        if m.offset:
            return c.Rreaddir(m.tag, b"")
        entries = [c.Dirent(c.Qid(0, 0, i), i + 1, c.DT_REG, n) for i, n in enumerate(fake)]
        return c.Rreaddir.from_entries(m.tag, entries)

    serve(tmp_path, on(c.Treaddir, listing))
    _, out, _ = run_in_process(["ls"], tty=True, monkeypatch=monkeypatch)
    assert out.decode().splitlines() == ["$'\\033'']2;pwned'$'\\a'", "ok", "'one'$'\\n''fake'"]
    _, out, _ = run_in_process(["ls", "-0"], tty=True, monkeypatch=monkeypatch)
    assert out == b"/\x1b]2;pwned\x07\0/ok\0/one\nfake\0"
    _, out, _ = run_in_process(["ls", "--json"], tty=False, monkeypatch=monkeypatch)
    assert [json.loads(line)["name"] for line in out.splitlines()] == sorted(fake)


# --------------------------------------------------------------------------
# Times: before 1970, and beyond what this system can show

DATED_1960 = -315_619_200  # 1960-01-01T00:00:00Z


def test_a_file_dated_1960_end_to_end(
    tmp_path: Path, serve: Callable[..., HostileServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    export = tmp_path / "export"
    export.mkdir()
    old = export / "old.txt"
    old.write_bytes(b"sixties\n")
    os.utime(old, ns=(DATED_1960 * 10**9, DATED_1960 * 10**9 + 5))
    serve(export)
    try:
        status, out, err = run_in_process(["ls", "-l"], tty=False, monkeypatch=monkeypatch)
        assert (status, err) == (0, b""), err
        assert b" 1960-01-01 00:00 old.txt\n" in out
        status, out, err = run_in_process(["stat", "old.txt"], tty=False, monkeypatch=monkeypatch)
        assert (status, err) == (0, b""), err
        assert b"Modify: 1960-01-01 00:00:00.000000005 +0000\n" in out
        status, out, _ = run_in_process(["stat", "--json", "old.txt"], tty=False,
                                        monkeypatch=monkeypatch)  # fmt: skip
        record = json.loads(out)
        assert record["mtime"] == pytest.approx(DATED_1960, abs=1e-6)
        assert record["mtime_ns"] == DATED_1960 * 10**9 + 5
        assert record["atime_ns"] == DATED_1960 * 10**9
        got = tmp_path / "got.txt"
        status, _, err = run_in_process(["get", "old.txt", str(got)], tty=False,
                                        monkeypatch=monkeypatch)  # fmt: skip
        assert (status, err) == (0, b""), err
        assert got.stat().st_mtime_ns == DATED_1960 * 10**9 + 5
        local = tmp_path / "local.txt"
        local.write_bytes(b"put\n")
        os.utime(local, ns=(DATED_1960 * 10**9 + 7, DATED_1960 * 10**9 + 9))
        status, _, err = run_in_process(["put", str(local), "put.txt"], tty=False,
                                        monkeypatch=monkeypatch)  # fmt: skip
        assert (status, err) == (0, b""), err
        st = (export / "put.txt").stat()
        assert (st.st_atime_ns, st.st_mtime_ns) == (DATED_1960 * 10**9 + 7, DATED_1960 * 10**9 + 9)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def _times(seconds: int, nsec: int = 0) -> Script:
    def script(m: c.Message, honest: Callable[[], c.Message]) -> c.Message | None:
        if isinstance(m, c.Tgetattr):
            return dataclasses.replace(  # type: ignore[type-var]
                honest(), mtime_sec=seconds, atime_sec=seconds, mtime_nsec=nsec
            )
        return None

    return script


@pytest.mark.parametrize("seconds", [2**62, 2**63 - 1, -(2**63)])
def test_times_no_calendar_can_show(
    tmp_path: Path, serve: Callable[..., HostileServer], monkeypatch: pytest.MonkeyPatch,
    seconds: int,
) -> None:
    """ls -l and stat show the count of seconds (as GNU ls and stat do); get still works."""
    export = tmp_path / "export"
    export.mkdir()
    (export / "f").write_bytes(b"data")
    serve(export, _times(seconds, 123))
    status, out, err = run_in_process(["ls", "-l"], tty=False, monkeypatch=monkeypatch)
    assert (status, err) == (0, b""), err
    assert out.endswith(f" {seconds} f\n".encode())
    status, out, err = run_in_process(["stat", "f"], tty=False, monkeypatch=monkeypatch)
    assert (status, err) == (0, b""), err
    assert f"Modify: {seconds}.000000123\n".encode() in out
    status, out, err = run_in_process(["stat", "--json", "f"], tty=False, monkeypatch=monkeypatch)
    assert (status, err) == (0, b""), err
    assert json.loads(out)["mtime_ns"] == seconds * 10**9 + 123
    status, _, err = run_in_process(["get", "f", str(tmp_path / "got")], tty=False,
                                    monkeypatch=monkeypatch)  # fmt: skip
    assert b"internal error" not in err
    if status == 0:  # the kernel clamps the time to what the file system holds
        assert (tmp_path / "got").read_bytes() == b"data"
    else:
        assert b"got: " in err and err.count(b"\n") == 1


def test_a_nanosecond_field_out_of_range_is_a_protocol_error(
    tmp_path: Path, serve: Callable[..., HostileServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "f").write_bytes(b"")
    serve(tmp_path, _times(0, 10**9))
    status, _, err = run_in_process(["stat", "f"], tty=False, monkeypatch=monkeypatch)
    assert status == 1
    assert err == (
        b"pyxen9p: stat: 9P protocol error: Rgetattr: mtime_nsec 1000000000 is not below 10^9\n"
    )
