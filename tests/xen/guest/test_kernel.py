"""Group "kernel": the dom0 kernel's own 9pfs frontend and pyxen9p on the same share.

One dom0 directory is exported twice by dom0's QEMU: on a
``device/9pfs/<devid>`` device that the kernel's ``9pnet_xen`` takes (mounted
``trans=xen,version=9p2000.L,cache=none``), and on a device whose frontend is
outside ``device/``, driven by pyxen9p.  Both must see the same names,
sizes, modes, mtimes, link targets and contents, and each must see what the
other changes.  The last test runs ``bench/bench_realxen.py`` (tiny sizes,
or the full benchmark when the harness is given ``--bench``).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import kernel_helpers
import pytest
import xenlab
from kernel_helpers import SideBySide, differences, snapshot_client, snapshot_local

#: QEMU serves these devices: Debian 12 only (QEMU 10 serves none, see test_qemu10.py).
RELEASES = ("bookworm",)
pytestmark = pytest.mark.realxen

MIB = 1 << 20


@pytest.fixture(scope="class")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SideBySide]:
    """The kernel's mount and a pyxen9p client on one fresh dom0 directory.

    Class-scoped: it is gone before the tests after :class:`TestSameShare`
    set up their own (the dom0 kernel did not take a second ``device/9pfs``
    device while a first one was mounted, and gntalloc's grant limit is
    shared by every pyxen9p client of dom0).
    """
    base = Path("/srv/share")
    base.mkdir(parents=True, exist_ok=True)
    share = Path(tempfile.mkdtemp(prefix="kernel-", dir=base))
    os.chmod(share, 0o755)
    mnt = tmp_path_factory.mktemp("kmnt")
    with kernel_helpers.side_by_side(share, mnt) as sbs:
        yield sbs


def _same_everywhere(sbs: SideBySide, sub: str) -> dict[str, kernel_helpers.Entry]:
    """Snapshot *sub* through dom0, the kernel's mount and pyxen9p; assert they agree."""
    local = snapshot_local(sbs.share / sub)
    kernel = snapshot_local(sbs.mnt / sub)
    ours = snapshot_client(sbs.client, sub)
    assert differences(local, kernel) == [], "kernel's view differs from dom0's"
    assert differences(local, ours) == [], "pyxen9p's view differs from dom0's"
    return local


class TestSameShare:
    """The kernel's mount and pyxen9p on one share (one set-up for the class)."""

    def test_kernel_and_pyxen9p_see_the_same_tree(self, pair: SideBySide) -> None:
        root = pair.share / "tree"
        (root / "sub" / "deep").mkdir(parents=True)
        files = {
            "empty": (b"", 0o600),
            "text.txt": (b"hello from dom0\n" * 100, 0o644),
            "big.bin": (os.urandom(MIB + 123), 0o640),
            "run.sh": (b"#!/bin/sh\necho hi\n", 0o755),
            "sub/deep/note": (b"deep\n", 0o444),
            "name with spaces \u00e9": (b"utf-8 name\n", 0o664),
        }
        for name, (data, mode) in files.items():
            (root / name).write_bytes(data)
            os.chmod(root / name, mode)
        os.symlink("text.txt", root / "link-rel")
        os.symlink("sub/deep", root / "link-dir")
        os.symlink("does/not/exist", root / "dangling")
        os.chmod(root / "sub", 0o750)
        os.chmod(root / "sub" / "deep", 0o700)
        stamp = 1_600_000_000_123_456_789
        for index, path in enumerate(
            sorted(root.rglob("*"), key=lambda p: -len(p.parts))  # children before parents
        ):
            os.utime(path, ns=(stamp, stamp + index * 1_000_003), follow_symlinks=False)
        os.utime(root, ns=(stamp, stamp - 17))

        seen = _same_everywhere(pair, "tree")
        expected_names = {".", "sub", "sub/deep", "link-rel", "link-dir", "dangling", *files}
        assert set(seen) == expected_names
        assert seen["big.bin"].size == MIB + 123
        assert seen["big.bin"].content == hashlib.sha256(files["big.bin"][0]).hexdigest()
        assert stat.S_IMODE(seen["run.sh"].mode) == 0o755
        assert stat.S_IMODE(seen["sub/deep"].mode) == 0o700
        assert seen["dangling"] == kernel_helpers.Entry(
            "link", seen["dangling"].mode, len("does/not/exist"), seen["dangling"].mtime_ns,
            "does/not/exist",
        )  # fmt: skip
        assert seen["."].mtime_ns == stamp - 17
        assert len({e.mtime_ns for e in seen.values()}) == len(seen), "mtimes are distinct"
        # a listing through each frontend, in the server's order, names the same entries
        assert sorted(os.listdir(pair.mnt / "tree")) == sorted(pair.client.listdir("tree"))


    def test_changes_through_pyxen9p_are_seen_by_the_kernel(self, pair: SideBySide) -> None:
        c, k = pair.client, pair.mnt / "p2k"
        c.mkdir("p2k", 0o755)
        assert k.is_dir()
        c.write_bytes("p2k/f", b"first version, rather long\n")
        assert (k / "f").read_bytes() == b"first version, rather long\n"
        c.write_bytes("p2k/f", b"second\n")  # shorter: a cached size or page would show
        assert (k / "f").read_bytes() == b"second\n"
        assert os.stat(k / "f").st_size == 7
        with c.open("p2k/f", "r+b") as f:
            f.seek(2)
            f.write(b"X")
        assert (k / "f").read_bytes() == b"seXond\n"
        c.chmod("p2k/f", 0o600)
        assert stat.S_IMODE(os.stat(k / "f").st_mode) == 0o600
        c.utime("p2k/f", ns=(1_500_000_000_000_000_001, 1_500_000_000_987_654_321))
        assert os.stat(k / "f").st_mtime_ns == 1_500_000_000_987_654_321
        c.symlink("f", "p2k/l")
        assert os.readlink(k / "l") == "f"
        assert (k / "l").read_bytes() == b"seXond\n"
        c.rename("p2k/f", "p2k/g")
        assert not (k / "f").exists()
        assert (k / "g").read_bytes() == b"seXond\n"
        assert not (k / "l").exists(), "the link now dangles"
        c.truncate("p2k/g", 3)
        assert (k / "g").read_bytes() == b"seX"
        c.mkdir("p2k/d")
        c.write_bytes("p2k/d/x", b"x")
        assert sorted(os.listdir(k)) == ["d", "g", "l"]
        _same_everywhere(pair, "p2k")
        c.remove("p2k/d/x")
        c.rmdir("p2k/d")
        c.remove("p2k/l")
        assert sorted(os.listdir(k)) == ["g"]
        _same_everywhere(pair, "p2k")


    def test_changes_through_the_kernel_are_seen_by_pyxen9p(self, pair: SideBySide) -> None:
        c, k = pair.client, pair.mnt / "k2p"
        os.mkdir(k, 0o755)
        assert c.is_dir("k2p")
        (k / "f").write_bytes(b"first version, rather long\n")
        assert c.read_bytes("k2p/f") == b"first version, rather long\n"
        (k / "f").write_bytes(b"second\n")
        assert c.read_bytes("k2p/f") == b"second\n"
        assert c.stat("k2p/f").st_size == 7
        fd = os.open(k / "f", os.O_WRONLY)
        try:
            os.pwrite(fd, b"X", 2)
        finally:
            os.close(fd)
        assert c.read_bytes("k2p/f") == b"seXond\n"
        os.chmod(k / "f", 0o604)
        assert stat.S_IMODE(c.stat("k2p/f").st_mode) == 0o604
        os.utime(k / "f", ns=(1_400_000_000_000_000_002, 1_400_000_000_123_000_456))
        # the kernel's v9fs keeps whole seconds when it sets times (its time
        # granularity); pyxen9p sees what the server holds, as dom0 does
        mtime = c.stat("k2p/f").st_mtime_ns
        assert mtime // 1_000_000_000 == 1_400_000_000
        assert mtime == os.stat(pair.share / "k2p" / "f").st_mtime_ns
        assert mtime == os.stat(k / "f").st_mtime_ns
        os.symlink("f", k / "l")
        assert c.readlink("k2p/l") == "f"
        assert c.read_bytes("k2p/l") == b"seXond\n"
        os.rename(k / "f", k / "g")
        assert not c.exists("k2p/f")
        assert c.read_bytes("k2p/g") == b"seXond\n"
        assert not c.exists("k2p/l"), "the link now dangles"
        os.truncate(k / "g", 3)
        assert c.read_bytes("k2p/g") == b"seX"
        os.mkdir(k / "d")
        (k / "d" / "x").write_bytes(b"x")
        assert sorted(c.listdir("k2p")) == ["d", "g", "l"]
        _same_everywhere(pair, "k2p")
        os.unlink(k / "d" / "x")
        os.rmdir(k / "d")
        os.unlink(k / "l")
        assert sorted(c.listdir("k2p")) == ["g"]
        _same_everywhere(pair, "k2p")


    def test_large_files_both_ways(self, pair: SideBySide) -> None:
        c, k = pair.client, pair.mnt
        one = os.urandom(6 * MIB + 4097)
        (k / "from-kernel.bin").write_bytes(one)
        got = c.read_bytes("from-kernel.bin")
        assert hashlib.sha256(got).digest() == hashlib.sha256(one).digest()
        two = os.urandom(5 * MIB + 1)
        c.write_bytes("from-pyxen9p.bin", two)
        assert hashlib.sha256((k / "from-pyxen9p.bin").read_bytes()).digest() == (
            hashlib.sha256(two).digest()
        )
        # a write in the middle through one side, read back through the other
        patch = os.urandom(300_000)
        with c.open("from-kernel.bin", "r+b") as f:
            f.seek(MIB + 7)
            f.write(patch)
        fd = os.open(k / "from-kernel.bin", os.O_RDONLY)
        try:
            assert os.pread(fd, len(patch) + 2, MIB + 6) == one[MIB + 6 : MIB + 7] + patch + one[
                MIB + 7 + len(patch) : MIB + 8 + len(patch)
            ]
        finally:
            os.close(fd)
        expected = one[: MIB + 7] + patch + one[MIB + 7 + len(patch) :]
        assert hashlib.sha256((pair.share / "from-kernel.bin").read_bytes()).digest() == (
            hashlib.sha256(expected).digest()
        )
        assert os.stat(k / "from-kernel.bin").st_size == len(one)
        assert c.stat("from-kernel.bin").st_size == len(one)


@pytest.fixture
def fresh_dom0_qemu() -> None:
    """A dom0 QEMU that has served no device yet: after earlier connections,
    Debian 12's QEMU 7.2 may leave a new device in InitWait for good."""
    xenlab.restart_dom0_qemu()


def test_teardown_leaves_no_mount_device_or_node(tmp_path: Path, fresh_dom0_qemu: None) -> None:
    base = Path("/srv/share")
    base.mkdir(parents=True, exist_ok=True)
    share = Path(tempfile.mkdtemp(prefix="kernel-td-", dir=base))
    (share / "a").write_bytes(b"a")
    mnt = tmp_path / "mnt"
    with kernel_helpers.side_by_side(share, mnt) as sbs:
        kdev, pdev = sbs.mount.device, sbs.device
        assert kernel_helpers.mounted(mnt) is not None
        assert kernel_helpers.mounted(mnt)["type"] == "9p"  # type: ignore[index]
        assert kernel_helpers.mount_option(mnt, "trans") == "xen"
        assert kernel_helpers.sysfs_device(kdev.devid).exists()
        assert kdev.frontend.startswith(kernel_helpers.KERNEL_FRONTEND_BASE + "/")
        assert not pdev.frontend.startswith("/local/domain/0/device/")
        assert (mnt / "a").read_bytes() == sbs.client.read_bytes("a") == b"a"
        client = sbs.client
    assert client.closed
    assert kernel_helpers.mounted(mnt) is None
    assert not kernel_helpers.sysfs_device(kdev.devid).exists()
    for dev in (kdev, pdev):
        assert xenlab.xs_read(dev.frontend) is None
        assert xenlab.xs_read(dev.backend) is None
    assert xenlab.dom0_qemu_pid() is not None, "dom0's QEMU survived"
    assert (share / "a").read_bytes() == b"a"


LINE = re.compile(
    r"(?P<name>[a-z_]+): pyxen9p=(?P<a>[0-9]+\.[0-9]) (?P<unit>MB/s|op/s|entry/s|file/s) "
    r"kernel=(?P<b>[0-9]+\.[0-9]) (?P=unit) ratio=(?P<ratio>[0-9]+\.[0-9]{3})"
)
#: ``pyxen9p=1.00 ms (user 0.50 + sys 0.50) kernel=...``: bench_realxen.py's CPU split
CPU_SPLIT = " ".join(
    rf"{side}=[0-9]+\.[0-9]{{2}} ms \(user [0-9]+\.[0-9]{{2}} \+ sys [0-9]+\.[0-9]{{2}}\)"
    for side in ("pyxen9p", "kernel")
)


def _line(pattern: str, output: str, what: str) -> re.Match[str]:
    """The line of *output* that *pattern* matches from start to end, or a
    failure naming *what* is missing, with the whole output."""
    found = re.search(f"^{pattern}$", output, re.M)
    assert found, f"no {what}:\n{output}"
    return found


@pytest.mark.timeout(900)
def test_benchmark_against_the_kernel(
    capsys: pytest.CaptureFixture[str], fresh_dom0_qemu: None
) -> None:
    """``bench/bench_realxen.py`` runs and prints six well-formed ratio lines,
    and the user/system CPU split per MB of the two sequential ones.

    Tiny sizes by default (a check that it works); the full benchmark, its
    output shown and saved as ``bench-realxen.txt`` in the results folder,
    when the harness is given ``--bench``.
    """
    src = Path(os.environ.get("PYXEN9P_SRC", Path(__file__).resolve().parents[3]))
    full = xenlab.bench_requested()
    argv = [str(src / "bench" / "bench_realxen.py"), "--syscalls", "--profile", "--floor"]
    if full:
        argv += xenlab.bench_args()
    else:
        argv += ["--quick", "--repeat", "1", "--warmup", "0", "--ops", "10", "--size-mib", "1",
                 "--entries", "20", "--tree-files", "10"]
    res = kernel_helpers.run_python(argv, timeout=850 if full else 240)
    output = res.stdout
    if full:
        with capsys.disabled():
            print(f"\n--- bench/bench_realxen.py {res.args[-1]}\n{output}{res.stderr}", flush=True)
        results = os.environ.get("PYXEN9P_RESULTS")
        if results:
            Path(results, "bench-realxen.txt").write_text(output)
    assert res.returncode == 0, f"{res.args}\n{output}\n{res.stderr}"
    lines = {}
    for line in output.splitlines():
        if line.startswith("#"):
            continue
        match = LINE.fullmatch(line)
        assert match, f"malformed line {line!r}"
        a, b, ratio = float(match["a"]), float(match["b"]), float(match["ratio"])
        assert a > 0 and b > 0
        # the ratio is that of the unrounded rates: within the printed rates' rounding
        low, high = max(a - 0.05, 0.0) / (b + 0.05), (a + 0.05) / max(b - 0.05, 1e-9)
        assert low - 0.0005 <= ratio <= high + 0.0005, line
        lines[match["name"]] = match["unit"]
    assert lines == {
        "seq_write": "MB/s", "seq_read": "MB/s", "stat": "op/s", "small_read": "op/s",
        "ls_l": "entry/s", "get_r": "file/s",
    }  # fmt: skip
    for name in ("seq_write", "seq_read"):
        _line(rf"# {name}: CPU per MB \(process\): {CPU_SPLIT}", output, f"CPU split of {name}")
    for name, unit in lines.items():
        per = unit.split("/")[0]
        _line(rf"# {name}: context switches per {per}: pyxen9p=([0-9.]+) .* kernel=([0-9.]+) .*",
              output, f"context-switch line for {name}")  # fmt: skip
        calls = _line(
            rf"# {name}: system calls per {per} \(strace -f -c, one more repetition\):"
            rf" pyxen9p=([0-9.]+) \((.*)\) kernel=([0-9.]+) \((.*)\)",
            output, f"system-call line for {name}",
        )  # fmt: skip
        _line(
            rf"# {name}: backend CPU per {per} \(dom0's QEMU, all timed repetitions,"
            rf" >= [0-9]+ ticks\): pyxen9p=([0-9.]+) (ms|us) kernel=([0-9.]+) (ms|us)",
            output, f"backend CPU line for {name}",
        )  # fmt: skip
        # every pyxen9p operation makes system calls (at least the event channel's)
        assert float(calls[1]) > 0 and float(calls[3]) > 0, calls[0]
        for side in ("pyxen9p", "kernel"):
            machine = _line(
                rf"# {name}: machine per {per} \({side}; [0-9.e+]+ {per} in [0-9.]+ s\):"
                rf" wall ([0-9.]+) (?:ms|us); busy ([0-9.]+) (?:ms|us) \([0-9]+ % of [0-9]+ CPUs:"
                rf" [^)]*\); threads (.*); switches (.*); interrupts ([0-9.]+) \(.*\)",
                output, f"machine profile of {side} for {name}",
            )  # fmt: skip
            groups = dict(re.findall(r"(?:^|; )([a-z]+) ([0-9.]+) \(", machine[3]))
            # the side's own process and the backend (dom0's QEMU) both worked,
            # and the machine was busy at least as long as this process
            assert float(groups.get("self", 0)) > 0, machine[0]
            assert float(groups.get("backend", 0)) > 0, machine[0]
            assert float(machine[2]) >= float(groups["self"]) * 0.9, machine[0]
        by_line = _line(
            rf"# {name}: pyxen9p's process by line \(sampled in that run\): [0-9.]+ (?:ms|us)"
            rf" CPU per {per}, ([0-9]+) samples; by file: (.*); top lines: (.*)",
            output, f"sampled lines for {name}",
        )  # fmt: skip
        assert int(by_line[1]) > 0 and "pyxen9p/" in by_line[2], by_line[0]
    # the floor: the leanest Python frontend on the same rings, against the kernel
    for name, per in (("seq_write", "MB"), ("seq_read", "MB"), ("stat", "op")):
        found = _line(
            rf"# {name}: the floor \(the leanest Python frontend on the same rings,"
            rf" bench/_floor\.py(?:; the client's open and close)?\): floor=([0-9.]+) {per}/s"
            rf" kernel=([0-9.]+) {per}/s ratio=([0-9.]+); CPU per {per} floor=([0-9.]+) us"
            rf" kernel=([0-9.]+) us",
            output, f"floor of {name}",
        )  # fmt: skip
        assert all(float(found[i]) > 0 for i in range(1, 6)), found[0]
        sampled = _line(
            rf"# {name}: the floor's process by line: [0-9.]+ (?:ms|us) CPU per {per},"
            rf" ([0-9]+) samples; by file: (.*); top lines: (.*)",
            output, f"the floor's sampled lines for {name}",
        )  # fmt: skip
        assert int(sampled[1]) > 0, sampled[0]
        floor_calls = _line(
            rf"# {name}: the floor's system calls per {per} \(strace -f -c, one more"
            rf" repetition\): floor=([0-9.]+) \((.*)\)",
            output, f"the floor's system calls for {name}",
        )  # fmt: skip
        assert float(floor_calls[1]) > 0, floor_calls[0]  # the event channel's at least
    assert "# pyxen9p: msize=" in output
    # the interpreter's basic costs in this domain, for reading the CPU figures
    costs = _line(
        r"# platform: us per empty call ([0-9.]+), ctypes call ([0-9.]+),"
        r" time\.monotonic\(\) ([0-9.]+),"
        r" with lock: ([0-9.]+), poll\(0\) ([0-9.]+), 1 MiB copy ([0-9]+);"
        r" Python 3\.\S+; clocksource \S+",
        output, "platform line",
    )  # fmt: skip
    assert all(float(costs[i]) > 0 for i in range(1, 7)), costs[0]
    # and what an event channel costs there, through pyxen9p's bindings
    events = _line(
        r"# event channel: us per notify ([0-9.]+); per event received (-?[0-9.]+)"
        r" \(poll (-?[0-9.]+), pending \+ unmask (-?[0-9.]+)\); loopback pair in this domain,"
        r" [0-9]+ rounds, medians of 3",
        output, "event channel line",
    )  # fmt: skip
    assert float(events[1]) > 0, events[0]
    if not full:
        with capsys.disabled():  # in every run's log: what dom0's interpreter pays
            print(f"\n{costs[0]}", flush=True)
    # it cleaned up after itself: no kernel 9pfs mount over Xen is left
    mounts = Path("/proc/mounts").read_text().splitlines()
    assert [line for line in mounts if " 9p " in line and "trans=xen" in line] == []
