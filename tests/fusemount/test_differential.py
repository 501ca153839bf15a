"""The mount behaves as a local directory: a differential stateful test (issue 10 §2).

Hypothesis draws a sequence of file operations; each runs on the FUSE mount
of a simulated share and on a plain local directory.  Each gives the same
result or the same errno on both, and after each step both trees are the
same (names, kinds, contents, permission bits, link targets).  Bounded to a
few seconds (examples and steps are few).

The simulated share's server is the confined :class:`~pyxen9p.p9.server.FileServer`:
operations its policy refuses (symbolic links with ``..``, set-user-ID
bits) are left out, as a local directory has no such policy.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

NAMES = ["a", "b", "d", "d/a", "d/b", "d/e", "d/e/a"]
names = st.sampled_from(NAMES)
data = st.binary(max_size=3000)


def outcome(action: Callable[[], Any]) -> tuple[str, Any]:
    """``("ok", value)`` or ``("error", errno)``."""
    try:
        return ("ok", action())
    except OSError as exc:
        return ("error", exc.errno)


def snapshot(root: Path) -> list[tuple[Any, ...]]:
    """Everything the test compares of the tree under *root*."""
    out: list[tuple[Any, ...]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st_ = path.lstat()
            mode = st_.st_mode & 0o7777
            if path.is_symlink():
                out.append((rel, "link", os.readlink(path)))
            elif path.is_dir():
                out.append((rel, "dir", mode))
            else:
                out.append((rel, "file", mode, st_.st_nlink, path.read_bytes()))
    return out


def test_mount_matches_a_local_directory(mounter: Any, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    local_base = tmp_path / "local"
    local_base.mkdir()
    mnt = mounter("--simulate", str(share)).path
    counter = itertools.count()

    class Differential(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            n = next(counter)
            self.roots = (mnt / f"case{n}", local_base / f"case{n}")
            for root in self.roots:
                root.mkdir()

        def both(self, action: Callable[[Path], Any]) -> None:
            over, local = (outcome(lambda r=r: action(r)) for r in self.roots)
            assert over == local

        @rule(name=names, content=data)
        def write(self, name: str, content: bytes) -> None:
            self.both(lambda r: (r / name).write_bytes(content))

        @rule(name=names, content=data)
        def append(self, name: str, content: bytes) -> None:
            def action(r: Path) -> int:
                with open(r / name, "ab") as f:
                    return f.write(content)
            self.both(action)

        @rule(name=names, offset=st.integers(0, 4000), content=data)
        def pwrite(self, name: str, offset: int, content: bytes) -> None:
            def action(r: Path) -> int:
                fd = os.open(r / name, os.O_WRONLY)
                try:
                    return os.pwrite(fd, content, offset)
                finally:
                    os.close(fd)
            self.both(action)

        @rule(name=names)
        def read(self, name: str) -> None:
            self.both(lambda r: (r / name).read_bytes())

        @rule(name=names, size=st.integers(0, 5000))
        def truncate(self, name: str, size: int) -> None:
            self.both(lambda r: os.truncate(r / name, size))

        @rule(name=names)
        def mkdir(self, name: str) -> None:
            self.both(lambda r: os.mkdir(r / name))

        @rule(name=names)
        def rmdir(self, name: str) -> None:
            self.both(lambda r: os.rmdir(r / name))

        @rule(name=names)
        def unlink(self, name: str) -> None:
            self.both(lambda r: os.unlink(r / name))

        @rule(src=names, dst=names)
        def rename(self, src: str, dst: str) -> None:
            self.both(lambda r: os.rename(r / src, r / dst))

        @rule(to=st.sampled_from(["a", "nowhere", "d", "d/a"]), name=names)
        def symlink(self, to: str, name: str) -> None:
            self.both(lambda r: os.symlink(to, r / name))

        @rule(src=names, dst=names)
        def link(self, src: str, dst: str) -> None:
            self.both(lambda r: os.link(r / src, r / dst, follow_symlinks=False))

        @rule(name=names, mode=st.sampled_from([0o600, 0o644, 0o755, 0o1777, 0o000]))
        def chmod(self, name: str, mode: int) -> None:
            self.both(lambda r: os.chmod(r / name, mode, follow_symlinks=True))

        @rule(name=names)
        def listdir(self, name: str) -> None:
            self.both(lambda r: sorted(os.listdir(r / name)))

        @rule(name=names)
        def stat(self, name: str) -> None:
            def action(r: Path) -> tuple[int, int]:
                s = os.lstat(r / name)
                return (s.st_mode, s.st_size if not os.path.isdir(r / name) else 0)
            self.both(action)

        @invariant()
        def same_tree(self) -> None:
            assert snapshot(self.roots[0]) == snapshot(self.roots[1])

        def teardown(self) -> None:
            for root in self.roots:
                shutil.rmtree(root, ignore_errors=True)

    run_state_machine_as_test(
        Differential,
        settings=settings(
            max_examples=int(os.environ.get("PYXEN9P_MOUNT_EXAMPLES", "12")),
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
