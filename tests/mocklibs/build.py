"""Compile the mock Xen libraries with the system C compiler.

:func:`build_mock_libs` turns the C sources next to this file into three
shared objects in a cache directory and returns their paths:

``libxengnttab.so.1``
    the mock of Debian's ``libxengnttab.so.1`` (same SONAME, same exported
    names and symbol versions);
``libxenevtchn.so.1``
    the mock of ``libxenevtchn.so.1``;
``libmockxen.so``
    the shared state machinery both depend on (found through ``RPATH=$ORIGIN``,
    so keep the three files together); it exports the ``mockxen_*`` control
    functions, which are also reachable through either mock's handle.

The outputs go to ``<dest_dir>/<digest>/`` where the digest covers the
sources, the compiler and its flags: a changed source gives a new build, an
unchanged one is reused.  Concurrent builds (several pytest processes) are
serialised with a lock file.

Using the mocks from another process (e.g. a backend peer)::

    libs = build_mock_libs(cache_dir)
    env = dict(os.environ, **mock_env(libs, xen_dir, domid=1))
    subprocess.run([...], env=env)

:func:`mock_env` sets ``MOCKXEN_DIR`` / ``MOCKXEN_DOMID`` (the simulated Xen
system and the caller's domain) and ``PYXEN9P_LIBXENGNTTAB`` /
``PYXEN9P_LIBXENEVTCHN`` (which the bindings load by default).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "EVTCHN",
    "GNTTAB",
    "MOCKXEN",
    "CompilerNotFoundError",
    "MockBuildError",
    "build_mock_libs",
    "default_cache_dir",
    "mock_env",
]

#: Key (and file name) of the mock ``libxengnttab`` in :func:`build_mock_libs`'s result.
GNTTAB = "libxengnttab.so.1"
#: Key (and file name) of the mock ``libxenevtchn``.
EVTCHN = "libxenevtchn.so.1"
#: Key (and file name) of the shared state library.
MOCKXEN = "libmockxen.so"

SOURCE_DIR = Path(__file__).resolve().parent
_COMMON_SOURCES = ("mockxen_common.h", "mockxen_common.c")
_SOURCES = (*_COMMON_SOURCES, "mock_gnttab.c", "mock_evtchn.c")

CFLAGS = (
    "-std=gnu11",
    "-O2",
    "-g",
    "-fPIC",
    "-pthread",
    "-fvisibility=hidden",
    "-Wall",
    "-Wextra",
    "-Werror",
)

# Symbol versions of Debian's libraries (Xen 4.17), from the libraries' .map
# files: ``nm -D`` of the mocks shows the same ``name@@VERS_x`` pairs.
_GNTTAB_VERSIONS: dict[str, tuple[str, ...]] = {
    "VERS_1.0": (
        "xengnttab_open",
        "xengnttab_close",
        "xengnttab_map_grant_ref",
        "xengnttab_map_grant_refs",
        "xengnttab_map_domain_grant_refs",
        "xengnttab_map_grant_ref_notify",
        "xengnttab_unmap",
        "xengnttab_set_max_grants",
        "xengntshr_open",
        "xengntshr_close",
        "xengntshr_share_pages",
        "xengntshr_share_page_notify",
        "xengntshr_unshare",
    ),
    "VERS_1.1": ("xengnttab_grant_copy",),
    "VERS_1.2": (
        "xengnttab_fd",
        "xengntshr_fd",
        "xengnttab_dmabuf_exp_from_refs",
        "xengnttab_dmabuf_exp_wait_released",
        "xengnttab_dmabuf_imp_to_refs",
        "xengnttab_dmabuf_imp_release",
    ),
}
_EVTCHN_VERSIONS: dict[str, tuple[str, ...]] = {
    "VERS_1.0": (
        "xenevtchn_open",
        "xenevtchn_close",
        "xenevtchn_fd",
        "xenevtchn_notify",
        "xenevtchn_bind_unbound_port",
        "xenevtchn_bind_interdomain",
        "xenevtchn_bind_virq",
        "xenevtchn_unbind",
        "xenevtchn_pending",
        "xenevtchn_unmask",
    ),
    "VERS_1.1": ("xenevtchn_restrict",),
    "VERS_1.2": ("xenevtchn_fdopen",),
}

#: Every function each mock exports, by library file name.
EXPORTS: dict[str, frozenset[str]] = {
    GNTTAB: frozenset(n for names in _GNTTAB_VERSIONS.values() for n in names),
    EVTCHN: frozenset(n for names in _EVTCHN_VERSIONS.values() for n in names),
}


class MockBuildError(RuntimeError):
    """The mock libraries could not be compiled (no ``cc``, or a compiler error)."""


class CompilerNotFoundError(MockBuildError):
    """There is no C compiler to build the mock libraries with."""


def _version_script(versions: Mapping[str, tuple[str, ...]]) -> str:
    parts = []
    previous = None
    for index, (version, names) in enumerate(versions.items()):
        body = "".join(f"    {name};\n" for name in names)
        local = "  local: *;\n" if index == 0 else ""
        inherit = f" {previous}" if previous else ""
        parts.append(f"{version} {{\n  global:\n{body}{local}}}{inherit};\n")
        previous = version
    return "".join(parts)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/pyxen9p/mocklibs`` (``~/.cache/...`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pyxen9p" / "mocklibs"


def _compiler(cc: str | None) -> str:
    found = shutil.which(cc or os.environ.get("CC") or "cc")
    if not found:
        raise CompilerNotFoundError("no C compiler: install gcc (Debian package 'gcc') or set CC")
    return found


def _digest(cc: str) -> str:
    h = hashlib.sha256()
    try:
        version = subprocess.run(
            [cc, "--version"], capture_output=True, text=True, timeout=60, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise CompilerNotFoundError(f"cannot run {cc}: {exc}") from exc
    h.update(version.encode())
    h.update(repr(CFLAGS).encode())
    h.update(_version_script(_GNTTAB_VERSIONS).encode())
    h.update(_version_script(_EVTCHN_VERSIONS).encode())
    for name in _SOURCES:
        h.update(name.encode())
        h.update((SOURCE_DIR / name).read_bytes())
    return h.hexdigest()[:16]


def _run(argv: list[str]) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise MockBuildError(f"{argv[0]} failed to run: {exc}") from exc
    if proc.returncode != 0:
        raise MockBuildError(f"{' '.join(argv)}\n{proc.stdout}{proc.stderr}")


def _compile(cc: str, out: Path) -> None:
    src = SOURCE_DIR
    _run(
        [
            cc,
            *CFLAGS,
            "-shared",
            "-Wl,-soname," + MOCKXEN,
            "-Wl,-z,defs",
            "-o",
            str(out / MOCKXEN),
            str(src / "mockxen_common.c"),
        ]
    )
    for lib, source, versions in (
        (GNTTAB, "mock_gnttab.c", _GNTTAB_VERSIONS),
        (EVTCHN, "mock_evtchn.c", _EVTCHN_VERSIONS),
    ):
        script = out / f"{lib}.map"
        script.write_text(_version_script(versions))
        _run(
            [
                cc,
                *CFLAGS,
                "-shared",
                "-I",
                str(src),
                "-Wl,-soname," + lib,
                "-Wl,--version-script=" + str(script),
                "-Wl,-z,defs",
                "-Wl,-rpath,$ORIGIN",
                "-o",
                str(out / lib),
                str(src / source),
                "-L",
                str(out),
                "-l:" + MOCKXEN,
            ]
        )
        script.unlink()


def build_mock_libs(
    dest_dir: str | os.PathLike[str] | None = None, *, cc: str | None = None
) -> dict[str, Path]:
    """Build (or reuse) the mock libraries.

    :param dest_dir: the cache directory (created if needed); ``None`` means
        :func:`default_cache_dir`
    :param cc: the C compiler; default ``$CC`` or ``cc``
    :returns: ``{GNTTAB: path, EVTCHN: path, MOCKXEN: path}``, absolute paths
    :raises CompilerNotFoundError: without a C compiler
    :raises MockBuildError: if compilation fails
    """
    compiler = _compiler(cc)
    root = Path(dest_dir) if dest_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = (root / _digest(compiler)).resolve()
    names = (GNTTAB, EVTCHN, MOCKXEN)
    result = {name: final / name for name in names}
    if all(path.is_file() for path in result.values()):
        return result
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all(path.is_file() for path in result.values()):
            return result
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            _compile(compiler, tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return result


def mock_env(
    libs: Mapping[str, Path], xen_dir: str | os.PathLike[str], domid: int = 0
) -> dict[str, str]:
    """The environment that makes a process use the mocks as domain *domid*.

    :param libs: the result of :func:`build_mock_libs`
    :param xen_dir: the simulated Xen system (``MOCKXEN_DIR``), an existing directory
    :param domid: the process's domain (``MOCKXEN_DOMID``)
    :returns: variables to add to the process environment
    """
    return {
        "MOCKXEN_DIR": os.fspath(xen_dir),
        "MOCKXEN_DOMID": str(domid),
        "PYXEN9P_LIBXENGNTTAB": str(libs[GNTTAB]),
        "PYXEN9P_LIBXENEVTCHN": str(libs[EVTCHN]),
    }
