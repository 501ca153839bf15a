"""The client benchmarks, on the host: ``bench/bench_client.py`` runs (``--quick``),
and the parts of ``bench/bench_realxen.py`` that run without a real Xen print
what the real-Xen tier's check (``tests/xen/guest/test_kernel.py``) expects.

Nothing here asserts a speed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from pyxen9p.p9.client import Client

from .hostile import HostileServer

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"

#: ``name: a=1.0 X/s b=2.0 X/s ratio=0.500`` (as tests/test_bench_smoke.py)
LINE = re.compile(
    r"(?P<name>[a-z0-9_]+): "
    r"(?P<subject>[a-z_]+)=(?P<a>[0-9]+\.[0-9]) (?P<unit>[A-Za-z]+/s) "
    r"(?P<reference>[a-z_]+)=(?P<b>[0-9]+\.[0-9]) (?P=unit) "
    r"ratio=(?P<ratio>[0-9]+\.[0-9]{3})"
)


def run_bench(
    script: str, *args: str
) -> tuple[subprocess.CompletedProcess[str], list[re.Match[str]]]:
    """Run ``bench/<script> ARGS``; it must succeed and each line not a
    ``#`` comment must be a result line with rates above 0."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True, text=True, timeout=300, check=False,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    matches = []
    for line in proc.stdout.splitlines():
        if line.startswith("#"):
            continue
        match = LINE.fullmatch(line)
        assert match, line
        assert float(match["a"]) > 0 and float(match["b"]) > 0, line
        matches.append(match)
    return proc, matches


def test_bench_client_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc, matches = run_bench("bench_client.py", "--quick", "--entries", "12", "--json", str(out))
    seen = {}
    for match in matches:
        a, b, ratio = float(match["a"]), float(match["b"]), float(match["ratio"])
        assert ratio == pytest.approx(a / b, rel=0.01, abs=0.002), match[0]
        seen[match["name"]] = (match["subject"], match["reference"], match["unit"])
    assert seen == {
        name: ("client", "sequential", "entry/s") for name in ("ls_l", "put_r", "rm_r")
    }
    assert "pipelined=True" in proc.stdout
    assert out.exists()


@pytest.fixture
def realxen_modules(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ModuleType, ModuleType]]:
    for extra in (str(REPO / "tests" / "xen" / "guest"), str(BENCH)):
        monkeypatch.syspath_prepend(extra)
    import bench_realxen
    import test_kernel

    yield bench_realxen, test_kernel


def test_bench_realxen_lines_have_the_shape_the_tier_checks(
    realxen_modules: tuple[ModuleType, ModuleType], tmp_path: Path
) -> None:
    bench_realxen, test_kernel = realxen_modules
    from _common import Result, Sample

    for name, per in (("seq_read", "MB"), ("ls_l", "entry"), ("stat", "op")):
        result = Result(name, "pyxen9p", "kernel", per, [Sample(10, 0.5, 0.2)],
                        [Sample(10, 1.0, 0.1)])  # fmt: skip
        match = test_kernel.LINE.fullmatch(result.line())
        assert match and match["unit"] == f"{per}/s", result.line()
    split = bench_realxen.CpuSplit()
    with split.measure():
        sum(range(100_000))
    line = bench_realxen.cpu_split_line(
        "seq_read", "MB", 2.0, {"pyxen9p": split, "kernel": bench_realxen.CpuSplit()}
    )
    assert re.fullmatch(
        rf"# seq_read: CPU per MB \(process\): {test_kernel.CPU_SPLIT}", line
    ), line
    user, system = split.per_unit_ms(2.0)
    assert user >= 0 and system >= 0


def test_bench_realxen_ls_l_sides_list_the_same(
    realxen_modules: tuple[ModuleType, ModuleType], tmp_path: Path
) -> None:
    bench_realxen, _ = realxen_modules
    listing = tmp_path / "listing"
    listing.mkdir()
    for i in range(30):
        (listing / f"entry{i:05d}").write_bytes(b"x" * i)
    assert bench_realxen.kernel_ls_l(listing) == 30
    with HostileServer(tmp_path) as server, server.client_over_socket(pipeline=True) as client:
        assert isinstance(client, Client)
        assert bench_realxen.pyxen9p_ls_l(client, "listing") == 30
        assert client.fid_count == 1


def test_bench_vs_revision_quick_run_against_this_commit(tmp_path: Path) -> None:
    """``bench/bench_vs_revision.py`` checks a revision out, runs both
    commands on the same export and prints a line per command; its worktree
    is gone afterwards."""
    before = subprocess.run(["git", "-C", str(REPO), "worktree", "list"],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    _proc, matches = run_bench(
        "bench_vs_revision.py", "--quick", "--entries", "12", "--repeat", "1", "--warmup", "0",
        "--baseline", "HEAD", "--dir", str(tmp_path),
    )
    seen = {m["name"]: (m["subject"], m["reference"], m["unit"]) for m in matches}
    assert seen == {
        "startup": ("current", "baseline", "run/s"),
        **{name: ("current", "baseline", "entry/s") for name in ("ls_l", "put_r", "rm_r")},
    }
    after = subprocess.run(["git", "-C", str(REPO), "worktree", "list"],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert after == before
    assert list(tmp_path.iterdir()) == []  # its temporary tree removed


def test_bench_vs_revision_names_a_revision_that_is_not_there(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_vs_revision.py"), "--quick", "--baseline",
         "no-such-revision-here", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode != 0
    assert "no-such-revision-here" in proc.stderr
    assert list(tmp_path.iterdir()) == []
