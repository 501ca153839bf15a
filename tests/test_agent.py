"""The agent (``pyxen9p serve``) as a real program, and :mod:`pyxen9p.agent`.

Each agent runs as ``python -m pyxen9p.cli --simulate DIR serve ...`` in a
child process with its own runtime directory (``$PYXEN9P_RUNTIME_DIR``), and
is used by further ``pyxen9p`` programs and by :func:`pyxen9p.connect`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import pyxen9p
from pyxen9p import agent
from pyxen9p.p9 import codec as c

REPO = Path(__file__).resolve().parent.parent

#: A launcher that lets a test kill the agent's simulated backend (SIGUSR1), as
#: a SIGKILLed QEMU dies: nothing is written to XenStore, no reply ever comes.
_KILLABLE = """
import signal, sys
import pyxen9p.sim.share as share_mod
shares = []
_init = share_mod.SimulatedShare.__init__
def init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    shares.append(self)
share_mod.SimulatedShare.__init__ = init
signal.signal(signal.SIGUSR1, lambda *_: shares[0].backend.kill())
from pyxen9p.cli import main
sys.exit(main(sys.argv[1:]))
"""


def child_env(runtime: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env[agent.RUNTIME_ENV] = str(runtime)
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra)
    return env


class Agent:
    """A running ``pyxen9p serve`` child."""

    def __init__(self, argv: list[str], env: dict[str, str], *, launcher: str | None = None,
                 preexec: object = None) -> None:
        self.err = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        cmd = [sys.executable, "-c", launcher] if launcher else [sys.executable, "-m",
                                                                   "pyxen9p.cli"]
        self.proc = subprocess.Popen(
            [*cmd, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=self.err, env=env, preexec_fn=preexec,  # type: ignore[arg-type]
        )

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read().decode(errors="replace")

    def wait_for(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert self.proc.poll() is None, f"the agent exited: {self.stderr()}"
            assert time.monotonic() < deadline, f"no {path}: {self.stderr()}"
            time.sleep(0.05)

    def listening(self, runtime: Path, name: str, timeout: float = 30.0) -> list[str]:
        """The addresses the agent *name* listens on, once its lock file says."""
        lock = runtime / f"{name}.lock"
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, ValueError):
                listen = json.loads(lock.read_text()).get("listen")
                if listen:
                    return list(listen)
            assert time.monotonic() < deadline and self.proc.poll() is None, self.stderr()
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"the agent did not stop: {self.stderr()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.err.close()


@contextlib.contextmanager
def running(argv: list[str], env: dict[str, str], **kwargs: object) -> Iterator[Agent]:
    a = Agent(argv, env, **kwargs)  # type: ignore[arg-type]
    try:
        yield a
    finally:
        a.close()


def cli(*argv: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyxen9p.cli", *argv], capture_output=True, text=True,
        env=env, timeout=timeout, stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    (d / "a.txt").write_text("hello")
    (d / "sub").mkdir()
    return d


@pytest.fixture
def runtime(tmp_path: Path) -> Path:
    return tmp_path / "run"


# --------------------------------------------------------------------------
# the program


def test_ten_cli_invocations_through_the_agent_then_sigterm(
    share: Path, runtime: Path, tmp_path: Path
) -> None:
    sock = tmp_path / "agent.sock"
    env = child_env(runtime)
    with running(["--simulate", str(share), "serve", "--listen", f"unix:{sock}"], env) as a:
        a.wait_for(sock)
        assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o600
        for n in range(10):
            r = cli("--server", f"unix:{sock}", "ls", "/", env=env)
            assert (r.returncode, r.stdout.split(), r.stderr) == (0, ["a.txt", "sub"], ""), n
        assert a.stop(signal.SIGTERM) == 0, a.stderr()
        assert "SIGTERM: stopping" in a.stderr()
    assert not sock.exists()
    assert not runtime.exists() or os.listdir(runtime) == []  # the lock is removed too


def test_sigint_exits_0_and_clients_are_told(share: Path, runtime: Path) -> None:
    env = child_env(runtime)
    sock = Path(agent.socket_path(agent.agent_name(simulate=share), str(runtime)))
    with running(["--simulate", str(share), "serve"], env,
                 preexec=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as a:
        a.wait_for(sock)
        fs = pyxen9p.connect(server=f"unix:{sock}")
        try:
            assert fs.read_text("a.txt") == "hello"
            assert a.stop(signal.SIGINT) == 0, a.stderr()
            with pytest.raises(OSError):
                fs.read_text("a.txt")
        finally:
            fs.close()
    assert os.listdir(runtime) == []


def test_default_socket_discovery_ready_signal_info_and_a_second_agent(
    share: Path, runtime: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(agent.RUNTIME_ENV, str(runtime))
    notify_path = tmp_path / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    env = child_env(runtime)
    name = agent.agent_name(simulate=share)
    sock = runtime / f"{name}.sock"
    try:
        with running(["--simulate", str(share), "serve"],
                     child_env(runtime, NOTIFY_SOCKET=str(notify_path))) as a:
            ready = notify.recv(4096).decode()
            assert "READY=1" in ready.splitlines(), ready
            assert f"MAINPID={a.proc.pid}" in ready.splitlines()
            # the socket exists (and answers) by the time READY=1 is sent
            assert stat.S_ISSOCK(os.lstat(sock).st_mode)
            lock = json.loads((runtime / f"{name}.lock").read_text())
            assert lock["pid"] == a.proc.pid
            assert lock["device"]["simulate"] == str(share.resolve())
            # every command finds the agent at its default path
            for _ in range(3):
                r = cli("-v", "--simulate", str(share), "ls", "/", env=env)
                assert r.returncode == 0, r.stderr
                assert r.stdout.split() == ["a.txt", "sub"]
                assert f"using the agent at {sock}" in r.stderr
            r = cli("--simulate", str(share), "--via-agent", "cat", "a.txt", env=env)
            assert (r.returncode, r.stdout) == (0, "hello")
            r = cli("-v", "--simulate", str(share), "--direct", "cat", "a.txt", env=env)
            assert (r.returncode, r.stdout) == (0, "hello")
            assert "using the agent" not in r.stderr
            # the library does the same
            with pyxen9p.connect(simulate=share, agent="require") as fs:
                assert fs.read_text("a.txt") == "hello"
            # info lists it
            r = cli("info", "--json", env=env)
            found = json.loads(r.stdout)["agents"]["found"]
            assert [(f["socket"], f["answers"], f["locked"], f["pid"]) for f in found] == [
                (str(sock), True, True, a.proc.pid)]
            r = cli("info", env=env)
            assert f"{sock}: simulate '{share.resolve()}'" in r.stdout
            assert "answers" in r.stdout
            # a second agent for the same share refuses, before connecting anything
            r = cli("--simulate", str(share), "serve", env=env)
            assert r.returncode == 1
            assert f"another agent (pid {a.proc.pid}) holds" in r.stderr
            assert a.proc.poll() is None
            assert a.stop(signal.SIGTERM) == 0, a.stderr()
            assert "STOPPING=1" in notify.recv(4096).decode()
    finally:
        notify.close()
    assert os.listdir(runtime) == []
    r = cli("--simulate", str(share), "--via-agent", "ls", env=env)
    assert r.returncode == 1 and "no agent is running" in r.stderr
    with pytest.raises(FileNotFoundError, match="no agent is running"):
        pyxen9p.connect(simulate=share, agent="require")


def test_a_xen_device_selector_finds_its_agent_by_name_and_by_description(
    share: Path, runtime: Path
) -> None:
    """``--tag share`` finds ``tag-share.sock``; with no selector, or another one naming
    the same device, the agent whose lock file describes that device."""
    env = child_env(runtime)
    runtime.mkdir(mode=0o700)
    by_name = runtime / "tag-share.sock"
    with running(["--simulate", str(share), "serve", "--listen", f"unix:{by_name}"], env) as a:
        a.wait_for(by_name)
        r = cli("-v", "--tag", "share", "ls", env=env)  # no Xen here: only the agent serves
        assert (r.returncode, r.stdout.split()) == (0, ["a.txt", "sub"]), r.stderr
        assert f"using the agent at {by_name}" in r.stderr
        r = cli("--tag", "share", "info", "--json", env=env)
        conn = json.loads(r.stdout)["connection"]
        assert (r.returncode, conn["connected"], conn["agent"]) == (0, True, str(by_name))
        assert conn["version"] == "9P2000.L"
        r = cli("--tag", "share", "info", env=env)
        assert f"through its agent     {by_name}" in r.stdout
        r = cli("--tag", "other", "--via-agent", "ls", env=env)
        assert r.returncode == 1 and "no agent is running for tag 'other'" in r.stderr
        assert a.stop() == 0
    # an agent described by its lock file (as an agent of a Xen device writes it)
    other = runtime / "any.sock"
    with running(["--simulate", str(share), "serve", "--listen", f"unix:{other}"], env) as a, \
            agent.AgentLock(str(runtime / "any.lock")) as lock:
        lock.describe({"device": {"tag": "share", "devid": 0,
                                  "path": "/local/domain/1/device/9pfs/0"}})
        a.wait_for(other)
        for argv in (["--devid", "0"], ["--path", "/local/domain/1/device/9pfs/0"], []):
            r = cli("-v", *argv, "cat", "a.txt", env=env)
            assert (r.returncode, r.stdout) == (0, "hello"), (argv, r.stderr)
            assert f"using the agent at {other}" in r.stderr
        assert a.stop() == 0


def test_an_agent_killed_by_sigkill_leaves_nothing_that_stops_the_next(
    share: Path, runtime: Path
) -> None:
    env = child_env(runtime)
    name = agent.agent_name(simulate=share)
    sock = runtime / f"{name}.sock"
    with running(["--simulate", str(share), "serve"], env) as a:
        a.wait_for(sock)
        a.proc.kill()
        a.proc.wait()
    assert sock.exists() and (runtime / f"{name}.lock").exists()  # left behind, stale
    (stale,) = agent.list_agents([str(runtime)])
    assert (stale.answers, stale.locked) == (False, False)
    r = cli("-v", "--simulate", str(share), "cat", "a.txt", env=env)  # directly, not hanging
    assert (r.returncode, r.stdout) == (0, "hello") and "using the agent" not in r.stderr
    with running(["--simulate", str(share), "serve"], env) as a:
        deadline = time.monotonic() + 30
        while not agent.list_agents([str(runtime)])[0].answers:
            assert time.monotonic() < deadline and a.proc.poll() is None, a.stderr()
            time.sleep(0.05)
        r = cli("--simulate", str(share), "--via-agent", "cat", "a.txt", env=env)
        assert (r.returncode, r.stdout) == (0, "hello"), r.stderr
        assert a.stop() == 0
    assert os.listdir(runtime) == []


def test_many_concurrent_clients(share: Path, runtime: Path, tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"
    env = child_env(runtime)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            with pyxen9p.connect(server=f"unix:{sock}") as fs:
                data = os.urandom(100_000 + n)
                fs.write_bytes(f"w{n}", data)
                for _ in range(10):
                    assert fs.read_text("a.txt") == "hello"
                assert fs.read_bytes(f"w{n}") == data
                fs.remove(f"w{n}")
        except BaseException as exc:
            errors.append(exc)

    with running(["--simulate", str(share), "serve", "--listen", f"unix:{sock}"], env) as a:
        a.wait_for(sock)
        threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
        procs = [subprocess.Popen([sys.executable, "-m", "pyxen9p.cli", "--server",
                                   f"unix:{sock}", "cat", "a.txt"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        outs = [p.communicate(timeout=120) for p in procs]
        assert not errors, errors
        assert [(p.returncode, o) for p, (o, _) in zip(procs, outs, strict=True)] == [
            (0, b"hello")] * 4
        assert a.stop() == 0, a.stderr()
    assert sorted(p.name for p in share.iterdir()) == ["a.txt", "sub"]


def test_backend_death_gives_clients_an_error_and_the_agent_exits_1(
    share: Path, runtime: Path, tmp_path: Path
) -> None:
    sock = tmp_path / "agent.sock"
    env = child_env(runtime)
    with running(["--simulate", str(share), "serve", "--listen", f"unix:{sock}",
                  "--backend-timeout", "1"], env, launcher=_KILLABLE) as a:
        a.wait_for(sock)
        fs = pyxen9p.connect(server=f"unix:{sock}", request_timeout=60)
        try:
            assert fs.read_text("a.txt") == "hello"
            a.proc.send_signal(signal.SIGUSR1)  # the backend dies as a SIGKILLed QEMU
            time.sleep(0.5)
            started = time.monotonic()
            with pytest.raises(OSError) as info:
                fs.read_text("a.txt")
            assert time.monotonic() - started < 20  # not the client's own 60 s
            assert info.value.errno in (errno.ETIMEDOUT, errno.ECONNRESET, errno.ENOTCONN)
            assert a.proc.wait(30) == 1
        finally:
            fs.close()
        err = a.stderr()
        assert "the backend failed" in err and "unresponsive" in err, err
    assert not sock.exists()
    assert os.listdir(runtime) == []


def test_upstream_server_death_ends_an_agent_in_front_of_it(
    share: Path, runtime: Path, tmp_path: Path
) -> None:
    """``serve --server``: an agent in front of any 9P server; that server's end is its end."""
    first, second = tmp_path / "first.sock", tmp_path / "second.sock"
    env = child_env(runtime)
    with running(["--simulate", str(share), "serve", "--listen", f"unix:{first}"], env) as up:
        up.wait_for(first)
        with running(["--server", f"unix:{first}", "serve", "--listen", f"unix:{second}"],
                     env) as front:
            front.wait_for(second)
            r = cli("--server", f"unix:{second}", "cat", "a.txt", env=env)
            assert (r.returncode, r.stdout) == (0, "hello"), r.stderr
            up.proc.kill()
            up.proc.wait()
            assert front.proc.wait(30) == 1
            assert "the backend failed" in front.stderr()
        assert not second.exists()


def test_peer_credentials_refuse_another_user(share: Path, runtime: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a child as nobody")
    base = Path(tempfile.mkdtemp(prefix="pyxen9p-agent-"))
    try:
        base.chmod(0o755)
        sock = base / "agent.sock"
        env = child_env(runtime)

        def as_nobody() -> bytes:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: connect as nobody and report what it got
                try:
                    os.close(r)
                    os.setgroups([])
                    os.setgid(65534)
                    os.setuid(65534)
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.settimeout(10)
                    s.connect(str(sock))
                    s.sendall(c.encode(c.Tversion(c.NOTAG, 8192, c.VERSION_9P2000_L)))
                    got = s.recv(100)
                    os.write(w, b"reply:" + got if got else b"closed")
                except (BrokenPipeError, ConnectionResetError):
                    os.write(w, b"closed")  # refused before (or while) it wrote
                except OSError as exc:
                    os.write(w, f"error:{exc.errno}".encode())
                finally:
                    os._exit(0)
            os.close(w)
            os.waitpid(pid, 0)
            with os.fdopen(r, "rb") as f:
                return f.read()

        argv = ["--simulate", str(share), "serve", "--listen", f"unix:{sock}"]
        with running(argv, env) as a:  # default mode 0600: the file is closed to nobody
            a.wait_for(sock)
            assert as_nobody() == f"error:{errno.EACCES}".encode()
            assert a.stop() == 0
        with running([*argv, "--mode", "666"], env) as a:  # the peer check still refuses
            a.wait_for(sock)
            assert as_nobody() == b"closed"
            with pyxen9p.connect(server=f"unix:{sock}") as fs:  # root always may
                assert fs.read_text("a.txt") == "hello"
            assert a.stop() == 0
            assert "uid 65534 gid 65534" in a.stderr() and "is not allowed" in a.stderr()
        with running([*argv, "--mode", "666", "--allow-user", "nobody"], env) as a:
            a.wait_for(sock)
            assert as_nobody().startswith(b"reply:")
            assert a.stop() == 0
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def test_tcp_is_loopback_only_unless_allowed(share: Path, runtime: Path) -> None:
    env = child_env(runtime)
    r = cli("--simulate", str(share), "serve", "--listen", "tcp:0.0.0.0:0", env=env)
    assert r.returncode == 2
    assert "not a loopback address" in r.stderr and "--allow-remote" in r.stderr
    assert os.listdir(runtime) == []  # nothing left behind
    name = agent.agent_name(simulate=share)
    with running(["--simulate", str(share), "serve", "--listen", "tcp:127.0.0.1:0"], env) as a:
        (address,) = a.listening(runtime, name)
        assert address.startswith("tcp:127.0.0.1:") and not address.endswith(":0")
        r = cli("--server", address, "cat", "a.txt", env=env)
        assert (r.returncode, r.stdout) == (0, "hello"), r.stderr
        assert not (runtime / f"{name}.sock").exists()  # --listen replaces the default
        assert a.stop() == 0


def test_the_agent_raises_its_descriptor_limit(share: Path, runtime: Path, tmp_path: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 256:
        pytest.skip("the hard descriptor limit is already small")
    sock = tmp_path / "agent.sock"

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    with running(["--simulate", str(share), "serve", "--listen", f"unix:{sock}"],
                 child_env(runtime), preexec=lower) as a:
        a.wait_for(sock)
        limits = Path(f"/proc/{a.proc.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        assert line.split()[3:5] == [str(hard), str(hard)], line
        assert a.stop() == 0


# --------------------------------------------------------------------------
# what the agent reads: hostile values


@pytest.mark.parametrize("value", ["garbage", "/nonexistent/notify", "@", "@" + "x" * 200,
                                   "/" + "y" * 300])
def test_a_garbage_notify_socket_is_ignored(
    share: Path, runtime: Path, tmp_path: Path, value: str
) -> None:
    sock = tmp_path / "agent.sock"
    env = child_env(runtime, NOTIFY_SOCKET=value)
    with running(["--simulate", str(share), "serve", "--listen", f"unix:{sock}"], env) as a:
        a.wait_for(sock)
        r = cli("--server", f"unix:{sock}", "cat", "a.txt", env=child_env(runtime))
        assert (r.returncode, r.stdout) == (0, "hello")
        assert a.stop() == 0, a.stderr()


def test_socket_path_tricks_are_refused(share: Path, runtime: Path, tmp_path: Path) -> None:
    env = child_env(runtime)
    target = tmp_path / "target"
    # a symbolic link at the socket path (to a file, or to where a socket would go)
    for dest in (target, tmp_path / "missing"):
        link = tmp_path / "link.sock"
        target.write_text("keep")
        link.symlink_to(dest)
        r = cli("--simulate", str(share), "serve", "--listen", f"unix:{link}", env=env)
        assert r.returncode == 1 and "is not a socket" in r.stderr, r.stderr
        assert link.is_symlink() and target.read_text() == "keep"
        assert not (tmp_path / "missing").exists()
        link.unlink()
    # a regular file at the socket path
    plain = tmp_path / "plain.sock"
    plain.write_text("data")
    r = cli("--simulate", str(share), "serve", "--listen", f"unix:{plain}", env=env)
    assert r.returncode == 1 and "is not a socket" in r.stderr
    assert plain.read_text() == "data"
    # a live socket of another server is not taken over
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live = tmp_path / "live.sock"
    other.bind(str(live))
    other.listen(1)
    try:
        r = cli("--simulate", str(share), "serve", "--listen", f"unix:{live}", env=env)
        assert r.returncode == 1 and "already listens" in r.stderr
    finally:
        other.close()
    # a symbolic link at the lock path
    assert os.listdir(runtime) == []  # made by the refused agents, left empty
    name = agent.agent_name(simulate=share)
    (runtime / f"{name}.lock").symlink_to(target)
    r = cli("--simulate", str(share), "serve", "--listen", f"unix:{tmp_path / 's'}", env=env)
    assert r.returncode == 1 and "cannot start the agent" in r.stderr
    assert target.read_text() == "keep"
    (runtime / f"{name}.lock").unlink()
    # a runtime directory others may write into
    runtime.chmod(0o777)
    r = cli("--simulate", str(share), "serve", env=env)
    assert r.returncode == 1 and "writable by no one else" in r.stderr
    assert os.listdir(runtime) == []


def test_garbage_in_the_runtime_directory_is_shown_not_trusted(
    share: Path, runtime: Path
) -> None:
    runtime.mkdir()
    (runtime / "x.lock").write_bytes(b"\xff not json")
    (runtime / "y.lock").write_text('{"pid": "nope", "device": [1], "listen": 5}')
    (runtime / "not-a-socket.sock").write_text("")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(runtime / "y.sock"))
    stale.close()  # nobody listens
    found = agent.list_agents([str(runtime)])
    assert [(a.name, a.answers, a.locked, a.pid, a.device, a.listen) for a in found] == [
        ("y", False, False, None, {}, ())]
    assert agent.find_agent(tag="y", directories=[str(runtime)]) is None
    r = cli("info", env=child_env(runtime))
    assert "does not answer, no agent holds its lock (stale)" in r.stdout


# --------------------------------------------------------------------------
# the library


def test_parse_address() -> None:
    assert agent.parse_address("unix:/run/x.sock") == agent.Address("unix", path="/run/x.sock")
    assert agent.parse_address("tcp:localhost:564") == agent.Address(
        "tcp", host="localhost", port=564)
    assert agent.parse_address("tcp:[::1]:5640") == agent.Address("tcp", host="::1", port=5640)
    assert str(agent.parse_address("tcp:[::1]:5640")) == "tcp:[::1]:5640"
    for bad in ("", "unix:", "tcp:host", "tcp::564", "tcp:h:99999", "tcp:h:-1", "udp:h:1",
                "/run/x.sock", "unix:/a\0b", "unix:/" + "p" * 200):
        with pytest.raises(ValueError):
            agent.parse_address(bad)


def test_agent_names_are_file_names() -> None:
    assert agent.agent_name(tag="share") == "tag-share"
    assert agent.agent_name(devid=3) == "devid-3"
    for hostile in ("../../etc/passwd", "a/b", ".hidden", "x" * 300, "\n\x1b", ""):
        name = agent.agent_name(tag=hostile)
        assert "/" not in name and not name.startswith(".") and len(name) < 80
        assert name.isprintable()
    assert agent.agent_name(tag="a/b") != agent.agent_name(tag="a_b")
    assert agent.agent_name(path="/local/domain/1/device/9pfs/0").startswith("path-")
    with pytest.raises(ValueError):
        agent.agent_name()


def test_connect_argument_checks(share: Path) -> None:
    with pytest.raises(ValueError, match="server= names the server"):
        pyxen9p.connect(server="unix:/nonexistent", tag="x")
    with pytest.raises(ValueError, match="agent must be"):
        pyxen9p.connect(simulate=share, agent="sometimes")
    with pytest.raises(FileNotFoundError):
        pyxen9p.connect(server="unix:/nonexistent/socket")


def test_cli_server_option_checks(share: Path, runtime: Path) -> None:
    env = child_env(runtime)
    r = cli("--server", "unix:/x", "--tag", "t", "ls", env=env)
    assert r.returncode == 2 and "--server names the server" in r.stderr
    r = cli("--server", "nonsense", "ls", env=env)
    assert r.returncode == 2 and "not an address" in r.stderr
    r = cli("--server", "unix:/nonexistent/sock", "ls", env=env)
    assert r.returncode == 1 and "at unix:/nonexistent/sock" in r.stderr
    r = cli("--direct", "--via-agent", "ls", env=env)
    assert r.returncode == 2


def test_sd_notify_sends_a_datagram(tmp_path: Path) -> None:
    path = tmp_path / "n"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    try:
        assert agent.sd_notify("READY=1", {"NOTIFY_SOCKET": str(path)})
        assert s.recv(100) == b"READY=1"
        assert not agent.sd_notify("READY=1", {})
        assert not agent.sd_notify("READY=1", {"NOTIFY_SOCKET": "relative"})
        assert not agent.sd_notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "none")})
    finally:
        s.close()


def test_lock_is_exclusive_and_removed(tmp_path: Path) -> None:
    path = str(tmp_path / "a.lock")
    with agent.AgentLock(path) as lock:
        lock.describe({"device": {"tag": "t"}})
        second = agent.AgentLock(path)
        with pytest.raises(BlockingIOError, match=f"pid {os.getpid()}"):
            second.acquire()
        assert json.loads(Path(path).read_text())["device"] == {"tag": "t"}
    assert not os.path.exists(path)
