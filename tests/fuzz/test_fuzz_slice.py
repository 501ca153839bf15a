"""The bounded slice of the fuzz run that CI runs every time, and its oracles' own tests.

``scripts/fuzz`` runs the full targets (see ``docs/testing.rst``); here each
target runs a few seconds' worth of cases under a fixed seed (``ci``, or
``PYXEN9P_FUZZ_SEED``), so that a failure here is reproducible with
``scripts/fuzz --target T --seed S --case I``.  The ``*_catches_*`` tests
break pyxen9p on purpose and check that the target's checks notice.
"""

from __future__ import annotations

import functools
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import pyxen9p.ring
from fuzz import codec_target, frontend_target, server_target
from fuzz.runner import TARGETS, Report, reproduce, run_cases, summary
from pyxen9p.p9 import codec as c
from pyxen9p.p9 import server as srv

SEED = os.environ.get("PYXEN9P_FUZZ_SEED", "ci")
SLICE = {"codec": 20000, "server": 500, "frontend": 100}


@pytest.fixture
def codec_worker() -> Iterator[codec_target.Worker]:
    worker = codec_target.Worker()
    yield worker
    worker.close()


@pytest.fixture
def server_worker() -> Iterator[server_target.Worker]:
    worker = server_target.Worker()
    yield worker
    worker.close()


@pytest.fixture
def frontend_worker() -> Iterator[frontend_target.Worker]:
    worker = frontend_target.Worker()
    yield worker
    worker.close()


def _run(target: str, worker: Any, cases: int, seed: str = SEED) -> Report:
    return run_cases(target, seed, range(cases), worker=worker)


def _assert_passed(report: Report) -> None:
    assert report.cases > 0
    assert not report.failures, summary(report)


def test_codec_slice(codec_worker: codec_target.Worker) -> None:
    report = _run("codec", codec_worker, SLICE["codec"])
    _assert_passed(report)
    # every message type is drawn, and most kinds of mutation
    assert len([k for k in report.kinds if k.startswith("mutated:")]) >= 10


def test_server_slice(server_worker: server_target.Worker) -> None:
    _assert_passed(_run("server", server_worker, SLICE["server"]))


def test_frontend_slice(frontend_worker: frontend_target.Worker) -> None:
    _assert_passed(_run("frontend", frontend_worker, SLICE["frontend"]))


def test_every_message_type_is_generated() -> None:
    rng = random.Random(0)
    seen = {type(codec_target.message(rng)) for _ in range(5000)}
    assert seen == set(c.message_classes().values())


def test_cases_are_reproducible() -> None:
    a = [
        codec_target.mutate(random.Random(f"s:codec:{i}"), b"\x0b\0\0\0x\1\0\7\0\0\0")
        for i in range(50)
    ]
    b = [
        codec_target.mutate(random.Random(f"s:codec:{i}"), b"\x0b\0\0\0x\1\0\7\0\0\0")
        for i in range(50)
    ]
    assert a == b
    assert reproduce("codec", "s", 7) == "scripts/fuzz --target codec --seed s --case 7"
    assert set(TARGETS) == {"codec", "frontend", "server"}


# -- the oracles catch what they are meant to catch --------------------------


def test_codec_checks_catch_a_decoder_that_trusts_a_count(
    codec_worker: codec_target.Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    def trusting(self: Any, mv: memoryview, off: int, end: int, out: list[Any]) -> int:
        (n,) = c._U32.unpack_from(mv, off)
        buffer = bytearray(min(n, 1 << 24))  # allocates what the count says (up to 16 MiB)
        out.append(bytes(buffer[: end - off - 4]))
        return end

    monkeypatch.setattr(c._DataOp, "decode", trusting)
    report = _run("codec", codec_worker, 1000)
    assert any("allocated" in text for _, text in report.failures), summary(report)


def test_codec_checks_catch_a_decoder_that_reads_past_the_end(
    codec_worker: codec_target.Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unchecked(mv: memoryview, off: int, end: int) -> tuple[str, int]:
        (n,) = c._U16.unpack_from(mv, off)
        return str(mv[off + 2 : off + 2 + n], "utf-8", "surrogateescape"), off + 2 + n

    monkeypatch.setattr(c, "_read_str", unchecked)
    report = _run("codec", codec_worker, 3000)
    assert report.failures, summary(report)


def test_server_checks_catch_an_escape(
    server_worker: server_target.Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(srv, "_component", lambda name: name.encode("utf-8", "surrogateescape"))
    monkeypatch.setattr(srv.Session, "_step", _step_without_root_check)
    report = _run("server", server_worker, 150)
    assert any("outside" in text for _, text in report.failures), summary(report)


def _step_without_root_check(self: srv.Session, cur: Any, name: str) -> Any:
    """Session._step, but ``..`` is followed even at the root (the classic escape)."""
    fd = os.open(name.encode("utf-8", "surrogateescape"), srv._PATH_FLAGS, dir_fd=cur.fd)
    st = os.fstat(fd)
    return srv._Loc(fd, -1, b"", st.st_mode, False)


def test_server_checks_catch_a_new_link_leaving_the_export(
    server_worker: server_target.Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        server_target, "FileServer", functools.partial(srv.FileServer, symlinks="any")
    )
    report = _run("server", server_worker, 150)
    assert any(server_target.NEW_LINK_OUT in text for _, text in report.failures), summary(report)


def test_server_checks_catch_a_descriptor_leak(
    server_worker: server_target.Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(srv._Fid, "close", lambda self: None)
    report = _run("server", server_worker, 20)
    assert any("descriptors left" in text for _, text in report.failures), summary(report)


def test_frontend_guard_catches_a_frontend_that_trusts_in_prod(
    frontend_worker: frontend_target.Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # queued() without its range check: a forged in_prod is believed
    monkeypatch.setattr(pyxen9p.ring, "queued", lambda prod, cons, size: (prod - cons) & 0xFFFFFFFF)
    report = _run("frontend", frontend_worker, 20, seed="1")
    assert any("consumer read" in text for _, text in report.failures), summary(report)


def test_frontend_checks_catch_a_descriptor_leak(
    frontend_worker: frontend_target.Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyxen9p.frontend

    monkeypatch.setattr(pyxen9p.frontend.Frontend, "_close_pipe", lambda self: None)
    report = _run("frontend", frontend_worker, 3)
    assert report.failures and all("descriptors left" in t for _, t in report.failures), summary(
        report
    )


_HANGING = """
import sys, time
from fuzz.runner import run_cases

class Worker:
    def case(self, rng):
        time.sleep(30)

run_cases("codec", "s", range(3), worker=Worker(), case_timeout=1)
"""


def test_a_hung_case_is_reported_with_its_replay_command() -> None:
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests, *sys.path]))
    proc = subprocess.run(
        [sys.executable, "-c", _HANGING], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 70, proc.stderr
    assert "FUZZ HANG: codec case 0 (seed s)" in proc.stderr
    assert "scripts/fuzz --target codec --seed s --case 0" in proc.stderr
    assert "time.sleep(30)" in proc.stderr or "in case" in proc.stderr


def test_every_9p2000u_message_type_is_generated() -> None:
    rng = random.Random(0)
    u = c.VERSION_9P2000_U
    seen = {type(codec_target.message(rng, dialect=u)) for _ in range(3000)}
    assert seen == set(c.message_classes(u).values())
