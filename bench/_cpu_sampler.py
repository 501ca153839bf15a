"""Where the calling thread's CPU goes, line by line: a sampling profiler.

:class:`CpuSampler` asks the kernel for ``SIGPROF`` after every *interval*
of the process's CPU time (``setitimer(ITIMER_PROF)``).  CPython runs the
handler in the main thread between two bytecodes, with the frame that was
running: a sample taken during a C call (a copy, a system call, a ctypes
call) is counted at the Python line that made the call.  Unlike
:mod:`cProfile` it adds nothing to each call, so the profiled run costs what
an unprofiled one does, and it sees the time spent inside a function's own
bytecode, which a call count cannot.  The kernel checks the timer at its
clock ticks, so a sample may stand for a whole tick: the figures are each
line's share of the samples times the process's CPU time in the blocks.
A sampler may be entered again and again; its counts add up.

The work must run in the main thread; time of other threads still raises
signals, counted where the main thread was (see :attr:`CpuSampler.samples`).
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from types import FrameType, TracebackType

__all__ = ["CpuSampler"]

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _where(frame: FrameType) -> tuple[str, str]:
    """``(file:line (function), file)`` of *frame*, the file relative to the
    repository or, for the standard library, its base name."""
    code = frame.f_code
    path = code.co_filename
    short = path[len(_REPO):] if path.startswith(_REPO) else os.path.basename(path)
    return f"{short}:{frame.f_lineno} ({code.co_name})", short


class CpuSampler:
    """Sample the main thread's Python line every *interval* CPU seconds::

        with CpuSampler() as sampler:
            work()
        print(sampler.report(units=16.0, per="MB"))
    """

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        #: samples by line (``file:line (function)``) and by file
        self.lines: Counter[str] = Counter()
        self.files: Counter[str] = Counter()
        #: every sample taken
        self.samples = 0
        #: CPU seconds of the process during the block
        self.cpu = 0.0
        self._previous: object = None
        self._started = 0.0

    def _take(self, signum: int, frame: FrameType | None) -> None:
        self.samples += 1
        if frame is None:
            return
        line, path = _where(frame)
        self.lines[line] += 1
        self.files[path] += 1

    def __enter__(self) -> CpuSampler:
        self._previous = signal.signal(signal.SIGPROF, self._take)
        signal.setitimer(signal.ITIMER_PROF, self.interval, self.interval)
        self._started = time.process_time()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cpu += time.process_time() - self._started
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, self._previous)  # type: ignore[arg-type]

    def report(self, units: float, per: str, top: int = 8) -> str:
        """The process's CPU per unit, by file and for the *top* lines (each
        its share of the samples times the CPU time)."""
        if not self.samples:
            return "no samples"
        scale, unit, digits = (1e3, "ms", 2) if per == "MB" else (1e6, "us", 0)
        each = self.cpu * scale / units / self.samples
        files = ", ".join(
            f"{name} {count * each:.{digits}f}" for name, count in self.files.most_common(6)
        )
        lines = ", ".join(
            f"{name} {count * each:.{digits}f}" for name, count in self.lines.most_common(top)
        )
        return (
            f"{self.cpu * scale / units:.{digits}f} {unit} CPU per {per}, {self.samples} samples;"
            f" by file: {files}; top lines: {lines}"
        )
