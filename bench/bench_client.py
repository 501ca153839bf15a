#!/usr/bin/env python3
"""The 9P client's operations on many entries, on the simulated Xen, against the sequential way.

Both sides run in the same process, on the same simulated machine
(:class:`~pyxen9p.sim.platform.SimulatedXen`, a two-ring
:class:`~pyxen9p.frontend.Frontend`, the QEMU-like
:class:`~pyxen9p.sim.backend.Sim9pfsBackend` serving pyxen9p's
:class:`~pyxen9p.p9.server.FileServer` on a temporary directory), through the
same :class:`~pyxen9p.p9.client.Client`:

``ls_l``
    A listing of *N* files with the attributes of each, as ``pyxen9p ls -l``
    gets them (:meth:`~pyxen9p.p9.client.Client.scandir`, then
    :meth:`~pyxen9p.p9.client.DirEntry.stat` of each entry), against the
    sequential way: one blocking :meth:`~pyxen9p.p9.client.Client.rpc` per
    request (walk, open and read the directory; then a walk, a getattr and a
    clunk per entry, each waited for).
``put_r``
    *N* empty files copied into a new directory
    (:meth:`~pyxen9p.p9.client.Client.copy_in`, ``preserve=False``, as
    ``pyxen9p put -r``), against the requests the copy made one after another
    before (per file: a walk that stops short and the clunk of its fid, a
    walk to the directory, a Tlcreate, a Tclunk).
``rm_r``
    A directory of *N* files removed
    (:meth:`~pyxen9p.p9.client.Client.rmtree`, as ``pyxen9p rm -r``), against
    the sequential way (the listing, then per file a walk to the directory, a
    Tunlinkat and a Tclunk).

The rates are entries per second; a ratio above 1 means the client is faster
than the sequential way.  Each result's last ``#`` line splits the CPU per
entry by group of threads (the caller, the frontend's receiver, the client's
pools, the simulated backend's ring threads that run the server): the
server's share is paid by both sides alike and bounds the ratio.

The export and the local files live in a new temporary directory (under
``--dir``, default the system's temporary directory), whose file system is
printed: ``put_r`` creates *N* files there per repetition on each side, and
the host's kernel does that work in the server's thread.  On an ext4 without
a journal the kernel's inode allocator passes over every inode freed in the
last minutes (``recently_deleted``), so each creation there costs hundreds
of microseconds that depend on how many files anything on the machine
deleted just before (the benchmark deletes its own trees between
repetitions); ``--dir /dev/shm`` (tmpfs) measures pyxen9p without that.

Run ``python bench/bench_client.py`` (a few minutes: ``--entries`` to change
*N*, default 5,000), ``--quick`` for a smoke run.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from _common import (
    Options,
    Result,
    Sample,
    base_parser,
    comment,
    file_system,
    measure_pair,
    options_from,
    report,
    simulated_client,
    timed,
)

from pyxen9p.p9 import codec as c
from pyxen9p.p9.client import Client

#: Fids the sequential side uses (far from the client's own, which start at 0).
_FID0 = 1 << 20


class Sequential:
    """The sequential way: one blocking :meth:`Client.rpc` per request."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.root = client.session.root_fid
        self.fid = _FID0

    def rpc(self, message: c.Message) -> c.Message:
        return self.client.rpc(message)

    def walk(self, fid: int, names: tuple[str, ...]) -> c.Message:
        return self.rpc(c.Twalk(0, self.root, fid, names))

    def listing(self, directory: str) -> list[str]:
        fid = self.fid
        self.walk(fid, (directory,))
        try:
            self.rpc(c.Tlopen(0, fid, c.L_O_RDONLY))
            names: list[str] = []
            offset = 0
            while True:
                reply = self.rpc(c.Treaddir(0, fid, offset, self.client.msize - c.READDIRHDRSZ))
                assert isinstance(reply, c.Rreaddir)
                batch = reply.entries()
                if not batch:
                    return names
                names.extend(e.name for e in batch if e.name not in (".", ".."))
                offset = batch[-1].offset
        finally:
            self.rpc(c.Tclunk(0, fid))

    def lstat(self, directory: str, name: str) -> c.Message:
        fid = self.fid + 1
        self.walk(fid, (directory, name))
        try:
            return self.rpc(c.Tgetattr(0, fid, c.P9_GETATTR_BASIC))
        finally:
            self.rpc(c.Tclunk(0, fid))

    def create(self, directory: str, name: str) -> None:
        fid = self.fid + 1
        reply = self.walk(fid, (directory, name))
        assert isinstance(reply, c.Rwalk)
        if len(reply.wqids) == 2:
            raise RuntimeError(f"{directory}/{name} exists")
        try:  # the client clunks the fid of a partial walk in every case
            self.rpc(c.Tclunk(0, fid))
        except OSError:
            pass
        self.walk(fid, (directory,))
        try:
            flags = c.L_O_WRONLY | c.L_O_CREAT | c.L_O_TRUNC
            self.rpc(c.Tlcreate(0, fid, name, flags, 0o644, self.client.gid))
        finally:
            self.rpc(c.Tclunk(0, fid))

    def mkdir(self, name: str) -> None:
        fid = self.fid + 1
        self.walk(fid, ())
        try:
            self.rpc(c.Tmkdir(0, fid, name, 0o755, self.client.gid))
        finally:
            self.rpc(c.Tclunk(0, fid))

    def unlink(self, directory: tuple[str, ...], name: str, flags: int = 0) -> None:
        fid = self.fid + 1
        self.walk(fid, directory)
        try:
            self.rpc(c.Tunlinkat(0, fid, name, flags))
        finally:
            self.rpc(c.Tclunk(0, fid))


def run(entries: int, rings: int, options: Options, where: str | None = None) -> list[Result]:
    """Measure the three operations on *entries* entries (in a temporary
    directory under *where*, default the system's); print and return the results."""
    out = sys.stdout
    results: list[Result] = []
    work = Path(tempfile.mkdtemp(prefix="bench-client-", dir=where))
    comment(f"export and local files in {work} ({file_system(work)})", out)
    try:
        export = work / "export"
        export.mkdir()
        local = work / "local"
        local.mkdir()
        for i in range(entries):
            (local / f"f{i:06d}").touch()
        listed = export / "listed"
        listed.mkdir()
        for i in range(entries):
            (listed / f"f{i:06d}").write_bytes(b"x" * (i % 7))
        with simulated_client(export, rings) as client:
            seq = Sequential(client)
            comment(
                f"{entries} entries; simulated Xen, rings={client.transport.num_rings}"  # type: ignore[attr-defined]
                f" msize={client.msize} pipelined={client.pipelined} batch={client.batch}"
                f" tree_workers={client.tree_workers}; {options.repeat} repetitions"
                f" (median), {options.warmup} warm-up",
                out,
            )
            counter = iter(range(1 << 30))

            def p_ls() -> Sample:
                with timed(entries) as t:
                    rows = [
                        (e.name, e.stat(follow_symlinks=False))
                        for e in sorted(client.scandir("listed"), key=lambda e: e.name)
                    ]
                if len(rows) != entries or rows[5][1].st_size != 5:
                    raise RuntimeError("ls -l listed the wrong entries")
                return t.sample

            def s_ls() -> Sample:
                with timed(entries) as t:
                    rows = [(n, seq.lstat("listed", n)) for n in sorted(seq.listing("listed"))]
                if len(rows) != entries:
                    raise RuntimeError("the sequential listing is wrong")
                return t.sample

            def p_put() -> Sample:
                name = f"put-p{next(counter)}"
                with timed(entries) as t:
                    client.copy_in(local, name, preserve=False)
                if len(os.listdir(export / name)) != entries:
                    raise RuntimeError("put -r copied the wrong entries")
                shutil.rmtree(export / name)
                return t.sample

            def s_put() -> Sample:
                name = f"put-s{next(counter)}"
                with timed(entries) as t:
                    seq.mkdir(name)
                    for n in sorted(os.listdir(local)):
                        seq.create(name, n)
                if len(os.listdir(export / name)) != entries:
                    raise RuntimeError("the sequential put is wrong")
                shutil.rmtree(export / name)
                return t.sample

            def tree() -> str:
                name = f"rm-{next(counter)}"
                (export / name).mkdir()
                for i in range(entries):
                    (export / name / f"f{i:06d}").touch()
                return name

            def p_rm() -> Sample:
                name = tree()
                with timed(entries) as t:
                    client.rmtree(name)
                if (export / name).exists():
                    raise RuntimeError("rm -r left the directory")
                return t.sample

            def s_rm() -> Sample:
                name = tree()
                with timed(entries) as t:
                    for n in seq.listing(name):
                        seq.unlink((name,), n)
                    seq.unlink((), name, c.AT_REMOVEDIR)
                if (export / name).exists():
                    raise RuntimeError("the sequential rm left the directory")
                return t.sample

            plan: list[tuple[str, Callable[[], Sample], Callable[[], Sample]]] = [
                ("ls_l", p_ls, s_ls),
                ("put_r", p_put, s_put),
                ("rm_r", p_rm, s_rm),
            ]
            for name, subject, reference in plan:
                sub, ref = measure_pair(subject, reference, options)
                result = Result(
                    name, "client", "sequential", "entry", sub, ref,
                    {"entries": entries, "rings": rings, "batch": client.batch,
                     "tree_workers": client.tree_workers},
                )  # fmt: skip
                result.print_lines(out)
                results.append(result)
            if client.fid_count != 1:
                raise RuntimeError(f"{client.fid_count - 1} fids left in use")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point; see ``--help``."""
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--entries", type=int, default=None,
                        help="entries of each operation (default 5000; 40 with --quick)")
    parser.add_argument("--rings", type=int, default=2, help="rings of the frontend (default 2)")
    parser.add_argument("--dir", default=None,
                        help="where the temporary export is made (default: the system's"
                        " temporary directory; its file system is printed)")
    parser.set_defaults(repeat=None)
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    options = options_from(args)
    entries = args.entries or (40 if options.quick else 5000)
    results = run(entries, args.rings, options, args.dir)
    report(results, args.json, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
