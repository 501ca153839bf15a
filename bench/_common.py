"""Shared machinery of the pyxen9p benchmarks: paired measurement and output.

Every benchmark measures a *subject* (something pyxen9p does) and a
*reference* (the same work done the plainest way) in the same process, in
alternating repetitions, and reports the median rate of each and their ratio
``subject / reference``.  Absolute rates depend on the machine; the ratio is
what can be compared between machines and between versions.

Output: one line per benchmark, in the form::

    <name>: <label>=<rate> <unit> <label>=<rate> <unit> ratio=<ratio>

plus comment lines starting with ``#`` (parameters, process CPU time per
unit).  With ``--json PATH`` the same results are also written as one JSON
document (``-``: standard output, and the text lines go to standard error).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

# Running ``python bench/<script>.py`` from a checkout without installing the
# package: make the repository root importable (harmless when installed).
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

__all__ = [
    "MB",
    "Options",
    "Result",
    "Sample",
    "Timer",
    "base_parser",
    "comment",
    "environment",
    "file_system",
    "measure_pair",
    "options_from",
    "report",
    "simulated_client",
    "strace_counts",
    "thread_cpu",
    "thread_group",
    "timed",
]

#: Bytes in the megabyte of the ``MB/s`` figures (decimal, as ``dd`` prints).
MB = 1_000_000


@dataclass(frozen=True)
class Sample:
    """One timed repetition.

    :ivar units: what was done (megabytes, round trips)
    :ivar wall: elapsed seconds (``time.perf_counter``)
    :ivar cpu: CPU seconds of the whole process meanwhile, all threads
        (``time.process_time``); less sensitive than *wall* to other load on
        the machine
    """

    units: float
    wall: float
    cpu: float
    #: CPU seconds meanwhile by group of threads (:func:`thread_group`), and
    #: ``exited`` for threads that ended before the sample did (their CPU is
    #: in *cpu* but no longer readable per thread)
    threads: dict[str, float] = field(default_factory=dict)
    #: context switches of the whole process meanwhile, all threads
    #: (``getrusage``: voluntary, involuntary)
    switches: tuple[int, int] = (0, 0)

    @property
    def rate(self) -> float:
        """Units per second of wall-clock time."""
        return self.units / max(self.wall, 1e-9)

    @property
    def cpu_per_unit(self) -> float:
        """CPU seconds per unit."""
        return self.cpu / self.units


#: ``() -> Sample``: one timed repetition (see :class:`timed`).
Timer = Callable[[], Sample]

#: Thread-name prefixes and the group each belongs to, first match wins.
THREAD_GROUPS: tuple[tuple[str, str], ...] = (
    ("MainThread", "caller"),
    ("bench-caller", "caller"),
    ("pyxen9p-rx", "frontend_rx"),
    ("pyxen9p-io", "client_workers"),
    ("pyxen9p-tree", "client_workers"),
    ("sim9pfs-ring", "backend_server"),
    ("sim9pfs-be", "backend_control"),
    ("bench-", "reference_peer"),
)


def thread_group(name: str) -> str:
    """The group of a thread named *name* (:data:`THREAD_GROUPS`; else ``other``)."""
    for prefix, group in THREAD_GROUPS:
        if name.startswith(prefix):
            return group
    return "other"


def thread_cpu() -> dict[tuple[int, int | None], tuple[str, float]]:
    """CPU seconds used so far by each live thread, read from its own CPU
    clock (``pthread_getcpuclockid``): ``{(ident, native id): (name, seconds)}``.
    Empty where the platform has no per-thread clocks."""
    clocks: dict[tuple[int, int | None], tuple[str, float]] = {}
    getclock = getattr(time, "pthread_getcpuclockid", None)
    if getclock is None:
        return clocks
    for thread in threading.enumerate():
        ident = thread.ident
        if ident is None:
            continue
        try:
            seconds = time.clock_gettime(getclock(ident))
        except (OSError, OverflowError, ValueError):  # it ended meanwhile
            continue
        clocks[(ident, thread.native_id)] = (thread.name, seconds)
    return clocks


def split_cpu(
    before: dict[tuple[int, int | None], tuple[str, float]],
    after: dict[tuple[int, int | None], tuple[str, float]],
    process: float,
) -> dict[str, float]:
    """CPU seconds between two :func:`thread_cpu` snapshots by thread group;
    ``exited``: the rest of *process* (threads that ended meanwhile)."""
    if not after:
        return {}
    groups: dict[str, float] = {}
    for key, (name, seconds) in after.items():
        start = before[key][1] if key in before else 0.0
        group = thread_group(name)
        groups[group] = groups.get(group, 0.0) + max(seconds - start, 0.0)
    groups["exited"] = max(process - sum(groups.values()), 0.0)
    return groups


class timed:
    """Time a block in wall-clock and process CPU time::

        with timed(units) as t:
            work()
        return t.sample

    :param units: what the block does (megabytes, round trips)
    """

    def __init__(self, units: float) -> None:
        self.units = units
        self._wall = self._cpu = 0.0
        #: The measurement, set when the block ends.
        self.sample = Sample(units, 0.0, 0.0)

    def __enter__(self) -> timed:
        self._threads = thread_cpu()
        self._switches = _switches()
        self._cpu = time.process_time()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._wall
        cpu = time.process_time() - self._cpu
        voluntary, involuntary = _switches()
        switches = (voluntary - self._switches[0], involuntary - self._switches[1])
        threads = split_cpu(self._threads, thread_cpu(), cpu)
        self.sample = Sample(self.units, wall, cpu, threads, switches)


def _switches() -> tuple[int, int]:
    """Voluntary and involuntary context switches of this process so far (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_nvcsw, usage.ru_nivcsw


@dataclass
class Options:
    """Settings common to every benchmark.

    :ivar quick: tiny sizes and counts (for the smoke test; figures meaningless)
    :ivar repeat: timed repetitions of each side (the median is reported)
    :ivar warmup: untimed repetitions of each side first
    """

    quick: bool
    repeat: int
    warmup: int


@dataclass
class Result:
    """One benchmark's outcome.

    :ivar name: the benchmark's name (the start of its output line)
    :ivar subject: label of the measured pyxen9p path
    :ivar reference: label of the reference measured in the same run
    :ivar per: the unit counted (``MB``, ``rt``): rates are ``<per>/s``
    :ivar subject_runs: the timed repetitions of the subject
    :ivar reference_runs: the timed repetitions of the reference
    :ivar params: what was measured (sizes, counts, threads)
    """

    name: str
    subject: str
    reference: str
    per: str
    subject_runs: list[Sample]
    reference_runs: list[Sample]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def unit(self) -> str:
        """Unit of the rates, e.g. ``MB/s``."""
        return f"{self.per}/s"

    @property
    def subject_median(self) -> float:
        """Median rate of the subject."""
        return statistics.median(s.rate for s in self.subject_runs)

    @property
    def reference_median(self) -> float:
        """Median rate of the reference."""
        return statistics.median(s.rate for s in self.reference_runs)

    @property
    def ratio(self) -> float:
        """``subject_median / reference_median`` (above 1: the subject is faster)."""
        return self.subject_median / self.reference_median

    @property
    def subject_cpu(self) -> float:
        """Median process CPU seconds per unit of the subject."""
        return statistics.median(s.cpu_per_unit for s in self.subject_runs)

    @property
    def reference_cpu(self) -> float:
        """Median process CPU seconds per unit of the reference."""
        return statistics.median(s.cpu_per_unit for s in self.reference_runs)

    def line(self) -> str:
        """The result as one ``name: a=... unit b=... unit ratio=...`` line."""
        return (
            f"{self.name}: {self.subject}={self.subject_median:.1f} {self.unit}"
            f" {self.reference}={self.reference_median:.1f} {self.unit}"
            f" ratio={self.ratio:.3f}"
        )

    def cpu_line(self) -> str:
        """A ``#`` comment with the median process CPU time per unit of each side."""
        return (
            f"# {self.name}: CPU per {self.per} (all threads): {self.subject}="
            f"{self.subject_cpu * 1e6:.1f} us {self.reference}={self.reference_cpu * 1e6:.1f} us"
        )

    def switch_line(self) -> str:
        """A ``#`` comment with the median context switches per unit of each
        side (voluntary + involuntary, all threads of the process)."""
        sides = []
        for label, runs in ((self.subject, self.subject_runs),
                            (self.reference, self.reference_runs)):
            vol = statistics.median(s.switches[0] / s.units for s in runs)
            invol = statistics.median(s.switches[1] / s.units for s in runs)
            sides.append(f"{label}={vol + invol:.1f} ({vol:.1f} voluntary)")
        return f"# {self.name}: context switches per {self.per}: " + " ".join(sides)

    @staticmethod
    def _thread_medians(runs: list[Sample]) -> dict[str, float]:
        groups = sorted({g for s in runs for g in s.threads})
        return {g: statistics.median(s.threads.get(g, 0.0) / s.units for s in runs) for g in groups}

    def thread_line(self) -> str | None:
        """A ``#`` comment with the median CPU time per unit of each group of
        threads (:func:`thread_group`), each side; ``None`` without per-thread clocks.

        In one process the threads share one interpreter lock: this shows
        which side's threads the CPU (hence most of the time) goes to.
        """
        sides = []
        both = ((self.subject, self.subject_runs), (self.reference, self.reference_runs))
        for label, runs in both:
            medians = self._thread_medians(runs)
            if not medians:
                return None
            parts = " ".join(
                f"{g}={v * 1e6:.1f}" for g, v in medians.items() if g == "exited" or v >= 5e-8
            )
            sides.append(f"{label}: {parts}")
        return f"# {self.name}: CPU us per {self.per} by thread group: " + "; ".join(sides)

    def print_lines(self, out: TextIO) -> None:
        """Print :meth:`line`, :meth:`cpu_line` and (if any) :meth:`thread_line`."""
        print(self.line(), file=out, flush=True)
        print(self.cpu_line(), file=out, flush=True)
        threads = self.thread_line()
        if threads is not None:
            print(threads, file=out, flush=True)

    def as_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data, medians and ratio included."""
        data = asdict(self)
        data.update(
            unit=self.unit,
            subject_median=self.subject_median,
            reference_median=self.reference_median,
            ratio=self.ratio,
            subject_cpu_per_unit=self.subject_cpu,
            reference_cpu_per_unit=self.reference_cpu,
            subject_thread_cpu_per_unit=self._thread_medians(self.subject_runs),
            reference_thread_cpu_per_unit=self._thread_medians(self.reference_runs),
        )
        return data


def base_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark script takes.

    :param description: the script's description for ``--help``
    :returns: a parser with ``--quick``, ``--repeat``, ``--warmup`` and ``--json``
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, 2 repetitions: checks that the benchmark runs (figures meaningless)",
    )
    parser.add_argument(
        "--repeat", type=int, default=None, help="timed repetitions (default 11; 2 with --quick)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed repetitions first (default 1)"
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        default=None,
        help="also write the results as JSON to PATH ('-': standard output)",
    )
    return parser


def options_from(args: argparse.Namespace) -> Options:
    """Build :class:`Options` from parsed :func:`base_parser` arguments.

    :raises SystemExit: if ``--repeat`` is below 1 or ``--warmup`` below 0
    """
    repeat = args.repeat if args.repeat is not None else (2 if args.quick else 11)
    if repeat < 1 or args.warmup < 0:
        raise SystemExit("--repeat must be >= 1 and --warmup >= 0")
    return Options(quick=bool(args.quick), repeat=repeat, warmup=args.warmup)


def measure_pair(
    subject: Timer, reference: Timer, options: Options
) -> tuple[list[Sample], list[Sample]]:
    """Run *subject* and *reference* alternately: warm-up, then timed repetitions.

    Alternating (subject, reference, subject, ...) spreads any drift of the
    machine (frequency scaling, other load) over both sides.

    :param subject: one repetition of the measured path
    :param reference: one repetition of the reference
    :returns: the timed repetitions of each side
    """
    for _ in range(options.warmup):
        subject()
        reference()
    subject_runs: list[Sample] = []
    reference_runs: list[Sample] = []
    for _ in range(options.repeat):
        subject_runs.append(subject())
        reference_runs.append(reference())
    return subject_runs, reference_runs


def environment() -> dict[str, Any]:
    """Describe the machine and interpreter the figures were measured on."""
    try:
        load: list[float] | None = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg": load,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def file_system(path: Path) -> str:
    """The type of the file system *path* is on (the mount point nearest
    above it in ``/proc/self/mountinfo``), or ``"unknown"``."""
    path = path.resolve()
    best, kind = -1, "unknown"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                at = fields.index("-")
                point = Path(fields[4].replace("\\040", " "))
                if (path == point or point in path.parents) and len(point.parts) > best:
                    best, kind = len(point.parts), fields[at + 1]
    except (OSError, ValueError, IndexError):
        return "unknown"
    return kind


def comment(text: str, out: TextIO) -> None:
    """Print a ``#`` comment line (parameters, notes) and flush it."""
    print(f"# {text}", file=out, flush=True)


def report(results: list[Result], json_path: str | None, out: TextIO) -> None:
    """Write *results* as JSON if asked (the text lines were printed already).

    :param json_path: a file name, ``-`` for standard output, or ``None``
    :param out: where the text lines go (a note is printed there)
    """
    if json_path is None:
        return
    document = {"environment": environment(), "results": [r.as_dict() for r in results]}
    text = json.dumps(document, indent=2, sort_keys=True)
    if json_path == "-":
        print(text, flush=True)
    else:
        Path(json_path).write_text(text + "\n", encoding="utf-8")
        comment(f"results written to {json_path}", out)


_T = TypeVar("_T")

if TYPE_CHECKING:
    from pyxen9p.p9.client import Client


def strace_counts(
    work: Callable[[], _T], *, tid: int, follow: bool = False, settle: float = 0.0
) -> tuple[_T, int, list[tuple[str, int]]]:
    """Run *work* with ``strace -c`` attached to the thread *tid* of this
    process (``follow``: ``-f``, every thread of the process when *tid* is
    its pid), after waiting for the tracer to attach and *settle* seconds more.

    :returns: what *work* returned, the system calls counted, and each
        call's name with its count, the most frequent first
    :raises RuntimeError: if strace does not attach within 30 s
    """
    status = Path(f"/proc/self/task/{tid}/status")
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as report_file:
        tracer = subprocess.Popen(
            ["strace", *(["-f"] if follow else []), "-c", "-o", report_file.name, "-p", str(tid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not any(
                line.startswith("TracerPid:") and line.split()[1] != "0"
                for line in status.read_text().splitlines()
            ):
                if tracer.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("strace did not attach")
                time.sleep(0.02)
            time.sleep(settle)
            result = work()
        finally:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(60)
        calls: list[tuple[str, int]] = []
        total = 0
        for line in report_file.read().splitlines():
            fields = line.split()
            # % time, seconds, usecs/call, calls, [errors,] name
            if len(fields) >= 5 and fields[3].isdigit():
                if fields[-1] == "total":
                    total = int(fields[3])
                else:
                    calls.append((fields[-1], int(fields[3])))
    calls.sort(key=lambda item: -item[1])
    return result, total, calls


#: The simulated guest's domain id in the benchmarks.
FE_DOMID = 7


@contextmanager
def simulated_client(
    export: Path,
    rings: int | None = None,
    serve: Callable[[Any], Callable[[bytes], bytes]] | None = None,
) -> Iterator[Client]:
    """A client over a simulated Xen frontend (*rings* rings, default: the
    frontend's choice) to a :class:`~pyxen9p.p9.server.FileServer` on
    *export* (*serve*: the backend's handler is ``serve(server)`` instead of
    the server's own, say a test's rewriter of its replies); on the way out,
    the backend's errors and any leak raise."""
    from pyxen9p.frontend import Frontend
    from pyxen9p.p9.client import Client
    from pyxen9p.p9.server import FileServer
    from pyxen9p.sim.backend import Sim9pfsBackend
    from pyxen9p.sim.platform import SimulatedXen

    server = FileServer(export)
    xen = SimulatedXen()
    try:
        guest = xen.create_domain(FE_DOMID, "bench-guest")
        handler = server.handle if serve is None else serve(server)
        backend = Sim9pfsBackend(xen.domain(0), FE_DOMID, handler=handler)
        backend.start()
        try:
            options: dict[str, Any] = {} if rings is None else {"rings": rings}
            frontend = Frontend.connect(devid=0, platform=guest, timeout=10.0, **options)
            with Client(frontend, aname=str(export), timeout=60) as client:
                yield client
        finally:
            backend.stop()
        if backend.errors:
            raise RuntimeError(f"the simulated backend failed: {backend.errors}")
        xen.assert_no_leaks(FE_DOMID)
    finally:
        xen.close()
        server.close()
