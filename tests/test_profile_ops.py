"""``bench/profile_ops.py`` runs (tiny sizes) and prints well-formed counts.

Counts, not speeds: nothing here checks a figure beyond its being there and
plausible (every stat makes calls; a clock read is seen where CPython makes
one on every lock acquire).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "profile_ops.py"
TINY = ["--runs", "1", "--ops", "5", "--entries", "20", "--size-mib", "1"]

pytestmark = pytest.mark.skipif(
    sys.version_info >= (3, 12), reason="profile_ops needs Python 3.11 or older"
)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, *args],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc


def test_every_line_prints_its_counts() -> None:
    out = run().stdout
    assert out.startswith("# simulated Xen: msize=")
    for name, unit in (("stat", "stat"), ("small_read", "read"), ("ls_l", "entry"),
                       ("seq_read", "MiB"), ("seq_write", "MiB")):  # fmt: skip
        match = re.search(rf"^{name}: per {unit}: calls=([0-9.]+) py=([0-9.]+) .* rx=", out, re.M)
        assert match, f"no line for {name}:\n{out}"
        assert float(match[1]) > float(match[2]) > 0


@pytest.mark.skipif(shutil.which("gcc") is None, reason="--clock-sites builds a C shim")
def test_clock_sites_name_the_locks_that_read_the_clock() -> None:
    out = run("--only", "stat", "seq_read", "--clock-sites").stdout
    for name, unit in (("stat", "stat"), ("seq_read", "MiB")):
        match = re.search(
            rf"^# {name}: clock reads per {unit} \(caller's thread\):"
            rf" ([0-9.]+) \((.*)\); most: (.*)$",
            out, re.M,
        )  # fmt: skip
        assert match, f"no clock-site line for {name}:\n{out}"
        kinds = dict(
            (kind, float(n)) for kind, n in (part.rsplit(" ", 1) for part in match[2].split(", "))
        )
        assert set(kinds) <= {"lock", "deadline", "monotonic", "other", "sim"}
        assert sum(kinds.values()) == pytest.approx(float(match[1]), abs=0.3)
        # CPython 3.11 reads the clock on a lock acquire: pyxen9p's request
        # path takes none any more, but the simulated Xen's event channel
        # (standing in for the real library's system calls) still does, and
        # the recorder tells its reads apart
        assert kinds.get("sim", 0) > 0
        # and the sites are pyxen9p's own lines, file:line:function (the
        # interpreter's own, "other -", may be the most frequent: the GIL)
        sites = match[3].split(", ")
        assert all(re.match(r"(lock|deadline|monotonic|other|sim) \S+ [0-9.]+$", s) for s in sites)
        assert any(re.match(r"(lock|deadline|monotonic|sim) \S+\.py:\d+:\w+", s) for s in sites)
