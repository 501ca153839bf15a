"""Close handles while other threads use them, many times (run as a subprocess).

``python tests/close_stress.py MODE --cycles N --seconds T`` runs up to *N*
cycles (and stops after *T* seconds, whichever comes first) of: open a
handle, start threads that use it (blocking waits included), close it from
the main thread after a random short delay, join the threads.  Each thread
must end, with a result or with :class:`~pyxen9p.errors.HandleClosedError`;
anything else is an anomaly.  The last line of the output is a JSON summary
(``cycles``, ``anomalies``, ``hung``, and for the mocks ``misuse`` and
``live``).  A crash (a segfault in C) is the process dying: the caller sees
its return code.

Modes:

``xenstore``
    the real ``libxenstore`` against the xenstored socket in
    ``XENSTORED_PATH``: a thread in :meth:`Watch.get`, one in
    :meth:`XenStore.read_watch`, one reading and writing, while a second
    connection keeps firing the watches;
``mock``
    the bindings over the mock libraries (``MOCKXEN_DIR`` and the
    ``PYXEN9P_LIB*`` variables set by ``mock_env``): an event channel with a
    thread in :meth:`EventChannel.wait` and one binding ports, a grant sharer
    with a thread sharing and unsharing pages, a grant table with a thread
    mapping and unmapping a page.

``--users a,b`` starts only the named threads (``watch.get``, ``read_watch``,
``read``, ``check_watch``; ``evtchn.wait``, ``evtchn.bind``, ``gntshr.share``,
``gnttab.map``).  ``--close-timeout`` sets :attr:`CHandle.close_timeout` (how long a close
waits for calls in C).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyxen9p.errors import HandleClosedError

JOIN_TIMEOUT = 10.0


class Cycle:
    """The threads of one cycle and what they ended with."""

    def __init__(self, users: frozenset[str] | None = None) -> None:
        self.users = users
        self.threads: list[threading.Thread] = []
        self.anomalies: list[str] = []
        self.stop = threading.Event()

    def spawn(self, name: str, body: Callable[[], Any], *, loop: bool = True) -> None:
        """Run *body* on a thread (repeatedly with *loop*) until the handle closes."""
        if self.users is not None and name not in self.users:
            return

        def run() -> None:
            try:
                while not self.stop.is_set():
                    body()
                    if not loop:
                        return
            except HandleClosedError:
                return
            except BaseException as exc:  # anything but the clean error is a finding
                self.anomalies.append(f"{name}: {type(exc).__name__}: {exc}")

        thread = threading.Thread(target=run, name=name, daemon=True)
        self.threads.append(thread)
        thread.start()

    def finish(self) -> list[str]:
        """Join the threads; return the names of those that did not end."""
        self.stop.set()
        hung = []
        for thread in self.threads:
            thread.join(JOIN_TIMEOUT)
            if thread.is_alive():
                hung.append(thread.name)
        return hung


def _pause(rng: random.Random) -> None:
    time.sleep(rng.choice((0.0, 0.0005, 0.002, 0.01)))


def run_xenstore(
    cycles: int,
    seconds: float,
    rng: random.Random,
    summary: dict[str, Any],
    users: frozenset[str] | None = None,
) -> dict[str, Any]:
    """The ``xenstore`` mode (see the module documentation)."""
    from pyxen9p.libs.xenstore import XenStore

    summary.update(cycles=0, anomalies=[], hung=[])
    writer = XenStore()
    firing = threading.Event()
    firing.set()

    def fire() -> None:
        n = 0
        while firing.is_set():
            n += 1
            writer.write("/stress/w", str(n))
            time.sleep(0.0002)

    firer = threading.Thread(target=fire, daemon=True)
    firer.start()
    deadline = time.monotonic() + seconds
    try:
        while summary["cycles"] < cycles and time.monotonic() < deadline:
            store = XenStore()
            watch = store.watch("/stress")
            store.watch("/stress/w", token="raw")
            cycle = Cycle(users)
            cycle.spawn("watch.get", lambda w=watch: w.get(None), loop=False)
            cycle.spawn("read_watch", store.read_watch)
            cycle.spawn("read", lambda s=store: s.read("/stress/w"))
            cycle.spawn("check_watch", store.check_watch)
            _pause(rng)
            try:
                store.close()
            except Exception as exc:
                cycle.anomalies.append(f"close: {type(exc).__name__}: {exc}")
            summary["hung"] += cycle.finish()
            summary["anomalies"] += cycle.anomalies
            summary["cycles"] += 1
    finally:
        firing.clear()
        firer.join(JOIN_TIMEOUT)
        writer.close()
    return summary


def run_mock(
    cycles: int,
    seconds: float,
    rng: random.Random,
    summary: dict[str, Any],
    users: frozenset[str] | None = None,
) -> dict[str, Any]:
    """The ``mock`` mode (see the module documentation)."""
    from pyxen9p.libs import EventChannel, GrantSharer, GrantTable

    summary.update(cycles=0, anomalies=[], hung=[])
    peer = EventChannel()
    owner = GrantSharer()
    page = owner.share_pages(0, 1)
    deadline = time.monotonic() + seconds
    try:
        while summary["cycles"] < cycles and time.monotonic() < deadline:
            channel, sharer, table = EventChannel(), GrantSharer(), GrantTable()
            remote = peer.bind_unbound_port(0)
            local = channel.bind_interdomain(0, remote)
            cycle = Cycle(users)
            notifying = threading.Event()

            def notify(remote: int = remote, notifying: threading.Event = notifying) -> None:
                while not notifying.is_set():
                    peer.notify(remote)
                    time.sleep(0.0002)

            def wait(channel: EventChannel = channel, local: int = local) -> None:
                if channel.wait(None) is not None:
                    channel.unmask(local)

            def bind(channel: EventChannel = channel) -> None:
                channel.unbind(channel.bind_unbound_port(0))

            def share(sharer: GrantSharer = sharer) -> None:
                sharer.share_pages(0, 1).close()

            def map_page(table: GrantTable = table) -> None:
                with table.map_grant_ref(0, page.refs[0]) as mapping:
                    try:
                        mapping.buffer[0] = 1
                    except ValueError:
                        # the table's close unmapped it meanwhile: the view
                        # is released, which is the clean refusal here
                        if not table.closed:
                            raise

            notifier = threading.Thread(target=notify, daemon=True)
            notifier.start()
            cycle.spawn("evtchn.wait", wait)
            cycle.spawn("evtchn.bind", bind)
            cycle.spawn("gntshr.share", share)
            cycle.spawn("gnttab.map", map_page)
            _pause(rng)
            handles: list[Any] = [channel, sharer, table]
            rng.shuffle(handles)
            for handle in handles:
                try:
                    handle.close()
                except Exception as exc:  # close must release cleanly under use
                    cycle.anomalies.append(f"close: {type(exc).__name__}: {exc}")
            summary["hung"] += cycle.finish()
            notifying.set()
            notifier.join(JOIN_TIMEOUT)
            peer.unbind(remote)
            summary["anomalies"] += cycle.anomalies
            summary["cycles"] += 1
    finally:
        page.close()
        owner.close()
        peer.close()
    control = ctypes.CDLL(str(Path(os.environ["PYXEN9P_LIBXENGNTTAB"]).with_name("libmockxen.so")))
    summary["misuse"] = int(control.mockxen_misuse())
    summary["live"] = {
        kind: int(getattr(control, f"mockxen_live_{kind}")())
        for kind in ("grants", "mappings", "ports", "handles")
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    """Run one mode and print its JSON summary as the last line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("xenstore", "mock"))
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--close-timeout", type=float, default=None)
    parser.add_argument(
        "--users", default=None, help="comma-separated thread names to start (default: all)"
    )
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    if args.close_timeout is not None:
        from pyxen9p.libs._ctypeslib import CHandle

        CHandle.close_timeout = args.close_timeout
    run = run_xenstore if args.mode == "xenstore" else run_mock
    started = time.monotonic()
    progress: dict[str, Any] = {"seed": seed}

    def watchdog() -> None:
        # a close stuck in C (a deadlock) never returns: report and leave
        progress["watchdog"] = f"still running after {limit:g}s"
        sys.stdout.write(json.dumps(progress) + "\n")
        sys.stdout.flush()
        os._exit(3)

    limit = args.seconds + 2 * JOIN_TIMEOUT + 5
    timer = threading.Timer(limit, watchdog)
    timer.daemon = True
    timer.start()
    users = None if args.users is None else frozenset(args.users.split(","))
    summary = run(args.cycles, args.seconds, random.Random(seed), progress, users)
    timer.cancel()
    summary["seed"] = seed
    summary["elapsed"] = round(time.monotonic() - started, 3)
    sys.stdout.write(json.dumps(summary) + "\n")
    sys.stdout.flush()
    ok = not summary["anomalies"] and not summary["hung"] and not summary.get("misuse")
    # a hung thread may sit in C: leave without running finalizers over it
    os._exit(0 if ok else 1)


if __name__ == "__main__":
    sys.exit(main())
