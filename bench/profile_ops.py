"""Deterministic cost per operation of the caller's thread, on the simulated Xen.

Not a timed benchmark: it counts.  For each line of ``bench_realxen.py``
(``stat``, ``small_read``: ``read_bytes`` of a 4 KiB file, ``ls_l``: a
``scandir`` of 1,000 entries and each entry's ``stat(follow_symlinks=False)``,
``seq_read`` / ``seq_write``: a 16 MiB file in 1 MiB calls through an
unbuffered file) it runs the operation under :mod:`cProfile` in the calling
thread only (Python 3.11's profiler follows one thread: the simulated
backend's threads, which run the server, are not counted) and prints per
operation (per entry, per MiB):

* ``calls``: every function call the caller's thread made, Python and C;
* ``py``: the calls of Python functions among them (a frame each);
* ``pyxen9p``: calls of pyxen9p's own client-side code (``pyxen9p/`` but not
  ``pyxen9p/sim``, ``pyxen9p/p9/server.py``);
* ``sim``: calls into the simulated Xen (``pyxen9p/sim``: what the real
  libraries and the kernel do on real Xen);
* ``other``: the standard library and built-ins;
* ``clock``: ``time.monotonic``/``time.time``/``perf_counter`` calls (a
  system call each in a PV dom0 without vDSO);
* ``xen``: event-channel operations (notify, pending, unmask: an ioctl,
  read or write each on real Xen) and ``poll`` calls;
* ``locks``: explicit ``acquire`` calls (``with lock:`` is not seen by the
  profiler);
* ``rx``: every call the frontend's receiver thread made meanwhile (the
  replies it received for the caller: a thread handoff each time).

The counts move a little with the threads' timing (the simulated backend
runs in threads of the same process): each line is profiled ``--runs``
times (default 3) and the run with the median total is printed.

With ``--syscalls``, one more run of each line under ``strace -c`` attached
to the calling thread only (no ``-f``) gives its system calls per operation.
With ``--top N``, the N functions called most often for each line.

With ``--clock-sites``, one more run of each line with ``clock_gettime``
replaced (``LD_PRELOAD`` of ``bench/clock_sites.c``, built with ``gcc``)
counts the clock reads of the calling thread per operation, by kind and by
the Python line that made them.  In a PV domain whose clock has no vDSO
path each is a system call, and CPython up to 3.12 makes one on every lock
acquire (``lock``), every timeout turned into a deadline (``deadline``:
``poll``, ``Condition.wait``), every ``time.monotonic()`` (``monotonic``);
``other`` is the interpreter's own (waiting for the GIL); ``sim``: made in
the simulated Xen's code, where the real libraries make their own system
calls instead.

Usage::

    python bench/profile_ops.py [--only stat small_read ...] [--top 15] [--syscalls]
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from _common import simulated_client, strace_counts  # noqa: E402

MIB = 1 << 20
SMALL = 4096
LINES = ("stat", "small_read", "ls_l", "seq_read", "seq_write")
_PKG = os.sep + "pyxen9p" + os.sep
_SIM = _PKG + "sim" + os.sep
_SERVER = _PKG + "p9" + os.sep + "server.py"
_CLOCKS = {
    f"<built-in method time.{name}>"
    for name in ("monotonic", "time", "perf_counter", "monotonic_ns")
}
_XEN = {"notify", "pending", "unmask"}


#: The profilers of the frontend's receiver threads (see :func:`_profile_receivers`).
_RX_PROFILES: list[cProfile.Profile] = []


def _profile_receivers() -> None:
    """Run every frontend receiver thread started from now on under its own
    profiler (the calls it makes for the caller: ``rx`` in the output)."""

    def hook(_frame: object, _event: str, _arg: object) -> None:
        sys.setprofile(None)
        if threading.current_thread().name.startswith("pyxen9p-rx"):
            profiler = cProfile.Profile()
            _RX_PROFILES.append(profiler)
            profiler.enable()

    threading.setprofile(hook)  # type: ignore[arg-type]


def _rx_calls() -> int:
    """Calls made so far by the receiver threads profiled."""
    return sum(entry.callcount for p in _RX_PROFILES for entry in p.getstats())  # type: ignore[attr-defined]


def classify(stats: pstats.Stats) -> dict[str, int]:
    """Calls by kind (see the module's docstring)."""
    out = dict.fromkeys(("calls", "py", "pyxen9p", "sim", "other", "clock", "xen", "locks"), 0)
    for (filename, _line, name), (_cc, nc, _tt, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        out["calls"] += nc
        if filename != "~":
            out["py"] += nc
        if _PKG in filename and _SIM not in filename and not filename.endswith(_SERVER):
            out["pyxen9p"] += nc
        elif _SIM in filename:
            out["sim"] += nc
            if name in _XEN and filename.endswith("platform.py"):
                out["xen"] += nc
        else:
            out["other"] += nc
            if name in _CLOCKS:
                out["clock"] += nc
            elif name.startswith("<method 'poll' of 'select.poll"):
                out["xen"] += nc
            elif name.startswith("<method 'acquire' of '_thread"):
                out["locks"] += nc
    return out


def top(stats: pstats.Stats, n: int, per: float) -> list[str]:
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][1])  # type: ignore[attr-defined]
    lines = []
    for (filename, line, name), (_cc, nc, *_rest) in rows[:n]:
        where = filename if filename == "~" else f"{Path(filename).name}:{line}"
        lines.append(f"    {nc / per:8.1f}  {name}  ({where})")
    return lines


def strace_count(work: Callable[[], object]) -> tuple[int, list[tuple[str, int]]]:
    """System calls of this (main) thread during *work*: ``strace -c -p <tid>``."""
    _, total, calls = strace_counts(work, tid=threading.get_native_id())
    return total, calls


_CLOCK_SITES_ENV = "PYXEN9P_CLOCK_SITES"


def _clock_sites() -> Any:
    """The clock-site recorder preloaded into this process (``None``: not)."""
    if not os.environ.get(_CLOCK_SITES_ENV):
        return None
    lib = ctypes.CDLL(None)
    try:
        lib.pyxen9p_clock_sites_start.argtypes = [ctypes.c_char_p]
        lib.pyxen9p_clock_sites_start.restype = ctypes.c_int
        lib.pyxen9p_clock_sites_stop.restype = ctypes.c_int
    except AttributeError:
        return None
    return lib


def _run_with_clock_sites(argv: list[str]) -> int:
    """Build ``clock_sites.c`` and run this script again with it preloaded."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        print("--clock-sites needs a C compiler (gcc)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="clock-sites-") as tmp:
        shim = Path(tmp, "clock_sites.so")
        source = Path(__file__).with_name("clock_sites.c")
        subprocess.run(
            [gcc, "-shared", "-fPIC", "-O1", "-o", str(shim), str(source), "-ldl"], check=True
        )
        env = dict(os.environ)
        env["LD_PRELOAD"] = " ".join(filter(None, [str(shim), env.get("LD_PRELOAD")]))
        env[_CLOCK_SITES_ENV] = tmp
        return subprocess.run([sys.executable, __file__, *argv], env=env, check=False).returncode


def clock_sites_line(name: str, unit: str, per: float, work: Callable[[], object]) -> str:
    """Run *work* once recording the clock reads; one line: this thread's
    reads per unit, by kind and by the five most frequent sites."""
    lib = _clock_sites()
    log = Path(os.environ[_CLOCK_SITES_ENV], "log")
    if lib.pyxen9p_clock_sites_start(str(log).encode()) != 0:
        raise RuntimeError("the clock-site recorder could not start")
    try:
        work()
    finally:
        lib.pyxen9p_clock_sites_stop()
    me = str(threading.get_native_id())
    # the simulated Xen's own locks stand for the real libraries' system calls
    sim = {f.name for f in Path(_ROOT, "pyxen9p", "sim").glob("*.py")}
    kinds: Counter[str] = Counter()
    sites: Counter[str] = Counter()
    for line in log.read_text(errors="replace").splitlines():
        tid, kind, first, second = [*line.split(" "), "-", "-", "-"][:4]
        if tid != me:
            continue
        if first.split(":")[0] in sim:
            kind = "sim"
        kinds[kind] += 1
        # a lock or a wait inside the standard library: name its caller too
        where = first if not first.startswith(("threading.py", "_base.py")) else f"{first}<{second}"
        sites[f"{kind} {where}"] += 1
    total = sum(kinds.values())
    by_kind = ", ".join(f"{k} {v / per:.1f}" for k, v in kinds.most_common())
    most = ", ".join(f"{site} {n / per:.1f}" for site, n in sites.most_common(5))
    return (
        f"# {name}: clock reads per {unit} (caller's thread): {total / per:.1f}"
        f" ({by_kind}); most: {most}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=LINES, default=list(LINES))
    parser.add_argument("--ops", type=int, default=100, help="stats and small reads per line")
    parser.add_argument("--entries", type=int, default=1000, help="entries of the ls_l line")
    parser.add_argument("--size-mib", type=int, default=16, help="file of the seq_* lines")
    parser.add_argument(
        "--runs", type=int, default=3, help="profiled runs of each line (the median is printed)"
    )
    parser.add_argument("--top", type=int, default=0, help="the N functions called most")
    parser.add_argument("--syscalls", action="store_true", help="strace -c the caller's thread")
    parser.add_argument(
        "--clock-sites", action="store_true", help="count the caller's clock reads by site (gcc)"
    )
    args = parser.parse_args(argv)
    if sys.version_info >= (3, 12):
        print("profile_ops needs Python 3.11 or older (cProfile of one thread)", file=sys.stderr)
        return 2
    if args.clock_sites and _clock_sites() is None:
        return _run_with_clock_sites(sys.argv[1:] if argv is None else argv)

    with tempfile.TemporaryDirectory(prefix="profile-ops-") as tmp:
        export = Path(tmp)
        small = os.urandom(SMALL)
        (export / "small").write_bytes(small)
        listing = export / "listing"
        listing.mkdir()
        for i in range(args.entries):
            (listing / f"entry{i:05d}").write_bytes(b"x" * (i % 100))
        size = args.size_mib * MIB
        data = memoryview(os.urandom(size))
        buf = bytearray(MIB)
        (export / "seq").write_bytes(data)

        _profile_receivers()
        with simulated_client(export) as client:
            threading.setprofile(None)  # type: ignore[arg-type]

            def stat() -> None:
                for _ in range(args.ops):
                    client.stat("small")

            def small_read() -> None:
                for _ in range(args.ops):
                    if client.read_bytes("small") != small:
                        raise RuntimeError("small file read wrong")

            def ls_l() -> None:
                n = 0
                for entry in client.scandir("listing"):
                    entry.stat(follow_symlinks=False)
                    n += 1
                if n != args.entries:
                    raise RuntimeError(f"listed {n} of {args.entries}")

            def seq_read() -> None:
                total = 0
                with client.open("seq", "rb", buffering=0) as f:
                    while n := f.readinto(buf):
                        total += n
                if total != size:
                    raise RuntimeError(f"read {total} of {size}")

            def seq_write() -> None:
                with client.open("seq-w", "wb", buffering=0) as f:
                    for at in range(0, size, MIB):
                        f.write(data[at : at + MIB])

            plan: dict[str, tuple[Callable[[], None], float, str]] = {
                "stat": (stat, args.ops, "stat"),
                "small_read": (small_read, args.ops, "read"),
                "ls_l": (ls_l, args.entries, "entry"),
                "seq_read": (seq_read, args.size_mib, "MiB"),
                "seq_write": (seq_write, args.size_mib, "MiB"),
            }
            print(
                f"# simulated Xen: msize={client.msize} rings={client.transport.num_rings}"  # type: ignore[attr-defined]
                f" ring_order={client.transport.ring_order} window={client.window}"  # type: ignore[attr-defined]
                f" pipelined={client.pipelined}; caller's thread only;"
                f" Python {sys.version.split()[0]}"
            )
            for name in args.only:
                work, per, unit = plan[name]
                work()  # warm-up (caches, first allocations)
                client._session.drain_clunks()
                runs = []
                for _ in range(max(args.runs, 1)):
                    profiler = cProfile.Profile()
                    rx_before = _rx_calls()
                    profiler.enable()
                    work()
                    profiler.disable()
                    rx = _rx_calls() - rx_before
                    client._session.drain_clunks()
                    stats = pstats.Stats(profiler)
                    kinds = classify(stats)
                    kinds["rx"] = rx
                    runs.append((kinds["calls"] + rx, kinds, stats))
                # the run whose calls (caller's and receiver's) are the median:
                # the threads' timing (the machine's load) moves them a little
                runs.sort(key=lambda run: run[0])
                _, kinds, stats = runs[len(runs) // 2]
                figures = " ".join(f"{k}={v / per:.1f}" for k, v in kinds.items())
                print(f"{name}: per {unit}: {figures}")
                if args.top:
                    print("\n".join(top(stats, args.top, per)))
                if args.clock_sites:
                    print(clock_sites_line(name, unit, per, work))
                if args.syscalls:
                    total, calls = strace_count(work)
                    client._session.drain_clunks()
                    most = ", ".join(f"{call} {count / per:.1f}" for call, count in calls[:6])
                    print(f"# {name}: system calls per {unit} (caller's thread): "
                          f"{total / per:.1f} ({most})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
