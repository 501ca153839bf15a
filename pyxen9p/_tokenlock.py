"""A lock for hot paths that reads no clock while it is free (:class:`TokenLock`)."""

from __future__ import annotations

import threading
import time

__all__ = ["TokenLock"]


class TokenLock:
    """A lock that reads no clock while it is free.

    On CPython 3.11 every acquisition of a :class:`threading.Lock` reads the
    clock (a system call in a PV domain without vDSO), even one that finds
    the lock free; a lock taken once per message or per C call costs one
    each.  Here the lock is one token in a list:
    taking it is ``list.pop()``, one C-level operation, atomic under the GIL
    and on free-threaded builds, that exactly one of the threads trying at
    once wins (the others get :class:`IndexError`); giving it back is
    ``list.append``, done only by the holder.

    A thread that must wait counts itself in ``_waiting`` under the
    condition's lock *before* its last try of the token, and waits on the
    condition; :meth:`release` reads ``_waiting`` *after* putting the token
    back.  So either that last try finds the token, or the releaser sees
    the waiter and notifies it under the lock (which the waiter holds until
    it waits): no wake-up is lost.  A waiter woken whose token was taken
    meanwhile by a fast :meth:`acquire` waits again: that taker's release
    notifies again.
    """

    __slots__ = ("_cond", "_token", "_waiting", "token")

    def __init__(self) -> None:
        #: the token: ``token.pop()`` takes the lock if free (:meth:`acquire`
        #: without waiting and without a Python frame), else raises IndexError
        self.token: list[None] = [None]
        self._token = self.token
        self._cond = threading.Condition(threading.Lock())
        self._waiting = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the lock: whether it was taken (within *timeout* seconds if
        *blocking*; a negative *timeout*: as long as it takes)."""
        try:
            self._token.pop()  # atomic: one taker
            return True
        except IndexError:
            if not blocking:
                return False
        deadline = None if timeout < 0 else time.monotonic() + timeout
        with self._cond:
            self._waiting += 1  # before the last try below: see the class
            try:
                while True:
                    try:
                        self._token.pop()
                        return True
                    except IndexError:
                        pass
                    if deadline is None:
                        self._cond.wait()
                        continue
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(left)
            finally:
                self._waiting -= 1

    def release(self) -> None:
        """Give the lock back (only its holder calls this).

        :raises RuntimeError: the lock is not held
        """
        if self._token:
            raise RuntimeError("release of a token lock not held")
        self._token.append(None)
        if self._waiting:  # read after the append: see the class
            with self._cond:
                self._cond.notify()

    def locked(self) -> bool:
        """Whether a thread holds the lock."""
        return not self._token

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
