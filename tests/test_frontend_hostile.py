"""A hostile backend, driven by hypothesis, can never hurt the frontend.

Every case ends, within its timeout, in a correct reply or a clear exception,
and leaves no grant, mapping, port or handle behind.
"""

from __future__ import annotations

import threading
import time

from frontend_helpers import FE_DOMID, TREAD, echo, frame, machine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyxen9p.errors import BackendError, ProtocolError, TransportError
from pyxen9p.frontend import Frontend
from pyxen9p.ring import HEADER
from pyxen9p.xenbus import XenbusState

CLEAR = (TransportError, TimeoutError, ProtocolError)  # BackendError is a TransportError
TIMEOUT = 0.4

u8 = st.integers(0, 255)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)

# what the backend answers to one request (drawn up front: handlers run in
# backend threads, where hypothesis cannot draw)
actions = st.one_of(
    st.just(("echo",)),
    st.tuples(st.just("wrong_tag"), u16),
    st.tuples(st.just("wrong_type"), u8),
    st.just(("rlerror",)),
    st.just(("duplicate",)),
    st.just(("silence",)),
    st.tuples(st.just("garbage"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("header"), st.one_of(st.integers(0, 16), u32), u8, u16),
    st.tuples(st.just("short_body"), st.integers(1, 50)),
    st.tuples(st.just("state"), st.sampled_from([5, 6, 1, 2, 3, 7, 99])),
    st.tuples(st.just("in_prod"), u32),
    st.tuples(st.just("notify_storm"), st.integers(1, 30)),
)


class Script:
    """Plays the drawn actions, one per request, from the backend's threads."""

    def __init__(self, steps: list[tuple[object, ...]]) -> None:
        self.steps = list(steps)
        self.lock = threading.Lock()
        self.machine = None  # set once the machine exists

    def __call__(self, request: bytes) -> bytes:
        size, mtype, tag = HEADER.unpack_from(request)
        with self.lock:
            step = self.steps.pop(0) if self.steps else ("echo",)
        kind = step[0]
        good = echo(request)
        if kind == "wrong_tag":
            return frame(mtype + 1, int(step[1]), request[7:size])  # type: ignore[call-overload]
        if kind == "wrong_type":
            return frame(int(step[1]), tag, b"")  # type: ignore[call-overload]
        if kind == "rlerror":
            return frame(7, tag, b"\x05\x00\x00\x00")
        if kind == "duplicate":
            return good + good
        if kind == "silence":
            return b""
        if kind == "garbage":
            return bytes(step[1])  # type: ignore[arg-type]
        if kind == "header":
            return HEADER.pack(int(step[1]), int(step[2]), int(step[3]))  # type: ignore[call-overload]
        if kind == "short_body":
            return good[: max(7, len(good) - int(step[1]))]  # type: ignore[call-overload]
        m = self.machine
        assert m is not None
        if kind == "state":
            m.backend.force_state(int(step[1]))  # type: ignore[call-overload]
            return good
        if kind == "in_prod":
            raw = m.backend.raw_ring(tag % m.backend.num_rings)
            raw.interface.in_prod = int(step[1])  # type: ignore[call-overload]
            return good
        if kind == "notify_storm":
            for _ in range(int(step[1])):  # type: ignore[call-overload]
                m.backend.notify_frontend(tag % m.backend.num_rings)
            return good
        return good


def _acceptable_reply(request: bytes, reply: bytes) -> bool:
    _size, mtype, tag = HEADER.unpack_from(request)
    rsize, rtype, rtag = HEADER.unpack_from(reply)
    return rtag == tag and rsize == len(reply) and rtype in (mtype + 1, 7, 107)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    steps=st.lists(actions, min_size=1, max_size=6),
    rings=st.integers(1, 3),
    concurrent=st.booleans(),
)
def test_hostile_replies_end_in_a_reply_or_a_clear_error(
    steps: list[tuple[object, ...]], rings: int, concurrent: bool
) -> None:
    script = Script(steps)
    with machine(handler=script, poll_interval=0.01) as m:
        script.machine = m  # type: ignore[assignment]
        fe = m.connect(rings=rings, ring_order=2, timeout=3)
        requests = [frame(TREAD, tag, b"request %d" % tag) for tag in range(len(steps) + 1)]
        outcomes: dict[int, object] = {}
        start = time.monotonic()

        def run(tag: int) -> None:
            try:
                outcomes[tag] = fe.request(requests[tag], timeout=TIMEOUT)
            except CLEAR as exc:
                outcomes[tag] = exc

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
        # bounded: every request ended within its timeout (plus scheduling slack)
        assert time.monotonic() - start < len(requests) * (TIMEOUT + 0.5) + 2
        for tag, outcome in outcomes.items():
            if isinstance(outcome, bytes):
                assert _acceptable_reply(requests[tag], outcome), (tag, outcome)
            else:
                assert isinstance(outcome, CLEAR), outcome
                assert str(outcome)  # a message that says something
        assert len(outcomes) == len(requests)
        close_start = time.monotonic()
        fe.close()
        # bounded: two waits for the backend (3 s each at most), nothing else
        assert time.monotonic() - close_start < 8
        assert not [t for t in threading.enumerate() if t.name.startswith("pyxen9p-rx")], (
            "the receiver thread is still running"
        )
        m.backend.stop()
        assert m.xen.resources(FE_DOMID).clean, m.xen.resources(FE_DOMID)


values = st.one_of(
    st.binary(max_size=12),
    st.integers(-5, 2**33).map(lambda n: str(n).encode()),
    st.sampled_from([b"1", b"1,2", b"2,1", b"0", b"9", b"8", b"01", b"1 ", b"\x00", b"1,"]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    versions=values,
    max_rings=values,
    max_order=values,
    missing=st.sampled_from([None, "versions", "max-rings", "max-ring-page-order"]),
)
def test_malformed_xenstore_values_give_a_clear_error_or_a_valid_connection(
    versions: bytes, max_rings: bytes, max_order: bytes, missing: str | None
) -> None:
    advertise = {"versions": versions, "max-rings": max_rings, "max-ring-page-order": max_order}
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
        else:
            # only values a strict reader accepts can connect
            assert missing is None
            assert b"1" in versions.split(b",")
            assert 1 <= fe.num_rings <= int(max_rings)
            assert 2 <= fe.ring_order <= min(int(max_order), 9)
            fe.close()
        m.backend.stop()
        assert m.xen.resources(FE_DOMID).clean
