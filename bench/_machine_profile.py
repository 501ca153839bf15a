"""Where a benchmark's CPU goes on the whole machine: every thread, every CPU.

The timed lines of ``bench_realxen.py`` measure the benchmark's own process.
A frontend's work also runs elsewhere: the kernel's ``9pnet_xen`` reads its
replies in a kworker, event channels are taken in interrupt context, and the
backend (dom0's QEMU) works in threads of its own.  A :func:`snapshot`
reads, from ``/proc``:

* the machine's CPU time by kind (user, system, irq, softirq, steal, idle:
  the first line of ``/proc/stat``, in clock ticks);
* each thread's CPU time in nanoseconds (``/proc/<pid>/task/<tid>/schedstat``;
  the ``stat`` file's clock ticks where there is no ``schedstat``) and its
  voluntary and involuntary context switches (``status``);
* the interrupts taken (``/proc/interrupts``, all CPUs added).

:func:`profile` runs a piece of work between two snapshots, repeated until
it has run long enough for clock ticks to count, and :func:`profile_line`
prints what each group of threads did per unit of work.  The benchmark's own
process (``self``) is measured from the inside, by the samples themselves,
so that the snapshots' own reading of ``/proc`` is not counted as its work.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from _common import Sample

__all__ = ["Profile", "Snapshot", "cpu_ticks", "group_of", "profile", "profile_line", "snapshot"]

#: The kinds of ``/proc/stat``'s ``cpu`` line, in its order.
KINDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
#: The kinds that are not busy.
IDLE = ("idle", "iowait")


@dataclass(frozen=True)
class Snapshot:
    """The machine's counters at one moment (see the module's description)."""

    #: clock ticks of all CPUs by kind (:data:`KINDS`)
    kinds: dict[str, int]
    #: ``tid: (group, CPU ns, voluntary, involuntary)`` of every thread
    threads: dict[int, tuple[str, int, int, int]]
    #: interrupts taken, all CPUs added, by the interrupt's name
    interrupts: dict[str, int]
    #: CPUs counted by ``/proc/stat``
    cpus: int
    #: seconds per clock tick
    tick: float = field(default_factory=lambda: 1.0 / os.sysconf("SC_CLK_TCK"))


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:  # the thread or process ended meanwhile
        return None


def _kinds(proc: Path) -> tuple[dict[str, int], int]:
    text = (proc / "stat").read_text()
    first = text.splitlines()[0].split()
    cpus = sum(1 for line in text.splitlines() if re.match(r"cpu[0-9]+ ", line))
    return dict(zip(KINDS, (int(v) for v in first[1 : 1 + len(KINDS)]), strict=False)), cpus


def group_of(pid: int, tid: int, ppid: int, process: str, thread: str, own: int,
                 backend: int | None) -> str:  # fmt: skip
    """The group a thread is counted in: ``self:`` (the benchmark's process),
    ``backend:`` (*backend*'s process: ``main`` for its main thread, the
    other threads by name, ``threads`` where they have the process's name),
    ``kernel:`` (a kernel thread; the name up to its first ``/`` or ``:``,
    without a number at the end: ``kworker``, ``ksoftirqd``) or ``other:``
    (any other process, by its name), then the thread's name."""
    if pid == own:
        return f"self:{thread}"
    if pid == backend:
        return f"backend:{'main' if tid == pid else 'threads' if thread == process else thread}"
    if pid == 2 or ppid == 2:
        return "kernel:" + re.split(r"[/:]", thread, maxsplit=1)[0].rstrip("0123456789.")
    return f"other:{process}"


def _stat_fields(text: str) -> tuple[str, list[str]]:
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses
    head, _, rest = text.rpartition(")")
    return head.partition("(")[2], rest.split()


def cpu_ticks(stat: str) -> int:
    """User + system clock ticks of a ``/proc/<pid>[/task/<tid>]/stat`` text
    (fields 14 and 15, 1-based; a process's count includes its ended threads)."""
    fields = _stat_fields(stat)[1]
    return int(fields[11]) + int(fields[12])


def _threads(proc: Path, own: int, backend: int | None, tick_ns: int
             ) -> dict[int, tuple[str, int, int, int]]:  # fmt: skip
    threads: dict[int, tuple[str, int, int, int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        text = _read(entry / "stat")
        if text is None:
            continue
        process, fields = _stat_fields(text)
        ppid = int(fields[1])
        try:
            tasks = list((entry / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            stat = _read(task / "stat")
            status = _read(task / "status")
            if stat is None or status is None:
                continue
            name = _stat_fields(stat)[0]
            sched = _read(task / "schedstat")
            ns = int(sched.split()[0]) if sched else cpu_ticks(stat) * tick_ns
            switches = dict(
                line.split(":", 1) for line in status.splitlines() if "ctxt_switches" in line
            )
            threads[int(task.name)] = (
                group_of(pid, int(task.name), ppid, process, name, own, backend),
                ns,
                int(switches.get("voluntary_ctxt_switches", 0)),
                int(switches.get("nonvoluntary_ctxt_switches", 0)),
            )
    return threads


def _interrupts(proc: Path, cpus: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    text = _read(proc / "interrupts")
    if text is None:
        return counts
    for line in text.splitlines()[1:]:
        label, _, rest = line.partition(":")
        fields = rest.split()
        numbers = [int(f) for f in fields[:cpus] if f.isdigit()]
        if not numbers:
            continue
        # numbered lines end with the chip, the trigger and the handler's name
        name = " ".join(fields[len(numbers) :][-1:]) if label.strip().isdigit() else label.strip()
        counts[name or label.strip()] = counts.get(name or label.strip(), 0) + sum(numbers)
    return counts


def snapshot(backend: int | None = None, proc: Path = Path("/proc")) -> Snapshot:
    """Read the machine's counters now; *backend*: the backend's process id."""
    kinds, cpus = _kinds(proc)
    tick = 1.0 / os.sysconf("SC_CLK_TCK")
    threads = _threads(proc, os.getpid(), backend, round(tick * 1e9))
    return Snapshot(kinds, threads, _interrupts(proc, cpus), cpus, tick)


@dataclass(frozen=True)
class Profile:
    """What the machine did during :func:`profile`'s repetitions, in totals."""

    #: units of work done, and their wall and own-process CPU seconds (the samples')
    units: float
    wall: float
    own_cpu: float
    #: the own process's CPU seconds by thread group (the samples')
    own_threads: dict[str, float]
    #: every CPU's busy seconds by kind (the own process's counted from the samples)
    kinds: dict[str, float]
    #: CPU seconds of all the CPUs, busy or not, meanwhile, and the CPUs
    capacity: float
    cpus: int
    #: ``group: (CPU seconds, voluntary, involuntary)`` of the other threads
    groups: dict[str, tuple[float, int, int]]
    #: the own process's context switches (the samples')
    own_switches: tuple[int, int]
    #: interrupts taken meanwhile, by name
    interrupts: dict[str, int]

    @property
    def busy(self) -> float:
        """Busy CPU seconds of the whole machine."""
        return sum(self.kinds.values())


def profile(work: Callable[[], Sample], *, backend: int | None = None,
            min_seconds: float = 2.0, proc: Path = Path("/proc")) -> Profile:  # fmt: skip
    """Run *work* (one timed repetition) between two snapshots, again and
    again until its samples add up to *min_seconds* of wall time."""
    before = snapshot(backend, proc)
    started = time.perf_counter()
    samples: list[Sample] = []
    while not samples or sum(s.wall for s in samples) < min_seconds:
        samples.append(work())
    elapsed = time.perf_counter() - started
    after = snapshot(backend, proc)
    groups: dict[str, list[float]] = {}
    own_ns = 0
    for tid, (group, ns, vol, invol) in after.threads.items():
        start = before.threads.get(tid, (group, 0, 0, 0))
        delta = (max(ns - start[1], 0), max(vol - start[2], 0), max(invol - start[3], 0))
        if group.startswith("self:"):
            own_ns += delta[0]
            continue
        total = groups.setdefault(group, [0.0, 0, 0])
        total[0] += delta[0] / 1e9
        total[1] += delta[1]
        total[2] += delta[2]
    own_cpu = sum(s.cpu for s in samples)
    kinds = {
        kind: (after.kinds.get(kind, 0) - before.kinds.get(kind, 0)) * after.tick
        for kind in KINDS if kind not in IDLE
    }  # fmt: skip
    # the own process's ticks include the snapshots' reading of /proc and the
    # pauses between samples: count the samples' own CPU instead, as system
    # time where the process's split is unknown
    correction = own_cpu - own_ns / 1e9
    kinds["system"] = max(kinds.get("system", 0.0) + correction, 0.0)
    own_threads: dict[str, float] = {}
    for sample in samples:
        for group, seconds in sample.threads.items():
            own_threads[group] = own_threads.get(group, 0.0) + seconds
    interrupts = {
        name: count - before.interrupts.get(name, 0)
        for name, count in after.interrupts.items()
        if count > before.interrupts.get(name, 0)
    }
    return Profile(
        units=sum(s.units for s in samples),
        wall=sum(s.wall for s in samples),
        own_cpu=own_cpu,
        own_threads=own_threads,
        kinds=kinds,
        capacity=elapsed * after.cpus,
        cpus=after.cpus,
        groups={g: (v[0], int(v[1]), int(v[2])) for g, v in groups.items()},
        own_switches=(sum(s.switches[0] for s in samples), sum(s.switches[1] for s in samples)),
        interrupts=interrupts,
    )


def _top(items: dict[str, float], scale: float, count: int, digits: int) -> str:
    ranked = sorted(items.items(), key=lambda kv: -kv[1])[:count]
    return ", ".join(f"{name} {value * scale:.{digits}f}" for name, value in ranked)


def profile_line(name: str, per: str, side: str, prof: Profile, top: int = 3) -> str:
    """``# <name>: machine per <per> (<side>, ...): ...``: milliseconds of
    wall and CPU time per unit (microseconds per operation or entry), by kind
    and by group of threads, context switches and interrupts per unit."""
    scale, unit, digits = (1e3, "ms", 2) if per == "MB" else (1e6, "us", 0)
    per_unit = scale / prof.units
    families: dict[str, dict[str, float]] = {"self": dict(prof.own_threads)}
    switches: dict[str, float] = {"self": float(sum(prof.own_switches))}
    for group, (seconds, vol, invol) in prof.groups.items():
        family, _, thread = group.partition(":")
        families.setdefault(family, {})[thread] = (
            families.get(family, {}).get(thread, 0.0) + seconds
        )
        switches[family] = switches.get(family, 0.0) + vol + invol
    threads = "; ".join(
        f"{family} {sum(members.values()) * per_unit:.{digits}f}"
        f" ({_top(members, per_unit, top, digits)})"
        for family, members in sorted(families.items(), key=lambda kv: -sum(kv[1].values()))
        if sum(members.values()) * per_unit >= 0.5 * 10**-digits
    )
    kinds = ", ".join(
        f"{kind} {seconds * per_unit:.{digits}f}" for kind, seconds in prof.kinds.items()
        if seconds > 0
    )  # fmt: skip
    share = 100 * prof.busy / max(prof.capacity, 1e-9)
    irqs = {k: float(v) for k, v in prof.interrupts.items()}
    irq_total = sum(irqs.values()) / prof.units
    return (
        f"# {name}: machine per {per} ({side}; {prof.units:g} {per} in {prof.wall:.2f} s):"
        f" wall {prof.wall * per_unit:.{digits}f} {unit}; busy {prof.busy * per_unit:.{digits}f}"
        f" {unit} ({share:.0f} % of {prof.cpus} CPUs: {kinds});"
        f" threads {threads};"
        f" switches {', '.join(f'{f} {n / prof.units:.1f}' for f, n in sorted(switches.items()))};"
        f" interrupts {irq_total:.1f} ({_top(irqs, 1 / prof.units, top, 1)})"
    )
