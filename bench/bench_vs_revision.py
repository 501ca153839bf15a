#!/usr/bin/env python3
"""The command line on many entries, on the simulated Xen, against an older revision of pyxen9p.

Each side is the ``pyxen9p`` command of one source tree, run as a new
process (``python -m pyxen9p --simulate EXPORT ...``) on the same export
directory: this tree's, and that of the git revision given by
``--baseline`` (default: the last commit before issue 11's data-path work,
when ``ls -l``, ``put -r`` and ``rm -r`` of 5,000 entries took 5.0, 11.1 and
5.5 s on another day's machine), checked out into a temporary git worktree
and removed afterwards.  The two sides run alternately, so both meet the
same machine, file system and recently deleted inodes:

``ls_l``
    ``ls -l`` of a directory of *N* files.
``put_r``
    ``put -r`` of a local directory of *N* empty files into a new directory
    (the command's defaults: modes and times kept).
``rm_r``
    ``rm -r`` of a directory of *N* files.

Rates are entries per second of the whole command (interpreter start and
the simulated Xen's set-up included, the same for both sides; the
``startup`` line times ``ls`` of an empty directory).  A ratio above 1
means this tree is faster.  The CPU lines are the command's, all its
threads (``getrusage`` of the children).  Every command's result is
checked (the listing's length, the files made, the directory gone).

Run ``python bench/bench_vs_revision.py`` (several minutes: ``--entries``
to change *N*, default 5,000; ``--dir /dev/shm`` to measure on tmpfs, see
``bench_client.py`` on ext4's inode allocator), ``--quick`` for a smoke run.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
)

#: The commit before issue 11's data-path work (the figures the issue quotes).
DEFAULT_BASELINE = "9ffe583"

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def worktree(revision: str, parent: Path) -> Iterator[Path]:
    """*revision* of this repository checked out (detached) under *parent*;
    the worktree is removed on exit."""
    path = parent / "baseline"
    known = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if known.returncode != 0:
        raise SystemExit(f"bench_vs_revision.py: no commit {revision!r} in {ROOT}")
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--quiet", "--detach", str(path), revision],
        check=True,
    )
    try:
        yield path
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False
        )


def _children() -> tuple[float, int, int]:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime, usage.ru_nvcsw, usage.ru_nivcsw


class Side:
    """The ``pyxen9p`` command of one source tree, on one export."""

    def __init__(self, tree: Path, export: Path) -> None:
        self.tree = tree
        self.export = export

    def run(self, units: float, *argv: str) -> tuple[Sample, str]:
        """Run ``pyxen9p --simulate EXPORT *argv``; its timing and output.

        :raises RuntimeError: if the command fails
        """
        env = dict(os.environ, PYTHONPATH=str(self.tree))
        command = [sys.executable, "-m", "pyxen9p", "--simulate", str(self.export), *argv]
        cpu0, vol0, invol0 = _children()
        start = time.perf_counter()
        proc = subprocess.run(
            command, env=env, cwd=self.tree, capture_output=True, text=True, check=False,
            stdin=subprocess.DEVNULL, timeout=3600,
        )  # fmt: skip
        wall = time.perf_counter() - start
        cpu1, vol1, invol1 = _children()
        if proc.returncode != 0:
            raise RuntimeError(f"{self.tree}: {' '.join(argv)} failed:\n{proc.stderr}")
        return Sample(units, wall, cpu1 - cpu0, {}, (vol1 - vol0, invol1 - invol0)), proc.stdout


def fill(directory: Path, entries: int) -> None:
    """*directory*, made, with *entries* empty files."""
    directory.mkdir()
    for i in range(entries):
        (directory / f"entry{i:05d}").touch()


def run(entries: int, base: Path | None, revision: str, options: Options) -> list[Result]:
    """Set both sides up, measure, remove everything."""
    out = sys.stdout
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="pyxen9p-vs-", dir=base) as tmp_name:
        tmp = Path(tmp_name)
        export, local = tmp / "export", tmp / "local"
        export.mkdir()
        fill(local, entries)
        fill(export / "listing", entries)
        (export / "empty").mkdir()
        with worktree(revision, tmp) as old_tree:
            head = subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                capture_output=True, text=True, check=False,
            ).stdout.strip()  # fmt: skip
            comment(
                f"{entries} entries; this tree ({head or '?'}) against {revision};"
                f" files in {tmp} ({file_system(tmp)}); {options.repeat} repetitions (median),"
                f" {options.warmup} warm-up",
                out,
            )
            sides = {"current": Side(ROOT, export), "baseline": Side(old_tree, export)}

            def startup(side: Side) -> Callable[[], Sample]:
                def work() -> Sample:
                    sample, listing = side.run(1, "ls", "empty")
                    if listing.strip():
                        raise RuntimeError(f"ls of an empty directory printed {listing!r}")
                    return sample

                return work

            def ls_l(side: Side) -> Callable[[], Sample]:
                def work() -> Sample:
                    sample, listing = side.run(entries, "ls", "-l", "listing")
                    got = [line for line in listing.splitlines() if "entry" in line]
                    if len(got) != entries:
                        raise RuntimeError(f"ls -l listed {len(got)} of {entries} entries")
                    return sample

                return work

            def put_r(side: Side) -> Callable[[], Sample]:
                def work() -> Sample:
                    target = export / "copy"
                    if target.exists():
                        shutil.rmtree(target)
                    sample, _ = side.run(entries, "put", "-r", str(local), "copy")
                    made = len(os.listdir(target))
                    if made != entries:
                        raise RuntimeError(f"put -r made {made} of {entries} files")
                    return sample

                return work

            def rm_r(side: Side) -> Callable[[], Sample]:
                def work() -> Sample:
                    target = export / "doomed"
                    if target.exists():
                        shutil.rmtree(target)
                    fill(target, entries)
                    sample, _ = side.run(entries, "rm", "-r", "doomed")
                    if target.exists():
                        raise RuntimeError("rm -r left the directory")
                    return sample

                return work

            commands = (("startup", "run", startup), ("ls_l", "entry", ls_l),
                        ("put_r", "entry", put_r), ("rm_r", "entry", rm_r))  # fmt: skip
            for name, per, make in commands:
                current, baseline = measure_pair(
                    make(sides["current"]), make(sides["baseline"]), options
                )
                result = Result(name, "current", "baseline", per, current, baseline,
                                {"entries": entries, "baseline": revision})  # fmt: skip
                print(result.line(), flush=True)
                print(result.cpu_line(), flush=True)
                wall = [statistics.median(s.wall for s in runs) for runs in (current, baseline)]
                comment(f"{name}: seconds per command: current={wall[0]:.2f}"
                        f" baseline={wall[1]:.2f}", out)  # fmt: skip
                results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point; see ``--help``."""
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument(
        "--entries",
        type=int,
        default=None,
        help="entries of each tree (default 5000; 20 with --quick)",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where the files live (default: the system's temporary directory)",
    )
    parser.add_argument(
        "--baseline",
        default=DEFAULT_BASELINE,
        help=f"the git revision to compare with (default {DEFAULT_BASELINE})",
    )
    parser.set_defaults(repeat=None)
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 2 if args.quick else 3
    options = options_from(args)
    entries = args.entries or (20 if options.quick else 5000)
    results = run(entries, args.dir, args.baseline, options)
    report(results, args.json, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
