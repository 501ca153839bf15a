"""The XenStore watch object shared by the real bindings and the simulator."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from typing_extensions import Self

from pyxen9p.interfaces import WatchEvent

__all__ = ["Watch", "WatchSource"]


class WatchSource(Protocol):
    """What a :class:`Watch` needs of the store that registered it."""

    def _next_event(self, watch: Watch, timeout: float | None) -> WatchEvent | None: ...

    def _unwatch(self, watch: Watch) -> None: ...


class Watch:
    """A registered XenStore watch: iterate it, or :meth:`get` its next event.

    The watch fires once when registered (so a waiter can check the current
    state first) and again on changes at or below :attr:`path`; like
    XenStore's own watches it may fire spuriously.  Events of every watch of a
    connection arrive together and are dispatched to their watch by token.

    :ivar path: the watched path
    :ivar token: the watch's token
    :ivar closed: whether the watch was removed
    """

    def __init__(self, store: WatchSource, path: str, token: str) -> None:
        self._store = store
        self.path = path
        self.token = token
        self.closed = False

    def get(self, timeout: float | None = None) -> WatchEvent | None:
        """The next event, waiting up to *timeout* seconds (``None``: forever).

        :returns: the event, or ``None`` on timeout or once the watch is closed
        """
        return self._store._next_event(self, timeout)

    def __iter__(self) -> Iterator[WatchEvent]:
        while True:
            event = self.get()
            if event is None:
                return
            yield event

    def close(self) -> None:
        """Remove the watch (idempotent; also done when the store closes)."""
        self._store._unwatch(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
