#!/usr/bin/env python3
"""Benchmarks of the 9P multiplexer, each against a direct connection measured in the same run.

Both sides use pyxen9p's :class:`~pyxen9p.p9.client.Client` and the same
:class:`~pyxen9p.p9.server.FileServer` exporting a temporary directory; the
subject goes through a :class:`~pyxen9p.p9.mux.MultiplexerThread` (client
-> Unix socket -> multiplexer -> socketpair -> server), the reference talks
to the server over a socketpair of its own (client -> socketpair -> server).

``mux_stat``
    ``Client.stat`` of one file, repeated (each is a Twalk, a Tgetattr and a
    Tclunk): the multiplexer's cost per small request.
``mux_read_large``
    ``Client.read_bytes`` of a large file (msize-sized Treads, the client's
    default window in flight): the multiplexer's cost per byte.
``mux_stat_<N>clients``
    ``mux_stat`` from N clients in N threads at once, through one
    multiplexer, against N direct sessions of the same server.

Run ``python bench/bench_mux.py`` (about half a minute), ``--quick`` for a
smoke run, ``--json PATH`` for machine-readable results.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

from _common import (
    MB,
    Options,
    Result,
    Sample,
    base_parser,
    comment,
    environment,
    measure_pair,
    options_from,
    report,
    timed,
)

from pyxen9p.p9.client import Client
from pyxen9p.p9.mux import MultiplexerThread
from pyxen9p.p9.server import FileServer
from pyxen9p.p9.transport import StreamTransport


@contextlib.contextmanager
def _served(server: FileServer) -> Iterator[StreamTransport]:
    """A transport to a new session of *server* (served by a thread over a socketpair)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    thread = threading.Thread(target=server.serve_socket, args=(theirs,), daemon=True)
    thread.start()
    transport = StreamTransport.from_socket(ours)
    try:
        yield transport
    finally:
        transport.close()
        thread.join(10)
        theirs.close()


class _Setup:
    """A FileServer, a multiplexer on one session of it, and ways to get clients."""

    def __init__(self, root: Path, stack: contextlib.ExitStack) -> None:
        self.root = root
        self.server = stack.enter_context(FileServer(root))
        self.stack = stack
        backend = stack.enter_context(_served(self.server))
        self.mux = stack.enter_context(MultiplexerThread(backend))
        self.path = self.mux.listen_unix(root.parent / "mux.sock")

    def via_mux(self) -> Client:
        return self.stack.enter_context(
            Client(StreamTransport.unix(self.path), aname=str(self.root), timeout=60)
        )

    def direct(self) -> Client:
        transport = self.stack.enter_context(_served(self.server))
        return self.stack.enter_context(
            Client(transport, aname=str(self.root), timeout=60, close_transport=False)
        )


def _stats(clients: list[Client], count: int) -> Callable[[], Sample]:
    def run() -> Sample:
        errors: list[BaseException] = []

        def work(fs: Client) -> None:
            try:
                for _ in range(count):
                    fs.stat("small")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(fs,)) for fs in clients]
        with timed(count * len(clients)) as t:
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        if errors:
            raise errors[0]
        return t.sample

    return run


def _reads(fs: Client, size: int) -> Callable[[], Sample]:
    def run() -> Sample:
        with timed(size / MB) as t:
            data = fs.read_bytes("large")
        if len(data) != size:
            raise AssertionError(f"read {len(data)} bytes of {size}")
        return t.sample

    return run


def bench_stat(
    setup: _Setup, clients: int, count: int, options: Options, out: TextIO
) -> Result:
    """``stat`` round trips from *clients* clients through the multiplexer and directly."""
    name = "mux_stat" if clients == 1 else f"mux_stat_{clients}clients"
    comment(f"{name}: {clients} client(s) x {count} stats of one file", out)
    subject = _stats([setup.via_mux() for _ in range(clients)], count)
    reference = _stats([setup.direct() for _ in range(clients)], count)
    runs = measure_pair(subject, reference, options)
    return Result(name, "mux", "direct", "stat", *runs, {"clients": clients, "count": count})


def bench_read(setup: _Setup, size: int, options: Options, out: TextIO) -> Result:
    """A large file read through the multiplexer and directly."""
    via, direct = setup.via_mux(), setup.direct()
    comment(f"mux_read_large: {size} bytes, msize {via.msize}, window {via.window}", out)
    runs = measure_pair(_reads(via, size), _reads(direct, size), options)
    return Result("mux_read_large", "mux", "direct", "MB", *runs, {"size": size})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the multiplexer benchmarks; print one ratio line each.

    :returns: the process exit status
    """
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "multiplexer benchmarks")
    parser.add_argument(
        "--clients", type=int, default=4, help="clients of the N-client run (default 4)"
    )
    args = parser.parse_args(argv)
    options = options_from(args)
    if args.clients < 1:
        parser.error("--clients must be >= 1")
    out = sys.stderr if args.json == "-" else sys.stdout
    stat_count = 20 if options.quick else 1000
    threaded_count = 10 if options.quick else 300
    size = (1 if options.quick else 64) * 1024 * 1024
    env = environment()
    comment(
        f"python {env['python']} on {env['machine']}, {env['cpus']} CPUs, load {env['loadavg']};"
        f" {options.warmup} warm-up + {options.repeat} timed repetitions, medians",
        out,
    )
    results: list[Result] = []

    def emit(result: Result) -> None:
        results.append(result)
        print(result.line(), file=out, flush=True)
        print(result.cpu_line(), file=out, flush=True)

    with tempfile.TemporaryDirectory(prefix="pyxen9p-bench-mux-") as tmp, \
            contextlib.ExitStack() as stack:  # fmt: skip
        root = Path(tmp) / "export"
        root.mkdir()
        (root / "small").write_bytes(b"x" * 100)
        (root / "large").write_bytes(os.urandom(size))
        setup = _Setup(root, stack)
        emit(bench_stat(setup, 1, stat_count, options, out))
        emit(bench_read(setup, size, options, out))
        if args.clients > 1:
            emit(bench_stat(setup, args.clients, threaded_count, options, out))
    report(results, args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
