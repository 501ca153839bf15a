"""``bench/_machine_profile.py`` and ``bench/_cpu_sampler.py`` against this machine.

Real work, real ``/proc``: a child process that burns CPU is found as the
backend (by its process id) with about the CPU it used; the benchmark's own
process is counted from the samples; a function that burns CPU in this
thread is where the sampler's samples land.  No speed is checked.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import _machine_profile  # noqa: E402
from _cpu_sampler import CpuSampler  # noqa: E402

#: a child that burns about this much CPU once told to (a line on stdin)
BURN = 0.4


@pytest.fixture
def burner() -> Iterator[subprocess.Popen[str]]:
    code = (
        "import sys, time\n"
        "sys.stdin.readline()\n"
        f"end = time.process_time() + {BURN}\n"
        "while time.process_time() < end: pass\n"
        "print('done', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        yield child
    finally:
        child.kill()
        child.wait(10)


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_the_backend_and_the_own_process_are_counted(burner: subprocess.Popen[str]) -> None:
    assert burner.stdin is not None and burner.stdout is not None

    def work() -> _common.Sample:
        with _common.timed(2.0) as t:
            burner.stdin.write("go\n")  # type: ignore[union-attr]
            burner.stdin.flush()  # type: ignore[union-attr]
            assert burner.stdout.readline() == "done\n"  # type: ignore[union-attr]
            _burn(0.1)
        return t.sample

    prof = _machine_profile.profile(work, backend=burner.pid, min_seconds=0.0)
    assert prof.units == 2.0
    backend = prof.groups["backend:main"]
    assert BURN * 0.8 <= backend[0] <= BURN * 1.5, prof.groups
    assert backend[1] >= 1  # it slept on stdin, then woke
    assert 0.1 <= prof.own_cpu <= 0.1 + BURN, prof.own_cpu
    assert prof.own_threads.get("caller", 0.0) >= 0.09
    # the machine was busy at least while the two burned
    assert prof.busy >= 0.8 * (BURN + 0.1), prof.kinds
    assert prof.cpus >= 1 and prof.capacity > 0
    line = _machine_profile.profile_line("burn", "op", "test", prof)
    match = re.fullmatch(
        r"# burn: machine per op \(test; 2 op in [0-9.]+ s\): wall [0-9]+ us; busy ([0-9]+) us"
        r" \([0-9]+ % of [0-9]+ CPUs: [^)]*\); threads (.*); switches (.*);"
        r" interrupts [0-9.]+ \(.*\)",
        line,
    )
    assert match, line
    groups = dict(re.findall(r"(?:^|; )([a-z]+) ([0-9]+) \(", match[2]))
    assert BURN * 0.8e6 / 2 <= int(groups["backend"]) <= BURN * 1.5e6 / 2, line
    assert int(groups["self"]) >= 0.09e6 / 2, line


def test_kernel_threads_and_processes_are_grouped_by_name() -> None:
    group = _machine_profile.group_of
    assert group(7, 7, 2, "kworker/1:2H-kblockd", "kworker/1:2H-kblockd", 99, None) == (
        "kernel:kworker"
    )
    assert group(9, 9, 2, "ksoftirqd/0", "ksoftirqd/0", 99, None) == "kernel:ksoftirqd"
    assert group(5, 6, 1, "qemu", "qemu", 99, 5) == "backend:threads"
    assert group(5, 5, 1, "qemu", "qemu", 99, 5) == "backend:main"
    assert group(5, 8, 1, "qemu", "worker", 99, 5) == "backend:worker"
    assert group(99, 100, 1, "python3", "pyxen9p-rx", 99, 5) == "self:pyxen9p-rx"
    assert group(40, 40, 1, "sshd", "sshd", 99, 5) == "other:sshd"


def test_a_snapshot_reads_names_with_spaces_and_parentheses(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    task = proc / "321" / "task" / "321"
    task.mkdir(parents=True)
    stat = "321 (odd (name) x) S 1 " + " ".join(["0"] * 9) + " 150 50 " + " ".join(["0"] * 30)
    (proc / "321" / "stat").write_text(stat)
    (task / "stat").write_text(stat)
    (task / "status").write_text(
        "Name:\todd\nvoluntary_ctxt_switches:\t12\nnonvoluntary_ctxt_switches:\t3\n"
    )
    (proc / "stat").write_text("cpu  1 2 3 4 5 6 7 8 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\nctxt 9\n")
    (proc / "interrupts").write_text(
        "           CPU0\n  1:         10   xen-dyn    -event     evtchn:python3\n"
        "LOC:          4   Local timer interrupts\n"
    )
    snap = _machine_profile.snapshot(proc=proc)
    tick_ns = round(snap.tick * 1e9)
    assert snap.threads == {321: ("other:odd (name) x", 200 * tick_ns, 12, 3)}
    assert snap.kinds["user"] == 1 and snap.kinds["steal"] == 8 and snap.cpus == 1
    assert snap.interrupts == {"evtchn:python3": 10, "LOC": 4}


def test_the_sampler_finds_the_line_that_burns() -> None:
    sampler = CpuSampler()
    with sampler:
        _burn(0.2)
    with sampler:  # a second block adds up
        _burn(0.1)
    assert sampler.cpu >= 0.29
    assert sampler.samples >= 10
    (line, count), = sampler.lines.most_common(1)
    assert "(_burn)" in line and line.startswith("tests/test_bench_machine_profile.py:")
    assert count >= 0.8 * sampler.samples
    report = sampler.report(units=3.0, per="op")
    assert re.match(r"[0-9]+ us CPU per op, [0-9]+ samples; by file: tests/", report), report
    # the timer is off again
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)
