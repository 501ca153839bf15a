#!/usr/bin/env python3
"""``pyxen9p mount`` (FUSE) next to the kernel's own 9pnet_xen mount, on a real Xen (in dom0).

One dom0 directory is exported on two devices of dom0's QEMU (its Xen 9pfs
backend): a ``device/9pfs/<devid>`` device that the dom0 kernel's
``9pnet_xen`` takes and mounts (``mount -t 9p -o
trans=xen,version=9p2000.L,cache=none,msize=262144``), and a device whose
frontend is outside ``device/``, mounted by ``pyxen9p --path DEV --direct
mount DIR`` (FUSE over mfusepy, a process of its own, pyxen9p's default ring
layout).  The same programs' calls run on both mounts, alternately (see
``bench/_common.py``), and the median rate of each and the ratio ``fuse /
kernel`` are printed::

    seq_write: fuse=... MB/s kernel=... MB/s ratio=...
    seq_read: fuse=... MB/s kernel=... MB/s ratio=...
    ls_l: fuse=... op/s kernel=... op/s ratio=...

``seq_write`` writes a file in 1 MiB ``write`` calls; ``seq_read`` reads it
back in 1 MiB calls after the page cache was dropped; ``ls_l`` lists a
directory of many files and ``lstat`` s each (what ``ls -l`` does; one op is
one file), dentries and inodes dropped first.  The kernel's ``cache=none``
makes each call a 9P request; FUSE keeps attributes and names for one second
(its default), which the drop undoes.

It needs dom0 of a real Xen with the lab's helpers, FUSE and mfusepy: run it
through the real-Xen harness (``docs/realxen.rst``)::

    python3 tests/xen/run.py --group agent --bench --pytest-args "-k fuse_against"
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
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

#: Bytes per ``read``/``write`` call on both mounts.
CHUNK = 1 << 20
#: The kernel mount's msize (pyxen9p's default layout carries 256 KiB messages).
KERNEL_MSIZE = 262144


def _cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "pyxen9p.cli", *args], capture_output=True, text=True,
        timeout=timeout, env=env, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip


@contextlib.contextmanager
def fuse_mount(frontend: str, mountpoint: Path) -> Iterator[None]:
    """``pyxen9p --path FRONTEND --direct mount MOUNTPOINT``, unmounted at the end."""
    xenlab.ensure_modules("fuse")
    mountpoint.mkdir(parents=True, exist_ok=True)
    done = _cli("-q", "--path", frontend, "--direct", "mount", str(mountpoint))
    if done.returncode != 0:
        raise RuntimeError(f"pyxen9p mount failed: {done.stderr.strip()}")
    try:
        yield
    finally:
        _cli("umount", str(mountpoint))
        if kernel_helpers.mounted(mountpoint) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False,
                           timeout=60)  # fmt: skip


def _write(path: Path, data: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for at in range(0, data.nbytes, CHUNK):
            piece = data[at : at + CHUNK]
            done = 0
            while done < piece.nbytes:
                done += os.write(fd, piece[done:])
    finally:
        os.close(fd)


def _read(path: Path, buf: bytearray) -> int:
    total = 0
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        while got := os.readv(fd, [view]):
            total += got
    finally:
        os.close(fd)
    return total


def _ls_l(directory: Path) -> int:
    names = os.listdir(directory)
    for name in names:
        os.lstat(directory / name)
    return len(names)


def run(size_mib: int, files: int, options: Options) -> list[Result]:
    """Set both mounts up on a fresh dom0 directory, measure, tear everything down.

    :param size_mib: size of the sequential file in MiB
    :param files: files in the listed directory
    :returns: the results
    """
    out = sys.stdout
    base = Path("/srv/share")
    base.mkdir(parents=True, exist_ok=True)
    share = Path(tempfile.mkdtemp(prefix="bench-fuse-", dir=base))
    os.chmod(share, 0o755)
    kmnt = Path(tempfile.mkdtemp(prefix="bench-fuse-k-"))
    fmnt = Path(tempfile.mkdtemp(prefix="bench-fuse-f-"))
    size = size_mib << 20
    data = memoryview(os.urandom(size))
    buf = bytearray(CHUNK)
    many = share / "many"
    many.mkdir()
    for n in range(files):
        (many / f"file-{n:05d}").write_bytes(b"x" * (n % 100))
    loaded = kernel_helpers.load_kernel_9p()
    results: list[Result] = []
    try:
        opts = f"{kernel_helpers.KERNEL_MOUNT_OPTIONS},msize={KERNEL_MSIZE}"
        with (
            kernel_helpers.kernel_mount(share, kmnt, "fusebk", options=opts) as km,
            xenlab.dom0_9pfs_device(share, "fusebf", devid=kernel_helpers.fresh_devid()) as dev,
            fuse_mount(dev.frontend, fmnt),
        ):
            comment(f"kernel: msize={km.msize} options={kernel_helpers.mounted(kmnt)};"
                    f" fuse: {kernel_helpers.mounted(fmnt)}", out)  # fmt: skip
            comment(
                f"file {size} bytes in {CHUNK}-byte calls; ls -l of {files} files;"
                f" {options.repeat} repetitions (median), {options.warmup} warm-up",
                out,
            )

            def write(mnt: Path, name: str) -> Callable[[], Sample]:
                def once() -> Sample:
                    with timed(size / MB) as t:
                        _write(mnt / name, data)
                    return t.sample

                return once

            def read(mnt: Path, name: str) -> Callable[[], Sample]:
                def once() -> Sample:
                    kernel_helpers.drop_caches()
                    with timed(size / MB) as t:
                        total = _read(mnt / name, buf)
                    if total != size:
                        raise RuntimeError(f"read {total} bytes of {size} from {mnt / name}")
                    return t.sample

                return once

            def ls_l(mnt: Path) -> Callable[[], Sample]:
                def once() -> Sample:
                    kernel_helpers.drop_caches()
                    with timed(files) as t:
                        seen = _ls_l(mnt / "many")
                    if seen != files:
                        raise RuntimeError(f"listed {seen} files of {files} on {mnt}")
                    return t.sample

                return once

            plan: list[tuple[str, str, Callable[[], Sample], Callable[[], Sample]]] = [
                ("seq_write", "MB", write(fmnt, "seq-f"), write(kmnt, "seq-k")),
                ("seq_read", "MB", read(fmnt, "seq-f"), read(kmnt, "seq-k")),
                ("ls_l", "op", ls_l(fmnt), ls_l(kmnt)),
            ]
            for name, per, subject, reference in plan:
                sub, ref = measure_pair(subject, reference, options)
                result = Result(
                    name, "fuse", "kernel", per, sub, ref,
                    {"size": size, "chunk": CHUNK, "files": files, "kernel_msize": km.msize},
                )  # fmt: skip
                print(result.line(), file=out, flush=True)
                print(result.cpu_line(), file=out, flush=True)
                results.append(result)
                if name == "seq_write":
                    for written in ("seq-f", "seq-k"):
                        if (share / written).read_bytes() != data:
                            raise RuntimeError(f"{written} does not hold the data written")
    finally:
        kernel_helpers.unload_modules(loaded)
        shutil.rmtree(share, ignore_errors=True)
        for mnt in (kmnt, fmnt):
            if kernel_helpers.mounted(mnt) is None:
                shutil.rmtree(mnt, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point; see ``--help``."""
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--size-mib", type=int, default=None,
                        help="sequential file size in MiB (default 16; 2 with --quick)")
    parser.add_argument("--files", type=int, default=None,
                        help="files in the listed directory (default 1000; 50 with --quick)")
    parser.set_defaults(repeat=None)
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 2 if args.quick else 3
    options = options_from(args)
    if not xenlab.is_dom0():
        raise SystemExit("bench_realxen_fuse.py runs in dom0 of a real Xen (see its --help)")
    size = args.size_mib or (2 if options.quick else 16)
    files = args.files or (50 if options.quick else 1000)
    results = run(size, files, options)
    report(results, args.json, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
