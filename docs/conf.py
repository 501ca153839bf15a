"""Sphinx configuration for pyxen9p."""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import pyxen9p  # noqa: E402

project = "pyxen9p"
author = "the pyxen9p developers"
copyright = "2026, the pyxen9p developers"
release = version = pyxen9p.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.intersphinx", "sphinx.ext.viewcode"]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
html_theme = "alabaster"
exclude_patterns = ["_build"]
nitpicky = False


#: Private helpers that run on behalf of a public method.
ALIASES = {
    "GrantTable._release": "GrantTable.close",
    "GrantSharer._release": "GrantSharer.close",
    "GrantTable._give_back": "GrantMapping.close",
    "GrantSharer._give_back": "SharedPages.close",
    "EventChannel._release": "EventChannel.close",
    "XenStore._release": "XenStore.close",
    "_NodeOps.read": "XenStore.read",
    "_NodeOps.write": "XenStore.write",
    "_NodeOps.mkdir": "XenStore.mkdir",
    "_NodeOps.rm": "XenStore.rm",
    "_NodeOps.directory": "XenStore.directory",
    "_NodeOps.get_permissions": "XenStore.get_permissions",
    "_NodeOps.set_permissions": "XenStore.set_permissions",
    "_static_string": "daemon_socket",
}


def _c_function_map() -> str:
    """The architecture table: each bound C function and the Python code calling it.

    Built from the signature tables and the source of the binding modules, so
    it cannot drift from the code.
    """
    from pyxen9p.libs import xenevtchn, xengnttab, xenstore

    lines = []
    for module in (xengnttab, xenevtchn, xenstore):
        spec = module.LIBRARY
        callers: dict[str, list[str]] = {name: [] for name in spec.signatures}
        for cls_name, obj in vars(module).items():
            members = []
            if inspect.isclass(obj) and obj.__module__ == module.__name__:
                for klass in obj.__mro__:
                    if klass.__module__ != module.__name__:
                        continue
                    for attr, value in vars(klass).items():
                        func = getattr(value, "fget", value)
                        if inspect.isfunction(func) or isinstance(value, classmethod):
                            func = getattr(value, "__func__", func)
                            members.append((f"{cls_name}.{attr}", func))
            elif inspect.isfunction(obj) and obj.__module__ == module.__name__:
                members.append((cls_name, obj))
            for label, func in members:
                label = ALIASES.get(label, label).removesuffix(".__init__")
                try:
                    source = inspect.getsource(func)
                except (OSError, TypeError):
                    continue
                # a C function is called as `<lib>.name(` or named as "name"
                for n in re.findall(r'(?:\.|")(x[a-z]+_\w+)(?:\(|")', source):
                    if n in callers and label not in callers[n]:
                        callers[n].append(label)
        lines.append(f"{spec.name} (``{'``, ``'.join(spec.sonames)}``)")
        lines.append("-" * len(lines[-1]))
        lines.append("")
        lines.append(".. list-table::")
        lines.append("   :header-rows: 1")
        lines.append("   :widths: 35 25 40")
        lines.append("")
        lines.append("   * - C function")
        lines.append("     - error convention")
        lines.append("     - called from")
        for name, sig in spec.signatures.items():
            check = (
                sig.errcheck.__name__
                if sig.errcheck
                else "none (cannot fail, or the method checks)"
            )
            users = ", ".join(
                f":py:obj:`~{module.__name__}.{c}`"
                for c in sorted(set(u.replace("._", ".") for u in callers[name]))
                if not c.split(".")[-1].startswith("_")
            )
            private = [c for c in callers[name] if c.split(".")[-1].startswith("_")]
            free = [c for c in callers[name] if "." not in c and not c.startswith("_")]
            if free:
                users = ", ".join(f":py:func:`~{module.__name__}.{c}`" for c in free)
            if private and not users:
                users = "internal: " + ", ".join(f"``{c}``" for c in private)
            lines.append(f"   * - ``{name}``")
            lines.append(f"     - ``{check}``")
            lines.append(f"     - {users or '—'}")
        lines.append("")
    return "\n".join(lines)


def _generate(app: object) -> None:
    out = HERE / "_generated"
    out.mkdir(exist_ok=True)
    text = _c_function_map()
    target = out / "cfunctions.rst"
    if not target.exists() or target.read_text() != text:
        target.write_text(text)


def setup(app: object) -> None:
    app.connect("builder-inited", _generate)  # type: ignore[attr-defined]
