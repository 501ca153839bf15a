#!/usr/bin/env python3
"""pyxen9p against the Linux kernel's own Xen 9pfs frontend, on a real Xen (run in dom0).

Both frontends talk to the same backend type (dom0's QEMU, its Xen 9pfs
backend) and reach the same files: one dom0 directory is exported twice, on
a ``device/9pfs/<devid>`` device that the dom0 kernel's ``9pnet_xen`` takes
and mounts (``mount -t 9p -o trans=xen,version=9p2000.L,cache=none``), and on
a device whose frontend is outside ``device/``, driven by pyxen9p
(``pyxen9p.connect(path=...)``).  Each benchmark alternates the two sides
(see ``bench/_common.py``) and prints the median rate of each and the ratio
``pyxen9p / kernel``::

    seq_write: pyxen9p=... MB/s kernel=... MB/s ratio=...
    seq_read: pyxen9p=... MB/s kernel=... MB/s ratio=...
    stat: pyxen9p=... op/s kernel=... op/s ratio=...
    small_read: pyxen9p=... op/s kernel=... op/s ratio=...
    ls_l: pyxen9p=... entry/s kernel=... entry/s ratio=...
    get_r: pyxen9p=... file/s kernel=... file/s ratio=...

``ls_l`` lists a directory of ``--entries`` files with the attributes of
each, as ``ls -l`` does: on the kernel's mount :func:`os.scandir` and
:func:`os.lstat` of each entry, with pyxen9p its
:meth:`~pyxen9p.p9.client.Client.scandir` and
:meth:`~pyxen9p.p9.client.DirEntry.stat` of each entry.  ``get_r`` copies a
directory of ``--tree-files`` small files (0 to 4 KiB) to a new local
directory, as ``cp -r`` or ``pyxen9p get -r`` do: from the kernel's mount
:func:`shutil.copytree`, with pyxen9p
:meth:`~pyxen9p.p9.client.Client.copy_out` (each copy is removed
afterwards, outside the timing).  After each result
line a ``#`` line gives the median process CPU time per unit of each side
(all threads), and for the two sequential lines one more splits it into
user and system time per MB::

    # seq_read: CPU per MB (process): pyxen9p=... ms (user ... + sys ...)
      kernel=... ms (user ... + sys ...)

(one line).  A ``# platform:`` line first gives what an empty Python call,
a ctypes call, ``time.monotonic()``, an uncontended ``with lock:``,
``poll(0)`` and one copy
of 1 MiB cost in this domain, and its clock source: in a PV domain whose clock has no vDSO
path, every clock read is a system call, and CPython up to 3.12 reads the
clock on every lock acquire.  A ``# event channel:`` line gives what a
``notify`` and receiving one event (``poll``, ``pending``, ``unmask``) cost
there through pyxen9p's bindings, on a loopback pair.
The kernel's frontend sends in the reading process's system calls, so that
part of its work is the kernel side's system time; it reads its replies in
a kworker, which only ``--profile`` sees.  QEMU's CPU (the same backend
for both sides) is in neither figure.  A ``# <name>: backend CPU per <unit>``
line gives it: dom0's QEMU's CPU time during each side's timed
repetitions, added up (``/proc/<pid>/stat``, in 10 ms ticks, so a total
over all repetitions; the line says how many ticks the smaller side had).

With ``--profile``, one more run of each side, repeated for at least 3 s,
is watched on the whole machine (``bench/_machine_profile.py``)::

    # seq_read: machine per MB (pyxen9p; 544 MB in 3.02 s): wall ... ms;
      busy ... ms (.. % of 2 CPUs: user ..., system ..., softirq ...);
      threads self ... (caller ...); backend ... (main ..., threads ...);
      kernel ... (kworker ...); switches ...; interrupts ... (...)

(one line per side): busy CPU time by kind, CPU time by thread (this
process's from the inside; the backend's, kernel threads' and other
processes' from ``/proc``), context switches and interrupts, per unit.  It
shows work the other lines miss, such as the kernel frontend's replies read
in a kworker, and how busy the domain's CPUs were.  During pyxen9p's run a
sampling profiler (``bench/_cpu_sampler.py``: ``SIGPROF`` at the kernel's
clock ticks of process CPU time) also counts the Python line the process
was at, and a ``# <name>: pyxen9p's process by line`` line gives its CPU
per unit by file and for the busiest lines.  A sample taken in a C call
lands on the first Python line after it: the event channel's calls on
``check_minus_one`` (their ``errcheck``), the poll on ``_polled``.

With ``--floor``, ``seq_write``, ``seq_read`` and ``stat`` are measured a
third way, against the kernel again (alternately, as every pair is): the
*floor*, the leanest Python frontend on pyxen9p's own rings, doing only what
the protocol cannot do without (``bench/_floor.py``)::

    # seq_read: the floor (the leanest Python frontend on the same rings,
      bench/_floor.py; the client's open and close): floor=... MB/s
      kernel=... MB/s ratio=...; CPU per MB floor=... us kernel=... us

and, with ``--profile``, the floor's process by line; with ``--syscalls``,
its system calls per unit.  A sequential line's floor opens and closes the
file through pyxen9p's client, timed, as pyxen9p's and the kernel's are.  The difference
between pyxen9p and the floor is what pyxen9p's own layers cost; a goal the
floor misses, no Python frontend doing the same calls meets here.

``cache=none`` makes every ``read``/``write``/``stat`` on the kernel's mount
a 9P request: the transport is measured, not the page cache.  The kernel is
mounted with the msize pyxen9p negotiated (``--kernel-msize`` to change it).

It needs dom0 of a real Xen with the lab's helpers: run it through the
real-Xen harness (``docs/realxen-benchmark.rst``)::

    python3 tests/xen/run.py --group kernel --bench --pytest-args "-k benchmark"

or by hand in dom0: ``PYTHONPATH=<repo>:<repo>/tests/xen/guest python3
bench/bench_realxen.py``.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for extra in (str(REPO), str(REPO / "tests" / "xen" / "guest"), str(HERE)):
    if extra not in sys.path:
        sys.path.append(extra)

import _floor as floor  # noqa: E402
import _machine_profile as machine_profile  # noqa: E402
import kernel_helpers  # noqa: E402
import xenlab  # noqa: E402
from _common import (  # noqa: E402
    MB,
    Options,
    Result,
    Sample,
    base_parser,
    comment,
    measure_pair,
    options_from,
    report,
    strace_counts,
    timed,
)
from _cpu_sampler import CpuSampler  # noqa: E402

#: Bytes per ``read``/``write`` call on both sides.
CHUNK = 1 << 20
#: Size of the file of the small-operation benchmarks.
SMALL = 4096
#: The first fid of the floor's stats (one per ring; pyxen9p counts up from 0).
FLOOR_FID = 0x7FFF0000


class CpuSplit:
    """User and system CPU seconds of the process, per repetition (see :meth:`measure`)."""

    def __init__(self) -> None:
        self.user: list[float] = []
        self.system: list[float] = []

    @contextmanager
    def measure(self) -> Iterator[None]:
        """Record the process's user and system time spent in the block."""
        before = resource.getrusage(resource.RUSAGE_SELF)
        yield
        after = resource.getrusage(resource.RUSAGE_SELF)
        self.user.append(after.ru_utime - before.ru_utime)
        self.system.append(after.ru_stime - before.ru_stime)

    def per_unit_ms(self, units: float) -> tuple[float, float]:
        """Median user and system milliseconds per unit."""
        if not self.user:
            return 0.0, 0.0
        return (statistics.median(self.user) * 1e3 / units,
                statistics.median(self.system) * 1e3 / units)


def cpu_split_line(name: str, per: str, units: float, sides: dict[str, CpuSplit]) -> str:
    """``# <name>: CPU per <per> (process): <side>=<total> ms (user <u> + sys <s>) ...``."""
    parts = []
    for label, split in sides.items():
        user, system = split.per_unit_ms(units)
        parts.append(f"{label}={user + system:.2f} ms (user {user:.2f} + sys {system:.2f})")
    return f"# {name}: CPU per {per} (process): {' '.join(parts)}"


def median_seconds(work: Callable[[], None], runs: int = 3,
                   before: Callable[[], None] | None = None) -> float:  # fmt: skip
    """The median wall time of *runs* calls of *work* (*before* each, untimed)."""
    times = []
    for _ in range(runs):
        if before is not None:
            before()
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def platform_costs(loops: int = 20000) -> str:
    """What the interpreter's basic steps cost in this domain, for reading the
    CPU figures: an empty Python call, a ctypes call of a C function that
    makes no system call, ``time.monotonic()``, an uncontended
    ``with lock:``, a zero-timeout ``poll`` (medians of 3 runs) and one copy of
    1 MiB between two buffers (median of 5), µs each.

    CPython up to 3.12 reads ``CLOCK_MONOTONIC`` on every lock acquire, and in
    a PV domain without a vDSO clock each read is a system call: the
    difference between the first figure and the others is that call.
    """
    import ctypes
    import select
    import threading

    def nothing() -> None:
        return None

    lock = threading.Lock()
    poller = select.poll()
    monotonic = time.monotonic
    labs = ctypes.CDLL(None).labs  # a C function that makes no system call
    labs.argtypes, labs.restype = [ctypes.c_long], ctypes.c_long

    def run_ctypes() -> None:
        for _ in range(loops):
            labs(-1)

    def run_call() -> None:
        for _ in range(loops):
            nothing()

    def run_clock() -> None:
        for _ in range(loops):
            monotonic()

    def run_lock() -> None:
        for _ in range(loops):
            with lock:
                pass

    def run_poll() -> None:
        for _ in range(loops):
            poller.poll(0)

    figures = []
    for label, work in (("empty call", run_call), ("ctypes call", run_ctypes),
                        ("time.monotonic()", run_clock), ("with lock:", run_lock),
                        ("poll(0)", run_poll)):  # fmt: skip
        figures.append(f"{label} {median_seconds(work) / loops * 1e6:.2f}")
    # one copy of 1 MiB between two buffers (what a read or a write pays per MiB
    # for each copy it makes)
    src, dst = bytes(1 << 20), bytearray(1 << 20)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(16):
            dst[:] = src
        times.append((time.perf_counter() - start) / 16)
    figures.append(f"1 MiB copy {statistics.median(times) * 1e6:.0f}")
    try:
        source = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")
        clock = source.read_text().strip() or "?"
    except OSError:
        clock = "?"
    return (
        f"platform: us per {', '.join(figures)}; Python {sys.version.split()[0]};"
        f" clocksource {clock}"
    )


def event_costs(rounds: int = 300) -> str:
    """What an event channel costs in this domain, through pyxen9p's own
    bindings and poll (what the frontend does per message), µs each, medians
    of 3 runs of *rounds*: a ``notify`` (``xenevtchn_notify``: an ioctl and
    a hypercall), and receiving one event: ``poll`` of the handle's fd until
    readable, ``pending`` (a ``read``) and ``unmask`` (a ``write``).  The two
    ends are one loopback pair in this domain (an unbound port and a second
    handle bound to it).  The kernel's own frontend takes its events in an
    interrupt handler instead: no system call."""
    from pyxen9p.libs._poll import one_fd_poller
    from pyxen9p.libs.xenevtchn import EventChannel

    with EventChannel() as receiver, EventChannel() as sender:
        port = receiver.bind_unbound_port(0)
        remote = sender.bind_interdomain(0, port)
        poll = one_fd_poller(receiver.fileno())

        def notify_only() -> None:  # the port stays masked after the first event
            for _ in range(rounds):
                sender.notify(remote)

        def drain() -> None:
            while poll(0) > 0:
                receiver.unmask(receiver.pending())

        def without_poll() -> None:
            for _ in range(rounds):
                sender.notify(remote)
                receiver.unmask(receiver.pending())

        def whole() -> None:
            for _ in range(rounds):
                sender.notify(remote)
                if poll(1000) <= 0:
                    raise RuntimeError("a loopback event did not arrive within 1 s")
                receiver.unmask(receiver.pending())

        costs = {
            label: median_seconds(work, before=drain) / rounds * 1e6
            for label, work in (("notify", notify_only), ("no poll", without_poll),
                                ("event", whole))
        }  # fmt: skip
        drain()
    received = costs["event"] - costs["notify"]
    polled = costs["event"] - costs["no poll"]
    return (
        f"event channel: us per notify {costs['notify']:.1f}; per event received"
        f" {received:.1f} (poll {polled:.1f}, pending + unmask {received - polled:.1f});"
        f" loopback pair in this domain, {rounds} rounds, medians of 3"
    )


def kernel_ls_l(directory: Path) -> int:
    """``ls -l`` on the kernel's mount: the entries, each lstat'ed; their count."""
    count = 0
    with os.scandir(directory) as it:
        for entry in it:
            os.lstat(entry.path)
            count += 1
    return count


def pyxen9p_ls_l(client: Any, directory: str) -> int:
    """``ls -l`` with pyxen9p: scandir and each entry's attributes; their count."""
    count = 0
    for entry in client.scandir(directory):
        entry.stat(follow_symlinks=False)
        count += 1
    return count


def _kernel_write(path: Path, data: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for at in range(0, data.nbytes, CHUNK):
            piece = data[at : at + CHUNK]
            done = 0
            while done < piece.nbytes:
                done += os.write(fd, piece[done:])
    finally:
        os.close(fd)


def _kernel_read(path: Path, buf: bytearray) -> int:
    total = 0
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            got = os.readv(fd, [view])
            if not got:
                return total
            total += got
    finally:
        os.close(fd)


class BackendCpu:
    """CPU time of the backend's process (dom0's QEMU) during each side's
    timed repetitions, added up: ``utime + stime`` of ``/proc/<pid>/stat``,
    which counts the threads that ended too, in clock ticks (10 ms at
    ``USER_HZ`` 100, so a total over every repetition, not a median)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.tick = 1.0 / os.sysconf("SC_CLK_TCK")
        self.seconds: dict[str, float] = {}
        self.units: dict[str, float] = {}

    def _now(self) -> float | None:
        if self.pid is None:
            return None
        try:
            return machine_profile.cpu_ticks(Path(f"/proc/{self.pid}/stat").read_text()) * self.tick
        except (OSError, IndexError):
            return None

    def wrap(self, side: str, work: Callable[[], Sample]) -> Callable[[], Sample]:
        """*work*, adding the backend's CPU meanwhile to *side*'s total."""

        def measured() -> Sample:
            before = self._now()
            sample = work()
            after = self._now()
            if before is not None and after is not None:
                self.seconds[side] = self.seconds.get(side, 0.0) + after - before
                self.units[side] = self.units.get(side, 0.0) + sample.units
            return sample

        return measured

    def line(self, name: str, per: str, subject: str, reference: str) -> str | None:
        """``# <name>: backend CPU per <per> (dom0's QEMU, ...): ...`` or ``None``."""
        if not all(self.units.get(side) for side in (subject, reference)):
            return None
        unit, scale, digits = ("ms", 1e3, 2) if per == "MB" else ("us", 1e6, 0)
        figures = " ".join(
            f"{side}={self.seconds[side] * scale / self.units[side]:.{digits}f} {unit}"
            for side in (subject, reference)
        )
        ticks = min(self.seconds[side] for side in (subject, reference)) / self.tick
        return (
            f"# {name}: backend CPU per {per} (dom0's QEMU, all timed repetitions,"
            f" >= {ticks:.0f} ticks): {figures}"
        )


def sampled(sampler: CpuSampler, work: Callable[[], Sample]) -> Callable[[], Sample]:
    """*work* with *sampler* on while it runs."""

    def run() -> Sample:
        with sampler:
            return work()

    return run


def count_syscalls(work: Callable[[], Sample]) -> tuple[float, int, list[tuple[str, int]]]:
    """Run *work* once with ``strace -f -c`` attached to this process.

    :returns: the units *work* did, the system calls made meanwhile by all
        of this process's threads, and the most frequent ones with their counts
    """
    sample, total, calls = strace_counts(work, tid=os.getpid(), follow=True, settle=0.5)
    return sample.units, total, calls[:5]


def syscall_line(
    name: str, per: str, traced: dict[str, tuple[float, int, list[tuple[str, int]]]]
) -> str:
    """A ``#`` comment with each side's system calls per unit and the most frequent ones."""
    sides = []
    for side, (units, total, top) in traced.items():
        most = ", ".join(f"{call} {count / units:.1f}" for call, count in top)
        sides.append(f"{side}={total / units:.1f} ({most})")
    return f"# {name}: system calls per {per} (strace -f -c, one more repetition): " + " ".join(
        sides
    )


def floor_lines(
    name: str,
    per: str,
    subject: Callable[[], Sample],
    reference: Callable[[], Sample],
    options: Options,
    profile_seconds: float,
    syscalls: bool = False,
) -> list[str]:
    """The floor of *name* (``bench/_floor.py``: the leanest Python frontend
    on pyxen9p's rings) against the kernel, measured alternately as every
    pair is; with *profile_seconds*, the floor's process by line in one more
    run, repeated for at least that long (not timed); with *syscalls*, its
    system calls in one more run (not timed)."""
    sub, ref = measure_pair(subject, reference, options)
    result = Result(name, "floor", "kernel", per, sub, ref)
    untimed = "; the client's open and close" if per == "MB" else ""
    lines = [
        f"# {name}: the floor (the leanest Python frontend on the same rings,"
        f" bench/_floor.py{untimed}): {result.line().split(': ', 1)[1]};"
        f" CPU per {per} floor={result.subject_cpu * 1e6:.1f} us"
        f" kernel={result.reference_cpu * 1e6:.1f} us"
    ]
    if profile_seconds:
        sampler = CpuSampler()
        units = 0.0
        began = time.monotonic()
        with sampler:
            while time.monotonic() - began < profile_seconds:
                units += subject().units
        lines.append(f"# {name}: the floor's process by line: {sampler.report(units, per)}")
    if syscalls:
        units, total, top = count_syscalls(subject)
        most = ", ".join(f"{call} {count / units:.1f}" for call, count in top)
        lines.append(
            f"# {name}: the floor's system calls per {per} (strace -f -c, one more"
            f" repetition): floor={total / units:.1f} ({most})"
        )
    return lines


def run(
    args_size_mib: int,
    ops: int,
    kernel_msize: int | None,
    options: Options,
    entries: int = 1000,
    syscalls: bool = False,
    layout: dict[str, int] | None = None,
    profile_seconds: float = 0.0,
    with_floor: bool = False,
    tree_files: int = 200,
) -> list[Result]:
    """Set both frontends up on a fresh dom0 directory, measure, tear everything down.

    :param args_size_mib: size of the sequential file in MiB
    :param ops: operations per repetition of the small-operation benchmarks
    :param kernel_msize: the kernel mount's msize (``None``: pyxen9p's)
    :param entries: files in the directory of the ``ls_l`` benchmark
    :param layout: ``rings`` / ``ring_order`` for ``pyxen9p.connect`` (default: its choice)
    :param profile_seconds: when not 0, profile the whole machine during one
        more run of each side, repeated for at least that long (not timed)
    :param with_floor: also measure the floor (``bench/_floor.py``) of
        seq_write, seq_read and stat against the kernel, alternately
    :param tree_files: files of the tree the ``get_r`` benchmark copies
    :returns: the six results
    """
    out = sys.stdout
    base = Path("/srv/share")
    base.mkdir(parents=True, exist_ok=True)
    share = Path(tempfile.mkdtemp(prefix="bench-", dir=base))
    mnt = Path(tempfile.mkdtemp(prefix="bench-mnt-"))
    copies = Path(tempfile.mkdtemp(prefix="bench-copies-"))  # get_r's local copies
    loaded = kernel_helpers.load_kernel_9p()
    size = args_size_mib << 20
    data = memoryview(os.urandom(size))
    buf = bytearray(CHUNK)
    small = os.urandom(SMALL)
    results: list[Result] = []
    try:
        with kernel_helpers.pyxen9p_client(share, tag="benchp", **(layout or {})) as (_, client):
            msize = kernel_msize or client.msize
            opts = f"{kernel_helpers.KERNEL_MOUNT_OPTIONS},msize={msize}"
            with kernel_helpers.kernel_mount(share, mnt, "benchk", options=opts) as km:
                comment(
                    f"pyxen9p: msize={client.msize} rings={client.transport.num_rings}"  # type: ignore[attr-defined]
                    f" ring_order={client.transport.ring_order}"  # type: ignore[attr-defined]
                    f" window={client.window}; kernel: msize={km.msize}"
                    f" options={kernel_helpers.mounted(mnt)}",
                    out,
                )
                comment(platform_costs(), out)
                comment(event_costs(), out)
                comment(
                    f"file {size} bytes in {CHUNK}-byte calls; {ops} ops of each small kind;"
                    f" {entries} entries listed; {options.repeat} repetitions (median),"
                    f" {options.warmup} warm-up; pipelined={client.pipelined}",
                    out,
                )
                (share / "small").write_bytes(small)
                listing = share / "listing"
                listing.mkdir()
                for i in range(entries):
                    (listing / f"entry{i:05d}").write_bytes(b"x" * (i % 100))
                tree = share / "tree"
                tree.mkdir()
                for i in range(tree_files):
                    (tree / f"file{i:04d}").write_bytes(os.urandom(i * 37 % 4097))
                cpu = {name: {"pyxen9p": CpuSplit(), "kernel": CpuSplit()}
                       for name in ("seq_write", "seq_read")}

                def p_write() -> Sample:
                    with (
                        cpu["seq_write"]["pyxen9p"].measure(),
                        timed(size / MB) as t,
                        client.open("seq-p", "wb", buffering=0) as f,
                    ):
                        for at in range(0, size, CHUNK):
                            f.write(data[at : at + CHUNK])
                    return t.sample

                def k_write() -> Sample:
                    with cpu["seq_write"]["kernel"].measure(), timed(size / MB) as t:
                        _kernel_write(mnt / "seq-k", data)
                    return t.sample

                def p_read() -> Sample:
                    total = 0
                    with (
                        cpu["seq_read"]["pyxen9p"].measure(),
                        timed(size / MB) as t,
                        client.open("seq-p", "rb", buffering=0) as f,
                    ):
                        while n := f.readinto(buf):
                            total += n
                    if total != size:
                        raise RuntimeError(f"pyxen9p read {total} bytes of {size}")
                    return t.sample

                def k_read() -> Sample:
                    with cpu["seq_read"]["kernel"].measure(), timed(size / MB) as t:
                        total = _kernel_read(mnt / "seq-k", buf)
                    if total != size:
                        raise RuntimeError(f"the kernel read {total} bytes of {size}")
                    return t.sample

                def p_stat() -> Sample:
                    with timed(ops) as t:
                        for _ in range(ops):
                            client.stat("small")
                    return t.sample

                def k_stat() -> Sample:
                    path = mnt / "small"
                    with timed(ops) as t:
                        for _ in range(ops):
                            os.stat(path)
                    return t.sample

                def p_small() -> Sample:
                    with timed(ops) as t:
                        for _ in range(ops):
                            got = client.read_bytes("small")
                    if got != small:
                        raise RuntimeError("pyxen9p read the small file wrong")
                    return t.sample

                def k_small() -> Sample:
                    path = mnt / "small"
                    with timed(ops) as t:
                        for _ in range(ops):
                            with open(path, "rb", buffering=0) as f:
                                got = f.read()
                    if got != small:
                        raise RuntimeError("the kernel read the small file wrong")
                    return t.sample

                def p_ls() -> Sample:
                    with timed(entries) as t:
                        n = pyxen9p_ls_l(client, "listing")
                    if n != entries:
                        raise RuntimeError(f"pyxen9p listed {n} entries of {entries}")
                    return t.sample

                def k_ls() -> Sample:
                    with timed(entries) as t:
                        n = kernel_ls_l(mnt / "listing")
                    if n != entries:
                        raise RuntimeError(f"the kernel listed {n} entries of {entries}")
                    return t.sample

                # the floor's data path, the file opened and closed by the
                # client (timed: pyxen9p's and the kernel's are)
                def f_write() -> Sample:
                    with timed(size / MB) as t, client.open("seq-f", "wb", buffering=0) as f:
                        fid, count = f.fid, f.iounit
                        with floor.LeanRings(client.transport) as lean:  # type: ignore[arg-type]
                            for at in range(0, size, CHUNK):
                                part = data[at : at + CHUNK]
                                if floor.write_file(lean, fid, at, part, count) != len(part):
                                    raise RuntimeError("the floor wrote short")
                    return t.sample

                def f_read() -> Sample:
                    total = 0
                    view = memoryview(buf)
                    with timed(size / MB) as t, client.open("seq-p", "rb", buffering=0) as f:
                        fid, count = f.fid, f.iounit
                        with floor.LeanRings(client.transport) as lean:  # type: ignore[arg-type]
                            while n := floor.read_file(lean, fid, total, view, count):
                                total += n
                    if total != size:
                        raise RuntimeError(f"the floor read {total} bytes of {size}")
                    return t.sample

                def f_stat() -> Sample:
                    root = client._session.root_fid
                    rings = client.transport.num_rings  # type: ignore[attr-defined]
                    with floor.LeanRings(client.transport) as lean, timed(ops) as t:  # type: ignore[arg-type]
                        for i in range(ops):
                            st = floor.stat_file(lean, root, b"small", FLOOR_FID + i % rings, i)
                    if st[9] != SMALL:
                        raise RuntimeError(f"the floor's stat gave size {st[9]}, not {SMALL}")
                    return t.sample

                def copied(make: Callable[[Path], object]) -> Sample:
                    dst = Path(tempfile.mkdtemp(dir=copies)) / "tree"
                    with timed(tree_files) as t:
                        make(dst)
                    n = len(os.listdir(dst))
                    shutil.rmtree(dst.parent)
                    if n != tree_files:
                        raise RuntimeError(f"{n} files copied of {tree_files}")
                    return t.sample

                def p_getr() -> Sample:
                    return copied(lambda dst: client.copy_out("tree", dst))

                def k_getr() -> Sample:
                    return copied(lambda dst: shutil.copytree(mnt / "tree", dst))

                floors = {"seq_write": f_write, "seq_read": f_read, "stat": f_stat}
                plan: list[tuple[str, str, Callable[[], Sample], Callable[[], Sample]]] = [
                    ("seq_write", "MB", p_write, k_write),
                    ("seq_read", "MB", p_read, k_read),
                    ("stat", "op", p_stat, k_stat),
                    ("small_read", "op", p_small, k_small),
                    ("ls_l", "entry", p_ls, k_ls),
                    ("get_r", "file", p_getr, k_getr),
                ]
                for name, per, subject, reference in plan:
                    backend = BackendCpu(xenlab.dom0_qemu_pid())
                    sub, ref = measure_pair(
                        backend.wrap("pyxen9p", subject), backend.wrap("kernel", reference), options
                    )
                    traced = (
                        {"pyxen9p": count_syscalls(subject), "kernel": count_syscalls(reference)}
                        if syscalls else None
                    )
                    profiles = {}
                    sampler = CpuSampler()
                    if profile_seconds:
                        for side, work in (("pyxen9p", sampled(sampler, subject)),
                                           ("kernel", reference)):  # fmt: skip
                            profiles[side] = machine_profile.profile(
                                work, backend=backend.pid, min_seconds=profile_seconds
                            )
                    result = Result(
                        name, "pyxen9p", "kernel", per, sub, ref,
                        {"size": size, "chunk": CHUNK, "ops": ops, "small": SMALL,
                         "entries": entries, "pyxen9p_msize": client.msize,
                         "kernel_msize": km.msize},
                    )  # fmt: skip
                    print(result.line(), file=out, flush=True)
                    print(result.cpu_line(), file=out, flush=True)
                    print(result.switch_line(), file=out, flush=True)
                    threads = result.thread_line()
                    if threads is not None:
                        print(threads, file=out, flush=True)
                    backend_line = backend.line(name, per, "pyxen9p", "kernel")
                    if backend_line is not None:
                        print(backend_line, file=out, flush=True)
                    for side, prof in profiles.items():
                        print(machine_profile.profile_line(name, per, side, prof), file=out,
                              flush=True)  # fmt: skip
                    if profiles:
                        print(f"# {name}: pyxen9p's process by line (sampled in that run):"
                              f" {sampler.report(profiles['pyxen9p'].units, per)}", file=out,
                              flush=True)  # fmt: skip
                    if traced is not None:
                        print(syscall_line(name, per, traced), file=out, flush=True)
                        result.params["syscalls_per_unit"] = {
                            side: {"total": total / units, **{k: v / units for k, v in top}}
                            for side, (units, total, top) in traced.items()
                        }
                    if name in cpu:
                        line = cpu_split_line(name, "MB", size / MB, cpu[name])
                        print(line, file=out, flush=True)
                        for label, split in cpu[name].items():
                            user, system = split.per_unit_ms(size / MB)
                            result.params[f"{label}_user_ms_per_mb"] = user
                            result.params[f"{label}_sys_ms_per_mb"] = system
                    if with_floor and name in floors:
                        for line in floor_lines(name, per, floors[name], reference, options,
                                                profile_seconds, syscalls):  # fmt: skip
                            print(line, file=out, flush=True)
                    results.append(result)
                    if name == "seq_write":
                        # both files hold what was written (checked once, untimed)
                        for written in ("seq-p", "seq-k", "seq-f")[: 3 if with_floor else 2]:
                            if (share / written).read_bytes() != data:
                                raise RuntimeError(f"{written} does not hold the data written")
    finally:
        kernel_helpers.unload_modules(loaded)
        shutil.rmtree(share, ignore_errors=True)
        shutil.rmtree(mnt, ignore_errors=True)
        shutil.rmtree(copies, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point; see ``--help``."""
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--size-mib", type=int, default=None,
                        help="sequential file size in MiB (default 16; 2 with --quick)")
    parser.add_argument("--ops", type=int, default=None,
                        help="small operations per repetition (default 100; 20 with --quick)")
    parser.add_argument("--entries", type=int, default=None,
                        help="files listed by ls_l (default 1000; 50 with --quick)")
    parser.add_argument("--kernel-msize", type=int, default=None,
                        help="msize of the kernel mount (default: the msize pyxen9p negotiated)")
    parser.add_argument("--rings", type=int, default=None,
                        help="pyxen9p's rings (default: the frontend's choice)")
    parser.add_argument("--ring-order", type=int, default=None,
                        help="pyxen9p's ring order (default: the frontend's choice)")
    parser.add_argument("--syscalls", action="store_true",
                        help="also count each side's system calls per unit: one more"
                             " repetition of each, under strace -f -c (not timed)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the whole machine (every thread's CPU and context"
                             " switches, the CPUs' time by kind, interrupts) during one more run"
                             " of each side, repeated for 3 s (0.2 s with --quick; not timed)")
    parser.add_argument("--tree-files", type=int, default=None,
                        help="files of the tree get_r copies (default 200; 20 with --quick)")
    parser.add_argument("--floor", action="store_true",
                        help="also measure the floor of seq_write, seq_read and stat against"
                             " the kernel: the leanest Python frontend on the same rings"
                             " (bench/_floor.py)")
    parser.set_defaults(repeat=None)
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 2 if args.quick else 5
    options = options_from(args)
    if not xenlab.is_dom0():
        raise SystemExit("bench_realxen.py runs in dom0 of a real Xen (see its --help)")
    size = args.size_mib or (2 if options.quick else 16)
    ops = args.ops or (20 if options.quick else 100)
    entries = args.entries or (50 if options.quick else 1000)
    layout = {k: v for k, v in (("rings", args.rings), ("ring_order", args.ring_order))
              if v is not None}  # fmt: skip
    seconds = (0.2 if options.quick else 3.0) if args.profile else 0.0
    tree_files = args.tree_files or (20 if options.quick else 200)
    results = run(size, ops, args.kernel_msize, options, entries, args.syscalls, layout, seconds,
                  args.floor, tree_files)
    report(results, args.json, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
