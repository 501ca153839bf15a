"""What the teardown and fault tests of every backend share (QEMU 7.2's in
``test_teardown.py``, xen-9pfsd's in ``test_xen9pfsd.py``).

* :func:`snapshot`: what pyxen9p (this process) holds of Xen;
  :func:`baseline` takes it after the libraries' first use.
* :func:`assert_grants_free`: a single 1000-page share still fits within
  gntalloc's 1024 grants.
* :func:`transfers_until_killed`: one thread writing and one reading a large
  file until the backend is killed; what each caller got, and when.
* :func:`report`: a line printed and kept in the results folder.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import xenlab

import pyxen9p
from pyxen9p.libs import GrantSharer


def report(line: str, name: str = "teardown.txt") -> None:
    """Print *line* and append it to *name* in the results folder (a passing
    test's output is not shown otherwise)."""
    print(line)
    results = os.environ.get("PYXEN9P_RESULTS")
    if results:
        with open(Path(results, name), "a", encoding="utf-8") as f:
            f.write(line + "\n")


def snapshot() -> dict[str, object]:
    """What pyxen9p (this process) holds of Xen: descriptors and event channels."""
    return {
        "xen_fds": xenlab.open_xen_fds(),
        "evtchn_irqs": xenlab.evtchn_irqs("python3"),
    }


def baseline() -> dict[str, object]:
    """:func:`snapshot` once the grant library was used (it loads lazily and
    keeps what it loaded)."""
    with GrantSharer() as warm, warm.share_pages(0, 1):
        pass
    return snapshot()


def assert_grants_free() -> None:
    """Every grant pyxen9p shared is free again: almost all of gntalloc's 1024 fit."""
    with GrantSharer() as sharer, sharer.share_pages(0, 1000) as pages:
        assert len(pages.refs) == 1000


@dataclasses.dataclass
class Killed:
    """What :func:`transfers_until_killed` saw.

    :ivar moved: bytes written (thread 0) and read (thread 1) before the kill
    :ivar errors: ``(thread, when, exception)`` each caller ended with
    :ivar killed: when the kill was done (``time.monotonic()``)
    :ivar alive: threads still waiting after the bounded join
    """

    moved: list[int]
    errors: list[tuple[int, float, BaseException]]
    killed: float
    alive: int

    def check(self, bound: float, said: str, who: str, log: str = "teardown.txt") -> None:
        """Both callers ended with an OSError saying *said*, within *bound*
        seconds of the kill; each reported (in *log*, see :func:`report`)."""
        assert not self.alive, "a transfer still waits after the kill"
        assert sorted(n for n, _, _ in self.errors) == [0, 1], self.errors
        for n, when, exc in self.errors:
            report(
                f"{who} killed: thread {n} got {type(exc).__name__}"
                f" after {when - self.killed:.1f}s: {exc}",
                log,
            )
            assert isinstance(exc, OSError), repr(exc)
            assert said in str(exc), exc
            assert when - self.killed < bound


def transfers_until_killed(
    fs: pyxen9p.Client, payload: bytes, kill: Callable[[], object], join: float
) -> Killed:
    """Write ``written.bin`` and read ``big.bin`` (which holds *payload*) in two
    threads, over and over; once both moved data, call *kill* and wait up to
    *join* seconds for each thread to end."""
    moved = [0, 0]
    errors: list[tuple[int, float, BaseException]] = []

    def transfer(n: int) -> None:
        try:
            while True:
                if n == 0:
                    fs.write_bytes("written.bin", payload)
                else:
                    assert fs.read_bytes("big.bin") == payload
                moved[n] += len(payload)
        except BaseException as exc:  # recorded, checked by the caller
            errors.append((n, time.monotonic(), exc))

    threads = [threading.Thread(target=transfer, args=(n,), daemon=True) for n in (0, 1)]
    for t in threads:
        t.start()
    xenlab.wait_until(
        lambda: True if min(moved) > 0 or errors else None, 180, "both transfers to move data"
    )
    assert not errors, errors
    assert min(moved) > 0  # both transfers are under way: the kill is mid-transfer
    killed = time.monotonic()
    kill()
    for t in threads:
        t.join(join)
    return Killed(list(moved), errors, killed, sum(t.is_alive() for t in threads))
