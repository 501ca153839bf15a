"""The bindings against Debian's real libraries (no Xen needed).

* every bound name exists in the real shared object, and every exported
  name is bound unless excluded below (with the reason);
* every bound signature matches the prototype in the real header
  (``libxen-dev``): argument count, pointer-ness, size and signedness;
* without Xen, opening fails with ``ENOENT`` naming the C open function;
* a missing library raises :class:`~pyxen9p.errors.LibraryNotFoundError`
  naming the Debian package;
* the mocks export the same names with the same symbol versions.

Needs libxengnttab1, libxenevtchn1, libxenstore4, libxen-dev and binutils:
skipped without them unless ``PYXEN9P_REQUIRE_PEERS`` is set (then failed).
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from mocklibs import EVTCHN, GNTTAB, require_peers, session_mock_libs

from pyxen9p.errors import LibraryNotFoundError, XenLibraryError
from pyxen9p.libs import xenevtchn, xengnttab, xenstore
from pyxen9p.libs._ctypeslib import Signature
from pyxen9p.libs.xenevtchn import EventChannel
from pyxen9p.libs.xengnttab import GrantSharer, GrantTable
from pyxen9p.libs.xenstore import XenStore

MODULES: dict[str, ModuleType] = {
    "libxengnttab.so.1": xengnttab,
    "libxenevtchn.so.1": xenevtchn,
    "libxenstore.so.4": xenstore,
}

PACKAGES = {
    "libxengnttab.so.1": "libxengnttab1",
    "libxenevtchn.so.1": "libxenevtchn1",
    "libxenstore.so.4": "libxenstore4",
}

HEADERS = {
    "libxengnttab.so.1": ("xengnttab.h",),
    "libxenevtchn.so.1": ("xenevtchn.h",),
    "libxenstore.so.4": ("xenstore.h", "xenstore_lib.h"),
}

#: Exported functions deliberately left unbound, per library.
EXCLUDED: dict[str, dict[str, str]] = {
    "libxengnttab.so.1": {
        # dma-buf export/import of grant pages (GPU/display sharing): not
        # part of what a 9pfs transport needs
        "xengnttab_dmabuf_exp_from_refs": "dma-buf",
        "xengnttab_dmabuf_exp_wait_released": "dma-buf",
        "xengnttab_dmabuf_imp_to_refs": "dma-buf",
        "xengnttab_dmabuf_imp_release": "dma-buf",
    },
    "libxenevtchn.so.1": {},
    "libxenstore.so.4": {
        # deprecated synonyms of xs_open / xs_close (xenstore.h says so)
        "xs_daemon_open": "deprecated synonym of xs_open",
        "xs_daemon_open_readonly": "deprecated synonym of xs_open",
        "xs_domain_open": "deprecated synonym of xs_open",
        "xs_daemon_close": "deprecated synonym of xs_close",
        # xenstore_lib.h helpers for xenstored itself: writing a whole buffer
        # to a descriptor, and parsing the daemon's permission strings
        "xs_write_all": "xenstored internal helper",
        "xs_strings_to_perms": "xenstored internal helper",
    },
}


def real_library(soname: str) -> Path:
    """The path of Debian's library *soname* (skip/fail if not installed)."""
    patterns = [
        f"/usr/lib/*-linux-gnu/{soname}",
        f"/lib/*-linux-gnu/{soname}",
        f"/usr/lib64/{soname}",
        f"/usr/lib/{soname}",
    ]
    for pattern in patterns:
        found = sorted(glob.glob(pattern))
        if found:
            return Path(found[0]).resolve()
    require_peers(f"{soname} is not installed (Debian package {PACKAGES[soname]})")


def exported(path: Path) -> dict[str, str]:
    """``nm -D --defined-only``: function name -> symbol version."""
    try:
        out = subprocess.run(
            ["nm", "-D", "--defined-only", str(path)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    except FileNotFoundError:
        require_peers("nm is not installed (Debian package binutils)")
    names = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in ("T", "W"):
            name, _, version = parts[2].partition("@@")
            names[name] = version
    return names


@pytest.fixture(params=sorted(MODULES))
def soname(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def no_xen(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if os.path.exists("/dev/xen") or os.path.exists("/proc/xen/capabilities"):
        pytest.skip("this machine runs on Xen")
    # xs_open tries $XENSTORED_PATH (absent here) before /dev/xen/xenbus
    monkeypatch.setenv("XENSTORED_PATH", str(tmp_path / "no-such-socket"))
    for var in ("PYXEN9P_LIBXENGNTTAB", "PYXEN9P_LIBXENEVTCHN", "PYXEN9P_LIBXENSTORE"):
        monkeypatch.delenv(var, raising=False)


# ------------------------------------------------------------ names


def test_bound_names_are_exported_and_exports_are_bound(soname: str) -> None:
    names = exported(real_library(soname))
    bound = set(MODULES[soname].LIBRARY.signatures)
    missing = bound - set(names)
    assert not missing, f"bound but not exported by {soname}: {sorted(missing)}"
    unbound = set(names) - bound
    assert unbound == set(EXCLUDED[soname]), (
        f"exported by {soname} but neither bound nor excluded: "
        f"{sorted(unbound - set(EXCLUDED[soname]))}; excluded but bound or gone: "
        f"{sorted(set(EXCLUDED[soname]) - unbound)}"
    )


def test_spec_names_the_soname_and_package(soname: str) -> None:
    spec = MODULES[soname].LIBRARY
    assert spec.sonames[0] == soname
    assert spec.package == PACKAGES[soname]


@pytest.mark.parametrize("mock", [GNTTAB, EVTCHN])
def test_mocks_export_the_real_names_and_versions(
    mock: str, request: pytest.FixtureRequest
) -> None:
    real = exported(real_library(mock))
    libs = session_mock_libs(request.config)
    assert exported(libs[mock]) == real


# ------------------------------------------------------------ signatures

_SCALARS: dict[str, Any] = {
    "int": ctypes.c_int,
    "unsigned": ctypes.c_uint,
    "unsigned int": ctypes.c_uint,
    "unsigned long": ctypes.c_ulong,
    "uint16_t": ctypes.c_uint16,
    "uint32_t": ctypes.c_uint32,
    "domid_t": ctypes.c_uint16,
    "evtchn_port_t": ctypes.c_uint32,
    "xenevtchn_port_or_error_t": ctypes.c_int,
    "xs_transaction_t": ctypes.c_uint32,
    "bool": ctypes.c_bool,
}
_TYPE_WORDS = {"int", "long", "short", "char", "unsigned", "signed", "const", "struct"}


def _prototypes(headers: tuple[str, ...]) -> dict[str, tuple[str, list[str]]]:
    """name -> (return type, [parameter types]) from the installed headers."""
    text = ""
    for header in headers:
        path = Path("/usr/include") / header
        if not path.exists():
            require_peers(f"{path} is missing (Debian package libxen-dev)")
        text += path.read_text() + "\n"
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    text = re.sub(r"^\s*#(?:[^\n]*\\\n)*[^\n]*", " ", text, flags=re.M)
    found = {}
    for statement in re.split(r"[;{}]", text):
        m = re.fullmatch(r"\s*([\w\s\*]+?)\s*\b(\w+)\s*\(([^()]*)\)\s*", statement)
        if not m:
            continue
        ret, name, args = m.groups()
        params = [] if args.strip() in ("", "void") else [a.strip() for a in args.split(",")]
        found[name] = (_ctype_of(ret, has_name=False), [_ctype_of(p) for p in params])
    return found


def _ctype_of(decl: str, has_name: bool = True) -> str:
    decl = " ".join(decl.replace("*", " * ").split())
    if "*" in decl:
        return "pointer"
    words = decl.split()
    if has_name and len(words) > 1 and words[-1] not in _TYPE_WORDS:
        words = words[:-1]
    words = [w for w in words if w not in ("const", "extern")]
    return " ".join(words)


def _compatible(c_type: str, ct: Any) -> bool:
    if c_type == "void":
        return ct is None
    if c_type == "pointer":
        return isinstance(ct, type) and issubclass(
            ct, (ctypes.c_void_p, ctypes.c_char_p, ctypes._Pointer)
        )
    expected = _SCALARS.get(c_type)
    if expected is None or ct is None or not issubclass(ct, ctypes._SimpleCData):
        return False
    if ctypes.sizeof(ct) != ctypes.sizeof(expected):
        return False
    if expected is ctypes.c_bool or ct is ctypes.c_bool:
        return bool(ct is expected)
    return bool((ct(-1).value < 0) == (expected(-1).value < 0))


def test_signatures_match_the_headers(soname: str) -> None:
    prototypes = _prototypes(HEADERS[soname])
    problems = []
    signatures: dict[str, Signature] = dict(MODULES[soname].LIBRARY.signatures)
    for name, sig in signatures.items():
        if name not in prototypes:
            problems.append(f"{name}: no prototype in {HEADERS[soname]}")
            continue
        ret, params = prototypes[name]
        if len(params) != len(sig.argtypes):
            problems.append(f"{name}: {len(sig.argtypes)} argtypes, header has {params}")
            continue
        for i, (c_type, ct) in enumerate(zip(params, sig.argtypes, strict=True)):
            if not _compatible(c_type, ct):
                problems.append(f"{name}: argument {i} is {ct}, header says {c_type}")
        if not _compatible(ret, sig.restype):
            problems.append(f"{name}: returns {sig.restype}, header says {ret}")
    assert problems == []


# ------------------------------------------------------------ loading


def _assert_enoent(exc: BaseException, function: str) -> None:
    assert isinstance(exc, XenLibraryError)
    assert isinstance(exc, FileNotFoundError)
    assert exc.errno == errno.ENOENT
    assert exc.function == function
    assert function in str(exc)


def _mapped(path: Path) -> bool:
    with open("/proc/self/maps") as maps:
        return any(line.rstrip().endswith(str(path)) for line in maps)


@pytest.mark.usefixtures("no_xen")
def test_opening_without_xen_is_enoent() -> None:
    gnttab = real_library("libxengnttab.so.1")
    evtchn = real_library("libxenevtchn.so.1")
    store = real_library("libxenstore.so.4")
    cases: list[tuple[Any, Path, str]] = [
        (GrantTable, gnttab, "xengnttab_open"),
        (GrantSharer, gnttab, "xengntshr_open"),
        (EventChannel, evtchn, "xenevtchn_open"),
        (XenStore, store, "xs_open"),
    ]
    for cls, path, function in cases:
        with pytest.raises(OSError) as info:
            cls(library=path)
        _assert_enoent(info.value, function)
        assert _mapped(path), f"{path} was not the library used"
    bound = xengnttab.LIBRARY.load(gnttab)
    with pytest.raises(AttributeError):
        bound.cdll.mockxen_reset  # noqa: B018  (the real library, not a mock)


_SUBPROCESS_CHECK = r"""
import json, sys
from pyxen9p.errors import LibraryNotFoundError
from pyxen9p.libs.xengnttab import GrantTable
from pyxen9p.libs.xenevtchn import EventChannel
from pyxen9p.libs.xenstore import XenStore
out = {}
for name, cls in (("gnttab", GrantTable), ("evtchn", EventChannel), ("xenstore", XenStore)):
    try:
        cls().close()
        out[name] = {"type": None}
    except LibraryNotFoundError as exc:
        out[name] = {"type": "LibraryNotFoundError", "package": exc.package,
                     "errno": exc.errno, "message": str(exc)}
    except OSError as exc:
        out[name] = {"type": type(exc).__name__, "errno": exc.errno,
                     "function": getattr(exc, "function", None)}
maps = open("/proc/self/maps").read().split()
out["maps"] = sorted({w for w in maps if "libxen" in w})
print(json.dumps(out))
"""


def _run_check(env_update: dict[str, str], tmp_path: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYXEN9P_LIB", "MOCKXEN_"))}
    env["XENSTORED_PATH"] = str(tmp_path / "no-such-socket")
    env.update(env_update)
    proc = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_CHECK],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@pytest.mark.usefixtures("no_xen")
def test_default_loading_uses_the_sonames(tmp_path: Path) -> None:
    """In a fresh process (no mock loaded), the SONAMEs find Debian's files."""
    paths = {s: real_library(s) for s in MODULES}
    out = _run_check({}, tmp_path)
    expected = {"gnttab": "xengnttab_open", "evtchn": "xenevtchn_open", "xenstore": "xs_open"}
    for key, function in expected.items():
        assert out[key]["errno"] == errno.ENOENT, out[key]
        assert out[key]["function"] == function
        assert "FileNotFound" in out[key]["type"]
    mapped = {os.path.realpath(p) for p in out["maps"]}
    assert {str(p) for p in paths.values()} <= mapped


def test_missing_library_names_the_debian_package(tmp_path: Path) -> None:
    for soname, module in MODULES.items():
        missing = tmp_path / soname
        with pytest.raises(LibraryNotFoundError) as info:
            module.LIBRARY.load(missing)
        assert info.value.package == PACKAGES[soname]
        assert info.value.errno == errno.ENOENT
        assert PACKAGES[soname] in str(info.value)
        assert str(missing) in str(info.value)
    with pytest.raises(LibraryNotFoundError) as info2:
        GrantTable(library=tmp_path / "libxengnttab.so.1")
    assert info2.value.package == "libxengnttab1"


def test_override_variable_pointing_nowhere(tmp_path: Path) -> None:
    nowhere = str(tmp_path / "missing.so")
    out = _run_check(
        {
            "PYXEN9P_LIBXENGNTTAB": nowhere,
            "PYXEN9P_LIBXENEVTCHN": nowhere,
            "PYXEN9P_LIBXENSTORE": nowhere,
        },
        tmp_path,
    )
    for key, package in (
        ("gnttab", "libxengnttab1"),
        ("evtchn", "libxenevtchn1"),
        ("xenstore", "libxenstore4"),
    ):
        assert out[key]["type"] == "LibraryNotFoundError"
        assert out[key]["package"] == package
        assert out[key]["errno"] == errno.ENOENT
        assert package in out[key]["message"] and nowhere in out[key]["message"]
