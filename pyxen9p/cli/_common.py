"""What every command of the ``pyxen9p`` command line shares: the per-run context
(connecting once), exit statuses, errors and their one-line messages, quoting of
names that come from a server, the XenStore survey of 9pfs devices, argument types.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import errno
import logging
import os
import string
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

import pyxen9p
from pyxen9p._progress import ProgressBar, terminal_enabled
from pyxen9p.errors import Pyxen9pError

if TYPE_CHECKING:
    from pyxen9p.interfaces import XenStoreLike
    from pyxen9p.p9.client import Client


log = logging.getLogger("pyxen9p.cli")

#: Exit status: success.
EXIT_OK = 0

#: Exit status: an operation failed (a missing file, a refused connection...).
EXIT_FAILURE = 1

#: Exit status: the command line was wrong.
EXIT_USAGE = 2

#: Exit status: interrupted by Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 130

#: Exit status: standard output was closed early (128 + SIGPIPE).
EXIT_BROKEN_PIPE = 141

PROG = "pyxen9p"


_XEN_PATHS = (
    ("/dev/xen", "Xen device directory"),
    ("/dev/xen/gntalloc", "sharing pages (needed)"),
    ("/dev/xen/evtchn", "event channels (needed)"),
    ("/dev/xen/xenbus", "XenStore in a guest"),
    ("/dev/xen/gntdev", "mapping grants (backends)"),
    ("/dev/xen/privcmd", "hypercalls (dom0 tools)"),
    ("/proc/xen", "xenfs"),
)


class CommandError(Pyxen9pError):
    """A failure reported as one line, ``pyxen9p: COMMAND: message``; exit status 1."""


class UsageError(CommandError):
    """A command line that parses but makes no sense; exit status 2."""


#: Characters a name may hold and still be shown without quotes (as GNU ls
#: does: letters, digits, ``%+,-./:@_``, ``#`` and ``~`` after the first
#: character, and every printable non-ASCII character).
_SAFE = frozenset(string.ascii_letters + string.digits + "%+,-./:@_")

_NAMED_ESCAPES = {"\a": "a", "\b": "b", "\t": "t", "\n": "n", "\v": "v", "\f": "f", "\r": "r"}


def _printable(ch: str) -> bool:
    """Whether *ch* shows as itself on a terminal.

    Control characters (C0, DEL, C1), format characters (such as the
    right-to-left override), separators other than the space, and the lone
    surrogates that stand for the bytes of a name that is not UTF-8 do not.
    """
    return ch.isprintable()


def _escapes(ch: str) -> str:
    """Backslash escapes for the non-printable *ch*: ``\\n``, or octal bytes ``\\033``."""
    named = _NAMED_ESCAPES.get(ch)
    if named is not None:
        return "\\" + named
    return "".join(f"\\{byte:03o}" for byte in _raw(ch))


def quote_name(name: str) -> str:
    """*name* as GNU ``ls`` shows it on a terminal (its ``shell-escape`` quoting style).

    A name made of safe characters is shown as it is; any other is a shell
    word that stands for the exact name: printable runs in single quotes
    (double quotes for one holding ``'`` and nothing special inside them),
    and the other characters as ``$'\\n'``, ``$'\\033'``... (the bytes of a
    name that is not UTF-8 as octal escapes).  ``'a'$'\\n''b'`` is the name
    ``a``, newline, ``b``.
    """
    if name and all(
        ch in _SAFE or (ch in "#~" and i) or (ord(ch) > 127 and _printable(ch))
        for i, ch in enumerate(name)
    ):
        return name
    if not name:
        return "''"
    parts: list[str] = []
    run: list[str] = []
    printable_run = _printable(name[0])
    for ch in [*name, ""]:
        if ch and _printable(ch) == printable_run:
            run.append(ch)
            continue
        text = "".join(run)
        if not printable_run:
            parts.append("$'" + "".join(_escapes(x) for x in text) + "'")
        elif "'" not in text:
            parts.append(f"'{text}'")
        elif not any(x in text for x in '"$`\\!'):
            parts.append(f'"{text}"')
        else:
            parts.append("'" + text.replace("'", "'\\''") + "'")
        run = [ch]
        printable_run = not printable_run
    return "".join(parts)


def escape_controls(text: str, *, keep_newlines: bool = False) -> str:
    """*text* with every non-printable character written as a backslash escape.

    For free text that may carry a peer's strings (an error message, a log
    line): ``\\n``, ``\\r``, ``\\t``, octal bytes for the others (``\\033``
    for ESC, ``\\377`` for a byte of a name that is not UTF-8).

    :param keep_newlines: leave ``\\n`` as it is (multi-line text such as a
        traceback)
    """
    if text.isprintable():
        return text
    return "".join(
        ch if _printable(ch) or (keep_newlines and ch == "\n") else _escapes(ch) for ch in text
    )


def _raw(name: str) -> bytes:
    """The exact bytes of a name the codec decoded (UTF-8, ``surrogateescape``)."""
    try:
        return name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no byte stands for (never from the codec)
        return name.encode("utf-8", "surrogatepass")


def _json_name(record: dict[str, Any], key: str, name: str) -> None:
    """Put *name* under *key*; a name that is not UTF-8 also gets ``KEY_base64``.

    JSON strings are Unicode: such a name is shown with U+FFFD in place of
    each byte that is not UTF-8, and its exact bytes are in ``KEY_base64``.
    """
    raw = _raw(name)
    try:
        record[key] = raw.decode("utf-8")
    except UnicodeDecodeError:
        record[key] = raw.decode("utf-8", "replace")
        record[f"{key}_base64"] = base64.b64encode(raw).decode("ascii")


def _describe(exc: BaseException) -> str:
    """One line for *exc*: ``path: reason`` for an :class:`OSError` with a file name."""
    from pyxen9p.p9.codec import ProtocolError

    if isinstance(exc, OSError):
        if exc.strerror:
            text = str(exc.strerror)
        elif len(exc.args) == 1:
            text = str(exc.args[0])
        else:
            text = str(exc) or os.strerror(exc.errno or errno.EIO)
        if isinstance(exc, ProtocolError):
            text = f"9P protocol error: {text}"
        if exc.filename is not None:
            name = quote_name(_fsdecode(exc.filename) or "/")
            if exc.filename2 is not None:
                name = f"{name} -> {quote_name(_fsdecode(exc.filename2))}"
            text = f"{name}: {text}"
        return text
    return str(exc) or type(exc).__name__


def _fsdecode(name: object) -> str:
    return os.fsdecode(name) if isinstance(name, (str, bytes, os.PathLike)) else str(name)


def _no_xen_hint(exc: BaseException) -> str:
    """A hint when *exc* says that XenStore or the Xen libraries are missing."""
    from pyxen9p.errors import LibraryNotFoundError

    function = getattr(exc, "function", None)
    if isinstance(exc, LibraryNotFoundError) or function == "xs_open":
        return (
            " (is this a Xen domain? 'pyxen9p info' shows what this machine has;"
            " --simulate DIR runs without Xen)"
        )
    if function in ("xengntshr_open", "xenevtchn_open") and isinstance(exc, OSError):
        device = "/dev/xen/gntalloc" if function == "xengntshr_open" else "/dev/xen/evtchn"
        if exc.errno in (errno.ENOENT, errno.ENODEV):
            return f" ({device} is missing: is the Xen kernel module loaded?)"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return f" (no access to {device}: run as root or grant access)"
    return ""


@dataclasses.dataclass(frozen=True)
class DeviceSummary:
    """What XenStore says about one 9pfs device of a domain.

    :ivar devid: the device id (the name under ``device/9pfs``)
    :ivar path: the frontend's XenStore directory
    :ivar tag: the mount tag, if the toolstack wrote one
    :ivar state: the frontend's XenBus state name (``None``: no ``state`` node)
    :ivar backend: the backend's XenStore directory
    :ivar backend_id: the backend's domain id, as written
    :ivar backend_state: the backend's XenBus state name
    """

    devid: str
    path: str
    tag: str | None
    state: str | None
    backend: str | None
    backend_id: str | None
    backend_state: str | None

    def describe(self) -> str:
        """A short description: ``0 (tag 'share', Connected)``."""
        tag = f"tag {self.tag!r}" if self.tag is not None else "no tag"
        return f"{self.devid} ({tag}, {self.state or 'no state'})"


def _read_text(store: XenStoreLike, path: str) -> str | None:
    try:
        return store.read(path).decode("utf-8", "replace")
    except FileNotFoundError:
        return None


def _state_name(store: XenStoreLike, path: str | None) -> str | None:
    from pyxen9p.xenbus import read_state

    if path is None:
        return None
    try:
        state = read_state(store, path)
    except (OSError, ValueError) as exc:
        return f"invalid ({_describe(exc)})"
    if state is None:
        return None
    return state.name.replace("_", "").title().replace("Initwait", "InitWait")


def list_devices(store: XenStoreLike) -> tuple[str, list[DeviceSummary]]:
    """The 9pfs devices of the domain that *store* belongs to.

    :param store: an open XenStore connection (real or simulated)
    :returns: ``(directory, devices)``: the domain's ``device/9pfs``
        directory and its devices, in device-id order
    :raises OSError: the store cannot be read
    """
    from pyxen9p.xenbus import parse_uint

    domid = parse_uint(store.read("domid"), "domid")
    base = f"{store.get_domain_path(domid)}/device/9pfs"
    try:
        names = store.directory(base)
    except FileNotFoundError:
        names = []
    names.sort(key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))
    devices = []
    for name in names:
        path = f"{base}/{name}"
        backend = _read_text(store, f"{path}/backend")
        devices.append(
            DeviceSummary(
                devid=name,
                path=path,
                tag=_read_text(store, f"{path}/tag"),
                state=_state_name(store, f"{path}/state"),
                backend=backend,
                backend_id=_read_text(store, f"{path}/backend-id"),
                backend_state=_state_name(store, f"{backend}/state") if backend else None,
            )
        )
    return base, devices


def _selection(args: argparse.Namespace) -> dict[str, Any]:
    """The ``tag=`` / ``devid=`` / ``path=`` the user gave (at most one)."""
    for key in ("tag", "devid", "path"):
        value = getattr(args, key)
        if value is not None:
            return {key: value}
    return {}


def _only_device() -> dict[str, Any]:
    """Find the one 9pfs device of this domain on the real Xen.

    :raises CommandError: none, or several
    """
    from pyxen9p.libs import RealXen

    try:
        with RealXen().open_xenstore() as store:
            base, devices = list_devices(store)
    except OSError as exc:
        raise CommandError(
            f"cannot read XenStore: {_describe(exc)}{_no_xen_hint(exc)}"
        ) from exc
    if not devices:
        raise CommandError(f"this domain has no 9pfs device (nothing under {base})")
    if len(devices) > 1:
        listing = "; ".join(d.describe() for d in devices)
        raise CommandError(
            f"this domain has {len(devices)} 9pfs devices: {listing};"
            " choose one with --tag, --devid or --path"
        )
    only = devices[0]
    return {"devid": int(only.devid)} if only.devid.isdigit() else {"path": only.path}


def _only_agent(mode: str) -> dict[str, Any]:
    """Without a selector: the device of the only running agent (of a Xen device), if any."""
    from pyxen9p.agent import list_agents

    if mode == "never":
        return {}
    live = [a for a in list_agents() if a.answers and a.locked and "simulate" not in a.device]
    if len(live) != 1:
        return {}
    device = live[0].device
    for key in ("devid", "tag", "path"):
        value = device.get(key)
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            return {key: value}
    return {}


class _Context:
    """The parsed arguments, the output streams and the (lazy) connection."""

    def __init__(self, args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> None:
        self.args = args
        self.command: str = args.command
        self.stdout = stdout
        self.stderr = stderr
        self.status = EXIT_OK
        self._client: Client | None = None
        try:
            #: standard output is a terminal: names are quoted, control characters escaped
            self.tty = bool(stdout.isatty())
        except (ValueError, AttributeError):
            self.tty = False

    @property
    def quiet(self) -> bool:
        return bool(self.args.quiet)

    @property
    def verbose(self) -> int:
        return int(self.args.verbose or 0)

    def connect_options(self) -> dict[str, Any]:
        return {
            "rings": self.args.rings,
            "ring_order": self.args.ring_order,
            "timeout": self.args.timeout,
            "allow_reconnect": self.args.allow_reconnect,
            "version": self.args.version_9p,
        }

    def client(self) -> Client:
        """Connect on first use, as the global options say."""
        if self._client is not None:
            return self._client
        args = self.args
        options = self.connect_options()
        try:
            if args.server is not None:
                client = pyxen9p.connect(server=args.server, **options)
            elif args.simulate is not None:
                client = pyxen9p.connect(
                    simulate=args.simulate, readonly=args.readonly, agent=args.agent,
                    **_selection(args), **options
                )
            else:
                selection = _selection(args) or _only_agent(args.agent) or _only_device()
                client = pyxen9p.connect(**selection, agent=args.agent, **options)
        except CommandError:
            raise
        except (OSError, ValueError) as exc:
            where = f" {args.simulate!r} (simulated)" if args.simulate is not None else ""
            where = f" at {args.server}" if args.server is not None else where
            raise CommandError(
                f"cannot connect to the 9pfs share{where}: {_describe(exc)}{_no_xen_hint(exc)}"
            ) from exc
        client.timeout = args.timeout
        log.info("connected: %s", client)
        self._client = client
        return client

    def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            client.close()

    def report(self, exc: BaseException) -> None:
        """Print *exc* as one error line; the exit status becomes 1."""
        self.status = EXIT_FAILURE
        self.error(_describe(exc))
        if self.verbose:
            self.traceback(exc)

    def traceback(self, exc: BaseException) -> None:
        """Print *exc*'s traceback, control characters escaped."""
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.stderr.write(escape_controls(text, keep_newlines=True))
        self.stderr.flush()

    def error(self, message: str) -> None:
        """Print ``pyxen9p: COMMAND: message`` on standard error.

        Whatever the message carries (a name, a server's error string), its
        control characters are escaped (:func:`escape_controls`): an error
        line is one line and never drives the terminal.
        """
        self.stderr.write(f"{PROG}: {self.command}: {escape_controls(message)}\n")
        self.stderr.flush()

    def progress(self, label: str) -> ProgressBar:
        return ProgressBar(
            label, stream=self.stderr, enabled=terminal_enabled(self.stderr, quiet=self.quiet)
        )

    def name(self, name: str) -> str:
        """*name* for standard output: quoted (:func:`quote_name`) on a terminal, else as is."""
        return quote_name(name) if self.tty else name

    def print(self, text: str = "") -> None:
        """Print a line on standard output.

        On a terminal, control characters are escaped (:func:`escape_controls`;
        names should already be quoted with :meth:`name`).  Elsewhere the
        text is written as it is, as GNU ``ls`` writes names to a pipe: the
        bytes of a name that is not UTF-8 are written as they are.
        """
        if self.tty:
            text = escape_controls(text)
        line = text + "\n"
        try:
            self.stdout.write(line)
        except UnicodeEncodeError:
            self.binary_stdout().write(line.encode("utf-8", "surrogateescape"))

    def binary_stdout(self) -> BinaryIO:
        self.stdout.flush()
        buffer = getattr(self.stdout, "buffer", None)
        if buffer is None:
            raise CommandError("standard output takes no bytes")
        return buffer  # type: ignore[no-any-return]


def _each(ctx: _Context, paths: Sequence[str], action: Callable[[str], None]) -> None:
    """Run *action* on each path; report each failure and go on."""
    for path in paths:
        try:
            action(path)
        except (OSError, ValueError) as exc:
            if isinstance(exc, BrokenPipeError) and exc.filename is None:
                raise
            ctx.report(exc)


def _positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _devid(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a device number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a device number: {text!r}")
    return value


def _ring_order(text: str) -> int:
    from pyxen9p.ring import MAX_RING_ORDER, MIN_RING_ORDER

    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not MIN_RING_ORDER <= value <= MAX_RING_ORDER:
        raise argparse.ArgumentTypeError(
            f"must be within {MIN_RING_ORDER}..{MAX_RING_ORDER}: {text!r}"
        )
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _octal_mode(text: str) -> int:
    if not text or len(text) > 4 or any(ch not in "01234567" for ch in text):
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}")
    return int(text, 8)


@dataclasses.dataclass(frozen=True)
class _Command:
    name: str
    func: Callable[[_Context], None]
    summary: str
    description: str
    examples: str
    arguments: Callable[[argparse.ArgumentParser], None]


def _args_paths(help_text: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("paths", nargs="+", metavar="PATH", help=help_text)

    return add
