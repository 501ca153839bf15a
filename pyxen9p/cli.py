"""The ``pyxen9p`` command line: files on a Xen 9pfs share, from the shell.

::

    pyxen9p demo                               # the whole stack, no Xen needed
    pyxen9p info                               # what this machine has
    pyxen9p --tag share ls -l /                # on a Xen guest
    pyxen9p --simulate /srv/data get -r docs   # anywhere: a simulated Xen

:func:`main` parses the arguments, connects (once, and only for the commands
that need a share) and runs one command.  Errors are reported on one line of
standard error (``pyxen9p: cat: /x: No such file or directory``); the exit
status is 0 on success, 1 when an operation failed, 2 for a usage error, 130
after Ctrl-C and 141 when standard output was closed early (a broken pipe).
``-v`` adds logging and tracebacks.  The commands are described in the
documentation's command-line page and by ``pyxen9p COMMAND --help``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import platform
import posixpath
import random
import shutil
import stat as stat_module
import string
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple, TextIO

import pyxen9p
from pyxen9p._progress import ProgressBar, format_duration, format_size, terminal_enabled
from pyxen9p._version import __version__
from pyxen9p.errors import Pyxen9pError

if TYPE_CHECKING:
    from pyxen9p.frontend import Frontend
    from pyxen9p.interfaces import XenStoreLike
    from pyxen9p.p9.client import Client

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CommandError",
    "DeviceSummary",
    "UsageError",
    "apply_mode",
    "build_parser",
    "escape_controls",
    "list_devices",
    "main",
    "quote_name",
]

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


# --------------------------------------------------------------------------
# Quoting names and server strings (they come from a peer that is not trusted)

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


# --------------------------------------------------------------------------
# Messages


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


# --------------------------------------------------------------------------
# XenStore survey


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


# --------------------------------------------------------------------------
# The per-run context


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
        }

    def client(self) -> Client:
        """Connect on first use, as the global options say."""
        if self._client is not None:
            return self._client
        args = self.args
        options = self.connect_options()
        try:
            if args.simulate is not None:
                client = pyxen9p.connect(
                    simulate=args.simulate, readonly=args.readonly, **_selection(args), **options
                )
            else:
                selection = _selection(args) or _only_device()
                client = pyxen9p.connect(**selection, **options)
        except CommandError:
            raise
        except (OSError, ValueError) as exc:
            where = f" {args.simulate!r} (simulated)" if args.simulate is not None else ""
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


# --------------------------------------------------------------------------
# Formatting


def _local_time(ns: int, fmt: str, fraction: bool = False) -> str:
    """*ns* (nanoseconds since 1970, signed) as local time in *fmt*.

    A time this system cannot represent as a date (a server may send any
    64-bit count of seconds) is shown as its count of seconds, as GNU ``ls``
    and ``stat`` do.
    """
    seconds, rest = divmod(ns, 1_000_000_000)
    try:
        local = time.localtime(seconds)
        text = time.strftime(fmt, local)
    except (OverflowError, OSError, ValueError):
        return f"{seconds}.{rest:09d}" if fraction else str(seconds)
    if fraction:
        text += f".{rest:09d}" + time.strftime(" %z", local)
    return text


def _mtime(st: os.stat_result) -> str:
    return _local_time(st.st_mtime_ns, "%Y-%m-%d %H:%M")


def _size_field(st: os.stat_result) -> str:
    if stat_module.S_ISCHR(st.st_mode) or stat_module.S_ISBLK(st.st_mode):
        return f"{os.major(st.st_rdev)}, {os.minor(st.st_rdev)}"
    return str(st.st_size)


def _long_lines(rows: Sequence[tuple[str, os.stat_result, str | None]]) -> list[str]:
    """``ls -l`` lines for ``(name, lstat, link target)`` rows, columns aligned."""
    cells = [
        (
            stat_module.filemode(st.st_mode),
            str(st.st_nlink),
            str(st.st_uid),
            str(st.st_gid),
            _size_field(st),
            _mtime(st),
            name if target is None else f"{name} -> {target}",
        )
        for name, st, target in rows
    ]
    widths = [max((len(c[i]) for c in cells), default=0) for i in range(5)]
    return [
        f"{c[0]} {c[1]:>{widths[1]}} {c[2]:>{widths[2]}} {c[3]:>{widths[3]}}"
        f" {c[4]:>{widths[4]}} {c[5]} {c[6]}"
        for c in cells
    ]


def _file_type(mode: int, size: int) -> str:
    if stat_module.S_ISREG(mode):
        return "regular empty file" if size == 0 else "regular file"
    for test, name in (
        (stat_module.S_ISDIR, "directory"),
        (stat_module.S_ISLNK, "symbolic link"),
        (stat_module.S_ISFIFO, "fifo"),
        (stat_module.S_ISSOCK, "socket"),
        (stat_module.S_ISCHR, "character special file"),
        (stat_module.S_ISBLK, "block special file"),
    ):
        if test(mode):
            return name
    return "unknown"


def _stat_time(ns: int) -> str:
    return _local_time(ns, "%Y-%m-%d %H:%M:%S", fraction=True)


def _join(directory: str, name: str) -> str:
    return posixpath.join(directory, name) if directory else name


def _names(path: str) -> list[str]:
    """The names of the remote *path*, with ``.`` and ``..`` resolved as the client does."""
    names: list[str] = []
    for name in path.split("/"):
        if name in ("", "."):
            continue
        if name == "..":
            if names:
                names.pop()
            continue
        names.append(name)
    return names


def _basename(path: str) -> str:
    """The last name of the remote *path* (``""`` for the root)."""
    names = _names(path)
    return names[-1] if names else ""


def _is_root(path: str) -> bool:
    """Whether the remote *path* names the share's root (``/``, ``//``, ``a/..``...)."""
    return not _names(path)


# --------------------------------------------------------------------------
# Commands on a share


class _Row(NamedTuple):
    """One line of ``ls``: the name shown, its path, and what ``-l`` / ``--json`` need."""

    name: str
    path: str
    st: os.stat_result | None
    target: str | None
    d_type: int | None = None


def cmd_ls(ctx: _Context) -> None:
    """``ls``: list directories (or name files)."""
    args = ctx.args
    if args.null and args.long:
        raise UsageError("-0 prints paths only: it does not combine with -l (try --json -l)")
    fs = ctx.client()
    paths = args.paths or ["/"]
    files: list[_Row] = []
    dirs: list[str] = []
    for path in paths:
        try:
            st = fs.lstat(path)
            is_dir = stat_module.S_ISDIR(st.st_mode)
            if stat_module.S_ISLNK(st.st_mode) and (not args.long or path.endswith("/")):
                is_dir = fs.is_dir(path)  # a link to a directory lists the directory
            if is_dir:
                dirs.append(path)
            else:
                target = fs.readlink(path) if stat_module.S_ISLNK(st.st_mode) else None
                files.append(_Row(path, path, st, target))
        except (OSError, ValueError) as exc:
            ctx.report(exc)
    _print_entries(ctx, files)
    machine = args.json or args.null  # one record per entry: no headers, no blank lines
    headers = not machine and (bool(files) or len(paths) > 1 or args.recursive)
    first = not files
    queue = list(dirs)
    while queue:
        directory = queue.pop(0)
        if not first and not machine:
            ctx.print()
        first = False
        if headers:
            ctx.print(f"{ctx.name(directory)}:")
        try:
            entries = sorted(fs.scandir(directory), key=lambda e: e.name)
        except (OSError, ValueError) as exc:
            ctx.report(exc)
            continue
        rows: list[_Row] = []
        subdirs: list[str] = []
        for entry in entries:
            if entry.name.startswith(".") and not args.all:
                continue
            path = _join(directory, entry.name)
            try:
                if args.long:
                    st = entry.stat(follow_symlinks=False)
                    target = fs.readlink(entry.path) if entry.is_symlink() else None
                    rows.append(_Row(entry.name, path, st, target, entry.d_type))
                else:
                    rows.append(_Row(entry.name, path, None, None, entry.d_type))
                if args.recursive and entry.is_dir(follow_symlinks=False):
                    subdirs.append(path)
            except (OSError, ValueError) as exc:
                ctx.report(exc)
        _print_entries(ctx, rows)
        queue[0:0] = subdirs  # depth first, in name order, as ls -R does


def _ls_record(row: _Row) -> dict[str, Any]:
    """The ``ls --json`` object of *row*."""
    from pyxen9p.p9 import codec

    if row.st is not None:
        record = _stat_record(row.path, row.st, row.target)
    else:
        kinds = {
            codec.DT_DIR: "directory", codec.DT_REG: "regular file",
            codec.DT_LNK: "symbolic link", codec.DT_FIFO: "fifo", codec.DT_SOCK: "socket",
            codec.DT_CHR: "character special file", codec.DT_BLK: "block special file",
        }  # fmt: skip
        record = {"type": kinds.get(row.d_type if row.d_type is not None else -1, "unknown")}
        _json_name(record, "path", row.path)
    _json_name(record, "name", row.name)
    return record


def _print_entries(ctx: _Context, rows: list[_Row]) -> None:
    args = ctx.args
    if args.null:
        out = ctx.binary_stdout()
        for row in rows:
            out.write(_raw(row.path) + b"\0")
    elif args.json:
        for row in rows:
            ctx.print(json.dumps(_ls_record(row), sort_keys=True))
    elif args.long:
        long_rows = [
            (ctx.name(r.name), r.st, None if r.target is None else ctx.name(r.target))
            for r in rows
            if r.st is not None
        ]
        for line in _long_lines(long_rows):
            ctx.print(line)
    else:
        for row in rows:
            ctx.print(ctx.name(row.name))


def cmd_cat(ctx: _Context) -> None:
    """``cat``: copy files to standard output."""
    fs = ctx.client()
    out = ctx.binary_stdout()

    def cat(path: str) -> None:
        with fs.open(path, "rb", buffering=0) as f:
            buf = bytearray(max(f.iounit * fs.window, 64 * 1024))
            view = memoryview(buf)
            while True:
                n = f.readinto(view)
                if not n:
                    break
                out.write(view[:n])
        out.flush()

    _each(ctx, ctx.args.paths, cat)


def cmd_get(ctx: _Context) -> None:
    """``get``: copy a remote file (or tree, with ``-r``) to the local disk."""
    fs = ctx.client()
    args = ctx.args
    remote: str = args.remote
    try:
        st = fs.stat(remote)
        if stat_module.S_ISDIR(st.st_mode) and not args.recursive:
            raise OSError(errno.EISDIR, "Is a directory (use -r to copy a tree)", remote)
        name = _basename(remote)
        local: str = args.local if args.local is not None else "."
        if os.path.isdir(local):
            if not name:
                raise UsageError("give a LOCAL name for the share's root directory")
            local = os.path.join(local, name)
        with ctx.progress(f"get {remote}") as bar:
            done = fs.copy_out(
                remote, local, progress=bar, preserve=not args.no_preserve,
                no_clobber=args.no_clobber,
            )
        log.info("get: %d bytes from %s to %s", done, remote, local)
    except (OSError, ValueError) as exc:
        _report_copy(ctx, exc)


def cmd_put(ctx: _Context) -> None:
    """``put``: copy a local file (or tree, with ``-r``) to the share."""
    fs = ctx.client()
    args = ctx.args
    local: str = args.local
    try:
        st = os.stat(local)
        if stat_module.S_ISDIR(st.st_mode) and not args.recursive:
            raise OSError(errno.EISDIR, "Is a directory (use -r to copy a tree)", local)
        name = os.path.basename(os.path.abspath(local))
        remote: str = args.remote if args.remote is not None else "/"
        if fs.is_dir(remote):
            remote = _join(remote, name)
        with ctx.progress(f"put {local}") as bar:
            done = fs.copy_in(
                local, remote, progress=bar, preserve=not args.no_preserve,
                no_clobber=args.no_clobber,
            )
        log.info("put: %d bytes from %s to %s", done, local, remote)
    except (OSError, ValueError) as exc:
        _report_copy(ctx, exc)


def _report_copy(ctx: _Context, exc: OSError | ValueError) -> None:
    """Report a failed copy: each entry a tree copy could not copy, on its own line."""
    from pyxen9p.p9.client import CopyError

    for error in exc.errors if isinstance(exc, CopyError) else [exc]:
        ctx.report(error)


def _stat_record(path: str, st: os.stat_result, target: str | None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "type": _file_type(st.st_mode, st.st_size),
        "mode": st.st_mode,
        "permissions": f"{stat_module.S_IMODE(st.st_mode):04o}",
        "filemode": stat_module.filemode(st.st_mode),
        "inode": st.st_ino,
        "links": st.st_nlink,
        "uid": st.st_uid,
        "gid": st.st_gid,
        "size": st.st_size,
        "blocks": st.st_blocks,
        "blksize": st.st_blksize,
        "rdev": st.st_rdev,
        "atime": st.st_atime,
        "mtime": st.st_mtime,
        "ctime": st.st_ctime,
        "atime_ns": st.st_atime_ns,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }
    _json_name(record, "path", path)
    if target is not None:
        _json_name(record, "target", target)
    return record


def cmd_stat(ctx: _Context) -> None:
    """``stat``: show the attributes of files, like stat(1)."""
    fs = ctx.client()
    args = ctx.args

    def show(path: str) -> None:
        st = fs.stat(path, follow_symlinks=args.dereference)
        target = fs.readlink(path) if stat_module.S_ISLNK(st.st_mode) else None
        if args.json:
            ctx.print(json.dumps(_stat_record(path, st, target), sort_keys=True))
            return
        name = ctx.name(path) if target is None else f"{ctx.name(path)} -> {ctx.name(target)}"
        kind = _file_type(st.st_mode, st.st_size)
        ctx.print(f"  File: {name}")
        ctx.print(
            f"  Size: {st.st_size:<15} Blocks: {st.st_blocks:<10}"
            f" IO Block: {st.st_blksize:<6} {kind}"
        )
        line = f" Inode: {st.st_ino:<15} Links: {st.st_nlink}"
        if stat_module.S_ISCHR(st.st_mode) or stat_module.S_ISBLK(st.st_mode):
            line += f"    Device type: {os.major(st.st_rdev)},{os.minor(st.st_rdev)}"
        ctx.print(line)
        ctx.print(
            f"Access: ({stat_module.S_IMODE(st.st_mode):04o}/{stat_module.filemode(st.st_mode)})"
            f"  Uid: ({st.st_uid:>5})   Gid: ({st.st_gid:>5})"
        )
        ctx.print(f"Access: {_stat_time(st.st_atime_ns)}")
        ctx.print(f"Modify: {_stat_time(st.st_mtime_ns)}")
        ctx.print(f"Change: {_stat_time(st.st_ctime_ns)}")

    _each(ctx, ctx.args.paths, show)


def cmd_mkdir(ctx: _Context) -> None:
    """``mkdir``: create directories."""
    fs = ctx.client()
    args = ctx.args
    mode = 0o777 if args.mode is None else args.mode

    def make(path: str) -> None:
        if args.parents:
            fs.makedirs(path, mode, exist_ok=True)
        else:
            fs.mkdir(path, mode)
        if args.mode is not None:
            fs.chmod(path, args.mode)  # exactly MODE, as mkdir -m: the umask does not apply

    _each(ctx, args.paths, make)


def _rmtree(fs: Client, top: str) -> None:
    """Remove the directory *top* and everything below it (links are not followed)."""
    stack = [(top, False)]
    while stack:
        path, emptied = stack.pop()
        if emptied:
            fs.rmdir(path)
            continue
        stack.append((path, True))
        for entry in fs.scandir(path):
            if entry.is_dir(follow_symlinks=False):
                stack.append((entry.path, False))
            else:
                fs.remove(entry.path)


def cmd_rm(ctx: _Context) -> None:
    """``rm``: remove files (and trees, with ``-r``)."""
    fs = ctx.client()
    args = ctx.args

    def remove(path: str) -> None:
        if _is_root(path):
            raise OSError(errno.EBUSY, "refusing to remove the share's root directory", path)
        try:
            st = fs.lstat(path)
        except FileNotFoundError:
            if args.force:
                return
            raise
        if stat_module.S_ISDIR(st.st_mode):
            if not args.recursive:
                raise OSError(errno.EISDIR, "Is a directory (use -r to remove a tree)", path)
            _rmtree(fs, path)
        else:
            fs.remove(path)

    _each(ctx, args.paths, remove)


def cmd_rmdir(ctx: _Context) -> None:
    """``rmdir``: remove empty directories."""
    fs = ctx.client()
    _each(ctx, ctx.args.paths, fs.rmdir)


def cmd_mv(ctx: _Context) -> None:
    """``mv``: rename (or move into a directory)."""
    fs = ctx.client()
    args = ctx.args
    src: str = args.source
    dst: str = args.dest
    try:
        into = fs.is_dir(dst)
        if into and not args.no_target_directory:
            dst = _join(dst, _basename(src))
        elif dst.endswith("/") and not into and not stat_module.S_ISDIR(fs.lstat(src).st_mode):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), dst)  # as rename(2)
        fs.rename(src, dst)
    except (OSError, ValueError) as exc:
        ctx.report(exc)


def cmd_ln(ctx: _Context) -> None:
    """``ln``: make a symbolic (``-s``) or hard link."""
    fs = ctx.client()
    args = ctx.args
    target: str = args.target
    link: str = args.link
    try:
        if fs.is_dir(link):
            link = _join(link, _basename(target))
        if args.symbolic:
            fs.symlink(target, link)
        else:
            fs.link(target, link)
    except (OSError, ValueError) as exc:
        ctx.report(exc)


_WHO = {"u": 0o4700, "g": 0o2070, "o": 0o1007, "a": 0o7777}
_PERM = {"r": 0o444, "w": 0o222, "x": 0o111, "s": 0o6000, "t": 0o1000}
_SHIFT = {"u": 6, "g": 3, "o": 0}


def apply_mode(spec: str, mode: int, *, is_dir: bool = False) -> int:
    """The permission bits that chmod's *spec* gives a file whose mode is *mode*.

    *spec* is octal (``755``, ``0644``, ``4755``) or symbolic, as chmod(1):
    comma-separated clauses ``[ugoa]*([-+=]([rwxXst]*|[ugo]))+`` such as
    ``u+x``, ``go-w``, ``a=r,u+w`` or ``g=u``.  Without ``u``, ``g``, ``o``
    or ``a`` a clause applies to all (the umask is not consulted).

    :param mode: the current mode (``st_mode``; only the permission bits count)
    :param is_dir: whether the file is a directory (for ``X``)
    :returns: the new permission bits (``0..0o7777``)
    :raises ValueError: *spec* is not a valid mode
    """
    if spec and all(ch in "01234567" for ch in spec):
        if len(spec) > 4:
            raise ValueError(f"invalid mode: {spec!r}")
        return int(spec, 8)
    result = stat_module.S_IMODE(mode)
    if not spec:
        raise ValueError("invalid mode: ''")
    for clause in spec.split(","):
        i = 0
        who = 0
        while i < len(clause) and clause[i] in _WHO:
            who |= _WHO[clause[i]]
            i += 1
        if who == 0:
            who = 0o7777
        if i == len(clause):
            raise ValueError(f"invalid mode: {spec!r}")
        while i < len(clause):
            op = clause[i]
            if op not in "+-=":
                raise ValueError(f"invalid mode: {spec!r}")
            i += 1
            bits = 0
            if i < len(clause) and clause[i] in _SHIFT:
                triple = (result >> _SHIFT[clause[i]]) & 0o7
                bits = triple * 0o111
                i += 1
            else:
                while i < len(clause) and clause[i] in "rwxXst":
                    ch = clause[i]
                    if ch == "X":
                        if is_dir or result & 0o111:
                            bits |= 0o111
                    else:
                        bits |= _PERM[ch]
                    i += 1
            bits &= who
            if op == "+":
                result |= bits
            elif op == "-":
                result &= ~bits
            else:
                result = (result & ~who) | bits
    return result & 0o7777


def cmd_chmod(ctx: _Context) -> None:
    """``chmod``: change permission bits."""
    fs = ctx.client()
    args = ctx.args
    try:
        apply_mode(args.mode, 0)  # check the syntax once, before touching anything
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    def change(path: str) -> None:
        st = fs.stat(path)
        fs.chmod(path, apply_mode(args.mode, st.st_mode, is_dir=stat_module.S_ISDIR(st.st_mode)))

    _each(ctx, args.paths, change)


def cmd_df(ctx: _Context) -> None:
    """``df``: file system statistics of the share."""
    fs = ctx.client()
    args = ctx.args
    try:
        sfs = fs.statfs(args.df_path)
    except (OSError, ValueError) as exc:
        ctx.report(exc)
        return
    share = _frontend_of(fs).tag or "9p"
    size = sfs.blocks * sfs.bsize
    avail = sfs.bavail * sfs.bsize
    used = (sfs.blocks - sfs.bfree) * sfs.bsize
    iused = sfs.files - sfs.ffree
    if args.json:
        record = sfs._asdict()
        record.update(share=share, size=size, used=used, available=avail, inodes_used=iused)
        ctx.print(json.dumps(record, sort_keys=True))
        return

    def pct(part: int, whole: int) -> str:
        return "-" if whole == 0 else f"{-(-100 * part // whole)}%"

    if args.inodes:
        rows = [("Share", "Inodes", "IUsed", "IFree", "IUse%"),
                (share, str(sfs.files), str(iused), str(sfs.ffree), pct(iused, sfs.files))]
    elif args.human_readable:
        rows = [("Share", "Size", "Used", "Avail", "Use%"),
                (share, format_size(size), format_size(used), format_size(avail),
                 pct(used, used + avail))]
    else:
        rows = [("Share", "1K-blocks", "Used", "Available", "Use%"),
                (share, str(size // 1024), str(used // 1024), str(avail // 1024),
                 pct(used, used + avail))]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        ctx.print(
            f"{row[0]:<{widths[0]}} "
            + " ".join(f"{cell:>{widths[i + 1]}}" for i, cell in enumerate(row[1:]))
        )


# --------------------------------------------------------------------------
# info


def _mapped_file(soname: str) -> str | None:
    """The file this process mapped for the library *soname* (from ``/proc/self/maps``)."""
    base = os.path.basename(soname)
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and os.path.basename(fields[5].strip()).startswith(base):
                    return fields[5].strip()
    except OSError:
        pass
    return None


def _probe_library(module: Any) -> dict[str, Any]:
    spec = module.LIBRARY
    entry: dict[str, Any] = {"name": spec.name, "package": spec.package}
    if os.environ.get(spec.env_var):
        entry["override"] = f"{spec.env_var}={os.environ[spec.env_var]}"
    try:
        bound = spec.load()
    except OSError as exc:
        entry.update(loaded=False, error=_describe(exc))
        return entry
    entry.update(loaded=True, soname=bound.name, file=_mapped_file(bound.name) or bound.name)
    if bound.missing:
        entry["missing_functions"] = list(bound.missing)
    return entry


def _probe_path(path: str) -> dict[str, Any]:
    exists = os.path.exists(path)
    entry: dict[str, Any] = {"exists": exists}
    if exists and not os.path.isdir(path):
        entry["accessible"] = os.access(path, os.R_OK | os.W_OK)
    return entry


def _read_small(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(200).strip()
    except OSError:
        return None


def _probe_xenstore() -> dict[str, Any]:
    from pyxen9p.libs import RealXen

    entry: dict[str, Any] = {"reachable": False}
    if os.environ.get("XENSTORED_PATH"):
        entry["xenstored_path"] = os.environ["XENSTORED_PATH"]
    try:
        store = RealXen().open_xenstore()
    except OSError as exc:
        entry["error"] = _describe(exc)
        return entry
    with store:
        entry["reachable"] = True
        try:
            base, devices = list_devices(store)
        except (OSError, ValueError) as exc:
            entry["error"] = f"cannot list the 9pfs devices: {_describe(exc)}"
            return entry
        entry["device_directory"] = base
        entry["devices"] = [dataclasses.asdict(d) for d in devices]
    return entry


def _frontend_of(client: Client) -> Frontend:
    """The Xen frontend carrying *client*'s messages."""
    from pyxen9p.frontend import Frontend

    transport = client.transport
    if isinstance(transport, pyxen9p.SimulatedTransport):
        return transport.frontend
    if not isinstance(transport, Frontend):
        raise TypeError(f"not a Xen 9pfs transport: {transport!r}")
    return transport


def _connection_report(client: Client) -> dict[str, Any]:
    from pyxen9p.ring import ring_size

    fe = _frontend_of(client)
    rings, order = fe.num_rings, fe.ring_order
    return {
        "frontend_path": fe.path,
        "backend_path": fe.backend_path,
        "backend_id": fe.backend_id,
        "tag": fe.tag,
        "backend_versions": sorted(fe.backend_versions),
        "backend_max_rings": fe.backend_max_rings,
        "backend_max_ring_order": fe.backend_max_ring_order,
        "rings": rings,
        "ring_order": order,
        "ring_bytes_each_way": ring_size(order),
        "grants": rings * (1 + (1 << order)),
        "transport_msize": int(fe.msize),
        "version": client.version,
        "msize": client.msize,
    }


def _gather_info(ctx: _Context) -> dict[str, Any]:
    from pyxen9p.libs import xenevtchn, xengnttab, xenstore

    args = ctx.args
    report: dict[str, Any] = {
        "pyxen9p": __version__,
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "hypervisor": _read_small("/sys/hypervisor/type"),
        "paths": {path: _probe_path(path) for path, _ in _XEN_PATHS},
        "kernel_9pnet_xen_loaded": os.path.isdir("/sys/module/9pnet_xen"),
        "libraries": [_probe_library(m) for m in (xengnttab, xenevtchn, xenstore)],
        "xenstore": _probe_xenstore(),
    }
    selection = _selection(args)
    requested = bool(selection) or args.simulate is not None
    conn: dict[str, Any] = {"simulated": args.simulate is not None, "connected": False}
    report["connection"] = conn
    if args.simulate is not None:
        conn["directory"] = os.path.abspath(args.simulate)
        conn["readonly"] = bool(args.readonly)
        _connect_simulated(ctx, conn, selection)
    elif requested:
        conn["requested"] = selection
        _connect_real(ctx, conn, selection)
    else:
        devices = report["xenstore"].get("devices")
        if args.no_connect:
            conn["reason"] = "not connecting (--no-connect)"
        elif report["xenstore"]["reachable"] and devices is not None and len(devices) == 1:
            only = devices[0]
            pick = {"devid": int(only["devid"])} if only["devid"].isdigit() else {
                "path": only["path"]}
            conn["requested"] = pick
            conn["automatic"] = True
            _connect_real(ctx, conn, pick)
        elif not report["xenstore"]["reachable"]:
            conn["reason"] = "XenStore is not reachable: no 9pfs device can be found"
        elif devices is None:
            conn["reason"] = "the 9pfs devices could not be listed"
        elif not devices:
            conn["reason"] = "this domain has no 9pfs device"
        else:
            conn["reason"] = (
                f"this domain has {len(devices)} 9pfs devices:"
                " choose one with --tag, --devid or --path to see its negotiation"
            )
    return report


def _connect_real(ctx: _Context, conn: dict[str, Any], selection: dict[str, Any]) -> None:
    try:
        client = pyxen9p.connect(**selection, **ctx.connect_options())
    except (OSError, ValueError) as exc:
        conn["error"] = _describe(exc) + _no_xen_hint(exc)
        return
    with client:
        conn.update(_connection_report(client), connected=True)


def _connect_simulated(ctx: _Context, conn: dict[str, Any], selection: dict[str, Any]) -> None:
    from pyxen9p.sim.share import SimulatedShare

    args = ctx.args
    try:
        share = SimulatedShare(args.simulate, readonly=args.readonly, tag=args.tag or "share")
    except (OSError, ValueError) as exc:
        conn["error"] = _describe(exc)
        return
    with share, share.guest.open_xenstore() as store:
        base, devices = list_devices(store)
        conn["device_directory"] = base
        try:
            client = pyxen9p.connect(
                platform=share.guest, **(selection or {"devid": 0}), **ctx.connect_options()
            )
        except (OSError, ValueError) as exc:
            conn["error"] = _describe(exc)
        else:
            with client:
                conn.update(_connection_report(client), connected=True)
                _, devices = list_devices(store)  # the states while connected
        conn["devices"] = [dataclasses.asdict(d) for d in devices]


def _rings(n: int) -> str:
    return f"{n} ring" if n == 1 else f"{n} rings"


def _render_info(report: dict[str, Any]) -> list[str]:
    lines = [f"pyxen9p {report['pyxen9p']} on Python {report['python']}, {report['system']}", ""]

    def row(key: str, value: str) -> None:
        lines.append(f"  {key:<22}{value}")

    lines.append("This machine")
    row("hypervisor", report["hypervisor"] or "none detected (no /sys/hypervisor/type)")
    for path, role in _XEN_PATHS:
        probe = report["paths"][path]
        state = "present" if probe["exists"] else "absent"
        if probe.get("accessible") is False:
            state += " (no read/write access)"
        row(path, f"{state:<36} {role}")
    row("9pnet_xen module", "loaded: it may claim 9pfs devices first"
        if report["kernel_9pnet_xen_loaded"] else "not loaded")
    for lib in report["libraries"]:
        if lib["loaded"]:
            text = f"loads: {lib['file']}"
            if lib.get("missing_functions"):
                text += f" (lacks {', '.join(lib['missing_functions'])})"
        else:
            text = f"does not load: {lib['error']}"
        if lib.get("override"):
            text += f" [{lib['override']}]"
        row(lib["name"], text)
    xs = report["xenstore"]
    if xs["reachable"]:
        via = f" through XENSTORED_PATH={xs['xenstored_path']}" if "xenstored_path" in xs else ""
        row("XenStore", f"reachable{via}")
    else:
        row("XenStore", f"not reachable: {xs.get('error', 'unknown error')}")
    lines.append("")
    conn = report["connection"]
    if conn["simulated"]:
        devices = conn.get("devices")
        title = f"9pfs devices of the simulated guest ({conn.get('device_directory', '?')})"
    else:
        devices = xs.get("devices")
        title = f"9pfs devices of this domain ({xs.get('device_directory', 'unknown')})"
    lines.append(title)
    if devices is None:
        lines.append("  unknown: " + (xs.get("error") or "XenStore is not reachable"))
    elif not devices:
        lines.append("  none")
    for d in devices or []:
        tag = repr(d["tag"]) if d["tag"] is not None else "none"
        lines.append(
            f"  {d['devid']:<4} tag {tag}, state {d['state'] or '-'};"
            f" backend {d['backend'] or '-'} (domain {d['backend_id'] or '-'},"
            f" state {d['backend_state'] or '-'})"
        )
    lines.append("")
    if conn["simulated"]:
        ro = ", read-only" if conn.get("readonly") else ""
        lines.append(f"Connection (simulated Xen serving {conn['directory']}{ro})")
    else:
        how = conn.get("requested")
        what = ", ".join(f"{k} {v!r}" for k, v in how.items()) if how else "none requested"
        auto = ", the only device" if conn.get("automatic") else ""
        lines.append(f"Connection ({what}{auto})")
    if conn["connected"]:
        versions = ", ".join(str(v) for v in conn["backend_versions"])
        row("frontend", conn["frontend_path"])
        row("backend", f"{conn['backend_path']} (domain {conn['backend_id']})")
        row("tag", str(conn["tag"]))
        row("backend offers", f"versions {versions}, max-rings {conn['backend_max_rings']},"
            f" max-ring-page-order {conn['backend_max_ring_order']}")
        row("in use", f"{_rings(conn['rings'])} of order {conn['ring_order']}"
            f" ({format_size(conn['ring_bytes_each_way'])} each way per ring,"
            f" {conn['grants']} grants)")
        row("transport msize", str(conn["transport_msize"]))
        row("9P session", f"{conn['version']}, msize {conn['msize']}")
    elif "error" in conn:
        lines.append(f"  failed: {conn['error']}")
    else:
        lines.append(f"  no 9pfs device is reachable: {conn.get('reason', 'unknown')}")
        if not conn["simulated"]:
            lines.append("  (pyxen9p --simulate DIR info shows the same over a simulated Xen)")
    return lines


def cmd_info(ctx: _Context) -> None:
    """``info``: what this machine has, what XenStore says, what was negotiated.

    Exit status: when a device was asked for (``--tag``, ``--devid``,
    ``--path``, ``--simulate``) or ``--require-device`` is given, 0 only if
    it was connected; a plain survey exits 0 whatever it found.
    """
    args = ctx.args
    report = _gather_info(ctx)
    conn = report["connection"]
    must_connect = args.require_device or bool(_selection(args)) or args.simulate is not None
    report["exit_status"] = EXIT_FAILURE if must_connect and not conn["connected"] else EXIT_OK
    if args.json:
        ctx.print(json.dumps(report, indent=2, sort_keys=True))
    else:
        for line in _render_info(report):
            ctx.print(line)
    ctx.status = max(ctx.status, report["exit_status"])


# --------------------------------------------------------------------------
# demo


def _sample_files() -> dict[str, bytes]:
    rng = random.Random(9)
    csv = "n,square,cube\n" + "".join(f"{n},{n * n},{n ** 3}\n" for n in range(1, 3001))
    return {
        "hello.txt": (
            b"Hello from pyxen9p!\n"
            b"This text travelled as 9P2000.L messages over Xen 9pfs shared rings.\n"
        ),
        "README.txt": b"A sample share made by 'pyxen9p demo'.\n",
        "data/numbers.csv": csv.encode(),
        "data/random.bin": rng.randbytes(4 * 1024 * 1024 + 12345),
        "data/empty": b"",
        "data/deeper/notes.md": b"# Notes\n\n* nested directories are copied too\n",
    }


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _tree_digest(root: str) -> dict[str, str]:
    """``relative path -> "dir" | "link:<target>" | "sha256:<hex>"`` for a local tree."""
    digest: dict[str, str] = {}
    for directory, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(directory, root)
        for name in dirnames + filenames:
            full = os.path.join(directory, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if os.path.islink(full):
                digest[rel] = "link:" + os.readlink(full)
            elif os.path.isdir(full):
                digest[rel] = "dir"
            else:
                digest[rel] = "sha256:" + _sha256_file(full)
    return digest


class _Demo:
    """The steps of ``pyxen9p demo``, each printed and checked."""

    def __init__(self, ctx: _Context, workdir: str) -> None:
        self.ctx = ctx
        self.workdir = workdir
        self.share_dir = os.path.join(workdir, "share")
        self.checks = 0
        self.failures: list[str] = []
        self.step_no = 0

    def say(self, text: str = "") -> None:
        if not self.ctx.quiet:
            self.ctx.print(text)

    def step(self, title: str) -> None:
        self.step_no += 1
        self.say(f"[{self.step_no}] {title}")

    def check(self, ok: bool, what: str) -> None:
        self.checks += 1
        if ok:
            self.say(f"      ok: {what}")
        else:
            self.failures.append(what)
            self.ctx.print(f"      FAILED: {what}")

    def compare(self, expected: dict[str, str], got: dict[str, str], what: str) -> None:
        if expected == got:
            files = sum(1 for v in got.values() if v.startswith("sha256:"))
            self.check(True, f"{what}: {files} files, every sha256 and link target matches")
            return
        differ = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
        self.check(False, f"{what}: differs at {', '.join(differ[:5])}")

    def run(self) -> None:
        ctx = self.ctx
        samples = _sample_files()
        self.step("A sample directory to share")
        for rel, data in samples.items():
            path = os.path.join(self.share_dir, *rel.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        os.symlink("data/numbers.csv", os.path.join(self.share_dir, "latest.csv"))
        total = sum(len(d) for d in samples.values())
        self.say(f"      {self.share_dir}: {len(samples)} files ({format_size(total)}),"
                 " 2 subdirectories, 1 symbolic link")

        self.step("Serve it through a simulated Xen and connect through the whole stack")
        self.say("      (simulated XenStore, grant tables and event channels; the real frontend,")
        self.say("      rings and 9P2000.L client; a QEMU-like backend and a 9P file server)")
        started = time.monotonic()
        with pyxen9p.connect(
            simulate=self.share_dir, tag="demo", **ctx.connect_options()
        ) as fs:
            fs.timeout = ctx.args.timeout
            info = _connection_report(fs)
            self.say(f"      connected in {time.monotonic() - started:.2f} s by tag 'demo'")
            self.say(f"      frontend {info['frontend_path']}")
            self.say(f"      backend  {info['backend_path']} (domain {info['backend_id']})")
            self.say(f"      backend offers versions"
                     f" {', '.join(map(str, info['backend_versions']))},"
                     f" max-rings {info['backend_max_rings']},"
                     f" max-ring-page-order {info['backend_max_ring_order']}")
            self.say(f"      negotiated {_rings(info['rings'])} of order {info['ring_order']}"
                     f" ({format_size(info['ring_bytes_each_way'])} each way,"
                     f" {info['grants']} grants)")
            self.say(f"      {info['version']} session, msize {info['msize']}")
            self.check(info["version"] == "9P2000.L" and info["msize"] >= 4096,
                       "9P2000.L session established")
            self.session(fs, samples)

    def session(self, fs: Client, samples: dict[str, bytes]) -> None:
        self.step("ls -l /")
        rows = []
        for entry in sorted(fs.scandir("/"), key=lambda e: e.name):
            st = entry.stat(follow_symlinks=False)
            rows.append((entry.name, st, fs.readlink(entry.path) if entry.is_symlink() else None))
        for line in _long_lines(rows):
            self.say(f"      {line}")
        self.check(sorted(fs.listdir("/")) == ["README.txt", "data", "hello.txt", "latest.csv"],
                   "the listing matches the directory")

        self.step("cat /hello.txt")
        text = fs.read_text("hello.txt")
        for line in text.splitlines():
            self.say(f"      | {line}")
        mismatched = [
            rel for rel, data in samples.items()
            if hashlib.sha256(fs.read_bytes(rel)).digest() != hashlib.sha256(data).digest()
        ]
        self.check(not mismatched, f"read all {len(samples)} files through 9P; every sha256"
                   " matches the local file" + (f" except {mismatched}" if mismatched else ""))
        self.check(fs.read_bytes("latest.csv") == samples["data/numbers.csv"],
                   "the symbolic link latest.csv resolves to data/numbers.csv")

        self.step("Write through 9P: mkdir /made-by-9p, write a file, rename it")
        payload = random.Random(4).randbytes(300_000)
        fs.mkdir("made-by-9p")
        fs.write_bytes("made-by-9p/draft.bin", payload)
        fs.rename("made-by-9p/draft.bin", "made-by-9p/final.bin")
        local = os.path.join(self.share_dir, "made-by-9p", "final.bin")
        with open(local, "rb") as f:
            on_disk = f.read()
        self.check(on_disk == payload and not os.path.exists(local.replace("final", "draft")),
                   f"{format_size(len(payload))} written and renamed; the local file is identical")

        self.step("get -r / : copy the whole share out")
        out = os.path.join(self.workdir, "copied-out")
        started = time.monotonic()
        with self.ctx.progress("get -r /") as bar:
            n = fs.copy_out("/", out, progress=bar)
        took = time.monotonic() - started
        self.say(f"      {format_size(n)} in {took:.2f} s ({format_size(n / max(took, 1e-9))}/s)")
        self.compare(_tree_digest(self.share_dir), _tree_digest(out), "copied tree")

        self.step("put -r : copy it back in as /roundtrip")
        started = time.monotonic()
        with self.ctx.progress("put -r roundtrip") as bar:
            n = fs.copy_in(out, "roundtrip", progress=bar)
        took = time.monotonic() - started
        self.say(f"      {format_size(n)} in {took:.2f} s ({format_size(n / max(took, 1e-9))}/s)")
        self.compare(_tree_digest(out), _tree_digest(os.path.join(self.share_dir, "roundtrip")),
                     "round trip")

        self.step("rm -r /roundtrip, then df")
        _rmtree(fs, "roundtrip")
        self.check(not os.path.exists(os.path.join(self.share_dir, "roundtrip"))
                   and not fs.exists("roundtrip"), "the tree is gone, on both sides")
        sfs = fs.statfs()
        self.say(f"      {format_size(sfs.blocks * sfs.bsize)} file system,"
                 f" {format_size(sfs.bavail * sfs.bsize)} available, names up to"
                 f" {sfs.namelen} bytes")


def _real_share() -> dict[str, Any] | None:
    """The one 9pfs device of this domain on a real Xen, or ``None`` without one."""
    if not os.path.exists("/proc/xen") and not os.path.exists("/dev/xen"):
        return None
    try:
        return _only_device()
    except CommandError as exc:
        log.info("no real 9pfs share for the demo: %s", exc)
        return None


def _real_demo(ctx: _Context, selection: dict[str, Any]) -> None:
    """The demo on a real Xen share: read only, nothing is written to the share."""
    started = time.monotonic()
    ctx.print(f"pyxen9p {__version__} demo: a real Xen 9pfs share (read only)")
    with pyxen9p.connect(**selection, **ctx.connect_options()) as fs:
        fs.timeout = ctx.args.timeout
        info = _connection_report(fs)
        ctx.print(f"  frontend {info['frontend_path']}, backend {info['backend_path']}"
                  f" (domain {info['backend_id']})")
        ctx.print(f"  negotiated {_rings(info['rings'])} of order {info['ring_order']},"
                  f" 9P2000.L msize {fs.msize}")
        entries = sorted(fs.scandir("/"), key=lambda e: e.name)
        ctx.print(f"  / holds {len(entries)} entries")
        read = total = 0
        for entry in entries:
            if entry.is_file(follow_symlinks=False) and read < 5:
                data = fs.read_bytes(entry.name)
                digest = hashlib.sha256(data).hexdigest()[:16]
                ctx.print(f"    {entry.name}: {format_size(len(data))}, sha256 {digest}...")
                read += 1
                total += len(data)
            elif entry.is_dir(follow_symlinks=False):
                ctx.print(f"    {entry.name}/")
        st = fs.statfs("/")
        ctx.print(f"  read {read} files ({format_size(total)}); file system of"
                  f" {format_size(st.blocks * st.bsize)}")
    ctx.print(f"demo passed on real Xen in {time.monotonic() - started:.2f} s"
              " (pyxen9p demo --simulated shows the whole write path on a simulated Xen)")


def cmd_demo(ctx: _Context) -> None:
    """``demo``: on a real Xen share when this domain has one (read only),
    else the whole stack on a simulated Xen, checked end to end."""
    args = ctx.args
    if args.simulate is not None or args.readonly:
        raise UsageError("demo serves its own temporary directory: --simulate and"
                         " --readonly do not apply")
    if not args.simulated:
        selection = _selection(args) or _real_share()
        if selection:
            _real_demo(ctx, selection)
            return
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="pyxen9p-demo-")
    demo = _Demo(ctx, workdir)
    try:
        if not ctx.quiet:
            ctx.print(f"pyxen9p {__version__} demo: the whole stack over a simulated Xen")
            ctx.print("(no hypervisor, no Xen library and no compiler needed)")
            ctx.print()
        demo.run()
    finally:
        if args.keep:
            ctx.stderr.write(f"{PROG}: demo: kept {workdir}\n")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    took = time.monotonic() - started
    if demo.failures:
        ctx.print(f"demo FAILED: {len(demo.failures)} of {demo.checks} checks failed"
                  f" ({format_duration(took)})")
        ctx.status = EXIT_FAILURE
    else:
        if not ctx.quiet:
            ctx.print()
        ctx.print(f"demo passed: {demo.checks} checks in {took:.2f} s")


# --------------------------------------------------------------------------
# Argument parsing


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


def _add_global_options(parser: argparse.ArgumentParser, *, repeated: bool) -> None:
    """The options choosing and tuning the share.

    :param repeated: add them to a command's parser (defaults are then
        suppressed so that a value given before the command is kept)
    """
    def default(value: object) -> object:
        return argparse.SUPPRESS if repeated else value

    title = "global options (also accepted after the command)" if repeated else "global options"
    group = parser.add_argument_group(title)
    group.add_argument("--tag", default=default(None), metavar="TAG",
                       help="the Xen 9pfs device whose mount tag is TAG")
    group.add_argument("--devid", type=_devid, default=default(None), metavar="N",
                       help="the device device/9pfs/N of this domain")
    group.add_argument("--path", default=default(None), metavar="XSPATH",
                       help="the device whose frontend directory in XenStore is XSPATH")
    group.add_argument("--simulate", default=default(None), metavar="DIR",
                       help="serve the local directory DIR through a simulated Xen and use"
                            " that (the whole stack; no Xen needed)")
    group.add_argument("--readonly", action="store_true", default=default(False),
                       help="with --simulate: export DIR read-only")
    group.add_argument("--timeout", type=_seconds, default=default(30.0), metavar="SECONDS",
                       help="limit for each connection step and each request (default: 30)")
    group.add_argument("--rings", type=_positive_int, default=default(None), metavar="N",
                       help="number of rings wished (default 2; capped by the backend)")
    group.add_argument("--ring-order", type=_ring_order, default=default(None), metavar="N",
                       help="ring order wished, 1..9 (default: the largest allowed)")
    group.add_argument("--allow-reconnect", action="store_true", default=default(False),
                       help="connect even if the backend has served this device before (it"
                            " is Closed); QEMU 7.2 aborts on that, so only for a backend"
                            " known to reconnect")
    group.add_argument("-v", "--verbose", action="count", default=default(0),
                       help="log what happens (-vv: debug) and show tracebacks of errors")
    group.add_argument("-q", "--quiet", action="store_true", default=default(False),
                       help="no progress bars, no warnings")


_DESCRIPTION = """\
Files on a Xen 9pfs share, from the shell: a user-space Xen 9pfs frontend
and 9P2000.L client.  On a Xen guest, the share is chosen with --tag,
--devid or --path (default: the only 9pfs device of this domain); anywhere,
--simulate DIR serves a local directory through a simulated Xen.
"""

_EPILOG = """\
examples:
  pyxen9p demo                             try the whole stack, no Xen needed
  pyxen9p info                             what this machine has
  pyxen9p --tag share ls -l /              list the share tagged 'share'
  pyxen9p --devid 0 get -r docs ./docs     copy a tree out
  pyxen9p --simulate /tmp/x put notes.txt  anywhere, over a simulated Xen

exit status: 0 success, 1 an operation failed, 2 usage error,
130 interrupted (Ctrl-C), 141 standard output closed early.
Run 'pyxen9p COMMAND --help' for each command's options.
"""


@dataclasses.dataclass(frozen=True)
class _Command:
    name: str
    func: Callable[[_Context], None]
    summary: str
    description: str
    examples: str
    arguments: Callable[[argparse.ArgumentParser], None]


def _args_ls(p: argparse.ArgumentParser) -> None:
    p.add_argument("-l", dest="long", action="store_true",
                   help="long format: mode, links, uid, gid, size, mtime, name (-> target)")
    p.add_argument("-a", "--all", action="store_true", help="include names starting with '.'")
    p.add_argument("-R", "--recursive", action="store_true", help="list subdirectories too")
    machine = p.add_mutually_exclusive_group()
    machine.add_argument("--json", action="store_true",
                         help="one JSON object per entry, one per line (with -l: every"
                              " attribute); exact for any name")
    machine.add_argument("-0", "--null", "--zero", dest="null", action="store_true",
                         help="the path of each entry, ended by a NUL byte (raw bytes, as"
                              " find -print0 writes them); exact for any name")
    p.add_argument("paths", nargs="*", metavar="PATH", help="what to list (default: /)")


def _args_paths(help_text: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("paths", nargs="+", metavar="PATH", help=help_text)

    return add


def _args_get(p: argparse.ArgumentParser) -> None:
    p.add_argument("-r", "--recursive", action="store_true", help="copy a directory tree")
    p.add_argument("-n", "--no-clobber", action="store_true",
                   help="do not replace existing files (or links)")
    p.add_argument("--no-preserve", action="store_true",
                   help="do not copy the permission bits and times")
    p.add_argument("remote", metavar="REMOTE", help="the file or directory on the share")
    p.add_argument("local", nargs="?", metavar="LOCAL",
                   help="where to put it (default: its name in the current directory;"
                        " an existing directory receives it under its name)")


def _args_put(p: argparse.ArgumentParser) -> None:
    p.add_argument("-r", "--recursive", action="store_true", help="copy a directory tree")
    p.add_argument("-n", "--no-clobber", action="store_true",
                   help="do not replace existing files (or links)")
    p.add_argument("--no-preserve", action="store_true",
                   help="do not copy the permission bits and times")
    p.add_argument("local", metavar="LOCAL", help="the local file or directory")
    p.add_argument("remote", nargs="?", metavar="REMOTE",
                   help="where to put it (default: its name at the root; an existing"
                        " directory receives it under its name)")


def _args_stat(p: argparse.ArgumentParser) -> None:
    p.add_argument("-L", "--dereference", action="store_true", help="follow symbolic links")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per file, one per line")
    p.add_argument("paths", nargs="+", metavar="PATH", help="the files")


def _args_mkdir(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--parents", action="store_true",
                   help="create missing parents; no error if it exists")
    p.add_argument("-m", "--mode", type=_octal_mode, metavar="MODE",
                   help="octal permissions (default: 777 less the umask 022)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="the directories")


def _args_rm(p: argparse.ArgumentParser) -> None:
    p.add_argument("-r", "-R", "--recursive", action="store_true",
                   help="remove directories and their contents")
    p.add_argument("-f", "--force", action="store_true", help="ignore missing files")
    p.add_argument("paths", nargs="+", metavar="PATH", help="what to remove")


def _args_mv(p: argparse.ArgumentParser) -> None:
    p.add_argument("-T", "--no-target-directory", action="store_true",
                   help="treat DST as a plain name even if it is a directory")
    p.add_argument("source", metavar="SRC", help="what to rename")
    p.add_argument("dest", metavar="DST",
                   help="the new name, or an existing directory to move SRC into")


def _args_ln(p: argparse.ArgumentParser) -> None:
    p.add_argument("-s", "--symbolic", action="store_true",
                   help="make a symbolic link (default: a hard link)")
    p.add_argument("target", metavar="TARGET",
                   help="what the link points to (a symbolic link's target is stored as given)")
    p.add_argument("link", metavar="LINK",
                   help="the link to create, or an existing directory to create it in")


def _args_chmod(p: argparse.ArgumentParser) -> None:
    p.add_argument("mode", metavar="MODE",
                   help="octal (755) or symbolic (u+x, go-w, a=r,u+w, g=u)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="the files")


def _args_df(p: argparse.ArgumentParser) -> None:
    p.add_argument("-h", "--human-readable", action="store_true",
                   help="sizes in KiB, MiB, GiB...")
    p.add_argument("-i", "--inodes", action="store_true", help="inodes instead of blocks")
    p.add_argument("--json", action="store_true", help="every statfs field as JSON")
    p.add_argument("df_path", nargs="?", default="", metavar="PATH",
                   help="a path on the file system (default: the root)")


def _args_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.add_argument("--require-device", action="store_true",
                   help="exit with status 1 unless a 9pfs device was connected")
    p.add_argument("--no-connect", action="store_true",
                   help="without a chosen device: only report what XenStore says, do not"
                        " connect to the only device")


def _args_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (its path is printed)")
    p.add_argument("--simulated", action="store_true",
                   help="use the simulated Xen even on a Xen guest with a 9pfs share")


_COMMANDS = (
    _Command("ls", cmd_ls, "list directories",
             "List directory contents (or name files), sorted by name.  A symbolic link"
             " to a directory is listed as the directory, except with -l (add a trailing"
             " '/' to list it anyway).  '.' and '..' are never listed.  On a terminal,"
             " names are quoted as GNU ls quotes them ('a b', 'a'$'\\n''b'); to a pipe they"
             " are written as they are; --json and -0 give every name exactly.",
             "  pyxen9p --tag share ls\n  pyxen9p --tag share ls -l /data\n"
             "  pyxen9p --simulate /tmp/x ls -laR\n"
             "  pyxen9p --tag share ls -R -0 / | xargs -0 ...\n"
             "  pyxen9p --tag share ls --json -l /data | jq .size", _args_ls),
    _Command("cat", cmd_cat, "print files",
             "Copy the content of each file to standard output, unchanged.",
             "  pyxen9p --tag share cat /etc/motd\n"
             "  pyxen9p --tag share cat big.log | tail", _args_paths("the files to print")),
    _Command("get", cmd_get, "copy from the share",
             "Copy a file, or with -r a directory tree, from the share to the local disk"
             " (keeping permission bits and times).  Symbolic links are copied as links;"
             " fifos, sockets and devices are skipped with a warning.  A file is written"
             " under a temporary name and renamed when complete, so a failed copy leaves"
             " no partial file.  A tree copy goes on past a failed entry and reports every"
             " failure at the end (exit status 1).  A LOCAL ending in '/' must be a"
             " directory.  A progress bar is drawn when standard error is a terminal.",
             "  pyxen9p --tag share get report.pdf\n"
             "  pyxen9p --tag share get -r /photos ~/photos", _args_get),
    _Command("put", cmd_put, "copy to the share",
             "Copy a local file, or with -r a directory tree, to the share (keeping"
             " permission bits and times; bits the server drops, such as set-user-ID, are"
             " reported).  Symbolic links are copied as links; fifos, sockets and devices"
             " are skipped with a warning.  A tree copy goes on past a failed entry and"
             " reports every failure at the end (exit status 1).  A REMOTE ending in '/'"
             " must be a directory.",
             "  pyxen9p --tag share put notes.txt\n"
             "  pyxen9p --tag share put -r ./site /www", _args_put),
    _Command("stat", cmd_stat, "show file attributes",
             "Show the attributes of each file, like stat(1) (symbolic links are not"
             " followed unless -L is given).  Times are local time.",
             "  pyxen9p --tag share stat /data\n"
             "  pyxen9p --tag share stat --json a b | jq .size", _args_stat),
    _Command("mkdir", cmd_mkdir, "create directories", "Create directories.",
             "  pyxen9p --tag share mkdir new\n  pyxen9p --tag share mkdir -p a/b/c -m 700",
             _args_mkdir),
    _Command("rm", cmd_rm, "remove files",
             "Remove files; with -r, directories and everything below them (symbolic"
             " links are removed, never followed).  The share's root is never removed.",
             "  pyxen9p --tag share rm old.txt\n  pyxen9p --tag share rm -rf build",
             _args_rm),
    _Command("rmdir", cmd_rmdir, "remove empty directories", "Remove empty directories.",
             "  pyxen9p --tag share rmdir empty", _args_paths("the directories")),
    _Command("mv", cmd_mv, "rename or move",
             "Rename SRC to DST, replacing DST if it is a file; if DST is an existing"
             " directory, SRC is moved into it (unless -T).  A DST ending in '/' must be"
             " a directory (or SRC a directory, which gets that name).",
             "  pyxen9p --tag share mv draft.txt final.txt\n"
             "  pyxen9p --tag share mv final.txt archive/", _args_mv),
    _Command("ln", cmd_ln, "make links",
             "Make a symbolic link (-s) or a hard link LINK to TARGET.",
             "  pyxen9p --tag share ln -s data/numbers.csv latest.csv", _args_ln),
    _Command("chmod", cmd_chmod, "change permissions",
             "Change the permission bits of files (symbolic links are followed).  A"
             " symbolic MODE without u, g, o or a applies to all; the umask is not"
             " consulted.  Put '--' before a MODE starting with '-'.",
             "  pyxen9p --tag share chmod 644 notes.txt\n"
             "  pyxen9p --tag share chmod u+x,go-w run.sh\n"
             "  pyxen9p --tag share chmod -- -w frozen.txt", _args_chmod),
    _Command("df", cmd_df, "file system statistics",
             "Show the size and use of the file system holding the share (Tstatfs).",
             "  pyxen9p --tag share df -h\n  pyxen9p --tag share df --json", _args_df),
    _Command("info", cmd_info, "what this machine has and what was negotiated",
             "Report the Xen libraries that load, the Xen device files, whether XenStore"
             " is reachable, the 9pfs devices of this domain, and, for the chosen device"
             " (or the only one, unless --no-connect), what was negotiated by connecting to"
             " it and disconnecting: frontend and backend paths, backend"
             " id, tag, versions, max-rings, max-ring-page-order, the rings and ring order"
             " in use, the msize of the transport and of the 9P session.  It works on any"
             " machine.  Exit status: a plain survey exits 0 whatever it finds (no Xen"
             " is an answer, not a failure); when a device was asked for (--tag, --devid,"
             " --path, --simulate) or --require-device is given, it exits 0 only if a"
             " device was connected, else 1.",
             "  pyxen9p info\n  pyxen9p --tag share info --json\n"
             "  pyxen9p info --require-device && echo usable\n"
             "  pyxen9p --simulate /tmp/x info", _args_info),
    _Command("demo", cmd_demo, "try the whole stack on a simulated Xen",
             "Create a temporary directory with sample files, a subdirectory and a"
             " symbolic link, serve it through a simulated Xen (XenStore, grant tables,"
             " event channels in this process; the real frontend, rings and 9P client),"
             " then list, read, write, rename, copy the tree out and back, and remove it,"
             " checking every sha256.  Needs no Xen, no Xen library and no compiler."
             "  Exit status 0 if every check passed.",
             "  pyxen9p demo\n  pyxen9p demo --rings 1 --ring-order 4\n"
             "  pyxen9p demo --keep", _args_demo),
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pyxen9p`` command (with one subparser per command)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_global_options(parser, repeated=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    commands.required = True
    for command in _COMMANDS:
        sub = commands.add_parser(
            command.name,
            help=command.summary,
            description=textwrap.fill(command.description, 78),
            epilog="examples:\n" + command.examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            add_help=command.name != "df",  # df's -h is --human-readable, as in df(1)
        )
        if command.name == "df":
            sub.add_argument("--help", action="help", help="show this help message and exit")
        command.arguments(sub)
        _add_global_options(sub, repeated=True)
        sub.set_defaults(func=command.func)
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    chosen = [f"--{key}" for key in ("tag", "devid", "path") if getattr(args, key) is not None]
    if len(chosen) > 1:
        parser.error(f"give at most one of --tag, --devid, --path (got {', '.join(chosen)})")
    if args.readonly and args.simulate is None:
        parser.error("--readonly only applies with --simulate DIR")
    if args.quiet and args.verbose:
        parser.error("-q and -v contradict each other")


def _exit_code(code: object) -> int:
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    return EXIT_FAILURE


class _EscapingFormatter(logging.Formatter):
    """Log lines with their control characters escaped (they may carry a server's names)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return escape_controls(super().formatException(ei), keep_newlines=True)

    def formatStack(self, stack_info: str) -> str:
        return escape_controls(super().formatStack(stack_info), keep_newlines=True)


@contextlib.contextmanager
def _logging(args: argparse.Namespace, stream: TextIO) -> Iterator[None]:
    logger = logging.getLogger("pyxen9p")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_EscapingFormatter(f"{PROG}: %(levelname)s: %(name)s: %(message)s"))
    old_level = logger.level
    verbose = int(args.verbose or 0)
    if args.quiet:
        level = logging.ERROR
    elif verbose >= 2:
        level = logging.DEBUG
    elif verbose == 1:
        level = logging.INFO
    else:
        level = logging.WARNING
    logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _silence_stdout(stdout: TextIO) -> None:
    """After a broken pipe: point standard output at /dev/null so that exiting is quiet."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, stdout.fileno())
        os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pyxen9p`` command line.

    :param argv: the arguments (default: ``sys.argv[1:]``)
    :returns: the exit status: :data:`EXIT_OK`, :data:`EXIT_FAILURE`,
        :data:`EXIT_USAGE`, :data:`EXIT_INTERRUPTED` or :data:`EXIT_BROKEN_PIPE`
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _check_args(parser, args)
    except SystemExit as exc:  # --help, --version, usage errors
        return _exit_code(exc.code)
    stdout, stderr = sys.stdout, sys.stderr
    ctx = _Context(args, stdout, stderr)
    with _logging(args, stderr):
        try:
            try:
                args.func(ctx)
                stdout.flush()
            finally:
                ctx.close()
        except KeyboardInterrupt:
            stderr.write(f"\n{PROG}: interrupted\n")
            return EXIT_INTERRUPTED
        except BrokenPipeError as exc:
            if exc.filename is not None:
                ctx.report(exc)
                return EXIT_FAILURE
            _silence_stdout(stdout)
            return EXIT_BROKEN_PIPE
        except UsageError as exc:
            ctx.error(str(exc))
            stderr.write(f"Try '{PROG} {ctx.command} --help'.\n")
            return EXIT_USAGE
        except (CommandError, OSError, ValueError) as exc:
            ctx.report(exc)
            return EXIT_FAILURE
        except Exception as exc:
            ctx.status = EXIT_FAILURE
            ctx.error(f"internal error: {type(exc).__name__}: {_describe(exc)}"
                      + ("" if ctx.verbose else " (-v shows the traceback)"))
            if ctx.verbose:
                ctx.traceback(exc)
            return EXIT_FAILURE
    return ctx.status


if __name__ == "__main__":
    sys.exit(main())
