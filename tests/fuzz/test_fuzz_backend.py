"""``pyxen9p fuzz-backend`` on the simulated Xen: the fuzzer must find and shrink
the deliberate faults of :class:`pyxen9p.fuzz.target.BuggySimBackend`, must not
report anything against the healthy simulated backend, must refuse to start
without its opt-in, and must give the same cases for the same seed.

(The other files of this folder fuzz pyxen9p's own code; this one fuzzes backends.)
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from pyxen9p.cli._main import main as cli_main
from pyxen9p.fuzz.campaign import fuzz
from pyxen9p.fuzz.case import Case
from pyxen9p.fuzz.execute import run_case
from pyxen9p.fuzz.generate import LAYERS, build_message, generate_case, message_types
from pyxen9p.fuzz.shrink import ddmin
from pyxen9p.fuzz.target import SimTarget
from pyxen9p.p9 import codec

OPT_IN = "--i-know-this-crashes-backends"
REPO = Path(__file__).resolve().parents[2]


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli_main(list(argv))
    return code, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------ opt-in


def test_refuses_without_the_opt_in(tmp_path: Path) -> None:
    for argv in (
        ["fuzz-backend", "--simulate-bugs", "none", "--cases", "1"],
        ["fuzz-backend", "--dom0-backend", "qemu"],
        ["--devid", "0", "fuzz-backend"],
    ):
        code, out, err = run_cli(*argv)
        assert code == 2, (argv, out, err)
        assert f"refusing to start without {OPT_IN}" in err
        assert out == ""


def test_opt_in_is_not_a_global_option() -> None:
    code, _out, err = run_cli(OPT_IN, "ls")
    assert code == 2 and "unrecognized arguments" in err


# ------------------------------------------------------------------ generators


def test_cases_are_reproducible_from_seed_and_number() -> None:
    for seed in (0, 1, 2**40):
        for number in range(12):
            a, b = generate_case(seed, number), generate_case(seed, number)
            assert a.to_json() == b.to_json()
            assert Case.from_json(json.loads(a.dumps())).to_json() == a.to_json()
    runs = {json.dumps([generate_case(s, n).steps for n in range(6)]) for s in range(5)}
    assert len(runs) == 5  # different seeds, different cases
    layers = {generate_case(7, n).layer for n in range(60)}
    assert layers == set(LAYERS)
    assert {generate_case(7, n, ("ring",)).layer for n in range(10)} == {"ring"}
    with pytest.raises(ValueError, match="unknown layers"):
        generate_case(1, 1, ("nope",))


def test_every_message_type_of_both_dialects_can_be_built() -> None:
    import random

    rng = random.Random(5)
    types = message_types()
    assert set(codec.message_classes(codec.VERSION_9P2000_L)) < set(types)
    assert set(codec.message_classes(codec.VERSION_9P2000_U)) < set(types)
    for mtype, cls in types.items():
        for _ in range(20):
            raw = build_message(rng, cls, 5)
            size, got, tag = codec.peek_header(raw)
            assert (size, got, tag) == (len(raw), mtype, 5)


def test_generators_reach_every_hostile_family() -> None:
    ops: set[str] = set()
    states: set[str] = set()
    keys: set[str] = set()
    for n in range(300):
        case = generate_case(11, n)
        for step in case.steps:
            ops.add(step["op"])
            if step["op"] == "state":
                states.add(step["value"])
            keys.update(step.get("keys", {}))
            if "refs" in step:
                ops.add(f"refs={step['refs']}")
            if step.get("ring_order") is not None:
                ops.add("ring_order")
    assert {"connect", "close", "reinit", "state", "rm", "write", "setup", "msg", "put",
            "publish", "index", "wrap", "intf", "notify", "sleep"} <= ops  # fmt: skip
    assert {"refs=bogus", "refs=zero", "refs=interface", "ring_order"} <= ops
    assert {"3", "5", "6", "1", "x"} <= states
    assert keys <= {"version", "num-rings", "ring-ref0", "event-channel-0"} and keys


# ------------------------------------------------------------------ shrinker


def test_ddmin_finds_a_one_minimal_subset() -> None:
    steps = [{"op": "s", "n": i} for i in range(20)]

    def fails(candidate: list[dict[str, int]]) -> bool:
        got = {s["n"] for s in candidate}
        return {3, 11, 17} <= got

    minimal, runs = ddmin(steps, fails)  # type: ignore[arg-type]
    assert [s["n"] for s in minimal] == [3, 11, 17]
    assert runs <= 64


# ------------------------------------------------------------------ oracles, on the sim


def test_healthy_simulated_backend_gives_no_finding() -> None:
    with SimTarget() as target:
        summary = fuzz(target, seed=3, cases=18)
    assert summary.reports == [], [r.finding.summary() for r in summary.reports]
    assert summary.cases == 18 and set(summary.layers) == set(LAYERS)


def test_a_case_leaves_nothing_held() -> None:
    with SimTarget() as target:
        for number in range(4):
            result = run_case(target, generate_case(1, number))
            assert result.finding is None
            guest = target._host.resources(1)
            assert guest.clean, guest


@pytest.mark.parametrize(
    ("bug", "layers", "seed", "first", "kind", "most_steps"),
    [  # (seed, first): the first case of the seed that meets the fault
        ("reconnect-abort", ("xenbus",), 31064, 0, "backend-gone", 4),
        ("mkdir-escape", ("p9",), 4, 5, "escape", 2),
        ("stray-reply", ("p9",), 1, 10, "stray-reply", 2),
        ("hang", ("p9",), 1, 2, "no-reply", 2),
    ],
)
def test_finds_and_shrinks_each_deliberate_fault(
    tmp_path: Path, bug: str, layers: tuple[str, ...], seed: int, first: int, kind: str,
    most_steps: int,
) -> None:
    with SimTarget({bug}) as target:
        summary = fuzz(target, seed=seed, cases=1, first=first, layers=layers, out_dir=tmp_path)
    assert [r.finding.kind for r in summary.reports] == [kind], summary.line()
    report = summary.reports[0]
    assert report.minimal_finding.kind == kind
    assert 1 <= len(report.minimal.steps) <= most_steps < len(report.case.steps) or (
        len(report.minimal.steps) <= most_steps
    )
    assert report.minimal.steps[0]["op"] == "connect"
    assert report.directory is not None
    written = sorted(p.name for p in report.directory.iterdir())
    assert {"case.json", "minimal.json", "finding.json", "reproduce.py"} <= set(written)
    if bug == "reconnect-abort":
        assert "Assertion" in report.finding.evidence["backend-log"]
        assert report.finding.signature == "Assertion `!s->transport' failed"
        assert report.minimal_finding.signature == report.finding.signature
        assert [s["op"] for s in report.minimal.steps] == ["connect", "close", "reinit", "connect"]
    # the same run from case 0 meets it too, by itself
    with SimTarget({bug}) as target:
        again = fuzz(target, seed=seed, cases=first + 1, layers=layers, do_shrink=False)
    assert kind in {r.finding.kind for r in again.reports}
    # the same fault is not found in a healthy backend with the shrunk case
    with SimTarget() as healthy:
        assert run_case(healthy, report.minimal).finding is None


def test_reproducer_is_standalone_and_needs_the_opt_in(tmp_path: Path) -> None:
    with SimTarget({"reconnect-abort"}) as target:  # its steps hold booleans too
        summary = fuzz(target, seed=31064, cases=1, layers=("xenbus",), out_dir=tmp_path)
    assert summary.reports and summary.reports[0].directory is not None
    script = summary.reports[0].directory / "reproduce.py"
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), *args],
            capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path, check=False,
        )  # fmt: skip

    refused = run()
    assert refused.returncode == 2 and "refusing to run" in refused.stderr
    again = run(OPT_IN)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "reproduced: backend-gone [Assertion `!s->transport' failed]" in again.stdout
    stray = run(OPT_IN, "--simulate-bugs", "stray-reply")
    assert stray.returncode == 1  # another fault: not this finding
    healthy = run(OPT_IN, "--simulate-bugs", "none", "--attempts", "2", "--any-signature")
    assert healthy.returncode == 1 and "not reproduced" in healthy.stdout
    assert healthy.stdout.count("no finding in 4 step(s)") == 2


def test_command_runs_a_simulated_campaign(tmp_path: Path) -> None:
    code, out, err = run_cli(
        "fuzz-backend", OPT_IN, "--simulate-bugs", "stray-reply", "--seed", "1",
        "--first-case", "10", "--cases", "1", "--layers", "p9", "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 1, err
    assert "seed 1: 1 cases" in out and "stray-reply" in out
    assert "reproduce.py" in out and "--seed 1" in err
    code, out, err = run_cli(
        "fuzz-backend", OPT_IN, "--simulate-bugs", "none", "--seed", "2", "--cases", "2",
        "--out", str(tmp_path / "clean"),
    )  # fmt: skip
    assert code == 0, err
    assert "findings: none" in out
    code, _out, err = run_cli("fuzz-backend", OPT_IN, "--simulate-bugs", "nonsense")
    assert code == 2 and "unknown simulated bugs" in err
