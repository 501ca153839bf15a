"""Mock ``libxengnttab.so.1`` / ``libxenevtchn.so.1`` for tests without Xen.

The C mocks (``mock_gnttab.c``, ``mock_evtchn.c``, ``mockxen_common.c``) have
the real libraries' SONAMEs, exported names and symbol versions and real
semantics across handles and processes; their state lives in a directory
(``MOCKXEN_DIR``) and the calling domain is ``MOCKXEN_DOMID``, both read when
a handle is opened.  See ``mockxen_common.c`` for the model.

For tests:

* :func:`session_mock_libs` builds them once per pytest session (in pytest's
  cache directory) and returns ``{GNTTAB: path, EVTCHN: path, MOCKXEN: path}``;
* :class:`MockXen` wraps the ``mockxen_*`` control functions (fault
  injection, call counts, leak counters, garbage collection, virtual IRQs);
* :class:`PeerProcess` runs ``tests/mock_peer.py`` as a second process (a
  peer domain) and drives it over a pipe;
* :func:`require_peers` skips a test, or fails it when
  ``PYXEN9P_REQUIRE_PEERS`` is set (as CI does).

Ready-made fixtures, importable into a test module under names that do not
clash with the fixture names (so ruff's F811 stays quiet)::

    from mocklibs import mock_libs_fixture, mockxen_fixture, xen_dir_fixture  # noqa: F401

    def test_x(mock_libs, mockxen, xen_dir): ...

``mock_libs`` (session) is the build, ``mockxen`` (session) a :class:`MockXen`,
``xen_dir`` a fresh ``MOCKXEN_DIR`` as domain 0, checked for leaks afterwards
(see :func:`xen_system`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import pytest

from .build import (
    EVTCHN,
    EXPORTS,
    GNTTAB,
    MOCKXEN,
    CompilerNotFoundError,
    MockBuildError,
    build_mock_libs,
    default_cache_dir,
    mock_env,
)

__all__ = [
    "EVTCHN",
    "EXPORTS",
    "GNTTAB",
    "LIVE_KINDS",
    "MOCKXEN",
    "CompilerNotFoundError",
    "MockBuildError",
    "MockXen",
    "PeerError",
    "PeerProcess",
    "build_mock_libs",
    "default_cache_dir",
    "domain",
    "mock_env",
    "mock_libs_fixture",
    "mockxen_fixture",
    "open_descriptors",
    "require_peers",
    "session_mock_libs",
    "xen_dir_fixture",
    "xen_system",
]

#: What the leak counters count.
LIVE_KINDS = ("grants", "mappings", "ports", "handles")

TESTS_DIR = Path(__file__).resolve().parent.parent
PEER_SCRIPT = TESTS_DIR / "mock_peer.py"


def require_peers(reason: str) -> NoReturn:
    """Skip the test, or fail it when ``PYXEN9P_REQUIRE_PEERS`` is set (CI)."""
    if os.environ.get("PYXEN9P_REQUIRE_PEERS"):
        pytest.fail(f"{reason} (PYXEN9P_REQUIRE_PEERS is set)", pytrace=False)
    pytest.skip(reason)


_built: dict[str, Path] | None = None
_build_error: tuple[bool, str] | None = None


def session_mock_libs(config: pytest.Config | None = None) -> dict[str, Path]:
    """Build the mocks once per process (into pytest's cache when *config* is given).

    :param config: the pytest config, whose cache directory holds the build
    :returns: the paths of :func:`build_mock_libs`
    """
    global _built, _build_error
    if _built is None:
        dest = None
        cache = getattr(config, "cache", None) if config is not None else None
        if cache is not None:
            dest = cache.mkdir("mocklibs")
        if _build_error is None:
            try:
                _built = build_mock_libs(dest)
            except CompilerNotFoundError as exc:
                _build_error = (True, f"cannot build the mock Xen libraries: {exc}")
            except MockBuildError as exc:
                _build_error = (False, f"the mock Xen libraries do not compile:\n{exc}")
        if _built is None:
            assert _build_error is not None
            missing_tool, message = _build_error
            if missing_tool:
                require_peers(message)
            pytest.fail(message, pytrace=False)  # a broken mock is a failure, never a skip
    return _built


@pytest.fixture(scope="session", name="mock_libs")
def mock_libs_fixture(request: pytest.FixtureRequest) -> dict[str, Path]:
    """Fixture ``mock_libs``: the paths of the mock build (see :func:`session_mock_libs`)."""
    return session_mock_libs(request.config)


@pytest.fixture(scope="session", name="mockxen")
def mockxen_fixture(mock_libs: dict[str, Path]) -> MockXen:
    """Fixture ``mockxen``: the control functions of the mock build."""
    return MockXen(mock_libs)


@pytest.fixture(name="xen_dir")
def xen_dir_fixture(
    tmp_path: Path, mockxen: MockXen, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """Fixture ``xen_dir``: a fresh ``MOCKXEN_DIR`` (domain 0), leak-checked afterwards."""
    with xen_system(tmp_path, mockxen, monkeypatch) as xen_dir:
        yield xen_dir


class MockXen:
    """The ``mockxen_*`` control functions of a mock build, loaded in this process.

    :param libs: the result of :func:`build_mock_libs`
    """

    def __init__(self, libs: Mapping[str, Path]) -> None:
        self.cdll = ctypes.CDLL(str(libs[MOCKXEN]), use_errno=True)
        c = self.cdll
        c.mockxen_fail.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
        c.mockxen_calls.argtypes = [ctypes.c_char_p]
        c.mockxen_dir_live.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        c.mockxen_gc.argtypes = [ctypes.c_char_p]
        c.mockxen_raise_virq.argtypes = [ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint]
        c.mockxen_reset.restype = None

    def _check(self, rc: int, what: str) -> int:
        if rc < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")
        return rc

    def fail(self, function: str, nth: int, err: int) -> None:
        """Make call *nth* (1-based since the last :meth:`reset`; 0 = every
        call) of C function *function* fail with errno *err*."""
        self._check(self.cdll.mockxen_fail(function.encode(), nth, err), "mockxen_fail")

    def reset(self) -> None:
        """Forget the failure rules and the call counts."""
        self.cdll.mockxen_reset()

    def calls(self, function: str) -> int:
        """How often *function* was called since the last :meth:`reset`."""
        return self._check(self.cdll.mockxen_calls(function.encode()), "mockxen_calls")

    def misuse(self) -> int:
        """Calls made with a closed, unknown or wrong-kind handle since the last reset."""
        return int(self.cdll.mockxen_misuse())

    def live(self) -> dict[str, int]:
        """This process's live grants, mappings, ports and handles."""
        return {kind: int(getattr(self.cdll, f"mockxen_live_{kind}")()) for kind in LIVE_KINDS}

    def dir_live(self, xen_dir: str | os.PathLike[str]) -> dict[str, int]:
        """The same counters for every process using *xen_dir* (after a collection)."""
        d = os.fspath(xen_dir).encode()
        return {
            kind: self._check(self.cdll.mockxen_dir_live(d, kind.encode()), "mockxen_dir_live")
            for kind in LIVE_KINDS
        }

    def purge(self) -> int:
        """Unmap, unshare and close everything this process still holds.

        For test isolation after a leak: any view of the memory must already
        be released.  Returns how many regions and handles were released.
        """
        return int(self.cdll.mockxen_purge())

    def gc(self, xen_dir: str | os.PathLike[str]) -> None:
        """Release what dead processes left in *xen_dir* (with their unmap notifications)."""
        self._check(self.cdll.mockxen_gc(os.fspath(xen_dir).encode()), "mockxen_gc")

    def raise_virq(self, xen_dir: str | os.PathLike[str], domid: int, virq: int) -> None:
        """Fire virtual IRQ *virq* of domain *domid* (``ENOENT`` if nobody bound it)."""
        self._check(
            self.cdll.mockxen_raise_virq(os.fspath(xen_dir).encode(), domid, virq),
            "mockxen_raise_virq",
        )


@contextlib.contextmanager
def domain(domid: int) -> Iterator[None]:
    """Open handles as domain *domid* inside the ``with`` block.

    The mocks read ``MOCKXEN_DOMID`` when a handle is opened, so handles of
    several domains can live in one process.
    """
    old = os.environ.get("MOCKXEN_DOMID")
    os.environ["MOCKXEN_DOMID"] = str(domid)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MOCKXEN_DOMID", None)
        else:
            os.environ["MOCKXEN_DOMID"] = old


@contextlib.contextmanager
def xen_system(
    base: Path, mockxen: MockXen, monkeypatch: pytest.MonkeyPatch, *, grant_limit: int | None = None
) -> Iterator[Path]:
    """A fresh ``MOCKXEN_DIR`` under *base* for one test, as domain 0.

    Resets the failure rules and call counts first; afterwards checks that
    the test left nothing behind: no live grant, mapping, port or handle in
    this process or in the directory, and no call with a closed handle.

    :param grant_limit: ``MOCKXEN_GRANT_LIMIT`` for the directory
    """
    xen_dir = base / "xen"
    xen_dir.mkdir()
    monkeypatch.setenv("MOCKXEN_DIR", str(xen_dir))
    monkeypatch.setenv("MOCKXEN_DOMID", "0")
    monkeypatch.delenv("MOCKXEN_FAIL", raising=False)
    if grant_limit is None:
        monkeypatch.delenv("MOCKXEN_GRANT_LIMIT", raising=False)
    else:
        monkeypatch.setenv("MOCKXEN_GRANT_LIMIT", str(grant_limit))
    mockxen.reset()
    yield xen_dir
    zero = dict.fromkeys(LIVE_KINDS, 0)
    live, misuse = mockxen.live(), mockxen.misuse()
    if live != zero:
        mockxen.purge()  # so that the next test starts clean
    dir_live = mockxen.dir_live(xen_dir)
    assert live == zero, f"this process left Xen objects behind: {live}"
    assert dir_live == zero, f"Xen objects left behind in MOCKXEN_DIR: {dir_live}"
    assert misuse == 0, "a C function was called with a closed or foreign handle"
    assert open_descriptors(xen_dir) == [], "descriptors of MOCKXEN_DIR left open"


def open_descriptors(under: str | os.PathLike[str]) -> list[str]:
    """The files under *under* that this process holds open descriptors of."""
    prefix = os.path.realpath(under) + os.sep
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith(prefix):
            found.append(target)
    return sorted(found)


class PeerError(Exception):
    """An operation failed inside the peer process.

    :ivar kind: the exception class name in the peer
    :ivar errno: its ``errno`` (``None`` if not an :class:`OSError`)
    :ivar function: the failing C function, for a ``XenLibraryError``
    """

    def __init__(self, info: Mapping[str, Any]) -> None:
        super().__init__(f"{info.get('type')}: {info.get('message')}")
        self.kind: str = str(info.get("type"))
        self.errno: int | None = info.get("errno")
        self.function: str | None = info.get("function")


class PeerProcess:
    """``tests/mock_peer.py`` running as domain *domid* over the mocks.

    Each :meth:`call` sends one JSON request and waits (at most *timeout*
    seconds) for its reply; see ``mock_peer.py`` for the operations.

    :param libs: the result of :func:`build_mock_libs`
    :param xen_dir: the shared ``MOCKXEN_DIR``
    :param domid: the peer's domain
    :param env: extra environment variables (e.g. ``MOCKXEN_FAIL``)
    """

    def __init__(
        self,
        libs: Mapping[str, Path],
        xen_dir: str | os.PathLike[str],
        domid: int,
        env: Mapping[str, str] | None = None,
        timeout: float = 20.0,
    ) -> None:
        full_env = dict(os.environ)
        full_env.pop("MOCKXEN_FAIL", None)
        full_env.update(mock_env(libs, xen_dir, domid))
        full_env.update(env or {})
        self.timeout = timeout
        self.domid = domid
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=full_env,
            text=True,
            bufsize=1,
        )
        try:
            self.call("ping")
        except BaseException:
            self.kill()
            raise

    @property
    def pid(self) -> int:
        """The peer's process id."""
        return self.proc.pid

    def call(self, op: str, /, *, reply_timeout: float | None = None, **args: Any) -> Any:
        """Run *op* in the peer and return its result.

        :raises PeerError: if the operation raised in the peer
        :raises TimeoutError: if no answer came in time (the peer is killed)
        """
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        wait = self.timeout if reply_timeout is None else reply_timeout
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            if ready:
                break
            if left <= 0:
                self.kill()
                raise TimeoutError(f"peer did not answer {op!r} in time")
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait(timeout=10)
            raise PeerError({"type": "EOF", "message": f"peer exited with {code} during {op}"})
        reply = json.loads(line)
        if "error" in reply:
            raise PeerError(reply["error"])
        return reply.get("result")

    def kill(self) -> None:
        """SIGKILL the peer and reap it (it gets no chance to clean up)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._close_pipes()

    def close(self) -> int:
        """Ask the peer to close everything and exit; return its exit status."""
        if self.proc.poll() is None:
            try:
                self.call("exit")
            except (PeerError, TimeoutError, OSError):
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._close_pipes()
        return int(self.proc.returncode)

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
