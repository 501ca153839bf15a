"""A fuzzing run: generate, run, judge, collect, shrink, write reproducers.

:func:`fuzz` runs cases ``first, first+1, ...`` of a seed against a target
until *cases* were run or *seconds* passed.  On a finding it collects the
evidence at once, restarts the backend, shrinks the case (each candidate run
on a fresh device, the backend restarted after each one that failed),
writes ``finding-N-KIND/`` (the case, the shrunk case, the evidence, a
standalone ``reproduce.py``) under *out_dir*, and goes on.  A finding whose
kind and signature (:meth:`~pyxen9p.fuzz.target.Target.signature`: for a
dead backend, its assertion or fault address) were already shrunk in this
run is only counted again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pyxen9p.fuzz.case import Case, Finding
from pyxen9p.fuzz.execute import run_case
from pyxen9p.fuzz.generate import LAYERS, generate_case
from pyxen9p.fuzz.repro import write_reproducer
from pyxen9p.fuzz.shrink import shrink
from pyxen9p.fuzz.target import Target, TargetError

__all__ = ["Report", "RunSummary", "fuzz"]


@dataclass
class Report:
    """One distinct finding of a run.

    :ivar case: the case that found it
    :ivar finding: what the oracle saw (with evidence)
    :ivar minimal: the shrunk case
    :ivar minimal_finding: the finding of the shrunk case
    :ivar shrink_runs: how many runs shrinking took
    :ivar directory: where it was written (``None`` without *out_dir*)
    :ivar repeats: how many later cases found the same kind again
    """

    case: Case
    finding: Finding
    minimal: Case
    minimal_finding: Finding
    shrink_runs: int
    directory: Path | None = None
    repeats: int = 0


@dataclass
class RunSummary:
    """What a run did.

    :ivar seed: the seed
    :ivar cases: cases run
    :ivar seconds: wall time
    :ivar reports: the distinct findings
    :ivar target_errors: cases the target could not give a device for
    :ivar layers: cases run per layer
    """

    seed: int
    cases: int = 0
    seconds: float = 0.0
    reports: list[Report] = field(default_factory=list)
    target_errors: int = 0
    layers: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        """One line: seed, cases, time, findings by kind."""
        kinds = ", ".join(f"{r.finding.kind} x{1 + r.repeats}" for r in self.reports) or "none"
        return (f"seed {self.seed}: {self.cases} cases in {self.seconds:.1f}s;"
                f" findings: {kinds}")  # fmt: skip


def _write(directory: Path, report: Report, target: Target) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "case.json").write_text(report.case.dumps() + "\n")
    (directory / "minimal.json").write_text(report.minimal.dumps() + "\n")
    for prefix, finding in (("", report.finding), ("minimal-", report.minimal_finding)):
        for name, text in finding.evidence.items():
            (directory / f"evidence-{prefix}{name}.txt").write_text(text + "\n")
    (directory / "finding.json").write_text(json.dumps({
        "kind": report.finding.kind, "signature": report.finding.signature,
        "detail": report.finding.detail, "step": report.finding.step,
        "minimal_detail": report.minimal_finding.detail, "minimal_steps": len(report.minimal.steps),
        "shrink_runs": report.shrink_runs, "target": target.describe(),
    }, indent=1) + "\n")  # fmt: skip
    write_reproducer(directory / "reproduce.py", report.minimal, report.minimal_finding,
                     target.describe())  # fmt: skip


def fuzz(
    target: Target,
    *,
    seed: int,
    cases: int | None = None,
    seconds: float | None = None,
    layers: tuple[str, ...] = LAYERS,
    first: int = 0,
    out_dir: Path | None = None,
    do_shrink: bool = True,
    max_shrink_runs: int = 48,
    log: Callable[[str], None] = lambda line: None,
) -> RunSummary:
    """Run cases of *seed* against *target* (see the module documentation).

    :param cases: stop after this many cases (``None``: no limit)
    :param seconds: stop starting cases after this long (``None``: no limit)
    :raises ValueError: neither limit given, or an unknown layer
    """
    if cases is None and seconds is None:
        raise ValueError("give a number of cases or a time limit")
    generate_case(seed, first, layers)  # checks the layers
    summary = RunSummary(seed)
    started = time.monotonic()
    by_kind: dict[tuple[str, str], Report] = {}
    number = first
    while (cases is None or summary.cases < cases) and (
        seconds is None or time.monotonic() - started < seconds
    ):
        case = generate_case(seed, number, layers)
        number += 1
        summary.cases += 1
        summary.layers[case.layer] = summary.layers.get(case.layer, 0) + 1
        try:
            result = run_case(target, case)
        except TargetError as exc:
            summary.target_errors += 1
            log(f"case {case.number}: the target gave no device: {exc}; restarting it")
            target.restart()
            continue
        finding = result.finding
        if finding is None:
            log(f"case {case.number} ({case.layer}, {len(case.steps)} steps):"
                f" ok in {result.seconds:.2f}s")  # fmt: skip
            continue
        finding.evidence.update(target.evidence())
        finding.signature = target.signature(finding)
        log(f"case {case.number} ({case.layer}): FINDING {finding.summary()}")
        target.restart()
        if finding.key in by_kind:
            by_kind[finding.key].repeats += 1
            continue
        minimal, minimal_finding, runs = case, finding, 0
        if do_shrink:
            def attempt(candidate: Case) -> Finding | None:
                try:
                    found = run_case(target, candidate).finding
                except TargetError:
                    target.restart()
                    return None
                if found is not None:
                    found.evidence.update(target.evidence())
                    found.signature = target.signature(found)
                    target.restart()
                return found

            minimal, minimal_finding, runs = shrink(case, finding, attempt, max_shrink_runs)
            log(f"case {case.number}: shrunk from {len(case.steps)} to {len(minimal.steps)}"
                f" step(s) in {runs} runs: {json.dumps(minimal.steps)[:300]}")  # fmt: skip
        report = Report(case, finding, minimal, minimal_finding, runs)
        by_kind[finding.key] = report
        summary.reports.append(report)
        if out_dir is not None:
            report.directory = out_dir / f"finding-{len(summary.reports)}-{finding.kind}"
            _write(report.directory, report, target)
            log(f"case {case.number}: evidence and reproducer in {report.directory}")
    summary.seconds = time.monotonic() - started
    return summary
