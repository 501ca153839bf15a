"""Standalone reproducers: a Python script per finding, depending only on pyxen9p.

:func:`write_reproducer` writes a script holding the shrunk case as JSON.
Run it with the same opt-in as the fuzzer and a target (``--simulate-bugs``
for the simulated backend, ``--dom0-backend`` for a backend in dom0, or
``--path`` for an existing device); it replays the case (up to
``--attempts`` times, the backend restarted in between: a crash may depend
on timing) and exits 0 once the finding came back with its signature, 1 if
not, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import pprint
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyxen9p.fuzz.case import Case, Finding

__all__ = ["main", "write_reproducer"]

OPT_IN = "--i-know-this-crashes-backends"

_TEMPLATE = '''#!/usr/bin/env python3
"""Reproducer written by `pyxen9p fuzz-backend`.

Finding: {summary}
Target:  {target}
Case:    seed {seed}, case {number} ({layer} layer), shrunk to {count} step(s)

This replays a hostile frontend: it may crash the backend it is pointed at.
Run it only against a test backend, with the opt-in:

    python3 {name} {opt_in} {example}

Exit status: 0 the finding came back, 1 it did not, 2 usage error.
Needs only pyxen9p.  Findings in QEMU or Xen are possible security bugs:
report them through those projects' security processes, not public trackers.
"""

import sys

from pyxen9p.fuzz.repro import main

KIND = {kind!r}
SIGNATURE = {signature!r}
TARGET = {target_py}
CASE = {case_py}

if __name__ == "__main__":
    sys.exit(main(CASE, KIND, TARGET, sys.argv[1:], SIGNATURE))
'''


def _example(target: dict[str, Any]) -> str:
    if target.get("kind") == "sim":
        return "--simulate-bugs " + (",".join(target.get("bugs", [])) or "none")
    if target.get("kind") == "dom0":
        return f"--dom0-backend {target.get('backend', 'qemu')} --export /srv/share/fuzz"
    return "--path /local/domain/<domid>/device/9pfs/<devid>"


def write_reproducer(
    path: Path, case: Case, finding: Finding, target: dict[str, Any]
) -> Path:
    """Write the reproducer script of *case* to *path* (made executable)."""
    text = _TEMPLATE.format(
        summary=finding.summary().replace('"""', "'''"),
        target=json.dumps(target),
        seed=case.seed,
        number=case.number,
        layer=case.layer,
        count=len(case.steps),
        name=path.name,
        opt_in=OPT_IN,
        example=_example(target),
        kind=finding.kind,
        signature=finding.signature,
        target_py=pprint.pformat(target),
        case_py=pprint.pformat(case.to_json(), width=96),
    )
    path.write_text(text, encoding="utf-8")
    path.chmod(0o755)
    return path


def main(
    case_json: dict[str, Any],
    kind: str,
    target: dict[str, Any],
    argv: Sequence[str],
    signature: str = "",
) -> int:
    """Replay *case_json* once and say whether a finding of *kind* (and
    *signature*, if given) came back."""
    from pyxen9p.fuzz.execute import run_case
    from pyxen9p.fuzz.target import SimTarget, Target

    parser = argparse.ArgumentParser(description="Replay a pyxen9p fuzz-backend finding.")
    parser.add_argument(OPT_IN, dest="opt_in", action="store_true",
                        help="confirm that the backend may crash")  # fmt: skip
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--simulate-bugs", metavar="BUGS",
                       help="the simulated backend with these faults (comma list, or none)")
    where.add_argument("--dom0-backend", choices=("qemu", "xen-9pfsd"),
                       help="create a device in dom0 served by this backend")
    where.add_argument("--path", metavar="XSPATH", help="an existing frontend directory")
    parser.add_argument("--export", default="/srv/share/fuzz", help="with --dom0-backend")
    parser.add_argument("--backend-pid", type=int, help="with --path: the backend's PID")
    parser.add_argument("--any-signature", action="store_true",
                        help="a finding of the same kind counts, whatever its signature")
    parser.add_argument("--attempts", type=int, default=3,
                        help="replays (the backend restarted between them) before giving up:"
                             " a crash may depend on timing (default 3)")  # fmt: skip
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    if not args.opt_in:
        print(f"refusing to run without {OPT_IN}: this replays a hostile frontend that may"
              " crash the backend", file=sys.stderr)  # fmt: skip
        return 2
    case = Case.from_json(case_json)
    chosen: Target
    if args.dom0_backend is not None:
        from pyxen9p.fuzz.dom0 import Dom0Target

        chosen = Dom0Target(args.dom0_backend, args.export)
    elif args.path is not None:
        from pyxen9p.fuzz.dom0 import DeviceTarget

        chosen = DeviceTarget(args.path, backend_pid=args.backend_pid)
    else:
        bugs = args.simulate_bugs
        if bugs is None:
            bugs = ",".join(target.get("bugs", [])) if target.get("kind") == "sim" else "none"
        chosen = SimTarget({b for b in bugs.split(",") if b and b != "none"})
    with chosen:
        for attempt in range(1, max(1, args.attempts) + 1):
            if attempt > 1:
                chosen.restart()
            result = run_case(chosen, case)
            finding = result.finding
            if finding is None:
                print(f"attempt {attempt}: no finding in {result.steps_run} step(s)")
                continue
            finding.evidence.update(chosen.evidence())
            finding.signature = chosen.signature(finding)
            print(f"attempt {attempt}: finding after step {finding.step}: {finding.summary()}")
            if finding.kind == kind and (
                not signature or args.any_signature or finding.signature == signature
            ):
                for name, text in finding.evidence.items():
                    if text.strip():
                        print(f"--- {name}\n{text.rstrip()}")
                print(f"reproduced: {kind} [{finding.signature}]")
                return 0
        print(f"not reproduced: expected {kind} [{signature}]")
        return 1
