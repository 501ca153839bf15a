"""Run fuzz targets: many seeded cases, in worker processes, with a watchdog.

Case *i* of target *t* under seed *s* draws everything from
``random.Random(f"{s}:{t}:{i}")``, so any case can be replayed alone
(``scripts/fuzz --target t --seed s --case i``) whatever ran before it, in
whichever process.  A case fails by raising; a case that runs past its time
limit makes its worker print every thread's stack and exit, and the run
reports it as hung.

Usage (``scripts/fuzz`` sets up the environment and calls this)::

    python -m fuzz [--target codec|frontend|server|all] [--seed S] [--scale F]
                   [--cases TARGET=N] [--time SECONDS] [--workers N] [--case I]
"""

from __future__ import annotations

import argparse
import atexit
import faulthandler
import importlib
import os
import random
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

#: target name -> (module, default cases, cases per chunk, workers per core,
#: seconds one case may take before it counts as hung)
TARGETS: dict[str, tuple[str, int, int, int, float]] = {
    "codec": ("fuzz.codec_target", 1_000_000, 20_000, 1, 20.0),
    "frontend": ("fuzz.frontend_target", 10_000, 25, 4, 60.0),
    "server": ("fuzz.server_target", 20_000, 100, 1, 60.0),
}


@dataclass
class Report:
    """What running some cases of one target gave."""

    target: str
    seed: str
    cases: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[int, str]] = field(default_factory=list)
    seconds: float = 0.0

    def merge(self, other: Report) -> None:
        """Add *other*'s counts and failures to this report."""
        self.cases += other.cases
        self.kinds.update(other.kinds)
        self.notes.update(other.notes)
        self.failures.extend(other.failures)


def case_rng(seed: str, target: str, index: int) -> random.Random:
    """The generator of case *index* of *target* under *seed*."""
    return random.Random(f"{seed}:{target}:{index}")


def reproduce(target: str, seed: str, index: int) -> str:
    """The command that replays one case."""
    return f"scripts/fuzz --target {target} --seed {seed} --case {index}"


_workers: dict[str, Any] = {}


def _worker(target: str) -> Any:
    """This process's worker of *target* (made once, reused for every case)."""
    if target not in _workers:
        module = importlib.import_module(TARGETS[target][0])
        _workers[target] = worker = module.Worker()
        atexit.register(worker.close)  # e.g. the server target's sandbox
    return _workers[target]


def run_cases(
    target: str,
    seed: str,
    indices: Iterable[int],
    *,
    deadline: float | None = None,
    case_timeout: float | None = None,
    worker: Any = None,
) -> Report:
    """Run the cases *indices* of *target* in this process.

    :param deadline: a :func:`time.time` after which no case is started
    :param case_timeout: seconds after which a running case counts as hung:
        every thread's stack is printed and the process exits with status 70
    :param worker: the target's ``Worker`` to use (default: this process's)
    """
    worker = worker if worker is not None else _worker(target)
    report = Report(target, seed)
    start = time.monotonic()
    watchdog = _Watchdog.get(case_timeout) if case_timeout is not None else None
    for index in indices:
        if deadline is not None and time.time() >= deadline:
            break
        if watchdog is not None:
            watchdog.current = (target, seed, index, time.monotonic())
        try:
            kind = worker.case(case_rng(seed, target, index))
        except Exception as exc:
            text = "".join(traceback.format_exception(exc)).rstrip()
            report.failures.append((index, text))
            kind = "failed"
        finally:
            if watchdog is not None:
                watchdog.current = None
        report.cases += 1
        report.kinds[kind] += 1
    for note, count in getattr(worker, "notes", Counter()).items():
        report.notes[note] += count
    if hasattr(worker, "notes"):
        worker.notes.clear()
    report.seconds = time.monotonic() - start
    return report


class _Watchdog:
    """One thread per process that ends the process when a case runs too long."""

    _instance: _Watchdog | None = None

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        #: (target, seed, index, start) of the running case, or None
        self.current: tuple[str, str, int, float] | None = None
        threading.Thread(target=self._watch, name="fuzz-watchdog", daemon=True).start()

    @classmethod
    def get(cls, timeout: float) -> _Watchdog:
        """This process's watchdog, with *timeout*."""
        if cls._instance is None:
            cls._instance = cls(timeout)
        cls._instance.timeout = timeout
        return cls._instance

    def _watch(self) -> None:
        while True:
            time.sleep(0.5)
            current = self.current
            if current is None or time.monotonic() - current[3] < self.timeout:
                continue
            target, seed, index, _ = current
            sys.stderr.write(
                f"\nFUZZ HANG: {target} case {index} (seed {seed}) ran past {self.timeout:g} s;"
                f" reproduce: {reproduce(target, seed, index)}\n"
            )
            faulthandler.dump_traceback(all_threads=True)
            sys.stderr.flush()
            os._exit(70)


def run_target(
    target: str,
    seed: str,
    cases: int,
    *,
    workers: int,
    seconds: float | None = None,
    only: int | None = None,
) -> Report:
    """Run *cases* cases of *target* (or just case *only*) in *workers* processes.

    With ``workers == 0`` everything runs in this process.
    """
    _module, _default, chunk, _per_core, case_timeout = TARGETS[target]
    deadline = None if seconds is None else time.time() + seconds
    start = time.monotonic()
    if only is not None:
        report = run_cases(target, seed, [only], case_timeout=case_timeout)
    elif workers == 0:
        report = run_cases(target, seed, range(cases), deadline=deadline)
    else:
        report = Report(target, seed)
        chunks = [range(i, min(i + chunk, cases)) for i in range(0, cases, chunk)]
        context = get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            pending: dict[Future[Report], range] = {}
            todo = list(reversed(chunks))
            while todo or pending:
                while todo and len(pending) < 2 * workers:
                    if deadline is not None and time.time() >= deadline:
                        todo.clear()
                        break
                    part = todo.pop()
                    future = pool.submit(
                        run_cases,
                        target,
                        seed,
                        part,
                        deadline=deadline,
                        case_timeout=case_timeout,
                    )
                    pending[future] = part
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    part = pending.pop(future)
                    try:
                        report.merge(future.result())
                    except BrokenProcessPool:
                        report.failures.append(
                            (
                                part.start,
                                f"a worker died in cases {part.start}..{part.stop - 1}"
                                " (a hang, see FUZZ HANG above, or a crash)",
                            )
                        )
                        todo.clear()
                        for other in pending:
                            other.cancel()
                        pending.clear()
                        break
                    _progress(report, cases)
    report.seconds = time.monotonic() - start
    return report


def _progress(report: Report, cases: int) -> None:
    if sys.stderr.isatty():
        sys.stderr.write(f"\r  {report.target}: {report.cases}/{cases} cases")
        sys.stderr.flush()


def summary(report: Report) -> str:
    """A few lines describing *report*."""
    rate = report.cases / report.seconds if report.seconds else 0.0
    lines = [
        f"{report.target}: {report.cases} cases in {report.seconds:.1f} s"
        f" ({rate:.0f}/s), {len(report.failures)} failed, seed {report.seed}",
        "  kinds: " + ", ".join(f"{k} {n}" for k, n in sorted(report.kinds.items())),
    ]
    if report.notes:
        lines.append("  notes: " + ", ".join(f"{k} {n}" for k, n in sorted(report.notes.items())))
    for index, text in sorted(report.failures)[:20]:
        lines.append(f"FAIL {report.target} case {index} (seed {report.seed}): reproduce with")
        lines.append(f"  {reproduce(report.target, report.seed, index)}")
        lines.extend("    " + line for line in text.splitlines()[-25:])
    if len(report.failures) > 20:
        lines.append(f"  ... and {len(report.failures) - 20} more failures")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The command line of ``scripts/fuzz``."""
    parser = argparse.ArgumentParser(
        prog="scripts/fuzz",
        description="Fuzz pyxen9p: a hostile Xen backend against the frontend, the 9P codec,"
        " and the file server fed adversarial sessions.",
    )
    parser.add_argument(
        "--target", choices=[*TARGETS, "all"], default="all", help="what to fuzz (default: all)"
    )
    parser.add_argument(
        "--seed", default=None, help="seed of the run (default: a new one, printed)"
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every target's default number of cases"
        f" ({', '.join(f'{t} {v[1]}' for t, v in TARGETS.items())})",
    )
    parser.add_argument(
        "--cases",
        action="append",
        default=[],
        metavar="TARGET=N",
        help="run N cases of TARGET (repeatable)",
    )
    parser.add_argument(
        "--time",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop starting new cases after this long (per target)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: per target, from the CPU count; 0: this process)",
    )
    parser.add_argument("--case", type=int, default=None, help="replay only this case")
    args = parser.parse_args(argv)

    seed = args.seed if args.seed is not None else str(random.SystemRandom().randrange(10**9))
    counts = {t: max(1, round(v[1] * args.scale)) for t, v in TARGETS.items()}
    for item in args.cases:
        name, _, number = item.partition("=")
        if name not in TARGETS or not number.isdigit():
            parser.error(f"--cases wants TARGET=N with TARGET in {', '.join(TARGETS)}")
        counts[name] = int(number)
    targets = list(TARGETS) if args.target == "all" else [args.target]
    cores = os.cpu_count() or 1
    print(f"fuzz: seed {seed}, {cores} cores, targets {', '.join(targets)}", flush=True)
    failed = False
    for target in targets:
        workers = args.workers if args.workers is not None else cores * TARGETS[target][3]
        if args.case is not None:
            print(f"fuzz: {target}: case {args.case}, in this process", flush=True)
        else:
            print(f"fuzz: {target}: {counts[target]} cases, {workers} workers", flush=True)
        report = run_target(
            target,
            seed,
            counts[target],
            workers=workers,
            seconds=args.time,
            only=args.case,
        )
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        print(summary(report), flush=True)
        failed = failed or bool(report.failures)
    return 1 if failed else 0
