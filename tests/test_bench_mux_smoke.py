"""Smoke test of ``bench/bench_mux.py``: it runs and prints well-formed results (never a speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_bench_smoke import BENCH, parse

EXPECTED = {
    "mux_stat": ("mux", "direct", "stat/s"),
    "mux_read_large": ("mux", "direct", "MB/s"),
    "mux_stat_4clients": ("mux", "direct", "stat/s"),
}


def test_quick_run_prints_every_result_and_matching_json(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_mux.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    results = parse(proc.stdout)
    assert {
        name: (r["subject"], r["reference"], r["unit"]) for name, r in results.items()
    } == EXPECTED
    document = json.loads(out.read_text(encoding="utf-8"))
    assert {r["name"] for r in document["results"]} == set(EXPECTED)
