"""Where the agent (``pyxen9p serve``) listens, and how programs find it.

The agent holds a device's one Xen connection and serves it to local programs
through the 9P multiplexer (:mod:`pyxen9p.p9.mux`).  This module is what the
agent, :func:`pyxen9p.connect` and ``pyxen9p info`` share:

* **Addresses**: :func:`parse_address` reads ``unix:PATH`` and
  ``tcp:HOST:PORT`` (``tcp:[::1]:564`` for IPv6); :func:`open_transport`
  connects to one (any 9P2000.L server: the agent, diod, another pyxen9p).
* **Default paths**: each device's agent listens at
  ``RUNTIME/NAME.sock`` and holds ``RUNTIME/NAME.lock``, where RUNTIME is
  ``/run/pyxen9p`` for root and ``$XDG_RUNTIME_DIR/pyxen9p`` for other users
  (``$PYXEN9P_RUNTIME_DIR`` overrides both), and NAME comes from the device
  selector (:func:`agent_name`): ``tag-share``, ``devid-0``, ``path-...``, or
  ``sim-DIR-HASH`` for a simulated share of the directory DIR.
* **The lock**: :class:`AgentLock` (``flock``) is taken before the agent
  connects to its device, so that a second agent for the same name refuses
  at once; it also holds a small JSON description of the agent (pid, device,
  addresses) that :func:`list_agents` and :func:`find_agent` read.
* **Discovery**: :func:`find_agent` returns the socket of a running agent
  for a device, if one answers (checked by connecting).
* **Service managers**: :func:`sd_notify` sends systemd's ``READY=1`` and
  ``STOPPING=1`` over ``$NOTIFY_SOCKET`` (no dependency);
  :func:`raise_nofile_limit` lifts the soft descriptor limit to the hard one.
* :class:`WatchedTransport` declares a backend that stops answering dead, so
  that the agent does not wait forever for a killed QEMU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import resource
import socket
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyxen9p.errors import TransportError

if TYPE_CHECKING:
    from pyxen9p.p9.transport import StreamTransport, Transport

__all__ = [
    "RUNTIME_ENV",
    "Address",
    "AgentInfo",
    "AgentLock",
    "WatchedTransport",
    "agent_name",
    "find_agent",
    "list_agents",
    "lock_path",
    "make_runtime_dir",
    "open_transport",
    "parse_address",
    "raise_nofile_limit",
    "runtime_dir",
    "runtime_dirs",
    "sd_notify",
    "socket_path",
]

log = logging.getLogger(__name__)

#: The environment variable that overrides the agents' runtime directory.
RUNTIME_ENV = "PYXEN9P_RUNTIME_DIR"

#: Root's runtime directory.
SYSTEM_RUNTIME_DIR = "/run/pyxen9p"

#: The longest path a Unix socket address holds (Linux ``sun_path``, with its NUL).
_SUN_PATH_MAX = 107

#: The most bytes of a lock file's description read.
_INFO_MAX = 4096

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


# --- addresses -------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    """A 9P server's address: a Unix socket path, or a TCP host and port.

    :ivar kind: ``"unix"`` or ``"tcp"``
    :ivar path: the socket's path (unix)
    :ivar host: the host name or address (tcp)
    :ivar port: the port (tcp; 0 for a listener: any free port)
    """

    kind: str
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_address(text: str) -> Address:
    """Read ``unix:PATH`` or ``tcp:HOST:PORT`` (``tcp:[v6addr]:PORT``).

    :raises ValueError: neither form, an empty path or host, a port outside
        0..65535, a NUL byte
    """
    if "\0" in text:
        raise ValueError(f"an address holds no NUL byte: {text!r}")
    kind, sep, rest = text.partition(":")
    if not sep or kind not in ("unix", "tcp"):
        raise ValueError(f"not an address (unix:PATH or tcp:HOST:PORT): {text!r}")
    if kind == "unix":
        if not rest:
            raise ValueError(f"no socket path in {text!r}")
        if len(os.fsencode(rest)) > _SUN_PATH_MAX:
            raise ValueError(f"a Unix socket path is at most {_SUN_PATH_MAX} bytes: {text!r}")
        return Address("unix", path=rest)
    host, sep, port_text = rest.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"not a TCP address (tcp:HOST:PORT): {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not host or port > 65535:
        raise ValueError(f"not a TCP address (tcp:HOST:PORT, port 0..65535): {text!r}")
    return Address("tcp", host=host, port=port)


def open_transport(address: Address | str, *, timeout: float = 30.0) -> StreamTransport:
    """Connect to the 9P server at *address*.

    :param timeout: limit for establishing the connection
    :raises ValueError: a malformed address, or TCP port 0
    :raises OSError: the connection failed
    """
    from pyxen9p.p9.transport import StreamTransport

    addr = parse_address(address) if isinstance(address, str) else address
    if addr.kind == "unix":
        return StreamTransport.unix(addr.path, timeout=timeout)
    if addr.port == 0:
        raise ValueError(f"{addr}: a server's port cannot be 0")
    return StreamTransport.tcp(addr.host, addr.port, timeout=timeout)


# --- default paths ---------------------------------------------------------


def runtime_dir(environ: Mapping[str, str] | None = None) -> str | None:
    """This user's directory of agent sockets and locks (it may not exist yet).

    ``$PYXEN9P_RUNTIME_DIR`` if set; else ``/run/pyxen9p`` for root and
    ``$XDG_RUNTIME_DIR/pyxen9p`` for other users; ``None`` when a non-root
    user has no ``$XDG_RUNTIME_DIR`` (relative values are ignored).
    """
    env = os.environ if environ is None else environ
    override = env.get(RUNTIME_ENV)
    if override and os.path.isabs(override):
        return os.path.normpath(override)
    if os.geteuid() == 0:
        return SYSTEM_RUNTIME_DIR
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        return os.path.join(os.path.normpath(xdg), "pyxen9p")
    return None


def runtime_dirs(environ: Mapping[str, str] | None = None) -> list[str]:
    """Where agents are looked for: this user's runtime directory, then root's."""
    dirs = [d for d in (runtime_dir(environ),) if d is not None]
    env = os.environ if environ is None else environ
    if not env.get(RUNTIME_ENV) and SYSTEM_RUNTIME_DIR not in dirs:
        dirs.append(SYSTEM_RUNTIME_DIR)
    return dirs


def _safe(text: str) -> str:
    """*text* as a file name part: itself if short and plain, else a cleaned prefix and a hash."""
    if text and len(text) <= 48 and all(ch in _SAFE for ch in text) and text[0] != ".":
        return text
    clean = "".join(ch if ch in _SAFE else "_" for ch in text[:32]).lstrip(".")
    digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"{clean}-{digest}" if clean else digest


def agent_name(
    *,
    tag: str | None = None,
    devid: int | None = None,
    path: str | None = None,
    simulate: str | os.PathLike[str] | None = None,
) -> str:
    """The file name (without suffix) of the agent for this device selector.

    ``tag-TAG``, ``devid-N``, ``path-XSPATH`` (characters other than
    letters, digits, ``._-`` replaced and a hash added), or for a simulated
    share ``sim-BASENAME-HASH`` (the hash of the directory's real path,
    so each directory has its own).

    :raises ValueError: no selector
    """
    if simulate is not None:
        real = os.path.realpath(os.fspath(simulate))
        digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:12]
        base = "".join(ch if ch in _SAFE else "_" for ch in os.path.basename(real)[:24])
        return f"sim-{base.lstrip('.') or 'root'}-{digest}"
    if tag is not None:
        return f"tag-{_safe(tag)}"
    if devid is not None:
        return f"devid-{int(devid)}"
    if path is not None:
        return f"path-{_safe(path.strip('/'))}"
    raise ValueError("an agent is named after its device: give a tag, devid, path or directory")


def socket_path(name: str, directory: str | None = None) -> str:
    """The default socket path of the agent *name* (in :func:`runtime_dir`).

    :raises FileNotFoundError: no runtime directory (a non-root user without
        ``$XDG_RUNTIME_DIR``)
    """
    return os.path.join(_require_dir(directory), f"{name}.sock")


def lock_path(name: str, directory: str | None = None) -> str:
    """The lock file of the agent *name* (next to its default socket)."""
    return os.path.join(_require_dir(directory), f"{name}.lock")


def _require_dir(directory: str | None) -> str:
    found = directory if directory is not None else runtime_dir()
    if found is None:
        raise FileNotFoundError(
            errno.ENOENT,
            "no runtime directory for the agent's socket: set XDG_RUNTIME_DIR (or"
            f" {RUNTIME_ENV}), or give an address with --listen",
        )
    return found


def make_runtime_dir(directory: str) -> None:
    """Create *directory* (``0755`` for root's ``/run/pyxen9p``, else ``0700``) if missing.

    :raises PermissionError: it exists but is not a directory owned by this
        user (or root), or others may write into it
    """
    with contextlib.suppress(FileExistsError):
        os.makedirs(directory, mode=0o755 if os.geteuid() == 0 else 0o700)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(errno.ENOTDIR, f"{directory} is not a directory")
    if st.st_uid not in (os.geteuid(), 0) or st.st_mode & 0o022:
        raise PermissionError(
            errno.EPERM,
            f"{directory} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}:"
            " an agent's directory must be this user's (or root's) and writable by no one else",
        )


# --- the lock --------------------------------------------------------------


class AgentLock:
    """The exclusive lock of one agent name, holding the agent's description.

    :meth:`acquire` creates ``NAME.lock`` (never following a symbolic link),
    takes an exclusive ``flock`` without waiting, and checks that the locked
    file is still the one at the path (an agent that exits removes it);
    :meth:`describe` writes a JSON description; :meth:`release` removes the
    file and drops the lock.

    :ivar path: the lock file's path
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock.

        :raises BlockingIOError: another agent holds it (its pid in the message)
        :raises OSError: the file cannot be created (a symbolic link or a
            non-regular file at the path is refused)
        """
        for _ in range(10):
            fd = os.open(
                self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                0o600,
            )
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise PermissionError(errno.EPERM, f"{self.path} is not a regular file")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    info = _read_info(fd)
                    pid = info.get("pid") if info else None
                    raise BlockingIOError(
                        errno.EWOULDBLOCK,
                        f"another agent{f' (pid {pid})' if isinstance(pid, int) else ''}"
                        f" holds {self.path}",
                    ) from None
                try:
                    now = os.lstat(self.path)
                except FileNotFoundError:
                    now = None
                if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    self._fd = fd
                    self.describe({"pid": os.getpid()})
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # removed or replaced while we locked it: try again
        raise BlockingIOError(errno.EWOULDBLOCK, f"{self.path} keeps changing")

    def describe(self, info: Mapping[str, Any]) -> None:
        """Replace the lock file's content with *info* as JSON (the pid is always kept)."""
        if self._fd is None:
            raise RuntimeError("the lock is not held")
        data = json.dumps({**info, "pid": os.getpid()}, sort_keys=True).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data[:_INFO_MAX], 0)

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            st = os.fstat(fd)
            now = os.lstat(self.path)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> AgentLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_info(fd: int) -> dict[str, Any] | None:
    """The JSON object in a lock file (``None`` if it holds none)."""
    try:
        raw = os.pread(fd, _INFO_MAX + 1, 0)
        info = json.loads(raw[:_INFO_MAX].decode("utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _held(path: str) -> tuple[bool, dict[str, Any] | None]:
    """Whether an agent holds the lock at *path*, and its description."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False, None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False, None
        info = _read_info(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True, info
        except OSError:
            return False, info
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, info
    finally:
        os.close(fd)


# --- discovery -------------------------------------------------------------


@dataclass(frozen=True)
class AgentInfo:
    """A socket found at a default location, and what its lock file says.

    :ivar name: the agent's name (the file name without ``.sock``)
    :ivar socket: the socket's path
    :ivar answers: whether a connection to it succeeded
    :ivar locked: whether an agent holds its lock
    :ivar pid: the agent's pid, from its lock file
    :ivar device: the agent's device, from its lock file (``tag``, ``devid``,
        ``path``, ``simulate``...: what it was started with and found)
    :ivar listen: the addresses it listens on, from its lock file
    """

    name: str
    socket: str
    answers: bool
    locked: bool
    pid: int | None = None
    device: dict[str, Any] = dataclasses.field(default_factory=dict)
    listen: tuple[str, ...] = ()


def _answers(path: str, timeout: float = 1.0) -> bool:
    """Whether a server accepts connections on the Unix socket at *path*."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(timeout)
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _scan(directory: str) -> Iterator[AgentInfo]:
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return
    for entry in names:
        if not entry.endswith(".sock"):
            continue
        name = entry[: -len(".sock")]
        path = os.path.join(directory, entry)
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                continue
        except OSError:
            continue
        locked, info = _held(os.path.join(directory, f"{name}.lock"))
        info = info or {}
        pid = info.get("pid")
        device = info.get("device")
        listen = info.get("listen")
        yield AgentInfo(
            name=name,
            socket=path,
            answers=_answers(path),
            locked=locked,
            pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
            device=device if isinstance(device, dict) else {},
            listen=tuple(str(a) for a in listen) if isinstance(listen, list) else (),
        )


def list_agents(directories: list[str] | None = None) -> list[AgentInfo]:
    """The agent sockets at the default locations (:func:`runtime_dirs`).

    Each is probed by connecting (a connection the agent refuses, by its peer
    check, still answers).  Nothing found is trusted beyond being shown.
    """
    found: list[AgentInfo] = []
    for directory in runtime_dirs() if directories is None else directories:
        found.extend(_scan(directory))
    return found


def find_agent(
    *,
    tag: str | None = None,
    devid: int | None = None,
    path: str | None = None,
    simulate: str | os.PathLike[str] | None = None,
    directories: list[str] | None = None,
) -> str | None:
    """The socket of a running agent for this device, or ``None``.

    First the default socket of :func:`agent_name`; then any agent whose lock
    file says it serves the same device (an agent started with ``--devid 0``
    is found by ``tag="share"`` if device 0's tag is ``share``).  Only a socket
    that accepts a connection counts.
    """
    try:
        name = agent_name(tag=tag, devid=devid, path=path, simulate=simulate)
    except ValueError:
        return None
    dirs = runtime_dirs() if directories is None else directories
    for directory in dirs:
        candidate = os.path.join(directory, f"{name}.sock")
        if _answers(candidate):
            return candidate
    if simulate is not None:
        return None
    for agent in list_agents(dirs):
        if not agent.answers or not agent.locked or "simulate" in agent.device:
            continue  # a simulated share's tag says nothing about a Xen device
        dev = agent.device
        selector = dev.get("selector")
        asked = selector.get("path") if isinstance(selector, dict) else None
        if (
            (tag is not None and dev.get("tag") == tag)
            or (devid is not None and dev.get("devid") == devid)
            or (path is not None and path in (dev.get("path"), asked))
        ):
            return agent.socket
    return None


# --- service managers ------------------------------------------------------


def sd_notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send *state* (``"READY=1"``...) to systemd's ``$NOTIFY_SOCKET``, if set.

    A path (``/run/...``) or an abstract address (``@name``) is accepted;
    anything else is ignored with a warning.  Errors are logged, never raised.

    :returns: whether the datagram was sent
    """
    env = os.environ if environ is None else environ
    where = env.get("NOTIFY_SOCKET")
    if not where:
        return False
    if where[0] not in "/@" or "\0" in where or len(os.fsencode(where)) > _SUN_PATH_MAX:
        log.warning("ignoring NOTIFY_SOCKET=%r: not a socket path or abstract address", where)
        return False
    address = "\0" + where[1:] if where[0] == "@" else where
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.setblocking(False)
        sock.connect(address)
        sock.send(state.encode("utf-8"))
    except OSError as exc:
        log.warning("cannot notify the service manager at %r: %s", where, exc)
        return False
    finally:
        sock.close()
    return True


def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit, as servers do.

    :returns: the ``(soft, hard)`` limits now in force
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard, exc)
    return soft, hard


# --- an unresponsive backend -----------------------------------------------


class WatchedTransport:
    """A backend transport whose silence is noticed.

    A SIGKILLed QEMU leaves its XenStore state at Connected: nothing tells the
    frontend, and the multiplexer (which sends without a time limit) would
    wait forever.  This wrapper declares the backend dead when requests are
    outstanding and no reply at all has arrived for *timeout* seconds: it
    aborts the transport with ``ETIMEDOUT`` (``abort(exc)`` when the
    transport has it, else ``close()``), which the multiplexer sees as a
    backend failure.  Every other attribute is the transport's.

    :param transport: the backend (a :class:`~pyxen9p.frontend.Frontend`,
        :class:`~pyxen9p.SimulatedTransport`, a stream...)
    :param timeout: seconds of silence, while requests wait, that mean dead
    :ivar transport: the wrapped transport
    :ivar msize: its msize
    """

    def __init__(self, transport: Transport, timeout: float, *, interval: float = 0.5) -> None:
        if timeout <= 0:
            raise ValueError("the backend timeout must be positive")
        self.transport = transport
        self.msize = int(transport.msize)
        self._timeout = timeout
        self._lock = threading.Lock()
        self._pending: dict[int, float] = {}  # id(future) -> when sent
        self._last_reply = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, args=(interval,), name="pyxen9p-agent-watch", daemon=True
        )
        self._thread.start()

    def submit(
        self, message: bytes | bytearray | memoryview, *, timeout: float | None = None
    ) -> Future[bytes]:
        """Send *message* (the transport's ``submit``, or ``request`` in a thread)."""
        submit = getattr(self.transport, "submit", None)
        if submit is not None:
            future: Future[bytes] = submit(message, timeout=timeout)
        else:
            future = Future()

            def run() -> None:
                try:
                    future.set_result(self.transport.request(bytes(message), timeout=timeout))
                except BaseException as exc:
                    future.set_exception(exc)

            threading.Thread(target=run, daemon=True).start()
        key = id(future)
        with self._lock:
            self._pending[key] = time.monotonic()

        def done(_: Future[bytes]) -> None:
            with self._lock:
                self._pending.pop(key, None)
                self._last_reply = time.monotonic()

        future.add_done_callback(done)
        return future

    def request(self, message: bytes, *, timeout: float | None = 60.0) -> bytes:
        """Send *message* and wait for its reply."""
        return self.submit(message).result(timeout)

    def flushed(self, tag: int) -> None:
        """The transport's ``flushed``."""
        self.transport.flushed(tag)

    def close(self) -> None:
        """Stop watching (the transport is closed by its owner)."""
        self._stop.set()

    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            with self._lock:
                if not self._pending:
                    continue
                since = max(self._last_reply, min(self._pending.values()))
            silent = time.monotonic() - since
            if silent < self._timeout:
                continue
            exc = TransportError(
                errno.ETIMEDOUT,
                f"the backend is unresponsive: no reply for {silent:.0f} s"
                " with requests waiting",
            )
            log.error("%s", exc)
            abort = getattr(self.transport, "abort", None)
            try:
                if abort is not None:
                    abort(exc)
                else:
                    self.transport.close()
            except Exception:  # pragma: no cover - a transport's bug
                log.exception("aborting the backend transport failed")
            return

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)
