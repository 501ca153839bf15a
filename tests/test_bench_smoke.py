"""Smoke tests of the benchmarks in ``bench/``: they run and print well-formed results.

Each benchmark script runs in its tiny ``--quick`` configuration in a
subprocess.  Nothing here asserts a speed: only that every expected result
line is present and well formed, that its ratio is the quotient of its two
rates, and that the JSON output agrees with the text.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
TRANSPORT = BENCH / "bench_transport.py"

#: ``name: a=1.0 X/s b=2.0 X/s ratio=0.500``
LINE = re.compile(
    r"(?P<name>[a-z0-9_]+): "
    r"(?P<subject>[a-z_]+)=(?P<a>[0-9]+\.[0-9]) (?P<unit>[A-Za-z]+/s) "
    r"(?P<reference>[a-z_]+)=(?P<b>[0-9]+\.[0-9]) (?P=unit) "
    r"ratio=(?P<ratio>[0-9]+\.[0-9]{3})"
)

EXPECTED = {
    "ring_vs_memcpy_order8": ("ring", "memcpy", "MB/s"),
    "ring_vs_memcpy_order9": ("ring", "memcpy", "MB/s"),
    "ring_vs_two_memcpy_order8": ("ring", "two_memcpy", "MB/s"),
    "ring_vs_two_memcpy_order9": ("ring", "two_memcpy", "MB/s"),
    "rt_small_1thread": ("sim", "socket", "rt/s"),
    "rt_small_4threads": ("sim", "socket", "rt/s"),
    "rt_small_socket_mux_vs_direct": ("mux", "direct", "rt/s"),
    "rt_large": ("sim", "socket", "MB/s"),
}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the transport benchmark with *args*; fail with its output if it fails."""
    proc = subprocess.run(
        [sys.executable, str(TRANSPORT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def parse(text: str) -> dict[str, dict[str, Any]]:
    """The result lines of *text*, checked; every other line must be a comment."""
    results: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = LINE.fullmatch(line)
        assert match, f"malformed result line: {line!r}"
        name = match["name"]
        assert name not in results, f"{name} reported twice"
        a, b, ratio = float(match["a"]), float(match["b"]), float(match["ratio"])
        assert a > 0 and b > 0, line
        # the ratio is the quotient of the two printed (rounded) rates
        assert ratio == pytest.approx(a / b, rel=0.01, abs=0.002), line
        results[name] = {
            "subject": match["subject"],
            "reference": match["reference"],
            "unit": match["unit"],
            "ratio": ratio,
        }
    return results


def test_quick_run_prints_every_result_and_matching_json(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = run("--quick", "--json", str(out))
    results = parse(proc.stdout)
    assert set(results) == set(EXPECTED)
    for name, (subject, reference, unit) in EXPECTED.items():
        got = results[name]
        assert (got["subject"], got["reference"], got["unit"]) == (subject, reference, unit)
    # every result has its CPU comment line
    for name in EXPECTED:
        assert re.search(rf"^# {name}: CPU per \w+ \(all threads\): ", proc.stdout, re.M), name

    document = json.loads(out.read_text(encoding="utf-8"))
    assert document["environment"]["python"]
    by_name = {r["name"]: r for r in document["results"]}
    assert set(by_name) == set(EXPECTED)
    for name, result in by_name.items():
        assert len(result["subject_runs"]) == len(result["reference_runs"]) == 2
        assert result["ratio"] == pytest.approx(
            result["subject_median"] / result["reference_median"]
        )
        assert round(result["ratio"], 3) == pytest.approx(results[name]["ratio"], abs=0.0011)
        assert result["subject_cpu_per_unit"] >= 0


def test_json_to_stdout_moves_the_text_to_stderr() -> None:
    proc = run("--quick", "--only", "ring", "--ring-orders", "1", "--repeat", "1", "--json", "-")
    document = json.loads(proc.stdout)
    names = ["ring_vs_memcpy_order1", "ring_vs_two_memcpy_order1"]
    assert [r["name"] for r in document["results"]] == names
    assert set(parse(proc.stderr)) == set(names)


@pytest.mark.skipif(
    sys.version_info >= (3, 12), reason="--profile is refused from Python 3.12 on (tested below)"
)
def test_profile_mode_reports_every_thread() -> None:
    proc = run("--quick", "--profile")
    assert not [line for line in proc.stdout.splitlines() if LINE.fullmatch(line)]
    # the caller, the frontend's receiver and the backend's ring threads
    assert "# thread MainThread:" in proc.stdout
    assert "# thread pyxen9p-rx" in proc.stdout
    assert "# thread sim9pfs-ring0" in proc.stdout
    assert "pyxen9p/frontend.py" in proc.stdout


@pytest.mark.skipif(sys.version_info < (3, 12), reason="--profile works up to Python 3.11")
def test_profile_mode_is_refused_from_python_3_12() -> None:
    proc = refused("--quick", "--profile")
    assert "--profile needs Python 3.11 or older" in proc.stderr


def refused(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the transport benchmark with *args*, expecting it to refuse them."""
    proc = subprocess.run(
        [sys.executable, str(TRANSPORT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0, proc.stdout
    return proc


def test_bad_options_are_refused() -> None:
    assert "--repeat" in refused("--quick", "--repeat", "0").stderr
    assert "--threads" in refused("--quick", "--threads", "0").stderr
    assert "--ring-orders" in refused("--quick", "--ring-orders", "10").stderr
