#!/usr/bin/env python3
"""The agent's multiplexer against a direct connection, on a real Xen (run in dom0).

One dom0 directory is exported on two devices of the same dom0 QEMU (its Xen
9pfs backend), both with frontends outside ``device/``.  The agent
(``python3 -m pyxen9p.cli --path DEV_A serve``, a process of its own) holds
device A and listens on a Unix socket; the subject is a pyxen9p client of that
socket (``pyxen9p.connect(server="unix:...")``: client -> Unix socket ->
multiplexer -> Xen rings -> QEMU), the reference a pyxen9p client connected
directly to device B (``pyxen9p.connect(path=DEV_B)``: client -> Xen rings ->
QEMU).  Both use 2 rings of order 7 (gntalloc's 1024 grants hold two such
connections, not two of the default order 8).  Each benchmark alternates
the two sides (see ``bench/_common.py``) and prints the median rate of each
and the ratio ``agent / direct``::

    stat: agent=... op/s direct=... op/s ratio=...
    seq_read: agent=... MB/s direct=... MB/s ratio=...
    seq_write: agent=... MB/s direct=... MB/s ratio=...

The CPU comment lines count this process only (not the agent's).

It needs dom0 of a real Xen with the lab's helpers: run it through the
real-Xen harness (``docs/realxen.rst``)::

    python3 tests/xen/run.py --group agent --bench --pytest-args "-k benchmark"

or by hand in dom0 on a freshly started dom0 QEMU: ``PYTHONPATH=<repo>:<repo>/tests/xen/guest
python3 bench/bench_realxen_agent.py``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for extra in (str(REPO), str(REPO / "tests" / "xen" / "guest"), str(HERE)):
    if extra not in sys.path:
        sys.path.append(extra)

import kernel_helpers  # noqa: E402
import xenlab  # noqa: E402
from _common import (  # noqa: E402
    MB,
    Options,
    Result,
    Sample,
    base_parser,
    comment,
    measure_pair,
    options_from,
    report,
    timed,
)

import pyxen9p  # noqa: E402
from pyxen9p.p9.client import Client  # noqa: E402

#: Bytes per ``read``/``write`` call on both sides.
CHUNK = 1 << 20
#: Rings and ring order of both connections.
RINGS, ORDER = 2, 7


@contextlib.contextmanager
def _agent(frontend: str, socket: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``pyxen9p --path FRONTEND serve --listen unix:SOCKET``, stopped by SIGTERM at the end."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")]))
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyxen9p.cli", "-q", "--path", frontend, "--rings", str(RINGS),
         "--ring-order", str(ORDER), "serve", "--listen", f"unix:{socket}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not socket.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"the agent exited with status {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the agent did not listen on {socket} within 90s")
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run(size_mib: int, ops: int, options: Options) -> list[Result]:
    """Set both connections up on a fresh dom0 directory, measure, tear everything down.

    :param size_mib: size of the sequential file in MiB
    :param ops: operations per repetition of the stat benchmark
    :returns: the results
    """
    out = sys.stdout
    base = Path("/srv/share")
    base.mkdir(parents=True, exist_ok=True)
    share = Path(tempfile.mkdtemp(prefix="bench-agent-", dir=base))
    sockdir = Path(tempfile.mkdtemp(prefix="bench-agent-sock-"))
    size = size_mib << 20
    data = memoryview(os.urandom(size))
    buf = bytearray(CHUNK)
    results: list[Result] = []
    (share / "small").write_bytes(b"x" * 4096)
    try:
        with contextlib.ExitStack() as stack:
            dev_a = stack.enter_context(
                xenlab.dom0_9pfs_device(share, "bagent", devid=kernel_helpers.fresh_devid())
            )
            dev_b = stack.enter_context(
                xenlab.dom0_9pfs_device(share, "bdirect", devid=kernel_helpers.fresh_devid())
            )
            socket = sockdir / "agent.sock"
            stack.enter_context(_agent(dev_a.frontend, socket))
            via = stack.enter_context(pyxen9p.connect(server=f"unix:{socket}", timeout=60))
            direct = stack.enter_context(
                pyxen9p.connect(
                    path=dev_b.frontend, rings=RINGS, ring_order=ORDER, timeout=60, agent="never"
                )
            )
            fe = direct.transport
            comment(
                f"agent: msize={via.msize} window={via.window}; direct: msize={direct.msize}"
                f" window={direct.window} rings={fe.num_rings}"  # type: ignore[attr-defined]
                f" ring_order={fe.ring_order}",  # type: ignore[attr-defined]
                out,
            )
            comment(
                f"file {size} bytes in {CHUNK}-byte calls; {ops} stats per repetition;"
                f" {options.repeat} repetitions (median), {options.warmup} warm-up",
                out,
            )

            def stat(client: Client) -> Callable[[], Sample]:
                def once() -> Sample:
                    with timed(ops) as t:
                        for _ in range(ops):
                            client.stat("small")
                    return t.sample

                return once

            def write(client: Client, name: str) -> Callable[[], Sample]:
                def once() -> Sample:
                    with timed(size / MB) as t, client.open(name, "wb", buffering=0) as f:
                        for at in range(0, size, CHUNK):
                            f.write(data[at : at + CHUNK])
                    return t.sample

                return once

            def read(client: Client, name: str) -> Callable[[], Sample]:
                def once() -> Sample:
                    total = 0
                    with timed(size / MB) as t, client.open(name, "rb", buffering=0) as f:
                        while n := f.readinto(buf):
                            total += n
                    if total != size:
                        raise RuntimeError(f"read {total} bytes of {size}")
                    return t.sample

                return once

            plan: list[tuple[str, str, Callable[[], Sample], Callable[[], Sample]]] = [
                ("stat", "op", stat(via), stat(direct)),
                ("seq_write", "MB", write(via, "seq-a"), write(direct, "seq-d")),
                ("seq_read", "MB", read(via, "seq-a"), read(direct, "seq-d")),
            ]
            for name, per, subject, reference in plan:
                sub, ref = measure_pair(subject, reference, options)
                result = Result(
                    name, "agent", "direct", per, sub, ref,
                    {"size": size, "chunk": CHUNK, "ops": ops, "agent_msize": via.msize,
                     "direct_msize": direct.msize, "rings": RINGS, "ring_order": ORDER},
                )  # fmt: skip
                print(result.line(), file=out, flush=True)
                print(result.cpu_line(), file=out, flush=True)
                results.append(result)
                if name == "seq_write":
                    for written in ("seq-a", "seq-d"):
                        if (share / written).read_bytes() != data:
                            raise RuntimeError(f"{written} does not hold the data written")
    finally:
        shutil.rmtree(share, ignore_errors=True)
        shutil.rmtree(sockdir, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point; see ``--help``."""
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--size-mib", type=int, default=None,
                        help="sequential file size in MiB (default 16; 2 with --quick)")
    parser.add_argument("--ops", type=int, default=None,
                        help="stats per repetition (default 100; 20 with --quick)")
    parser.set_defaults(repeat=None)
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 2 if args.quick else 5
    options = options_from(args)
    if not xenlab.is_dom0():
        raise SystemExit("bench_realxen_agent.py runs in dom0 of a real Xen (see its --help)")
    size = args.size_mib or (2 if options.quick else 16)
    ops = args.ops or (20 if options.quick else 100)
    results = run(size, ops, options)
    report(results, args.json, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
