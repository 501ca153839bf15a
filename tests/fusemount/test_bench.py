"""bench/bench_fuse.py runs (its ``--quick`` smoke configuration; figures not checked)."""

from __future__ import annotations

import re
import subprocess
import sys

from .conftest import ROOT, env, need_fuse


def test_bench_fuse_quick() -> None:
    need_fuse()
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_fuse.py"), "--quick",
         "--only", "local", "client", "mfusepy"],
        env=env(), capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if not line.startswith("#")]
    assert len(lines) == 9
    for line in lines:
        assert re.fullmatch(r"fuse (write|read|ls -l) (local|client|mfusepy): [\d.]+ "
                            r"(MiB/s|ms) \(runs: [\d. ]+\)", line), line
