"""XenStore pieces shared by the real bindings and the simulator: watches, retries."""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

from typing_extensions import Self

from pyxen9p.errors import TransactionConflictError
from pyxen9p.interfaces import WatchEvent

__all__ = ["TransactionAttempt", "Watch", "WatchSource", "retry_transactions", "run_transaction"]


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


class TransactionAttempt(Protocol):
    """What :func:`retry_transactions` needs of one transaction attempt."""

    committed: bool
    conflicted: bool


_A = TypeVar("_A", bound=TransactionAttempt)
_R = TypeVar("_R")


def retry_transactions(
    new_attempt: Callable[[], _A], max_attempts: int, function: str
) -> Iterator[_A]:
    """Yield attempts from *new_attempt* until one commits, backing off between conflicts.

    :param function: the C function named in the error after the last conflict
    :raises TransactionConflictError: after *max_attempts* conflicts
    :raises RuntimeError: if an attempt is not used in a ``with`` block
    """
    for attempt in range(max_attempts):
        txn = new_attempt()
        yield txn
        if txn.committed:
            return
        if not txn.conflicted:
            raise RuntimeError("each transaction attempt must be used in a with block")
        time.sleep(min(0.001 * (2**attempt), 0.05))
    raise TransactionConflictError(
        errno.EAGAIN, function, f"still conflicting after {max_attempts} attempts"
    )


def run_transaction(attempts: Iterator[_A], body: Callable[[_A], _R]) -> _R:
    """Run ``body(txn)`` in each attempt of *attempts* until one commits; return its result."""
    result: _R | None = None
    for txn in attempts:
        with txn:  # type: ignore[attr-defined]
            result = body(txn)
    return result  # type: ignore[return-value]
