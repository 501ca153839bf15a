"""The command line over 9P2000.u: ``--version-9p``; a xen-9pfsd stand-in behind ``--server``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pyxen9p
from pyxen9p.cli import main
from tests.p9.userver import UServer, serve_unix


@pytest.fixture
def useful(tmp_path: Path) -> Iterator[tuple[str, Path, UServer]]:
    """A 9P2000.u server of a directory on a Unix socket: ``(address, directory, server)``."""
    root = tmp_path / "share"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"alpha\n")
    # over a socket the client cannot tell xen-9pfsd by its backend directory, and
    # ls starts with the root's attributes: this stand-in answers that Tstat
    server = UServer(root, root_tstat_refused=False)
    sock = tmp_path / "u.sock"
    stop = serve_unix(server, sock)
    try:
        yield f"unix:{sock}", root, server
    finally:
        stop()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_the_cli_works_over_9p2000u(
    useful: tuple[str, Path, UServer], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    address, root, server = useful
    status, out, err = run(capsys, "--server", address, "ls")
    assert (status, err) == (0, "")
    assert out.split() == ["a.txt", "sub"]
    assert run(capsys, "--server", address, "cat", "a.txt")[1] == "alpha\n"
    local = tmp_path / "local.txt"
    local.write_bytes(b"from here\n")
    for i in range(8):  # more files, one after another, than the fid limit of 5
        assert run(capsys, "--server", address, "-q", "put", str(local), f"sub/n{i}")[0] == 0
    assert sorted(os.listdir(root / "sub")) == [f"n{i}" for i in range(8)]
    status, _, err = run(capsys, "--server", address, "rm", *(f"sub/n{i}" for i in range(8)))
    assert (status, err) == (0, "")
    assert os.listdir(root / "sub") == []
    status, _, err = run(capsys, "--server", address, "mv", "a.txt", "b.txt")
    assert status == 1 and "does not support Twstat" in err
    assert server.peak_fids <= 3


def test_version_9p_chooses_the_dialect(
    useful: tuple[str, Path, UServer], capsys: pytest.CaptureFixture[str]
) -> None:
    address, _, _ = useful
    status, _, err = run(capsys, "--server", address, "--version-9p", "9P2000.L", "ls")
    assert status == 1 and "not '9P2000.L'" in err
    status, out, _ = run(capsys, "--server", address, "ls", "--version-9p", "9P2000.u")
    assert status == 0 and "a.txt" in out
    status, _, err = run(capsys, "--version-9p", "9P2000", "ls")
    assert status == 2 and "invalid choice" in err


def test_version_9p_reaches_connect(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[object] = []
    real = pyxen9p.connect

    def recording(**kwargs: Any) -> Any:
        seen.append(kwargs.get("version"))
        return real(**kwargs)

    monkeypatch.setattr(pyxen9p, "connect", recording)
    assert run(capsys, "--simulate", str(tmp_path), "ls")[0] == 0
    assert run(capsys, "--simulate", str(tmp_path), "--version-9p", "9P2000.L", "ls")[0] == 0
    status, _, err = run(capsys, "--simulate", str(tmp_path), "--version-9p", "9P2000.u", "ls")
    assert status == 1 and "9P2000.u" in err  # pyxen9p's own server speaks 9P2000.L
    assert seen == ["auto", "9P2000.L", "9P2000.u"]


def test_ls_of_xen9pfsd_root_lists_it_without_its_attributes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client never asks xen-9pfsd for its root's attributes: ls lists the root anyway."""
    from pyxen9p.p9.transport import StreamTransport

    root = tmp_path / "share"
    root.mkdir()
    (root / "a.txt").write_bytes(b"alpha\n")
    server = UServer(root)  # a Tstat of the root is refused
    stop = serve_unix(server, tmp_path / "u.sock")
    monkeypatch.setattr(
        StreamTransport, "backend_path", "/local/domain/0/backend/xen_9pfs/1/0", raising=False
    )
    try:
        status, out, err = run(capsys, "--server", f"unix:{tmp_path / 'u.sock'}", "ls")
        assert (status, out.split(), err) == (0, ["a.txt"], "")
        status, _, err = run(capsys, "--server", f"unix:{tmp_path / 'u.sock'}", "stat", "/")
        assert status == 1 and "root usefully" in err
    finally:
        stop()
    assert not server.root_tstat_seen


def test_the_agent_serves_9p2000u_to_the_cli(
    useful: tuple[str, Path, UServer], tmp_path: Path
) -> None:
    """``pyxen9p serve`` in front of a 9P2000.u server: it negotiates 9P2000.u (auto)
    and the commands work through it; ``--version-9p 9P2000.L`` refuses that server."""
    import signal

    from tests.test_agent import child_env, cli, running

    address, root, server = useful
    env = child_env(tmp_path / "run")
    sock = tmp_path / "agent.sock"
    with running(["--server", address, "--version-9p", "9P2000.L", "serve", "--listen",
                  f"unix:{sock}"], env) as agent:
        assert agent.proc.wait(60) == 1
        assert "does not speak 9P2000.L" in agent.stderr()
    with running(["--server", address, "serve", "--listen", f"unix:{sock}"], env) as agent:
        agent.wait_for(sock)
        through = ("--server", f"unix:{sock}")
        r = cli(*through, "ls", env=env)
        assert (r.returncode, r.stdout.split(), r.stderr) == (0, ["a.txt", "sub"], "")
        assert cli(*through, "cat", "a.txt", env=env).stdout == "alpha\n"
        local = tmp_path / "tree"
        local.mkdir()
        for i in range(8):  # more files, one after another, than the fid limit of 5
            (local / f"n{i}").write_text(f"n{i}\n")
        r = cli(*through, "-q", "put", "-r", str(local), "sub/tree", env=env)
        assert r.returncode == 0, r.stderr
        assert sorted(os.listdir(root / "sub/tree")) == [f"n{i}" for i in range(8)]
        r = cli(*through, "rm", *(f"sub/tree/n{i}" for i in range(8)), env=env)
        assert (r.returncode, r.stderr) == (0, "")
        r = cli(*through, "mv", "a.txt", "b.txt", env=env)
        assert r.returncode == 1 and "does not support Twstat" in r.stderr
        assert agent.stop(signal.SIGTERM) == 0, agent.stderr()
        assert "9P2000.u" in agent.stderr()
    assert os.listdir(root / "sub/tree") == []
    assert server.peak_fids <= 5


def test_cli_through_the_mux_on_xen9pfsd_never_asks_the_roots_attributes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The multiplexer on a xen-9pfsd backend answers a Tstat of the root itself:
    ``ls`` of the root works, ``stat /`` says why it cannot, the backend never sees it."""
    from pyxen9p.p9.mux import MultiplexerThread
    from pyxen9p.p9.transport import StreamTransport

    root = tmp_path / "share"
    root.mkdir()
    (root / "a.txt").write_bytes(b"alpha\n")
    server = UServer(root)  # a Tstat of the root is refused
    stop = serve_unix(server, tmp_path / "u.sock")
    transport = StreamTransport.unix(str(tmp_path / "u.sock"))
    transport.backend_path = "/local/domain/0/backend/xen_9pfs/1/0"  # type: ignore[attr-defined]
    try:
        with MultiplexerThread(transport) as mux:
            path = mux.listen_unix(tmp_path / "mux.sock")
            status, out, err = run(capsys, "--server", f"unix:{path}", "ls")
            assert (status, out.split(), err) == (0, ["a.txt"], "")
            status, _, err = run(capsys, "--server", f"unix:{path}", "stat", "/")
            assert status == 1 and "root usefully" in err
            assert run(capsys, "--server", f"unix:{path}", "cat", "a.txt")[1] == "alpha\n"
            assert mux.root_tstats_refused >= 1
    finally:
        transport.close()
        stop()
    assert not server.root_tstat_seen
