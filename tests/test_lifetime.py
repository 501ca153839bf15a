"""Handle lifetime: garbage collection, interpreter shutdown, parents kept alive.

Runs against the mock libraries (a real dlopen).  The C close functions are
wrapped so that each call writes a marker to stderr: an unclosed handle that is
garbage collected must warn and close; one still alive when the interpreter
shuts down must not call into C at all.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from mocklibs import (  # noqa: F401
    EVTCHN,
    GNTTAB,
    MockXen,
    mock_env,
    mock_libs_fixture,
    mockxen_fixture,
    xen_dir_fixture,
)

from pyxen9p.libs import EventChannel, GrantSharer

SCRIPT = textwrap.dedent(
    """
    import gc, os, sys, warnings
    from pyxen9p.libs import xenevtchn, xengnttab
    from pyxen9p.libs import EventChannel, GrantSharer

    def traced(lib, name):
        original = getattr(lib, name)
        def call(*args):
            os.write(2, f"C:{name}\\n".encode())
            return original(*args)
        setattr(lib, name, call)

    gnt = xengnttab.LIBRARY.load()
    evt = xenevtchn.LIBRARY.load()
    for name in ("xengntshr_close", "xengntshr_unshare"):
        traced(gnt, name)
    for name in ("xenevtchn_close", "xenevtchn_unbind"):
        traced(evt, name)
    warnings.simplefilter("always", ResourceWarning)

    # collected while the interpreter runs: warns, then closes
    pages = GrantSharer().share_pages(1, 1)
    pages.buffer[0] = 1
    os.write(2, b"phase:gc\\n")
    del pages
    gc.collect()
    os.write(2, b"phase:exit\\n")
    # still alive at exit: must not call into C during finalization
    KEEP = [GrantSharer().share_pages(1, 2), EventChannel()]
    KEEP[1].bind_unbound_port(1)
    """
)


def test_gc_closes_and_shutdown_never_calls_c(
    mock_libs: dict[str, Path], xen_dir: Path, mockxen: MockXen
) -> None:
    env = dict(os.environ)
    env.update(mock_env(mock_libs, xen_dir, 0))
    env["PYTHONPATH"] = str(Path(__file__).parent.parent)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    before, _, after = result.stderr.partition("phase:exit")
    gc_phase = before.partition("phase:gc")[2]
    assert "ResourceWarning: unclosed GrantSharer" in gc_phase
    assert "C:xengntshr_unshare" in gc_phase and "C:xengntshr_close" in gc_phase
    assert "C:" not in after, after  # nothing at interpreter shutdown
    assert "Exception ignored" not in result.stderr
    mockxen.gc(xen_dir)  # what the dead process held is released by the OS


def test_children_keep_their_handle_alive(mock_libs: dict[str, Path], xen_dir: Path) -> None:
    pages = GrantSharer(library=mock_libs[GNTTAB]).share_pages(1, 1)
    gc.collect()  # the sharer has no other reference: the pages keep it alive
    assert not pages.sharer.closed
    pages.buffer[:4] = b"live"
    sharer = pages.sharer
    pages.close()
    assert pages.closed and not sharer.closed
    sharer.close()


def test_an_unclosed_handle_warns_and_is_released(
    mock_libs: dict[str, Path], xen_dir: Path, mockxen: MockXen
) -> None:
    channel = EventChannel(library=mock_libs[EVTCHN])
    channel.bind_unbound_port(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        del channel
        gc.collect()
    assert any("unclosed EventChannel" in str(w.message) for w in caught)
    assert mockxen.live() == {"grants": 0, "mappings": 0, "ports": 0, "handles": 0}


def test_a_closed_handle_refuses_use(mock_libs: dict[str, Path], xen_dir: Path) -> None:
    from pyxen9p.errors import HandleClosedError

    sharer = GrantSharer(library=mock_libs[GNTTAB])
    sharer.close()
    sharer.close()
    with pytest.raises(HandleClosedError):
        sharer.share_pages(1, 1)
    with pytest.raises(HandleClosedError), sharer:
        pass
