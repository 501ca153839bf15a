"""Group "agent": ``pyxen9p serve`` in dom0 on a device served by QEMU's real 9pfs backend.

Debian 12's QEMU 7.2 serves a device's connection once; the agent holds that
one connection and multiplexes it to local programs over a Unix socket.

* Ten ``python3 -m pyxen9p.cli`` processes in a row on one device, each
  through the agent (``--via-agent``), all succeed; on a second device without
  an agent the first direct invocation succeeds and the second is refused.
* The Linux kernel's own 9P client mounts the agent's socket
  (``mount -t 9p -o trans=unix,version=9p2000.L SOCKET DIR``), reads and
  writes, and the directory QEMU exports (the share's host side, in dom0)
  shows what it wrote; a CLI process through the same agent at the same time
  sees it too.
* SIGTERM ends the agent with exit status 0; both XenBus ends are then
  Closed, its socket and lock are gone, and no event channel or grant stays
  held (almost all of gntalloc's 1024 grants can be shared again).
* ``bench/bench_realxen_agent.py``: the multiplexer's overhead against a
  direct connection to the same QEMU (tiny sizes, or the full benchmark with
  the harness's ``--bench``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import kernel_helpers
import pytest
import xenlab
from xenlab import XenbusState

import pyxen9p
from pyxen9p import agent
from pyxen9p.libs import GrantSharer

#: QEMU serves these devices: Debian 12 only (QEMU 10 serves none, see test_qemu10.py).
RELEASES = ("bookworm",)
pytestmark = pytest.mark.realxen

SRC = Path(os.environ.get("PYXEN9P_SRC", Path(__file__).resolve().parents[3]))
EXPORT_BASE = Path("/srv/share/agent")
MIB = 1 << 20


def report(line: str) -> None:
    """Print *line* and append it to ``agent.txt`` in the results folder
    (a passing test's output is not shown otherwise)."""
    print(line)
    results = os.environ.get("PYXEN9P_RESULTS")
    if results:
        with open(Path(results, "agent.txt"), "a", encoding="utf-8") as f:
            f.write(line + "\n")


def fresh_export(name: str) -> Path:
    """An empty directory under :data:`EXPORT_BASE` for QEMU to export."""
    EXPORT_BASE.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=EXPORT_BASE))
    os.chmod(path, 0o755)
    return path


def run_cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """``python3 -m pyxen9p.cli ARGS`` (a process of its own), shared tree on ``PYTHONPATH``."""
    env = dict(os.environ, PYTHONPATH=str(SRC))
    env.pop(agent.RUNTIME_ENV, None)
    return subprocess.run(
        [sys.executable, "-m", "pyxen9p.cli", *args], capture_output=True, text=True,
        timeout=timeout, env=env, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def held() -> dict[str, object]:
    """What Xen resources dom0's Python processes hold: this process's ``/dev/xen``
    descriptors and every ``python3`` event channel (``/proc/interrupts``)."""
    return {"xen_fds": xenlab.open_xen_fds(), "evtchn_irqs": xenlab.evtchn_irqs("python3")}


class AgentProcess:
    """``python3 -m pyxen9p.cli --path FRONTEND serve ARGS`` in the background.

    :ivar socket: the Unix socket it listens on (its default one unless
        ``--listen`` is among *args*)
    """

    def __init__(self, frontend: str, *args: str, socket: str | None = None) -> None:
        self.socket = socket or agent.socket_path(agent.agent_name(path=frontend))
        self.lock = self.socket[: -len(".sock")] + ".lock" if socket is None else None
        self.err = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        env = dict(os.environ, PYTHONPATH=str(SRC))
        env.pop(agent.RUNTIME_ENV, None)
        env.pop("NOTIFY_SOCKET", None)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyxen9p.cli", "--path", frontend, "serve", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.err, env=env,
        )  # fmt: skip
        self.ready_s: float | None = None

    def stderr(self) -> str:
        """What it logged so far."""
        self.err.seek(0)
        return self.err.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> float:
        """Wait until its socket exists (it appears once the device is connected).

        :returns: seconds from start
        """
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket):
            assert self.proc.poll() is None, f"the agent exited: {self.stderr()}"
            assert time.monotonic() < deadline, f"no {self.socket}: {self.stderr()}"
            time.sleep(0.1)
        self.ready_s = time.monotonic() - self.started
        return self.ready_s

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send *sig* and wait for the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"the agent did not stop within {timeout}s: {self.stderr()}")

    def close(self) -> None:
        """Kill it if it still runs (after a failed test) and free the log."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.err.close()


class ModuleLab:
    """The devices this module created; QEMU is restarted without them at its end.

    QEMU 7.2 cannot remove a device once a frontend connected to it (see
    :func:`xenlab.restart_dom0_qemu`), so devices stay (Closed) until the
    module ends.
    """

    def __init__(self) -> None:
        self.devices: list[xenlab.Dom0NinePDevice] = []
        self.exports: list[Path] = []

    def restart_qemu(self) -> int:
        """A freshly started dom0 QEMU without the devices made so far; its PID."""
        devices, self.devices = self.devices, []
        return xenlab.restart_dom0_qemu(devices)

    def device(self, export: Path, tag: str) -> xenlab.Dom0NinePDevice:
        """A new device in InitWait on *export* (frontend outside ``device/``)."""
        dev = xenlab.create_dom0_9pfs_device(export, tag, devid=kernel_helpers.fresh_devid())
        self.devices.append(dev)
        if export not in self.exports:
            self.exports.append(export)
        return dev

    def finish(self) -> None:
        """Restart QEMU without our devices and remove the exports."""
        try:
            if self.devices:
                self.restart_qemu()
        finally:
            for path in self.exports:
                shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def lab() -> Iterator[ModuleLab]:
    """This module's devices, cleaned up once at its end."""
    state = ModuleLab()
    yield state
    state.finish()


class Served:
    """One device, its export, and the agent serving it (shared by the tests in order)."""

    def __init__(self, lab: ModuleLab) -> None:
        # gntalloc's grants left by earlier groups are warmed up, then counted as the base
        with GrantSharer() as warm, warm.share_pages(0, 1):
            pass
        self.qemu = lab.restart_qemu()
        self.before = held()
        self.export = fresh_export("served")
        (self.export / "hello.txt").write_text("hello through the agent\n")
        (self.export / "sub").mkdir()
        self.device = lab.device(self.export, "agenttag")
        self.agent = AgentProcess(self.device.frontend)
        ready = self.agent.wait_ready()
        report(f"agent ready (socket {self.agent.socket}) {ready:.1f}s after start")
        self.stopped = False


@pytest.fixture(scope="module")
def served(lab: ModuleLab) -> Iterator[Served]:
    """The device and its agent; the agent is killed at the end if a test left it running."""
    state = Served(lab)
    try:
        yield state
    finally:
        state.agent.close()


# --------------------------------------------------------------------------- the CLI


def test_without_the_agent_only_the_first_invocation_works(lab: ModuleLab) -> None:
    """The contrast (on the QEMU the module started with): direct connections
    (``--direct``), one per process, and QEMU 7.2 serves a device once."""
    export = fresh_export("direct")
    (export / "f.txt").write_text("direct\n")
    dev = lab.device(export, "directtag")
    first = run_cli("--path", dev.frontend, "--direct", "cat", "f.txt")
    assert (first.returncode, first.stdout) == (0, "direct\n"), first.stderr
    second = run_cli("--path", dev.frontend, "--direct", "cat", "f.txt")
    assert second.returncode != 0 and second.stdout == ""
    assert "served a connection" in second.stderr, second.stderr
    report(f"without the agent, the second invocation: {second.stderr.strip()}")
    assert xenlab.dom0_qemu_pid() is not None, "dom0's QEMU survived"


def test_ten_cli_invocations_through_the_agent(served: Served, tmp_path: Path) -> None:
    dev, export = served.device, served.export
    assert dev.frontend_state() == XenbusState.CONNECTED
    assert dev.backend_state() == XenbusState.CONNECTED
    local = tmp_path / "up.bin"
    payload = os.urandom(300_000)
    local.write_bytes(payload)
    sel = ("--path", dev.frontend, "--via-agent")
    steps: list[tuple[tuple[str, ...], str | None]] = [
        (("ls", "/"), "hello.txt\nsub\n"),
        (("cat", "hello.txt"), "hello through the agent\n"),
        (("put", str(local), "up.bin"), None),
        (("stat", "up.bin"), None),
        (("mkdir", "made"), None),
        (("mv", "up.bin", "made/up.bin"), None),
        (("ls", "made"), "up.bin\n"),
        (("get", "made/up.bin", str(tmp_path / "down.bin")), None),
        (("rm", "made/up.bin"), None),
        (("rmdir", "made"), None),
    ]
    times = []
    for n, (args, expected) in enumerate(steps):
        started = time.monotonic()
        res = run_cli(*sel, *args)
        times.append(time.monotonic() - started)
        assert res.returncode == 0, f"invocation {n + 1} {args}: {res.stdout}{res.stderr}"
        if expected is not None:
            assert res.stdout == expected, f"invocation {n + 1} {args}"
        if args[0] == "put":
            assert (export / "up.bin").read_bytes() == payload
        elif args[0] == "stat":
            assert str(len(payload)) in res.stdout, res.stdout
        elif args[0] == "mv":
            assert (export / "made" / "up.bin").is_file() and not (export / "up.bin").exists()
        elif args[0] == "get":
            assert (tmp_path / "down.bin").read_bytes() == payload
    assert sorted(os.listdir(export)) == ["hello.txt", "sub"]
    report(
        f"10 CLI invocations through the agent: all exit 0, {sum(times):.1f}s"
        f" ({min(times):.1f}-{max(times):.1f}s each)"
    )
    # the agent still holds the one connection; the CLI found it by itself too,
    # and so does pyxen9p.connect(path=...)
    res = run_cli("--path", dev.frontend, "ls", "/")
    assert (res.returncode, res.stdout) == (0, "hello.txt\nsub\n"), res.stderr
    res = run_cli("info", "--json")
    assert res.returncode == 0, res.stderr
    assert served.agent.socket in res.stdout, res.stdout
    with pyxen9p.connect(path=dev.frontend) as fs:
        assert type(fs.transport).__name__ != "Frontend"
        assert fs.read_text("hello.txt") == "hello through the agent\n"
    assert dev.frontend_state() == XenbusState.CONNECTED
    assert served.agent.proc.poll() is None


# --------------------------------------------------------------------------- the kernel


def _mount_agent(socket: str, mnt: Path) -> None:
    xenlab.ensure_modules("9p")
    mnt.mkdir(parents=True, exist_ok=True)
    xenlab.sh(
        ["mount", "-t", "9p", "-o", "trans=unix,version=9p2000.L,cache=none", socket, str(mnt)],
        timeout=60,
    )


def _umount(mnt: Path) -> None:
    res = subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60, check=False)
    if res.returncode != 0 and kernel_helpers.mounted(mnt) is not None:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=60, check=False)


def test_the_kernel_mounts_the_agent_socket(served: Served, tmp_path: Path) -> None:
    export, mnt = served.export, tmp_path / "mnt"
    _mount_agent(served.agent.socket, mnt)
    try:
        entry = kernel_helpers.mounted(mnt)
        assert entry is not None and entry["type"] == "9p", entry
        assert kernel_helpers.mount_option(mnt, "trans") == "unix", entry
        # reads what is on the share
        assert sorted(os.listdir(mnt)) == sorted(os.listdir(export))
        assert (mnt / "hello.txt").read_text() == "hello through the agent\n"
        # writes that the host side of the share (dom0's exported directory) shows
        (mnt / "k").mkdir()
        (mnt / "k" / "note.txt").write_text("written by the kernel's 9p client\n")
        assert (export / "k" / "note.txt").read_text() == "written by the kernel's 9p client\n"
        big = os.urandom(3 * MIB + 17)
        (mnt / "k" / "big.bin").write_bytes(big)
        digest = hashlib.sha256(big).hexdigest()
        assert hashlib.sha256((export / "k" / "big.bin").read_bytes()).hexdigest() == digest
        os.chmod(mnt / "k" / "note.txt", 0o600)
        assert (export / "k" / "note.txt").stat().st_mode & 0o777 == 0o600
        os.rename(mnt / "k" / "note.txt", mnt / "k" / "renamed.txt")
        assert sorted(os.listdir(export / "k")) == ["big.bin", "renamed.txt"]
        os.symlink("renamed.txt", mnt / "k" / "link")
        assert os.readlink(export / "k" / "link") == "renamed.txt"
        # and the other way: dom0 writes, the mount reads
        other = os.urandom(2 * MIB + 5)
        (export / "k" / "from-dom0.bin").write_bytes(other)
        assert (mnt / "k" / "from-dom0.bin").read_bytes() == other
        fd = os.open(mnt / "k" / "big.bin", os.O_WRONLY)
        try:
            os.pwrite(fd, b"PATCH", MIB)
        finally:
            os.close(fd)
        assert (export / "k" / "big.bin").read_bytes()[MIB : MIB + 5] == b"PATCH"
        # another client of the same agent, at the same time, sees it all
        res = run_cli("--path", served.device.frontend, "--via-agent", "ls", "k")
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == ["big.bin", "from-dom0.bin", "link", "renamed.txt"]
        st = os.statvfs(mnt)
        assert st.f_blocks > 0
        os.unlink(mnt / "k" / "link")
        for name in os.listdir(mnt / "k"):
            os.unlink(mnt / "k" / name)
        os.rmdir(mnt / "k")
        assert not (export / "k").exists()
        report("the kernel's 9p client (trans=unix) on the agent's socket: reads and writes ok")
    finally:
        _umount(mnt)
    assert kernel_helpers.mounted(mnt) is None
    assert served.agent.proc.poll() is None, "the agent outlived the kernel's client"
    assert served.device.backend_state() == XenbusState.CONNECTED


# --------------------------------------------------------------------------- FUSE


def _tree(root: Path) -> dict[str, str]:
    """``{relative path: kind and content digest or link target}`` of *root*, in dom0."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[rel] = "link " + os.readlink(path)
        elif path.is_dir():
            found[rel] = "dir"
        else:
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def test_fuse_mount_through_the_agent(served: Served, tmp_path: Path) -> None:
    """``pyxen9p --path DEV --via-agent mount MNT`` (in the background once
    mounted), then cp -a, diff -r, find, tar and rm -r on it; the exported
    directory shows what they did; ``pyxen9p umount`` unmounts."""
    export, mnt = served.export, tmp_path / "fuse"
    xenlab.ensure_modules("fuse")
    mnt.mkdir()
    src = tmp_path / "src"
    (src / "d" / "e").mkdir(parents=True)
    (src / "a.txt").write_text("through FUSE, the agent and QEMU\n")
    (src / "d" / "big.bin").write_bytes(os.urandom(2 * MIB + 3))
    (src / "d" / "e" / "empty").write_bytes(b"")
    os.chmod(src / "d" / "e" / "empty", 0o600)
    os.symlink("../a.txt", src / "d" / "link")
    started = time.monotonic()
    res = run_cli("--path", served.device.frontend, "--via-agent", "mount", str(mnt))
    assert res.returncode == 0, res.stdout + res.stderr
    mount_s = time.monotonic() - started
    try:
        entry = kernel_helpers.mounted(mnt)
        assert entry is not None and entry["type"] == "fuse.pyxen9p", entry
        assert (mnt / "hello.txt").read_text() == "hello through the agent\n"
        xenlab.sh(["cp", "-a", str(src), str(mnt / "copy")], timeout=120)
        assert _tree(export / "copy") == _tree(src), "the share's host side differs"
        xenlab.sh(["diff", "-r", "--no-dereference", str(src), str(mnt / "copy")], timeout=120)
        found = xenlab.sh(["find", str(mnt / "copy"), "-printf", "%P %y %m\n"], timeout=60)
        expected = xenlab.sh(["find", str(src), "-printf", "%P %y %m\n"], timeout=60)
        assert sorted(found.stdout.splitlines()) == sorted(expected.stdout.splitlines())
        archive = tmp_path / "copy.tar"
        xenlab.sh(["tar", "-cf", str(archive), "-C", str(mnt), "copy"], timeout=120)
        names = xenlab.sh(["tar", "-tf", str(archive)], timeout=60).stdout.split()
        assert sorted(n.rstrip("/") for n in names) == sorted(
            ["copy", *(f"copy/{rel}" for rel in _tree(src))]
        )
        xenlab.sh(["rm", "-r", str(mnt / "copy")], timeout=60)
        assert not (export / "copy").exists()
        report(f"pyxen9p mount through the agent: mounted in {mount_s:.1f}s;"
               " cp -a, diff -r, find, tar, rm -r ok")  # fmt: skip
    finally:
        done = run_cli("umount", str(mnt))
        if kernel_helpers.mounted(mnt) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    assert kernel_helpers.mounted(mnt) is None
    assert served.agent.proc.poll() is None


# --------------------------------------------------------------------------- SIGTERM


def test_sigterm_ends_the_agent_cleanly(served: Served) -> None:
    dev, ag = served.device, served.agent
    # a client connected at that moment is told (its next request fails)
    fs = pyxen9p.connect(server=f"unix:{ag.socket}")
    try:
        assert fs.read_text("hello.txt") == "hello through the agent\n"
        started = time.monotonic()
        status = ag.stop(signal.SIGTERM)
        stop_s = time.monotonic() - started
        assert status == 0, ag.stderr()
        assert "SIGTERM: stopping" in ag.stderr()
        with pytest.raises(OSError):
            fs.read_text("hello.txt")
    finally:
        fs.close()
    report(f"SIGTERM: the agent exited 0 in {stop_s:.1f}s")
    assert dev.frontend_state() == XenbusState.CLOSED
    assert dev.backend_state() == XenbusState.CLOSED
    assert not os.path.exists(ag.socket)
    assert ag.lock is not None and not os.path.exists(ag.lock)
    assert xenlab.dom0_qemu_pid() == served.qemu, "dom0's QEMU survived"
    assert held() == served.before, "an event channel or a /dev/xen descriptor stayed held"
    # every grant the agent shared is free again: almost all of gntalloc's 1024 fit
    with GrantSharer() as sharer, sharer.share_pages(0, 1000) as pages:
        assert len(pages.refs) == 1000
    res = run_cli("info", "--json")
    assert res.returncode == 0, res.stderr
    assert ag.socket not in res.stdout
    # the device served its one connection: a direct one now is refused, QEMU lives
    res = run_cli("--path", dev.frontend, "ls", "/")
    assert res.returncode != 0, res.stdout
    assert xenlab.dom0_qemu_pid() == served.qemu


# --------------------------------------------------------------------------- figures


def _check_bench(output: str, subject: str, reference: str, names: dict[str, str]) -> None:
    """*output* has one well-formed ``name: SUBJECT=... REFERENCE=... ratio=...`` line
    for each of *names* (name -> unit), and nothing else but ``#`` comments."""
    line_re = re.compile(
        rf"(?P<name>[a-z_]+): {subject}=(?P<a>[0-9]+\.[0-9]) (?P<unit>MB/s|op/s) "
        rf"{reference}=(?P<b>[0-9]+\.[0-9]) (?P=unit) ratio=(?P<ratio>[0-9]+\.[0-9]{{3}})"
    )
    seen = {}
    for line in output.splitlines():
        if line.startswith("#"):
            continue
        match = line_re.fullmatch(line)
        assert match, f"malformed line {line!r}"
        a, b, ratio = float(match["a"]), float(match["b"]), float(match["ratio"])
        assert a > 0 and b > 0
        # the ratio is that of the unrounded rates: within the printed rates' rounding
        low, high = max(a - 0.05, 0.0) / (b + 0.05), (a + 0.05) / max(b - 0.05, 1e-9)
        assert low - 0.0005 <= ratio <= high + 0.0005, line
        seen[match["name"]] = match["unit"]
    assert seen == names


@pytest.mark.timeout(900)
def test_benchmark_the_agent_against_a_direct_connection(
    lab: ModuleLab, capsys: pytest.CaptureFixture[str]
) -> None:
    """``bench/bench_realxen_agent.py`` runs and prints well-formed ratio lines.

    Tiny sizes by default (a check that it works); the full benchmark, its
    output shown and saved as ``bench-realxen-agent.txt`` in the results
    folder, when the harness is given ``--bench``.
    """
    lab.restart_qemu()
    full = xenlab.bench_requested()
    argv = [str(SRC / "bench" / "bench_realxen_agent.py")]
    if not full:
        argv += ["--quick", "--repeat", "1", "--warmup", "0", "--ops", "10", "--size-mib", "1"]
    res = kernel_helpers.run_python(argv, timeout=850 if full else 300)
    output = res.stdout
    results = os.environ.get("PYXEN9P_RESULTS")
    if full:
        with capsys.disabled():
            print(f"\n--- bench/bench_realxen_agent.py {res.args[-1]}\n{output}{res.stderr}",
                  flush=True)
        if results:
            Path(results, "bench-realxen-agent.txt").write_text(output)
    elif results:
        Path(results, "bench-realxen-agent-quick.txt").write_text(output)
    assert res.returncode == 0, f"{res.args}\n{output}\n{res.stderr}"
    _check_bench(output, "agent", "direct",
                 {"stat": "op/s", "seq_read": "MB/s", "seq_write": "MB/s"})  # fmt: skip
    assert "# agent: msize=" in output


@pytest.mark.timeout(900)
def test_benchmark_fuse_against_the_kernel(
    lab: ModuleLab, capsys: pytest.CaptureFixture[str]
) -> None:
    """``bench/bench_realxen_fuse.py``: ``pyxen9p mount`` next to the kernel's
    9pnet_xen mount of the same share (tiny sizes by default; the full
    benchmark, shown and saved as ``bench-realxen-fuse.txt``, with ``--bench``)."""
    lab.restart_qemu()
    full = xenlab.bench_requested()
    argv = [str(SRC / "bench" / "bench_realxen_fuse.py")]
    if not full:
        argv += ["--quick", "--repeat", "1", "--warmup", "0", "--files", "20", "--size-mib", "1"]
    res = kernel_helpers.run_python(argv, timeout=850 if full else 300)
    output = res.stdout
    results = os.environ.get("PYXEN9P_RESULTS")
    name = "bench-realxen-fuse.txt" if full else "bench-realxen-fuse-quick.txt"
    if results:
        Path(results, name).write_text(output + res.stderr)
    if full:
        with capsys.disabled():
            print(f"\n--- bench/bench_realxen_fuse.py {res.args[-1]}\n{output}{res.stderr}",
                  flush=True)
    assert res.returncode == 0, f"{res.args}\n{output}\n{res.stderr}"
    _check_bench(output, "fuse", "kernel",
                 {"seq_write": "MB/s", "seq_read": "MB/s", "ls_l": "op/s"})  # fmt: skip
    # nothing is left mounted
    mounts = Path("/proc/mounts").read_text().splitlines()
    assert [m for m in mounts if " 9p " in m and "trans=xen" in m] == []
    assert [m for m in mounts if "fuse.pyxen9p" in m] == []
