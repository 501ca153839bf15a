#!/usr/bin/env python3
"""The FUSE mount's throughput, and the two bindings it could be built on, measured.

Each *subject* serves a simulated Xen share (``pyxen9p.connect(simulate=DIR)``)
to a mount point in a process of its own; the same work runs on each:

``write``
    a new file written sequentially in 1 MiB ``write()`` calls, then ``fsync``;
``read``
    that file read back sequentially in 1 MiB ``read()`` calls (the mounts keep
    no page cache across opens, so every byte crosses FUSE and 9P);
``ls -l``
    ``ls -l`` of a directory of 1,000 files, once the kernel's cached names
    and attributes have expired (1 s).

Subjects: ``mfusepy``, pyxen9p's mount (:mod:`pyxen9p.mount`, libfuse 3's
high-level path API through ctypes); ``pyfuse3``, a minimal file system on
pyfuse3's low-level inode API (this script's :class:`Pyfuse3Share`: lookup,
getattr, readdirplus, open, create, read, write, fsync, release, forget, over
the same client calls, each run in a worker thread of trio); ``client``, the
same work through the :class:`~pyxen9p.p9.client.Client` in this process, no
FUSE (``ls -l``: ``scandir`` and ``lstat`` of each entry); ``local``, the plain
directory.  The subjects whose package is missing are left out.

Output: one line per subject and measure, the median of ``--repeat`` runs::

    fuse write mfusepy: 41.2 MiB/s (runs: 40.1 41.2 43.0)

Run as root (or with access to ``/dev/fuse`` and ``fusermount3``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MIB = 1 << 20


# --- the pyfuse3 file system (measurement only) ---------------------------------------


def serve_pyfuse3(directory: str, mountpoint: str) -> None:  # pragma: no cover - subprocess
    """Serve *directory* (simulated share) on *mountpoint* with pyfuse3 until unmounted."""
    import pyfuse3
    import trio

    import pyxen9p
    from pyxen9p.mount import errno_for
    from pyxen9p.p9 import codec as c

    client = pyxen9p.connect(simulate=directory)
    client.umask = 0

    class Pyfuse3Share(pyfuse3.Operations):  # type: ignore[misc]
        """A minimal pyfuse3 file system over the client (inode -> path table)."""

        supports_dot_lookup = False
        enable_writeback_cache = False

        def __init__(self) -> None:
            super().__init__()
            self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: ""}
            self.lookups: dict[int, int] = {}
            self.handles: dict[int, tuple[int, int, str]] = {}
            self.dirs: dict[int, tuple[str, list[str] | None]] = {}
            self.next_fh = 1

        async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
            try:
                return await trio.to_thread.run_sync(fn, *args)
            except Exception as exc:
                raise pyfuse3.FUSEError(errno_for(exc)) from exc

        def inode(self, st: os.stat_result, path: str) -> int:
            if path == "":
                return pyfuse3.ROOT_INODE
            self.paths[st.st_ino] = path
            return st.st_ino

        def entry(self, st: os.stat_result, path: str) -> Any:
            e = pyfuse3.EntryAttributes()
            e.st_ino = self.inode(st, path)
            for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_rdev",
                         "st_blksize", "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
                setattr(e, name, getattr(st, name))
            e.entry_timeout = e.attr_timeout = 1.0
            return e

        def child(self, parent: int, name: bytes) -> str:
            base = self.paths[parent]
            text = os.fsdecode(name)
            return f"{base}/{text}" if base else text

        async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> Any:
            path = self.child(parent, name)
            st = await self.call(client.lstat, path)
            self.lookups[st.st_ino] = self.lookups.get(st.st_ino, 0) + 1
            return self.entry(st, path)

        async def forget(self, inode_list: list[tuple[int, int]]) -> None:
            for ino, n in inode_list:
                left = self.lookups.get(ino, 0) - n
                if left <= 0:
                    self.lookups.pop(ino, None)
                    if ino != pyfuse3.ROOT_INODE:
                        self.paths.pop(ino, None)
                else:
                    self.lookups[ino] = left

        async def getattr(self, inode: int, ctx: Any = None) -> Any:
            path = self.paths[inode]
            return self.entry(await self.call(client.lstat, path), path)

        async def opendir(self, inode: int, ctx: Any) -> int:
            fh = self.next_fh
            self.next_fh += 1
            self.dirs[fh] = (self.paths[inode], None)
            return fh

        async def readdir(self, fh: int, start_id: int, token: Any) -> None:
            path, names = self.dirs[fh]
            if names is None:  # listed once per opendir, as libfuse's high-level API does
                names = await self.call(client.listdir, path)
                self.dirs[fh] = (path, names)
            while start_id < len(names):
                batch = names[start_id:start_id + 64]
                full = [f"{path}/{n}" if path else n for n in batch]
                stats = await self.call(lambda paths=full: [client.lstat(f) for f in paths])
                for name, f, st in zip(batch, full, stats, strict=True):
                    start_id += 1
                    if not pyfuse3.readdir_reply(token, os.fsencode(name), self.entry(st, f),
                                                 start_id):
                        return
                    self.lookups[st.st_ino] = self.lookups.get(st.st_ino, 0) + 1

        async def releasedir(self, fh: int) -> None:
            self.dirs.pop(fh, None)

        def add(self, fid: int, iounit: int, path: str) -> int:
            fh = self.next_fh
            self.next_fh += 1
            self.handles[fh] = (fid, iounit, path)
            return fh

        async def open(self, inode: int, flags: int, ctx: Any) -> Any:
            path = self.paths[inode]

            def do() -> int:
                fid, _q, display = client._lookup(path, follow=False)
                wire = flags & os.O_ACCMODE
                reply = client._rpc(lambda t: c.Tlopen(t, fid, wire), c.Rlopen, display)
                return self.add(fid, client._iounit(reply.iounit), display)

            return pyfuse3.FileInfo(fh=await self.call(do), keep_cache=False)

        async def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
            path = self.child(parent, name)

            def do() -> int:
                dfid, nm, display = client._lookup_parent(path, errno.EISDIR)
                wire = (flags & os.O_ACCMODE) | c.L_O_CREAT
                reply = client._rpc(
                    lambda t: c.Tlcreate(t, dfid, nm, wire, mode & 0o7777, client.gid),
                    c.Rlcreate, display)
                return self.add(dfid, client._iounit(reply.iounit), display)

            fh = await self.call(do)
            st = await self.call(client.lstat, path)
            self.lookups[st.st_ino] = self.lookups.get(st.st_ino, 0) + 1
            return pyfuse3.FileInfo(fh=fh, keep_cache=False), self.entry(st, path)

        async def read(self, fh: int, off: int, size: int) -> bytes:
            fid, iounit, path = self.handles[fh]

            def do() -> bytes:
                buf = bytearray(size)
                view = memoryview(buf)
                total = 0
                while total < size:
                    n = client._pread_into(fid, off + total, view[total:], iounit, path)
                    if n == 0:
                        break
                    total += n
                return bytes(view[:total])

            return await self.call(do)

        async def write(self, fh: int, off: int, buf: bytes) -> int:
            fid, iounit, path = self.handles[fh]
            return await self.call(
                lambda: client._pwrite_from(fid, off, memoryview(buf), iounit, path,
                                            parallel=True))

        async def fsync(self, fh: int, datasync: bool) -> None:
            fid, _, path = self.handles[fh]
            await self.call(client._fsync_fid, fid, path, datasync)

        async def flush(self, fh: int) -> None:
            pass

        async def release(self, fh: int) -> None:
            fid, _, _ = self.handles.pop(fh)
            await self.call(client._clunk_quiet, fid)

    options = set(pyfuse3.default_options)
    options.update({"fsname=pyfuse3bench", "subtype=pyxen9p"})
    pyfuse3.init(Pyfuse3Share(), mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
        client.close()


def serve_mfusepy(directory: str, mountpoint: str) -> None:  # pragma: no cover - subprocess
    """Serve *directory* (simulated share) on *mountpoint* with :func:`pyxen9p.mount.mount`."""
    import pyxen9p
    from pyxen9p.mount import mount

    mount(lambda: pyxen9p.connect(simulate=directory), mountpoint, foreground=True)


# --- measuring ------------------------------------------------------------------------


def _is_mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == str(path) for line in mounts)


@contextlib.contextmanager
def mounted(binding: str, directory: Path, mountpoint: Path) -> Iterator[Path]:
    """A mount of *directory* served by a child process with *binding*; unmounted after."""
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", binding, str(directory), str(mountpoint)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 30
        while not _is_mounted(mountpoint):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{binding}: the mount did not come up")
            time.sleep(0.05)
        yield mountpoint
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
            process.kill()
            process.wait()


def timed(fn: Callable[[], object]) -> float:
    """Seconds *fn* took (or the seconds it returns: it timed itself)."""
    start = time.perf_counter()
    own = fn()
    return own if isinstance(own, float) else time.perf_counter() - start


def file_work(root: Path, size: int, n: int) -> dict[str, Callable[[], object]]:
    """The three measures on a file-system view at *root* (a mount or the directory)."""
    chunk = os.urandom(MIB)

    def write() -> None:
        with open(root / f"big{n}", "wb") as f:
            for _ in range(size // MIB):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())

    def read() -> None:
        with open(root / f"big{n}", "rb", buffering=0) as f:
            while f.read(MIB):
                pass

    def ls_l() -> float:
        time.sleep(1.1)  # the kernel's cached entries and attributes expire
        start = time.perf_counter()
        subprocess.run(["ls", "-l", str(root / "many")], stdout=subprocess.DEVNULL, check=True)
        return time.perf_counter() - start

    return {"write": write, "read": read, "ls -l": ls_l}


def client_work(client: Any, size: int, n: int) -> dict[str, Callable[[], object]]:
    chunk = os.urandom(MIB)

    def write() -> None:
        with client.open(f"cbig{n}", "wb", buffering=0) as f:
            for _ in range(size // MIB):
                f.write(chunk)
            f.raw.fsync() if hasattr(f, "raw") else f.fsync()

    def read() -> None:
        with client.open(f"cbig{n}", "rb", buffering=0) as f:
            while f.read(MIB):
                pass

    def ls_l() -> None:
        with client.scandir("many") as it:
            for e in it:
                e.stat(follow_symlinks=False)

    return {"write": write, "read": read, "ls -l": ls_l}


def report(subject: str, results: dict[str, list[float]], size: int) -> None:
    for measure, times in results.items():
        if measure == "ls -l":
            runs = " ".join(f"{t * 1000:.0f}" for t in times)
            print(f"fuse {measure} {subject}: {statistics.median(times) * 1000:.0f} ms"
                  f" (runs: {runs})", flush=True)
            continue
        rates = [size / MIB / t for t in times]
        runs = " ".join(f"{r:.1f}" for r in rates)
        print(f"fuse {measure} {subject}: {statistics.median(rates):.1f} MiB/s (runs: {runs})",
              flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", nargs=3, metavar=("BINDING", "DIR", "MOUNTPOINT"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--mib", type=int, default=64, help="file size for write/read")
    parser.add_argument("--files", type=int, default=1000, help="files for ls -l")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run (figures meaningless)")
    parser.add_argument("--only", nargs="+", default=["local", "client", "mfusepy", "pyfuse3"])
    args = parser.parse_args()
    if args.serve:
        binding, directory, mountpoint = args.serve
        {"mfusepy": serve_mfusepy, "pyfuse3": serve_pyfuse3}[binding](directory, mountpoint)
        return 0
    if args.quick:
        args.mib, args.files, args.repeat = 2, 20, 1
    size = args.mib * MIB
    with tempfile.TemporaryDirectory() as tmp:
        share = Path(tmp) / "share"
        (share / "many").mkdir(parents=True)
        for i in range(args.files):
            (share / "many" / f"file{i:04d}").write_bytes(b"x" * i)
        for subject in args.only:
            results: dict[str, list[float]] = {"write": [], "read": [], "ls -l": []}
            try:
                if subject == "local":
                    for n in range(args.repeat):
                        for measure, fn in file_work(share, size, n).items():
                            results[measure].append(timed(fn))
                elif subject == "client":
                    import pyxen9p

                    with pyxen9p.connect(simulate=share) as client:
                        for n in range(args.repeat):
                            for measure, fn in client_work(client, size, n).items():
                                results[measure].append(timed(fn))
                else:
                    __import__({"mfusepy": "mfusepy", "pyfuse3": "pyfuse3"}[subject])
                    mnt = Path(tmp) / f"mnt-{subject}"
                    mnt.mkdir()
                    with mounted(subject, share, mnt):
                        for n in range(args.repeat):
                            for measure, fn in file_work(mnt, size, n).items():
                                results[measure].append(timed(fn))
            except ImportError as exc:
                print(f"# {subject}: left out ({exc})", flush=True)
                continue
            report(subject, results, size)
            for f in share.glob("*big*"):
                f.unlink()
    print(f"# {args.mib} MiB files, {args.files} files listed, {args.repeat} runs,"
          f" {os.cpu_count()} CPUs, Python {sys.version.split()[0]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
