"""Running one case against a target, with the oracles watching every step.

:func:`run_case` gets a fresh device from the target, performs the case's
steps with a :class:`~pyxen9p.fuzz.raw.RawFrontend`, and after every step
asks the oracles; the first :class:`~pyxen9p.fuzz.case.Finding` ends the
case.  It always ends with the frontend closing (Closing, then Closed, and
everything released), which is watched too.

The oracles (:data:`~pyxen9p.fuzz.case.FINDING_KINDS`):

* ``backend-gone``: the target says its backend died (a QEMU PID gone or
  replaced, a simulated backend dead);
* ``state-invalid``: the backend's ``state`` is not a number in 0..8, or
  vanished;
* ``close-ignored``: the backend is still Connected after the frontend
  wrote Closed and the close timeout passed;
* ``no-reply``: a well-framed request, published whole on its own ring
  (``tag % num_rings``) while nothing else was waiting, the ring untouched
  by any lie and the backend Connected, got no reply within the reply
  timeout and the backend stayed Connected (QEMU closes the device on a
  request it cannot decode: that is not a hang);
* ``ring-index``: ``in_prod - in_cons`` beyond the ring;
* ``reply-size``: a reply header announcing fewer than 7 bytes or more
  than the ring;
* ``stray-reply``: while every frame so far was honest, a reply whose tag
  no request waits for, or on a ring that is neither the request's nor
  ``tag % num_rings`` (after a frame that lied about its size, ring or
  indices, a backend may read any bytes as a request);
* ``escape``: a new entry beside the exported directory (the target
  watches the export's parent).
"""

from __future__ import annotations

import contextlib
import struct
import time
from typing import TYPE_CHECKING, Any

from pyxen9p.errors import Pyxen9pError, RingProtocolError
from pyxen9p.fuzz.case import Case, Finding
from pyxen9p.fuzz.raw import RawFrontend, RawRing
from pyxen9p.ring import HEADER, HEADER_SIZE, queued

if TYPE_CHECKING:
    from pyxen9p.fuzz.target import Device, Target

__all__ = ["CaseResult", "run_case"]

_MASK32 = 0xFFFFFFFF
_INITIALISED, _CONNECTED, _CLOSING, _CLOSED = b"3", b"4", b"5", b"6"
#: A message this small fits any msize a backend grants.
_SMALL = 4096


class CaseResult:
    """What running a case gave.

    :ivar finding: the first finding, or ``None``
    :ivar steps_run: how many steps were performed
    :ivar replies: how many replies were read
    :ivar seconds: how long it took
    """

    def __init__(self) -> None:
        self.finding: Finding | None = None
        self.steps_run = 0
        self.replies = 0
        self.seconds = 0.0


class _Found(Pyxen9pError):
    """A finding, ending the case (never leaves this module)."""

    def __init__(self, finding: Finding) -> None:
        super().__init__(finding.summary())
        self.finding = finding


class _Runner:
    def __init__(self, target: Target, device: Device, fe: RawFrontend) -> None:
        self.target = target
        self.device = device
        self.fe = fe
        self.step = -1
        self.clean = True  # nothing has lied on any ring yet
        self.replies = 0
        self.outstanding: dict[int, list[int]] = {}  # tag -> rings it was sent on
        self.state_seen = False

    # -- oracles -------------------------------------------------------------------

    def found(self, kind: str, detail: str) -> _Found:
        return _Found(Finding(kind, detail, self.step))

    def check(self) -> None:
        dead = self.target.dead()
        if dead is not None:
            raise self.found("backend-gone", dead)
        raw = self.fe.backend_state()
        if raw is None:
            if self.state_seen:
                raise self.found("state-invalid", f"{self.fe.backend}/state vanished")
            return
        self.state_seen = True
        if not raw.isdigit() or len(raw) > 1 or int(raw) > 8:
            raise self.found("state-invalid", f"backend state {raw!r}")
        self.drain()

    def drain(self) -> None:
        """Read every whole reply the backend published, checking each."""
        for ring in self.fe.rings:
            while True:
                try:
                    avail = queued(ring.interface.in_prod, ring.in_cons, ring.size)
                except RingProtocolError as exc:
                    raise self.found("ring-index", f"ring {ring.index}: {exc}") from None
                if avail < HEADER_SIZE:
                    break
                size, mtype, tag = HEADER.unpack(ring.in_ring.read(ring.in_cons, HEADER_SIZE))
                if not HEADER_SIZE <= size <= ring.size:
                    raise self.found(
                        "reply-size",
                        f"ring {ring.index}: reply type {mtype} tag {tag} announces {size}"
                        f" bytes (ring {ring.size})",
                    )
                if avail < size:
                    break
                ring.in_cons = (ring.in_cons + size) & _MASK32
                ring.interface.in_cons = ring.in_cons
                self.fe.notify(ring)
                self.replies += 1
                self.answer(ring, mtype, tag)

    def answer(self, ring: RawRing, mtype: int, tag: int) -> None:
        sent = self.outstanding.get(tag)
        if not self.clean:
            # after a frame that lied (size, ring, index), a backend may read any
            # bytes as a request: its replies are judged only by their size
            if sent:
                sent.pop()
                if not sent:
                    del self.outstanding[tag]
            return
        if not sent:
            raise self.found(
                "stray-reply", f"ring {ring.index}: reply type {mtype} to tag {tag}, not sent"
            )
        n = len(self.fe.rings)
        if ring.index not in sent and ring.index != tag % n:
            raise self.found(
                "stray-reply",
                f"reply type {mtype} to tag {tag} on ring {ring.index}; sent on {sent},"
                f" {n} rings",
            )
        sent.remove(ring.index if ring.index in sent else sent[0])
        if not sent:
            del self.outstanding[tag]

    # -- waiting ---------------------------------------------------------------------

    def wait(self, seconds: float, until: Any = None) -> bool:
        """Check every poll interval for *seconds*, or until *until()* is true."""
        deadline = time.monotonic() + seconds
        while True:
            self.check()
            if until is not None and until():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(self.target.poll_interval)

    def settle(self, before: bytes | None) -> None:
        """After a state write: give the backend time to react (a state change)."""
        self.wait(self.target.settle_time, lambda: self.fe.backend_state() != before)
        self.wait(self.target.poll_interval * 2)

    # -- steps -----------------------------------------------------------------------------

    def ring(self, index: Any) -> RawRing | None:
        if not self.fe.rings:
            return None
        return self.fe.rings[int(index) % len(self.fe.rings)]

    def do(self, step: dict[str, Any]) -> None:
        op = step["op"]
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            raise ValueError(f"unknown step {op!r}")
        handler(step)

    def op_setup(self, step: dict[str, Any], *, state: bytes | None = None) -> None:
        rings = max(1, min(int(step.get("rings", 1)), 8))
        order = max(1, min(int(step.get("order", 1)), 9))
        if self.fe.rings:  # a second setup: new rings, the old ones stay shared
            self.clean = False
        first = len(self.fe.rings)
        for _ in range(rings):
            self.fe.share_ring(
                order, declared_order=step.get("ring_order"), refs=str(step.get("refs", "ok"))
            )
        if step.get("ring_order") is not None or step.get("refs", "ok") != "ok":
            self.clean = False
        keys: dict[str, str] = {"version": "1", "num-rings": str(rings)}
        for i, ring in enumerate(self.fe.rings[first:]):
            keys[f"ring-ref{i}"] = str(ring.interface_pages.refs[0])
            keys[f"event-channel-{i}"] = str(ring.port)
        for key, value in dict(step.get("keys", {})).items():
            keys[str(key)] = str(value)
            self.clean = False
        # the new rings replace the old ones as far as the backend knows
        self.fe.rings[:] = self.fe.rings[first:]
        if step.get("txn"):  # as Linux and pyxen9p do: one transaction, state included
            if state is not None:
                keys["state"] = state.decode()
            for txn in self.fe.store.transaction():
                with txn:
                    for key, value in keys.items():
                        txn.write(f"{self.fe.frontend}/{key}", value)
            return
        for key, value in keys.items():
            self.fe.write(key, value)
        if state is not None:
            self.fe.write("state", state)

    def op_state(self, step: dict[str, Any]) -> None:
        before = self.fe.backend_state()
        self.fe.write("state", str(step.get("value", "")))
        self.settle(before)

    def op_connect(self, step: dict[str, Any]) -> None:
        before = self.fe.backend_state()
        self.op_setup(step, state=_INITIALISED)
        self.wait(
            self.target.connect_timeout,
            lambda: self.fe.backend_state() not in (before, b"2", b"3", b"1"),
        )
        if self.fe.backend_state() == _CONNECTED:
            self.fe.write("state", _CONNECTED)
        self.wait(self.target.poll_interval * 2)

    def op_close(self, step: dict[str, Any]) -> None:
        self.fe.write("state", _CLOSING)
        self.wait(self.target.settle_time, lambda: self.fe.backend_state() != _CONNECTED)
        self.fe.write("state", _CLOSED)
        self.wait(self.target.settle_time, lambda: self.fe.backend_state() in (_CLOSED, b"2"))

    def op_reinit(self, step: dict[str, Any]) -> None:
        before = self.fe.backend_state()
        self.fe.write("state", "1")
        self.wait(self.target.settle_time, lambda: self.fe.backend_state() not in (before,))
        self.wait(self.target.settle_time, lambda: self.fe.backend_state() == b"2")

    def op_rm(self, step: dict[str, Any]) -> None:
        before = self.fe.backend_state()
        self.fe.rm(str(step.get("key", "")))
        self.settle(before)

    def op_write(self, step: dict[str, Any]) -> None:
        self.fe.write(str(step["key"]), str(step.get("value", "")))
        self.wait(self.target.poll_interval * 2)

    def op_sleep(self, step: dict[str, Any]) -> None:
        self.wait(min(float(step.get("seconds", 0.1)), 5.0))

    def op_notify(self, step: dict[str, Any]) -> None:
        ring = self.ring(step.get("ring", 0))
        if ring is not None:
            self.fe.notify(ring, max(0, min(int(step.get("count", 1)), 10_000)))
        self.wait(self.target.poll_interval * 2)

    def op_put(self, step: dict[str, Any]) -> None:
        ring = self.ring(step.get("ring", 0))
        if ring is None:
            return
        data = bytes.fromhex(step["data"])
        publish = step.get("publish")
        self.clean = False
        if len(data) >= HEADER_SIZE:
            self.outstanding.setdefault(struct.unpack_from("<H", data, 5)[0], []).append(
                ring.index
            )
        self.fe.put(ring, data, None if publish is None else int(publish))
        self.wait(self.target.poll_interval * 2)

    def op_publish(self, step: dict[str, Any]) -> None:
        ring = self.ring(step.get("ring", 0))
        if ring is not None:
            self.fe.publish(ring, int(step.get("count", 0)))
        self.wait(self.target.poll_interval * 2)

    def op_index(self, step: dict[str, Any]) -> None:
        ring = self.ring(step.get("ring", 0))
        if ring is None:
            return
        self.clean = False
        delta = int(step.get("delta", 0))
        if step.get("field") == "in_cons":
            # the shared index lies; the private one (what was really read) does not
            ring.interface.in_cons = (ring.in_cons + delta) & _MASK32
            self.fe.notify(ring)
        else:
            self.fe.publish(ring, delta)
        self.wait(self.target.poll_interval * 2)

    def op_wrap(self, step: dict[str, Any]) -> None:
        """Move every index of a ring near the 32-bit wrap, before anything is sent."""
        ring = self.ring(step.get("ring", 0))
        if ring is None:
            return
        if ring.out_prod or ring.in_cons:
            self.clean = False  # too late: the backend has private copies by now
            return
        value = int(step.get("value", 0)) & _MASK32
        intf = ring.interface
        intf.in_cons = intf.in_prod = intf.out_cons = intf.out_prod = value
        ring.in_cons = ring.out_prod = value
        # QEMU reads its private indices at connect: only honest if set before that
        self.clean = False

    def op_intf(self, step: dict[str, Any]) -> None:
        ring = self.ring(step.get("ring", 0))
        if ring is None:
            return
        self.clean = False
        value = int(step.get("value", 0)) & _MASK32
        if step.get("field") == "ring_order":
            ring.interface.ring_order = value
        else:
            ring.interface.set_refs([value])
        self.wait(self.target.poll_interval * 2)

    def op_msg(self, step: dict[str, Any]) -> None:
        data = bytes.fromhex(step["data"])
        n = len(self.fe.rings)
        if n == 0:
            return
        tag = struct.unpack_from("<H", data, 5)[0] if len(data) >= HEADER_SIZE else 0
        home = tag % n
        ring = self.fe.rings[int(step["ring"]) % n if "ring" in step else home]
        if len(data) > ring.size:
            data = data[: ring.size]
        framed = (
            len(data) >= HEADER_SIZE
            and struct.unpack_from("<I", data)[0] == len(data)
            and len(data) <= _SMALL
            and ring.index == home
        )
        watched = (
            framed and self.clean and not self.outstanding
            and self.fe.backend_state() == _CONNECTED
        )  # fmt: skip
        if not framed:
            self.clean = False
        if len(data) >= HEADER_SIZE:
            self.outstanding.setdefault(tag, []).append(ring.index)
        self.fe.put(ring, data)
        answered = self.wait(
            self.target.reply_timeout,
            lambda: tag not in self.outstanding or self.fe.backend_state() != _CONNECTED,
        )
        if not answered and watched:
            self.check()
            if self.fe.backend_state() == _CONNECTED and tag in self.outstanding:
                raise self.found(
                    "no-reply",
                    f"no reply to type {data[4]} tag {tag} on ring {ring.index} within"
                    f" {self.target.reply_timeout:.1f}s, backend still Connected",
                )
        if not answered:
            self.clean = False  # a request still waits: later ones may queue behind it

    def finish(self) -> None:
        """Close as a frontend does, then watch the backend leave Connected."""
        if self.fe.backend_state() is None and not self.state_seen:
            return
        self.fe.write("state", _CLOSING)
        self.wait(self.target.settle_time, lambda: self.fe.backend_state() != _CONNECTED)
        self.fe.write("state", _CLOSED)
        left = self.wait(
            self.target.close_timeout, lambda: self.fe.backend_state() != _CONNECTED
        )
        if not left:
            raise self.found(
                "close-ignored",
                f"backend still Connected {self.target.close_timeout:.1f}s after the"
                " frontend wrote Closed",
            )
        self.wait(self.target.poll_interval * 2)


def run_case(target: Target, case: Case) -> CaseResult:
    """Run *case* on a fresh device of *target*; the first finding ends it.

    Nothing of the frontend outlives the call; the device is handed back to
    the target (:meth:`~pyxen9p.fuzz.target.Target.retire`).
    """
    result = CaseResult()
    started = time.monotonic()
    device = target.new_device()
    try:
        before = target.outside_export()
        fe = RawFrontend(target.platform, device.frontend, device.backend, device.backend_domid)
        runner = _Runner(target, device, fe)
        try:
            try:
                runner.check()
                for index, step in enumerate(case.steps):
                    runner.step = index
                    runner.do(step)
                    result.steps_run += 1
                    runner.check()
                runner.step = -1
                runner.finish()
            except _Found as found:
                result.finding = found.finding
            if result.finding is None:
                after = target.outside_export()
                new = sorted(after - before)
                if new:
                    result.finding = Finding("escape", f"new beside the export: {new}", -1)
            if result.finding is None:
                dead = target.dead()
                if dead is not None:
                    result.finding = Finding("backend-gone", dead, -1)
        finally:
            result.replies = runner.replies
            if result.finding is not None:
                # the backend may be dead or stuck: do not wait for it to unmap
                with contextlib.suppress(OSError):
                    fe.write("state", _CLOSED)
            fe.close()
    finally:
        target.retire(device)
    result.seconds = time.monotonic() - started
    return result
