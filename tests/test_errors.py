"""Every exception class pyxen9p defines derives from one base, and the table
of errors in the user guide lists them all."""

from __future__ import annotations

import errno
import importlib
import inspect
import pickle
import pkgutil
import re
from pathlib import Path

import pytest

import pyxen9p
from pyxen9p import errors
from pyxen9p.errors import (
    BackendError,
    FramingError,
    HandleClosedError,
    ProtocolError,
    Pyxen9pError,
    RingProtocolError,
    TransportError,
)

DOCS = Path(__file__).resolve().parent.parent / "docs"

#: Private control-flow exceptions that never leave their module.
INTERNAL = {"pyxen9p.p9.server._Err", "pyxen9p.sim.backend._Fatal"}


def _exception_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in a pyxen9p module, public or not."""
    found: dict[str, type[BaseException]] = {}
    names = ["pyxen9p"] + [i.name for i in pkgutil.walk_packages(pyxen9p.__path__, "pyxen9p.")]
    for name in names:
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == name
            ):
                found[f"{name}.{attr}"] = obj
    return found


def test_every_exception_class_derives_from_the_base() -> None:
    classes = _exception_classes()
    assert len(classes) >= 15, sorted(classes)  # the walk found them
    forgot = [
        name for name, cls in classes.items()
        if not issubclass(cls, Pyxen9pError) and name not in INTERNAL
    ]
    assert forgot == [], f"exception classes not deriving from Pyxen9pError: {forgot}"


def test_the_base_is_exported_at_the_top() -> None:
    assert pyxen9p.Pyxen9pError is Pyxen9pError
    assert "Pyxen9pError" in pyxen9p.__all__


def test_old_import_paths_still_work() -> None:
    from pyxen9p.p9.codec import ProtocolError as codec_protocol_error
    from pyxen9p.p9.transport import FramingError as transport_framing_error

    assert codec_protocol_error is ProtocolError
    assert transport_framing_error is FramingError


def test_builtin_bases_are_kept() -> None:
    """Callers that caught the builtin classes still catch the same errors."""
    assert issubclass(ProtocolError, ValueError) and issubclass(ProtocolError, OSError)
    assert issubclass(HandleClosedError, ValueError)
    assert issubclass(TransportError, ConnectionError)
    assert issubclass(FramingError, TransportError) and issubclass(FramingError, ProtocolError)
    assert issubclass(RingProtocolError, BackendError)
    lookup = errors.xen_error(errno.ENOENT, "xs_read")
    assert isinstance(lookup, FileNotFoundError) and isinstance(lookup, Pyxen9pError)


@pytest.mark.parametrize(
    "exc,code",
    [
        (ProtocolError("bad reply"), errno.EPROTO),
        (ProtocolError(errno.EMSGSIZE, "too big"), errno.EMSGSIZE),
        (BackendError("be/state: missing"), errno.EPROTO),
        (RingProtocolError("indices out of range"), errno.EPROTO),
        (FramingError("bad frame"), errno.EPROTO),
        (FramingError(errno.EMSGSIZE, "too big"), errno.EMSGSIZE),
    ],
)
def test_errno_defaults_and_pickling(exc: OSError, code: int) -> None:
    assert exc.errno == code
    assert exc.strerror in str(exc)
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc) and back.errno == code and back.strerror == exc.strerror


def test_the_user_guide_table_lists_every_public_class() -> None:
    """The user guide's table of errors is the one table: each public class
    is a row (the table names them by their full dotted path)."""
    text = (DOCS / "userguide.rst").read_text()
    table = text[text.index(".. list-table::", text.index(".. _errors-table:")) :]
    end = re.search(r"\n\n(?=\S)", table)  # the first unindented paragraph ends it
    table = table[: end.start()] if end else table
    rows = set(re.findall(r"^   \* - :class:`~(pyxen9p\.[\w.]+)`", table, re.M))
    # a class defined in a private module (pyxen9p.cli._common) is named by
    # the public module that exports it (pyxen9p.cli)
    names = _public_names()
    public = {
        name: names.get(id(cls), set()) | {name}
        for name, cls in _exception_classes().items()
        if name not in INTERNAL and not name.rsplit(".", 1)[1].startswith("_")
        and name.rsplit(".", 1)[0] != "pyxen9p"  # the re-export of the base
    }
    missing = {name for name, aliases in public.items() if not aliases & rows}
    assert missing == set(), "missing from the table"
    known = set().union(*public.values())
    assert rows - known == set(), "in the table but not a pyxen9p class"


def _public_names() -> dict[int, set[str]]:
    """id(class) -> every ``module.Name`` naming it in a module with no private part."""
    found: dict[int, set[str]] = {}
    names = ["pyxen9p"] + [i.name for i in pkgutil.walk_packages(pyxen9p.__path__, "pyxen9p.")]
    for name in names:
        if any(part.startswith("_") for part in name.split(".")):
            continue
        for attr, obj in vars(importlib.import_module(name)).items():
            if inspect.isclass(obj) and not attr.startswith("_"):
                found.setdefault(id(obj), set()).add(f"{name}.{attr}")
    return found
