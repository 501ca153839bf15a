"""Fuzz target ``frontend``: a hostile backend against the real Frontend.

Each case starts a simulated machine (:func:`frontend_helpers.machine`: a
:class:`~pyxen9p.sim.platform.SimulatedXen`, the QEMU-like backend in domain
0, the guest in domain 7) and plays one of:

* ``replies`` (80 %): the hostile backend of ``tests/test_frontend_hostile.py``
  (its :class:`Script`), answering each request with a drawn action -- echo,
  wrong tag, wrong type, Rlerror, duplicate, silence, garbage, a forged
  header, a short body, a state flip, a forged ``in_prod``, a notification
  storm -- plus the actions of :class:`HostileScript`: a forged ``out_cons``,
  bytes written into ``in`` behind a forged ``in_prod`` (a frame inside valid
  indices that lies), a forged ``in_prod`` with no reply behind it (the
  hostile test's is usually overwritten by the reply pushed after it), a
  reply far larger than the request, the backend's state node removed or
  holding a malformed value.
  1 to 3 rings of order 2 to 4; the requests (1 to 8, of 0 bytes up to the
  msize) are sent one after the other or from one thread each.
* ``xenstore`` (20 %): malformed ``versions``, ``max-rings`` and
  ``max-ring-page-order`` values (or a missing one) when connecting.

Checks: every request ends within its timeout in an acceptable reply (the
request's tag, its size, the reply type or an error type) or one of the
transport's clear exceptions with a message; ``close`` is bounded; the
receiver thread and every other thread the case started are gone; no grant,
mapping, port or handle of the guest stays live, and the process holds the
descriptors it held before the case; nothing in pyxen9p logged an internal
error (``receiver crashed``); and the ring guard saw no access outside the
ring.

The ring guard (:class:`GuardedConsumer`, :class:`GuardedProducer`, patched
into :mod:`pyxen9p.frontend` by the worker) checks every copy the frontend
makes from or to the shared data rings against its own reading of the
peer's index: a read must lie within the bytes the backend published
(``in_cons .. in_prod``, the distance at most the ring size), a write within
the free space the backend's ``out_cons`` left.  The frontend's own
validation of the indices is what is under test; the guard re-does it
independently, so a frontend that trusted a forged index would be caught
even where the copy stays inside the buffer.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable

from frontend_helpers import FE_DOMID, TREAD, echo, frame, machine
from test_frontend_hostile import CLEAR, Script, _acceptable_reply

import pyxen9p.frontend
from pyxen9p.errors import BackendError, TransportError
from pyxen9p.frontend import Frontend
from pyxen9p.ring import HEADER, ByteRing, Consumer, Producer, ring_size
from pyxen9p.xenbus import XenbusState

_MASK32 = 0xFFFFFFFF
#: each request's timeout (the backend answers at once or never)
TIMEOUT = 0.25
#: out-of-ring accesses seen by the guard (appended from any thread)
VIOLATIONS: list[str] = []


class _GuardedRing:
    """A :class:`ByteRing` whose copies are checked by *check(index, n)*."""

    def __init__(self, ring: ByteRing, check: Callable[[str, int, int], None]) -> None:
        self._ring = ring
        self._check = check
        self.size = ring.size
        self.buffer = ring.buffer

    def read(self, index: int, n: int) -> bytes:
        self._check("read", index, n)
        return self._ring.read(index, n)

    def write(self, index: int, data: bytes | bytearray | memoryview) -> None:
        self._check("write", index, len(data))
        self._ring.write(index, data)

    def release(self) -> None:
        self._ring.release()


def _strict_distance(prod: int, cons: int, size: int) -> int:
    distance = (prod - cons) & _MASK32
    return distance if distance <= size else -1


class GuardedConsumer(Consumer):
    """A :class:`Consumer` whose reads must lie within what the peer published."""

    def __init__(self, ring: ByteRing, load_prod: Callable[[], int], *args: object) -> None:
        self._seen: tuple[int, int] | None = None  # (our cons, the peer's prod) last loaded

        def load() -> int:
            prod = load_prod()
            self._seen = (self.cons, prod)
            return prod

        super().__init__(_GuardedRing(ring, self._check), load, *args)  # type: ignore[arg-type]

    def _check(self, op: str, index: int, n: int) -> None:
        if self._seen is None:
            VIOLATIONS.append(f"consumer {op} of {n} bytes at {index:#x} before loading in_prod")
            return
        cons, prod = self._seen
        published = _strict_distance(prod, cons, self.ring.size)
        offset = (index - cons) & _MASK32
        if op != "read" or published < 0 or offset + n > published:
            VIOLATIONS.append(
                f"consumer {op} of {n} bytes at {index:#x}: the backend published"
                f" cons={cons:#x}..prod={prod:#x} of a {self.ring.size}-byte ring"
            )


class GuardedProducer(Producer):
    """A :class:`Producer` whose writes must lie within the free space."""

    def __init__(self, ring: ByteRing, load_cons: Callable[[], int], *args: object) -> None:
        self._seen: tuple[int, int] | None = None  # (our prod, the peer's cons) last loaded

        def load() -> int:
            cons = load_cons()
            self._seen = (self.prod, cons)
            return cons

        super().__init__(_GuardedRing(ring, self._check), load, *args)  # type: ignore[arg-type]

    def _check(self, op: str, index: int, n: int) -> None:
        if self._seen is None:
            VIOLATIONS.append(f"producer {op} of {n} bytes at {index:#x} before loading out_cons")
            return
        prod, cons = self._seen
        used = _strict_distance(prod, cons, self.ring.size)
        offset = (index - prod) & _MASK32
        if op != "write" or used < 0 or offset + n > self.ring.size - used:
            VIOLATIONS.append(
                f"producer {op} of {n} bytes at {index:#x}: the backend consumed up to"
                f" {cons:#x}, we produced up to {prod:#x}, ring of {self.ring.size} bytes"
            )


def install_guard() -> Callable[[], None]:
    """Make every Frontend created from now on use the guarded ring classes.

    :returns: a function that undoes it
    """
    saved = pyxen9p.frontend.Consumer, pyxen9p.frontend.Producer
    pyxen9p.frontend.Consumer = GuardedConsumer  # type: ignore[misc]
    pyxen9p.frontend.Producer = GuardedProducer  # type: ignore[misc]

    def undo() -> None:
        pyxen9p.frontend.Consumer, pyxen9p.frontend.Producer = saved  # type: ignore[misc]

    return undo


class HostileScript(Script):
    """The hostile test's :class:`Script` with more ways to lie."""

    def __call__(self, request: bytes) -> bytes:
        with self.lock:
            step = self.steps[0] if self.steps else ("echo",)
        kind = step[0]
        if kind not in ("out_cons", "in_data", "forge_in_prod", "big", "rm_state", "state_value"):
            return super().__call__(request)
        with self.lock:
            if self.steps:
                self.steps.pop(0)
        m = self.machine
        assert m is not None
        _size, mtype, tag = HEADER.unpack_from(request)
        good = echo(request)
        if kind == "out_cons":
            raw = m.backend.raw_ring(tag % m.backend.num_rings)
            raw.interface.out_cons = int(step[1])  # type: ignore[call-overload]
            return good
        if kind == "forge_in_prod":
            # unlike the hostile test's in_prod, no reply follows to overwrite it
            index = tag % m.backend.num_rings
            raw = m.backend.raw_ring(index)
            raw.interface.in_prod = (raw.interface.in_cons + int(step[1])) & _MASK32  # type: ignore[call-overload]
            m.backend.notify_frontend(index)
            return b""
        if kind == "in_data":
            # a frame that lies, placed in `in` behind a forged in_prod that
            # stays within the ring (so only the frame's content is wrong)
            raw = m.backend.raw_ring(tag % m.backend.num_rings)
            data = bytes(step[1])  # type: ignore[arg-type]
            prod = raw.interface.in_prod
            raw.in_ring.write(prod, data[: raw.size])
            raw.interface.in_prod = (prod + min(len(data), raw.size)) & _MASK32
            m.backend.notify_frontend(tag % m.backend.num_rings)
            return good
        if kind == "big":
            return frame(mtype + 1, tag, b"B" * int(step[1]))  # type: ignore[call-overload]
        store = m.dom0.open_xenstore()  # rm_state, state_value
        try:
            if kind == "rm_state":
                store.rm(f"{m.backend.backend_path}/state")
            else:
                store.write(f"{m.backend.backend_path}/state", bytes(step[1]))  # type: ignore[arg-type]
        finally:
            store.close()
        return good


def _u32(rng: random.Random) -> int:
    return rng.choice([0, 1, 7, 0x7FFFFFFF, 0x80000000, _MASK32, rng.randrange(1 << 32)])


#: the backend's actions and their relative weights
ACTIONS = [
    ("echo", 8),
    ("wrong_tag", 3),
    ("wrong_type", 3),
    ("rlerror", 3),
    ("duplicate", 3),
    ("silence", 1),
    ("garbage", 3),
    ("header", 3),
    ("short_body", 3),
    ("state", 2),
    ("in_prod", 3),
    ("notify_storm", 2),
    ("out_cons", 3),
    ("in_data", 3),
    ("forge_in_prod", 3),
    ("big", 2),
    ("rm_state", 1),
    ("state_value", 1),
]


def action(rng: random.Random, ring_bytes: int) -> tuple[object, ...]:
    """One backend action, drawn as the hostile test's strategy draws it, and more."""
    kind = rng.choices([a for a, _ in ACTIONS], [w for _, w in ACTIONS])[0]
    if kind == "wrong_tag":
        return (kind, rng.randrange(1 << 16))
    if kind == "wrong_type":
        return (kind, rng.randrange(256))
    if kind == "garbage":
        return (kind, rng.randbytes(rng.randrange(1, 65)))
    if kind == "header":
        size = rng.randrange(17) if rng.random() < 0.5 else _u32(rng)
        return (kind, size, rng.randrange(256), rng.randrange(1 << 16))
    if kind == "short_body":
        return (kind, rng.randrange(1, 51))
    if kind == "state":
        return (kind, rng.choice([5, 6, 1, 2, 3, 7, 99]))
    if kind in ("in_prod", "out_cons"):
        return (kind, _u32(rng))
    if kind == "forge_in_prod":  # a distance from in_cons: within the ring, or not
        return (kind, rng.choice([1, 6, 7, ring_bytes, ring_bytes + 1, _u32(rng)]))
    if kind == "notify_storm":
        return (kind, rng.randrange(1, 31))
    if kind == "state_value":  # the backend's state node, not a state number
        return (kind, rng.choice([b"", b"4x", b" 4", b"04", b"\xff", b"-1", b"4294967300", b"4\0"]))
    if kind == "in_data":
        size = rng.choice([0, 3, 7, 16, ring_bytes // 2, ring_bytes, _MASK32])
        forged = HEADER.pack(size & _MASK32, rng.randrange(256), rng.randrange(1 << 16))
        return (kind, forged + rng.randbytes(rng.randrange(0, 64)))
    if kind == "big":
        return (kind, rng.choice([ring_bytes // 2, ring_bytes - 7, ring_bytes, 2 * ring_bytes]))
    return (kind,)


def _xenstore_value(rng: random.Random, good: bytes) -> bytes:
    roll = rng.random()
    if roll < 0.6:
        return good
    if roll < 0.7:
        return rng.randbytes(rng.randrange(13))
    if roll < 0.8:
        return str(rng.randrange(-5, 2**33) if roll < 0.75 else rng.randrange(12)).encode()
    return rng.choice(
        [
            b"1",
            b"1,2",
            b"2,1",
            b"0",
            b"9",
            b"8",
            b"01",
            b"1 ",
            b"\x00",
            b"1,",
            b"2",
            b"3",
            b"10",
            b"-1",
            b"+1",
            b"0x1",
            b"\xff",
            b"",
        ]
    )


def open_fds() -> set[int]:
    """This process's open descriptors."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue
        fds.add(int(name))
    return fds


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Worker:
    """Plays frontend cases, each on a machine of its own."""

    def __init__(self) -> None:
        self._unguard = install_guard()
        self.notes: Counter[str] = Counter()
        self.thread_errors: list[str] = []
        self._previous_hook = previous = threading.excepthook

        def hook(args: threading.ExceptHookArgs) -> None:
            self.thread_errors.append(f"{args.thread}: {args.exc_type.__name__}: {args.exc_value}")
            previous(args)

        threading.excepthook = hook

    def close(self) -> None:
        """Undo the guard and the thread exception hook."""
        self._unguard()
        threading.excepthook = self._previous_hook

    def case(self, rng: random.Random) -> str:
        """One case; returns its kind."""
        VIOLATIONS.clear()
        self.thread_errors.clear()
        errors = _Errors()
        logger = logging.getLogger("pyxen9p")
        logger.addHandler(errors)
        threads_before = set(threading.enumerate())
        fds_before = open_fds()
        try:
            kind = self._replies(rng) if rng.random() < 0.8 else self._xenstore(rng)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                extra = [t for t in threading.enumerate() if t not in threads_before]
                if not extra:
                    break
                time.sleep(0.01)
            assert not extra, f"threads still running after the case: {extra}"
            fds = open_fds()
            assert fds == fds_before, f"descriptors left open: {sorted(fds - fds_before)}"
        finally:
            logger.removeHandler(errors)
        assert not VIOLATIONS, VIOLATIONS[:5]
        assert not self.thread_errors, self.thread_errors
        assert not errors.records, [r.getMessage() for r in errors.records]
        return kind

    def _replies(self, rng: random.Random) -> str:
        rings = rng.randrange(1, 4)
        order = rng.randrange(2, 5)
        ring_bytes = ring_size(order)
        steps = [action(rng, ring_bytes) for _ in range(rng.randrange(1, 8))]
        concurrent = rng.random() < 0.5
        msize = ring_bytes // 2
        sizes = [
            rng.choice([0, 1, 20, rng.randrange(msize - 6), msize - 7])
            for _ in range(len(steps) + 1)
        ]
        script = HostileScript(steps)
        with machine(handler=script, poll_interval=0.01) as m:
            script.machine = m  # type: ignore[assignment]
            fe = m.connect(rings=rings, ring_order=order, timeout=3)
            requests = [frame(TREAD, tag, bytes([tag]) * n) for tag, n in enumerate(sizes)]
            outcomes: dict[int, object] = {}
            start = time.monotonic()

            def run(tag: int) -> None:
                try:
                    outcomes[tag] = fe.request(requests[tag], timeout=TIMEOUT)
                except CLEAR as exc:
                    outcomes[tag] = exc
                except Exception as exc:
                    outcomes[tag] = AssertionError(f"request {tag}: unexpected {exc!r}")

            if concurrent:
                threads = [threading.Thread(target=run, args=(t,)) for t in range(len(requests))]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(10)
                assert not any(t.is_alive() for t in threads), "a request hung"
            else:
                for tag in range(len(requests)):
                    run(tag)
            took = time.monotonic() - start
            assert took < len(requests) * (TIMEOUT + 0.5) + 2, f"requests took {took:.1f} s"
            for tag, outcome in outcomes.items():
                if isinstance(outcome, bytes):
                    assert _acceptable_reply(requests[tag], outcome), (tag, outcome[:32])
                    self.notes["replies"] += 1
                else:
                    assert isinstance(outcome, CLEAR), outcome
                    assert str(outcome), f"an exception without a message: {outcome!r}"
                    self.notes[type(outcome).__name__] += 1
            assert len(outcomes) == len(requests)
            close_start = time.monotonic()
            fe.close()
            assert time.monotonic() - close_start < 8, "close() took too long"
            m.backend.stop()
            assert m.xen.resources(FE_DOMID).clean, m.xen.resources(FE_DOMID)
        return "replies:concurrent" if concurrent else "replies:serial"

    def _xenstore(self, rng: random.Random) -> str:
        advertise = {
            "versions": _xenstore_value(rng, b"1"),
            "max-rings": _xenstore_value(rng, b"2"),
            "max-ring-page-order": _xenstore_value(rng, b"9"),
        }
        missing = rng.choice([None] * 4 + ["versions", "max-rings", "max-ring-page-order"])
        with machine(advertise=advertise) as m:
            assert m.backend.wait_for_state(XenbusState.INIT_WAIT, timeout=5)
            if missing is not None:
                store = m.dom0.open_xenstore()
                store.rm(f"{m.backend.backend_path}/{missing}")
                store.close()
            try:
                fe = Frontend.connect(platform=m.guest, devid=0, timeout=1.5)
            except (BackendError, TimeoutError, TransportError) as exc:
                assert str(exc)
                self.notes["refused at connect"] += 1
            else:
                assert missing is None
                versions = advertise["versions"]
                assert b"1" in versions.split(b","), versions
                assert 1 <= fe.num_rings <= int(advertise["max-rings"])
                assert 2 <= fe.ring_order <= min(int(advertise["max-ring-page-order"]), 9)
                reply = fe.request(frame(TREAD, 1, b"x"), timeout=5)
                assert reply[4] in (TREAD + 1, 7), reply
                fe.close()
                self.notes["connected"] += 1
            m.backend.stop()
            assert m.xen.resources(FE_DOMID).clean, m.xen.resources(FE_DOMID)
        return "xenstore"
