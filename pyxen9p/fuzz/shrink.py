"""Shrinking a failing case: delta debugging (ddmin) over its steps.

:func:`shrink` looks for a smallest list of steps that still gives a
finding of the same kind.  Each candidate is run for real on a fresh device
(and the backend restarted after each candidate that found something), so
the result is a case that fails by itself, not one that looks plausible.
Runs are bounded by *max_runs*.
"""

from __future__ import annotations

from collections.abc import Callable

from pyxen9p.fuzz.case import Case, Finding, Step

__all__ = ["ddmin", "shrink"]


def ddmin(
    steps: list[Step], fails: Callable[[list[Step]], bool], max_runs: int = 64
) -> tuple[list[Step], int]:
    """Zeller's ddmin: a 1-minimal sublist of *steps* for which *fails* holds.

    :param fails: runs a candidate; true if it still fails
    :param max_runs: stop after this many calls of *fails* (the smallest
        failing list found so far is returned)
    :returns: ``(steps, runs)``
    """
    runs = 0
    n = 2
    current = list(steps)
    while len(current) >= 2 and runs < max_runs:
        chunk = len(current) / n
        subsets = [current[int(i * chunk) : int((i + 1) * chunk)] for i in range(n)]
        reduced = False
        for i, subset in enumerate(subsets):
            if runs >= max_runs:
                break
            complement = [s for j, sub in enumerate(subsets) if j != i for s in sub]
            for candidate in (subset, complement) if n > 2 else (subset,):
                if not candidate or runs >= max_runs:
                    continue
                runs += 1
                if fails(candidate):
                    current = candidate
                    n = max(n - 1, 2) if candidate is complement else 2
                    reduced = True
                    break
            if reduced:
                break
        if not reduced:
            if n >= len(current):
                break
            n = min(n * 2, len(current))
    # a last pass: can any single step go?
    i = 0
    while i < len(current) and len(current) > 1 and runs < max_runs:
        candidate = current[:i] + current[i + 1 :]
        runs += 1
        if fails(candidate):
            current = candidate
        else:
            i += 1
    return current, runs


def shrink(
    case: Case,
    finding: Finding,
    run: Callable[[Case], Finding | None],
    max_runs: int = 64,
) -> tuple[Case, Finding, int]:
    """The smallest case found that still gives *finding* (same kind and signature).

    Steps after the one that failed are dropped first (they never ran).

    :param run: runs a case on a fresh device and returns its finding
    :returns: ``(case, its finding, runs)``
    """
    steps = list(case.steps)
    if 0 <= finding.step < len(steps) - 1:
        steps = steps[: finding.step + 1]
    last: dict[str, Finding] = {}

    def fails(candidate: list[Step]) -> bool:
        found = run(case.with_steps(candidate))
        if found is not None and found.key == finding.key:
            last[repr(candidate)] = found
            return True
        return False

    if steps != case.steps and not fails(steps):
        steps = list(case.steps)
    minimal, runs = ddmin(steps, fails, max_runs)
    return case.with_steps(minimal), last.get(repr(minimal), finding), runs
