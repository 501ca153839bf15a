"""``pyxen9p fuzz-backend``: a hostile frontend for the people who test 9pfs backends.

It refuses to start without ``--i-know-this-crashes-backends``: it is meant
to crash backends, never to be run by accident against a production share.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pyxen9p.cli._common import (
    CommandError,
    UsageError,
    _Command,
    _Context,
    _only_device,
    _positive_int,
    _seconds,
    _selection,
)

if TYPE_CHECKING:
    from pyxen9p.fuzz.target import Target

__all__ = ["COMMANDS", "OPT_IN"]

#: The option without which the command refuses to start.
OPT_IN = "--i-know-this-crashes-backends"

_REFUSAL = (
    f"refusing to start without {OPT_IN}: this command sends hostile XenStore values,"
    " ring indices and 9P messages to a 9pfs backend in order to crash it; point it only"
    " at a test backend whose crash harms nobody (findings in QEMU or Xen are possible"
    " security bugs: report them privately to those projects)"
)


def _target(ctx: _Context) -> Target:
    from pyxen9p.fuzz.target import SimTarget

    args = ctx.args
    if args.simulate_bugs is not None:
        if args.simulate is not None or args.dom0_backend is not None:
            raise UsageError("--simulate-bugs replaces --simulate and --dom0-backend")
        bugs = {b for b in args.simulate_bugs.split(",") if b and b != "none"}
        try:
            return SimTarget(bugs, workdir=args.workdir)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if args.simulate is not None:
        raise UsageError("--simulate DIR serves a real share; fuzz a simulated backend with"
                         " --simulate-bugs none (or a list of faults)")  # fmt: skip
    if args.server is not None:
        raise UsageError("--server is a 9P server, not a Xen 9pfs backend")
    from pyxen9p.fuzz.dom0 import DeviceTarget, Dom0Target
    from pyxen9p.fuzz.target import TargetError

    try:
        if args.dom0_backend is not None:
            if _selection(args):
                raise UsageError("--dom0-backend creates its own devices: no --tag/--devid/--path")
            workdir = args.workdir or tempfile.mkdtemp(prefix="pyxen9p-fuzz-", dir="/srv")
            return Dom0Target(args.dom0_backend, workdir)
        selection = _selection(args) or _only_device()
        path = selection.get("path")
        if path is None:
            from pyxen9p.cli._common import list_devices
            from pyxen9p.libs import RealXen

            with RealXen().open_xenstore() as store:
                _base, devices = list_devices(store)
            match = [d for d in devices if (str(selection.get("devid")) == d.devid
                                            or selection.get("tag") == d.tag)]  # fmt: skip
            if len(match) != 1:
                raise CommandError(f"no single 9pfs device matches {selection}")
            path = match[0].path
        return DeviceTarget(path, backend_pid=args.backend_pid)
    except TargetError as exc:
        raise CommandError(str(exc)) from exc
    except OSError as exc:
        raise CommandError(f"cannot reach Xen: {exc}") from exc


def _logger(ctx: _Context) -> Callable[[str], None]:
    def log(line: str) -> None:
        if ctx.verbose:
            ctx.stderr.write(line + "\n")
            ctx.stderr.flush()

    return log


def cmd_fuzz_backend(ctx: _Context) -> None:
    """Run the fuzzer (see the module documentation)."""
    from pyxen9p.fuzz.campaign import fuzz
    from pyxen9p.fuzz.generate import LAYERS

    args = ctx.args
    if not args.opt_in:
        raise UsageError(_REFUSAL)
    if args.cases is None and args.time is None:
        args.cases = 100
    layers = tuple(x for x in args.layers.split(",") if x)
    unknown = [x for x in layers if x not in LAYERS]
    if unknown or not layers:
        raise UsageError(f"unknown layers {unknown}; known: {', '.join(LAYERS)}")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="pyxen9p-fuzz-out-"))
    target = _target(ctx)
    ctx.stderr.write(f"pyxen9p fuzz-backend: seed {seed} (replay with --seed {seed});"
                     f" findings go to {out}\n")  # fmt: skip
    with target:
        summary = fuzz(
            target, seed=seed, cases=args.cases, seconds=args.time, layers=layers,
            first=args.first_case, out_dir=out, do_shrink=not args.no_shrink,
            log=_logger(ctx),
        )  # fmt: skip
    ctx.print(summary.line())
    for report in summary.reports:
        ctx.print(f"  {report.finding.summary()}")
        ctx.print(f"    case {report.case.number}: {len(report.case.steps)} steps, shrunk to"
                  f" {len(report.minimal.steps)}; reproducer: {report.directory}/reproduce.py")
    if summary.reports:
        ctx.status = 1


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument(OPT_IN, dest="opt_in", action="store_true",
                   help="required: confirm that the backend may crash (it is meant to)")
    p.add_argument("--seed", type=int, help="the run's seed (default: random, printed)")
    p.add_argument("--cases", type=_positive_int, help="stop after N cases (default 100"
                   " if --time is not given either)")
    p.add_argument("--time", type=_seconds, metavar="SECONDS", help="stop after SECONDS")
    p.add_argument("--first-case", type=int, default=0, metavar="N",
                   help="start at case N of the seed (to replay one case: --first-case N"
                        " --cases 1)")
    p.add_argument("--layers", default="xenbus,ring,p9",
                   help="comma list of xenbus, ring, p9 (default: all)")
    p.add_argument("--out", metavar="DIR", help="where findings go (default: a new temp dir)")
    p.add_argument("--no-shrink", action="store_true", help="do not shrink findings")
    p.add_argument("--simulate-bugs", metavar="BUGS",
                   help="fuzz the simulated backend with these deliberate faults (comma list of"
                        " reconnect-abort, mkdir-escape, stray-reply, hang; or none)")
    p.add_argument("--dom0-backend", choices=("qemu", "xen-9pfsd"),
                   help="in dom0: create devices for this backend and restart it after each"
                        " finding")
    p.add_argument("--workdir", metavar="DIR", help="with --dom0-backend or --simulate-bugs:"
                   " the directory whose export/ is served and whose other entries are watched")
    p.add_argument("--backend-pid", type=int, metavar="PID",
                   help="with a device chosen by --tag/--devid/--path: the backend's PID,"
                        " watched for crashes")


COMMANDS = (
    _Command("fuzz-backend", cmd_fuzz_backend, "fuzz a Xen 9pfs backend (crashes it)",
             "Act as a hostile Xen 9pfs frontend against a backend: XenBus states out of"
             " order, bad XenStore values, lying ring indices and interface pages, malformed"
             " 9P messages of both dialects.  Each finding (the backend died, left its state"
             " path, stopped answering, broke the ring rules, or let a file appear outside"
             " its export) is shrunk and written with its evidence and a standalone"
             " reproducer.  Refuses to start without " + OPT_IN + ".  Exit status 1 if"
             " anything was found.",
             "  pyxen9p fuzz-backend " + OPT_IN + " --simulate-bugs none --cases 50\n"
             "  pyxen9p fuzz-backend " + OPT_IN + " --dom0-backend qemu --seed 7 --time 600\n"
             "  pyxen9p --devid 0 fuzz-backend " + OPT_IN + " --backend-pid 1234", _args),
)
