"""Terminal progress bars for the command line (standard library only).

:class:`ProgressBar` is a ``progress(done, total)`` callback, as
:meth:`~pyxen9p.p9.client.Client.copy_in` and
:meth:`~pyxen9p.p9.client.Client.copy_out` take, that redraws one line of a
terminal at most :attr:`ProgressBar.interval` seconds apart::

    with ProgressBar("get big.iso", enabled=sys.stderr.isatty()) as bar:
        fs.copy_out("big.iso", "big.iso", progress=bar)

A disabled bar (the stream is not a terminal, or ``-q`` was given) draws
nothing at all.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from typing_extensions import Self

__all__ = ["ProgressBar", "format_duration", "format_size", "terminal_enabled"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_size(n: float) -> str:
    """*n* bytes in binary units: ``"512 B"``, ``"1.5 MiB"``, ``"12.0 GiB"``."""
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """*seconds* as ``"m:ss"`` (or ``"h:mm:ss"``)."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def terminal_enabled(stream: TextIO, *, quiet: bool = False) -> bool:
    """Whether a progress bar should be drawn on *stream*.

    :returns: ``True`` when *stream* is a terminal, *quiet* is false and
        ``TERM`` is not ``dumb``
    """
    if quiet or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


class ProgressBar:
    """A one-line progress bar, usable as a ``progress(done, total)`` callback.

    The line shows the label, a bar, the percentage, the bytes done and the
    total, the rate and the time left, fitted to the terminal's width.  It is
    redrawn at most every *interval* seconds (and always at the end);
    :meth:`close` draws the final state and ends the line.

    :param label: what is being copied (cut to fit)
    :param stream: where to draw (default: :data:`sys.stderr`)
    :param enabled: draw at all (default: :func:`terminal_enabled` of *stream*)
    :param interval: least time between two redraws, in seconds
    """

    def __init__(
        self,
        label: str,
        *,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        interval: float = 0.1,
    ) -> None:
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self.enabled = terminal_enabled(self.stream) if enabled is None else enabled
        self.interval = interval
        #: bytes done, as last reported
        self.done = 0
        #: bytes expected, as last reported
        self.total = 0
        self._start = time.monotonic()
        self._last_draw: float | None = None
        self._closed = False

    def __call__(self, done: int, total: int) -> None:
        """Record progress: *done* of *total* bytes; redraw if it is time to."""
        self.done, self.total = done, total
        if not self.enabled or self._closed:
            return
        now = time.monotonic()
        if self._last_draw is None or now - self._last_draw >= self.interval or done >= total:
            self._draw(now)

    def _width(self) -> int:
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
        return 79 if columns <= 0 else max(20, columns - 1)

    def render(self, width: int, now: float | None = None) -> str:
        """The bar's text for a line of *width* characters.

        :param now: the :func:`time.monotonic` time to compute the rate at
        """
        elapsed = max((time.monotonic() if now is None else now) - self._start, 1e-9)
        total = max(self.total, self.done)
        fraction = 1.0 if total == 0 else self.done / total
        rate = self.done / elapsed
        parts = [f"{fraction * 100:3.0f}%", f"{format_size(self.done)}/{format_size(total)}",
                 f"{format_size(rate)}/s"]
        if self.done < total and rate > 0:
            parts.append(f"ETA {format_duration((total - self.done) / rate)}")
        elif self.done >= total:
            parts.append(f"in {format_duration(elapsed)}")
        stats = " " + " ".join(parts)
        while len(parts) > 2 and len(stats) > width - 8:  # keep room for the label
            parts.pop()
            stats = " " + " ".join(parts)
        room = width - len(stats)
        label = self.label
        label_width = min(len(label), max(room - 15, room // 2))
        bar_width = min(30, room - label_width - 3)
        if bar_width < 5:  # no room for a bar: the label alone
            bar_width = 0
            label_width = min(len(label), room - 1)
        if label_width < 4:  # a very narrow terminal: numbers only
            return stats.strip()[:width]
        if len(label) > label_width:
            label = "..." + label[-(label_width - 3) :]
        text = label
        if bar_width:
            filled = round(fraction * bar_width)
            text += " [" + "#" * filled + "-" * (bar_width - filled) + "]"
        else:
            text += " "
        return (text + stats)[:width]

    def _draw(self, now: float) -> None:
        self._last_draw = now
        try:
            self.stream.write("\r" + self.render(self._width(), now) + "\x1b[K")
            self.stream.flush()
        except (OSError, ValueError):
            self.enabled = False

    def close(self) -> None:
        """Draw the final state and end the line (idempotent; nothing if disabled).

        The final line is drawn even if nothing was reported (an empty file).
        """
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        self._draw(time.monotonic())
        try:
            self.stream.write("\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
