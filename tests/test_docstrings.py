"""Every public name of the package has a docstring (autodoc skips the others)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pyxen9p


def _modules() -> list[str]:
    names = ["pyxen9p"]
    for info in pkgutil.walk_packages(pyxen9p.__path__, "pyxen9p."):
        names.append(info.name)
    return names


def _public(module: object) -> list[tuple[str, object]]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    return [(n, getattr(module, n)) for n in names]


def test_every_public_name_is_documented() -> None:
    missing = []
    for name in _modules():
        module = importlib.import_module(name)
        if not module.__doc__:
            missing.append(name)
        for attr, obj in _public(module):
            if getattr(obj, "__module__", name) != name:
                continue  # documented where it is defined
            if inspect.isclass(obj) or inspect.isfunction(obj):
                if not obj.__doc__:
                    missing.append(f"{name}.{attr}")
                if inspect.isclass(obj):
                    for member, value in vars(obj).items():
                        if member.startswith("_"):
                            continue
                        func = value.fget if isinstance(value, property) else value
                        func = getattr(func, "__func__", func)
                        if inspect.isfunction(func) and not func.__doc__:
                            missing.append(f"{name}.{attr}.{member}")
    assert missing == [], "undocumented public names:\n" + "\n".join(missing)
